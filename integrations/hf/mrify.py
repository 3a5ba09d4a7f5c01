"""``mrify``: give an existing HF MLLM LLaVA-HR's mixture-of-resolution adaptation.

The model's own CLIP / SigLIP ViT becomes the token pathway of a
:class:`~mixres.encoders.dual.DualPathwayEncoder` (its weights are loaded into our
``hf_clip`` / ``hf_siglip`` pathway and every key is checked), a high-res map pathway is
added beside it, MR-Adapters are inserted between its blocks (LLaVA-HR: after blocks L/4, L/2,
3L/4), and the result replaces ``vision_tower`` as a
:class:`~mixres.integrations.hf.modeling.MixresVisionModel`. The projector and the LLM are
untouched: the tower's output width stays the ViT's (no final fusion, or one whose
``out_dim`` is the ViT width).

Because the MR-Adapters are the identity at init and the ViT keeps the layer the model used
(``vision_feature_layer``; CLS kept in the stream as the source does, dropped from the
output), the mrified model computes exactly what the original computes on the ViT's input
(the high-res image resized to the ViT's size) until the adapters are trained.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import CLIPVisionModel, Idefics3VisionTransformer, SiglipVisionModel, SmolVLMVisionTransformer

import mixres
from mixres.encoders.dual import DualPathwayEncoder, llava_hr_injections
from mixres.pathways import load_into

from .errors import UnsupportedModelError
from .families import Family, find_family, vit_config_kwargs
from .modeling import MixresVisionConfig, MixresVisionModel

__all__ = ["mrify", "default_positions", "map_pathway_config"]

_PATHWAYS = {CLIPVisionModel: "hf_clip", SiglipVisionModel: "hf_siglip", Idefics3VisionTransformer: "hf_idefics3",
             SmolVLMVisionTransformer: "hf_smolvlm"}


def default_positions(num_blocks: int) -> list[int]:
    """LLaVA-HR's adapter positions: after blocks L/4, L/2, 3L/4 (rounded down when L % 4 != 0).

    Example:
        >>> default_positions(24), default_positions(27)
        ([6, 12, 18], [6, 13, 20])
    """
    if num_blocks % 4 == 0:
        return [i["after_block"] for i in llava_hr_injections(num_blocks, {})]
    return [k * num_blocks // 4 for k in (1, 2, 3)]


def map_pathway_config(map_pathway: str | Mapping[str, Any]) -> dict[str, Any]:
    """A map pathway config from a config dict, a registered pathway name, or a timm model name.

    A string that is not a registered pathway is a timm model name whose final stage is used
    (LLaVA-HR: ``"convnext_large_mlp"``).

    Example:
        >>> map_pathway_config("convnext_tiny")
        {'kind': 'pathway', 'name': 'timm_map', 'model_name': 'convnext_tiny', 'out_indices': [-1]}
    """
    if isinstance(map_pathway, Mapping):
        return {"kind": "pathway", **map_pathway}
    if not isinstance(map_pathway, str):
        raise TypeError(f"map_pathway has to be a pathway config dict or a name, but got {type(map_pathway).__name__}")
    if map_pathway in mixres.PATHWAYS:
        return {"kind": "pathway", "name": map_pathway}
    return {"kind": "pathway", "name": "timm_map", "model_name": map_pathway, "out_indices": [-1]}


def _fusion_config(fusion: str | Mapping[str, Any], where: str) -> dict[str, Any]:
    if isinstance(fusion, str):
        return {"kind": "fusion", "name": fusion}
    if isinstance(fusion, Mapping):
        return {"kind": "fusion", **fusion}
    raise TypeError(f"{where} has to be a fusion name or config dict, but got {type(fusion).__name__}")


def _vision_owner(model: torch.nn.Module, family: Family) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, family.vision_attr) else model


def _token_pathway(tower: torch.nn.Module, layer: int, post_norm: bool | None) -> torch.nn.Module:
    kind = next((name for cls, name in _PATHWAYS.items() if isinstance(tower, cls)), None)
    if kind is None:
        detail = " (it is mrified already)" if isinstance(tower, MixresVisionModel) else ""
        raise UnsupportedModelError(
            f"the model's vision tower is a {type(tower).__name__}{detail}; mrify needs a CLIP or SigLIP ViT "
            f"({', '.join(c.__name__ for c in _PATHWAYS)})"
        )
    config = {"kind": "pathway", "name": kind, "config": vit_config_kwargs(tower.config), "select_layer": layer,
              "post_norm": post_norm}
    if kind == "hf_clip":
        config["drop_prefix"] = False  # CLS stays in the stream, as in the source model
    pathway = mixres.build(config)
    load_into(pathway.model, tower.state_dict(), f"the model's vision tower ({type(tower).__name__})")
    return pathway


def _final_fusion(final_fusion: Any, width: int) -> dict[str, Any] | None:
    if final_fusion is None:
        return None
    config = _fusion_config(final_fusion, "final_fusion")
    if config.setdefault("out_dim", width) != width:
        raise UnsupportedModelError(
            f"final_fusion out_dim={config['out_dim']} would change the projector's input width ({width}); "
            f"leave out_dim unset or pass {width}"
        )
    return config


def _build_encoder(model: torch.nn.Module, family: Family, image_size: int, map_pathway: Any, fusion: Any,
                   positions: Sequence[int] | None, final_fusion: Any) -> DualPathwayEncoder:
    tower = getattr(_vision_owner(model, family), family.vision_attr)
    token_pathway = _token_pathway(tower, family.feature_layer(model.config), family.post_norm())
    map_module = mixres.build(map_pathway_config(map_pathway))
    stride = max(map_module.strides)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % stride:
        raise UnsupportedModelError(
            f"image_size has to be a positive multiple of the map pathway's stride {stride} (e.g. "
            f"{max(1, round(image_size / stride)) * stride if isinstance(image_size, int) else 1024}), but got {image_size!r}"
        )
    fusion_cfg = _fusion_config(fusion, "fusion")
    positions = default_positions(token_pathway.num_blocks) if positions is None else list(positions)
    encoder = DualPathwayEncoder(
        token_pathway=token_pathway,
        map_pathway=map_module,
        injections=[{"after_block": k, "fusion": dict(fusion_cfg)} for k in positions],
        final_fusion=_final_fusion(final_fusion, token_pathway.dim),
        resolution={"policy": "llava_hr", "stride": stride},
        image_size=image_size,
    )
    reference = next(tower.parameters())
    return encoder.to(device=reference.device, dtype=reference.dtype)


def mrify(
    model: torch.nn.Module,
    *,
    map_pathway: str | Mapping[str, Any] = "convnext_large_mlp",
    image_size: int | None = None,
    fusion: str | Mapping[str, Any] = "mr_adapter",
    positions: Sequence[int] | None = None,
    final_fusion: str | Mapping[str, Any] | None = None,
    processor: Any = None,
    high_res_scale: float | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Put MRA into an HF MLLM: its ViT + a high-res map pathway + adapters, as its new vision tower.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``PaliGemmaForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
            ``Gemma3ForConditionalGeneration`` (or their ``*Model``), ``Idefics3ForConditionalGeneration``
            or ``SmolVLMForConditionalGeneration`` whose tower is a CLIP / SigLIP ViT
            (:mod:`~mixres.integrations.hf.families`), or a ``Qwen2_5_VLForConditionalGeneration`` /
            ``Qwen3VLForConditionalGeneration`` (its own ViT, :mod:`~mixres.integrations.hf.family_qwen2_5_vl`). Changed **in place** (the tower is replaced, the
            config updated; Idefics3 / SmolVLM become their ``Mixres*`` subclass).
        map_pathway: the high-res pathway: a timm model name (LLaVA-HR: ``"convnext_large_mlp"``),
            a registered pathway name, or a pathway config dict (e.g. with a local
            ``weights`` for pretrained CNN weights).
        image_size: the side ``R`` of the (square) high-res input; for AnyRes models, of each tile
            (``None``: 1024). Not for Qwen2.5-VL / Qwen3-VL, which read every image at its own size.
        fusion: the in-stream fusion (name or config), e.g. ``"mr_adapter"``, ``"mr_adapter_paper"``.
        positions: blocks after which a fusion runs; ``None``: L/4, L/2, 3L/4.
        final_fusion: ``None`` (LLaVA-HR stage-2 checkpoints keep one: pass ``"mr_final"``), or a
            fusion name / config; its ``out_dim`` is the ViT width so the projector still fits.
        processor: the model's processor; a copy is returned with the new image size, padding,
            pinpoints and ``<image>`` expansion (``None``: none returned).
        high_res_scale: Qwen2.5-VL / Qwen3-VL only: ``k``, the high-res view's sides over the ViT
            view's (``None``: the CNN's stride over the ViT's patch, 32 / 14 as LLaVA-HR's 1024 / 448, or
            32 / 16: the CNN's map has the ViT's grid); the ViT view keeps the processor's
            ``min_pixels`` / ``max_pixels``.

    Returns:
        ``(model, processor)``: the same model object, and the updated processor copy (or ``None``).

    Raises:
        UnsupportedModelError: an unsupported family, a tower that is not a CLIP / SigLIP ViT, several
            feature layers, a final fusion of another width, an ``image_size`` whose token grid does not
            divide it, or one whose grid the family's own reduction (Gemma 3's pool, Idefics3's pixel
            shuffle) does not divide; ``image_size`` for Qwen-VL or ``high_res_scale`` for another family.
        WeightsError: the tower's weights do not fit the pathway (every key is checked).
        ConfigError: bad positions, fusion or map pathway arguments.

    Example:
        >>> from mixres.integrations.hf.tiny import tiny_llava
        >>> model, processor = tiny_llava()
        >>> model, processor = mrify(model, map_pathway="convnext_atto", image_size=64, processor=processor)
        >>> model.config.vision_config.num_image_tokens, processor.patch_size
        (16, 16)
    """
    family = find_family(model)
    if hasattr(family, "mrify"):  # Qwen2.5-VL / Qwen3-VL: their own packed ViT
        if image_size is not None:
            raise UnsupportedModelError(f"{family.name} reads every image at its own size (min_pixels / max_pixels): pass "
                                        "high_res_scale (the high-res view's sides over the ViT's), not image_size")
        return family.mrify(model, map_pathway=map_pathway, fusion=fusion, positions=positions, final_fusion=final_fusion,
                            processor=processor, high_res_scale=high_res_scale)
    if high_res_scale is not None:
        raise UnsupportedModelError(f"high_res_scale is for Qwen2.5-VL / Qwen3-VL; {family.name} reads a square image: pass image_size")
    image_size = 1024 if image_size is None else image_size
    owner = _vision_owner(model, family)
    old_tile = int(getattr(owner, family.vision_attr).config.image_size)
    encoder = _build_encoder(model, family, image_size, map_pathway, fusion, positions, final_fusion)
    vision_config = MixresVisionConfig.from_encoder(encoder, image_size)
    if not vision_config.on_grid:
        raise UnsupportedModelError(
            f"image_size {image_size} gives a token grid {vision_config.feature_grid}, which does not divide it; "
            f"{family.name} needs image_size = grid * patch_size: pick a size whose grid divides it (LLaVA-HR's 384, 768, "
            "1024 and 1536 all do; see encoder.grid_for(size))"
        )
    family.check(model, vision_config)
    tower = MixresVisionModel(vision_config, encoder=encoder)
    setattr(owner, family.vision_attr, tower)
    family.update_config(model.config, vision_config, old_tile)
    if owner is not model:
        owner.config = model.config
    family.update_model(model, vision_config)
    if processor is not None:
        processor = copy.deepcopy(processor)
        family.update_processor(processor, vision_config, old_tile)
    return model, processor
