"""Token compressors: projectors that map tokens on a grid to fewer tokens at the LLM width.

They sit where the projector sits (after the encoder, before the LLM), so they are registered
as projectors; unlike a plain projector they take the grid: ``forward(tokens, grid=None)`` and
answer ``grid_for(grid)`` / ``num_tokens(grid)`` without running anything.

**C-Abstractor** (``c_abstractor``). Source: Cha et al., "Honeybee: Locality-enhanced Projector
for Multimodal LLM", arXiv 2312.06742, Sec. 3.2, Fig. 4; ``CAbstractor`` in
``honeybee/projectors/projectors.py`` of github.com/kakaobrain/honeybee::

    tokens -> map -> RegStage(depth, in_dim -> hidden_dim)   # ResNet bottlenecks with SE
           -> adaptive average pool to the query grid (h', w')
           -> RegStage(depth, hidden_dim -> hidden_dim) -> tokens -> MLP(mlp_depth, SiLU) -> out_dim

The stages are the release's timm ``RegStage`` (``stride=1, act_layer=SiLU,
norm_layer=LayerNorm2d``, bottleneck ratio 1, depthwise 3x3, squeeze-excitation 0.25), written
out here with the same parameter names (``net.0.b1.conv1.conv.weight``, ...), so released
weights load. Differences: no learned absolute position embedding (``pos_emb``, trained for one
input grid) and no ``prenorm``/``eos_tokens``; ``num_queries`` may be a ``(h', w')`` grid for
non-square inputs.

**TokenPacker** (``tokenpacker``). Source: Li et al., "TokenPacker: Efficient Visual Projector
for Multimodal LLM", arXiv 2407.02392, Sec. 3.2 (point-to-region cross-attention, Eq. 2-4);
``TokenPacker`` in ``llava/model/multimodal_projector/builder.py`` of
github.com/CircleRadon/TokenPacker::

    q = LN(W_q bilinear_downsample(tokens, 1/s))           # one query per s x s region
    k = LN(MLP_k(tokens)), v = LN(MLP_v(tokens))
    out = MLP(MultiheadAttention(q, k[region], v[region]))   # each query sees only its region

Parameter names follow the release (``q_proj_1``, ``k_proj_1``, ``ln_q_1``, ``clip_attn``,
``mlp``). Difference: single-level keys/values: the release takes keys/values from four ViT
layers concatenated (width ``4 * in_dim``); here they come from the same tokens as the queries
(pass concatenated features as ``tokens`` for the multi-level flavour, at the cost of queries
from them too). ``scale_factor`` may be ``(s_h, s_w)``.

Shapes: ``tokens (Tensor[B, h*w, in_dim])`` -> ``Tensor[B, h'*w', out_dim]``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._utils import check_like_parameters, check_positive_int, to_2tuple
from .errors import MixresError, ShapeError
from .grid import check_tokens, map_to_tokens, tokens_to_map
from .registry import Configurable, register_projector, register_projector_preset

__all__ = ["Compressor", "CAbstractor", "TokenPacker", "region_attention"]


class Compressor(Configurable, nn.Module):
    """Base class of token compressors.

    Attributes:
        in_dim: token width in.
        out_dim: token width out (the LLM width).
    """

    in_dim: int
    out_dim: int

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim

    def grid_for(self, grid: int | Sequence[int]) -> tuple[int, int]:
        """The output grid ``(h', w')`` for an input grid ``(h, w)``; runs nothing."""
        raise NotImplementedError

    def output_grid(self, grid: int | Sequence[int]) -> tuple[int, int]:
        """The projector kind's name for :meth:`grid_for`: the output grid for an input grid."""
        return self.grid_for(grid)

    def num_tokens(self, grid: int | Sequence[int]) -> int:
        """Tokens out for an input grid ``(h, w)``; runs nothing."""
        h, w = self.grid_for(grid)
        return h * w

    def check_inputs(self, tokens: torch.Tensor, grid: Sequence[int] | None) -> tuple[int, int]:
        """Validate ``tokens (Tensor[B, h*w, in_dim])``; a ``None`` grid means square.

        Raises:
            TypeError / ShapeError: not a tensor, wrong rank, width or dtype (or not the
                parameters' dtype outside ``torch.autocast``), ``N`` not on the grid.
            DeviceError: the tokens are not on the parameters' device.
        """
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens has to be a Tensor[B, N, {self.in_dim}], but got {type(tokens).__name__}")
        if tokens.ndim != 3:
            raise ShapeError(f"tokens has to be a Tensor[B, N, C] (rank 3), but got shape {tuple(tokens.shape)}")
        if grid is None:
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise ShapeError(f"tokens have N={tokens.shape[1]}, not a square; pass grid=(h, w)")
            grid = (side, side)
        h, w = check_tokens(tokens, grid)
        if tokens.shape[-1] != self.in_dim:
            raise ShapeError(f"tokens have C={tokens.shape[-1]} channels, but this {type(self).__name__} was built with in_dim={self.in_dim}")
        if not tokens.is_floating_point():
            raise ShapeError(f"tokens have to be floating point, but got {tokens.dtype}")
        check_like_parameters(self, tokens=tokens)
        return h, w

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


