"""The recipe on today's MLLM families: start from an HF MLLM, mrify it, train it with its own chat template.

``base_model`` in a recipe names where a family model comes from: a tiny random one
(``onevision-tiny``, ``gemma3-tiny``, ``idefics3-tiny``, ``smolvlm-tiny``, from
:mod:`mixres.integrations.hf.tiny_families`; ``qwen2_5_vl-tiny``, ``qwen3_vl-tiny``, from
:mod:`mixres.integrations.hf.tiny_qwen`) or a local ``save_pretrained`` directory of a
``LlavaOnevisionForConditionalGeneration``, ``Gemma3ForConditionalGeneration``,
``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration``. The model is
mrified (:func:`~mixres.integrations.hf.mrify`, with the recipe's ``image_size`` and ``mrify``
arguments) and trained as the LLaVA recipe trains (:mod:`.family_train`); the family's own
processor expands the image tokens and its chat template formats the LLaVA-format conversations
(:mod:`.family_data`). A later stage starts from an earlier one's output with ``model: DIR``.

Everything that differs between families is one row of :data:`FAMILY_RECIPES` (a
:class:`FamilyRecipe`): where the ViT, projector and LLM sit in the model, the chat template used
when the processor carries none (written from the family's own format), the tokens that
template writes, and the tiny builder. A new family is one more row, once
:func:`~mixres.integrations.hf.mrify` takes it.

**Qwen2.5-VL / Qwen3-VL** read every image at its own size, so two things differ (both in
their rows): their projector (the 2x2 merger; Qwen3-VL's DeepStack mergers too) sits inside
their ViT, i.e. inside the mrified encoder's ``token_pathway``, and is carved out of it into
the ``projector`` part (:attr:`FamilyRecipe.encoder_projector`), so stage 1 trains the merger
with the ViT frozen, as LLaVA-HR's stage 1 trains the projector; and ``image_size`` is their
ViT view's **pixel budget**: ``max_pixels = image_size**2`` (Qwen's ``smart_resize`` reads a
square image at about ``image_size`` px a side, another shape at as many pixels; the high-res
view is ``high_res_scale`` times its sides), ``min_pixels`` as the processor has it. Changing it
in stage 2 changes the processor only (Qwen's ViT and merger take any grid).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..hf import tiny_families, tiny_qwen
from .family_processor import (
    GEMMA3_TEMPLATE,
    IDEFICS3_TEMPLATE,
    ONEVISION_TEMPLATE,
    QWEN2_5_VL_TEMPLATE,
    QWEN3_VL_TEMPLATE,
    SMOLVLM_TEMPLATE,
    prepare_processor,
)
from .recipe import RecipeArguments, RecipeError

__all__ = ["FamilyRecipe", "FAMILY_RECIPES", "TINY_BASES", "family_recipe", "family_parts", "is_family_directory", "llm_module",
           "is_family_model", "build_family_model", "set_family_image_size", "family_image_size"]

_QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


@dataclass(frozen=True)
class FamilyRecipe:
    """What the recipe needs to know about one MLLM family (one row of :data:`FAMILY_RECIPES`).

    Attributes:
        name: the family's name in :mod:`mixres.integrations.hf.families` (``find_family(model).name``).
        chat_template: the Jinja chat template set on a processor that carries none.
        template_tokens: the tokens that template writes, added as special tokens to a tokenizer
            that lacks them (the tiny ones), so each stays one token.
        end_of_turn: the token that ends an answer: labels stop there, generation stops there.
        tiny: builds the tiny random ``(model, processor)`` of ``base_model: <name>-tiny``.
        vision: attribute of ``model.model`` holding the ViT (after mrify: the mixres tower).
        projector: attributes of ``model.model`` that are the ``projector`` part.
        llm: attribute of ``model.model`` holding the LLM's decoder (``lm_head`` joins it).
        model_types: the ``config.json`` ``model_type`` values of the family (before and after
            mrify), by which ``model: DIR`` is recognised as a family model.
        encoder_projector: module paths inside the mrified encoder that belong to the
            ``projector`` part, not to the encoder part holding them (Qwen's merger:
            ``token_pathway.model.merger``).
        pixel_budget: ``image_size`` is the ViT view's pixel budget (``max_pixels = image_size**2``;
            Qwen) rather than the square side mrify reads every image (tile) at.
    """

    name: str
    chat_template: str
    template_tokens: tuple[str, ...]
    end_of_turn: str
    tiny: Callable[[], tuple[Any, Any]]
    vision: str = "vision_tower"
    projector: tuple[str, ...] = ("multi_modal_projector",)
    llm: str = "language_model"
    model_types: tuple[str, ...] = ()
    encoder_projector: tuple[str, ...] = ()
    pixel_budget: bool = False


FAMILY_RECIPES: dict[str, FamilyRecipe] = {f.name: f for f in (
    FamilyRecipe("llava_onevision", ONEVISION_TEMPLATE, ("<|im_start|>", "<|im_end|>"), "<|im_end|>",
                 tiny_families.tiny_llava_onevision, projector=("multi_modal_projector", "image_newline"),
                 model_types=("llava_onevision",)),
    FamilyRecipe("gemma3", GEMMA3_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>",
                 partial(tiny_families.tiny_gemma3, sliding_window=512), model_types=("gemma3",)),
    FamilyRecipe("idefics3", IDEFICS3_TEMPLATE, ("<|begin_of_text|>", "<end_of_utterance>"), "<end_of_utterance>",
                 tiny_families.tiny_idefics3, vision="vision_model", projector=("connector",), llm="text_model",
                 model_types=("idefics3", "mixres_idefics3")),
    FamilyRecipe("smolvlm", SMOLVLM_TEMPLATE, ("<|im_start|>", "<end_of_utterance>"), "<end_of_utterance>",
                 tiny_families.tiny_smolvlm, vision="vision_model", projector=("connector",), llm="text_model",
                 model_types=("smolvlm", "mixres_smolvlm")),
    FamilyRecipe("qwen2_5_vl", QWEN2_5_VL_TEMPLATE, _QWEN_TOKENS, "<|im_end|>", tiny_qwen.tiny_qwen2_5_vl, vision="visual",
                 projector=(), model_types=("qwen2_5_vl", "mixres_qwen2_5_vl"),
                 encoder_projector=("token_pathway.model.merger",), pixel_budget=True),
    FamilyRecipe("qwen3_vl", QWEN3_VL_TEMPLATE, _QWEN_TOKENS, "<|im_end|>", partial(tiny_qwen.tiny_qwen3_vl, text_layers=3), vision="visual",
                 projector=(), model_types=("qwen3_vl", "mixres_qwen3_vl"),
                 encoder_projector=("token_pathway.model.merger", "token_pathway.model.deepstack_merger_list"), pixel_budget=True),
)}
#: ``base_model`` names of the tiny random models
TINY_BASES: dict[str, str] = {"onevision-tiny": "llava_onevision", "gemma3-tiny": "gemma3", "idefics3-tiny": "idefics3",
                              "smolvlm-tiny": "smolvlm", "qwen2_5_vl-tiny": "qwen2_5_vl", "qwen3_vl-tiny": "qwen3_vl"}


def is_family_directory(path: str | None) -> bool:
    """Whether ``path`` is a local model directory whose ``config.json`` names a family of :data:`FAMILY_RECIPES`."""
    config = Path(path).expanduser() / "config.json" if path else None
    if config is None or not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # the LLaVA loader reports a bad config.json
    return any(model_type in f.model_types for f in FAMILY_RECIPES.values())


def family_recipe(model: Any) -> FamilyRecipe | None:
    """The :class:`FamilyRecipe` of ``model``, or ``None`` for a model the LLaVA recipe builds."""
    from ..hf.errors import UnsupportedModelError
    from ..hf.families import find_family

    try:
        return FAMILY_RECIPES.get(find_family(model).name)
    except UnsupportedModelError:
        return None


def is_family_model(model: Any) -> bool:
    """Whether ``model`` is one of :data:`FAMILY_RECIPES`' families (not the recipe's own LLaVA)."""
    return family_recipe(model) is not None


def _named(prefix: str, module: Any) -> list[tuple[str, torch.nn.Parameter]]:
    if isinstance(module, torch.nn.Parameter):
        return [(prefix, module)]
    return list(module.named_parameters(prefix=prefix))


def family_parts(model: Any) -> dict[str, list[tuple[str, torch.nn.Parameter]]] | None:
    """The named parameters of each part of a family model (``None`` for another model).

    The encoder's own parts (``token_pathway``, ``map_pathway``, ``adapters``, ...), then
    ``projector`` (the family's projector-side modules: OneVision's ``image_newline`` too; Qwen's
    merger, carved out of ``token_pathway``: :attr:`FamilyRecipe.encoder_projector`) and
    ``llm`` (the decoder and ``lm_head``), as :func:`~.stages.model_parts` gives them for LLaVA.
    """
    spec = family_recipe(model)
    if spec is None:
        return None
    inner = model.model
    encoder = getattr(inner, spec.vision).encoder
    carved = [p for path in spec.encoder_projector for p in _named(f"projector.{path}", encoder.get_submodule(path))]
    taken = {id(p) for _, p in carved}
    out = {name: [(n, p) for n, p in _named(name, part) if id(p) not in taken] for name, part in encoder.parts().items()}
    out["projector"] = [*carved, *(p for attr in spec.projector for p in _named(f"projector.{attr}", getattr(inner, attr)))]
    out["llm"] = [*_named(spec.llm, getattr(inner, spec.llm)), *_named("lm_head", model.lm_head)]
    return out


def llm_module(model: Any) -> torch.nn.Module:
    """The LLM's decoder of ``model`` (a family model or the recipe's LLaVA)."""
    spec = family_recipe(model)
    return getattr(model.model, spec.llm if spec is not None else "language_model")


def mrify_kwargs(recipe: RecipeArguments) -> dict[str, Any]:
    """``recipe.mrify`` (a JSON object of :func:`~mixres.integrations.hf.mrify` arguments) as a dict."""
    if not recipe.mrify:
        return {}
    try:
        value = json.loads(recipe.mrify)
    except json.JSONDecodeError as err:
        raise RecipeError(f"mrify has to be a JSON object of mrify() arguments, but {recipe.mrify!r} is not JSON: {err}") from None
    allowed = {"map_pathway", "fusion", "positions", "final_fusion", "high_res_scale"}  # high_res_scale: Qwen only (mrify checks)
    if not isinstance(value, dict) or set(value) - allowed:
        raise RecipeError(f"mrify has to be a JSON object with keys among {sorted(allowed)} (image_size is the "
                          f"recipe's own), but got {recipe.mrify!r}")
    return value


def _load_directory(path: str, dtype: torch.dtype, what: str) -> tuple[Any, Any]:
    from ..hf.errors import ModelPathError
    from ..hf.inference import load_pretrained

    try:
        model, processor = load_pretrained(path, dtype=dtype)
    except ModelPathError as err:
        raise RecipeError(f"{what} {path!r}: {err}") from None
    return model.train(), processor


def build_family_model(recipe: RecipeArguments, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, processor)`` of a family recipe, mrified and ready to train.

    ``recipe.model`` (a previous stage's ``output_dir``) is loaded as saved (read at
    ``recipe.image_size`` when it names another size: :func:`set_family_image_size`); otherwise
    ``recipe.base_model`` (a :data:`TINY_BASES` name or a local directory) is built or loaded and
    mrified at ``recipe.image_size`` with ``recipe.mrify``'s arguments (Qwen: mrified, then
    ``image_size`` sets its ViT view's pixel budget; ``None`` keeps the processor's). The processor
    is then prepared for the data (:func:`prepare_processor`).

    Raises:
        RecipeError: an unknown ``base_model``, a directory that holds no supported family,
            a ``model`` that is not mrified, or no ``image_size`` for a new model (but Qwen's).
    """
    from ..hf import mrify

    if recipe.model:
        model, processor = _load_directory(recipe.model, dtype, "model")
        spec = family_recipe(model)
        if spec is None or not _is_mrified(getattr(model.model, spec.vision, None)):
            raise RecipeError(f"model {recipe.model!r} is no mrified model of {sorted(FAMILY_RECIPES)}; start from "
                              "base_model instead (it is mrified there)")
        if recipe.image_size is not None and recipe.image_size != family_image_size(model, processor):
            set_family_image_size(model, processor, recipe.image_size)  # e.g. LLaVA-HR: low res, then high res
    else:
        model, processor = _base(recipe.base_model, dtype)
        spec = family_recipe(model)
        if spec.pixel_budget:
            model, processor = mrify(model, processor=processor, **mrify_kwargs(recipe))
            if recipe.image_size is not None:
                set_family_image_size(model, processor, recipe.image_size)
        else:
            if recipe.image_size is None:
                raise RecipeError("a family recipe needs image_size: the side R each image (tile) is read at by mrify")
            model, processor = mrify(model, image_size=recipe.image_size, processor=processor, **mrify_kwargs(recipe))
        spec = family_recipe(model)
    prepare_processor(model, processor, spec, _data_texts(recipe))
    return model.train(), processor


