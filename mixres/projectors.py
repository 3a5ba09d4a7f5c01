"""Projectors: visual tokens -> LLM width.

``linear`` and ``mlp_gelu`` (LLaVA-1.5's ``mlp{N}x_gelu``: Linear, then ``N-1`` times GELU +
Linear; the presets ``mlp2x_gelu`` ... ``mlp4x_gelu`` fix ``depth``) and ``identity``. The MLP
is an ``nn.Sequential`` so its keys are LLaVA's ``mm_projector.{0,2,...}``.

Shape: ``Tensor[B, N, in_dim] -> Tensor[B, N, out_dim]``.

The projector kind has one signature, shared with the compressors (:mod:`mixres.compressors`):
``forward(tokens, grid=None) -> tokens`` and ``output_grid(grid) -> grid`` (runs nothing), so the
HF integration and the recipe put any registered projector between tower and LLM and the
``<image>`` expansion follows ``output_grid``. Width-only projectors keep the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._utils import check_like_parameters, check_positive_int
from .errors import ConfigError, ShapeError
from .registry import Configurable, register_projector, register_projector_preset

__all__ = ["LinearProjector", "MLPProjector", "IdentityProjector"]


class _KeepsGrid:
    """``output_grid`` of the projectors that change the width only."""

    def output_grid(self, grid: Sequence[int]) -> tuple[int, int]:
        """The grid of the output tokens: the input grid (one token out per token in)."""
        h, w = grid
        return int(h), int(w)


def _check_width(x: torch.Tensor, in_dim: int, who: str, module: nn.Module) -> None:
    """Rank >= 2, width ``in_dim``, floating point, dtype and device of ``module``'s parameters."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ShapeError(f"{who} takes Tensor[..., {in_dim}], but got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[-1] != in_dim:
        raise ShapeError(f"{who} was built with in_dim={in_dim}, but the input has width {x.shape[-1]}")
    if not x.is_floating_point():
        raise ShapeError(f"{who} takes floating-point tokens, but got dtype {x.dtype}")
    check_like_parameters(module, tokens=x)


class LinearProjector(_KeepsGrid, Configurable, nn.Linear):
    """One linear layer ``in_dim -> out_dim`` (LLaVA-1's projector).

    Example:
        >>> LinearProjector(in_dim=8, out_dim=16)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, in_dim: int, out_dim: int, *, device=None, dtype=None) -> None:
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        super().__init__(in_dim, out_dim, device=device, dtype=dtype)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        _check_width(x, self.in_dim, "linear projector", self)
        return super().forward(x)


class MLPProjector(_KeepsGrid, Configurable, nn.Sequential):
    """LLaVA's ``mlp{depth}x_gelu``: Linear(in->out), then (GELU, Linear(out->out)) ``depth-1`` times.

    Example:
        >>> proj = MLPProjector(in_dim=8, out_dim=16, depth=2)
        >>> list(proj.state_dict())  # LLaVA's mm_projector.{0,2} keys
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> proj(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, *, device=None, dtype=None) -> None:
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        check_positive_int("depth", depth)
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, device=device, dtype=dtype)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim, device=device, dtype=dtype)]
        super().__init__(*layers)
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        _check_width(x, self.in_dim, f"mlp{self.depth}x_gelu projector", self)
        return super().forward(x)


class IdentityProjector(_KeepsGrid, Configurable, nn.Module):
    """No projection: the LLM takes the visual width as is (``in_dim == out_dim`` required).

    Example:
        >>> IdentityProjector(in_dim=8)(torch.ones(1, 2, 8)).shape
        torch.Size([1, 2, 8])
    """

    def __init__(self, in_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        if out_dim is not None and out_dim != in_dim:
            raise ConfigError(f"identity projector needs out_dim == in_dim ({in_dim}), but got {out_dim}")
        self.in_dim = self.out_dim = in_dim

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        _check_width(x, self.in_dim, "identity projector", self)
        return x


register_projector("linear")(LinearProjector)
register_projector("mlp_gelu")(MLPProjector)
register_projector("identity")(IdentityProjector)
for _depth in (1, 2, 3, 4):
    register_projector_preset(f"mlp{_depth}x_gelu", {"name": "mlp_gelu", "depth": _depth})
