"""``llava_onevision``: what :func:`~mixres.integrations.hf.mrify` changes in LLaVA-OneVision.

``LlavaOnevisionForConditionalGeneration`` (SigLIP-so400m tiles of 384 px, AnyRes up to 6x6
tiles, Qwen2 LLM) reads ``hidden_states[vision_feature_layer]`` of its SigLIP (-1: the last
block, without the post-norm) with ``vision_feature_select_strategy="full"``. As for
LLaVA-NeXT, every tile (the base view included) becomes an ``R`` px image that goes through MRA
on its own, and the grid pinpoints are scaled from 384 to ``R``.

OneVision's own token reduction stays after the encoder: ``pack_image_features`` unpads the
tile-grid features and, when they hold more than ``1.1**2 * 9`` tiles' worth of tokens
(``vision_aspect_ratio="anyres_max_9"``), resizes them bilinearly down to about nine tiles;
the learned ``image_newline`` ends every row. MRA's grid (``max(R / 32, 27)`` per tile side) is what
that reduction starts from, and the processor's ``<image>`` expansion (its
``num_image_tokens`` per tile) follows the new grid. Videos go through the same tower, but
their path (2x2 pooling per frame) is not tested here.
"""

from __future__ import annotations

from typing import Any

from .families import Family, scale_pinpoints, set_size

__all__ = ["OnevisionFamily", "ONEVISION"]


class OnevisionFamily(Family):
    """LLaVA-OneVision: AnyRes tiles of ``R`` px, ``anyres_max_9`` reduction kept, processor count per tile."""

    def update_config(self, config: Any, vision_config: Any, old_tile: int) -> None:
        """Tower config, ``vision_feature_layer=-1`` / ``"full"``, pinpoints in tiles of ``R``."""
        config.vision_config = vision_config
        config.vision_feature_layer = -1
        config.vision_feature_select_strategy = "full"
        config.image_grid_pinpoints = scale_pinpoints(config.image_grid_pinpoints, old_tile, vision_config.image_size)

    def update_processor(self, processor: Any, vision_config: Any, old_tile: int) -> None:
        """Tile size, pinpoints and the per-tile token count of the processor (and its video processor)."""
        side, image_processor = vision_config.image_size, processor.image_processor
        set_size(image_processor, "size", side)
        image_processor.image_grid_pinpoints = scale_pinpoints(image_processor.image_grid_pinpoints, old_tile, side)
        video_processor = getattr(processor, "video_processor", None)
        if video_processor is not None:
            set_size(video_processor, "size", side)
        processor.num_image_tokens = vision_config.num_image_tokens
        processor.vision_feature_select_strategy = "full"


ONEVISION = OnevisionFamily(
    "llava_onevision", ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"), anyres=True, square_pad=False
)