# -- C-Abstractor blocks (timm RegStage as Honeybee configures it) ------------------------------
class _ConvNormAct(nn.Module):
    """timm ``ConvNormAct``: conv (no bias) -> LayerNorm over channels -> optional SiLU."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, groups: int = 1, act: bool = True, **kw: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=False, **kw)
        self.bn = nn.LayerNorm(out_dim, eps=1e-5, **kw)  # timm's LayerNormAct2d (the name stays `bn`)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(x)


class _SqueezeExcite(nn.Module):
    """timm ``SEModule``: channel gate ``sigmoid(fc2(SiLU(fc1(mean over space))))``."""

    def __init__(self, dim: int, reduced: int, **kw: Any) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, reduced, 1, **kw)
        self.fc2 = nn.Conv2d(reduced, dim, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _RegBlock(nn.Module):
    """timm RegNet ``Bottleneck``: 1x1 -> depthwise 3x3 -> SE -> 1x1, residual, SiLU."""

    def __init__(self, in_dim: int, out_dim: int, **kw: Any) -> None:
        super().__init__()
        # SE width: round(in * 0.25), or timm's fallback make_divisible(out / 16, 8) when that is 0
        reduced = int(round(in_dim * 0.25)) or max(8, int(out_dim / 16 + 4) // 8 * 8)
        self.conv1 = _ConvNormAct(in_dim, out_dim, 1, **kw)
        self.conv2 = _ConvNormAct(out_dim, out_dim, 3, groups=out_dim, **kw)
        self.se = _SqueezeExcite(out_dim, reduced, **kw)
        self.conv3 = _ConvNormAct(out_dim, out_dim, 1, act=False, **kw)
        self.downsample = _ConvNormAct(in_dim, out_dim, 1, act=False, **kw) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.downsample(x))


def _reg_stage(depth: int, in_dim: int, out_dim: int, **kw: Any) -> nn.Sequential:
    """timm ``RegStage``: ``depth`` blocks named ``b1, b2, ...``; the first changes the width."""
    return nn.Sequential(OrderedDict((f"b{i + 1}", _RegBlock(in_dim if i == 0 else out_dim, out_dim, **kw)) for i in range(depth)))


class CAbstractor(Compressor):
    """Honeybee's C-Abstractor: conv stages, adaptive pool to the query grid, conv stages, MLP.

    Args:
        in_dim: token width in.
        out_dim: token width out (the LLM width).
        hidden_dim: width of the conv stages (default ``in_dim``; Honeybee uses 1024).
        depth: bottleneck blocks per stage (Honeybee: 3); 0 leaves only the pooling.
        mlp_depth: layers of the read-out MLP (Linear, then ``SiLU + Linear`` ``mlp_depth - 1`` times).
        num_queries: output tokens: a square number (144 -> a 12x12 grid, as Honeybee) or a grid
            ``(h', w')``.
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, in_dim]) on any grid -> Tensor[B, h'*w', out_dim].

    Example:
        >>> abstractor = CAbstractor(in_dim=16, out_dim=32, depth=1, num_queries=9)
        >>> abstractor(torch.randn(2, 12 * 12, 16)).shape  # 144 tokens -> 3x3
        torch.Size([2, 9, 32])
        >>> abstractor.num_tokens((24, 16))
        9
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int | None = None,
        depth: int = 3,
        mlp_depth: int = 2,
        num_queries: int | Sequence[int] = 144,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim)
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("mlp_depth", mlp_depth)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise MixresError(f"depth has to be an int >= 0, but got {depth!r}")
        if isinstance(num_queries, int) and not isinstance(num_queries, bool):
            check_positive_int("num_queries", num_queries)
            side = math.isqrt(num_queries)
            if side * side != num_queries:
                raise MixresError(f"num_queries={num_queries} is not a square number; pass a grid (h', w') instead")
            self.query_grid = (side, side)
        else:
            self.query_grid = to_2tuple("num_queries", num_queries)
        self.hidden_dim, self.depth, self.mlp_depth = hidden_dim, depth, mlp_depth
        kw = dict(device=device, dtype=dtype)
        pool = nn.AdaptiveAvgPool2d(self.query_grid)
        if depth:
            self.net = nn.Sequential(_reg_stage(depth, in_dim, hidden_dim, **kw), pool, _reg_stage(depth, hidden_dim, hidden_dim, **kw))
        else:
            self.net = nn.Sequential(pool)
        width = hidden_dim if depth else in_dim
        layers: list[nn.Module] = [nn.Linear(width, out_dim, **kw)]
        for _ in range(mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(out_dim, out_dim, **kw)]
        self.readout = nn.Sequential(*layers)

    def grid_for(self, grid: int | Sequence[int]) -> tuple[int, int]:
        """The query grid, whatever the input grid (adaptive pooling)."""
        to_2tuple("grid", grid)
        return self.query_grid

    def forward(self, tokens: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """Compress; see the class docstring for shapes."""
        grid = self.check_inputs(tokens, grid)
        x = self.net(tokens_to_map(tokens, grid))
        return self.readout(map_to_tokens(x)[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dim={self.hidden_dim}, depth={self.depth}, query_grid={self.query_grid}"


# -- TokenPacker ---------------------------------------------------------------------------------
def region_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grid: Sequence[int],
    region: Sequence[int],
    num_heads: int = 1,
) -> torch.Tensor:
    """Point-to-region attention: each query attends only to the ``s_h x s_w`` region it covers.

    Plain scaled dot-product attention (``softmax(q k^T / sqrt(d)) v`` per head), no projections.

    Args:
        query (Tensor[B, h'*w', C]): one query per region, row-major on ``(h', w') = (h/s_h, w/s_w)``.
        key (Tensor[B, h*w, C]): keys on the full grid, row-major.
        value (Tensor[B, h*w, C_v]): values on the full grid.
        grid: ``(h, w)`` of ``key`` / ``value``.
        region: ``(s_h, s_w)``, dividing ``(h, w)``.
        num_heads: heads; ``C`` and ``C_v`` split evenly among them.

    Returns:
        Tensor[B, h'*w', C_v].

    Example:
        >>> q, k = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        >>> v = torch.tensor([[[1.0], [0.0]]])
        >>> region_attention(q, k, v, (1, 2), (1, 2))  # softmax([1/sqrt(2), 0]) . [1, 0]
        tensor([[[0.6698]]])
    """
    h, w = to_2tuple("grid", grid)
    sh, sw = to_2tuple("region", region)
    if h % sh or w % sw:
        raise ShapeError(f"grid {(h, w)} does not divide into {sh}x{sw} regions")
    hq, wq = h // sh, w // sw
    q = rearrange(query, "b (h w) (m d) -> (b h w) m 1 d", h=hq, w=wq, m=num_heads)
    k, v = (rearrange(t, "b (h sh w sw) (m d) -> (b h w) m (sh sw) d", h=hq, sh=sh, w=wq, sw=sw, m=num_heads) for t in (key, value))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "(b n) m 1 d -> b n (m d)", b=query.shape[0])


def _mlp2(in_dim: int, out_dim: int, **kw: Any) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim, **kw), nn.GELU(), nn.Linear(out_dim, out_dim, **kw))


