"""Family training data: LLaVA conversations through the family's chat template and processor.

A sample is rendered with the processor's chat template (:func:`render_conversation`: the
``<image>`` placeholder becomes an ``{"type": "image"}`` entry of its turn, so the template
writes the family's own image marker). Its answer spans are what rendering each answer adds
after the generation prompt, up to and including the family's end-of-turn token. Then:

- the text alone is tokenised with offsets: a token is a label iff it overlaps an answer span
  (as :mod:`.data` does for LLaVA);
- the family's processor tokenises the same text with the image and expands the image marker
  itself (OneVision's tiles and newlines, Gemma 3's ``<start_of_image>`` block, Idefics3's tile
  grid). The expansion is one contiguous run; the two token lists agree before and after it,
  and the labels are carried over by that alignment. An answer that falls inside the run is an
  error, never a silent shift.

Samples are checked when the dataset is built (structure, image file, template fit); the
expanded length depends on the image (tiles), so ``max_length`` is checked when a sample is
loaded: a longer one raises naming its id (nothing is truncated).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixres.errors import MixresError

from .collator import IGNORE_INDEX
from .data import LlavaDataError, LlavaDataset, _labels, _load_records, _UnreadableImage, to_rgb
from .templates import Rendered, TemplateError, conversation_pairs

__all__ = ["render_conversation", "align_labels", "FamilyDataset", "FamilyCollator", "TOKEN_KEYS"]

#: processor outputs aligned with ``input_ids`` (padded like them); the rest are image inputs
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
IMAGE = "<image>"


def _messages(pairs: Sequence[tuple[str, str]], upto: int, answer: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k, (question, reply) in enumerate(pairs[: upto + 1]):
        content: list[dict[str, Any]] = [{"type": "image"}] if IMAGE in question else []
        content.append({"type": "text", "text": question.replace(IMAGE, "").strip()})
        out.append({"role": "user", "content": content})
        if k < upto or answer:
            out.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return out


def render_conversation(turns: Sequence[Mapping[str, Any]], processor: Any, end_of_turn: str | None = None) -> Rendered:
    """A LLaVA conversation as the processor's chat template writes it, with the answer spans.

    Args:
        turns: LLaVA turns (``{"from": "human" | "gpt", "value": str}``), ``<image>`` in a human turn.
        processor: an HF processor with a ``chat_template``.
        end_of_turn: the family's end-of-turn token; an answer span ends after it (``None``:
            the span is all that rendering the answer adds).

    Raises:
        TemplateError: bad turns, or a template that rewrites earlier text when a turn is added.
    """
    pairs = conversation_pairs(turns)
    targets, done = [], ""
    for k in range(len(pairs)):
        prompt = processor.apply_chat_template(_messages(pairs, k, False), tokenize=False, add_generation_prompt=True)
        full = processor.apply_chat_template(_messages(pairs, k, True), tokenize=False, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(f"the chat template of {type(processor).__name__} is not prefix-stable (rendering turn "
                                f"{k + 1} rewrites earlier text), so answer spans cannot be found")
        added = full[len(prompt):]
        end = added.find(end_of_turn) + len(end_of_turn) if end_of_turn and end_of_turn in added else len(added)
        targets.append((len(prompt), len(prompt) + end))
        done = full
    return Rendered(done, tuple(targets), add_special_tokens=False)


def align_labels(plain_ids: Sequence[int], plain_labels: Sequence[int], expanded_ids: Sequence[int]) -> list[int]:
    """Labels for ``expanded_ids``: ``plain_ids`` with one contiguous run rewritten (the image expansion).

    The longest common prefix and suffix of the two id lists are kept with their labels; the
    rewritten run in between gets ``IGNORE_INDEX``.

    Raises:
        MixresError: a label (an answer token) falls inside the rewritten run.

    Example:
        >>> align_labels([1, 9, 2, 3], [-100, -100, -100, 3], [1, 9, 9, 9, 2, 3])
        [-100, -100, -100, -100, -100, 3]
    """
    n, m = len(plain_ids), len(expanded_ids)
    p = 0
    while p < min(n, m) and plain_ids[p] == expanded_ids[p]:
        p += 1
    s = 0
    while s < min(n, m) - p and plain_ids[n - 1 - s] == expanded_ids[m - 1 - s]:
        s += 1
    inside = [t for t in plain_labels[p:n - s] if t != IGNORE_INDEX]
    if inside:
        raise MixresError(f"the processor rewrote tokens {p}..{n - s} of the text, which hold {len(inside)} answer "
                          "token(s); the image must come before the answers it is asked about")
    return [*plain_labels[:p], *[IGNORE_INDEX] * (m - p - s), *plain_labels[n - s:]]


class FamilyDataset(LlavaDataset):
    """LLaVA-format conversations for a family model: its chat template, its processor's expansion.

    Each item is ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "has_image": bool, "id":
    str, "image_inputs": {key: Tensor} (the processor's image tensors, batch dim 1), "token_inputs":
    {key: LongTensor[L]}}``. The record checks (structure, one ``<image>`` per image, image path
    inside ``image_folder``, ``on_error``) are :class:`~.data.LlavaDataset`'s.

    Args:
        data: a LLaVA JSON file or the list of records.
        processor: the family's processor (mrified), with a chat template.
        end_of_turn: the family's end-of-turn token (labels end there).
        image_folder: where image paths are relative to (default: the JSON's folder).
        max_length: longest sample in tokens, image tokens included (checked when loaded).
        on_error: ``raise`` or ``skip`` a bad record.
        nested_images: the processor takes one list of images per text (Gemma 3, Idefics3).
    """

    def __init__(self, data: str | os.PathLike[str] | Sequence[Mapping[str, Any]], processor: Any, *,
                 end_of_turn: str | None, image_folder: str | os.PathLike[str] | None = None, max_length: int = 2048,
                 on_error: str = "raise", nested_images: bool = False) -> None:
        # LlavaDataset's record checks and loading loop are reused; its __init__ is not (it fixes one
        # image-token count and a LLaVA template), so the attributes they read are set here
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"the processor's tokenizer has to be a fast HF tokenizer (offsets), but got {type(tokenizer).__name__}")
        self.processor, self.tokenizer, self.end_of_turn = processor, tokenizer, end_of_turn
        self.max_length, self.on_error, self.image_token, self.nested_images = max_length, on_error, IMAGE, nested_images
        records, source = _load_records(data)
        self.source = Path(data) if isinstance(data, (str, os.PathLike)) else None
        self.image_folder = Path(image_folder) if image_folder is not None else source
        self.allow_outside_image_folder = False
        self.skipped, self.skipped_ids = 0, []
        self._records, self._lengths, self._broken = [], [], set()
        for index, record in enumerate(records):
            self._add(index, record)

    def _render(self, record: Mapping[str, Any]) -> Rendered:
        try:
            return render_conversation(record["conversations"], self.processor, self.end_of_turn)
        except TemplateError as err:
            raise LlavaDataError(f"chat template: {err}") from None

    def _length(self, rendered: Rendered) -> int:
        # the text alone: the expansion depends on the image, so max_length is checked when a sample loads
        return len(self.tokenizer(rendered.text, add_special_tokens=False)["input_ids"])

    def _item(self, i: int) -> dict[str, Any]:
        record = self._records[i]
        rendered = self._render(record)
        plain = self.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        plain_labels = _labels(plain["offset_mapping"], plain["input_ids"], rendered.targets)
        kwargs: dict[str, Any] = {}
        if record.get("image") is not None:
            image = self._open(self.image_path(record["image"]))
            kwargs["images"] = [[image]] if self.nested_images else [image]
        out = self.processor(text=[rendered.text], add_special_tokens=False, return_tensors="pt", **kwargs)
        ids = out["input_ids"][0]
        # a sample found bad only when loaded goes the way of an unreadable image: raised, or skipped
        # and replaced by the next one with on_error="skip" (LlavaDataset.__getitem__)
        try:
            labels = align_labels(plain["input_ids"], plain_labels, ids.tolist())
        except MixresError as err:
            raise _UnreadableImage(str(err)) from None
        if len(ids) > self.max_length:
            raise _UnreadableImage(f"{len(ids)} tokens (image tokens included) exceed max_length={self.max_length}; "
                                   "raise max_length or drop the sample (samples are never truncated)")
        token_inputs = {k: out[k][0] for k in TOKEN_KEYS if k in out}
        image_inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", *TOKEN_KEYS)}
        return {"input_ids": ids, "labels": torch.tensor(labels), "has_image": bool(kwargs), "id": self._id(i),
                "image_inputs": image_inputs if kwargs else {}, "token_inputs": token_inputs}

    def _open(self, path: Path) -> Any:
        from .data import Image, _UnreadableImage

        try:
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _UnreadableImage(f"image file {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None

    def blank_image_inputs(self) -> dict[str, torch.Tensor]:
        """The processor's image tensors of one blank image (the trainer's image-free batches run them)."""
        from .data import Image

        side = 32
        image = Image.new("RGB", (side, side))
        text = self.processor.apply_chat_template(_messages([(IMAGE, "")], 0, False), tokenize=False,
                                                  add_generation_prompt=True)
        out = self.processor(text=[text], images=[[image]] if self.nested_images else [image], return_tensors="pt",
                             add_special_tokens=False)
        return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", *TOKEN_KEYS)}

    def __repr__(self) -> str:
        return (f"FamilyDataset(samples={len(self)}, skipped={self.skipped}, processor={type(self.processor).__name__}, "
                f"max_length={self.max_length})")


@dataclass(frozen=True)
class FamilyCollator:
    """Batch :class:`FamilyDataset` items: right-pad the text, join the image inputs.

    Returns ``input_ids`` / ``labels`` / ``attention_mask`` (``LongTensor[B, L]``), the token-aligned
    processor outputs (``token_type_ids``: padded with 0) and, when a sample has an image, the
    processor's image inputs of the image samples in batch order: joined along the first
    dimension, tile stacks (``pixel_values (Tensor[1, T, 3, S, S])``) zero-padded to the most
    tiles first (OneVision reads ``image_sizes``, Idefics3 drops all-zero tiles).

    Args:
        pad_token_id: id that pads ``input_ids``.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise MixresError("cannot collate an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": _pad([f["input_ids"] for f in features], length, self.pad_token_id),
                 "labels": _pad([f["labels"] for f in features], length, IGNORE_INDEX),
                 "attention_mask": _pad([torch.ones(len(f["input_ids"]), dtype=torch.long) for f in features], length, 0)}
        for key in {k for f in features for k in f["token_inputs"]}:
            batch[key] = _pad([f["token_inputs"].get(key, torch.zeros(len(f["input_ids"]), dtype=torch.long))
                               for f in features], length, 0)
        images = [f["image_inputs"] for f in features if f["image_inputs"]]
        for key in images[0] if images else ():
            batch[key] = join_image_inputs([im[key] for im in images], key)
        return batch


def join_image_inputs(tensors: Sequence[torch.Tensor], key: str = "pixel_values") -> torch.Tensor:
    """Join per-sample processor tensors along dim 0, zero-padding dim 1 (tiles) where it differs.

    Raises:
        MixresError: the tensors differ in a dimension other than 1 (e.g. tiles of another size).

    Example:
        >>> join_image_inputs([torch.ones(1, 2, 3), torch.ones(1, 5, 3)]).shape
        torch.Size([2, 5, 3])
    """
    rest = {tuple(t.shape[2:]) for t in tensors} if tensors[0].ndim > 2 else {()}
    if len({t.ndim for t in tensors}) != 1 or len(rest) != 1:
        raise MixresError(f"cannot batch {key} of shapes {[list(t.shape) for t in tensors]}: they may differ in "
                          "dim 1 (the tile count) only; give every sample the same processor settings")
    if tensors[0].ndim > 2 and len({t.shape[1] for t in tensors}) > 1:
        most = max(t.shape[1] for t in tensors)
        tensors = [torch.cat([t, t.new_zeros(t.shape[0], most - t.shape[1], *t.shape[2:])], 1) for t in tensors]
    return torch.cat(list(tensors), 0)


def _pad(rows: Sequence[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
