"""``qwen2_5_vl`` / ``qwen3_vl``: what :func:`~mixres.integrations.hf.mrify` changes in Qwen2.5-VL and Qwen3-VL.

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

**Qwen3-VL** (``qwen3_vl``, ``Qwen3VLForConditionalGeneration``) is covered the same way: its ViT
(the ``hf_qwen3_vl`` pathway: 16-px patches, a learned position table resampled per image, no
window attention, DeepStack features from intermediate blocks) becomes a
:class:`~mixres.integrations.hf.qwen3_tower.MixresQwen3VLForConditionalGeneration`; its DeepStack
features are taken after their blocks, as the source does, so adapters before them reach the LLM's
early layers too. The default ``k`` is the CNN's stride over the ViT's patch (32 / 14, 32 / 16).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import mixres
from mixres.encoders.packed import PackedDualPathwayEncoder
from mixres.pathways import load_into

from .errors import UnsupportedModelError
from .families import Family, vit_config_kwargs
from .qwen_processor import MixresQwen2VLImageProcessor

__all__ = ["Qwen2_5_VLFamily", "QWEN2_5_VL", "QWEN3_VL"]


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1:
        raise UnsupportedModelError(f"high_res_scale has to be a number >= 1 (the high-res view's sides over the ViT's), but got {scale!r}")
    return float(scale)


def _classes(name: str) -> dict[str, Any]:
    """The source tower class, the pathway, and the mrified classes of a Qwen-VL family (imported when used)."""
    if name == "qwen2_5_vl":
        from transformers import Qwen2_5_VisionTransformerPretrainedModel as tower

        from . import qwen_tower as m

        return dict(tower=tower, pathway="hf_qwen2_5_vl", vision_config=m.MixresQwen2_5_VLVisionConfig,
                    visual=m.MixresQwen2_5_VisionModel, config=m.MixresQwen2_5_VLConfig, inner=m.MixresQwen2_5_VLModel,
                    outer=m.MixresQwen2_5_VLForConditionalGeneration)
    from transformers import Qwen3VLVisionModel as tower

    from . import qwen3_tower as m

    return dict(tower=tower, pathway="hf_qwen3_vl", vision_config=m.MixresQwen3VLVisionConfig, visual=m.MixresQwen3VLVisionModel,
                config=m.MixresQwen3VLConfig, inner=m.MixresQwen3VLModel, outer=m.MixresQwen3VLForConditionalGeneration)


class Qwen2_5_VLFamily(Family):
    """Qwen2.5-VL / Qwen3-VL: their own packed ViT + a high-res CNN per image; mrify is this family's own (:meth:`mrify`)."""

    def mrify(self, model: Any, *, map_pathway: Any, fusion: Any, positions: Sequence[int] | None,
              final_fusion: Any, processor: Any, high_res_scale: float | None) -> tuple[Any, Any]:
        """Put MRA into a Qwen2.5-VL / Qwen3-VL model (in place); arguments as :func:`~mixres.integrations.hf.mrify`.

        ``high_res_scale`` ``None``: the map pathway's stride over the ViT's patch (32 / 14 for
        Qwen2.5-VL, as LLaVA-HR's 1024 px / 448 px; 32 / 16 for Qwen3-VL): the CNN's map then has
        exactly the ViT's grid.

        Raises:
            UnsupportedModelError: a tower that is not the family's own ViT (e.g. mrified already), a bad
                ``high_res_scale``, a final fusion that changes the width.
        """
        from .mrify import _final_fusion, _fusion_config, default_positions, map_pathway_config

        classes, tower = _classes(self.name), model.model.visual
        if not isinstance(tower, classes["tower"]):
            raise UnsupportedModelError(f"the model's vision tower is a {type(tower).__name__}; mrify needs {self.name}'s own ViT "
                                        f"({classes['tower'].__name__}), as in a model that is not mrified yet")
        pathway = mixres.build({"kind": "pathway", "name": classes["pathway"], "config": vit_config_kwargs(tower.config)})
        load_into(pathway.model, tower.state_dict(), f"the model's vision tower ({type(tower).__name__})")
        fusion_cfg = _fusion_config(fusion, "fusion")
        blocks = default_positions(pathway.num_blocks) if positions is None else list(positions)
        encoder = PackedDualPathwayEncoder(
            token_pathway=pathway, map_pathway=mixres.build(map_pathway_config(map_pathway)),
            injections=[{"after_block": k, "fusion": dict(fusion_cfg)} for k in blocks],
            final_fusion=_final_fusion(final_fusion, pathway.dim))
        scale = _check_scale(encoder.stride / pathway.patch_size if high_res_scale is None else high_res_scale)
        reference = next(tower.parameters())
        encoder = encoder.to(device=reference.device, dtype=reference.dtype)
        vision_config = classes["vision_config"](**vit_config_kwargs(tower.config), encoder=encoder.config,
                                                 high_res_scale=scale, high_res_stride=encoder.stride)
        model.model.visual = classes["visual"](vision_config, encoder=encoder)
        data = model.config.to_dict()
        data.pop("model_type", None)
        config = classes["config"](**{**data, "vision_config": vision_config})
        model.__class__, model.model.__class__ = classes["outer"], classes["inner"]
        model.config = model.model.config = config
        if processor is not None:
            processor = self.update_processor_for(processor, vision_config)
        return model, processor

    @staticmethod
    def update_processor_for(processor: Any, vision_config: Any) -> Any:
        """A copy of ``processor`` whose image processor also emits the high-res views (same ViT budget)."""
        processor = copy.deepcopy(processor)
        settings = {k: v for k, v in processor.image_processor.to_dict().items() if k != "image_processor_type"}
        settings.update(high_res_scale=vision_config.high_res_scale, high_res_stride=vision_config.high_res_stride)
        processor.image_processor = MixresQwen2VLImageProcessor(**settings)
        return processor


QWEN2_5_VL = Qwen2_5_VLFamily("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), square_pad=False, vision_attr="visual")
QWEN3_VL = Qwen2_5_VLFamily("qwen3_vl", ("Qwen3VLForConditionalGeneration",), square_pad=False, vision_attr="visual")

# The mrified classes register themselves with the Auto classes when their modules load: load them with
# the family, so a saved mrified model loads in a fresh process too (load_pretrained, AutoModelForImageTextToText)
from . import qwen3_tower, qwen_tower  # noqa: E402, F401
