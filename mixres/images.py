"""Image helpers shared by the integrations (Pillow is imported when one is called).

LLaVA-1.5 / LLaVA-HR pad a non-square image to a square with the mean colour before resizing
(``expand2square`` in ``llava/mm_utils.py`` of the LLaVA release). The training data
(:mod:`mixres.integrations.llava.data`) and the HF processors
(:mod:`mixres.integrations.hf.images`) both call this one function.
"""

from __future__ import annotations

from typing import Any

from ._utils import lazy_import

__all__ = ["expand2square"]


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
