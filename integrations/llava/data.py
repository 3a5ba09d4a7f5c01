"""LLaVA training data: a ``Dataset`` over LLaVA JSON + an image folder, and its collator.

Follows LLaVA's ``LazySupervisedDataset`` / ``DataCollatorForSupervisedDataset``
(``llava/train/train.py``) with three changes, all for clear failures:

- **Masking by character spans.** The template (``templates.py``) says where the answers are in
  the rendered text; the text is tokenised once with offsets and a token is a label iff it
  overlaps an answer span. Labels are ``-100`` everywhere else (system prompt, questions, role
  names, image tokens, padding); answers keep their end-of-turn token.
- **Image tokens expanded in the data.** The single ``<image>`` placeholder becomes
  ``num_image_tokens`` copies of the image token id (the encoder's ``num_tokens``), so
  ``input_ids`` already has the length the LLM sees (HF ``LlavaForConditionalGeneration``
  convention). As LLaVA does, the placeholder is moved to the front of its turn (``<image>\\n``).
- **Nothing silently truncated.** Every sample is checked when the dataset is built: structure,
  image/placeholder agreement, image file present, template fit, length ``<= max_length``. A bad
  sample raises :class:`LlavaDataError` naming its id, or with ``on_error="skip"`` is logged,
  counted in ``skipped`` and left out. A corrupt image is only found when loaded: it raises, or
  is counted and replaced by the next sample.

Mixed batches (image and text-only samples): the collator stacks ``pixel_values`` of the image
samples only, in batch order (the *i*-th image fills the *i*-th run of image tokens), or with
``text_only_images="zeros"`` gives every sample a row (zeros for text-only, as original LLaVA)
and can add ``image_flags``. For length-grouped sampling use :attr:`LlavaDataset.lengths` or
:attr:`LlavaDataset.modality_lengths` (negative for text-only, LLaVA's ``group_by_modality_length``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from mixres.errors import MixresError
from mixres.images import expand2square
from mixres.utils import check_choice, check_positive_int, lazy_import

from .templates import Rendered, Template, TemplateError, get_template

Image = lazy_import("PIL.Image")

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "LlavaDataError",
    "RGB_MODES",
    "SIXTEEN_BIT_MODES",
    "to_rgb",
    "expand2square",
    "ImagePreprocessor",
    "tokenize_conversation",
    "LlavaDataset",
    "LlavaCollator",
]

logger = logging.getLogger(__name__)

# CLIP's normaliser (transformers' OPENAI_CLIP_MEAN / _STD), repeated so this module needs no transformers
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100
OnError = Literal["raise", "skip"]
ON_ERROR = ("raise", "skip")
AspectRatio = Literal["pad", "crop"]
ASPECT_RATIOS = ("pad", "crop")
TextOnlyImages = Literal["drop", "zeros"]
TEXT_ONLY_IMAGES = ("drop", "zeros")


class LlavaDataError(MixresError):
    """A training sample is malformed: the message names the sample id and what was wrong."""


class _UnreadableImage(Exception):
    """Raised inside the dataset when an image cannot be decoded; turned into LlavaDataError."""


# ---------------------------------------------------------------------------------------------
# images


# modes PIL converts to 8-bit RGB without losing the scale; 16-bit grey (``I;16*``, what PIL
# opens a 16-bit grey PNG as) is scaled by hand; 32-bit ``I`` / float ``F`` have no agreed range
RGB_MODES: tuple[str, ...] = ("RGB", "RGBA", "RGBX", "LA", "PA", "L", "1", "P", "CMYK", "YCbCr", "La", "RGBa")
SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Any) -> Any:
    """Convert a PIL image to 8-bit RGB without changing what it shows, or refuse it.

    PIL's ``convert("RGB")`` clips a 16-bit grey image (mode ``I;16``) at 255, which turns a
    normal 16-bit PNG pure white; here 16-bit grey keeps its top 8 bits (``v >> 8``, so 65535
    -> 255 and 32768 -> 128). 32-bit integer (``I``) and float (``F``) images, and any mode not
    in :data:`RGB_MODES`, are refused: their scale is not known.

    Raises:
        TypeError: not a PIL image.
        MixresError: a mode with no agreed conversion; the message says how to convert.

    Example:
        >>> grey16 = Image.new("I;16", (2, 2), 0xFFFF)  # what a white 16-bit grey PNG opens as
        >>> to_rgb(grey16).getpixel((0, 0))
        (255, 255, 255)
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image has to be a PIL.Image, but got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in RGB_MODES:
        return image.convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES:
        import numpy as np

        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)  # astype: I;16B is big-endian
        return Image.fromarray(grey).convert("RGB")
    raise MixresError(
        f"image mode {image.mode!r} has no agreed conversion to 8-bit RGB (its value range is unknown); "
        f"convert the file to 8-bit first; accepted modes: {list(RGB_MODES + SIXTEEN_BIT_MODES)}"
    )


