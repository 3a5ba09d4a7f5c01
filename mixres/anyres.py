"""AnyRes tiling (LLaVA-NeXT): pick a grid of tiles for each image, encode base image + tiles.

Source: Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge" (blog, January
2024), the "dynamic high resolution" scheme; released in github.com/LLaVA-VL/LLaVA-NeXT as
``select_best_resolution``, ``resize_and_pad_image``, ``divide_to_patches`` and
``process_anyres_image`` (``llava/mm_utils.py``) and ``unpad_image`` + ``image_newline`` in
``prepare_inputs_labels_for_multimodal`` (``llava/model/llava_arch.py``, ``spatial_unpad``).

Algorithm, for an image of original size ``(H, W)``, pinpoints (candidate resolutions, multiples
of the tile size ``t``) and an encoder with a ``(g_h, g_w)`` grid on one tile::

    (H*, W*) = argmax over pinpoints of effective resolution, ties: least wasted area
    tiles    = split(resize_and_pad(image, (H*, W*)), t)           # nh = H*/t, nw = W*/t tiles
    base     = resize(image, (t, t))                               # squashed, as released
    f_base, f_tiles = encoder([base, *tiles])
    map      = untile(f_tiles)                                     # (nh g_h) x (nw g_w) grid
    map      = unpad(map, (H, W))                                  # drop rows/cols of padding
    tokens   = [f_base, rows of map each followed by image_newline]

Token count: ``g_h g_w + rows * (cols + 1)`` with ``(rows, cols)`` the unpadded grid (``+ 1``
only with the newline); :func:`anyres_layout` computes it from sizes alone.

Two conventions (``convention=``), which differ for some image sizes:

- ``"hf"`` (the default): transformers' ``llava_next`` (``LlavaNextImageProcessor``,
  ``LlavaNextProcessor._get_number_of_features``, ``unpad_image``). It reads a config's
  ``image_grid_pinpoints`` pairs as ``(h, w)`` (:data:`HF_PINPOINTS` is its default list) and
  unpads with ``int(round(x, 7))``. An HF LLaVA-NeXT model and its processor count tokens this
  way, so mixres inside one must too.
- ``"llava_next"``: the original release (github.com/LLaVA-VL/LLaVA-NeXT), which reads the same
  pairs as ``(w, h)`` (:data:`LLAVA_NEXT_PINPOINTS` is its list, swapped to ``(h, w)``, so that
  ties, which keep the first best pinpoint, break as in the release) and unpads with ``int(x)``.
  :func:`pinpoints_from_config` reads a config list either way.

With transformers' default list the two pick different grids for about a quarter of random
sizes (ties between 672x336 and 336x672; e.g. a 200x300 image), and ``int`` vs ``round``
differs for a few sizes (tests/test_anyres.py counts both).

Where we differ from the release otherwise:

- Sizes are ``(h, w)`` everywhere; the release writes ``(width, height)``.
- Images arrive normalised (``Tensor[3, H, W]``), so resizing is on normalised pixels (bicubic
  with antialias, float32) and the padding is ``0`` (the mean colour); the release resizes the
  PIL image and pads it with black before normalising. Padding rows are removed by unpad anyway.
- The newline token lives at the encoder's width (``out_dim``), before the projector; the
  release adds it at the LLM's width, after the projector.
- ``anyres_max_N`` (interpolating the map down when it has too many tokens) is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from ._utils import check_positive_int, to_2tuple
from .errors import MixresError, ShapeError

__all__ = [
    "LLAVA_NEXT_PINPOINTS",
    "HF_PINPOINTS",
    "CONVENTIONS",
    "Convention",
    "check_convention",
    "pinpoints_from_config",
    "AnyResLayout",
    "select_best_resolution",
    "resize_and_pad",
    "tile",
    "untile",
    "unpad_bounds",
    "unpad_tokens",
    "add_newline",
    "anyres_layout",
    "check_pinpoints",
]

# LLaVA-NeXT's image_grid_pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# are (width, height); these are the same resolutions as (height, width), in the same order.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336))
# transformers' LlavaNextImageProcessor default, the same list read as (height, width)
HF_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
Convention = Literal["hf", "llava_next"]
CONVENTIONS: tuple[str, ...] = ("hf", "llava_next")


def check_convention(convention: Any) -> Convention:
    """Return ``convention`` if it is one of :data:`CONVENTIONS`.

    Raises:
        MixresError: any other value.
    """
    if convention not in CONVENTIONS:
        raise MixresError(f"convention has to be one of {list(CONVENTIONS)} (transformers' llava_next, or the original "
                          f"LLaVA-NeXT release), but got {convention!r}")
    return convention


def pinpoints_from_config(pinpoints: Sequence[Sequence[int]], convention: Convention = "hf") -> list[tuple[int, int]]:
    """A config's ``image_grid_pinpoints`` as ``(h, w)`` pairs: transformers reads each pair as
    ``(h, w)``, the original LLaVA-NeXT as ``(w, h)``.

    Example:
        >>> pinpoints_from_config([[336, 672], [672, 336]], "llava_next")
        [(672, 336), (336, 672)]
    """
    pairs = check_pinpoints(pinpoints)
    return pairs if check_convention(convention) == "hf" else [(w, h) for h, w in pairs]


class AnyResLayout(NamedTuple):
    """What AnyRes does with one image, from sizes alone (see :func:`anyres_layout`)."""

    best_resolution: tuple[int, int]
    """``(H*, W*)``, the chosen pinpoint."""
    tile_grid: tuple[int, int]
    """``(nh, nw)`` tiles."""
    base_grid: tuple[int, int]
    """The encoder's grid on one tile (and on the base image)."""
    unpadded_grid: tuple[int, int]
    """``(rows, cols)`` of the merged tile map after unpadding."""
    num_tokens: int
    """Tokens handed on: base, then the rows of the tile map (each with its newline)."""


