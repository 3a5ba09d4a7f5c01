"""The composition checks, one per (registered piece, role): used by tests/test_composition.py
and by scripts/composition_matrix.py, which writes docs/composition.md from the same calls.

Every check builds the piece at tiny size and either passes (returns a short detail string) or
raises :class:`NotApplicable` with the encoder's own refusal (a ``ConfigError`` naming why):
a cell is never skipped without its reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mixres
from mixres.errors import ConfigError

#: channels of the tiny CNN stages (llava-hr-tiny: ViT width 32, 8x8 tokens at 256 px)
STAGE_DIMS = (16, 32, 48, 64)
FUSION_ROLES = ("in_stream", "final")
ENCODER_ROLES = ("hf_tower", "recipe")
PROJECTOR_ROLES = ("forward", "recipe")


class NotApplicable(Exception):
    """The composition is refused by design; the message is the library's reason."""


def _tiny_dual(**overrides: Any) -> Any:
    return mixres.create_encoder("llava-hr-tiny", **{"injections": [], "final_fusion": None, **overrides})


def _multi_source(name: str) -> bool:
    cls = mixres.FUSIONS.get_class(name)
    return cls.__name__ in ("SVA", "ChannelConcat")


def _fusion_spec(name: str) -> tuple[dict[str, Any], int | list[int]]:
    stages: int | list[int] = [1, 3] if _multi_source(name) else 3
    dims = [STAGE_DIMS[s] for s in stages] if isinstance(stages, list) else STAGE_DIMS[stages]
    return {"name": name, "low_dim": 32, "high_dim": dims}, stages


def _run_encoder(encoder: Any) -> str:
    """forward + backward + config round trip + the declared grid; returns a detail string."""
    images = torch.randn(2, 3, 256, 256, requires_grad=False)
    tokens, grid = encoder(images)
    if tuple(grid) != tuple(encoder.grid_for(256)) or tokens.shape != (2, encoder.num_tokens(256), encoder.out_dim):
        raise AssertionError(f"forward gave {tuple(tokens.shape)} on grid {grid}, but the encoder declares "
                             f"grid {encoder.grid_for(256)}, {encoder.num_tokens(256)} tokens of width {encoder.out_dim}")
    if not torch.isfinite(tokens).all():
        raise AssertionError("non-finite tokens")
    tokens.float().square().mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    if not grads or all(g is None for g in grads):
        raise AssertionError("no parameter got a gradient")
    rebuilt = mixres.build(json.loads(json.dumps(encoder.config)))
    if rebuilt.config != encoder.config:
        raise AssertionError("config round trip changed the config")
    return f"{tokens.shape[1]} tokens x {tokens.shape[2]}"


def check_fusion(name: str, role: str) -> str:
    """``name`` as an in-stream fusion (after block 2) or as the final fusion of the tiny encoder."""
    spec, stages = _fusion_spec(name)
    try:
        if role == "in_stream":
            encoder = _tiny_dual(injections=[{"after_block": 2, "map_stage": stages, "fusion": spec}])
        else:
            encoder = _tiny_dual(final_fusion=spec, final_map_stage=stages)
    except ConfigError as err:
        raise NotApplicable(str(err)) from None
    return _run_encoder(encoder)


def tiny_encoders() -> list[str]:
    """The encoder presets built for tests (every encoder class has one)."""
    return mixres.list_encoders("*tiny*")


def full_size_encoders() -> list[str]:
    return [n for n in mixres.list_encoders() if mixres.ENCODERS.is_preset(n) and n not in tiny_encoders()]


def check_meta_build(name: str) -> str:
    """A full-size preset builds on the meta device (no memory, no weights) and counts its tokens."""
    with torch.device("meta"):
        encoder = mixres.build({"kind": "encoder", "name": name})
    return f"{encoder.num_tokens()} tokens x {encoder.out_dim}"


def _data(root: Path) -> dict[str, Path]:
    from mixres.integrations.llava.train import synthetic_data

    return synthetic_data(root, num_train=4, num_test=2, image_size=256, seed=0)


def _recipe(root: Path, **values: Any) -> Any:
    from mixres.integrations.llava.train import RecipeArguments

    data = _data(root / "data")
    return RecipeArguments(**{"stage": 2, "data_path": str(data["train"]), "eval_data_path": None, "max_length": 512, **values})


