"""Checking and preparing images the way LLaVA-HR feeds them: RGB, padded to a square with the
mean colour, then resized and normalised (by the model's image processor, or by
:func:`reference_pixel_values`, which reproduces the release's PIL preprocessing through
:func:`release_image_processor`).

LLaVA-1.5 / LLaVA-HR ``expand2square``: the image is centred on a square canvas of the
longer side filled with the CLIP mean colour (``tuple(int(m * 255) for m in image_mean)``), so
the padding normalises to zero.

Modes: RGB is used as is; ``RGBA``/``RGBX``/``LA``/``PA`` (alpha dropped), ``L``/``1`` (grey
replicated), ``P`` (palette), ``CMYK`` and ``YCbCr`` are converted to RGB with PIL. 16- and
32-bit modes (``I;16``, ``I``, ``F``) have no agreed scale to 8 bits and are refused, as is any
other mode, with an :class:`~mixres.integrations.hf.errors.ImageInputError` that says how to
convert.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LlavaImageProcessorPil
from transformers.image_utils import PILImageResampling
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mixres.images import expand2square

from .errors import ImageInputError

__all__ = [
    "MIN_IMAGE_SIDE",
    "CONVERTIBLE_MODES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "check_image",
    "to_rgb",
    "pad_to_square",
    "reference_pixel_values",
    "release_image_processor",
]

# below this an image holds less than one ViT patch, and a side of 1 or 3 pixels is mistaken
# for the channel axis by transformers' channel-format inference
MIN_IMAGE_SIDE = 8
CONVERTIBLE_MODES: tuple[str, ...] = ("RGB", "RGBA", "RGBX", "LA", "PA", "L", "1", "P", "CMYK", "YCbCr")


def check_image(image: object, index: int = 0, min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Validate one image and return it as an RGB ``PIL.Image``.

    Args:
        image: a ``PIL.Image`` or a ``uint8`` array ``[H, W]`` / ``[H, W, 3]``.
        index: its position in the caller's list, quoted in errors.
        min_side: the smallest height / width accepted.

    Raises:
        ImageInputError: not an image, an unsupported mode (16-bit, float, ...) or too small.

    Example:
        >>> check_image(Image.new("L", (16, 12))).mode
        'RGB'
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ImageInputError(
                f"images[{index}] is an array of shape {image.shape} and dtype {image.dtype}; arrays have to be "
                "uint8 [H, W] or [H, W, 3] (or pass a PIL.Image)"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"images[{index}] has to be a PIL.Image, but got {type(image).__name__}")
    width, height = image.size
    if min(width, height) < min_side:
        raise ImageInputError(
            f"images[{index}] is {width}x{height} pixels; each side has to be at least {min_side} px "
            "(smaller images hold less than one ViT patch); upscale it first, e.g. image.resize((w * k, h * k))"
        )
    return to_rgb(image, index)


def to_rgb(image: Image.Image, index: int = 0) -> Image.Image:
    """Convert a PIL image of a :data:`CONVERTIBLE_MODES` mode to RGB; refuse the others."""
    if image.mode == "RGB":
        return image
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageInputError(
            f"images[{index}] has PIL mode {image.mode!r}, which has no agreed conversion to 8-bit RGB; "
            f"convert it yourself (e.g. for 16-bit: Image.fromarray((np.asarray(img) >> 8).astype('uint8')).convert('RGB')); "
            f"accepted modes: {list(CONVERTIBLE_MODES)}"
        )
    return image.convert("RGB")


def pad_to_square(image: Image.Image, mean: Sequence[float] = OPENAI_CLIP_MEAN) -> Image.Image:
    """Centre ``image`` on a square of its longer side filled with the mean colour (LLaVA's ``expand2square``).

    Args:
        image: an RGB image.
        mean: the normaliser's per-channel mean in [0, 1]; the fill is ``int(m * 255)``.

    Example:
        >>> pad_to_square(Image.new("RGB", (30, 10))).size
        (30, 30)
    """
    return expand2square(image, tuple(int(m * 255) for m in mean))


def release_image_processor(
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    pad: bool = True,
) -> LlavaImageProcessorPil:
    """The image processor that reproduces LLaVA-HR's preprocessing: transformers' PIL backend.

    The release ran transformers 4.31's ``CLIPImageProcessor`` (PIL): optional ``expand2square``
    with the mean colour (stage 2, ``image_aspect_ratio="pad"``), bicubic resize of the
    shortest edge to ``size`` (``int(size * long / short)`` for the other), centre crop
    ``size x size``, rescale by 1/255 (float64, then float32) and normalise. Transformers 5's
    ``LlavaImageProcessorPil`` runs those same steps with PIL and NumPy; its torchvision
    backend (the default of ``AutoProcessor``) resizes differently (measured in
    docs/converting.md).

    Args:
        size: the square side ``R`` the encoder reads (e.g. 1024).
        mean: per-channel mean in [0, 1] (CLIP's by default); the pad colour is ``int(m * 255)``.
        std: per-channel std.
        pad: pad to a square with the mean colour first (the release's stage 2 and inference).

    Example:
        >>> proc = release_image_processor(32)
        >>> proc(Image.new("RGB", (40, 20)), return_tensors="pt")["pixel_values"].shape
        torch.Size([1, 3, 32, 32])
    """
    return LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=pad,
                                  image_mean=list(mean), image_std=list(std), resample=PILImageResampling.BICUBIC)


def reference_pixel_values(
    images: Sequence[object],
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """LLaVA-HR's preprocessing, as the release computed it: validate, pad to a square with the
    mean colour, PIL bicubic resize, normalise (:func:`release_image_processor`).

    Args:
        images: PIL images (any size, any :data:`CONVERTIBLE_MODES` mode).
        size: the square side ``R`` the encoder reads (e.g. 1024).
        mean: per-channel mean in [0, 1] (CLIP's by default).
        std: per-channel std.

    Returns:
        pixel_values (Tensor[B, 3, size, size]) in float32; equal to a PIL + NumPy re-derivation
        of the release's steps to float32 rounding (tests/test_convert_preprocess.py).

    Raises:
        ImageInputError: an empty list, or an image :func:`check_image` refuses.

    Example:
        >>> reference_pixel_values([Image.new("RGB", (40, 20)), Image.new("L", (9, 30))], 32).shape
        torch.Size([2, 3, 32, 32])
    """
    if not images:
        raise ImageInputError("images is empty; pass at least one image")
    rgb = [check_image(image, i) for i, image in enumerate(images)]
    return release_image_processor(size, mean, std)(rgb, return_tensors="pt")["pixel_values"]
