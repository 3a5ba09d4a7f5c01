"""S2 ("scaling on scales"): run one model at several image sizes and stack the features.

Source: Shi et al., "When Do We Not Need Larger Vision Models?", arXiv 2403.13984, Sec. 2
(S2-Wrapper, Fig. 2); released as ``forward`` in ``s2wrapper/core.py`` of
github.com/bfshi/scaling_on_scales.

Algorithm, for image sizes ``s_1, ..., s_S`` and a split size ``m`` (the model's native size)::

    for each size s_i:
        x_i   = resize(images, s_i)                                   # bicubic, float32
        tiles = rearrange(x_i, "b c (nh m) (nw m) -> (nh nw b) c m m")  # chessboard split
        f_i   = rearrange(model(tiles), "(nh nw b) c h w -> b c (nh h) (nw w)")
    out = concat_i(area_interpolate(f_i, size of f_k))                  # k = resize_output_to_scale_idx

A model that works on patches independently (a patchify convolution) gives exactly the same
features split or unsplit; a ViT sees each tile as a whole image (the paper's point: no
position-embedding interpolation, no quadratic attention cost).

Where we differ from the release:

- ``scales`` are image sizes in pixels (the release's ``img_sizes``), not factors of the input
  size, and each has to be a multiple of the split size: the release rounds a size up (resizing
  or padding); we raise, so the token count is exactly the one asked for.
- ``merge="sum"`` adds the scales instead of concatenating them (keeps the width; our option).
- The model may return the token-pathway contract ``(tokens, grid)``, so its grid need not be
  square; a plain ``Tensor[B, N, C]`` has to be square, as in the release.
- No ``split_forward`` (sub-images in chunks of ``B``): one forward per scale.

Token count: the output grid is the merged grid of scale ``k``: ``(s_k / m) * g`` per side,
with ``g`` the model's grid on one ``m``-pixel tile; the width is ``C * S`` (concat) or ``C``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from ._utils import check_choice, to_2tuple
from .errors import MixresError, ShapeError
from .grid import tokens_to_map

__all__ = [
    "s2_forward",
    "split_chessboard",
    "merge_chessboard",
    "resize_images",
    "num_splits",
    "check_scales",
    "OUTPUT_SHAPES",
    "S2_MERGES",
]

OutputShape = Literal["bnc", "bchw"]
S2Merge = Literal["concat", "sum"]
OUTPUT_SHAPES: tuple[str, ...] = ("bnc", "bchw")
S2_MERGES: tuple[str, ...] = ("concat", "sum")


def split_chessboard(images: torch.Tensor, num_split: tuple[int, int]) -> torch.Tensor:
    """Cut every image into a ``nh x nw`` chessboard of equal sub-images.

    Args:
        images (Tensor[B, C, nh*h, nw*w]): images or maps.
        num_split: ``(nh, nw)`` sub-images per column and per row.

    Returns:
        Tensor[nh*nw*B, C, h, w]: sub-images ordered ``(nh nw b)``, as the release orders them.

    Example:
        >>> split_chessboard(torch.zeros(2, 3, 8, 12), (2, 3)).shape
        torch.Size([12, 3, 4, 4])
    """
    nh, nw = num_split
    if images.shape[-2] % nh or images.shape[-1] % nw:
        raise ShapeError(f"size {tuple(images.shape[-2:])} does not split into a {nh}x{nw} chessboard")
    return rearrange(images, "b c (nh h) (nw w) -> (nh nw b) c h w", nh=nh, nw=nw)


def merge_chessboard(tiles: torch.Tensor, num_split: tuple[int, int]) -> torch.Tensor:
    """Put chessboard sub-images (or their feature maps) back together: the inverse of :func:`split_chessboard`.

    Args:
        tiles (Tensor[nh*nw*B, C, h, w]): ordered ``(nh nw b)``.
        num_split: ``(nh, nw)``.

    Returns:
        Tensor[B, C, nh*h, nw*w].

    Example:
        >>> x = torch.randn(2, 3, 8, 12)
        >>> torch.equal(merge_chessboard(split_chessboard(x, (2, 3)), (2, 3)), x)
        True
    """
    nh, nw = num_split
    if tiles.shape[0] % (nh * nw):
        raise ShapeError(f"{tiles.shape[0]} sub-images do not make whole {nh}x{nw} chessboards")
    return rearrange(tiles, "(nh nw b) c h w -> b c (nh h) (nw w)", nh=nh, nw=nw)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize in float32, cast back (the release's choice); the input itself if the size matches.

    Args:
        images (Tensor[B, C, H, W]): the images.
        size: ``(h, w)``.

    Returns:
        Tensor[B, C, h, w].
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False).to(images.dtype)


def num_splits(size: tuple[int, int], split_size: tuple[int, int], where: str = "scale") -> tuple[int, int]:
    """Sub-images ``(nh, nw)`` per side for an image of ``size`` cut into ``split_size`` tiles.

    Raises:
        MixresError: ``size`` is not a multiple of ``split_size``.
    """
    if size[0] % split_size[0] or size[1] % split_size[1]:
        raise MixresError(
            f"{where} {size} is not a multiple of the split size {split_size}; "
            f"use sizes such as {(split_size[0] * max(1, round(size[0] / split_size[0])), split_size[1] * max(1, round(size[1] / split_size[1])))}"
        )
    return size[0] // split_size[0], size[1] // split_size[1]


def _check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images has to be a Tensor[B, C, H, W], but got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ShapeError(f"images has to be a non-empty Tensor[B, C, H, W], but got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ShapeError(f"images have to be floating point, but got dtype {images.dtype}")


def check_scales(scales: Any) -> list[tuple[int, int]]:
    """Validate ``scales`` (a non-empty list of sizes, an int or ``(h, w)`` each); return ``(h, w)`` pairs.

    Raises:
        TypeError: not a non-empty list, or a size that is not an int or a pair of ints.
        MixresError: a size that is not positive.
    """
    if isinstance(scales, (int, str)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise TypeError(f"scales has to be a non-empty list of sizes (int or (h, w)), but got {scales!r}")
    return [to_2tuple(f"scales[{i}]", s) for i, s in enumerate(scales)]


def _as_map(out: Any, output_shape: str, num_prefix_tokens: int, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's output on ``batch`` sub-images as ``(map, prefix tokens or None)``."""
    grid = None
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor):
        if output_shape != "bnc":
            raise ShapeError("the model returned (tokens, grid); use output_shape='bnc'")
        out, grid = out[0], to_2tuple("the grid returned by the model", tuple(out[1]))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model has to return a Tensor (or (tokens, grid)), but returned {type(out).__name__}")
    if out.shape[0] != batch:
        raise ShapeError(f"the model returned batch {out.shape[0]} for {batch} sub-images; it has to keep the batch")
    expected = 4 if output_shape == "bchw" else 3
    if out.ndim != expected:
        layout = "Tensor[B, C, h, w]" if expected == 4 else "Tensor[B, N, C]"
        raise ShapeError(f"output_shape={output_shape!r} expects the model to return {layout}, but got shape {tuple(out.shape)}")
    if output_shape == "bchw":
        return out, None
    prefix, tokens = out[:, :num_prefix_tokens], out[:, num_prefix_tokens:]
    if grid is None:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ShapeError(
                f"the model returned N={tokens.shape[1]} tokens (after {num_prefix_tokens} prefix tokens), not a "
                "square grid; return (tokens, grid) or a map with output_shape='bchw'"
            )
        grid = (side, side)
    return tokens_to_map(tokens, grid), (prefix if num_prefix_tokens else None)


