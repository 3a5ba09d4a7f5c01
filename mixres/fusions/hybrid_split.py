"""Hybrid split projection: low tokens and the aligned high map, each through its own half.

Source: Lu et al., "DeepSeek-VL: Towards Real-World Vision-Language Understanding", arXiv
2403.05525, Sec. 2.1 (hybrid vision encoder and vision-language adaptor); released as
``MlpProjector`` with ``projector_type="low_high_hybrid_split_mlp_gelu"`` in
``deepseek_vl/models/projector.py`` (``deepseek_vlm/models/projector.py`` in the first commits)
of github.com/deepseek-ai/DeepSeek-VL.

DeepSeek-VL reads an image twice: SigLIP-L at 384 px (24x24 = 576 tokens, 1024-d) and SAM-B at
1024 px, whose 64x64x256 neck output is interpolated to 96x96 and brought to 24x24x1024 by two
stride-2 convolutions (``deepseek_vl/models/sam.py``). The adaptor then maps each to half the LLM
width, concatenates, and runs a GELU MLP::

    X = [Linear(C_h, out/2)(F_high); Linear(C_l, out/2)(F_low)]      (channels; high first)
    X = (GELU -> Linear(out, out)) applied depth - 1 times

Here ``F_high`` is the map aligned to the token grid by :func:`mixres.grid.resample` (a no-op
for DeepSeek-VL's 24x24 map); the release receives it already aligned. Parameter names equal the
release's (``high_up_proj``, ``low_up_proj``, ``layers.{1,3,...}``), so an ``aligner.*`` state dict
loads after stripping the prefix. Default ``nn.Linear`` init, as released; no identity at init
(the width changes: a final fusion).

Shapes: ``tokens (Tensor[B, h*w, C_l])``, ``map (Tensor[B, C_h, H, W])`` -> ``Tensor[B, h*w, out_dim]``.
Parameters: ``(C_h + C_l + 2) out/2 + (depth - 1)(out^2 + out)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._utils import check_positive_int
from ..errors import MixresError
from ..grid import map_to_tokens, resample
from ..registry import register_fusion, register_fusion_preset
from .base import Fusion

__all__ = ["HybridSplit"]


class HybridSplit(Fusion):
    """DeepSeek-VL's hybrid split MLP: half the output width from each resolution.

    Args:
        low_dim: ``C_l``, the low-res token width (SigLIP-L: 1024).
        high_dim: ``C_h``, the high-res map width (SAM-B after its down-sampling convs: 1024).
        out_dim: the output width, even (default ``C_l``; DeepSeek-VL-7B: the LLM's 4096).
        depth: MLP depth: the split projection, then ``depth - 1`` times GELU -> Linear
            (2 in the release).
        align_corners: for the bilinear up-sampling of a map smaller than the grid.
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, C_l]), grid (h, w), map (Tensor[B, C_h, H, W]) ->
        Tensor[B, h*w, out_dim].

    Example:
        >>> split = HybridSplit(low_dim=8, high_dim=6, out_dim=10)
        >>> split(torch.randn(2, 4 * 3, 8), (4, 3), torch.randn(2, 6, 8, 6)).shape
        torch.Size([2, 12, 10])
    """

    def __init__(
        self,
        low_dim: int,
        high_dim: int,
        out_dim: int | None = None,
        *,
        depth: int = 2,
        align_corners: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(low_dim, high_dim, out_dim)
        if self.out_dim % 2:
            raise MixresError(f"out_dim has to be even (half from each resolution), but got {self.out_dim}")
        check_positive_int("depth", depth)
        kw = dict(device=device, dtype=dtype)
        half = self.out_dim // 2
        self.depth, self.align_corners = depth, align_corners
        self.high_up_proj = nn.Linear(high_dim, half, **kw)
        self.low_up_proj = nn.Linear(low_dim, half, **kw)
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(self.out_dim, self.out_dim, **kw)]
        self.layers = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], map: torch.Tensor) -> torch.Tensor:
        """Project and concatenate; see the class docstring for shapes."""
        grid = self.check_inputs(tokens, grid, map)
        high = map_to_tokens(resample(map, grid, align_corners=self.align_corners))[0]
        return self.layers(torch.cat([self.high_up_proj(high), self.low_up_proj(tokens)], dim=-1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, depth={self.depth}"


register_fusion("hybrid_split")(HybridSplit)
# DeepSeek-VL-7B (aligner: low_high_hybrid_split_mlp_gelu, input_dim 1024, depth 2, n_embed 4096):
# SigLIP-L/16-384 tokens 24x24 x 1024; SAM-B map 24x24 x 1024 (after 96x96 -> two stride-2 convs).
register_fusion_preset(
    "hybrid_split_deepseek", {"name": "hybrid_split", "low_dim": 1024, "high_dim": 1024, "out_dim": 4096, "depth": 2}
)
