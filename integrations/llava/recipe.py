"""Recipe I/O: the recipe's own arguments, recipe files (JSON / YAML) and the command line.

A recipe is a flat mapping of :class:`RecipeArguments` and transformers' ``TrainingArguments``;
which parts of the model learn is data in it (``trainable``, ``freeze``, ``lora``: lists of
part names, :mod:`.stages`), never a branch in code.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from mixres.errors import MixresError

from .templates import get_template

__all__ = ["RECIPES", "RecipeError", "RecipeArguments", "list_recipes", "load_recipe", "parse_args"]

RECIPES = Path(__file__).resolve().parent / "recipes"


class RecipeError(MixresError):
    """A recipe file or argument is wrong: the message names it and what is allowed."""




@dataclass
class RecipeArguments:
    """The recipe's own arguments (the rest are transformers' ``TrainingArguments``).

    Args:
        stage: 1 (projector + final fusion) or 2 (everything but ``freeze``).
        model: a LLaVA directory to start from (a previous stage's ``output_dir``, or a
            converted LLaVA-HR); ``None``: build one from ``vision_preset`` + ``llm``.
        vision_preset: the mixres encoder preset of a new model (``mixres.list_encoders()``).
        vision_overrides: constructor arguments of a new model's encoder that replace the
            preset's (a mapping in a recipe file, JSON on the command line), e.g.
            ``{"final_fusion": {"name": "sva", "query_grid": 4}}``; ``None`` values are kept.
        vision_weights: local weights of a new model's encoder: a directory (converted or
            official LLaVA-HR) or ``token_pathway=DIR,map_pathway=FILE``; ``None``: random.
        llm: ``tiny`` (a random 2-layer Llama) or a local HF causal-LM directory.
        gguf_file: a GGUF file inside ``llm`` (or a path to one) read by transformers' GGUF
            loader (needs the ``gguf`` package).
        image_size: the high-res input side ``R``; ``None``: the encoder preset's.
        aspect_ratio: ``pad`` (to a square with the mean colour) or ``crop`` (centre crop).
        template: conversation template (``plain``, ``vicuna_v1``, ``chat_template``).
        max_length: longest sample in tokens, image tokens included; longer ones are errors.
        data_path: LLaVA-format JSON; ``None``: the synthetic data, written to
            ``<output_dir>/data`` (stage 1 reads its single-turn image samples).
        image_folder: where the JSON's image paths are relative to (default: its folder).
        eval_data_path: JSON to answer after training (greedy); writes ``eval.json``.
        vocab_data: ``llm: tiny`` only: a further JSON whose words join the tokenizer's
            vocabulary (besides ``data_path`` and ``eval_data_path``), e.g. stage 2's data when
            stage 1 builds the model.
        on_error: ``raise`` on a bad sample, or ``skip`` it (logged and counted).
        trainable: the parts that learn, a list (a comma-separated string on the command line)
            of :func:`~.stages.model_parts` names, or ``all``; parts this model does not have
            (``adapters`` of a low-res-only encoder) are reported in the plan, not an error.
        freeze: parts taken out of ``trainable`` (a convenience for the command line).
        lora: parts trained through LoRA adapters (peft) instead of fully; only ``llm``.
        projector: a registered projector or compressor (``mixres.list_projectors()``, e.g.
            ``c_abstractor``: fewer tokens) between tower and LLM; ``None``: LLaVA's own
            ``mlp2x_gelu`` (``multi_modal_projector.linear_1/2``, as LLaVA-HR).
        lora_r: LoRA rank (LLaVA: 128).
        lora_alpha: LoRA alpha (LLaVA: 256).
        lora_dropout: LoRA dropout (LLaVA: 0.05).
        global_batch_size: samples per optimizer step over all processes; sets
            ``gradient_accumulation_steps`` from the batch per device and the world size.
        synthetic_samples: training samples of the synthetic data.
        synthetic_image_size: side in pixels of the synthetic images.
        overwrite_output_dir: start a new run in an ``output_dir`` that already holds
            ``checkpoint-*`` directories (refused otherwise; theirs are never rotated away).
        allow_partial_resume: resume from a checkpoint without optimizer / scheduler / RNG
            state (they start fresh, with a warning) instead of refusing it.
        base_model: start from an existing HF MLLM of a supported family and mrify it
            (:mod:`.families`): ``onevision-tiny``, ``gemma3-tiny``, ``idefics3-tiny``,
            ``smolvlm-tiny`` (tiny random models) or a local ``save_pretrained`` directory of a
            LLaVA-OneVision / Gemma 3 / Idefics3 / SmolVLM model; ``None``: the LLaVA recipe.
            Needs ``template: chat_template`` (the family's own) and ``image_size``.
        mrify: a family model's :func:`~mixres.integrations.hf.mrify` arguments besides
            ``image_size`` (a mapping in a recipe file, JSON on the command line), e.g.
            ``{"map_pathway": "convnext_large_mlp", "final_fusion": null}``.
        llm_init_range: ``llm: tiny`` only: the random Llama's ``initializer_range`` (std of its
            weights); ``None``: transformers' 0.02. A larger one (0.1) lets a from-scratch toy
            LLM pass image features on early instead of learning the answer prior first.
    """

    stage: int = 2
    model: str | None = None
    vision_preset: str = "llava-hr-tiny"
    vision_overrides: str | None = None
    vision_weights: str | None = None
    llm: str = "tiny"
    gguf_file: str | None = None
    image_size: int | None = None
    aspect_ratio: str = "pad"
    template: str = "vicuna_v1"
    max_length: int = 2048
    data_path: str | None = None
    image_folder: str | None = None
    eval_data_path: str | None = None
    vocab_data: str | None = None
    on_error: str = "raise"
    trainable: str = "all"
    freeze: str = ""
    lora: str = ""
    projector: str | None = None
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    global_batch_size: int | None = None
    synthetic_samples: int = 256
    synthetic_image_size: int = 256
    overwrite_output_dir: bool = False
    allow_partial_resume: bool = False
    llm_init_range: float | None = None
    base_model: str | None = None
    mrify: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision_overrides, Mapping):
            self.vision_overrides = json.dumps(self.vision_overrides)
        if isinstance(self.mrify, Mapping):
            self.mrify = json.dumps(self.mrify)
        _ = self.vision_overrides_dict  # a bad JSON fails here, before anything is built
        for name in ("trainable", "freeze", "lora"):
            value = getattr(self, name)
            if isinstance(value, bool):  # `lora: true` of older recipes
                value = "llm" if value else ""
            if isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            if not isinstance(value, str):
                raise RecipeError(f"{name} has to be a list of part names, but got {value!r}")
            setattr(self, name, value)
        if self.stage not in (1, 2):
            raise RecipeError(f"stage has to be 1 or 2 (it picks the default data view), but got {self.stage!r}")
        if set(self.lora_parts) - {"llm"}:
            raise RecipeError(f"lora adapts the LLM only: lora=[llm], but got {self.lora_parts}")
        if self.lora_parts and "llm" in self.frozen_parts:
            raise RecipeError("lora trains the LLM through adapters; it cannot be combined with freeze=llm")
        get_template(self.template)  # unknown names raise here, before anything is built
        if self.aspect_ratio not in ("pad", "crop"):
            raise RecipeError(f"aspect_ratio has to be 'pad' or 'crop', but got {self.aspect_ratio!r}")
        if self.on_error not in ("raise", "skip"):
            raise RecipeError(f"on_error has to be 'raise' or 'skip', but got {self.on_error!r}")

    @property
    def vision_overrides_dict(self) -> dict[str, Any]:
        """``vision_overrides`` as a dict (``{}`` when unset)."""
        if not self.vision_overrides:
            return {}
        try:
            value = json.loads(self.vision_overrides)
        except json.JSONDecodeError as err:
            raise RecipeError(f"vision_overrides has to be a JSON object, but {self.vision_overrides!r} is not JSON: {err}") from None
        if not isinstance(value, dict):
            raise RecipeError(f"vision_overrides has to be a JSON object of encoder arguments, but got {value!r}")
        return value

    @property
    def trainable_parts(self) -> list[str]:
        """``trainable`` as a list of part names (``["all"]`` for everything)."""
        return _names(self.trainable)

    @property
    def frozen_parts(self) -> list[str]:
        """``freeze`` as a list of part names."""
        return _names(self.freeze)

    @property
    def lora_parts(self) -> list[str]:
        """``lora`` as a list of part names."""
        return _names(self.lora)


def _names(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def list_recipes() -> list[str]:
    """Names of the shipped recipe files.

    Example:
        >>> "llava-hr-7b-stage2" in list_recipes()
        True
    """
    return sorted(p.stem for p in RECIPES.glob("*") if p.suffix in (".json", ".yaml", ".yml"))


def load_recipe(recipe: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe file (JSON or YAML) by path or shipped name.

    A relative ``deepspeed`` path is resolved against the recipe file's folder.

    Raises:
        RecipeError: no such file or name (the shipped names are listed), not valid JSON /
            YAML (the file, line and column are named), or not a mapping.

    Example:
        >>> load_recipe("llava-hr-7b-stage1")["learning_rate"]
        0.001
    """
    path = Path(recipe)
    if not path.is_file():
        matches = [p for p in RECIPES.glob(f"{recipe}.*") if p.suffix in (".json", ".yaml", ".yml")]
        if not matches:
            raise RecipeError(f"recipe {str(recipe)!r} is neither a file nor a shipped recipe; shipped: {list_recipes()}")
        path = matches[0]
    text = path.read_text()
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    else:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(values, Mapping):
        raise RecipeError(f"recipe {str(path)!r} has to hold a mapping of argument names to values")
    values = dict(values)
    ds = values.get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_absolute():
        values["deepspeed"] = str((path.parent / ds).resolve())
    return values