def check_pinpoints(pinpoints: Any, tile_size: int | None = None) -> list[tuple[int, int]]:
    """Validate pinpoints (a non-empty list of ``(h, w)``, multiples of ``tile_size`` if given).

    Raises:
        TypeError: not a list of pairs of ints.
        MixresError: empty, or a side that is not a multiple of ``tile_size``.
    """
    if isinstance(pinpoints, (str, int)) or not isinstance(pinpoints, Sequence):
        raise TypeError(f"pinpoints has to be a list of (h, w) pairs, but got {pinpoints!r}")
    if not pinpoints:
        raise MixresError("pinpoints is empty; give at least one (h, w) resolution")
    out = [to_2tuple(f"pinpoints[{i}]", tuple(p) if isinstance(p, list) else p) for i, p in enumerate(pinpoints)]
    if tile_size is not None:
        bad = [p for p in out if p[0] % tile_size or p[1] % tile_size]
        if bad:
            raise MixresError(f"pinpoints {bad} are not multiples of the tile size {tile_size}")
    return out


def select_best_resolution(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint that keeps most of the image's pixels, then wastes the least area.

    For each pinpoint the image is scaled (aspect kept) to fit inside it; the *effective*
    resolution is the scaled pixel count (capped at the original's), the *waste* is the rest of
    the pinpoint's area. The first pinpoint with the largest effective resolution and, among
    those, the least waste wins (the release's rule, with its ``int`` truncation). For extreme
    aspect ratios every pinpoint may keep 0 pixels after truncation; the release then returns
    ``None``, we return the least wasteful pinpoint.

    Args:
        image_size: the original ``(H, W)``.
        pinpoints: candidate ``(h, w)`` resolutions.

    Returns:
        The chosen ``(h, w)``.

    Example:
        >>> select_best_resolution((600, 800), LLAVA_NEXT_PINPOINTS)  # 800x600 landscape photo
        (672, 672)
        >>> select_best_resolution((300, 1000), LLAVA_NEXT_PINPOINTS)  # a wide banner
        (336, 1008)
    """
    height, width = to_2tuple("image_size", image_size)
    best, best_effective, best_waste = None, -1, math.inf  # -1: the release returns None when all keep 0 px
    for h, w in check_pinpoints(pinpoints):
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = h * w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def _resized_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The release's ``resize_and_pad_image`` size: fill one side, ceil the other (capped)."""
    (height, width), (th, tw) = image_size, target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def resize_and_pad(images: torch.Tensor, size: Sequence[int], pad_value: float = 0.0) -> torch.Tensor:
    """Resize keeping the aspect ratio to fit ``size``, centre it and pad the rest with ``pad_value``.

    Args:
        images (Tensor[B, C, H, W]): normalised images.
        size: the target ``(h, w)``.
        pad_value: the padding value (0: the mean colour of normalised images).

    Returns:
        Tensor[B, C, h, w] of the input's dtype (bicubic with antialias, computed in float32).

    Example:
        >>> out = resize_and_pad(torch.ones(1, 3, 10, 20), (8, 8))  # 4 rows of image, centred
        >>> out.shape, (out[0, 0, :, 0] != 0).int().tolist()
        (torch.Size([1, 3, 8, 8]), [0, 0, 1, 1, 1, 1, 0, 0])
    """
    th, tw = to_2tuple("size", tuple(size))
    src = (int(images.shape[-2]), int(images.shape[-1]))
    nh, nw = _resized_size(src, (th, tw))
    out = images
    if (nh, nw) != src:
        out = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        out = out.to(images.dtype)
    top, left = (th - nh) // 2, (tw - nw) // 2
    return F.pad(out, (left, tw - nw - left, top, th - nh - top), value=pad_value)


def tile(images: torch.Tensor, grid_pinpoint: Sequence[int], tile_size: int) -> torch.Tensor:
    """Resize-and-pad images to ``grid_pinpoint`` and cut them into ``tile_size`` tiles, row-major.

    Args:
        images (Tensor[B, C, H, W]): normalised images.
        grid_pinpoint: ``(h, w)``, multiples of ``tile_size``.
        tile_size: ``t``, the tile side in pixels.

    Returns:
        Tensor[B*nh*nw, C, t, t]: the tiles of each image together, row-major (``(b nh nw)``).

    Example:
        >>> tile(torch.randn(2, 3, 50, 100), (32, 64), 32).shape  # 1x2 tiles per image
        torch.Size([4, 3, 32, 32])
    """
    check_positive_int("tile_size", tile_size)
    (h, w), = check_pinpoints([grid_pinpoint], tile_size)
    canvas = resize_and_pad(images, (h, w))
    return rearrange(canvas, "b c (nh t1) (nw t2) -> (b nh nw) c t1 t2", t1=tile_size, t2=tile_size)


def untile(tiles: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Put row-major tiles (pixels or feature maps) back on their grid: the inverse of :func:`tile`'s split.

    Args:
        tiles (Tensor[B*nh*nw, C, h, w]): ordered ``(b nh nw)``.
        grid: ``(nh, nw)`` tiles.

    Returns:
        Tensor[B, C, nh*h, nw*w].

    Example:
        >>> x = torch.randn(2, 3, 32, 64)
        >>> torch.equal(untile(tile(x, (32, 64), 32), (1, 2)), x)
        True
    """
    nh, nw = to_2tuple("grid", tuple(grid))
    if tiles.ndim != 4 or tiles.shape[0] % (nh * nw):
        raise ShapeError(f"tiles has to be a Tensor[B*{nh}*{nw}, C, h, w], but got shape {tuple(tiles.shape)}")
    return rearrange(tiles, "(b nh nw) c h w -> b c (nh h) (nw w)", nh=nh, nw=nw)


def unpad_bounds(
    size: Sequence[int], original_size: Sequence[int], convention: Convention = "hf"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows and columns ``((r0, r1), (c0, c1))`` of a padded ``size`` map that hold the image.

    ``unpad_image``'s arithmetic: the side that was filled is kept whole; the other keeps
    ``n = original * scale`` rows (or columns), rounded ``int(round(n, 7))`` (``"hf"``) or
    ``int(n)`` (``"llava_next"``), less ``(size - n) // 2`` at both ends, so an odd margin keeps
    one padding row.

    Args:
        size: ``(H, W)`` of the merged map.
        original_size: ``(h, w)`` of the original image.
        convention: ``"hf"`` or ``"llava_next"`` (see the module docstring).

    Returns:
        ``((r0, r1), (c0, c1))``.

    Example:
        >>> unpad_bounds((4, 4), (100, 200))  # a 2:1 image on a square map: rows 1..2 hold it
        ((1, 3), (0, 4))
    """
    current_h, current_w = to_2tuple("size", tuple(size))
    height, width = to_2tuple("original_size", tuple(original_size))
    # transformers rounds to 7 decimals first, so 47.99999999 counts as 48; the release truncates
    rounded = (lambda x: int(round(x, 7))) if check_convention(convention) == "hf" else int
    if width / height > current_w / current_h:
        new_h = rounded(height * (current_w / width))
        pad = (current_h - new_h) // 2
        return (pad, current_h - pad), (0, current_w)
    new_w = rounded(width * (current_h / height))
    pad = (current_w - new_w) // 2
    return (0, current_h), (pad, current_w - pad)


def unpad_tokens(map: torch.Tensor, original_size: Sequence[int], convention: Convention = "hf") -> torch.Tensor:
    """Remove the rows or columns of a merged feature map that only saw padding.

    Args:
        map (Tensor[..., C, H, W]): the merged tile map of one image (any leading dims).
        original_size: ``(h, w)`` of the original image.
        convention: ``"hf"`` or ``"llava_next"`` (rounding, see :func:`unpad_bounds`).

    Returns:
        Tensor[..., C, rows, cols] (a view).

    Example:
        >>> unpad_tokens(torch.zeros(8, 4, 4), (100, 200)).shape
        torch.Size([8, 2, 4])
    """
    if not isinstance(map, torch.Tensor) or map.ndim < 3:
        raise ShapeError(f"map has to be a Tensor[..., C, H, W], but got {getattr(map, 'shape', type(map).__name__)}")
    (r0, r1), (c0, c1) = unpad_bounds(tuple(map.shape[-2:]), original_size, convention)
    return map[..., r0:r1, c0:c1]


def add_newline(map: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """Flatten a map row-major into tokens with ``newline`` after the last token of each row.

    Args:
        map (Tensor[B, C, H, W]): the feature map.
        newline (Tensor[C]): the learned newline embedding.

    Returns:
        Tensor[B, H*(W+1), C].

    Example:
        >>> map = torch.arange(4.0).view(1, 1, 2, 2)
        >>> add_newline(map, torch.tensor([-1.0]))[0, :, 0].tolist()
        [0.0, 1.0, -1.0, 2.0, 3.0, -1.0]
    """
    if not isinstance(map, torch.Tensor) or map.ndim != 4:
        raise ShapeError(f"map has to be a Tensor[B, C, H, W], but got {getattr(map, 'shape', type(map).__name__)}")
    if not isinstance(newline, torch.Tensor) or newline.shape != (map.shape[1],):
        raise ShapeError(f"newline has to be a Tensor[C] with C={map.shape[1]}, but got {getattr(newline, 'shape', newline)}")
    b, c, h, _ = map.shape
    column = newline.to(map.dtype).view(1, c, 1, 1).expand(b, c, h, 1)
    return rearrange(torch.cat([map, column], dim=-1), "b c h w -> b (h w) c")


def anyres_layout(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    base_grid: Sequence[int],
    newline: bool = True,
    unpad: bool = True,
    convention: Convention = "hf",
) -> AnyResLayout:
    """What AnyRes does with an image of ``image_size``, from sizes alone (no tensor is made).

    Args:
        image_size: the original ``(H, W)``.
        pinpoints: candidate ``(h, w)`` resolutions, multiples of ``tile_size``.
        tile_size: ``t``.
        base_grid: the encoder's token grid ``(g_h, g_w)`` on one ``t x t`` tile.
        newline: whether a newline token ends each row of the tile map.
        unpad: whether padding rows/columns are removed.
        convention: ``"hf"`` or ``"llava_next"``: the unpad rounding (the pinpoints are
            ``(h, w)`` either way; read a config list with :func:`pinpoints_from_config`).

    Returns:
        An :class:`AnyResLayout`.

    Example:
        >>> lay = anyres_layout((600, 800), LLAVA_NEXT_PINPOINTS, 336, (24, 24))
        >>> lay.tile_grid, lay.unpadded_grid, lay.num_tokens  # LLaVA-NeXT at 672x672
        ((2, 2), (36, 48), 2340)
    """
    check_positive_int("tile_size", tile_size)
    gh, gw = to_2tuple("base_grid", tuple(base_grid))
    best = select_best_resolution(image_size, check_pinpoints(pinpoints, tile_size))
    nh, nw = best[0] // tile_size, best[1] // tile_size
    rows, cols = nh * gh, nw * gw
    if unpad:
        (r0, r1), (c0, c1) = unpad_bounds((rows, cols), image_size, convention)
        rows, cols = r1 - r0, c1 - c0
    return AnyResLayout(best, (nh, nw), (gh, gw), (rows, cols), gh * gw + rows * (cols + int(newline)))
