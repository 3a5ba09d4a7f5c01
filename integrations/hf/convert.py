"""Convert an official LLaVA-HR checkpoint into a transformers ``LlavaForConditionalGeneration``
directory whose vision tower is a :class:`~mixres.integrations.hf.modeling.MixresVisionModel`.

The release (github.com/luogen1996/LLaVA-HR) saves a ``LlavaLlamaForCausalLM``: the Llama keys
(``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``), the vision tower
under ``model.vision_tower.*`` and the ``mlp2x_gelu`` projector as ``model.mm_projector.{0,2}``.
The vision part goes through :func:`mixres.convert.load_llava_hr_vision` into the encoder preset
(:func:`mixres.convert.preset_for`: ``llava-hr-7b-<input_image_size>`` or ``llava-hr-x-1024``,
unless given), in the checkpoint's dtype; the rest is renamed (``rotary_emb.inv_freq`` buffers,
if an older transformers saved them, are dropped):

| release | transformers Llava |
|---|---|
| ``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*`` | ``model.language_model.*`` |
| ``lm_head.*`` | ``lm_head.*`` |
| ``model.mm_projector.0.*`` / ``.2.*`` | ``model.multi_modal_projector.linear_1.*`` / ``linear_2.*`` |
| encoder (``model.vision_tower.*``) | ``model.vision_tower.encoder.*`` |

The release marks images with the id -200 in the token stream; transformers needs a real
token, so ``<image>`` is added to the tokenizer (and ``<pad>`` if it has no pad token) and the
embeddings grow to a multiple of 64 rows, new rows the mean of the old ones. The processor
(:func:`~mixres.integrations.hf.images.release_image_processor`) pads to a square with the mean
colour, resizes to ``input_image_size`` and uses the Vicuna v1 prompt of LLaVA-1.5
(``USER: <image>\\n... ASSISTANT:``) as its chat template. Its PIL backend reproduces the
release's preprocessing; the tower's config records it (``image_backend="pil"``), so
:func:`~mixres.integrations.hf.inference.load_pretrained` loads that backend, while a plain
``AutoProcessor.from_pretrained(dst)`` gives transformers' torchvision default unless asked
(``backend="pil"``; see docs/converting.md for the measured difference). Output is written to a temporary directory renamed into place. Nothing is
downloaded: ``src`` is a local directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlavaConfig, LlavaProcessor

from mixres.convert import (
    DTYPES,
    ConversionReport,
    atomic_directory,
    check_destination,
    checkpoint_dtype,
    load_llava_hr_vision,
    projector_from_checkpoint,
    read_checkpoint,
    read_json,
    resolve_encoder_config,
)
from mixres.errors import WeightsError
from mixres.registry import build

from .errors import ModelPathError
from .images import release_image_processor
from .modeling import MixresVisionConfig

__all__ = ["convert_llava_hr", "LLM_RENAMES", "VICUNA_TEMPLATE"]

LLM_RENAMES: dict[str, str] = {
    "model.embed_tokens.": "model.language_model.embed_tokens.",
    "model.layers.": "model.language_model.layers.",
    "model.norm.": "model.language_model.norm.",
    "lm_head.": "lm_head.",
    "model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
    "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
}
_VISION_PREFIX = "model.vision_tower."
_EMBEDDINGS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
VICUNA_TEMPLATE = (
    "{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human\\'s questions. ' }}"
    "{% for message in messages %}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{{ ' ' if message['role'] == 'user' else '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _text_config(official: dict[str, Any]) -> LlamaConfig:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "head_dim", "tie_word_embeddings")
    return LlamaConfig(**{k: official[k] for k in fields if official.get(k) is not None})


def _rename_llm(state: dict[str, torch.Tensor], report: ConversionReport) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(_VISION_PREFIX):
            continue
        if key.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; recomputed from rope_theta
            report.dropped.append(key)
            continue
        old = next((p for p in LLM_RENAMES if key.startswith(p)), None)
        if old is None:
            unknown.append(key)
        else:
            out[LLM_RENAMES[old] + key[len(old):]] = value
    if unknown:
        raise WeightsError(f"{len(unknown)} release key(s) have no place in a Llava model: {sorted(unknown)[:8]}")
    missing = [k for k in (*_EMBEDDINGS, "model.multi_modal_projector.linear_1.weight") if k not in out]
    if missing:
        raise WeightsError(f"the release checkpoint lacks {missing}; is it a full LLaVA-HR model (not a projector-only one)?")
    return out


def _grow_embeddings(tensors: dict[str, torch.Tensor], rows: int) -> None:
    for key in _EMBEDDINGS:
        old = tensors[key]
        if old.shape[0] < rows:
            extra = old.float().mean(0, keepdim=True).expand(rows - old.shape[0], -1).to(old.dtype)
            tensors[key] = torch.cat([old, extra])


def _tokenizer(src: Path, tokenizer: Any) -> Any:
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelPathError(f"no tokenizer could be read from {str(src)!r} ({err}); pass tokenizer=...") from None
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.image_token = "<image>"
    return tokenizer


def convert_llava_hr(src: str | Path, dst: str | Path, *, preset: str | dict[str, Any] | None = None,
                     tokenizer: Any = None, dtype: torch.dtype | str | None = None,
                     overwrite: bool = False) -> ConversionReport:
    """Write a ``save_pretrained`` directory (model + processor) converted from an official checkpoint.

    Args:
        src: the release directory: ``config.json``, weight shards (``model*.safetensors`` /
            ``pytorch_model*.bin``) and tokenizer files.
        dst: the output directory (validated first, written as one unit); load it with
            :func:`~mixres.integrations.hf.load_pretrained`.
        preset: the encoder preset the checkpoint was trained with (a name, a config dict or a
            ``.json`` file); ``None``: from the release config (``llava-hr-7b-<input_image_size>``,
            ``llava-hr-x-1024`` for ConvNeXt-XXL).
        tokenizer: the tokenizer, if ``src`` has none.
        dtype: cast the weights (``"bf16"`` / ``"fp16"`` / ``"fp32"`` or a torch dtype; ``None``: as stored).
        overwrite: replace an earlier conversion at ``dst``.

    Returns:
        The vision part's :class:`~mixres.convert.ConversionReport` (all keys accounted for).

    Raises:
        ModelPathError: ``src`` does not exist, has no ``config.json`` or no tokenizer.
        WeightsError: release keys left over or missing, shapes that do not fit the preset,
            unreadable files or JSON (the message names the file).
        MixresError: ``dst`` is a file, a non-empty directory without ``overwrite``, or not writable.
    """
    src = Path(src).expanduser()
    dst = check_destination(dst, overwrite=overwrite, marker="config.json")
    if not (src / "config.json").is_file():
        raise ModelPathError(f"{str(src)!r} is not an official LLaVA-HR directory (no config.json there)")
    official = read_json(src / "config.json", "release config")
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise WeightsError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} or a torch dtype")
    state = read_checkpoint(src)
    projector = projector_from_checkpoint(state)
    if projector["name"] != "mlp2x_gelu":
        raise WeightsError(f"the checkpoint's projector is {projector['name']}; transformers' Llava has mlp2x_gelu only")
    vision_state = {k: v for k, v in state.items() if k.startswith(_VISION_PREFIX)}
    encoder = build({"kind": "encoder", **resolve_encoder_config(preset, src, official)}).to(checkpoint_dtype(vision_state))
    report = load_llava_hr_vision(encoder, vision_state)
    if not report.ok:
        raise WeightsError(f"the vision part of {str(src)!r} does not fit the encoder preset:\n{report.summary()}")
    tensors = _rename_llm(state, report)
    tokenizer = _tokenizer(src, tokenizer)
    text = _text_config(official)
    text.vocab_size = max(text.vocab_size, math.ceil(len(tokenizer) / 64) * 64)
    text.pad_token_id = tokenizer.pad_token_id
    _grow_embeddings(tensors, text.vocab_size)
    tensors.update({f"model.vision_tower.encoder.{k}": v for k, v in encoder.state_dict().items()})
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    vision = MixresVisionConfig.from_encoder(encoder, image_backend="pil")  # the release's resize (images.py)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=vision.num_image_tokens,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = next(iter(tensors.values())).dtype if dtype is None else dtype
    processor = LlavaProcessor(image_processor=release_image_processor(vision.image_size), tokenizer=tokenizer,
                               patch_size=vision.patch_size, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, chat_template=VICUNA_TEMPLATE)
    with atomic_directory(dst, overwrite=overwrite, marker="config.json") as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        processor.save_pretrained(tmp)
    return report
