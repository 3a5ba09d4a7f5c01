"""Model assembly: a transformers Llava whose vision tower is a mixres encoder.

:func:`build_model` loads a saved model or assembles a new one (encoder preset + projector +
LLM); :func:`set_image_size` switches the tower between stage resolutions; :func:`processor_for`
is the processor saved beside the model, which training, evaluation and inference all use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainingArguments

import mixres

from ..hf.modeling import MixresVisionConfig, MixresVisionModel, register_auto_classes
from .preprocess import CLIP_MEAN, CLIP_STD
from .recipe import RecipeArguments, RecipeError
from .tokenizer import IMAGE_TOKEN, build_tokenizer, data_texts

__all__ = ["TINY_LLM", "build_model", "set_image_size", "processor_for", "ProcessorImages"]

#: the LLM of ``llm: tiny`` (a random Llama; the vocabulary comes from the tokenizer)
TINY_LLM: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)


def _dtype(training: TrainingArguments) -> torch.dtype:
    # as LLaVA: bf16 weights under --bf16; fp16 AMP needs fp32 master weights
    return torch.bfloat16 if training.bf16 else torch.float32


def _load_llm(recipe: RecipeArguments, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = Path(recipe.llm).expanduser(), recipe.gguf_file
    if gguf and Path(gguf).is_file() and not (path / gguf).is_file():
        path, gguf = Path(gguf).parent, Path(gguf).name
    if not path.is_dir():
        raise RecipeError(f"llm has to be 'tiny' or a local causal-LM directory, but {recipe.llm!r} is none (nothing "
                          "is downloaded: fetch it first, e.g. `huggingface-cli download lmsys/vicuna-7b-v1.5 --local-dir DIR`)")
    kwargs = {"local_files_only": True, **({"gguf_file": gguf} if gguf else {})}
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:  # LLaVA pads LLaMA with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    return llm, tokenizer


def _tiny_llm(tokenizer: Any, init_range: float | None = None) -> torch.nn.Module:
    extra = {"initializer_range": init_range} if init_range is not None else {}
    config = transformers.LlamaConfig(**TINY_LLM, **extra, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config)


def _encoder(recipe: RecipeArguments) -> torch.nn.Module:
    weights: Any = False
    if recipe.vision_weights:
        spec = recipe.vision_weights
        weights = dict(kv.split("=", 1) for kv in spec.split(",")) if "=" in spec else spec
    return mixres.create_encoder(recipe.vision_preset, pretrained=weights, **recipe.vision_overrides_dict)


def _projector_spec(recipe: RecipeArguments) -> dict[str, Any] | None:
    if recipe.projector is None:
        return None
    spec = json.loads(recipe.projector) if recipe.projector.lstrip().startswith("{") else {"name": recipe.projector}
    if not isinstance(spec, dict) or "name" not in spec:
        raise RecipeError(f"projector has to be a registered projector name or a JSON config with 'name', but got {recipe.projector!r}")
    return spec


def _assemble(encoder: torch.nn.Module, llm: torch.nn.Module, tokenizer: Any, image_size: int,
              projector: dict[str, Any] | None = None) -> Any:
    """A Llava model holding ``encoder`` as its tower and ``llm``'s own modules (no copies)."""
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from ..hf.projector import MixresProjector, llava_class_for

    if projector is not None:
        projector = {**projector, "out_dim": llm.config.hidden_size}
    vision = MixresVisionConfig.from_encoder(encoder, image_size, projector=projector)
    config = LlavaConfig(vision_config=vision, text_config=llm.config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                         image_seq_length=vision.num_image_tokens,
                         tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    # A skeleton whose sub-models are replaced below. Under ZeRO-3 transformers builds each sub-model
    # (``from_config``) inside zero.Init and then initialises it gathered, which fails on meta tensors
    # ("Cannot copy out of meta tensor"); set_zero3_state (transformers' own guard against nested
    # zero.Init) skips that: nothing of the skeleton is kept, deepspeed.initialize partitions the real parts.
    from transformers.modeling_utils import set_zero3_state

    with torch.device("meta"), set_zero3_state():
        model = llava_class_for(config)(config)
    dtype = llm.get_input_embeddings().weight.dtype
    model.model.vision_tower = MixresVisionModel(config.vision_config, encoder=encoder.to(dtype))
    # nn.Linear init, as LLaVA's; or the registered projector's own init
    model.model.multi_modal_projector = (MixresProjector(config) if projector else LlavaMultiModalProjector(config)).to(dtype)
    model.model.language_model = llm.get_decoder()
    model.lm_head = llm.get_output_embeddings()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def build_model(recipe: RecipeArguments, training: TrainingArguments | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: loaded from ``recipe.model``, or a new LLaVA with our tower.

    A new model: the encoder ``vision_preset`` with ``vision_overrides`` (random or
    ``vision_weights``), a fresh projector (LLaVA's ``mlp2x_gelu``, or the registered
    ``projector``) and the LLM ``llm`` (``tiny``: a random Llama over a word-level
    tokenizer built from the data). Its image size is set to the recipe's.

    Raises:
        RecipeError: ``model`` / ``llm`` are no local directories, or the loaded model's tower
            is not a mixres tower.
    """
    register_auto_classes()
    dtype = _dtype(training) if training is not None else torch.float32
    if recipe.model:
        model, tokenizer = _load_llava(recipe.model, dtype)
    elif recipe.llm == "tiny":
        tokenizer = build_tokenizer(data_texts(recipe.data_path, recipe.eval_data_path, recipe.vocab_data))
        model = _assemble(_encoder(recipe), _tiny_llm(tokenizer, recipe.llm_init_range), tokenizer, _image_size(recipe, None),
                          _projector_spec(recipe))
    else:
        llm, tokenizer = _load_llm(recipe, dtype)
        model = _assemble(_encoder(recipe), llm, tokenizer, _image_size(recipe, None), _projector_spec(recipe))
    set_image_size(model, _image_size(recipe, model))
    return model, tokenizer


def _load_llava(path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from ..hf.projector import llava_class_for

    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise RecipeError(f"model has to be a local LLaVA directory (save_pretrained output, e.g. stage 1's output_dir), "
                          f"but {path!r} holds no config.json")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    model = llava_class_for(config).from_pretrained(directory, local_files_only=True, dtype=dtype)
    if not isinstance(model.model.vision_tower, MixresVisionModel):
        raise RecipeError(f"{path!r} has a {type(model.model.vision_tower).__name__} vision tower; the recipe trains a "
                          "mixres tower: mrify it first (mixres.integrations.hf.mrify) and save it")
    return model, AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _image_size(recipe: RecipeArguments, model: Any) -> int:
    if recipe.image_size is not None:
        return recipe.image_size
    if model is not None:
        return int(model.config.vision_config.image_size)
    size = mixres.ENCODERS.resolve(recipe.vision_preset, **recipe.vision_overrides_dict).get("image_size")
    if size is None:
        raise RecipeError(f"vision_preset {recipe.vision_preset!r} sets no image_size; pass --image_size")
    return int(size if isinstance(size, int) else size[0])


def set_image_size(model: Any, image_size: int) -> int:
    """Make the tower read ``image_size`` px (config, token count); returns tokens per image.

    Stage 1 and stage 2 read different sizes (384 / 1024 px: 576 / 1024 tokens); the data
    expands ``<image>`` to this count.
    """
    tower = model.model.vision_tower
    projector = tower.config.projector
    new = MixresVisionConfig.from_encoder(tower.encoder, image_size, projector=projector)
    for config in {id(c): c for c in (tower.config, model.config.vision_config)}.values():
        config.image_size, config.patch_size, config.num_image_tokens = new.image_size, new.patch_size, new.num_image_tokens
        config.feature_grid = new.feature_grid
        if "image_size" in config.encoder:
            config.encoder = dict(config.encoder, image_size=image_size)
    tower.patch_size = new.patch_size
    model.config.image_seq_length = new.num_image_tokens
    return new.num_image_tokens


def processor_for(model: Any, tokenizer: Any, aspect_ratio: str = "pad") -> Any:
    """A ``LlavaProcessor`` that prepares images as the recipe did (for ``load_pretrained``)."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    vision = model.config.vision_config
    side = int(vision.image_size)
    images = LlavaImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                 do_pad=aspect_ratio == "pad", image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    # LlavaProcessor expands <image> to (side // patch_size)^2 + num_additional_image_tokens: the grid
    # when the tokens lie on one that divides the image, else one "patch" plus the rest as additional
    extra = int(vision.num_image_tokens) - (side // int(vision.patch_size)) ** 2
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=int(vision.patch_size),
                          vision_feature_select_strategy="full", num_additional_image_tokens=extra, image_token=IMAGE_TOKEN)


class ProcessorImages:
    """The image half of a saved processor as the dataset's ``image_processor``: one image path.

    Training (:class:`~.data.LlavaDataset`), evaluation (:func:`~.evaluation.predict`) and
    inference (:func:`~mixres.integrations.hf.generate`) all turn images into pixels with the
    processor saved beside the model, so the three cannot drift apart.

    Args:
        processor: a ``LlavaProcessor`` (or anything with an ``image_processor``).
    """

    def __init__(self, processor: Any) -> None:
        self.image_processor = getattr(processor, "image_processor", processor)
        crop = getattr(self.image_processor, "crop_size", None) or {}
        self.size = int(crop.get("height") or self.image_processor.size["shortest_edge"])

    def __call__(self, image: Any) -> torch.Tensor:
        """One PIL image -> ``Tensor[3, size, size]`` (normalised)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ProcessorImages({type(self.image_processor).__name__}, size={self.size})"