def _area(map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(map.shape[-2:]) == tuple(size):
        return map
    return F.interpolate(map.float(), size=size, mode="area").to(map.dtype)


def s2_forward(
    model: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    scales: Sequence[int | Sequence[int]],
    max_split_size: int | Sequence[int] | None = None,
    resize_output_to_scale_idx: int = 0,
    output_shape: OutputShape = "bnc",
    merge: S2Merge = "concat",
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Run ``model`` on ``images`` at every size in ``scales`` (chessboard-split) and merge the features.

    Args:
        model: any callable (e.g. an ``nn.Module``) taking ``Tensor[b, C, m_h, m_w]`` and returning
            ``Tensor[b, P + n, D]`` tokens on a square grid, ``(tokens, grid)`` (the token-pathway
            contract), or ``Tensor[b, D, h, w]`` maps (``output_shape="bchw"``).
        images (Tensor[B, C, H, W]): the images, any size (each scale resizes them).
        scales: image sizes in pixels, an int (square) or ``(h, w)`` each, e.g. ``[336, 672, 1008]``.
        max_split_size: the sub-image size ``m`` (int or ``(h, w)``); ``None``: the input's ``(H, W)``,
            as the release. Every scale has to be a multiple of it.
        resize_output_to_scale_idx: the scale whose feature grid is the output grid (negative counts
            from the end).
        output_shape: ``"bnc"`` (tokens) or ``"bchw"`` (maps); in and out.
        merge: ``"concat"`` the scales along channels (the release) or ``"sum"`` them.
        num_prefix_tokens: ``P`` leading (CLS) tokens of a ``"bnc"`` model; they are averaged over the
            sub-images of a scale and merged over scales like the grid, then put first again.

    Returns:
        ``Tensor[B, P + h*w, D * S]`` (``"bnc"``) or ``Tensor[B, D * S, h, w]`` (``"bchw"``) with ``(h, w)``
        the merged grid of scale ``resize_output_to_scale_idx``; ``D`` instead of ``D * S`` for ``"sum"``.

    Raises:
        TypeError: ``images`` is not a tensor, ``scales`` not a list, the model returns something else.
        MixresError: a scale that is not a multiple of the split size, an unknown option, a bad index.
        ShapeError: the model's output does not fit ``output_shape`` or changes the batch.

    Example:
        >>> patchify = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)  # a map model: 16 px -> 4x4
        >>> out = s2_forward(patchify, torch.randn(2, 3, 32, 32), scales=[16, 32], max_split_size=16,
        ...                  output_shape="bchw")
        >>> out.shape  # grid of the first scale, 8 channels per scale
        torch.Size([2, 16, 4, 4])
    """
    _check_images(images)
    check_choice("output_shape", output_shape, OUTPUT_SHAPES)
    check_choice("merge", merge, S2_MERGES)
    sizes = check_scales(scales)
    split = tuple(images.shape[-2:]) if max_split_size is None else max_split_size
    split = to_2tuple("max_split_size", split)
    splits = [num_splits(size, split, f"scales[{i}]") for i, size in enumerate(sizes)]
    if isinstance(resize_output_to_scale_idx, bool) or not isinstance(resize_output_to_scale_idx, int) \
            or not -len(sizes) <= resize_output_to_scale_idx < len(sizes):
        raise MixresError(f"resize_output_to_scale_idx has to index one of {len(sizes)} scales, but got {resize_output_to_scale_idx!r}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise MixresError(f"num_prefix_tokens has to be an int >= 0, but got {num_prefix_tokens!r}")
    if num_prefix_tokens and output_shape == "bchw":
        raise MixresError("num_prefix_tokens > 0 needs output_shape='bnc' (a map has no prefix tokens)")

    batch = images.shape[0]
    maps, prefixes = [], []
    for size, split_grid in zip(sizes, splits):
        tiles = split_chessboard(resize_images(images, size), split_grid)
        fmap, prefix = _as_map(model(tiles), output_shape, num_prefix_tokens, tiles.shape[0])
        maps.append(merge_chessboard(fmap, split_grid))
        if prefix is not None:  # (nh nw b) P D -> mean over the nh*nw sub-images of each image
            prefixes.append(prefix.reshape(-1, batch, *prefix.shape[1:]).mean(dim=0))
    if len({m.shape[1] for m in maps}) > 1 and merge == "sum":
        raise ShapeError(f"merge='sum' needs one width at every scale, but got {[m.shape[1] for m in maps]}")
    out_size = tuple(maps[resize_output_to_scale_idx].shape[-2:])
    maps = [_area(m, out_size) for m in maps]
    out = torch.cat(maps, dim=1) if merge == "concat" else torch.stack(maps).sum(dim=0)
    if output_shape == "bchw":
        return out
    out = rearrange(out, "b c h w -> b (h w) c")
    if prefixes:
        prefix = torch.cat(prefixes, dim=-1) if merge == "concat" else torch.stack(prefixes).sum(dim=0)
        out = torch.cat([prefix, out], dim=1)
    return out
