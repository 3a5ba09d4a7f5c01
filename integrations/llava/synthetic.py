"""A fine-detail VQA dataset drawn on the fly: the default data of the LLaVA-HR recipe.

LLaVA-HR (arXiv 2403.03003) exists because a 336-px view of an image loses small details that a
1024-px view keeps. This module draws such images from a seed, with Pillow only (no downloads,
no font files): a plain background, a few large pale shapes in the middle (visible at any
resolution, never asked about) and **one small item** in one corner, with a question only that
item answers:

============  =================================================================  =============
task          question                                                           answers
============  =================================================================  =============
``digit``     What number is written in the small box in the top-left corner?    ``0`` … ``9``
``word``      What word is written in the top-left corner?                       :data:`WORDS`
``colour``    What colour is the small shape in the top-left corner?             :data:`COLOURS`
``shape``     What shape is the small mark in the top-left corner?               :data:`SHAPES`
``count``     How many small dots are in the box in the top-left corner?         ``1`` … ``7``
``text``      (text only, no image) What is 3 plus 4?                            ``0`` … ``9``
============  =================================================================  =============

Glyphs are rendered with ``ImageFont.load_default()``, cropped to their ink and resized so
their height is ``detail_px`` (8-12 px by default, whatever the image size): on a 1024-px
image a 336-px view shrinks them to 3-4 px, unreadable, while the 1024-px view keeps them.
Items sit inside their corner third of the image; the opposite corner third is left blank.
Some training samples get a second, coarse turn ("Which corner is it in?"), and a fraction of
training samples are text-only (no ``"image"`` key), as in LLaVA's instruction mix.

**The hatch task** (``kind="hatch"``, :func:`make_hatch_example`) is finer still, and made so
that low resolution loses it by construction: a patch covering a quarter to a half of a 128-px
image is filled with a few hundred 1-px line segments, 3-4 px long, all of one orientation, and
the question is which way they run (``horizontal``, ``vertical``, ``rising``, ``falling``; 25 %
by chance). Every segment of an image has the same number of ink pixels, so the patch's mean
darkness says nothing about the answer. A 16-px view (a ViT with 4-px patches reading 1/8 of the
side) samples the patch every 8 px and sees a uniform grey; a CNN with a stride-4 stem at 128 px
sees every segment. The information is spread over the whole patch, i.e. over many tokens.

Every sample is drawn from its own ``random.Random`` seeded by ``(seed, split, index)``, so a
dataset is byte-identical for a given seed and sample ``i`` does not depend on the others.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixres.errors import MixresError
from mixres.utils import check_positive_int, lazy_import

Image = lazy_import("PIL.Image")
ImageDraw = lazy_import("PIL.ImageDraw")
ImageFont = lazy_import("PIL.ImageFont")

__all__ = [
    "KINDS",
    "TASKS",
    "ORIENTATIONS",
    "REGIONS",
    "COLOURS",
    "SHAPES",
    "WORDS",
    "ANSWERS",
    "SyntheticExample",
    "SyntheticPaths",
    "make_example",
    "make_hatch_example",
    "generate_dataset",
    "exact_match",
]

TASKS = ("digit", "word", "colour", "shape", "count")
REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
OPPOSITE = {"top-left": "bottom-right", "top-right": "bottom-left", "bottom-left": "top-right", "bottom-right": "top-left"}
COLOURS = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 60, 220),
    "yellow": (225, 190, 0),
    "purple": (140, 40, 170),
    "orange": (240, 120, 10),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "DOG", "SUN", "MAP", "KEY", "BOX", "CUP", "PEN", "HAT", "CAR")  # capitals: glyph height = detail_px
MAX_DOTS = 7
#: the datasets :func:`generate_dataset` draws: small items in corners, or the hatch task
KINDS = ("corner", "hatch")
#: the hatch task's answers, with the pixel step of each orientation (image y points down)
ORIENTATIONS = ("horizontal", "vertical", "rising", "falling")
_STEP = {"horizontal": (1, 0), "vertical": (0, 1), "rising": (1, -1), "falling": (1, 1)}
#: every answer a sample can have; predictions are scored by exact match against these
ANSWERS = frozenset(
    [str(d) for d in range(10)] + list(WORDS) + list(COLOURS) + list(SHAPES) + list(REGIONS) + list(ORIENTATIONS)
)

_QUESTIONS = {
    "digit": "What number is written in the small box in the {region} corner?",
    "word": "What word is written in the {region} corner?",
    "colour": "What colour is the small shape in the {region} corner?",
    "shape": "What shape is the small mark in the {region} corner?",
    "count": "How many small dots are in the box in the {region} corner?",
}
HATCH_QUESTION = "Which way do the short lines in the patch run?"
_FOLLOW_UP = "Which corner is it in? Answer with one of: top-left, top-right, bottom-left, bottom-right."
_INK = (20, 20, 20)


@dataclass(frozen=True)
class SyntheticExample:
    """One drawn sample.

    Attributes:
        image: the RGB image, or ``None`` for a text-only sample.
        turns: ``(question, answer)`` pairs; the first question is about the small item.
        task: one of :data:`TASKS`, or ``"text"``.
        region: the corner holding the item (one of :data:`REGIONS`), ``None`` for text.
        bbox: ``(x0, y0, x1, y1)`` of the item in pixels, ``None`` for text.
        detail_px: height of the item's glyphs / size of its shape in pixels.
    """

    image: Any
    turns: tuple[tuple[str, str], ...]
    task: str
    region: str | None = None
    bbox: tuple[int, int, int, int] | None = None
    detail_px: int | None = None


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`generate_dataset` wrote the dataset.

    Attributes:
        root: the output folder; ``"image"`` entries of the JSON are relative to it.
        image_folder: ``root / "images"``, holding one PNG per image sample.
        train_json: LLaVA-format training conversations.
        test_json: LLaVA-format test conversations (single-turn, image samples only).
    """

    root: Path
    image_folder: Path
    train_json: Path
    test_json: Path


