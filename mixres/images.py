"""Image helpers shared by the integrations (Pillow is imported when one is called).

LLaVA-1.5 / LLaVA-HR pad a non-square image to a square with the mean colour before resizing
(``expand2square`` in ``llava/mm_utils.py`` of the LLaVA release). The training data
(:mod:`mixres.integrations.llava.data`) and the HF processors
(:mod:`mixres.integrations.hf.images`) both call this one function.
"""

from __future__ import annotations

from typing import Any

from ._utils import lazy_import
from .errors import MixresError

__all__ = ["expand2square", "to_rgb", "RGB_MODES", "SIXTEEN_BIT_MODES"]

RGB_MODES: tuple[str, ...] = ("RGB", "RGBA", "RGBX", "LA", "PA", "L", "1", "P", "CMYK", "YCbCr", "La", "RGBa")
SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16L", "I;16B", "I;16N")


def expand2square(image: Any, background: tuple[int, int, int]) -> Any:
    """Pad a PIL image to a square, centred, with a ``background`` colour (LLaVA's function).

    Args:
        image: a PIL image of size ``(w, h)``.
        background: the fill colour, e.g. ``tuple(int(x * 255) for x in CLIP_MEAN)``.

    Returns:
        The image itself if square, else a new ``max(w, h)``-square image.

    Example:
        >>> from PIL import Image
        >>> sq = expand2square(Image.new("RGB", (30, 10), (255, 0, 0)), (122, 116, 104))
        >>> sq.size, sq.getpixel((0, 0)), sq.getpixel((15, 15))
        ((30, 30), (122, 116, 104), (255, 0, 0))
    """
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    result = lazy_import("PIL.Image").new(image.mode, (side, side), background)
    result.paste(image, ((side - w) // 2, (side - h) // 2))
    return result


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
        >>> from PIL import Image
        >>> grey16 = Image.new("I;16", (2, 2), 0xFFFF)  # what a white 16-bit grey PNG opens as
        >>> to_rgb(grey16).getpixel((0, 0))
        (255, 255, 255)
    """
    Image = lazy_import("PIL.Image")
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