class TokenPacker(Compressor):
    """TokenPacker: downsampled tokens as queries, each attending to its region of the full-res tokens.

    Args:
        in_dim: token width in (``kv_dim`` in the release).
        out_dim: token width out (the LLM width, ``hidden_size`` in the release).
        scale_factor: ``s`` (or ``(s_h, s_w)``): the grid shrinks by ``s`` per side, ``s^2`` fewer
            tokens (the release: 2; 3 and 4 ablated).
        embed_dim: attention width (default ``in_dim``; the release: 1024).
        num_heads: attention heads, dividing ``embed_dim`` (the release: 8).
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, in_dim]) with ``(h, w)`` divisible by ``s`` -> Tensor[B, (h/s)*(w/s), out_dim].

    Example:
        >>> packer = TokenPacker(in_dim=16, out_dim=32, scale_factor=2, num_heads=2)
        >>> packer(torch.randn(2, 6 * 4, 16), (6, 4)).shape  # 6x4 -> 3x2
        torch.Size([2, 6, 32])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        scale_factor: int | Sequence[int] = 2,
        embed_dim: int | None = None,
        num_heads: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim)
        embed_dim = in_dim if embed_dim is None else embed_dim
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise MixresError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.scale_factor = to_2tuple("scale_factor", scale_factor)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        kw = dict(device=device, dtype=dtype)
        self.q_proj_1 = nn.Linear(in_dim, embed_dim, bias=False, **kw)
        self.k_proj_1 = _mlp2(in_dim, embed_dim, **kw)
        self.v_proj_1 = _mlp2(in_dim, embed_dim, **kw)
        self.ln_q_1, self.ln_k_1, self.ln_v_1 = (nn.LayerNorm(embed_dim, eps=1e-6, **kw) for _ in range(3))
        self.clip_attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, **kw)
        self.mlp = _mlp2(embed_dim, out_dim, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init: linear weights trunc-normal(0.02), zero biases, LayerNorm (1, 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid_for(self, grid: int | Sequence[int]) -> tuple[int, int]:
        """``(h / s_h, w / s_w)``.

        Raises:
            ShapeError: ``(h, w)`` is not divisible by the scale factor.
        """
        h, w = to_2tuple("grid", grid)
        sh, sw = self.scale_factor
        if h % sh or w % sw:
            raise ShapeError(f"grid {(h, w)} is not divisible by scale_factor {self.scale_factor}; crop or resample the tokens")
        return h // sh, w // sw

    def forward(self, tokens: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """Compress; see the class docstring for shapes."""
        grid = self.check_inputs(tokens, grid)
        query_grid = self.grid_for(grid)
        small = F.interpolate(tokens_to_map(tokens, grid).float(), size=query_grid, mode="bilinear", align_corners=False)
        query = self.ln_q_1(self.q_proj_1(map_to_tokens(small.to(tokens.dtype))[0]))
        key = self.ln_k_1(self.k_proj_1(tokens))
        value = self.ln_v_1(self.v_proj_1(tokens))
        w_q, w_k, w_v = self.clip_attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.clip_attn.in_proj_bias.chunk(3)
        out = region_attention(
            F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v),
            grid, self.scale_factor, self.num_heads,
        )
        return self.mlp(self.clip_attn.out_proj(out))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_factor={self.scale_factor}, embed_dim={self.embed_dim}, num_heads={self.num_heads}"


register_projector("c_abstractor")(CAbstractor)
register_projector("tokenpacker")(TokenPacker)
# source configurations: Honeybee-C-7B (ViT-L/14 576 tokens -> 144), TokenPacker at 2x (576 -> 144)
register_projector_preset("c_abstractor_honeybee", {"name": "c_abstractor", "hidden_dim": 1024, "depth": 3, "num_queries": 144})
register_projector_preset("tokenpacker_2x", {"name": "tokenpacker", "embed_dim": 1024, "num_heads": 8, "scale_factor": 2})
