"""Write tiny checkpoints laid out as the LLaVA-HR release saves them (github.com/luogen1996/LLaVA-HR).

Every key name and shape below is taken from the release's own module definitions, not from
mixres or timm state dicts:

- ``llava_hr/model/multimodal_encoder/clip_encoder.py``: ``CLIPVisionTower.vision_tower`` is a
  transformers 4.31 ``CLIPVisionModel`` (keys under ``vision_model.``; 4.31 keeps
  ``position_ids`` out of the state dict; ``post_layernorm`` is saved though the tower never
  runs it).
- ``llava_hr/model/multimodal_encoder/convnext.py``: the vendored ``ConvNeXt`` with
  ``conv_mlp=False`` (``Linear`` MLPs: ``mlp.fc1.weight`` is ``[4C, C]``), a patch stem
  ``stem.{0,1}``, stage 0 without a downsample, ``stages.S.downsample.{0,1}`` after it, the
  layer scale named ``weight`` (``ConvNeXtBlock.weight``, 1-D of the stage width; its
  ``checkpoint_filter_fn`` renames timm's ``gamma`` to ``weight``), ``norm_pre`` an
  ``Identity`` and a ``NormMlpClassifierHead`` (``head.norm``, ``head.pre_logits.fc`` when
  ``head_hidden_size`` is set, as for ``convnext_large_mlp``; ``head.fc``).
  ``convnext_xxlarge`` uses ``norm_eps=1e-5``; ``convnext_large_mlp`` timm's 1e-6.
- ``multipath_encoder_wapper.py``: ``align_stages_latent.{0,1,2}`` (``S2FStitchAlignModuleV2``)
  and ``align_stages.0`` (``MultiPathAlignModule``).
- ``multimodal_projector/builder.py``: ``mlp2x_gelu`` = ``Sequential(Linear, GELU, Linear)``,
  ``mm_hidden_size`` (the CLIP width) -> the LLM's ``hidden_size``.
- ``train/train.py``: the model config gains ``input_image_size``, ``vision_tower_slow``,
  ``is_multipath_encoder``, ``freeze_vision``, ``image_aspect_ratio``, ...

Widths are tiny; the geometry is the release's (CLIP patch 14 at 336 px, ConvNeXt stride 32,
the ViT reading ``max(int(R / 32 * 14), 336)``), so a 1024-px image gives 32 x 32 tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mixres.encoders.presets import llava_hr_config

__all__ = ["Layout", "LAYOUTS", "CLIP", "release_state_dict", "write_release", "mixres_config"]

# the tiny CLIP both sides build (CLIPVisionConfig defaults otherwise: quick_gelu, eps 1e-5)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=14,
            image_size=336)
PREFIX = "model.vision_tower."


@dataclass(frozen=True)
class Layout:
    """One released variant at tiny width."""

    image_size: int  # input_image_size of the release config
    cnn: str  # vision_tower_slow's architecture
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    head_hidden: int | None  # head_hidden_size (convnext_large_mlp: the last width; xxlarge: none)
    norm_eps: float  # the ConvNeXt's LayerNorm eps
    llm_dim: int  # the LLM's hidden size (4096 for 7B, 5120 for 13B: here 24 / 40)
    slow_tower: str  # the release's vision_tower_slow value


LAYOUTS: dict[str, Layout] = {
    "7b-1024": Layout(1024, "convnext_large_mlp", (8, 16, 24, 32), (1, 1, 2, 1), 32, 1e-6, 24,
                      "convnext_large_mlp.clip_laion2b_ft_320"),
    "7b-1536": Layout(1536, "convnext_large_mlp", (8, 16, 24, 32), (1, 1, 2, 1), 32, 1e-6, 24,
                      "convnext_large_mlp.clip_laion2b_ft_320"),
    "x-1024": Layout(1024, "convnext_xxlarge", (8, 16, 32, 48), (1, 1, 2, 1), None, 1e-5, 40,
                     "convnext_xxlarge.clip_laion2b_soup_ft_in1k"),
}
NUM_CLASSES = 10  # the ConvNeXt classifier the release keeps (unused)
LLM = dict(vocab_size=30, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)


def _clip_shapes() -> dict[str, tuple[int, ...]]:
    c, i, p = CLIP["hidden_size"], CLIP["intermediate_size"], CLIP["patch_size"]
    n = (CLIP["image_size"] // p) ** 2 + 1
    shapes = {"embeddings.class_embedding": (c,), "embeddings.patch_embedding.weight": (c, 3, p, p),
              "embeddings.position_embedding.weight": (n, c), "pre_layrnorm.weight": (c,), "pre_layrnorm.bias": (c,),
              "post_layernorm.weight": (c,), "post_layernorm.bias": (c,)}
    for layer in range(CLIP["num_hidden_layers"]):
        pre = f"encoder.layers.{layer}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update({f"{pre}self_attn.{proj}.weight": (c, c), f"{pre}self_attn.{proj}.bias": (c,)})
        shapes.update({f"{pre}mlp.fc1.weight": (i, c), f"{pre}mlp.fc1.bias": (i,), f"{pre}mlp.fc2.weight": (c, i),
                       f"{pre}mlp.fc2.bias": (c,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{pre}{norm}.weight": (c,), f"{pre}{norm}.bias": (c,)})
    return {f"vision_model.{k}": v for k, v in shapes.items()}


def _convnext_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    dims = layout.dims
    shapes = {"stem.0.weight": (dims[0], 3, 4, 4), "stem.0.bias": (dims[0],), "stem.1.weight": (dims[0],),
              "stem.1.bias": (dims[0],)}
    for s, (d, depth) in enumerate(zip(dims, layout.depths)):
        if s:  # stage 0 keeps the stem's width at stride 1: nn.Identity, no keys
            shapes.update({f"stages.{s}.downsample.0.weight": (dims[s - 1],), f"stages.{s}.downsample.0.bias": (dims[s - 1],),
                           f"stages.{s}.downsample.1.weight": (d, dims[s - 1], 2, 2), f"stages.{s}.downsample.1.bias": (d,)})
        for b in range(depth):
            pre = f"stages.{s}.blocks.{b}."
            shapes.update({f"{pre}conv_dw.weight": (d, 1, 7, 7), f"{pre}conv_dw.bias": (d,), f"{pre}norm.weight": (d,),
                           f"{pre}norm.bias": (d,), f"{pre}mlp.fc1.weight": (4 * d, d), f"{pre}mlp.fc1.bias": (4 * d,),
                           f"{pre}mlp.fc2.weight": (d, 4 * d), f"{pre}mlp.fc2.bias": (d,), f"{pre}weight": (d,)})
    last, hidden = dims[-1], layout.head_hidden
    shapes.update({"head.norm.weight": (last,), "head.norm.bias": (last,)})
    if hidden:
        shapes.update({"head.pre_logits.fc.weight": (hidden, last), "head.pre_logits.fc.bias": (hidden,)})
    shapes.update({"head.fc.weight": (NUM_CLASSES, hidden or last), "head.fc.bias": (NUM_CLASSES,)})
    return shapes


def _fusion_shapes(cl: int, ch: int) -> dict[str, tuple[int, ...]]:
    adapter = {"slow_conv": ((ch, ch, 1, 1), ch), "slow_proj": ((cl, ch, 1, 1), cl), "fast_conv": ((cl, 1, 7, 7), cl),
               "fast_proj": ((cl, cl, 1, 1), cl), "gate.0": ((cl // 2, 2 * cl), cl // 2), "gate.2": ((1, cl // 2), 1)}
    shapes = {}
    for i in range(3):
        for name, (w, b) in adapter.items():
            shapes.update({f"align_stages_latent.{i}.{name}.weight": w, f"align_stages_latent.{i}.{name}.bias": (b,)})
    shapes.update({"align_stages.0.fast_proj.weight": (cl, cl), "align_stages.0.fast_proj.bias": (cl,),
                   "align_stages.0.slow_proj.weight": (cl, ch), "align_stages.0.slow_proj.bias": (cl,)})
    return shapes


def _llm_shapes(d: int) -> dict[str, tuple[int, ...]]:
    v, i = LLM["vocab_size"], LLM["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for layer in range(LLM["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        shapes.update({f"{pre}self_attn.{p}.weight": (d, d) for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({f"{pre}mlp.gate_proj.weight": (i, d), f"{pre}mlp.up_proj.weight": (i, d),
                       f"{pre}mlp.down_proj.weight": (d, i), f"{pre}input_layernorm.weight": (d,),
                       f"{pre}post_attention_layernorm.weight": (d,)})
    return shapes


def release_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every key of the release's ``LlavaLlamaForCausalLM`` state dict for ``layout``, with its shape."""
    cl, ch, d = CLIP["hidden_size"], layout.dims[-1], layout.llm_dim
    shapes = {f"{PREFIX}fast_vision_tower.vision_tower.{k}": v for k, v in _clip_shapes().items()}
    shapes.update({f"{PREFIX}slow_vision_tower.vision_tower.{k}": v for k, v in _convnext_shapes(layout).items()})
    shapes.update({PREFIX + k: v for k, v in _fusion_shapes(cl, ch).items()})
    shapes.update({"model.mm_projector.0.weight": (d, cl), "model.mm_projector.0.bias": (d,),
                   "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,)})
    shapes.update(_llm_shapes(d))
    return shapes


def release_state_dict(layout: Layout, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors of :func:`release_shapes`; norms near 1, layer scales near 0.5 (far from
    timm's 1e-6 init, so a layer scale that is not loaded shows in the output)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in release_shapes(layout).items():
        x = torch.randn(shape, generator=gen)
        is_scale = key.endswith("norm.weight") or "norm1.weight" in key or "norm2.weight" in key or key.endswith(
            ("layrnorm.weight", "layernorm.weight", "stem.1.weight", "downsample.0.weight"))
        if is_scale:
            x = 1 + 0.1 * x
        elif key.endswith(".weight") and "blocks." in key and key.split(".")[-2].isdigit():
            x = 0.2 + 0.05 * x  # ConvNeXtBlock.weight: the layer scale
        else:
            x = x * 0.5 * (math.prod(shape[1:]) if len(shape) > 1 else 4) ** -0.5  # ~unit-gain layers
        out[key] = x.to(dtype)
    return out


def release_config(layout: Layout, dtype: str = "float32") -> dict:
    """The ``config.json`` the release writes (``LlavaConfig`` = Llama config + the multimodal fields)."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": layout.llm_dim,
        "intermediate_size": LLM["intermediate_size"], "num_attention_heads": LLM["num_attention_heads"],
        "num_hidden_layers": LLM["num_hidden_layers"], "num_key_value_heads": LLM["num_attention_heads"],
        "vocab_size": LLM["vocab_size"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": dtype, "transformers_version": "4.31.0", "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": CLIP["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -1, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "freeze_vision": False, "input_image_size": layout.image_size, "is_multipath_encoder": True,
        "vision_tower_slow": layout.slow_tower, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
        "image_grid_pinpoints": None,
    }


def write_release(directory: str | Path, name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  fmt: str = "safetensors", shards: int = 1) -> dict[str, torch.Tensor]:
    """Write ``config.json`` + weights (``model[-0000k-of-0000n].safetensors`` or
    ``pytorch_model[-...].bin``) + ``training_args.bin`` (a pickled non-tensor, as the HF Trainer
    leaves it) for layout ``name``; return the state dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = LAYOUTS[name]
    state = release_state_dict(layout, seed, dtype)
    keys = list(state)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    for k in range(shards):
        part = {key: state[key].contiguous() for key in keys[k::shards]}
        file = directory / (f"{stem}.{ext}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}")
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(file), metadata={"format": "pt"})
        else:
            torch.save(part, file)
    torch.save({"learning_rate": 2e-5, "note": "TrainingArguments stand-in"}, directory / "training_args.bin")
    config = release_config(layout, str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return state


def mixres_config(name: str) -> dict:
    """The mixres encoder config with the layout's tiny widths (what ``--preset`` is given)."""
    layout = LAYOUTS[name]
    cnn_kwargs = {"dims": list(layout.dims), "depths": list(layout.depths), "head_hidden_size": None}
    return llava_hr_config(layout.image_size, vit=dict(CLIP), cnn=layout.cnn, cnn_kwargs=cnn_kwargs)