@functools.cache
def _font() -> Any:
    return ImageFont.load_default(size=64)


def _glyphs(text: str, height: int) -> Any:
    """An ``L`` mask of ``text`` cropped to its ink and resized to ``height`` pixels."""
    font = _font()
    mask = Image.new("L", (64 * (len(text) + 1), 128), 0)
    ImageDraw.Draw(mask).text((16, 16), text, fill=255, font=font)
    mask = mask.crop(mask.getbbox())
    width = max(1, round(mask.width * height / mask.height))
    return mask.resize((width, height), Image.LANCZOS)


def _place(rng: random.Random, size: tuple[int, int], region: str, item: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner for an ``item`` (w, h) inside the corner third named by ``region``."""
    (W, H), (w, h), margin = size, item, 4
    xs = (margin, W // 3 - w - margin) if region.endswith("left") else (W - W // 3 + margin, W - w - margin)
    ys = (margin, H // 3 - h - margin) if region.startswith("top") else (H - H // 3 + margin, H - h - margin)
    return rng.randint(*xs), rng.randint(*ys)


def _draw_shape(draw: Any, kind: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _distractors(rng: random.Random, image: Any, background: tuple[int, int, int]) -> None:
    """Large pale shapes confined to the middle third: visible at 336 px, never asked about."""
    W, H = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        w, h = rng.randint(W // 12, W // 4), rng.randint(H // 12, H // 4)
        x, y = rng.randint(W // 3, 2 * W // 3 - w), rng.randint(H // 3, 2 * H // 3 - h)
        tint = rng.choice(list(COLOURS.values()))
        pale = tuple((2 * b + t) // 3 for b, t in zip(background, tint))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=pale)


def _draw_item(rng: random.Random, image: Any, task: str, region: str, px: int) -> tuple[str, tuple[int, int, int, int]]:
    """Draw the small item of ``task`` in ``region``; return its answer and bounding box."""
    draw = ImageDraw.Draw(image)
    if task in ("digit", "word"):
        answer = str(rng.randrange(10)) if task == "digit" else rng.choice(WORDS)
        glyphs = _glyphs(answer, px)
        pad = px // 2 + 2 if task == "digit" else 0
        w, h = glyphs.width + 2 * pad, glyphs.height + 2 * pad
        x, y = _place(rng, image.size, region, (w, h))
        if task == "digit":
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline=_INK, width=1)
        image.paste(_INK, (x + pad, y + pad, x + pad + glyphs.width, y + pad + glyphs.height), glyphs)
        return answer, (x, y, x + w, y + h)
    if task in ("colour", "shape"):
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        x, y = _place(rng, image.size, region, (px, px))
        _draw_shape(draw, kind, (x, y, x + px - 1, y + px - 1), COLOURS[colour])
        return (colour if task == "colour" else kind), (x, y, x + px, y + px)
    count, r = rng.randint(1, MAX_DOTS), max(2, px // 5)  # count: dots on a 3x3 lattice in a box
    cell = 2 * r + 4
    side = 3 * cell + 4
    x, y = _place(rng, image.size, region, (side, side))
    draw.rectangle((x, y, x + side - 1, y + side - 1), outline=_INK, width=1)
    for k in sorted(rng.sample(range(9), count)):
        cx, cy = x + 2 + (k % 3) * cell + cell // 2, y + 2 + (k // 3) * cell + cell // 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_INK)
    return str(count), (x, y, x + side, y + side)


def _text_only(rng: random.Random) -> SyntheticExample:
    a = rng.randrange(10)
    b = rng.randrange(10 - a)
    if rng.random() < 0.5:
        return SyntheticExample(None, ((f"What is {a} plus {b}?", str(a + b)),), "text")
    return SyntheticExample(None, ((f"What is {a + b} minus {b}?", str(a)),), "text")


def _sides(rng: random.Random, image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    lo, hi = image_size
    w = rng.randint(lo, hi)
    return (w, w) if rng.random() < 1 / 3 else (w, rng.randint(lo, hi))


def make_example(
    rng: random.Random,
    *,
    image_size: int | Sequence[int] = (512, 1024),
    detail_px: Sequence[int] = (8, 12),
    follow_up: float = 0.0,
    text_only: bool = False,
) -> SyntheticExample:
    """Draw one sample.

    Args:
        rng: the source of randomness (seed it for reproducible samples).
        image_size: side length in pixels, or a range ``(lo, hi)``: width and height are drawn
            from it independently, one image in three square.
        detail_px: range ``(lo, hi)`` of the small item's glyph height / shape size in pixels.
        follow_up: probability of a second, coarse turn asking which corner holds the item.
        text_only: draw a text-only (arithmetic) sample instead.

    Returns:
        A :class:`SyntheticExample`.

    Example:
        >>> ex = make_example(random.Random(0), image_size=512)
        >>> question, answer = ex.turns[0]
        >>> ex.image.size, answer in ANSWERS
        ((512, 512), True)
    """
    if text_only:
        return _text_only(rng)
    W, H = _sides(rng, image_size)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (W, H), background)
    _distractors(rng, image, background)
    task, region, px = rng.choice(TASKS), rng.choice(REGIONS), rng.randint(*detail_px)
    answer, bbox = _draw_item(rng, image, task, region, px)
    turns = [(_QUESTIONS[task].format(region=region), answer)]
    if rng.random() < follow_up:
        turns.append((_FOLLOW_UP, region))
    return SyntheticExample(image, tuple(turns), task, region, bbox, px)


def _segment_starts(rng: random.Random, box: tuple[int, int, int, int], step: tuple[int, int], length: int) -> tuple[int, int]:
    """A start pixel from which ``length`` pixels along ``step`` stay inside ``box``."""
    (x0, y0, x1, y1), (dx, dy), reach = box, step, length - 1
    x = rng.randint(x0 + max(0, -dx * reach), x1 - 1 - max(0, dx * reach))
    y = rng.randint(y0 + max(0, -dy * reach), y1 - 1 - max(0, dy * reach))
    return x, y


def make_hatch_example(
    rng: random.Random,
    *,
    image_size: int | Sequence[int] = 128,
    segment_px: Sequence[int] = (3, 4),
    density: tuple[float, float] = (0.025, 0.037),
) -> SyntheticExample:
    """Draw one sample of the hatch task: which way do the short lines in the patch run?

    A patch with sides of 1/2 to 3/4 of the image's (placed anywhere) holds
    ``density * area`` segments of one orientation from :data:`ORIENTATIONS`, 1 px wide and
    ``L`` ink pixels long (``L`` drawn once per image from ``segment_px``; diagonal ones too, so
    every segment has ``L`` ink pixels and the darkness of the patch carries no class
    information). Outside the patch there is only the plain background.

    Args:
        rng: the source of randomness (seed it for reproducible samples).
        image_size: side in pixels, or a range ``(lo, hi)`` as in :func:`make_example`.
        segment_px: range ``(lo, hi)`` of the segments' length in pixels.
        density: range of segments per pixel of the patch (128-px images: ~150-600 segments).

    Returns:
        A :class:`SyntheticExample` with ``task="hatch"``, ``region=None``, ``bbox`` the patch
        and ``detail_px`` the segment length.

    Example:
        >>> ex = make_hatch_example(random.Random(0))
        >>> question, answer = ex.turns[0]
        >>> ex.image.size, answer in ORIENTATIONS, ex.detail_px in (3, 4)
        ((128, 128), True, True)
    """
    W, H = _sides(rng, image_size)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    image = Image.new("RGB", (W, H), background)
    w, h = rng.randint(W // 2, 3 * W // 4), rng.randint(H // 2, 3 * H // 4)
    x0, y0 = rng.randint(0, W - w), rng.randint(0, H - h)
    box = (x0, y0, x0 + w, y0 + h)
    orientation, length = rng.choice(ORIENTATIONS), rng.randint(*segment_px)
    (dx, dy), points = _STEP[orientation], []
    for _ in range(round(w * h * rng.uniform(*density))):
        x, y = _segment_starts(rng, box, (dx, dy), length)
        points += [(x + k * dx, y + k * dy) for k in range(length)]
    ImageDraw.Draw(image).point(points, fill=ink)
    return SyntheticExample(image, ((HATCH_QUESTION, orientation),), "hatch", None, box, length)


def _record(example: SyntheticExample, sample_id: str, image_path: str | None) -> dict[str, Any]:
    conversations = []
    for k, (question, answer) in enumerate(example.turns):
        value = f"<image>\n{question}" if k == 0 and image_path else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    record: dict[str, Any] = {"id": sample_id}
    if image_path:
        record["image"] = image_path
    record["conversations"] = conversations
    record["meta"] = {"task": example.task, "region": example.region, "bbox": example.bbox, "detail_px": example.detail_px}
    return record


def _check_args(num_train: int, num_test: int, image_size: Any, detail_px: Any, text_only_fraction: float, kind: str) -> None:
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MixresError(f"{name} has to be an int >= 0, but got {value!r}")
    if kind not in KINDS:
        raise MixresError(f"kind has to be one of {list(KINDS)}, but got {kind!r}")
    if isinstance(image_size, int):
        check_positive_int("image_size", image_size)
        lo = hi = image_size
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(isinstance(v, int) for v in image_size):
        lo, hi = image_size
    else:
        raise MixresError(f"image_size has to be an int or a range (lo, hi) of ints, but got {image_size!r}")
    least, factor = (4, 24) if kind == "corner" else (1, 4)  # a corner third / a half-side patch must hold the item
    if not (isinstance(detail_px, (tuple, list)) and len(detail_px) == 2 and least <= detail_px[0] <= detail_px[1]):
        raise MixresError(f"detail_px has to be a range (lo, hi) with {least} <= lo <= hi, but got {detail_px!r}")
    if lo > hi or lo < factor * detail_px[1]:
        raise MixresError(
            f"image_size {image_size!r} has to be a range lo <= hi with lo >= {factor} * detail_px[1] = "
            f"{factor * detail_px[1]} (the {kind} item has to fit)"
        )
    if not 0.0 <= text_only_fraction <= 1.0:
        raise MixresError(f"text_only_fraction has to be in [0, 1], but got {text_only_fraction!r}")


def generate_dataset(
    out_dir: str | Path,
    num_train: int,
    num_test: int,
    image_size: int | Sequence[int] | None = None,
    seed: int = 0,
    *,
    detail_px: Sequence[int] | None = None,
    text_only_fraction: float = 0.1,
    kind: str = "corner",
) -> SyntheticPaths:
    """Write a synthetic fine-detail VQA dataset in LLaVA's conversation format.

    Writes ``out_dir/images/{train,test}-NNNNNN.png``, ``out_dir/train.json`` and
    ``out_dir/test.json``; each JSON is a list of records with the keys ``id``, ``image``,
    ``conversations`` (alternating ``human`` / ``gpt`` turns, the first human turn starting with
    ``<image>``) and ``meta``, as in LLaVA's ``llava_v1_5_mix665k.json``; ``image`` is relative
    to ``out_dir`` and ``meta`` (task, region, bbox, detail_px; ignored by LLaVA loaders) helps scoring.
    ``round(num_train * text_only_fraction)`` training samples are text-only (no ``"image"``);
    about a third of the image training samples have a second turn. Test samples are single-turn
    image questions. Output is byte-identical for a given seed.

    Args:
        out_dir: folder to write into (created if needed).
        num_train: number of training samples (text-only ones included).
        num_test: number of test samples.
        image_size: side in pixels, or a range ``(lo, hi)`` for width and height; ``None``:
            ``(512, 1024)`` (corner) or ``128`` (hatch).
        seed: the seed everything is drawn from.
        detail_px: range of the small items' size (corner; ``None``: ``(8, 12)``) or of the
            segments' length (hatch; ``None``: ``(3, 4)``) in pixels.
        text_only_fraction: share of text-only training samples.
        kind: ``"corner"`` (small items in corners) or ``"hatch"``; see the module docstring.

    Returns:
        The :class:`SyntheticPaths` written.

    Raises:
        MixresError: a count, size or fraction out of range.

    Example:
        >>> import tempfile
        >>> paths = generate_dataset(tempfile.mkdtemp(), num_train=2, num_test=1, image_size=512)
        >>> records = json.loads(paths.test_json.read_text())
        >>> turn = records.pop(0).get("conversations").pop(0)
        >>> turn.get("value").startswith("<image>")
        True
    """
    hatch = kind == "hatch"
    image_size = image_size if image_size is not None else (128 if hatch else (512, 1024))
    detail_px = detail_px if detail_px is not None else ((3, 4) if hatch else (8, 12))
    _check_args(num_train, num_test, image_size, detail_px, text_only_fraction, kind)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    num_text = round(num_train * text_only_fraction)
    paths = SyntheticPaths(root, root / "images", root / "train.json", root / "test.json")
    for split, count, path in (("train", num_train, paths.train_json), ("test", num_test, paths.test_json)):
        records = []
        for i in range(count):
            rng = random.Random(f"mixres-synthetic/{seed}/{split}/{i}")
            text_only = split == "train" and i >= count - num_text
            if hatch and not text_only:
                ex = make_hatch_example(rng, image_size=image_size, segment_px=detail_px)
            else:
                ex = make_example(rng, image_size=image_size, detail_px=detail_px,
                                  follow_up=0.3 if split == "train" else 0.0, text_only=text_only)
            image_path = None
            if ex.image is not None:
                image_path = f"images/{split}-{i:06d}.png"
                ex.image.save(root / image_path, format="PNG", compress_level=1)
            records.append(_record(ex, f"{split}-{i:06d}", image_path))
        path.write_text(json.dumps(records, indent=1) + "\n")
    return paths


def _normalise(answer: str) -> str:
    return answer.strip().strip(".").strip().lower()


def exact_match(predictions: Mapping[str, str], samples: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Exact-match accuracy of ``predictions`` (sample id -> answer), overall and per task.

    Answers are compared after stripping spaces and a final full stop, case-insensitively; only
    the first turn of each sample is scored. Samples without a prediction count as wrong.

    Args:
        predictions: the model's answer for each sample id.
        samples: LLaVA-format records as written by :func:`generate_dataset`.

    Returns:
        ``{"all": accuracy, "<task>": accuracy, ...}`` over the tasks present.

    Example:
        >>> samples = [{"id": "a", "conversations": [{"from": "human", "value": "q"},
        ...            {"from": "gpt", "value": "7"}], "meta": {"task": "digit"}}]
        >>> exact_match({"a": "7."}, samples)
        {'all': 1.0, 'digit': 1.0}
    """
    hits: dict[str, list[bool]] = {"all": []}
    for sample in samples:
        truth = sample["conversations"][1]["value"]
        hit = _normalise(predictions.get(sample["id"], "")) == _normalise(truth)
        hits["all"].append(hit)
        hits.setdefault(sample.get("meta", {}).get("task", "unknown"), []).append(hit)
    return {task: (sum(v) / len(v) if v else 0.0) for task, v in hits.items()}
