"""Patch info mining: each low-res token attends to the high-res pixels of its own patch.

Source: Li et al., "Mini-Gemini: Mining the Potential of Multi-modality Vision Language
Models", arXiv 2403.18814, Sec. 3.2 "Patch Info Mining", Eq. 1; released as
``unified_resampler`` and the ``vlm_uni_{query,aux,val}_projector`` modules in
``mgm/model/mgm_arch.py`` of github.com/dvlab-research/MGM.

Paper (Eq. 1), with ``Q = X'_L`` the ``N`` low-res tokens and ``K = V = X'_H`` the ``N x M^2``
high-res candidates (the ``M x M`` map pixels under each token)::

    T_V = MLP(Q + Softmax(phi(Q) phi(K)^T) phi(V))

``phi`` is ``LayerNorm -> Linear`` (one per role); the softmax runs over the ``M^2`` pixels of
each token's own window only, with the scale ``1 / sqrt(C_l)``. ``MLP`` is the usual projector to
the LLM, which mixres keeps outside the fusion (a projector), so this module returns
``Q + Softmax(...) phi(V)``, as the release's ``unified_resampler`` does.

Where we differ from the release:

- the release assumes a square grid and a map side that is an exact multiple of it; here the
  window is ``(p1, p2) = (round(H / h), round(W / w))`` (at least 1) and the map is resampled to
  ``(p1 * h, p2 * w)`` first (:func:`mixres.grid.resample`) when it is not already, so any
  ``(h, w)`` and ``(H, W)`` work. Nothing is masked;
- ``num_heads`` (default 1, the release) splits the attention into heads;
- ``zero_init=True`` zeroes the value projection. Each output is a convex combination of value
  rows, so the mined term is exactly 0 and the fusion is the identity at init. The release
  (and the default here) keeps PyTorch's default ``nn.Linear`` / ``nn.LayerNorm`` init.

The key projection's biases (its LayerNorm's and Linear's) shift every score of a query by one
amount, which the softmax ignores: they get no gradient. They stay for the release's layout.

Release names map onto ours by :data:`OFFICIAL_KEYS` (``vlm_uni_query_projector -> q_proj``,
``vlm_uni_aux_projector -> k_proj``, ``vlm_uni_val_projector -> v_proj``).

The window helpers :func:`window_grid`, :func:`gather_windows` and :func:`window_attention` are
shared with :mod:`mixres.fusions.sva`.

Shapes: ``tokens (Tensor[B, h*w, C_l])``, ``map (Tensor[B, C_h, H, W])`` -> ``Tensor[B, h*w, C_l]``.
Parameters: ``C_l^2 + 2 C_h C_l + 5 C_l + 4 C_h``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._utils import check_positive_int, to_2tuple
from ..errors import MixresError, ShapeError
from ..grid import resample
from ..registry import register_fusion, register_fusion_preset
from .base import Fusion

__all__ = ["PatchMining", "window_grid", "gather_windows", "window_attention", "OFFICIAL_KEYS"]

# release name -> mixres name (module prefixes of MGM's patch-info-mining projectors)
OFFICIAL_KEYS: dict[str, str] = {
    "vlm_uni_query_projector": "q_proj",
    "vlm_uni_aux_projector": "k_proj",
    "vlm_uni_val_projector": "v_proj",
}


def window_grid(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The window ``(p1, p2)`` that a map of ``size (H, W)`` gets under each cell of ``grid (h, w)``.

    Each side is the nearest whole multiple, at least 1: ``p1 = max(1, round(H / h))``.

    Example:
        >>> window_grid((192, 192), (24, 24)), window_grid((27, 40), (24, 12))
        ((8, 8), (1, 3))
    """
    (big_h, big_w), (h, w) = to_2tuple("size", size), to_2tuple("grid", grid)
    return max(1, (2 * big_h + h) // (2 * h)), max(1, (2 * big_w + w) // (2 * w))


def gather_windows(map: torch.Tensor, grid: tuple[int, int], *, align_corners: bool = True) -> torch.Tensor:
    """Cut a map into one ``p1 x p2`` window per grid cell (resampling it first if needed).

    Args:
        map (Tensor[B, C, H, W]): the high-res map.
        grid: ``(h, w)``, the token grid.
        align_corners: for bilinear up-sampling when the map is resized.

    Returns:
        Tensor[B, h*w, p1*p2, C], windows in row-major grid order, pixels row-major inside each
        window; ``(p1, p2) = window_grid((H, W), grid)``.

    Example:
        >>> gather_windows(torch.zeros(2, 5, 8, 6), (4, 3)).shape  # 2x2 windows
        torch.Size([2, 12, 4, 5])
        >>> gather_windows(torch.zeros(2, 5, 9, 7), (4, 3)).shape  # resized to 8x6 first
        torch.Size([2, 12, 4, 5])
    """
    h, w = to_2tuple("grid", grid)
    p1, p2 = window_grid((int(map.shape[2]), int(map.shape[3])), (h, w))
    map = resample(map, (p1 * h, p2 * w), align_corners=align_corners)
    return rearrange(map, "b c (h p1) (w p2) -> b (h w) (p1 p2) c", h=h, w=w)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int = 1) -> torch.Tensor:
    """Each query attends to its own ``K`` keys: ``softmax(q k^T / sqrt(d)) v`` per query and head.

    Args:
        q (Tensor[B, N, D]): one query per window.
        k (Tensor[B, N, K, D]): the keys of each query's window.
        v (Tensor[B, N, K, Dv]): the values of each query's window.
        num_heads: heads; must divide ``D`` and ``Dv``; ``d = D / num_heads``.

    Returns:
        Tensor[B, N, Dv].

    Example:
        >>> q, kv = torch.randn(2, 6, 8), torch.randn(2, 6, 4, 8)
        >>> window_attention(q, kv, kv, num_heads=2).shape
        torch.Size([2, 6, 8])
    """
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ShapeError(
            f"window_attention needs q Tensor[B, N, D], k Tensor[B, N, K, D], v Tensor[B, N, K, Dv], "
            f"but got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % num_heads or v.shape[-1] % num_heads:
        raise ShapeError(
            f"q and k need one width D divisible by num_heads={num_heads} (and Dv too), "
            f"but got D={q.shape[-1]}, {k.shape[-1]} and Dv={v.shape[-1]}"
        )
    q = rearrange(q, "b n (m d) -> b n m 1 d", m=num_heads)
    k, v = (rearrange(t, "b n k (m d) -> b n m k d", m=num_heads) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b n m 1 d -> b n (m d)")


def _norm_linear(in_dim: int, out_dim: int, bias: bool = True, **kw: object) -> nn.Sequential:
    """``phi``: LayerNorm then Linear (shared with sva.py)."""
    return nn.Sequential(nn.LayerNorm(in_dim, **kw), nn.Linear(in_dim, out_dim, bias=bias, **kw))


class PatchMining(Fusion):
    """Mini-Gemini patch info mining: every token attends to the map pixels of its own patch.

    Args:
        low_dim: ``C_l``, the token width (queries, output).
        high_dim: ``C_h``, the map width (keys, values).
        num_heads: attention heads (1 in the release); must divide ``low_dim``.
        zero_init: zero the value projection, so the fusion is the identity at init (the
            release does not; see the module docstring).
        align_corners: for the bilinear up-sampling of a map smaller than the grid.
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, C_l]), grid (h, w), map (Tensor[B, C_h, H, W]) ->
        Tensor[B, h*w, C_l]. Windows are ``round(H / h) x round(W / w)`` map pixels.

    Example:
        >>> mining = PatchMining(low_dim=16, high_dim=24, zero_init=True)
        >>> tokens, map = torch.randn(2, 3 * 4, 16), torch.randn(2, 24, 6, 8)  # 2x2 windows
        >>> out = mining(tokens, (3, 4), map)
        >>> out.shape, torch.equal(out, tokens)  # the identity at init
        (torch.Size([2, 12, 16]), True)
    """

    def __init__(
        self,
        low_dim: int,
        high_dim: int,
        *,
        num_heads: int = 1,
        zero_init: bool = False,
        align_corners: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(low_dim, high_dim)
        check_positive_int("num_heads", num_heads)
        if low_dim % num_heads:
            raise MixresError(f"num_heads has to divide low_dim={low_dim}, but got num_heads={num_heads}")
        kw = dict(device=device, dtype=dtype)
        self.num_heads, self.zero_init, self.align_corners = num_heads, zero_init, align_corners
        self.q_proj = _norm_linear(low_dim, low_dim, **kw)
        self.k_proj = _norm_linear(high_dim, low_dim, **kw)
        self.v_proj = _norm_linear(high_dim, low_dim, **kw)
        if zero_init:
            nn.init.zeros_(self.v_proj[1].weight)
            nn.init.zeros_(self.v_proj[1].bias)

    def mine(self, tokens: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """``Softmax(phi(Q) phi(K)^T) phi(V)`` of Eq. 1 over each token's window: Tensor[B, N, C_l]."""
        return window_attention(self.q_proj(tokens), self.k_proj(windows), self.v_proj(windows), self.num_heads)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], map: torch.Tensor) -> torch.Tensor:
        """Fuse; see the class docstring for shapes."""
        grid = self.check_inputs(tokens, grid, map)
        windows = gather_windows(map, grid, align_corners=self.align_corners)
        return tokens + self.mine(tokens, windows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_heads={self.num_heads}, zero_init={self.zero_init}"


register_fusion("patch_mining")(PatchMining)
# Mini-Gemini 7B/13B at 768 px (scripts/llama/train/stage_1_2_full_v7b_336_hr_768.sh): CLIP ViT-L/14-336
# tokens (24x24, 1024-d); ConvNeXt-L (open_clip convnext_large_d_320) stages 0-3 concatenated at the
# stage-0 resolution (openclip_encoder.py): 192+384+768+1536 = 2880 channels at 768/4 = 192x192, P = 8.
register_fusion_preset("patch_mining_mgm", {"name": "patch_mining", "low_dim": 1024, "high_dim": 2880})
