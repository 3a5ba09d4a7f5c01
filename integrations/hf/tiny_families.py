"""Tiny random LLaVA-OneVision, Gemma 3, Idefics3 and SmolVLM with working processors (no download).

As :mod:`~mixres.integrations.hf.tiny`: SigLIP ViTs of width 32 with 4 blocks and 4-pixel patches
on 16-pixel images (a 4x4 grid), 2-layer LLMs of width 32, the word-level tokenizer with the
family's own special tokens added after :data:`~mixres.integrations.hf.tiny.WORDS`. Each
function returns ``(model, processor)`` in eval mode.

Example:
    >>> model, processor = tiny_gemma3()
    >>> type(model).__name__, processor.image_seq_length
    ('Gemma3ForConditionalGeneration', 4)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
    SmolVLMVisionConfig,
)

from .tiny import _BLOCKS, _IMAGE, _PATCH, _WIDTH, IMAGE_TOKEN_ID, WORDS, _llama, _seeded, tiny_tokenizer

__all__ = ["tiny_llava_onevision", "tiny_gemma3", "tiny_idefics3", "tiny_smolvlm"]

_VIT = dict(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=_BLOCKS, num_attention_heads=2,
            image_size=_IMAGE, patch_size=_PATCH)
_GEMMA3_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
_IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def _vocab(extra: tuple[str, ...]) -> int:
    return len(WORDS) + len(extra)


def tiny_llava_onevision(seed: int = 0) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """LLaVA-OneVision in miniature: SigLIP (last block, no post-norm), 16-px tiles up to 2x2, Qwen2."""
    extra = ("<video>",)
    pinpoints = [[_IMAGE, 2 * _IMAGE], [2 * _IMAGE, _IMAGE], [2 * _IMAGE, 2 * _IMAGE]]
    text = Qwen2Config(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=_vocab(extra), pad_token_id=1, bos_token_id=2, eos_token_id=3)
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**_VIT, vision_use_head=False), text_config=text,
                                  image_token_index=IMAGE_TOKEN_ID, video_token_index=len(WORDS),
                                  image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    image_processor = LlavaOnevisionImageProcessor(size={"height": _IMAGE, "width": _IMAGE}, image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(image_processor=image_processor,
                                        video_processor=LlavaOnevisionVideoProcessor(size={"height": _IMAGE, "width": _IMAGE}),
                                        tokenizer=tiny_tokenizer(extra, video_token="<video>"),
                                        num_image_tokens=(_IMAGE // _PATCH) ** 2, vision_feature_select_strategy="full")
    return _seeded(seed, lambda: LlavaOnevisionForConditionalGeneration(config)), processor


def tiny_gemma3(seed: int = 0, sliding_window: int = 8) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """Gemma 3 in miniature: SigLIP (post-norm), the 2x2 average-pool projector (4 tokens), Gemma 3.

    Both LLM layers are sliding-window layers (Gemma 3's pattern starts so) of ``sliding_window``
    tokens: with the default 8, a token sees at most 16 back, so a templated conversation's
    answers need a wider one to see the image (the recipe builds it with 512).
    """
    ids = {t: len(WORDS) + i for i, t in enumerate(_GEMMA3_TOKENS)}
    text = Gemma3TextConfig(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, vocab_size=_vocab(_GEMMA3_TOKENS), sliding_window=sliding_window,
                            pad_token_id=1, bos_token_id=2, eos_token_id=3)
    config = Gemma3Config(vision_config=SiglipVisionConfig(**_VIT, vision_use_head=False), text_config=text,
                          mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"],
                          eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"])
    tokenizer = tiny_tokenizer(_GEMMA3_TOKENS, image_token="<image_soft_token>", boi_token="<start_of_image>",
                               eoi_token="<end_of_image>")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": _IMAGE, "width": _IMAGE}),
                                tokenizer=tokenizer, image_seq_length=4)
    return _seeded(seed, lambda: _random_projection(Gemma3ForConditionalGeneration(config))), processor


def _random_projection(model: Gemma3ForConditionalGeneration) -> Gemma3ForConditionalGeneration:
    # transformers leaves Gemma 3's projection weight at zeros when built from a config: the image
    # would not reach the LLM at all, so give it a random one (the scale of its other weights)
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    return model


def _idefics3_like(seed: int, config_cls: Any, vision_cls: Any, model_cls: Any, image_cls: Any, processor_cls: Any,
                   with_processor: bool = True, **video: Any):
    config = config_cls(vision_config=vision_cls(**_VIT), text_config=_llama_with(_vocab(_IDEFICS3_TOKENS)),
                        scale_factor=2, image_token_id=IMAGE_TOKEN_ID)
    if not with_processor:
        return _seeded(seed, lambda: model_cls(config)), None
    image_processor = image_cls(size={"longest_edge": 4 * _IMAGE}, max_image_size={"longest_edge": _IMAGE})
    processor = processor_cls(image_processor=image_processor, tokenizer=tiny_tokenizer(_IDEFICS3_TOKENS), image_seq_len=4,
                              **video)
    return _seeded(seed, lambda: model_cls(config)), processor


def _llama_with(vocab_size: int):
    config = _llama()
    config.vocab_size = vocab_size
    return config


def tiny_idefics3(seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Idefics3 in miniature: tiles of 16 px (up to 4x4 + the global view), pixel shuffle 2 (4 tokens), Llama."""
    return _idefics3_like(seed, Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration,
                          Idefics3ImageProcessor, Idefics3Processor)


def tiny_smolvlm(
    seed: int = 0, with_processor: bool = True
) -> tuple[SmolVLMForConditionalGeneration, SmolVLMProcessor | None]:
    """SmolVLM in miniature: as :func:`tiny_idefics3` with SmolVLM's classes.

    ``SmolVLMProcessor`` needs the ``num2words`` package; ``with_processor=False`` returns
    ``(model, None)`` without it (the model takes the same inputs as :func:`tiny_idefics3`'s processor makes).
    """
    if not with_processor:
        return _idefics3_like(seed, SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration,
                              SmolVLMImageProcessor, SmolVLMProcessor, with_processor=False)
    return _idefics3_like(seed, SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration,
                          SmolVLMImageProcessor, SmolVLMProcessor,
                          video_processor=SmolVLMVideoProcessor(max_image_size={"longest_edge": _IMAGE}))
