"""Tanh-gated cross-attention: tokens attend to every pixel of the high-res map.

Sources:

- Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning", arXiv 2204.14198,
  Sec. 2.2 and Fig. 4 (``GATED XATTN-DENSE``): a cross-attention and a dense block, each added
  through a ``tanh(alpha)`` gate with ``alpha`` initialised at 0, so the frozen stream is
  unchanged at init. Public re-implementation: ``GatedCrossAttentionBlock`` /
  ``MaskedCrossAttention`` in ``open_flamingo/src/helpers.py`` of github.com/mlfoundations/open_flamingo.
- Hong et al., "CogAgent: A Visual Language Model for GUI Agents", arXiv 2312.08914, the
  high-resolution cross-module: the decoder's hidden states (4096-d) attend to the 1120 px
  EVA2-CLIP-L features (80x80 = 6400 tokens, 1024-d) through a narrow attention (1024 wide, 32
  heads of 32); released as ``CrossAttention`` in ``modeling_cogagent.py`` of the
  ``THUDM/cogagent-chat-hf`` model repository.

Block, with ``X`` the tokens and ``Y`` the map flattened to ``H*W`` tokens::

    X = X + tanh(alpha_attn)  * W_o Attn(W_q LN(X), W_k Y, W_v Y)
    X = X + tanh(alpha_dense) * FFW(LN(X))          (optional: ffn=True)

``Attn`` is multi-head scaled dot-product attention over all ``H*W`` map tokens; ``W_*`` have no
biases (Flamingo and CogAgent); ``FFW`` is ``Linear(C_l, r C_l) -> GELU -> Linear(r C_l, C_l)``.

Where we differ: CogAgent adds its cross-attention without a gate (it trains from a pretrained
VLM); here both blocks are gated as in Flamingo, so the fusion is exactly the identity at init.
The map gets no position embedding here: the keys carry whatever position the map pathway put
in its features (CogAgent's EVA2-CLIP features do). No masks: every token sees every pixel.

Shapes: ``tokens (Tensor[B, h*w, C_l])``, ``map (Tensor[B, C_h, H, W])`` -> ``Tensor[B, h*w, C_l]``.
Parameters (``D = attn_dim``): ``2 C_l D + 2 C_h D + 2 C_l + 1``, plus ``2 r C_l^2 + 2 C_l + 1``
with the FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._utils import check_finite_positive, check_positive_int
from ..errors import MixresError, ShapeError
from ..grid import map_to_tokens
from ..registry import register_fusion, register_fusion_preset
from .base import Fusion

__all__ = ["GatedCrossAttention", "cross_attention"]


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int = 1) -> torch.Tensor:
    """Multi-head ``softmax(q k^T / sqrt(d)) v``: every query sees every key.

    Args:
        q (Tensor[B, N, D]): queries.
        k (Tensor[B, M, D]): keys.
        v (Tensor[B, M, Dv]): values.
        num_heads: heads; must divide ``D`` and ``Dv``; ``d = D / num_heads``.

    Returns:
        Tensor[B, N, Dv].

    Example:
        >>> q, kv = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
        >>> cross_attention(q, kv, kv, num_heads=4).shape
        torch.Size([2, 5, 8])
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
        raise ShapeError(
            f"cross_attention needs q Tensor[B, N, D], k Tensor[B, M, D], v Tensor[B, M, Dv], "
            f"but got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % num_heads or v.shape[-1] % num_heads:
        raise ShapeError(
            f"q and k need one width D divisible by num_heads={num_heads} (and Dv too), "
            f"but got D={q.shape[-1]}, {k.shape[-1]} and Dv={v.shape[-1]}"
        )
    q, k, v = (rearrange(t, "b n (m d) -> b m n d", m=num_heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b m n d -> b n (m d)")


class GatedCrossAttention(Fusion):
    """Flamingo-style tanh-gated cross-attention from the tokens to all map pixels.

    Args:
        low_dim: ``C_l``, the token width (queries, output).
        high_dim: ``C_h``, the map width (keys, values).
        num_heads: attention heads; must divide ``attn_dim``.
        attn_dim: ``D``, the width of queries, keys and values (default ``C_l``; CogAgent 1024).
        ffn: add the gated dense block (Flamingo's ``GATED XATTN-DENSE``); CogAgent has none.
        mlp_ratio: ``r``, the FFN's hidden width over ``C_l`` (4 in Flamingo).
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, C_l]), grid (h, w), map (Tensor[B, C_h, H, W]) ->
        Tensor[B, h*w, C_l]. Any map size; the attention costs ``O(h w H W)``.

    Example:
        >>> xattn = GatedCrossAttention(low_dim=16, high_dim=8, num_heads=4)
        >>> tokens, map = torch.randn(2, 3 * 5, 16), torch.randn(2, 8, 7, 6)
        >>> out = xattn(tokens, (3, 5), map)
        >>> out.shape, torch.equal(out, tokens)  # tanh(0) = 0: the identity at init
        (torch.Size([2, 15, 16]), True)
    """

    def __init__(
        self,
        low_dim: int,
        high_dim: int,
        *,
        num_heads: int = 1,
        attn_dim: int | None = None,
        ffn: bool = True,
        mlp_ratio: float = 4.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(low_dim, high_dim)
        self.attn_dim = low_dim if attn_dim is None else attn_dim
        check_positive_int("attn_dim", self.attn_dim)
        check_positive_int("num_heads", num_heads)
        if self.attn_dim % num_heads:
            raise MixresError(f"num_heads has to divide attn_dim={self.attn_dim}, but got num_heads={num_heads}")
        check_finite_positive("mlp_ratio", mlp_ratio)
        if int(mlp_ratio * low_dim) < 1:
            raise MixresError(f"mlp_ratio has to be a number with mlp_ratio * low_dim >= 1, but got {mlp_ratio!r}")
        kw = dict(device=device, dtype=dtype)
        d = self.attn_dim
        self.num_heads, self.use_ffn, self.mlp_ratio = num_heads, ffn, mlp_ratio
        self.norm = nn.LayerNorm(low_dim, **kw)
        self.q_proj = nn.Linear(low_dim, d, bias=False, **kw)
        self.k_proj = nn.Linear(high_dim, d, bias=False, **kw)
        self.v_proj = nn.Linear(high_dim, d, bias=False, **kw)
        self.out_proj = nn.Linear(d, low_dim, bias=False, **kw)
        self.attn_gate = nn.Parameter(torch.zeros(1, **kw))
        self.ffn = self.ffn_gate = None
        if ffn:
            hidden = int(mlp_ratio * low_dim)
            self.ffn = nn.Sequential(
                nn.LayerNorm(low_dim, **kw),
                nn.Linear(low_dim, hidden, bias=False, **kw),
                nn.GELU(),
                nn.Linear(hidden, low_dim, bias=False, **kw),
            )
            self.ffn_gate = nn.Parameter(torch.zeros(1, **kw))

    def attend(self, tokens: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``W_o Attn(W_q LN(X), W_k Y, W_v Y)`` before the gate: Tensor[B, N, C_l]."""
        out = cross_attention(self.q_proj(self.norm(tokens)), self.k_proj(high), self.v_proj(high), self.num_heads)
        return self.out_proj(out)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], map: torch.Tensor) -> torch.Tensor:
        """Fuse; see the class docstring for shapes."""
        self.check_inputs(tokens, grid, map)
        high = map_to_tokens(map)[0]
        x = tokens + torch.tanh(self.attn_gate) * self.attend(tokens, high)
        if self.ffn is not None:
            x = x + torch.tanh(self.ffn_gate) * self.ffn(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_heads={self.num_heads}, attn_dim={self.attn_dim}, "
            f"ffn={self.use_ffn}, mlp_ratio={self.mlp_ratio}"
        )


register_fusion("gated_xattn")(GatedCrossAttention)
# CogAgent-18B (CogAgentConfig): hidden_size 4096, cross_hidden_size 1024 (EVA2-CLIP-L at 1120 px,
# patch 14 -> 80x80), cross_compute_hidden_size 1024, num_attention_heads 32; the low-res branch
# (EVA2-CLIP-E at 224 px) gives 16x16 = 256 image tokens. No dense block in the cross-module.
register_fusion_preset(
    "gated_xattn_cogagent",
    {"name": "gated_xattn", "low_dim": 4096, "high_dim": 1024, "num_heads": 32, "attn_dim": 1024, "ffn": False},
)
