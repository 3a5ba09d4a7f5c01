"""S2Encoder: one token pathway run at several image sizes, features stacked channel-wise.

Source: Shi et al., "When Do We Not Need Larger Vision Models?", arXiv 2403.13984, Sec. 2;
``s2wrapper/core.py`` of github.com/bfshi/scaling_on_scales, as used by LLaVA-1.5-S2
(``s2_scales="336,672,1008"``, split size = the first scale, the ViT's native size). The math
is :func:`mixres.multiscale.s2_forward`; this module stores the pathway and the policy and
answers token counts without running anything.

Where we differ: the pathway runs on every sub-image and its tokens are laid out on its own
grid (``(tokens, grid)``), so non-square native sizes work; the release assumes a square grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._utils import check_choice, to_2tuple
from ..errors import MixresError
from ..grid import map_to_tokens, tokens_to_map
from ..multiscale import S2_MERGES, S2Merge, check_scales, num_splits, s2_forward
from ..pathways.base import TokenPathway, check_images
from ..pathways.hf import CLIP_VIT_L_14_336
from ..registry import build_if_config, register_encoder, register_encoder_preset
from .base import Encoder

__all__ = ["S2Encoder"]


class S2Encoder(Encoder):
    """Run a token pathway at several image sizes (chessboard-split) and stack the features.

    Args:
        pathway: the token pathway (a registered ``TokenPathway``, its config dict or its name).
        scales: image sizes in pixels, an int or ``(h, w)`` each, e.g. ``[336, 672, 1008]``; each a
            multiple of ``split_size``.
        split_size: the sub-image size fed to the pathway (int or ``(h, w)``); default the
            pathway's native ``image_size``.
        merge: ``"concat"`` (S2: ``out_dim = dim * len(scales)``) or ``"sum"`` (``out_dim = dim``).
        resize_output_to_scale_idx: the scale whose grid is the output grid (0: the first scale).

    Attributes:
        image_size: the largest scale, the size LLaVA-S2 feeds (any size works).

    Shape:
        images (Tensor[B, 3, H, W]) of any size (each scale resizes them; LLaVA-S2 feeds the largest)
        -> ``(tokens (Tensor[B, h*w, out_dim]), (h, w))`` with ``(h, w) = grid_for(...)``, the same
        for every input size.

    Example:
        >>> from mixres.pathways.patchify import PatchifyPathway as Patchify  # a zero-block ViT
        >>> enc = S2Encoder(Patchify(), scales=[16, 32])  # 1 + 4 sub-images of 16 px
        >>> tokens, grid = enc(torch.randn(2, 3, 32, 32))
        >>> tokens.shape, grid, enc.out_dim, enc.num_tokens(1000)
        (torch.Size([2, 16, 16]), (4, 4), 16, 16)
    """

    def __init__(
        self,
        pathway: TokenPathway | Mapping[str, Any] | str,
        scales: Sequence[int | Sequence[int]],
        split_size: int | Sequence[int] | None = None,
        merge: S2Merge = "concat",
        resize_output_to_scale_idx: int = 0,
    ) -> None:
        super().__init__()
        self.pathway = build_if_config(pathway, "pathway", "pathway")
        if not isinstance(self.pathway, TokenPathway):
            raise TypeError(f"S2Encoder wraps a TokenPathway, but got a {type(self.pathway).__name__}")
        check_choice("merge", merge, S2_MERGES)
        self.scales = check_scales(scales)
        split = self.pathway.image_size if split_size is None else split_size
        self.split_size = to_2tuple("split_size", split)
        self.num_splits = [num_splits(s, self.split_size, f"scales[{i}]") for i, s in enumerate(self.scales)]
        if isinstance(resize_output_to_scale_idx, bool) or not isinstance(resize_output_to_scale_idx, int) \
                or not -len(self.scales) <= resize_output_to_scale_idx < len(self.scales):
            raise MixresError(
                f"resize_output_to_scale_idx has to index one of {len(self.scales)} scales, but got {resize_output_to_scale_idx!r}"
            )
        self.merge, self.resize_output_to_scale_idx = merge, resize_output_to_scale_idx
        self.tile_grid = self.pathway.grid_for(self.split_size)
        nh, nw = self.num_splits[resize_output_to_scale_idx]
        self.grid = (nh * self.tile_grid[0], nw * self.tile_grid[1])
        self.out_dim = self.pathway.dim * (len(self.scales) if merge == "concat" else 1)
        self.image_size = max(self.scales, key=lambda size: size[0] * size[1])  # LLaVA-S2 feeds the largest

    def _tile_map(self, tiles: torch.Tensor) -> torch.Tensor:
        """The pathway on a batch of sub-images, as a map ``Tensor[b, dim, h, w]``."""
        tokens, grid = self.pathway(tiles)
        return tokens_to_map(tokens, grid)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encode; see the class docstring for shapes."""
        check_images(images)
        out = s2_forward(
            self._tile_map, images, self.scales, self.split_size,
            self.resize_output_to_scale_idx, output_shape="bchw", merge=self.merge,
        )
        return map_to_tokens(out)

    def parts(self) -> dict[str, torch.nn.Module]:
        """``token_pathway``: the one pathway run at every scale."""
        return {"token_pathway": self.pathway}

    def grid_for(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """The output grid: the merged grid of the output scale, whatever ``image_size`` is."""
        to_2tuple("image_size", tuple(image_size) if not isinstance(image_size, int) else image_size)
        return self.grid

    def extra_repr(self) -> str:
        return (
            f"scales={self.scales}, split_size={self.split_size}, merge={self.merge!r}, "
            f"grid={self.grid}, out_dim={self.out_dim}"
        )


register_encoder("s2")(S2Encoder)
# LLaVA-S2 (the S2 paper's LLaVA-1.5 setting): CLIP ViT-L/14-336 at 336 / 672 / 1008 px, tiles of 336
register_encoder_preset(
    "llava-s2-1008",
    {
        "name": "s2",
        "pathway": {"kind": "pathway", "name": "hf_clip", "config": CLIP_VIT_L_14_336, "select_layer": -2, "drop_prefix": False},
        "scales": [336, 672, 1008],
    },
)