def _tower_check(recipe: Any) -> str:
    """The model the recipe assembles answers through its own processor: <image> count == features."""
    from PIL import Image

    from mixres.integrations.hf import generate
    from mixres.integrations.llava.train import build_model, processor_for

    model, tokenizer = build_model(recipe)
    processor = processor_for(model, tokenizer)
    root = Path(recipe.data_path).parent
    image = Image.open(next((root / "images").glob("*.png"))).convert("RGB")
    answer = generate(model, processor, [image, image], ["<image>\nWhat is it?", "<image>\nWhat?"], max_new_tokens=2)
    vision = model.config.vision_config
    features = model.model.get_image_features(
        pixel_values=torch.zeros(1, 3, vision.image_size, vision.image_size), vision_feature_layer=-1,
        vision_feature_select_strategy="full").pooler_output
    if sum(f.shape[0] for f in features) != vision.num_image_tokens or len(answer) != 2:
        raise AssertionError(f"the tower gave {sum(f.shape[0] for f in features)} features; the config says {vision.num_image_tokens}")
    return f"{vision.num_image_tokens} image tokens"


def _recipe_step(recipe: Any, out: Path) -> str:
    """One stage-2 step through the recipe's own train(): only trainable parts move; the projector,
    the LLM and the encoder do (a part read only through zero-init adapters, the map pathway, gets
    no gradient in the first step: that is the identity at init, not a fault)."""
    from transformers import TrainerCallback, TrainingArguments

    from mixres.integrations.llava.train import model_parts, train

    args = TrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, logging_steps=1)
    before: dict[int, torch.Tensor] = {}

    class Snap(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            before.update({id(p): p.detach().clone() for p in model.parameters() if p.requires_grad})

    trainer = train(recipe, args, callbacks=[Snap()])
    moved = [name for name, params in model_parts(trainer.model).items()
             if any(id(p) in before and not torch.equal(before[id(p)], p.detach()) for _, p in params)]
    trained = [name for name, params in model_parts(trainer.model).items() if any(p.requires_grad for _, p in params)]
    encoder_parts = set(trainer.model.model.vision_tower.encoder.parts())
    if not set(moved) <= set(trained) or not {"projector", "llm"} <= set(moved) or not encoder_parts & set(moved):
        raise AssertionError(f"after one step the parts {moved} moved, but {trained} train")
    return "trains " + ", ".join(moved)


def check_encoder(name: str, role: str, root: Path) -> str:
    recipe = _recipe(root, vision_preset=name, image_size=_side(name))
    return _tower_check(recipe) if role == "hf_tower" else _recipe_step(recipe, root / "out")


def _side(name: str) -> int:
    size = mixres.ENCODERS.resolve(name).get("image_size")
    if size is None:
        size = mixres.create_encoder(name).image_size
    return int(size if isinstance(size, int) else size[0])


def projector_spec(name: str) -> dict[str, Any]:
    """Tiny arguments: from 32 to 64 channels; compressors 8x8 -> 4x4 tokens (4x fewer)."""
    cls = mixres.PROJECTORS.get_class(name).__name__
    spec: dict[str, Any] = {"name": name, "in_dim": 32, "out_dim": 32 if cls == "IdentityProjector" else 64}
    if cls == "CAbstractor":
        spec.update(num_queries=16, hidden_dim=32, depth=1)
    if cls == "TokenPacker":
        spec.update(embed_dim=32, num_heads=4, scale_factor=2)
    return spec


def check_projector(name: str, role: str, root: Path) -> str:
    spec = projector_spec(name)
    try:
        projector = mixres.build({"kind": "projector", **spec})
    except ConfigError as err:
        raise NotApplicable(str(err)) from None
    if role == "forward":
        tokens = torch.randn(2, 64, 32, requires_grad=True)  # a parameter-free projector still passes gradients
        out = projector(tokens, (8, 8))
        h, w = projector.output_grid((8, 8))
        if out.shape != (2, h * w, spec["out_dim"]):
            raise AssertionError(f"output {tuple(out.shape)}, but output_grid says {(h, w)} x {spec['out_dim']}")
        out.square().mean().backward()
        if tokens.grad is None or not torch.isfinite(tokens.grad).all():
            raise AssertionError("no finite gradient reached the input tokens")
        if mixres.build(json.loads(json.dumps(projector.config))).config != projector.config:
            raise AssertionError("config round trip changed the config")
        return f"64 -> {h * w} tokens x {spec['out_dim']}"
    del spec["in_dim"], spec["out_dim"]  # the recipe sets the tower and LLM widths
    recipe = _recipe(root, vision_preset="llava-hr-tiny", image_size=256,
                     vision_overrides=json.dumps({"final_fusion": None}), projector=json.dumps(spec))
    try:
        tower = _tower_check(recipe)
    except mixres.MixresError as err:  # a projector that cannot map the tower's width to the LLM's
        raise NotApplicable(str(err)) from None
    return tower + "; " + _recipe_step(recipe, root / "out")


def run_cell(check: Callable[..., str], *args: Any) -> tuple[str, str]:
    """``("pass", detail)`` or ``("n/a", reason)``; failures propagate."""
    try:
        return "pass", check(*args)
    except NotApplicable as why:
        return "n/a", str(why)
