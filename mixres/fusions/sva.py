"""Spatial Vision Aggregator (SVA): grid queries gather local windows of several maps.

Source: Tong et al., "Cambrian-1: A Fully Open, Vision-Centric Exploration of Multimodal
LLMs", arXiv 2406.16860, Sec. 3.2 (Spatial Vision Aggregator); released as
``VisionTokenSampler`` / ``VisionCrossAttentionLayer`` / ``MultiKVCrossAttention`` in
``cambrian/model/vision_sampler.py`` (wired in ``cambrian/model/cambrian_arch.py``) of
github.com/cambrian-mllm/cambrian.

Paper: the query at cell ``(i, j)`` of a ``G x G`` grid attends to its ``m_s x m_s`` window of
every source ``s`` (``m_s = side_s / G``), with one softmax over the keys of all sources::

    q*_ij   = softmax(q_ij [k_ij,1; ...; k_ij,S]^T / sqrt(d)) [v_ij,1; ...; v_ij,S]
    k_ij,s  = W^K_s F_s[m_s i : m_s (i+1), m_s j : m_s (j+1)]      (v likewise)

Released form, hidden width ``D`` (``vision_hidden_size`` = 1024), repeated ``num_layers``
times (``connector_depth`` = 3):

- each source first: ``Linear(C_s, D) -> GELU -> Linear(D, D) -> LayerNorm`` (shared by the
  layers); the global context ``c`` is the mean of source 0;
- per layer: ``q = Linear(C_q + D, D)([x; Linear(D, D)(c)])``;
  ``q = LayerNorm(q + o_proj(attention))`` with ``LayerNorm -> Linear`` on queries and on each
  source's keys and values (no biases); ``x = x + MLP(D -> D -> C_q)(q)``.

Where we differ:

- *queries*: Cambrian's connector starts from one learnable vector (the same at every cell);
  its aggregation layers inside the LLM start from the LLM's hidden states. Here the queries are
  the tokens resampled to the query grid (:func:`mixres.grid.resample`), as in those in-LLM
  layers, so the output has ``G_h * G_w`` tokens (``query_grid``; ``None`` keeps the token grid);
- *init*: ``zero_init`` (default) zeroes the last Linear of each layer's output MLP, so with the
  token grid kept and ``out_dim == low_dim`` the fusion is the identity at init (the release uses
  the default ``nn.Linear`` init);
- *resizing, no masks*: the release interpolates each source inside its tower to a fixed size
  that is a multiple of ``G`` (SigLIP 27x27 -> 24x24; ConvNeXt -> 96x96). Here each source is
  resampled at forward to the nearest multiple (:func:`~mixres.fusions.patch_mining.window_grid`:
  ``round(H / G_h) * G_h``, at least ``G_h``; average-pool down, bilinear up). Nothing is
  masked (the release's masks only drop the padding of non-square images);
- no learnable position embedding inside the windows (the release's is sized to each window,
  which would fix every source's size at build time);
- ``num_heads`` defaults to 1 (16 in the release); ``out_dim != low_dim`` adds a final Linear.

With a single source, the key LayerNorm's bias gets no gradient (it shifts all scores of a query
equally); with several sources sharing one softmax, it weighs the sources against each other.

Shapes: ``tokens (Tensor[B, h*w, C_l])``, ``map`` one ``Tensor[B, C_s, H_s, W_s]`` per source
(a list, or a tensor for one source) -> ``Tensor[B, G_h*G_w, out_dim]``.
Parameters (``S`` sources, ``L`` layers): ``sum_s C_s D + S (D^2 + 4D)`` +
``L ((5 + 2S) D^2 + 2 C_l D + (4 + 4S) D)`` (+ ``(C_l + 1) out_dim`` when ``out_dim != C_l``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._utils import check_like_parameters, check_positive_int, to_2tuple
from ..errors import DeviceError, MixresError, ShapeError
from ..grid import check_map, check_tokens, map_to_tokens, resample, tokens_to_map
from ..registry import register_fusion, register_fusion_preset
from .base import Fusion
from .patch_mining import _norm_linear, gather_windows, window_attention

__all__ = ["SVA", "SVALayer", "source_dims", "check_sources"]


def source_dims(high_dim: int | Sequence[int]) -> tuple[int, ...]:
    """Normalise ``high_dim`` (one int, or one int per source) to a non-empty tuple of widths.

    Example:
        >>> source_dims(8), source_dims([1152, 1024])
        ((8,), (1152, 1024))
    """
    if isinstance(high_dim, int) and not isinstance(high_dim, bool):
        high_dim = (high_dim,)
    if not isinstance(high_dim, (list, tuple)):
        raise TypeError(f"high_dim has to be an int or a list of ints (one per source), but got {high_dim!r}")
    if not high_dim:
        raise MixresError("high_dim has to name at least one source width, but got []")
    for i, dim in enumerate(high_dim):
        check_positive_int(f"high_dim[{i}]", dim)
    return tuple(high_dim)


def check_sources(
    fusion: Fusion, tokens: torch.Tensor, grid: Sequence[int], map: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[tuple[int, int], list[torch.Tensor]]:
    """Validate a multi-source fusion's inputs; return the grid and the maps as a list.

    ``fusion`` has ``low_dim`` and ``high_dims`` (one width per source). ``map`` is a list with
    one map per source, or a tensor when there is one source.

    Raises:
        TypeError: wrong types.
        ShapeError: wrong ranks, number of sources, widths, batch sizes, zero-size maps or
            dtypes (of each other, or of the parameters outside ``torch.autocast``).
        DeviceError: the inputs sit on different devices, or not on the parameters' one.
    """
    name, dims = type(fusion).__name__, fusion.high_dims
    maps = [map] if isinstance(map, torch.Tensor) else map
    if not isinstance(maps, (list, tuple)):
        raise TypeError(f"map has to be a Tensor[B, C, H, W] or a list of them, but got {type(map).__name__}")
    if len(maps) != len(dims):
        raise ShapeError(
            f"got {len(maps)} source map(s), but this {name} was built for {len(dims)} "
            f"(high_dim={list(dims)}); pass one map per source"
        )
    h, w = check_tokens(tokens, grid)
    if tokens.shape[-1] != fusion.low_dim:
        raise ShapeError(f"tokens have C={tokens.shape[-1]} channels, but this {name} was built with low_dim={fusion.low_dim}")
    if not tokens.is_floating_point():
        raise ShapeError(f"tokens have to be floating point, but got {tokens.dtype}")
    for i, (m, dim) in enumerate(zip(maps, dims)):
        check_map(m, name=f"map[{i}]")
        if m.shape[1] != dim:
            raise ShapeError(f"map[{i}] has C={m.shape[1]} channels, but this {name} was built with high_dim[{i}]={dim}")
        if m.shape[0] != tokens.shape[0]:
            raise ShapeError(f"tokens have batch {tokens.shape[0]} but map[{i}] has batch {m.shape[0]}; they must describe the same images")
        if m.dtype != tokens.dtype:
            raise ShapeError(f"tokens are {tokens.dtype} but map[{i}] is {m.dtype}; cast all inputs to one dtype")
        if m.device != tokens.device:
            raise DeviceError(f"tokens are on {tokens.device} but map[{i}] is on {m.device}; move all inputs to one device")
    check_like_parameters(fusion, tokens=tokens)
    return (h, w), list(maps)


class SVALayer(nn.Module):
    """One aggregation layer: queries attend to their windows of every source, then a residual MLP.

    Args:
        low_dim: ``C_l``, the query (token) width.
        hidden_dim: ``D``, the attention width (sources arrive already projected to it).
        num_sources: ``S``.
        num_heads: must divide ``hidden_dim``.
        zero_init: zero the last Linear of the output MLP (the layer is then the identity).
        device: where to create the parameters.
        dtype: the parameters' dtype.
    """

    def __init__(
        self,
        low_dim: int,
        hidden_dim: int,
        num_sources: int,
        num_heads: int,
        zero_init: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.context_proj = nn.Linear(hidden_dim, hidden_dim, bias=False, **kw)
        self.in_proj = nn.Linear(low_dim + hidden_dim, hidden_dim, bias=False, **kw)
        self.q_proj = _norm_linear(hidden_dim, hidden_dim, bias=False, **kw)
        self.k_proj = nn.ModuleList(_norm_linear(hidden_dim, hidden_dim, bias=False, **kw) for _ in range(num_sources))
        self.v_proj = nn.ModuleList(_norm_linear(hidden_dim, hidden_dim, bias=False, **kw) for _ in range(num_sources))
        self.o_proj = nn.Linear(hidden_dim, hidden_dim, bias=False, **kw)
        self.norm = nn.LayerNorm(hidden_dim, **kw)
        self.out_mlp = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim, bias=False, **kw), nn.GELU(), nn.Linear(hidden_dim, low_dim, bias=False, **kw)
        )
        if zero_init:
            nn.init.zeros_(self.out_mlp[2].weight)

    def forward(self, x: torch.Tensor, context: torch.Tensor, windows: Sequence[torch.Tensor]) -> torch.Tensor:
        """x (Tensor[B, N, C_l]), context (Tensor[B, D]), windows: Tensor[B, N, K_s, D] per source."""
        context = self.context_proj(context).unsqueeze(1).expand(-1, x.shape[1], -1)
        q = self.in_proj(torch.cat([x, context], dim=-1))
        k = torch.cat([proj(win) for proj, win in zip(self.k_proj, windows)], dim=2)
        v = torch.cat([proj(win) for proj, win in zip(self.v_proj, windows)], dim=2)
        q = self.norm(q + self.o_proj(window_attention(self.q_proj(q), k, v, self.num_heads)))
        return x + self.out_mlp(q)


class SVA(Fusion):
    """Cambrian-1's spatial vision aggregator, fed by the tokens: any number of sources.

    Args:
        low_dim: ``C_l``, the token width.
        high_dim: one width per source (a list), or one int for a single source.
        out_dim: the output width (default ``C_l``; otherwise a final Linear maps to it).
        query_grid: ``(G_h, G_w)`` (or one int for a square) of the queries and the output;
            ``None`` keeps the token grid.
        hidden_dim: ``D``, the attention width (default ``C_l``).
        num_layers: aggregation layers (3 in the Cambrian-1 connector).
        num_heads: attention heads (16 in the release); must divide ``hidden_dim``.
        zero_init: zero each layer's last Linear (identity at init when the grid and width are kept).
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, C_l]), grid (h, w), map (list of Tensor[B, C_s, H_s, W_s], one per
        source) -> Tensor[B, G_h*G_w, out_dim]. :meth:`output_grid` gives ``(G_h, G_w)``.

    Example:
        >>> sva = SVA(low_dim=16, high_dim=[8, 12], query_grid=(2, 3))
        >>> tokens = torch.randn(2, 4 * 6, 16)
        >>> maps = [torch.randn(2, 8, 4, 6), torch.randn(2, 12, 9, 9)]  # 2x2 and 4x3 windows
        >>> sva(tokens, (4, 6), maps).shape, sva.output_grid((4, 6))
        (torch.Size([2, 6, 16]), (2, 3))
        >>> same = SVA(low_dim=16, high_dim=8)  # token grid kept: the identity at init
        >>> torch.equal(same(tokens, (4, 6), torch.randn(2, 8, 8, 12)), tokens)
        True
    """

    def __init__(
        self,
        low_dim: int,
        high_dim: int | Sequence[int],
        out_dim: int | None = None,
        *,
        query_grid: int | tuple[int, int] | None = None,
        hidden_dim: int | None = None,
        num_layers: int = 1,
        num_heads: int = 1,
        zero_init: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dims = source_dims(high_dim)
        super().__init__(low_dim, dims[0], out_dim)
        self.high_dims = dims
        self.query_grid = None if query_grid is None else to_2tuple("query_grid", query_grid)
        self.hidden_dim = low_dim if hidden_dim is None else hidden_dim
        check_positive_int("hidden_dim", self.hidden_dim)
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_heads", num_heads)
        if self.hidden_dim % num_heads:
            raise MixresError(f"num_heads has to divide hidden_dim={self.hidden_dim}, but got num_heads={num_heads}")
        self.num_layers, self.num_heads, self.zero_init = num_layers, num_heads, zero_init
        kw = dict(device=device, dtype=dtype)
        d = self.hidden_dim
        self.sources = nn.ModuleList(
            nn.Sequential(nn.Linear(c, d, **kw), nn.GELU(), nn.Linear(d, d, **kw), nn.LayerNorm(d, **kw)) for c in dims
        )
        self.layers = nn.ModuleList(SVALayer(low_dim, d, len(dims), num_heads, zero_init, **kw) for _ in range(num_layers))
        self.proj = nn.Linear(low_dim, self.out_dim, **kw) if self.out_dim != low_dim else None

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid of the output tokens: ``query_grid``, or ``grid`` when that is ``None``."""
        return to_2tuple("grid", grid) if self.query_grid is None else self.query_grid

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], map: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Aggregate; see the class docstring for shapes."""
        grid, maps = check_sources(self, tokens, grid, map)
        query_grid = self.output_grid(grid)
        x = map_to_tokens(resample(tokens_to_map(tokens, grid), query_grid))[0]
        windows = [source(gather_windows(m, query_grid)) for source, m in zip(self.sources, maps)]
        context = windows[0].mean(dim=(1, 2))  # the release's global context: mean of source 0
        for layer in self.layers:
            x = layer(x, context, windows)
        return x if self.proj is None else self.proj(x)

    def extra_repr(self) -> str:
        return (
            f"low_dim={self.low_dim}, high_dim={list(self.high_dims)}, out_dim={self.out_dim}, "
            f"query_grid={self.query_grid}, hidden_dim={self.hidden_dim}, num_layers={self.num_layers}, "
            f"num_heads={self.num_heads}, zero_init={self.zero_init}"
        )


register_fusion("sva")(SVA)
# Cambrian-1 8B (scripts/cambrian/finetune_cambrian_8b.sh): sources SigLIP SO400M/14-384 (1152-d,
# 27x27 -> 24x24), CLIP ViT-L/14-336 (1024-d, 24x24), DINOv2 ViT-g/14 at 378 (1536-d, 27x27 -> 24x24),
# ConvNeXt-XXL at 1024 px, four stages concatenated (384+768+1536+3072 = 5760-d, -> 96x96);
# 576 = 24x24 queries, vision_hidden_size 1024, connector_depth 3, 16 heads (vision_sampler.py).
register_fusion_preset(
    "sva_cambrian",
    {
        "name": "sva",
        "low_dim": 1024,
        "high_dim": [1152, 1024, 1536, 5760],
        "query_grid": 24,
        "hidden_dim": 1024,
        "num_layers": 3,
        "num_heads": 16,
    },
)
