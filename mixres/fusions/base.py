"""The fusion contract: ``forward(tokens, grid, map) -> tokens``.

A fusion injects a map's features into a token sequence. It owns the alignment of the map to
the token grid and never sees a backbone. In-stream fusions keep the width (``out_dim ==
low_dim``) and the grid; a *final* fusion may change both.

What an encoder needs to know before anything runs, every fusion declares:

- :attr:`Fusion.num_maps`: how many maps ``forward`` reads (1: one ``Tensor[B, C, H, W]``;
  more: a list of them, one per width in ``high_dims``);
- :meth:`Fusion.output_grid`: the grid of the tokens it returns for an input grid (the token
  grid unless the fusion resamples, like SVA's ``query_grid``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._utils import check_like_parameters, check_positive_int
from ..errors import DeviceError, ShapeError
from ..grid import check_map, check_tokens
from ..registry import Configurable

__all__ = ["Fusion"]


class Fusion(Configurable, nn.Module):
    """Base class of every fusion.

    Attributes:
        low_dim: ``C_l``, the token width in.
        high_dim: ``C_h``, the map width in (or the first map's, for multi-source fusions).
        out_dim: the token width out.
        in_stream: whether the fusion keeps the width and can sit between ViT blocks.
    """

    low_dim: int
    high_dim: int
    out_dim: int

    def __init__(self, low_dim: int, high_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        check_positive_int("low_dim", low_dim)
        check_positive_int("high_dim", high_dim)
        if out_dim is not None:
            check_positive_int("out_dim", out_dim)
        self.low_dim, self.high_dim = low_dim, high_dim
        self.out_dim = low_dim if out_dim is None else out_dim

    @property
    def in_stream(self) -> bool:
        """True when the output width equals the input width."""
        return self.out_dim == self.low_dim

    @property
    def high_dims(self) -> tuple[int, ...]:
        """The width of each map ``forward`` reads (one entry for single-source fusions)."""
        return getattr(self, "_high_dims", (self.high_dim,))

    @high_dims.setter
    def high_dims(self, dims: Sequence[int]) -> None:
        self._high_dims = tuple(int(d) for d in dims)

    @property
    def num_maps(self) -> int:
        """How many maps ``forward`` reads: 1 (a tensor) or more (a list, one per source)."""
        return len(self.high_dims)

    def output_grid(self, grid: Sequence[int]) -> tuple[int, int]:
        """The grid ``(h', w')`` of the returned tokens for input tokens on ``grid``; runs nothing.

        Example:
            >>> import mixres
            >>> mixres.create_fusion("mr_adapter", low_dim=8, high_dim=16).output_grid((4, 6))
            (4, 6)
        """
        h, w = grid
        return int(h), int(w)

    def check_inputs(
        self, tokens: torch.Tensor, grid: Sequence[int], map: torch.Tensor
    ) -> tuple[int, int]:
        """Validate the fusion inputs before any math runs; return the grid ``(h, w)``.

        Raises:
            TypeError / ShapeError: wrong types, ranks, widths, batch sizes, zero-size axes, or
                dtypes (of each other, or of the parameters outside ``torch.autocast``).
            DeviceError: the inputs sit on different devices, or not on the parameters' one.
        """
        h, w = check_tokens(tokens, grid)
        check_map(map)
        if tokens.shape[-1] != self.low_dim:
            raise ShapeError(
                f"tokens have C={tokens.shape[-1]} channels, but this {type(self).__name__} "
                f"was built with low_dim={self.low_dim}"
            )
        if map.shape[1] != self.high_dim:
            raise ShapeError(
                f"map has C={map.shape[1]} channels, but this {type(self).__name__} "
                f"was built with high_dim={self.high_dim}"
            )
        if map.shape[0] != tokens.shape[0]:
            raise ShapeError(
                f"tokens have batch {tokens.shape[0]} but map has batch {map.shape[0]}; "
                "they must describe the same images"
            )
        if not tokens.is_floating_point() or not map.is_floating_point():
            raise ShapeError(
                f"tokens and map have to be floating point, but got {tokens.dtype} and {map.dtype}"
            )
        if tokens.dtype != map.dtype:
            raise ShapeError(
                f"tokens are {tokens.dtype} but map is {map.dtype}; cast both to one dtype"
            )
        if tokens.device != map.device:
            raise DeviceError(f"tokens are on {tokens.device} but map is on {map.device}; move both to one device")
        check_like_parameters(self, tokens=tokens, map=map)
        return h, w

    def extra_repr(self) -> str:
        return f"low_dim={self.low_dim}, high_dim={self.high_dim}, out_dim={self.out_dim}"
