"""Channel concatenation: every source map, aligned to the token grid, stacked along channels.

Source: Shi et al., "Eagle: Exploring the Design Space for Multimodal LLMs with Mixture of
Encoders", arXiv 2408.15998, the fusion-strategy study (channel concatenation beats sequence
append, interleaving, LLaVA-HR-style injection and deformable attention, and is the simplest);
released as ``MultiBackboneChannelConcatenationVisionTower`` in
``eagle/model/multimodal_encoder/multi_backbone_channel_concatenation_encoder.py`` of
github.com/NVlabs/Eagle.

With tokens ``F_0`` and source maps ``F_1 ... F_S``, each resized to the token grid::

    F = [F_0; align(F_1); ...; align(F_S)]        (concatenated along channels)

The result feeds the projector (``mlp2x_gelu`` in Eagle), so this is a *final* fusion: the width
grows to ``out_dim = C_l + sum_s C_s``. No parameters, unless ``out_dim`` is given: then a Linear
maps the concatenation to it (default ``nn.Linear`` init).

Where we differ: Eagle interpolates every source bilinearly (``align_corners=True``) to the
32x32 grid, down-sampling included; here :func:`mixres.grid.resample` average-pools down and
interpolates bilinearly up (the rule every mixres fusion shares). Eagle's SAM branch is
pixel-unshuffled (2x) inside its tower; that belongs to the map pathway here.

Shapes: ``tokens (Tensor[B, h*w, C_l])``, ``map`` one ``Tensor[B, C_s, H_s, W_s]`` per source (a
list, or a tensor for one source) -> ``Tensor[B, h*w, out_dim]``.
Parameters: 0, or ``(C_l + sum_s C_s + 1) out_dim`` with a projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._utils import check_positive_int
from ..grid import map_to_tokens, resample
from ..registry import register_fusion, register_fusion_preset
from .base import Fusion
from .sva import check_sources, source_dims

__all__ = ["ChannelConcat", "channel_concat"]


def channel_concat(
    tokens: torch.Tensor, grid: tuple[int, int], maps: Sequence[torch.Tensor], *, align_corners: bool = True
) -> torch.Tensor:
    """Resample each map to ``grid`` and concatenate it to the tokens along channels.

    Args:
        tokens (Tensor[B, h*w, C_l]): the tokens, row-major on ``grid``.
        grid: ``(h, w)``.
        maps: one Tensor[B, C_s, H_s, W_s] per source.
        align_corners: for the bilinear up-sampling.

    Returns:
        Tensor[B, h*w, C_l + sum_s C_s].

    Example:
        >>> maps = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 2, 2)]
        >>> channel_concat(torch.randn(2, 16, 4), (4, 4), maps).shape
        torch.Size([2, 16, 12])
    """
    aligned = [map_to_tokens(resample(m, grid, align_corners=align_corners))[0] for m in maps]
    return torch.cat([tokens, *aligned], dim=-1)


class ChannelConcat(Fusion):
    """Eagle's channel concatenation of several encoders' features (a final fusion).

    Args:
        low_dim: ``C_l``, the token width.
        high_dim: one width per source (a list), or one int for a single source.
        out_dim: ``None`` (default): ``C_l + sum_s C_s``, no parameters; an int adds a Linear
            from the concatenation to ``out_dim``.
        align_corners: for the bilinear up-sampling of maps smaller than the grid.
        device: where to create the parameters (only with ``out_dim``).
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, C_l]), grid (h, w), map (list of Tensor[B, C_s, H_s, W_s]) ->
        Tensor[B, h*w, out_dim].

    Example:
        >>> concat = ChannelConcat(low_dim=4, high_dim=[6, 2])
        >>> maps = [torch.randn(2, 6, 8, 8), torch.randn(2, 2, 3, 3)]
        >>> out = concat(torch.randn(2, 16, 4), (4, 4), maps)
        >>> out.shape, concat.out_dim, sum(p.numel() for p in concat.parameters())
        (torch.Size([2, 16, 12]), 12, 0)
    """

    def __init__(
        self,
        low_dim: int,
        high_dim: int | Sequence[int],
        out_dim: int | None = None,
        *,
        align_corners: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dims = source_dims(high_dim)
        check_positive_int("low_dim", low_dim)
        concat_dim = low_dim + sum(dims)
        super().__init__(low_dim, dims[0], concat_dim if out_dim is None else out_dim)
        self.high_dims, self.concat_dim, self.align_corners = dims, concat_dim, align_corners
        self.proj = None if out_dim is None else nn.Linear(self.concat_dim, self.out_dim, device=device, dtype=dtype)

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], map: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Concatenate; see the class docstring for shapes."""
        grid, maps = check_sources(self, tokens, grid, map)
        out = channel_concat(tokens, grid, maps, align_corners=self.align_corners)
        return out if self.proj is None else self.proj(out)

    def extra_repr(self) -> str:
        return f"low_dim={self.low_dim}, high_dim={list(self.high_dims)}, out_dim={self.out_dim}, projection={self.proj is not None}"


register_fusion("channel_concat")(ChannelConcat)
# Eagle-X5 (scripts/finetune-eagle-x5-vicuna-7b-1.8m.sh, "clip-448;convnext-1024;sam-1024;det-1024;
# pix2struct-1024"): CLIP ViT-L/14 at 448 px -> 32x32 = 1024 tokens, 1024-d; sources ConvNeXt-XXL at
# 1024 px (3072-d, 32x32), SAM-L short neck pixel-unshuffled (4 x 256 = 1024-d, 32x32), EVA-02-L
# detection (1024-d, 64x64), Pix2Struct-large (1536-d); all resized to 32x32: 1024 + 6656 = 7680-d.
register_fusion_preset(
    "channel_concat_eagle", {"name": "channel_concat", "low_dim": 1024, "high_dim": [3072, 1024, 1024, 1536]}
)
