"""LLaVA-HR's two-stage training recipe on transformers' ``Trainer``.

Source: arXiv 2403.03003 Sec. 4.1 (training details) and the release's ``scripts/v1_5/``
(``pretrain_llava_hr.sh``, ``finetune_llava_hr.sh``). The model is a transformers
``LlavaForConditionalGeneration`` whose vision tower is a
:class:`~mixres.integrations.hf.MixresVisionModel` (a dual-pathway encoder), so what this
recipe saves loads with :func:`~mixres.integrations.hf.load_pretrained`.

- **Stage 1** (``stage: 1``, low res: 384 px, ViT 336): only the projector and the final fusion
  learn; both encoders, the MR-Adapters (identity at init, so absent in effect) and the LLM are
  frozen. Template ``plain``; lr 1e-3, batch 256.
- **Stage 2** (``stage: 2``, high res: 1024 px, ViT 448): everything learns, adapters included;
  ``freeze: vit,cnn,llm`` keeps named parts fixed and ``lora: true`` trains the LLM through
  LoRA (peft) instead. Template ``vicuna_v1``; lr 2e-5, batch 128, max length 2496, ZeRO-3,
  images padded to square with the mean colour.

A recipe is a JSON / YAML file of arguments (:class:`RecipeArguments` and transformers'
``TrainingArguments``, flat), shipped in ``recipes/``; command-line flags override it::

    python -m mixres.integrations.llava.train --recipe tiny-stage1 --output_dir runs/s1
    python -m mixres.integrations.llava.train --recipe tiny-stage2 --model runs/s1 --output_dir runs/s2
    accelerate launch --config_file integrations/llava/fsdp.yaml -m mixres.integrations.llava.train ...
    torchrun --nproc_per_node 8 -m mixres.integrations.llava.train --recipe llava-hr-7b-stage2 ...

Where we differ from the release: the model is transformers' Llava (image tokens are expanded
in the data, :mod:`.data`); a batch with no image at all still runs the vision tower on a
blank image (weight 0 in the loss), so every process of a DDP / ZeRO-3 job uses the same
parameters in every step, as the release does with its zero-size image features; with no
``data_path`` the recipe trains on the synthetic fine-detail data (:mod:`.synthetic`) and a
tiny word-level tokenizer built from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments

import mixres
from mixres.errors import MixresError

from ..hf.modeling import MixresVisionConfig, MixresVisionModel, register_auto_classes
from .data import CLIP_MEAN, CLIP_STD, ImagePreprocessor, LlavaCollator, LlavaDataset, tokenize_conversation
from .synthetic import ANSWERS, exact_match, generate_dataset
from .templates import VICUNA_SYSTEM, Rendered, get_template

__all__ = [
    "RECIPES",
    "PARTS",
    "STAGE1_TRAINED",
    "TINY_LLM",
    "RecipeError",
    "RecipeArguments",
    "list_recipes",
    "load_recipe",
    "parse_args",
    "synthetic_data",
    "build_tokenizer",
    "build_model",
    "set_image_size",
    "set_trainable",
    "apply_lora",
    "merge_lora",
    "part_parameters",
    "LlavaTrainer",
    "processor_for",
    "train",
    "predict",
    "evaluate",
    "main",
]

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parent / "recipes"
#: parts of the model that ``freeze`` names (``vit``: token pathway, ``cnn``: map pathway)
PARTS: tuple[str, ...] = ("vit", "cnn", "adapters", "final_fusion", "projector", "llm")
_ENCODER_PART = {"vit": "token_pathway", "cnn": "map_pathway", "adapters": "adapters", "final_fusion": "final_fusion"}
STAGE1_TRAINED: tuple[str, ...] = ("projector", "final_fusion")
IMAGE_TOKEN = "<image>"
#: the LLM of ``llm: tiny`` (a random Llama; the vocabulary comes from the tokenizer)
TINY_LLM: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)
_SPECIAL = ("<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN)


class RecipeError(MixresError):
    """A recipe file or argument is wrong: the message names it and what is allowed."""


# ---------------------------------------------------------------------------------------------
# arguments


@dataclass
class RecipeArguments:
    """The recipe's own arguments (the rest are transformers' ``TrainingArguments``).

    Args:
        stage: 1 (projector + final fusion) or 2 (everything but ``freeze``).
        model: a LLaVA directory to start from (a previous stage's ``output_dir``, or a
            converted LLaVA-HR); ``None``: build one from ``vision_preset`` + ``llm``.
        vision_preset: the mixres encoder preset of a new model (``mixres.list_encoders()``).
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
        freeze: stage 2: comma-separated parts of :data:`PARTS` kept fixed.
        lora: stage 2: train the LLM through LoRA adapters (peft) instead of fully.
        lora_r: LoRA rank (LLaVA: 128).
        lora_alpha: LoRA alpha (LLaVA: 256).
        lora_dropout: LoRA dropout (LLaVA: 0.05).
        global_batch_size: samples per optimizer step over all processes; sets
            ``gradient_accumulation_steps`` from the batch per device and the world size.
        synthetic_samples: training samples of the synthetic data.
        synthetic_image_size: side in pixels of the synthetic images.
    """

    stage: int = 2
    model: str | None = None
    vision_preset: str = "llava-hr-tiny"
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
    freeze: str = ""
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    global_batch_size: int | None = None
    synthetic_samples: int = 256
    synthetic_image_size: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.freeze, (list, tuple)):
            self.freeze = ",".join(self.freeze)
        if self.stage not in (1, 2):
            raise RecipeError(f"stage has to be 1 or 2, but got {self.stage!r}")
        unknown = sorted(set(self.frozen_parts) - set(PARTS))
        if unknown:
            raise RecipeError(f"freeze takes parts {list(PARTS)}, but got {unknown}")
        if self.stage == 1 and (self.frozen_parts or self.lora):
            raise RecipeError("stage 1 trains the projector and the final fusion only; freeze and lora apply to stage 2")
        if self.lora and "llm" in self.frozen_parts:
            raise RecipeError("lora trains the LLM through adapters; it cannot be combined with freeze=llm")
        get_template(self.template)  # unknown names raise here, before anything is built
        if self.aspect_ratio not in ("pad", "crop"):
            raise RecipeError(f"aspect_ratio has to be 'pad' or 'crop', but got {self.aspect_ratio!r}")
        if self.on_error not in ("raise", "skip"):
            raise RecipeError(f"on_error has to be 'raise' or 'skip', but got {self.on_error!r}")

    @property
    def frozen_parts(self) -> list[str]:
        """``freeze`` as a list of part names."""
        return [p.strip() for p in self.freeze.split(",") if p.strip()]


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
        RecipeError: no such file or name (the shipped names are listed), or not a mapping.

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
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
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


# ---------------------------------------------------------------------------------------------
# data and tokenizer


def synthetic_data(root: str | os.PathLike[str], *, num_train: int, num_test: int = 0,
                   image_size: int = 256, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic fine-detail data once and a stage-1 view of it.

    Returns ``{"root", "train", "train_stage1", "test"}``: ``train_stage1`` holds the image
    samples' first question and answer only (``plain`` takes one image and one answer; it drops
    the question, so the answer acts as the caption). Images are square, ``image_size`` px,
    with details 8-10 px. A folder already written with the same arguments is reused.
    """
    root = Path(root)
    stamp = root / "synthetic.json"
    spec = {"num_train": num_train, "num_test": num_test, "image_size": image_size, "seed": seed}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == spec):
        detail = (8, min(12, image_size // 24))
        paths = generate_dataset(root, num_train, num_test, image_size=image_size, seed=seed, detail_px=detail)
        records = json.loads(paths.train_json.read_text())
        single = [dict(r, conversations=r["conversations"][:2]) for r in records if r.get("image")]
        (root / "train_stage1.json").write_text(json.dumps(single, indent=1) + "\n")
        stamp.write_text(json.dumps(spec))
    return {"root": root, "train": root / "train.json", "train_stage1": root / "train_stage1.json",
            "test": root / "test.json"}


def _split(text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers

    return [w for w, _ in _pre_tokenizer(pre_tokenizers, Regex).pre_tokenize_str(text)]


def _pre_tokenizer(pre_tokenizers: Any, regex: Any) -> Any:
    # words (with inner hyphens: "top-left"), single punctuation marks, and newlines as tokens
    return pre_tokenizers.Split(regex(r"\n|[\w-]+|[^\w\s]"), behavior="removed", invert=True)


def build_tokenizer(texts: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts`` (plus the answers and Vicuna's prompt).

    Words, punctuation marks and ``"\\n"`` are tokens; ``<image>``, ``<s>``, ``</s>``,
    ``<pad>``, ``<unk>`` are special; a BOS is prepended. The vocabulary is sorted, so every
    process building it from the same texts gets the same ids.

    Example:
        >>> tok = build_tokenizer(["What colour is the small shape?"])
        >>> tok.convert_ids_to_tokens(tok("<image>\\nWhat colour ?")["input_ids"])
        ['<s>', '<image>', '\\n', 'What', 'colour', '?']
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    words = set(ANSWERS) | set(_split(VICUNA_SYSTEM + " USER: ASSISTANT: \n"))
    for text in texts:
        words.update(_split(text))
    vocab = {w: i for i, w in enumerate([*_SPECIAL, *sorted(words - set(_SPECIAL))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer(pre_tokenizers, Regex)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def _texts(*paths: Any) -> list[str]:
    texts = []
    for path in paths:
        if path is not None and Path(path).is_file():
            for record in json.loads(Path(path).read_text()):
                texts += [t.get("value", "") for t in record.get("conversations", []) if isinstance(t, Mapping)]
    return texts


# ---------------------------------------------------------------------------------------------
# model


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


def _tiny_llm(tokenizer: Any) -> torch.nn.Module:
    config = transformers.LlamaConfig(**TINY_LLM, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config)


def _encoder(recipe: RecipeArguments) -> torch.nn.Module:
    weights: Any = False
    if recipe.vision_weights:
        spec = recipe.vision_weights
        weights = dict(kv.split("=", 1) for kv in spec.split(",")) if "=" in spec else spec
    return mixres.create_encoder(recipe.vision_preset, pretrained=weights)


def _assemble(encoder: torch.nn.Module, llm: torch.nn.Module, tokenizer: Any, image_size: int) -> Any:
    """A Llava model holding ``encoder`` as its tower and ``llm``'s own modules (no copies)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vision = MixresVisionConfig.from_encoder(encoder, image_size)
    config = LlavaConfig(vision_config=vision, text_config=llm.config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                         image_seq_length=vision.num_image_tokens,
                         tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    dtype = llm.get_input_embeddings().weight.dtype
    model.model.vision_tower = MixresVisionModel(config.vision_config, encoder=encoder.to(dtype))
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)  # nn.Linear init, as LLaVA's
    model.model.language_model = llm.get_decoder()
    model.lm_head = llm.get_output_embeddings()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def build_model(recipe: RecipeArguments, training: TrainingArguments | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: loaded from ``recipe.model``, or a new LLaVA with our tower.

    A new model: the encoder ``vision_preset`` (random or ``vision_weights``), a fresh
    ``mlp2x_gelu`` projector and the LLM ``llm`` (``tiny``: a random Llama over a word-level
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
        tokenizer = build_tokenizer(_texts(recipe.data_path, recipe.eval_data_path, recipe.vocab_data))
        model = _assemble(_encoder(recipe), _tiny_llm(tokenizer), tokenizer, _image_size(recipe, None))
    else:
        llm, tokenizer = _load_llm(recipe, dtype)
        model = _assemble(_encoder(recipe), llm, tokenizer, _image_size(recipe, None))
    set_image_size(model, _image_size(recipe, model))
    return model, tokenizer


def _load_llava(path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise RecipeError(f"model has to be a local LLaVA directory (save_pretrained output, e.g. stage 1's output_dir), "
                          f"but {path!r} holds no config.json")
    model = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True, dtype=dtype)
    if not isinstance(model.model.vision_tower, MixresVisionModel):
        raise RecipeError(f"{path!r} has a {type(model.model.vision_tower).__name__} vision tower; the recipe trains a "
                          "mixres tower: mrify it first (mixres.integrations.hf.mrify) and save it")
    return model, AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _image_size(recipe: RecipeArguments, model: Any) -> int:
    if recipe.image_size is not None:
        return recipe.image_size
    if model is not None:
        return int(model.config.vision_config.image_size)
    return int(mixres.ENCODERS.get_preset(recipe.vision_preset).get("image_size"))


def set_image_size(model: Any, image_size: int) -> int:
    """Make the tower read ``image_size`` px (config, token count); returns tokens per image.

    Stage 1 and stage 2 read different sizes (384 / 1024 px: 576 / 1024 tokens); the data
    expands ``<image>`` to this count.
    """
    tower = model.model.vision_tower
    new = MixresVisionConfig.from_encoder(tower.encoder, image_size)
    for config in {id(c): c for c in (tower.config, model.config.vision_config)}.values():
        config.image_size, config.patch_size, config.num_image_tokens = new.image_size, new.patch_size, new.num_image_tokens
        config.encoder = dict(config.encoder, image_size=image_size)
    tower.patch_size = new.patch_size
    model.config.image_seq_length = new.num_image_tokens
    return new.num_image_tokens


def part_parameters(model: Any) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The named parameters of each of :data:`PARTS` (LoRA weights count as ``llm``)."""
    encoder = model.model.vision_tower.encoder
    out: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for part, attr in _ENCODER_PART.items():
        module = getattr(encoder, attr)
        out[part] = list(module.named_parameters(prefix=attr)) if module is not None else []
    out["projector"] = list(model.model.multi_modal_projector.named_parameters(prefix="projector"))
    out["llm"] = [*model.model.language_model.named_parameters(prefix="language_model"),
                  *model.lm_head.named_parameters(prefix="lm_head")]
    return out


def set_trainable(model: Any, stage: int, freeze: Sequence[str] = ()) -> list[str]:
    """Set ``requires_grad`` for a stage; returns the parts that train.

    Stage 1: the projector and the final fusion. Stage 2: every part not in ``freeze``. A map
    pathway that no fusion reads (a low-res-only encoder) is frozen, as it gets no gradient.
    """
    encoder = model.model.vision_tower.encoder
    frozen = set(PARTS) - set(STAGE1_TRAINED) if stage == 1 else set(freeze)
    if not len(encoder.adapters) and encoder.final_fusion is None:
        frozen.add("cnn")
    model.requires_grad_(False)
    encoder.set_freeze([_ENCODER_PART[p] for p in _ENCODER_PART if p in frozen])
    model.model.multi_modal_projector.requires_grad_("projector" not in frozen)
    model.model.language_model.requires_grad_("llm" not in frozen)
    model.lm_head.requires_grad_("llm" not in frozen)
    return [p for p, params in part_parameters(model).items() if params and any(q.requires_grad for _, q in params)]


def apply_lora(model: Any, recipe: RecipeArguments) -> int:
    """Put LoRA adapters (peft) on every linear layer of the LLM; the LLM's own weights freeze.

    The adapters live inside the model (``inject_adapter_in_model``), so checkpoints hold them
    with everything else and resume as usual; :func:`merge_lora` folds them in before export.
    Returns the number of adapted layers.
    """
    from peft import LoraConfig, inject_adapter_in_model

    llm = model.model.language_model
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

    llm = model.model.language_model
    for name, module in list(llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent) if parent else llm, child, module.get_base_layer())


# ---------------------------------------------------------------------------------------------
# training


class LlavaTrainer(Trainer):
    """``Trainer`` whose image-free batches still run the vision tower (weight 0 in the loss).

    Without it, a step where one process sees no image leaves the tower's parameters without a
    gradient there but not elsewhere: DDP waits for them and ZeRO-3 gathers them out of step.
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if "pixel_values" not in inputs and model.training:
            loss = loss + 0.0 * self._blank_image_features(model)
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load a checkpoint's weights under the model's own parameter names.

        transformers writes LLaVA checkpoints with the original key names
        (``language_model.model.*``, ``vision_tower.*``) but ``Trainer`` loads them back with
        ``load_state_dict(strict=False)``, so no key would match and resuming would silently keep
        the fresh weights. The keys are renamed with transformers' own conversion mapping and
        every parameter has to be found. (DeepSpeed and FSDP checkpoints load their own way.)
        """
        model = model if model is not None else self.model
        file = Path(resume_from_checkpoint) / "model.safetensors"
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not file.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

        inner = self.accelerator.unwrap_model(model)
        renamings = [c for c in get_model_conversion_mapping(inner, add_legacy=False)
                     if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)]
        state = {apply_renamings(k, renamings): v for k, v in load_file(file, device="cpu").items()}
        missing, unexpected = inner.load_state_dict(state, strict=False)
        loaded = {t.data_ptr() for n, t in inner.state_dict().items() if n in state}
        missing = [k for k in missing if inner.state_dict()[k].data_ptr() not in loaded]  # tied weights are saved once
        if missing or unexpected:
            raise RecipeError(f"checkpoint {str(resume_from_checkpoint)!r} does not fit the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} keys)")

    def _blank_image_features(self, model: Any) -> torch.Tensor:
        inner = self.accelerator.unwrap_model(model)
        config = inner.config.vision_config
        side = int(config.image_size)
        ref = inner.model.multi_modal_projector.linear_1.weight
        blank = torch.zeros(1, 3, side, side, device=ref.device, dtype=ref.dtype)
        features = inner.model.get_image_features(pixel_values=blank, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="full").pooler_output
        return sum(f.sum() for f in features)


def _dataset(recipe: RecipeArguments, tokenizer: Any, model: Any, data_path: Any) -> LlavaDataset:
    size = int(model.config.vision_config.image_size)
    return LlavaDataset(data_path, tokenizer, num_image_tokens=int(model.config.vision_config.num_image_tokens),
                        image_folder=recipe.image_folder, template=recipe.template, max_length=recipe.max_length,
                        image_processor=ImagePreprocessor(size, aspect_ratio=recipe.aspect_ratio), on_error=recipe.on_error)


def _default_data(recipe: RecipeArguments, training: TrainingArguments) -> RecipeArguments:
    """Point ``data_path`` at the synthetic data (written by the main process first)."""
    if recipe.data_path is not None:
        return recipe
    root = Path(training.output_dir or ".") / "data"
    with training.main_process_first(desc="writing the synthetic data"):
        paths = synthetic_data(root, num_train=recipe.synthetic_samples, num_test=max(16, recipe.synthetic_samples // 8),
                               image_size=recipe.synthetic_image_size, seed=training.seed)
    recipe.data_path = str(paths["train_stage1" if recipe.stage == 1 else "train"])
    recipe.eval_data_path = recipe.eval_data_path or str(paths["test"])
    recipe.vocab_data = recipe.vocab_data or str(paths["train"])
    return recipe


def processor_for(model: Any, tokenizer: Any, aspect_ratio: str = "pad") -> Any:
    """A ``LlavaProcessor`` that prepares images as the recipe did (for ``load_pretrained``)."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    vision = model.config.vision_config
    side = int(vision.image_size)
    images = LlavaImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                 do_pad=aspect_ratio == "pad", image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=int(vision.patch_size),
                          vision_feature_select_strategy="full", num_additional_image_tokens=0, image_token=IMAGE_TOKEN)


def train(recipe: RecipeArguments, training: TrainingArguments,
          callbacks: Sequence[transformers.TrainerCallback] = ()) -> LlavaTrainer:
    """Run one stage: build or load the model, set what trains, train, save, evaluate.

    Saves to ``training.output_dir``: the model (LoRA merged), tokenizer and processor
    (``load_pretrained`` reads it), ``recipe.json``, and ``eval.json`` when there is eval data.
    Checkpoints every ``save_steps``; ``resume_from_checkpoint`` continues one.

    Returns:
        The trainer (``trainer.model`` is the trained model).
    """
    transformers.set_seed(training.seed)
    recipe = _default_data(recipe, training)
    training.remove_unused_columns = False  # the collator reads the dataset's own keys
    model, tokenizer = build_model(recipe, training)
    trained = set_trainable(model, recipe.stage, recipe.frozen_parts)
    if getattr(training, "activation_checkpointing", False) or getattr(training, "gradient_checkpointing", False):
        # the encoder's own (transformers' reaches the LLM and an HF ViT only)
        model.model.vision_tower.encoder.set_grad_checkpointing(True)
    if recipe.lora:
        apply_lora(model, recipe)
    dataset = _dataset(recipe, tokenizer, model, recipe.data_path)
    _log_plan(recipe, model, trained, dataset)
    trainer = LlavaTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer,
                           data_collator=LlavaCollator.from_dataset(dataset), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=_resume(training.resume_from_checkpoint))
    if recipe.lora:
        merge_lora(trainer.model)
    trainer.save_model()
    if trainer.is_world_process_zero() and training.output_dir:
        processor_for(trainer.model, tokenizer, recipe.aspect_ratio).save_pretrained(training.output_dir)
        Path(training.output_dir, "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
        if dataset.skipped:
            logger.warning("%d samples were skipped (on_error='skip'): %s", dataset.skipped, dataset.skipped_ids[:10])
        if recipe.eval_data_path:
            scores = evaluate(trainer.model, tokenizer, recipe.eval_data_path, template=recipe.template,
                              image_folder=recipe.image_folder, aspect_ratio=recipe.aspect_ratio)
            Path(training.output_dir, "eval.json").write_text(json.dumps(scores, indent=1) + "\n")
            logger.info("eval exact match: %s", scores["accuracy"])
    return trainer


def _resume(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _log_plan(recipe: RecipeArguments, model: Any, trained: list[str], dataset: LlavaDataset) -> None:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("stage %d: training %s (%s of %s parameters%s); %r", recipe.stage, trained, f"{n_train:,}",
                   f"{n_all:,}", ", LoRA on the LLM" if recipe.lora else "", dataset)


# ---------------------------------------------------------------------------------------------
# inference


def _prompt(record: Mapping[str, Any], template: Any, tokenizer: Any) -> Rendered:
    """The first question rendered up to where its answer starts."""
    question = record["conversations"][0]["value"]
    if record.get("image") and IMAGE_TOKEN in question:
        question = IMAGE_TOKEN + "\n" + question.replace(IMAGE_TOKEN, "").strip()
    rendered = template.render([{"from": "human", "value": question}, {"from": "gpt", "value": ""}], tokenizer)
    return Rendered(rendered.text[: rendered.targets[0][0]], (), rendered.add_special_tokens)


@torch.no_grad()
def predict(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], *, template: str = "vicuna_v1",
            image_folder: str | os.PathLike[str] = ".", aspect_ratio: str = "pad", batch_size: int = 32,
            max_new_tokens: int = 6) -> dict[str, str]:
    """Greedy answers to the first question of each record (LLaVA JSON), images as in training.

    Returns:
        ``{id: answer}``; an answer ends at the first end-of-turn or newline.
    """
    model.eval()
    vision = model.config.vision_config
    prep = ImagePreprocessor(int(vision.image_size), aspect_ratio=aspect_ratio)
    tpl, image_id = get_template(template), int(model.config.image_token_id)
    stops = [tokenizer.eos_token_id, *([tokenizer.convert_tokens_to_ids("\n")] if "\n" in tokenizer.get_vocab() else [])]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: dict[str, str] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        rows = [tokenize_conversation(_prompt(r, tpl, tokenizer), tokenizer, image_token_id=image_id,
                                      num_image_tokens=int(vision.num_image_tokens))[0] for r in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        images = [prep(_open(Path(image_folder) / r["image"])) for r in chunk if r.get("image")]
        if images:
            inputs["pixel_values"] = torch.stack(images).to(device, next(model.parameters()).dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad)
        for record, new in zip(chunk, out[:, width:]):
            text = tokenizer.decode(new, skip_special_tokens=True)
            answers[str(record["id"])] = text.strip().split("\n")[0].strip()
    return answers


def _open(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def evaluate(model: Any, tokenizer: Any, data_path: str | os.PathLike[str], *, template: str = "vicuna_v1",
             image_folder: str | os.PathLike[str] | None = None, aspect_ratio: str = "pad",
             limit: int | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on a LLaVA JSON file (first question of each sample).

    Returns:
        ``{"accuracy": {"all": ..., "<task>": ...}, "predictions": {id: answer}, "num_samples"}``.
    """
    records = json.loads(Path(data_path).read_text())[:limit]
    folder = image_folder if image_folder is not None else Path(data_path).parent
    answers = predict(model, tokenizer, records, template=template, image_folder=folder, aspect_ratio=aspect_ratio)
    return {"accuracy": exact_match(answers, records), "predictions": answers, "num_samples": len(records)}


def main(argv: Sequence[str] | None = None) -> LlavaTrainer:
    """The command line: ``python -m mixres.integrations.llava.train --recipe NAME [--flag value ...]``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)  # the plan (what trains, the data) and the eval scores
    recipe, training = parse_args(argv)
    return train(recipe, training)


if __name__ == "__main__":
    main()