@dataclass(frozen=True)
class ImagePreprocessor:
    """PIL image -> normalised float tensor ``[3, size, size]``, as LLaVA feeds its vision tower.

    ``aspect_ratio="pad"`` (LLaVA's ``image_aspect_ratio="pad"``, stage 2 of LLaVA-1.5 and
    LLaVA-HR) pads to a square with the mean colour ``tuple(int(x * 255) for x in mean)`` and
    resizes; ``"crop"`` (CLIP's processor, LLaVA's default in stage 1) resizes the short side
    and centre-crops. Resizing is bicubic; then ``(x / 255 - mean) / std``.

    Args:
        size: output side in pixels (the encoder's input resolution, e.g. 1024 for LLaVA-HR).
        mean: per-channel mean (CLIP's by default).
        std: per-channel std (CLIP's by default).
        aspect_ratio: ``"pad"`` or ``"crop"``.

    Example:
        >>> ImagePreprocessor(size=64)(Image.new("RGB", (80, 40))).shape
        torch.Size([3, 64, 64])
    """

    size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    aspect_ratio: AspectRatio = "pad"

    def __post_init__(self) -> None:
        check_positive_int("size", self.size)
        check_choice("aspect_ratio", self.aspect_ratio, ASPECT_RATIOS)
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) != 3:
                raise MixresError(f"{name} has to have 3 values (R, G, B), but got {v!r}")
        if min(self.std) <= 0:
            raise MixresError(f"std has to be > 0 for every channel, but got {self.std!r}")

    @classmethod
    def from_hf(cls, processor: Any, size: int | None = None, aspect_ratio: AspectRatio = "pad") -> ImagePreprocessor:
        """Take mean and std (and the size, unless given) from an HF image processor."""
        size = size or processor.crop_size["height"]
        return cls(size, tuple(processor.image_mean), tuple(processor.image_std), aspect_ratio)

    @property
    def background(self) -> tuple[int, int, int]:
        """The padding colour: the mean in 0-255, truncated as LLaVA does."""
        return tuple(int(x * 255) for x in self.mean)  # type: ignore[return-value]

    def __call__(self, image: Any) -> torch.Tensor:
        """Preprocess one PIL image to ``Tensor[3, size, size]`` (converted by :func:`to_rgb`)."""
        image = to_rgb(image)
        if self.aspect_ratio == "pad":
            image = expand2square(image, self.background).resize((self.size, self.size), Image.BICUBIC)
        else:
            image = _resize_short_side_and_crop(image, self.size)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        pixels = pixels.permute(2, 0, 1).float() / 255.0
        return (pixels - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


def _resize_short_side_and_crop(image: Any, size: int) -> Any:
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, int(w * scale)), max(size, int(h * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------
# text


def _image_token_id(tokenizer: Any, image_token: str) -> int:
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise MixresError(
            f"the tokenizer has to encode {image_token!r} as one token, but it gives {ids}; add it with "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) and resize the "
            "LLM's embeddings"
        )
    return ids[0]


def _labels(offsets: Sequence[tuple[int, int]], ids: Sequence[int], targets: Sequence[tuple[int, int]]) -> list[int]:
    """A token is a label iff its (non-empty) character span overlaps an answer span."""
    return [
        i if e > s and any(s < b and e > a for a, b in targets) else IGNORE_INDEX
        for i, (s, e) in zip(ids, offsets)
    ]


def tokenize_conversation(
    rendered: Rendered, tokenizer: Any, *, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Tokenise a rendered conversation; mask all but the answers; expand the image token.

    Args:
        rendered: a template's output (text + answer spans).
        tokenizer: a fast HF tokenizer (it has to return offsets).
        image_token_id: id of the image placeholder token.
        num_image_tokens: copies of ``image_token_id`` that replace each placeholder.

    Returns:
        ``(input_ids, labels)`` of equal length; labels are ``IGNORE_INDEX`` except on answers.
    """
    enc = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    labels = _labels(enc["offset_mapping"], enc["input_ids"], rendered.targets)
    input_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(enc["input_ids"], labels):
        n = num_image_tokens if token == image_token_id else 1
        input_ids += [token] * n
        out_labels += [IGNORE_INDEX if token == image_token_id else label] * n
    return input_ids, out_labels


def _image_first(turns: list[dict[str, Any]], image_token: str) -> list[dict[str, Any]]:
    """Move the placeholder to the front of its turn, ``<image>\\n...`` (LLaVA's preprocess_multimodal)."""
    return [
        dict(t, value=image_token + "\n" + t["value"].replace(image_token, "").strip())
        if isinstance(t, Mapping) and isinstance(t.get("value"), str) and image_token in t["value"] else t
        for t in turns
    ]


# ---------------------------------------------------------------------------------------------
# dataset


class LlavaDataset(Dataset):
    """LLaVA-format conversations + images, tokenised for supervised fine-tuning.

    Each item is ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values":
    FloatTensor[3, S, S] (image samples only), "has_image": bool, "id": str}``.

    Args:
        data: path to a LLaVA JSON file (a list of ``{"id", "image"?, "conversations"}``), or
            that list itself.
        tokenizer: a fast HF tokenizer holding ``image_token`` as one token.
        num_image_tokens: tokens the encoder hands the LLM per image (``encoder.num_tokens(size)``).
        image_folder: where ``"image"`` paths are relative to; default the JSON file's folder
            (the working directory for an in-memory list).
        template: a name in ``TEMPLATES`` (``plain``, ``vicuna_v1``, ``chat_template``) or a
            :class:`Template`.
        image_processor: turns PIL images into tensors; default ``ImagePreprocessor()`` (336 px,
            CLIP mean/std, pad to square).
        max_length: longest sample in tokens, image tokens included; longer ones are errors.
        on_error: ``"raise"`` on a bad sample, or ``"skip"``: log it, count it in
            :attr:`skipped` (ids in :attr:`skipped_ids`) and leave it out.
        image_token: the placeholder in the text.
        allow_outside_image_folder: accept ``"image"`` paths that leave ``image_folder``
            (absolute paths, ``../``). Off by default: a dataset file is untrusted input, and
            its paths are checked lexically (symlinks you placed inside the folder are followed).

    Raises:
        LlavaDataError: a bad sample (with ``on_error="raise"``); the message names its id and
            the file. Also a data file that is not valid JSON / UTF-8 or holds no list.
        UnknownNameError: unknown template name.
        MixresError: a bad argument, or a tokenizer without the image token.
        TypeError: a tokenizer that cannot return offsets (not a fast tokenizer).
    """

    def __init__(
        self,
        data: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
        tokenizer: Any,
        *,
        num_image_tokens: int,
        image_folder: str | os.PathLike[str] | None = None,
        template: str | Template = "vicuna_v1",
        image_processor: ImagePreprocessor | None = None,
        max_length: int = 2048,
        on_error: OnError = "raise",
        image_token: str = "<image>",
        allow_outside_image_folder: bool = False,
    ) -> None:
        check_positive_int("num_image_tokens", num_image_tokens)
        check_positive_int("max_length", max_length)
        check_choice("on_error", on_error, ON_ERROR)
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"tokenizer has to be a fast HF tokenizer (it must return offsets), "
                            f"but got {type(tokenizer).__name__}")
        self.template = get_template(template)
        self.tokenizer, self.num_image_tokens, self.max_length = tokenizer, num_image_tokens, max_length
        self.on_error, self.image_token = on_error, image_token
        self.image_token_id = _image_token_id(tokenizer, image_token)
        self.image_processor = image_processor or ImagePreprocessor()
        records, source = _load_records(data)
        self.source = Path(data) if isinstance(data, (str, os.PathLike)) else None
        self.image_folder = Path(image_folder) if image_folder is not None else source
        self.allow_outside_image_folder = bool(allow_outside_image_folder)
        self.skipped = 0
        self.skipped_ids: list[str] = []
        self._records: list[dict[str, Any]] = []
        self._lengths: list[int] = []
        self._broken: set[int] = set()
        for index, record in enumerate(records):
            self._add(index, record)

    # -- building -------------------------------------------------------------------------------

    def _fail(self, sample_id: str, message: str) -> None:
        if self.on_error == "raise":
            where = f" (in {str(self.source)!r})" if self.source is not None else ""
            raise LlavaDataError(f"sample {sample_id!r}: {message}{where}")
        logger.warning("skipping sample %r: %s", sample_id, message)
        self.skipped += 1
        self.skipped_ids.append(sample_id)

    def _add(self, index: int, record: Any) -> None:
        sample_id = str(record.get("id", f"#{index}")) if isinstance(record, Mapping) else f"#{index}"
        try:
            record = self._check(record)
            rendered = self._render(record)
        except (LlavaDataError, TemplateError) as err:
            return self._fail(sample_id, str(err))
        n_images = rendered.text.count(self.image_token)
        length = len(self.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"])
        length += n_images * (self.num_image_tokens - 1)
        if length > self.max_length:
            return self._fail(sample_id, f"{length} tokens ({n_images * self.num_image_tokens} of them image "
                                         f"tokens) exceed max_length={self.max_length}; raise max_length or "
                                         "drop the sample (samples are never truncated)")
        self._records.append(record)
        self._lengths.append(length)

    def _check(self, record: Any) -> dict[str, Any]:
        """Structure and image checks; returns the record with the placeholder moved first."""
        if not isinstance(record, Mapping) or not isinstance(record.get("conversations"), list):
            raise LlavaDataError(f"a sample has to be a dict with a 'conversations' list, but got {_brief(record)}")
        image = record.get("image")
        turns = record["conversations"]
        texts = [t.get("value") if isinstance(t, Mapping) else None for t in turns]
        in_answers = sum(self.image_token in v for v in texts[1::2] if isinstance(v, str))
        placeholders = sum(v.count(self.image_token) for v in texts if isinstance(v, str))
        if in_answers:
            raise LlavaDataError(f"{self.image_token!r} is in an answer; it may only be in a human turn")
        if image is None and placeholders:
            raise LlavaDataError(f"the text has {placeholders} {self.image_token!r} placeholder(s) but the sample "
                                 "has no 'image'; add the image or remove the placeholder")
        if image is not None:
            if not isinstance(image, str):
                raise LlavaDataError(f"'image' has to be one path (str), but got {_brief(image)}")
            if placeholders != 1:
                raise LlavaDataError(f"a sample with an image needs exactly one {self.image_token!r} placeholder in "
                                     f"its text, but has {placeholders}")
            if not self.image_path(image).is_file():
                raise LlavaDataError(f"image file {str(self.image_path(image))!r} not found")
        return dict(record, conversations=_image_first(list(turns), self.image_token))

    def image_path(self, image: str) -> Path:
        """Where the record's ``"image"`` path points, checked to stay inside :attr:`image_folder`.

        Raises:
            LlavaDataError: an empty path, a NUL byte, or (unless ``allow_outside_image_folder``)
                a path that leaves the folder (absolute, or ``..`` above it).
        """
        if not image or "\0" in image:
            raise LlavaDataError(f"'image' has to be a non-empty file path without NUL bytes, but got {image!r}")
        path = self.image_folder / image
        if not self.allow_outside_image_folder:
            folder = os.path.normpath(os.path.abspath(self.image_folder))
            target = os.path.normpath(os.path.abspath(path))
            if os.path.commonpath([folder, target]) != folder:
                raise LlavaDataError(
                    f"image path {image!r} leaves image_folder {str(self.image_folder)!r} (it points to {target!r}); "
                    "keep dataset images inside the folder, or pass allow_outside_image_folder=True if you trust the file"
                )
        return path

    def _render(self, record: Mapping[str, Any]) -> Rendered:
        try:
            return self.template.render(record["conversations"], self.tokenizer, self.image_token)
        except TemplateError as err:
            raise LlavaDataError(f"template {self.template.name!r}: {err}") from None

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    @property
    def lengths(self) -> list[int]:
        """Token count of each sample, image tokens included (for ``LengthGroupedSampler``)."""
        return list(self._lengths)

    @property
    def modality_lengths(self) -> list[int]:
        """As :attr:`lengths`, negative for text-only samples (LLaVA's ``group_by_modality_length``)."""
        return [n if "image" in r and r["image"] is not None else -n for n, r in zip(self._lengths, self._records)]

    def record(self, index: int) -> dict[str, Any]:
        """The (checked) JSON record of sample ``index``."""
        return self._records[index]

    def render(self, index: int) -> Rendered:
        """The templated text of sample ``index`` and its answer spans (for inspection)."""
        return self._render(self._records[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} samples")
        for step in range(len(self)):
            i = (index + step) % len(self)
            if i in self._broken:
                continue
            try:
                return self._item(i)
            except _UnreadableImage as err:
                self._fail(self._id(i), str(err))  # raises unless on_error="skip"
                self._broken.add(i)
        raise LlavaDataError(f"no sample of the dataset can be loaded ({self.skipped} skipped)")

    def _id(self, i: int) -> str:
        return str(self._records[i].get("id", f"#{i}"))

    def _item(self, i: int) -> dict[str, Any]:
        record = self._records[i]
        ids, labels = tokenize_conversation(self._render(record), self.tokenizer,
                                            image_token_id=self.image_token_id, num_image_tokens=self.num_image_tokens)
        item: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                                "has_image": record.get("image") is not None, "id": self._id(i)}
        if item["has_image"]:
            item["pixel_values"] = self._load_image(self.image_path(record["image"]))
        return item

    def _load_image(self, path: Path) -> torch.Tensor:
        # a bad file is a bad sample: decode errors, PIL's decompression-bomb guard (not an
        # OSError) and a mode with no agreed RGB conversion all become _UnreadableImage
        try:
            with Image.open(path) as image:
                image.load()  # decode now, while the file is open (to_rgb may return it as is)
                image = to_rgb(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _UnreadableImage(f"image file {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None
        return self.image_processor(image)

    def __repr__(self) -> str:
        return (f"LlavaDataset(samples={len(self)}, skipped={self.skipped}, template={self.template.name!r}, "
                f"num_image_tokens={self.num_image_tokens}, image_size={self.image_processor.size}, "
                f"max_length={self.max_length})")


def _load_records(data: Any) -> tuple[list[Any], Path]:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise MixresError(f"data has to be a LLaVA JSON file or a list of samples, but {str(path)!r} is no file")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise LlavaDataError(f"{str(path)!r} is not UTF-8 text ({err})") from None
        except json.JSONDecodeError as err:
            raise LlavaDataError(f"{str(path)!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        source, where = path.parent, f"{str(path)!r}"
    else:
        records, source, where = data, Path.cwd(), "data"
    if not isinstance(records, list):
        raise LlavaDataError(f"{where} has to hold a list of samples, but holds a {type(records).__name__}")
    return records, source


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# collator


@dataclass(frozen=True)
class LlavaCollator:
    """Batch :class:`LlavaDataset` items: right-pad text, stack images.

    Returns ``input_ids`` and ``labels`` (``LongTensor[B, L]``, padded with ``pad_token_id`` and
    ``-100``), ``attention_mask`` (``LongTensor[B, L]``, 1 on real tokens) and, if any sample
    has an image, ``pixel_values``:

    - ``text_only_images="drop"``: ``FloatTensor[n_images, 3, S, S]`` of the image samples in
      batch order (HF LLaVA: the *i*-th image fills the *i*-th run of image tokens);
    - ``"zeros"``: ``FloatTensor[B, 3, S, S]``, zeros for text-only samples (original LLaVA).

    Args:
        pad_token_id: id used to pad ``input_ids`` (masked by ``attention_mask`` anyway).
        text_only_images: ``"drop"`` or ``"zeros"``.
        image_size: ``S``, needed by ``"zeros"`` for a batch without any image.
        return_image_flags: add ``image_flags`` (``BoolTensor[B]``, True where a sample has an image).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    pad_token_id: int
    text_only_images: TextOnlyImages = "drop"
    image_size: int | None = None
    return_image_flags: bool = False
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise TypeError(f"pad_token_id has to be an int, but got {self.pad_token_id!r}")
        check_choice("text_only_images", self.text_only_images, TEXT_ONLY_IMAGES)
        if self.pad_to_multiple_of is not None:
            check_positive_int("pad_to_multiple_of", self.pad_to_multiple_of)

    @classmethod
    def from_dataset(cls, dataset: LlavaDataset, **kwargs: Any) -> LlavaCollator:
        """A collator with the dataset's pad token (or unk, as LLaVA for LLaMA) and image size."""
        tok = dataset.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else getattr(tok, "unk_token_id", None)
        if pad is None:
            raise MixresError("the tokenizer has neither pad_token_id nor unk_token_id; pass pad_token_id yourself")
        return cls(pad, **dict(dict(image_size=dataset.image_processor.size), **kwargs))

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise MixresError("cannot collate an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], length, self.pad_token_id),
            "labels": _pad([f["labels"] for f in features], length, IGNORE_INDEX),
            "attention_mask": _pad([torch.ones(len(f["input_ids"]), dtype=torch.long) for f in features], length, 0),
        }
        flags = [f.get("pixel_values") is not None for f in features]
        pixels = self._pixels(features, flags)
        if pixels is not None:
            batch["pixel_values"] = pixels
        if self.return_image_flags:
            batch["image_flags"] = torch.tensor(flags, dtype=torch.bool)
        return batch

    def _pixels(self, features: Sequence[Mapping[str, Any]], flags: list[bool]) -> torch.Tensor | None:
        images = [f["pixel_values"] for f, has in zip(features, flags) if has]
        _check_same_image_shape(features, flags, self.image_size if self.text_only_images == "zeros" else None)
        if self.text_only_images == "drop":
            return torch.stack(images) if images else None
        if not images and self.image_size is None:
            raise MixresError("text_only_images='zeros' needs image_size for a batch without images")
        shape = images[0].shape if images else (3, self.image_size, self.image_size)
        zeros = torch.zeros(shape, dtype=images[0].dtype if images else torch.float32)
        return torch.stack([f["pixel_values"] if has else zeros for f, has in zip(features, flags)])


def _check_same_image_shape(features: Sequence[Mapping[str, Any]], flags: list[bool], size: int | None) -> None:
    """One batch, one image shape (and ``[3, size, size]`` when a size is known): else a clear error."""
    shapes = {}
    for k, (f, has) in enumerate(zip(features, flags)):
        if has:
            pixels = f["pixel_values"]
            if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3:
                raise MixresError(f"pixel_values of sample {f.get('id', f'#{k}')!r} has to be a Tensor[3, S, S], "
                                  f"but got {getattr(pixels, 'shape', type(pixels).__name__)}")
            shapes.setdefault(tuple(pixels.shape), []).append(str(f.get("id", f"#{k}")))
    expected = {(3, size, size)} if size is not None and shapes else set()
    if len(shapes) > 1 or (expected and set(shapes) != expected):
        listed = "; ".join(f"{list(shape)}: {ids[:3]}" for shape, ids in shapes.items())
        want = f" (expected [3, {size}, {size}])" if size is not None else ""
        raise MixresError(
            f"cannot stack images of different sizes in one batch{want}: {listed}; give every sample the same "
            "image processor (one size), or batch by size"
        )


def _pad(rows: Sequence[Any], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
