"""``qwen2_5_vl``: what :func:`~mixres.integrations.hf.mrify` changes in Qwen2.5-VL.

``Qwen2_5_VLForConditionalGeneration`` reads every image at its own size: the processor's
``smart_resize`` picks sides that are multiples of 28 within ``min_pixels`` / ``max_pixels``, the
ViT (14-px patches, 2D rotary, window attention with a few full-attention blocks, all images of a
batch packed in one sequence) runs, and its 2x2 merger gives ``h * w / 4`` LLM tokens per image.

mrify keeps all of that for the **ViT view** (the budget, the processor's ``<|image_pad|>``
expansion, ``image_grid_thw`` and the LLM's 3D positions are Qwen's own) and adds, per image, a
**high-res view** ``k`` times its sides (``high_res_scale``) read by a CNN, fused into the ViT's
stream between its blocks by MR-Adapters (after blocks L/4, L/2, 3L/4 by default), each image's
tokens gathered into its ``(h, w)`` grid and back (:mod:`mixres.pathways.hf_qwen2_5_vl`,
:class:`~mixres.encoders.packed.PackedDualPathwayEncoder`). The merger and the LLM are untouched.
At the same pixels read, the LLM sees ``k**2`` fewer visual tokens than Qwen reading them itself.

The model becomes a :class:`~mixres.integrations.hf.qwen_tower.MixresQwen2_5_VLForConditionalGeneration`
(Qwen builds its ViT class from the config; the mrified class is registered with the Auto
classes, so ``save_pretrained`` / :func:`~mixres.integrations.hf.load_pretrained` round-trip) and
the processor's image processor a :class:`~mixres.integrations.hf.qwen_processor.MixresQwen2VLImageProcessor`.

Qwen3-VL is not covered: its ViT has learned, interpolated position embeddings (no window
attention) and DeepStack features taken from intermediate blocks into the LLM's layers, which an
adapter between blocks would change; the pathway here does not model either.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from transformers import Qwen2_5_VisionTransformerPretrainedModel

import mixres
from mixres.encoders.packed import PackedDualPathwayEncoder
from mixres.pathways import load_into

from .errors import UnsupportedModelError
from .families import Family, vit_config_kwargs
from .qwen_processor import MixresQwen2VLImageProcessor
from .qwen_tower import (
    MixresQwen2_5_VisionModel,
    MixresQwen2_5_VLConfig,
    MixresQwen2_5_VLForConditionalGeneration,
    MixresQwen2_5_VLModel,
    MixresQwen2_5_VLVisionConfig,
)

__all__ = ["Qwen2_5_VLFamily", "QWEN2_5_VL", "DEFAULT_HIGH_RES_SCALE"]

#: ``k``: the high-res view's sides over the ViT view's. LLaVA-HR's ratio (1024 px CNN / 448 px ViT):
#: the CNN's stride-32 map then has exactly the ViT's 14-px grid; ``k**2`` ~ 5.2x fewer LLM tokens
#: than Qwen reading the same pixels itself
DEFAULT_HIGH_RES_SCALE = 32 / 14


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1:
        raise UnsupportedModelError(f"high_res_scale has to be a number >= 1 (the high-res view's sides over the ViT's), but got {scale!r}")
    return float(scale)


class Qwen2_5_VLFamily(Family):
    """Qwen2.5-VL: its own packed ViT + a high-res CNN per image; mrify is this family's own (:meth:`mrify`)."""

    def mrify(self, model: Any, *, map_pathway: Any, fusion: Any, positions: Sequence[int] | None,
              final_fusion: Any, processor: Any, high_res_scale: float | None) -> tuple[Any, Any]:
        """Put MRA into a ``Qwen2_5_VLForConditionalGeneration`` (in place); arguments as :func:`~mixres.integrations.hf.mrify`.

        Raises:
            UnsupportedModelError: a tower that is not Qwen's ViT (e.g. mrified already), a bad ``high_res_scale``,
                a final fusion that changes the width.
        """
        from .mrify import _final_fusion, _fusion_config, default_positions, map_pathway_config

        scale = _check_scale(DEFAULT_HIGH_RES_SCALE if high_res_scale is None else high_res_scale)
        tower = model.model.visual
        if not isinstance(tower, Qwen2_5_VisionTransformerPretrainedModel):
            raise UnsupportedModelError(f"the model's vision tower is a {type(tower).__name__}; mrify needs Qwen2.5-VL's own ViT "
                                        "(Qwen2_5_VisionTransformerPretrainedModel), as in a model that is not mrified yet")
        pathway = mixres.build({"kind": "pathway", "name": "hf_qwen2_5_vl", "config": vit_config_kwargs(tower.config)})
        load_into(pathway.model, tower.state_dict(), f"the model's vision tower ({type(tower).__name__})")
        fusion_cfg = _fusion_config(fusion, "fusion")
        blocks = default_positions(pathway.num_blocks) if positions is None else list(positions)
        encoder = PackedDualPathwayEncoder(
            token_pathway=pathway, map_pathway=mixres.build(map_pathway_config(map_pathway)),
            injections=[{"after_block": k, "fusion": dict(fusion_cfg)} for k in blocks],
            final_fusion=_final_fusion(final_fusion, pathway.dim))
        reference = next(tower.parameters())
        encoder = encoder.to(device=reference.device, dtype=reference.dtype)
        vision_config = MixresQwen2_5_VLVisionConfig(**vit_config_kwargs(tower.config), encoder=encoder.config,
                                                     high_res_scale=scale, high_res_stride=encoder.stride)
        model.model.visual = MixresQwen2_5_VisionModel(vision_config, encoder=encoder)
        self._become_mixres(model, vision_config)
        if processor is not None:
            processor = self.update_processor_for(processor, vision_config)
        return model, processor

    @staticmethod
    def _become_mixres(model: Any, vision_config: MixresQwen2_5_VLVisionConfig) -> None:
        data = model.config.to_dict()
        data.pop("model_type", None)
        data["vision_config"] = vision_config
        config = MixresQwen2_5_VLConfig(**data)
        model.__class__, model.model.__class__ = MixresQwen2_5_VLForConditionalGeneration, MixresQwen2_5_VLModel
        model.config = model.model.config = config

    @staticmethod
    def update_processor_for(processor: Any, vision_config: MixresQwen2_5_VLVisionConfig) -> Any:
        """A copy of ``processor`` whose image processor also emits the high-res views (same ViT budget)."""
        processor = copy.deepcopy(processor)
        settings = {k: v for k, v in processor.image_processor.to_dict().items() if k != "image_processor_type"}
        settings.update(high_res_scale=vision_config.high_res_scale, high_res_stride=vision_config.high_res_stride)
        processor.image_processor = MixresQwen2VLImageProcessor(**settings)
        return processor


QWEN2_5_VL = Qwen2_5_VLFamily("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), square_pad=False, vision_attr="visual")

