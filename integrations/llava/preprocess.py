"""LLaVA's image preprocessing: PIL image -> normalised tensor (pad or crop, bicubic).

The training data (:mod:`.data`), the demo and ``mixres explain`` use it; the HF processors
reproduce the same steps (measured in docs/converting.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mixres.errors import MixresError
from mixres.images import expand2square, to_rgb
from mixres.utils import check_choice, check_positive_int, lazy_import

Image = lazy_import("PIL.Image")

__all__ = ["CLIP_MEAN", "CLIP_STD", "ASPECT_RATIOS", "ImagePreprocessor"]

# CLIP's normaliser (transformers' OPENAI_CLIP_MEAN / _STD), repeated so this module needs no transformers
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AspectRatio = Literal["pad", "crop"]
ASPECT_RATIOS = ("pad", "crop")



# modes PIL converts to 8-bit RGB without losing the scale; 16-bit grey (``I;16*``, what PIL
# opens a 16-bit grey PNG as) is scaled by hand; 32-bit ``I`` / float ``F`` have no agreed range
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
