"""``patchify``: a token pathway with no transformer blocks, only a patch-embedding convolution.

Not from a paper: a zero-block ViT. It is patch-local (each token sees only its own patch), which
makes it the reference model for exact properties (an S2 chessboard split equals the unsplit
run; AnyRes tiles equal crops), a stand-in ViT for tests and docs that builds in microseconds,
and the "no transformer" baseline of an ablation. No position embedding, no prefix tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from .._utils import check_positive_int, to_2tuple
from ..registry import register_pathway
from .base import TokenPathway, check_images

__all__ = ["PatchifyPathway"]


class PatchifyPathway(TokenPathway):
    """A patch-embedding convolution as a token pathway (``patchify``).

    Args:
        dim: token width ``C``.
        patch_size: pixels per patch side (the conv's kernel and stride).
        image_size: the nominal input size ``(H, W)`` (or one int); any multiple of the patch works.
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        images (Tensor[B, 3, H, W]) -> (tokens (Tensor[B, (H/p)*(W/p), dim]), (H/p, W/p)).

    Example:
        >>> vit = PatchifyPathway(dim=8, patch_size=4, image_size=16)
        >>> tokens, grid = vit(torch.randn(2, 3, 16, 24))
        >>> tokens.shape, grid, vit.num_blocks
        (torch.Size([2, 24, 8]), (4, 6), 0)
    """

    def __init__(
        self,
        dim: int = 8,
        patch_size: int = 4,
        image_size: int | Sequence[int] = 16,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("patch_size", patch_size)
        self.dim, self.patch_size = dim, patch_size
        self.image_size = to_2tuple("image_size", image_size if isinstance(image_size, int) else tuple(image_size))
        self.num_blocks, self.num_prefix_tokens, self.select_layer = 0, 0, -1
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size, device=device, dtype=dtype)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify: ``(x (Tensor[B, h*w, dim]), (h, w))``."""
        check_images(images, self.patch_size, module=self)
        x = self.proj(images.to(self.proj.weight.dtype))
        return rearrange(x, "b c h w -> b (h w) c"), (int(x.shape[-2]), int(x.shape[-1]))

    def run_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """No blocks: returns ``x``."""
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, patch_size={self.patch_size}, image_size={self.image_size}"


register_pathway("patchify")(PatchifyPathway)
