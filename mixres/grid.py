"""Layout changes between tokens and maps, and resampling a map to a token grid.

Vocabulary (shapes as in torchvision.ops):

- **tokens** ``Tensor[B, N, C]`` with a known **grid** ``(h, w)``, ``N = h * w``, row-major;
- **map** ``Tensor[B, C, H, W]``.

``resample`` is the one alignment rule every fusion shares: integer down-factors average-pool
(the LLaVA-HR release's ``F.avg_pool2d``), non-integer down-factors use adaptive (area)
pooling, up-sampling is bilinear (``align_corners=True`` by default, as released), computed in
float32 and cast back. An axis that goes down while the other goes up is pooled first, then
interpolated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ._utils import check_choice, to_2tuple
from .errors import ShapeError

__all__ = ["tokens_to_map", "map_to_tokens", "resample", "resample_pos_embed", "check_tokens", "check_map"]

# F.interpolate's modes for a 4-D map, and those it can antialias
_INTERPOLATION_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
_ANTIALIAS_MODES = ("bilinear", "bicubic")


def check_tokens(tokens: torch.Tensor, grid: tuple[int, int], name: str = "tokens") -> tuple[int, int]:
    """Validate ``tokens (Tensor[B, N, C])`` against ``grid (h, w)``; return the grid as ints.

    Raises:
        TypeError: ``tokens`` is not a tensor or ``grid`` is not a pair of ints.
        ShapeError: wrong rank, empty batch, no channels, or ``N != h * w``.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} has to be a Tensor[B, N, C], but got {type(tokens).__name__}")
    if tokens.ndim != 3:
        raise ShapeError(f"{name} has to be a Tensor[B, N, C] (rank 3), but got shape {tuple(tokens.shape)}")
    h, w = to_2tuple("grid", tuple(grid) if isinstance(grid, (list, tuple)) else grid)
    if tokens.shape[0] == 0:
        raise ShapeError(f"{name} has an empty batch (shape {tuple(tokens.shape)}); pass at least one sample")
    if tokens.shape[2] == 0:
        raise ShapeError(f"{name} has C=0 channels (shape {tuple(tokens.shape)}); a token needs at least one")
    if tokens.shape[1] != h * w:
        raise ShapeError(
            f"{name} has N={tokens.shape[1]} tokens, but grid {(h, w)} needs h*w={h * w}"
        )
    return h, w


def check_map(map: torch.Tensor, name: str = "map") -> None:
    """Validate ``map (Tensor[B, C, H, W])``: a tensor of rank 4, every size > 0.

    Raises:
        TypeError: not a tensor.
        ShapeError: wrong rank, or a zero-size batch, channel axis, height or width (nothing
            can be aligned to, or pooled from, an empty map).
    """
    if not isinstance(map, torch.Tensor):
        raise TypeError(f"{name} has to be a Tensor[B, C, H, W], but got {type(map).__name__}")
    if map.ndim != 4:
        raise ShapeError(f"{name} has to be a Tensor[B, C, H, W] (rank 4), but got shape {tuple(map.shape)}")
    if map.shape[0] == 0:
        raise ShapeError(f"{name} has an empty batch (shape {tuple(map.shape)}); pass at least one sample")
    if 0 in map.shape[1:]:
        raise ShapeError(f"{name} has a zero-size axis (shape {tuple(map.shape)} as B, C, H, W); C, H and W have to be > 0")


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Lay row-major tokens out on their grid.

    Args:
        tokens (Tensor[B, N, C]): ``N = h * w``.
        grid: ``(h, w)``.

    Returns:
        map (Tensor[B, C, h, w]).

    Example:
        >>> tokens_to_map(torch.zeros(2, 6, 5), (2, 3)).shape
        torch.Size([2, 5, 2, 3])
    """
    h, w = check_tokens(tokens, grid)
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)


def map_to_tokens(map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Flatten a map into row-major tokens and return them with their grid.

    Args:
        map (Tensor[B, C, H, W]): the map to flatten.

    Returns:
        ``(tokens (Tensor[B, H*W, C]), (H, W))``.

    Example:
        >>> tokens, grid = map_to_tokens(torch.zeros(2, 5, 2, 3))
        >>> tokens.shape, grid
        (torch.Size([2, 6, 5]), (2, 3))
    """
    check_map(map)
    return rearrange(map, "b c h w -> b (h w) c"), (int(map.shape[2]), int(map.shape[3]))


