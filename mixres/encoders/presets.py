"""Named encoder configs: LLaVA-HR at 384 / 768 / 1024 / 1536 px, LLaVA-HR-X, tiny test presets.

Facts from the release (``llava_hr/model/multimodal_encoder/``): low-res pathway CLIP
ViT-L/14-336 (HF ``CLIPVisionModel``, CLS dropped before block 1, all 24 blocks, no post-norm);
high-res pathway timm ``convnext_large_mlp`` (1536-d; ``convnext_xxlarge``, 3072-d, for -X) whose
final-stage map feeds every adapter; MR-Adapters after blocks 6, 12, 18; final fusion
``mr_final``; ViT input ``max(R / 32 * 14, 336)``.

Presets are data: ``ENCODERS.get_preset("llava-hr-7b-1024")`` returns the dict, and
``create_encoder(name, **overrides)`` merges overrides into it.
"""

from __future__ import annotations

from typing import Any

from ..pathways.hf import CLIP_VIT_L_14_336
from ..registry import register_encoder_preset
from .dual import llava_hr_injections

__all__ = ["llava_hr_config", "TINY_VIT", "TINY_CNN", "TINY_CNN_SCRATCH"]

# hub ids of the release's backbones; create_encoder(pretrained=True) looks them up locally only
_WEIGHTS = {
    "token_pathway": "openai/clip-vit-large-patch14-336",
    "map_pathway": "convnext_large_mlp.clip_laion2b_ft_320",
}

TINY_VIT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=4, image_size=24
)
TINY_CNN: dict[str, Any] = dict(dims=[16, 32, 48, 64], depths=[1, 1, 1, 1])


def llava_hr_config(
    image_size: int,
    vit: dict[str, Any] | None = None,
    cnn: str = "convnext_large_mlp",
    cnn_kwargs: dict[str, Any] | None = None,
    stride: int = 32,
) -> dict[str, Any]:
    """The config of a LLaVA-HR dual-pathway encoder reading ``image_size`` pixels.

    Example:
        >>> cfg = llava_hr_config(1024)
        >>> [i["after_block"] for i in cfg["injections"]], cfg["resolution"]
        ([6, 12, 18], {'policy': 'llava_hr', 'stride': 32, 'min_size': None})
    """
    vit = dict(CLIP_VIT_L_14_336 if vit is None else vit)
    return {
        "name": "dual_pathway",
        "token_pathway": {"kind": "pathway", "name": "hf_clip", "config": vit, "drop_prefix": True, "select_layer": -1},
        "map_pathway": {"kind": "pathway", "name": "timm_map", "model_name": cnn, "model_kwargs": cnn_kwargs},
        "injections": llava_hr_injections(vit["num_hidden_layers"], {"name": "mr_adapter"}),
        "final_fusion": {"name": "mr_final"},
        "resolution": {"policy": "llava_hr", "stride": stride, "min_size": None},
        "image_size": image_size,
    }


#: the hub ids of each preset's pretrained backbones (``create_encoder(name, pretrained=True)``
#: reads them from the local cache); kept beside the configs, which hold constructor arguments only
PRESET_WEIGHTS: dict[str, dict[str, str]] = {}
for _size in (384, 768, 1024, 1536):
    register_encoder_preset(f"llava-hr-7b-{_size}", llava_hr_config(_size))
    PRESET_WEIGHTS[f"llava-hr-7b-{_size}"] = dict(_WEIGHTS)
register_encoder_preset("llava-hr-x-1024", llava_hr_config(1024, cnn="convnext_xxlarge"))
PRESET_WEIGHTS["llava-hr-x-1024"] = {**_WEIGHTS, "map_pathway": "convnext_xxlarge.clip_laion2b_soup_ft_in1k"}
# tiny presets: random init in well under a second, for tests, docs and the CPU demo
register_encoder_preset("llava-hr-tiny", llava_hr_config(256, vit=TINY_VIT, cnn="convnext_atto", cnn_kwargs=TINY_CNN))
register_encoder_preset(
    "llava-hr-tiny-lowres",
    {**llava_hr_config(96, vit=TINY_VIT, cnn="convnext_atto", cnn_kwargs=TINY_CNN), "injections": [], "final_fusion": None},
)
# baseline for the toy effect benchmark: the tiny ViT alone reading 64 px (16x16 = 256 tokens,
# 4x llava-hr-tiny's 64), no fusions; the CNN is frozen and its maps are not used
register_encoder_preset(
    "llava-hr-tiny-vit-hr",
    {**llava_hr_config(256, vit=TINY_VIT, cnn="convnext_atto", cnn_kwargs=TINY_CNN),
     "injections": [], "final_fusion": None, "resolution": {"policy": "fixed", "size": 64}, "freeze": ["map_pathway"]},
)
# tiny S2 and AnyRes over the tiny ViT (24-px tiles, 6x6 tokens each): every encoder kind has a
# tiny preset, so the composition tests run each through the HF tower and the recipe
_TINY_CLIP = {"kind": "pathway", "name": "hf_clip", "config": TINY_VIT, "drop_prefix": True, "select_layer": -1}
register_encoder_preset("s2-tiny", {"name": "s2", "pathway": _TINY_CLIP, "scales": [24, 48]})
register_encoder_preset("anyres-tiny", {"name": "anyres", "encoder": _TINY_CLIP, "pinpoints": [[24, 48], [48, 24], [48, 48]]})
# the toy effect (benchmarks/effect.py, the demo): 128-px images of the hatch task, everything
# trained from scratch. The map pathway is a tiny timm ResNet (BatchNorm): timm's ConvNeXt, with
# its trunc-normal(0.02) init, stays at a constant answer on this task for hundreds of steps even
# with layer scale 1.0 (benchmarks/probe.py), where the ResNet learns it in a few dozen. Only its
# stride-4 and stride-8 stages run: the adapters read stride 8 (a 3-4 px segment still spans a
# cell), the final fusion stride 4. The ViT reads 16 px (4x4 = 16 tokens).
TINY_CNN_SCRATCH: dict[str, Any] = dict(channels=(16, 32, 48, 64), stem_width=8)
_TINY_128 = llava_hr_config(128, vit=TINY_VIT, cnn="resnet10t", cnn_kwargs=TINY_CNN_SCRATCH)
_TINY_128 = {**_TINY_128, "map_pathway": {**_TINY_128["map_pathway"], "out_indices": [1, 2]},
             "resolution": {"policy": "llava_hr", "stride": 32, "min_size": 16}}
register_encoder_preset(
    "llava-hr-tiny-128",
    {**_TINY_128, "injections": llava_hr_injections(4, {"name": "mr_adapter"}, map_stage=1), "final_map_stage": 0},
)
register_encoder_preset("llava-hr-tiny-128-lowres", {**_TINY_128, "injections": [], "final_fusion": None})
# the single high-res ViT at 4x the tokens: 32 px, 8x8 = 64 tokens; the unused CNN is frozen
register_encoder_preset(
    "llava-hr-tiny-128-vit4x",
    {**_TINY_128, "injections": [], "final_fusion": None, "resolution": {"policy": "fixed", "size": 32},
     "freeze": ["map_pathway"]},
)