def parse_args(argv: Sequence[str] | None = None) -> tuple[RecipeArguments, TrainingArguments]:
    """Arguments from ``--recipe`` (a file or shipped name) overridden by the other flags.

    Raises:
        RecipeError: an unknown recipe, or a recipe key that is no argument (close names listed).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser((RecipeArguments, TrainingArguments))
    parser.add_argument("--recipe", help=f"a recipe file or a shipped name ({', '.join(list_recipes())})")
    if known.recipe:
        values = load_recipe(known.recipe)
        allowed = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - allowed)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, allowed, n=1) for k in unknown}
            raise RecipeError(f"recipe {known.recipe!r} has unknown keys {unknown} (close: {hints}); keys are the "
                              "arguments of RecipeArguments and transformers.TrainingArguments")
        parser.set_defaults(**values)
    recipe, training, *_ = parser.parse_args_into_dataclasses(args=argv)
    _set_accumulation(recipe, training)
    return recipe, training


def _set_accumulation(recipe: RecipeArguments, training: TrainingArguments) -> None:
    if recipe.global_batch_size is None:
        return
    per_step = training.per_device_train_batch_size * training.world_size
    if recipe.global_batch_size % per_step:
        raise RecipeError(
            f"global_batch_size={recipe.global_batch_size} is not a multiple of per_device_train_batch_size "
            f"({training.per_device_train_batch_size}) x processes ({training.world_size}) = {per_step}"
        )
    training.gradient_accumulation_steps = recipe.global_batch_size // per_step