def _is_mrified(tower: Any) -> bool:
    from ..hf import MixresVisionModel
    from ..hf.qwen_tower import MixresQwen2_5_VisionModel  # Qwen3-VL's tower subclasses it

    return isinstance(tower, (MixresVisionModel, MixresQwen2_5_VisionModel))


def family_image_size(model: Any, processor: Any) -> int | None:
    """The ``image_size`` a mrified family model reads now: the tower's side, or for Qwen the side
    of the ViT view's pixel budget (``isqrt(max_pixels)``; ``None`` when ``max_pixels`` is no square)."""
    spec = family_recipe(model)
    if spec is not None and spec.pixel_budget:
        most = int(processor.image_processor.size["longest_edge"])
        side = math.isqrt(most)
        return side if side * side == most else None
    return int(model.config.vision_config.image_size)


def set_family_image_size(model: Any, processor: Any, image_size: int) -> int:
    """Make a mrified family model and its processor read ``image_size`` px per image (tile); returns
    the LLM tokens per image (tile) (Qwen: of a square image).

    What :func:`~mixres.integrations.hf.mrify` sets at the end, again for the new size: the tower
    config, the family's config / modules (OneVision's pinpoints, Gemma 3's pooled count, Idefics3's
    per-tile count) and the processor's sizes and ``<image>`` expansion. The weights are untouched.
    For Qwen2.5-VL / Qwen3-VL only the processor changes: ``max_pixels = image_size**2`` (the ViT
    view's budget; the high-res view follows it, ``high_res_scale`` times its sides).

    Raises:
        RecipeError: a size the map pathway's stride, the token grid or the family's own
            reduction does not divide; for Qwen, a budget below the processor's ``min_pixels``.
    """
    from mixres.errors import MixresError

    from ..hf.errors import UnsupportedModelError
    from ..hf.families import find_family
    from ..hf.modeling import MixresVisionConfig

    family, spec = find_family(model), family_recipe(model)
    if spec.pixel_budget:
        return _set_pixel_budget(model, processor, image_size)
    tower = getattr(model.model, spec.vision)
    old_tile = int(tower.config.image_size)
    try:
        tower.encoder.check_image_size(image_size)
        new = MixresVisionConfig.from_encoder(tower.encoder, image_size)
        if not new.on_grid:
            raise UnsupportedModelError(f"image_size {image_size} gives a token grid {new.feature_grid} that does not divide it")
        family.check(model, new)
    except MixresError as err:
        raise RecipeError(f"cannot read the model at image_size={image_size}: {err}") from None
    tower.encoder.image_size = (image_size, image_size)
    new.encoder = dict(new.encoder, image_size=image_size) if "image_size" in new.encoder else new.encoder
    family.update_config(model.config, new, old_tile)
    model.model.config = model.config  # as mrify: the inner model shares the outer config
    family.update_model(model, new)
    tower.config, tower.patch_size = new, new.patch_size
    family.update_processor(processor, new, old_tile)
    return int(new.num_image_tokens)


