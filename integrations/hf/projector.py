"""Any registered mixres projector or compressor in LLaVA's projector slot.

transformers' Llava builds its ``multi_modal_projector`` from the config (LLaVA's
``mlp2x_gelu``). A tower config whose ``projector`` names a mixres projector (``c_abstractor``,
``tokenpacker``, ``linear``, ``mlp3x_gelu``, ...) is built by
:class:`MixresLlavaForConditionalGeneration` instead: the same model class in every other way,
so ``save_pretrained`` / ``from_pretrained`` round-trip with the projector's own keys
(``model.multi_modal_projector.projector.*``). The ``<image>`` expansion follows the projector's
``output_grid`` (:meth:`~mixres.integrations.hf.modeling.MixresVisionConfig.from_encoder`).

Load such a model with :func:`~mixres.integrations.hf.load_pretrained` or this class; transformers'
own ``LlavaForConditionalGeneration`` would build its default projector and warn about the keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

import mixres

from .errors import UnsupportedModelError

__all__ = ["MixresProjector", "MixresLlavaForConditionalGeneration", "llava_class_for"]


class MixresProjector(torch.nn.Module):
    """LLaVA's ``multi_modal_projector`` slot holding ``mixres.build(config.vision_config.projector)``.

    ``forward(features (Tensor[B, N, C]))`` reads the tokens on their square grid (HF towers read
    square images) and returns ``Tensor[B, N', text_hidden]`` with ``N'`` the projector's count.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        spec = dict(config.vision_config.projector)
        spec.setdefault("out_dim", config.text_config.hidden_size)
        if spec["out_dim"] != config.text_config.hidden_size:
            raise UnsupportedModelError(f"the projector's out_dim {spec['out_dim']} is not the LLM width {config.text_config.hidden_size}")
        self.projector = mixres.build(spec)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(features.shape[1])
        if side * side != features.shape[1]:
            raise UnsupportedModelError(f"the tower returned {features.shape[1]} tokens, not a square grid; a mixres projector needs one")
        return self.projector(features, (side, side))


class MixresLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose projector is a mixres one when the tower config names it."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if getattr(config.vision_config, "projector", None):
            self.model.multi_modal_projector = MixresProjector(config)
            if torch.empty(0).device.type != "meta":  # built for real: keep the projector's own init
                for tensor in self.model.multi_modal_projector.parameters():
                    tensor._is_hf_initialized = True


def llava_class_for(config: Any) -> type:
    """The Llava class that builds ``config``'s projector: ours when the tower names a mixres one."""
    vision = getattr(config, "vision_config", None)
    return MixresLlavaForConditionalGeneration if getattr(vision, "projector", None) else LlavaForConditionalGeneration
