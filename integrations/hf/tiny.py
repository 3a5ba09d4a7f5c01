"""Tiny, randomly initialised HF MLLMs with working processors, built without any download.

For tests, docs and trying :func:`~mixres.integrations.hf.mrify` on a laptop: a word-level
tokenizer over :data:`WORDS` (``<image>`` is a special token), a CLIP / SigLIP ViT of width 32
with 4 blocks and 4-pixel patches on 16-pixel images (a 4x4 grid), and a 2-layer LLM of width
32. Each ``tiny_*`` function returns ``(model, processor)`` in eval mode.

Example:
    >>> model, processor = tiny_llava()
    >>> type(model).__name__, processor.patch_size
    ('LlavaForConditionalGeneration', 4)
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

__all__ = ["WORDS", "IMAGE_TOKEN_ID", "tiny_tokenizer", "tiny_llava", "tiny_llava_next", "tiny_paligemma"]

SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
WORDS: tuple[str, ...] = (
    *SPECIAL,
    "USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "?", "describe", "caption", "en",
    "a", "cat", "dog", "red", "blue", "square", "on", "left", "right", "and", "of", "this", "picture",
    "there", "small", "big",
)
IMAGE_TOKEN_ID = SPECIAL.index("<image>")
VOCAB_SIZE = len(WORDS)  # the LLM's vocabulary: every id it emits decodes to a word
_WIDTH, _IMAGE, _PATCH, _BLOCKS = 32, 16, 4, 4


def tiny_tokenizer(extra: tuple[str, ...] = (), **named: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS`; ``<image>`` is its image token.

    Args:
        extra: special tokens after :data:`WORDS` (ids ``len(WORDS)...``), matched anywhere in the
            text (an MLLM processor writes ``<image><image>...`` without spaces).
        named: special-token attributes (``image_token="<image_soft_token>"``, ...), default ``<image>``.

    Example:
        >>> tok = tiny_tokenizer()
        >>> tok("USER: <image> what is this ?")["input_ids"]
        [5, 4, 7, 8, 27, 12]
    """
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS + tuple(extra))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", **named},
    )
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    return tokenizer


def _clip(**kw) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=_BLOCKS,
                            num_attention_heads=2, image_size=_IMAGE, patch_size=_PATCH, **kw)


def _llama() -> LlamaConfig:
    return LlamaConfig(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=VOCAB_SIZE, pad_token_id=1, bos_token_id=2, eos_token_id=3)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5 in miniature: CLIP ViT (penultimate layer, CLS dropped), ``mlp2x_gelu``, Llama."""
    config = LlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=(_IMAGE // _PATCH) ** 2)
    image_processor = LlavaImageProcessor(size={"shortest_edge": _IMAGE}, crop_size={"height": _IMAGE, "width": _IMAGE},
                                          do_pad=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=_PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return _seeded(seed, lambda: LlavaForConditionalGeneration(config)), processor


def tiny_llava_next(seed: int = 0) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """LLaVA-NeXT (AnyRes) in miniature: 16-pixel tiles, grid pinpoints up to 2x2 tiles."""
    pinpoints = [[_IMAGE, 2 * _IMAGE], [2 * _IMAGE, _IMAGE], [2 * _IMAGE, 2 * _IMAGE]]
    config = LlavaNextConfig(vision_config=_clip(), text_config=_llama(), image_token_index=IMAGE_TOKEN_ID,
                             image_grid_pinpoints=pinpoints, image_seq_length=(_IMAGE // _PATCH) ** 2)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": _IMAGE}, crop_size={"height": _IMAGE, "width": _IMAGE},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=_PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return _seeded(seed, lambda: LlavaNextForConditionalGeneration(config)), processor


def tiny_paligemma(seed: int = 0) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """PaliGemma in miniature: SigLIP ViT (last layer, post-norm), a linear projector, Gemma."""
    vision = SiglipVisionConfig(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=_BLOCKS,
                                num_attention_heads=2, image_size=_IMAGE, patch_size=_PATCH, vision_use_head=False)
    text = GemmaConfig(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, vocab_size=VOCAB_SIZE, pad_token_id=1, bos_token_id=2,
                       eos_token_id=3)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                             projection_dim=_WIDTH, hidden_size=_WIDTH)
    image_processor = SiglipImageProcessor(size={"height": _IMAGE, "width": _IMAGE})
    image_processor.image_seq_length = (_IMAGE // _PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer())
    return _seeded(seed, lambda: PaliGemmaForConditionalGeneration(config)), processor
