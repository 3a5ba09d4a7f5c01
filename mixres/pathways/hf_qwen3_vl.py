"""Qwen3-VL's own ViT as a packed token pathway: ``hf_qwen3_vl``.

Source: ``Qwen3VLVisionModel`` (transformers ``models/qwen3_vl/modeling_qwen3_vl.py``). It differs
from Qwen2.5-VL's ViT (:mod:`mixres.pathways.hf_qwen2_5_vl`, whose contract and packed layout this
pathway shares) in three ways, each covered here:

- 16-px patches (the processor's unit is 32 px) and a learned ``pos_embed`` table added after the
  patch embedding, resampled to each image's grid by the source's own bilinear indices and weights
  (``get_vision_interpolation_indices_and_weights``), besides the 2D rotary positions;
- no window attention: every block attends within each image, and the stream stays in the
  processor's merge-block order (the layout's ``window_index`` is the identity);
- **DeepStack**: the stream after each block in ``deepstack_visual_indexes`` goes through its own
  merger (``deepstack_merger_list``) into early LLM layers. ``run_blocks`` keeps those streams in
  ``layout.taps`` and :meth:`HFQwen3VLPathway.deepstack` merges them. In an encoder they are taken
  where the source takes them: after that block, before a fusion placed right after it.

Weights: as ``hf_qwen2_5_vl``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._utils import lazy_import
from ..registry import register_pathway
from .hf_qwen2_5_vl import HFQwen2_5_VLPathway, PackedLayout

__all__ = ["HFQwen3VLPathway"]


class HFQwen3VLPathway(HFQwen2_5_VLPathway):
    """transformers ``Qwen3VLVisionModel`` as a packed token pathway (``hf_qwen3_vl``).

    Arguments as :class:`~mixres.pathways.hf_qwen2_5_vl.HFQwen2_5_VLPathway` (``config`` takes
    ``Qwen3VLVisionConfig`` keyword arguments).

    Example:
        >>> from mixres.pathways.hf_qwen2_5_vl import patchify
        >>> vit = HFQwen3VLPathway(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
        ...                             num_position_embeddings=16, deepstack_visual_indexes=[0]))
        >>> x, layout = vit(patchify(torch.randn(1, 3, 64, 96), patch_size=16), torch.tensor([[1, 4, 6]]))
        >>> x.shape, vit.merge(x, layout).shape, [f.shape for f in vit.deepstack(layout)]
        (torch.Size([24, 32]), torch.Size([6, 48]), [torch.Size([6, 48])])
    """

    _model_class = "Qwen3VLVisionModel"
    _config_class = "Qwen3VLVisionConfig"

    def __init__(self, config: dict[str, Any] | None = None, weights: str | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(config, weights, device=device, dtype=dtype)
        self.tap_blocks = tuple(int(i) for i in self.model.config.deepstack_visual_indexes)

    def _windows(self, grid_thw: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(int(grid_thw.prod(-1).sum()) // self.merge_size**2), cu_seqlens  # no windows

    def _add_positions(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        vision, m = lazy_import("transformers.vision_utils"), self.model
        index, weight = vision.get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=m.num_grid_per_side, mode=m.interpolation_mode,
            align_corners=m.interpolation_align_corners, spatial_merge_size=m.config.spatial_merge_size)
        pos = (m.pos_embed(index.to(x.device)) * weight.to(x.device)[:, :, None]).sum(1)
        return x + pos.to(x.dtype)

    def deepstack(self, layout: PackedLayout) -> list[torch.Tensor]:
        """DeepStack features: each tapped stream through its merger, Tensor[S / m**2, out_dim] each."""
        return [merger(layout.taps[i]) for i, merger in zip(self.tap_blocks, self.model.deepstack_merger_list)]


register_pathway("hf_qwen3_vl")(HFQwen3VLPathway)
