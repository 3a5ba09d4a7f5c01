"""``gemma3``: what :func:`~mixres.integrations.hf.mrify` changes in Gemma 3.

``Gemma3ForConditionalGeneration`` reads its SigLIP's ``last_hidden_state`` (post-norm applied)
at 896 px (a 64x64 grid) and its projector average-pools it ``k x k`` (``k = 4``) down to
``mm_tokens_per_image = 256`` tokens before an RMS norm and a linear map. That pooling is
Gemma 3's own token reduction and stays after the encoder: MRA's grid ``g = max(R / 32, 64)`` is pooled
by the same ``k``, so the LLM sees ``(g / k)**2`` tokens per image (``g`` has to be a multiple
of ``k``). The config's ``mm_tokens_per_image``, the projector's grid attributes and the
processor's ``image_seq_length`` (its ``<start_of_image>`` ... ``<end_of_image>`` expansion)
follow. Images are resized to ``R x R`` without padding, as Gemma 3's processor does;
pan-and-scan crops are ``R`` px images too.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import UnsupportedModelError
from .families import Family, set_size

__all__ = ["Gemma3Family", "GEMMA3", "pool_kernel"]


def pool_kernel(config: Any) -> int:
    """Gemma 3's projector pooling side ``k``: the ViT grid side over the pooled grid side.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> pool_kernel(NS(vision_config=NS(image_size=896, patch_size=14), mm_tokens_per_image=256))
        4
    """
    side = math.isqrt(config.mm_tokens_per_image)
    return int(config.vision_config.image_size // config.vision_config.patch_size) // side


class Gemma3Family(Family):
    """Gemma 3: SigLIP ``last_hidden_state``, the ``k x k`` average pool kept, ``(g / k)**2`` tokens."""

    def post_norm(self) -> bool | None:
        """``None``: SigLIP's post-norm on the last block, as ``last_hidden_state`` has it."""
        return None

    def feature_layer(self, config: Any) -> int:
        """The last block (Gemma 3 reads ``last_hidden_state``)."""
        return -1

    def check(self, model: Any, vision_config: Any) -> None:
        """The MRA grid has to be a multiple of the pooling side."""
        kernel, grid = pool_kernel(model.config), vision_config.image_size // vision_config.patch_size
        if grid % kernel:
            raise UnsupportedModelError(
                f"Gemma 3 average-pools the ViT grid {kernel}x{kernel}, but image_size {vision_config.image_size} gives a "
                f"{grid}x{grid} grid; pick an image_size whose grid (max(image_size / 32, the ViT's native grid)) is a multiple of {kernel}"
            )

    def update_config(self, config: Any, vision_config: Any, old_tile: int) -> None:
        """Tower config (with the ``layer_norm_eps`` the projector's norm reads), ``mm_tokens_per_image``,
        and the tower config's ``num_image_tokens`` -> the pooled count (what the LLM sees)."""
        kernel = pool_kernel(config)
        vision_config.layer_norm_eps = config.vision_config.layer_norm_eps
        config.vision_config = vision_config
        config.mm_tokens_per_image = (vision_config.image_size // vision_config.patch_size // kernel) ** 2
        vision_config.num_image_tokens = config.mm_tokens_per_image

    def update_model(self, model: Any, vision_config: Any) -> None:
        """The projector's grid sides (set in its ``__init__`` from the config); its pool is unchanged."""
        projector = (getattr(model, "model", None) or model).multi_modal_projector
        projector.patches_per_image = vision_config.image_size // vision_config.patch_size
        projector.tokens_per_side = math.isqrt(model.config.mm_tokens_per_image)

    def update_processor(self, processor: Any, vision_config: Any, old_tile: int) -> None:
        """``R x R`` images and the ``<image>`` expansion of ``(g / k)**2`` soft tokens."""
        set_size(processor.image_processor, "size", vision_config.image_size)
        tokenizer = processor.tokenizer
        processor.image_seq_length = int(vision_config.num_image_tokens)
        processor.full_image_sequence = (
            f"\n\n{tokenizer.boi_token}{tokenizer.image_token * processor.image_seq_length}{tokenizer.eoi_token}\n\n"
        )


GEMMA3 = Gemma3Family("gemma3", ("Gemma3ForConditionalGeneration", "Gemma3Model"), square_pad=False, nested_images=True)
