"""What a stage trains: named parts of the model, set from the recipe's lists.

The parts are the encoder's own (:meth:`mixres.encoders.base.Encoder.parts`: ``token_pathway``,
``map_pathway``, ``adapters``, ``final_fusion``, ...) plus ``projector`` and ``llm``: one
vocabulary for the encoder, the HF tower and the recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mixres.encoders.base import KNOWN_PARTS

from .recipe import RecipeArguments, RecipeError

__all__ = ["MODEL_PARTS", "model_parts", "part_parameters", "resolve_parts", "set_trainable", "apply_lora", "merge_lora"]

#: the parts outside the encoder
MODEL_PARTS: tuple[str, ...] = ("projector", "llm")


def model_parts(model: Any) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The named parameters of each part: the encoder's parts, ``projector`` and ``llm``.

    LoRA weights count as ``llm``. A part the encoder does not use (the map pathway of a
    low-res-only encoder) is not listed, so it is never trained. A family model (LLaVA-OneVision,
    Gemma 3, Idefics3 / SmolVLM, Qwen2.5-VL / Qwen3-VL) has its parts from :func:`~.families.family_parts`.
    """
    from .families import family_parts

    family = family_parts(model)
    if family is not None:
        return family
    encoder = model.model.vision_tower.encoder
    out = {name: [(name, part)] if isinstance(part, torch.nn.Parameter) else list(part.named_parameters(prefix=name))
           for name, part in encoder.parts().items()}
    clash = sorted(set(out) & set(MODEL_PARTS))
    if clash:
        raise RecipeError(f"the encoder names parts {clash}, which are the model's own; rename them in its parts()")
    out["projector"] = list(model.model.multi_modal_projector.named_parameters(prefix="projector"))
    out["llm"] = [*model.model.language_model.named_parameters(prefix="language_model"),
                  *model.lm_head.named_parameters(prefix="lm_head")]
    return out


part_parameters = model_parts  # the earlier name


def resolve_parts(model: Any, trainable: Sequence[str], freeze: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(train, absent)``: the parts of ``model`` that learn, and the named parts it lacks.

    ``trainable`` is a list of part names or ``["all"]``; ``freeze`` is taken out of it.

    Raises:
        RecipeError: a name that is no part of any encoder known here nor of the model.
    """
    parts = model_parts(model)
    known = set(parts) | set(KNOWN_PARTS) | {"all"}
    unknown = sorted((set(trainable) | set(freeze)) - known)
    if unknown:
        raise RecipeError(f"unknown part(s) {unknown}; this model's parts are {list(parts)} (or 'all')")
    wanted = list(parts) if "all" in trainable else list(trainable)
    absent = [p for p in [*wanted, *freeze] if p not in parts and p != "all"]
    train = [p for p in parts if p in wanted and p not in freeze and parts[p]]
    return train, absent


def set_trainable(model: Any, trainable: Sequence[str], freeze: Sequence[str] = ()) -> list[str]:
    """Set ``requires_grad`` from the recipe's lists; returns the parts that train.

    Every parameter is frozen first, then the parts named in ``trainable`` (less ``freeze``)
    are unfrozen, so nothing outside a named part ever learns.

    Example (the shipped stage 1): ``set_trainable(model, ["projector", "final_fusion"])``.
    """
    train, _ = resolve_parts(model, trainable, freeze)
    model.requires_grad_(False)
    for name, params in model_parts(model).items():
        for _, param in params:
            param.requires_grad_(name in train)
    return train


def apply_lora(model: Any, recipe: RecipeArguments) -> int:
    """Put LoRA adapters (peft) on every linear layer of the LLM; the LLM's own weights freeze.

    The adapters live inside the model (``inject_adapter_in_model``), so checkpoints hold them
    with everything else and resume as usual; :func:`merge_lora` folds them in before export.
    Returns the number of adapted layers.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from .families import llm_module

    llm = llm_module(model)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear)})
    if not names:
        raise RecipeError(f"lora found no linear layers in the LLM ({type(llm).__name__})")
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, llm)
    model.lm_head.requires_grad_(False)
    return sum(1 for n, _ in llm.named_modules() if n.endswith(".lora_A"))


def merge_lora(model: Any) -> None:
    """Fold LoRA adapters into the LLM's weights and put the plain layers back (in place)."""
    from peft.tuners.lora import LoraLayer

    from .families import llm_module

    llm = llm_module(model)
    for name, module in list(llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent) if parent else llm, child, module.get_base_layer())
