"""Tiny random Qwen2.5-VL and Qwen3-VL with working processors (no download).

As :mod:`~mixres.integrations.hf.tiny`: the word-level tokenizer with Qwen's vision tokens
(``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``) added after
:data:`~mixres.integrations.hf.tiny.WORDS`; Qwen's own ViT at width 32 with 4 blocks (full
attention in blocks 1 and 3, 56-px windows elsewhere) and its real 14-px patches, 2x2 merge and
2-frame temporal patches; a 2-layer Qwen2.5-VL LLM of width 32 (3D rotary sections ``[2, 3, 3]``).
The processor's budget is ``min_pixels = 56 * 56``, ``max_pixels = 112 * 112`` (ViT views of at
most 8x8 patches, 16 LLM tokens).

Example:
    >>> model, processor = tiny_qwen2_5_vl()
    >>> inputs = processor(images=[torch.zeros(3, 60, 90, dtype=torch.uint8)], text=[PROMPT], return_tensors="pt")
    >>> inputs["image_grid_thw"].tolist(), int((inputs["input_ids"] == model.config.image_token_id).sum())
    ([[1, 4, 6]], 6)
"""

from __future__ import annotations

from typing import Any

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from .tiny import WORDS, _seeded, tiny_tokenizer

__all__ = ["tiny_qwen2_5_vl", "tiny_qwen3_vl", "QWEN_TOKENS", "PROMPT", "TINY_QWEN_VISION", "TINY_QWEN3_VISION"]

QWEN_TOKENS: tuple[str, ...] = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: a prompt with one image where Qwen's chat template puts it
PROMPT = "USER: <|vision_start|><|image_pad|><|vision_end|> what is in the image ? ASSISTANT:"
#: the tiny ViT's ``Qwen2_5_VLVisionConfig`` arguments
TINY_QWEN_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3])


def tiny_qwen2_5_vl(seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Qwen2.5-VL in miniature: its ViT (window attention, 2x2 merger) and LLM (3D rotary), random weights."""
    ids = {t: len(WORDS) + i for i, t in enumerate(QWEN_TOKENS)}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=len(WORDS) + len(QWEN_TOKENS), max_position_embeddings=512, pad_token_id=1, bos_token_id=2,
                eos_token_id=3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(TINY_QWEN_VISION), image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    budget = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    tokenizer = tiny_tokenizer(QWEN_TOKENS, image_token="<|image_pad|>", video_token="<|video_pad|>")
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=budget), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(size=budget))
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config)), processor



#: the tiny Qwen3-VL ViT's ``Qwen3VLVisionConfig`` arguments (16-px patches, a 4x4 learned position table)
TINY_QWEN3_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=16,
                         spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[1, 2])


def tiny_qwen3_vl(seed: int = 0, text_layers: int = 2) -> tuple[Any, Any]:
    """Qwen3-VL in miniature: its ViT (learned + rotary positions, DeepStack after blocks 1 and 2), random weights.

    The processor's budget is ``64 * 64`` .. ``128 * 128`` px (16-px patches, 32-px merge units).
    ``text_layers``: the LLM's layers. The LLM adds DeepStack feature ``j`` after its layer ``j``, so
    with 2 layers the second one lands after the last layer, where only the image positions'
    logits read it (the recipe trains with 3, so both DeepStack mergers get gradients).
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    ids = {t: len(WORDS) + i for i, t in enumerate(QWEN_TOKENS)}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, vocab_size=len(WORDS) + len(QWEN_TOKENS), max_position_embeddings=512, pad_token_id=1,
                bos_token_id=2, eos_token_id=3,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    config = Qwen3VLConfig(text_config=text, vision_config=dict(TINY_QWEN3_VISION), image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    budget = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    tokenizer = tiny_tokenizer(QWEN_TOKENS, image_token="<|image_pad|>", video_token="<|video_pad|>")
    image_processor = Qwen2VLImageProcessor(size=budget, patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(size=budget, patch_size=16))
    return _seeded(seed, lambda: Qwen3VLForConditionalGeneration(config)), processor
