"""The LLaVA collator: right-pad text, stack images (one batch, one image shape).

Mixed batches (image and text-only samples): ``text_only_images="drop"`` stacks ``pixel_values``
of the image samples only, in batch order (the *i*-th image fills the *i*-th run of image
tokens); ``"zeros"`` gives every sample a row (zeros for text-only, as original LLaVA) and can
add ``image_flags``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from mixres.errors import MixresError
from mixres.utils import check_choice, check_positive_int

if TYPE_CHECKING:
    from .data import LlavaDataset

__all__ = ["IGNORE_INDEX", "TEXT_ONLY_IMAGES", "LlavaCollator"]

IGNORE_INDEX = -100
TextOnlyImages = Literal["drop", "zeros"]
TEXT_ONLY_IMAGES = ("drop", "zeros")



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