def resample(map: torch.Tensor, size: int | tuple[int, int], *, align_corners: bool = True) -> torch.Tensor:
    """Resample a map to ``size``: average-pool down, bilinear up.

    Args:
        map (Tensor[B, C, H, W]): the map to resample.
        size: target ``(h, w)`` (or one int for a square).
        align_corners: for the bilinear up-sampling; ``True`` as in the LLaVA-HR release.

    Returns:
        map (Tensor[B, C, h, w]) of the input's dtype. Returns the input itself when the size
        already matches.

    Raises:
        ShapeError: not a float map (pooling integers would truncate), a zero-size map, or a
            target size that is not positive.

    Example:
        >>> resample(torch.ones(1, 3, 8, 8), (4, 4)).shape  # 2x2 average pooling
        torch.Size([1, 3, 4, 4])
        >>> resample(torch.ones(1, 3, 8, 6), (12, 3)).shape  # up in H, down in W
        torch.Size([1, 3, 12, 3])
    """
    check_map(map)
    if not map.is_floating_point():
        raise ShapeError(f"map has to be floating point to be resampled (pooling would truncate), but got {map.dtype}")
    h, w = to_2tuple("size", size)
    src_h, src_w = int(map.shape[2]), int(map.shape[3])
    if (h, w) == (src_h, src_w):
        return map
    dtype = map.dtype
    out = map.float()  # interpolation and pooling in float32, cast back at the end (as timm does)
    down_h, down_w = min(h, src_h), min(w, src_w)
    if (down_h, down_w) != (src_h, src_w):
        if src_h % down_h == 0 and src_w % down_w == 0:
            out = F.avg_pool2d(out, kernel_size=(src_h // down_h, src_w // down_w))
        else:
            out = F.adaptive_avg_pool2d(out, (down_h, down_w))
    if (down_h, down_w) != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=align_corners)
    return out.to(dtype)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample an absolute position embedding to a new (square or not) patch grid.

    The math of timm's ``resample_abs_pos_embed`` (float32, interpolate, cast back; a test
    checks they agree), written here because the core must not import timm. Prefix (CLS) rows
    are kept.

    Args:
        pos_embed (Tensor[1, P + h0*w0, C]): ``P = num_prefix_tokens``.
        new_grid: ``(h, w)`` patches of the new input.
        old_grid: ``(h0, w0)``; inferred as square when ``None``.
        num_prefix_tokens: rows at the front that are not on the grid (CLS, registers).
        interpolation: ``F.interpolate`` mode; bicubic as the LLaVA-HR release.
        antialias: as the LLaVA-HR release (True).

    Returns:
        Tensor[1, P + h*w, C] of the input's dtype (the input itself when nothing changes).

    Raises:
        TypeError: ``pos_embed`` is not a tensor.
        ShapeError: wrong rank, not floating point, more prefix rows than rows, or a grid that
            does not fit the rows.
        MixresError: an ``interpolation`` that ``F.interpolate`` does not offer (with ``antialias``).

    Example:
        >>> resample_pos_embed(torch.zeros(1, 1 + 24 * 24, 8), (32, 16)).shape
        torch.Size([1, 513, 8])
    """
    if not isinstance(pos_embed, torch.Tensor):
        raise TypeError(f"pos_embed has to be a Tensor[1, P + h*w, C], but got {type(pos_embed).__name__}")
    if pos_embed.ndim != 3:
        raise ShapeError(f"pos_embed has to be Tensor[1, P + h*w, C], but got shape {tuple(pos_embed.shape)}")
    if not pos_embed.is_floating_point():
        raise ShapeError(f"pos_embed has to be floating point, but got {pos_embed.dtype}")
    new_h, new_w = to_2tuple("new_grid", new_grid)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise TypeError(f"num_prefix_tokens has to be an int >= 0, but got {num_prefix_tokens!r}")
    modes = _ANTIALIAS_MODES if antialias else _INTERPOLATION_MODES
    check_choice("interpolation" + (" (with antialias=True)" if antialias else ""), interpolation, modes)
    num_pos = pos_embed.shape[1] - num_prefix_tokens
    if num_pos <= 0:
        raise ShapeError(
            f"pos_embed has {pos_embed.shape[1]} rows, but num_prefix_tokens={num_prefix_tokens} leaves "
            f"no grid rows (shape {tuple(pos_embed.shape)})"
        )
    if old_grid is None:
        side = math.isqrt(num_pos)
        if side * side != num_pos:
            raise ShapeError(
                f"pos_embed has {num_pos} grid rows, not a square; pass old_grid=(h0, w0)"
            )
        old_grid = (side, side)
    old_h, old_w = to_2tuple("old_grid", old_grid)
    if old_h * old_w != num_pos:
        raise ShapeError(f"old_grid {(old_h, old_w)} needs {old_h * old_w} rows, but pos_embed has {num_pos}")
    if (new_h, new_w) == (old_h, old_w):
        return pos_embed
    prefix, grid_rows = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dtype = pos_embed.dtype
    grid_map = rearrange(grid_rows.float(), "b (h w) c -> b c h w", h=old_h, w=old_w)
    grid_map = F.interpolate(
        grid_map, size=(new_h, new_w), mode=interpolation, antialias=antialias, align_corners=False
    )
    grid_rows = rearrange(grid_map, "b c h w -> b (h w) c").to(dtype)
    return torch.cat([prefix, grid_rows], dim=1)