def _set_pixel_budget(model: Any, processor: Any, image_size: int) -> int:
    from transformers.image_utils import SizeDict
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    least = int(image_processor.size["shortest_edge"])
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size**2 < least:
        raise RecipeError(f"cannot read the model at image_size={image_size!r}: for {family_recipe(model).name} it sets the ViT "
                          f"view's pixel budget max_pixels = image_size**2, which has to be an int at least the processor's "
                          f"min_pixels {least} (image_size >= {math.isqrt(least - 1) + 1})")
    image_processor.size = SizeDict(shortest_edge=least, longest_edge=image_size**2)
    unit = image_processor.patch_size * image_processor.merge_size
    h, w = smart_resize(image_size, image_size, factor=unit, min_pixels=least, max_pixels=image_size**2)
    return (h // unit) * (w // unit)


def _base(base_model: str | None, dtype: torch.dtype) -> tuple[Any, Any]:
    if base_model in TINY_BASES:
        spec = FAMILY_RECIPES[TINY_BASES[base_model]]
        if spec.name == "smolvlm":
            _needs_num2words()
        model, processor = spec.tiny()
        return model.to(dtype).train(), processor
    if not base_model or not Path(base_model).expanduser().is_dir():
        raise RecipeError(f"base_model has to be one of {sorted(TINY_BASES)} or a local save_pretrained directory of "
                          f"an HF MLLM ({sorted(FAMILY_RECIPES)}), but got {base_model!r} (nothing is downloaded)")
    model, processor = _load_directory(base_model, dtype, "base_model")
    if family_recipe(model) is None:
        raise RecipeError(f"base_model {base_model!r} holds a {type(model).__name__}; the family recipe takes "
                          f"{sorted(FAMILY_RECIPES)} (a LLaVA-1.5 model: use the LLaVA recipe's model / llm)")
    return model, processor


def _needs_num2words() -> None:
    try:
        import num2words  # noqa: F401  (SmolVLMProcessor imports it)
    except ImportError:
        raise ImportError("smolvlm-tiny needs the num2words package (SmolVLMProcessor imports it): "
                          "pip install num2words") from None


def _data_texts(recipe: RecipeArguments) -> list[list[Mapping[str, Any]]]:
    convs = []
    for path in (recipe.data_path, recipe.eval_data_path, recipe.vocab_data):
        if path is not None and Path(path).is_file():
            records = json.loads(Path(path).read_text())
            convs += [r["conversations"] for r in records if isinstance(r, Mapping) and isinstance(r.get("conversations"), list)]
    return convs
