"""The mrified Qwen3-VL: as :mod:`~mixres.integrations.hf.qwen_tower` for Qwen2.5-VL, plus DeepStack.

The tower (:class:`MixresQwen3VLVisionModel`) holds a
:class:`~mixres.encoders.packed.PackedDualPathwayEncoder` over the ``hf_qwen3_vl`` pathway and
returns what ``Qwen3VLVisionModel`` returns: ``last_hidden_state``, ``pooler_output`` (the merger's
tokens) and ``deepstack_features`` (the tapped streams through their own mergers), which the LLM
adds into its early layers. ``Qwen3VLModel`` builds its ViT with ``AutoModel.from_config``, so the
registered tower is found from its config; the model classes only add the high-res inputs
(``model_type`` ``mixres_qwen3_vl``, vision ``mixres_qwen3_vl_vision``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel

from .modeling import without_weight_paths
from .qwen_tower import HighResInputs, MixresQwen2_5_VisionModel, high_res_forward, register_mrified

__all__ = ["MixresQwen3VLVisionConfig", "MixresQwen3VLVisionModel", "MixresQwen3VLConfig", "MixresQwen3VLModel",
           "MixresQwen3VLForConditionalGeneration"]


class MixresQwen3VLVisionConfig(Qwen3VLVisionConfig):
    """Qwen3-VL's vision config plus the MRA encoder's (as :class:`~.qwen_tower.MixresQwen2_5_VLVisionConfig`)."""

    model_type = "mixres_qwen3_vl_vision"
    base_config_key = "vision_config"
    encoder: dict | None = None
    high_res_scale: float = 32 / 16
    high_res_stride: int = 32

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.encoder = without_weight_paths(self.encoder) if self.encoder is not None else None


class MixresQwen3VLVisionModel(MixresQwen2_5_VisionModel):
    """Qwen3-VL's ``visual`` with MRA (returns ``deepstack_features`` too)."""

    config_class = MixresQwen3VLVisionConfig
    _no_split_modules = ["Qwen3VLVisionBlock"]


class MixresQwen3VLConfig(Qwen3VLConfig):
    """Qwen3-VL's config whose ``vision_config`` is a :class:`MixresQwen3VLVisionConfig`."""

    model_type = "mixres_qwen3_vl"
    sub_configs_defaults = {**Qwen3VLConfig.sub_configs_defaults,
                            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="mixres_qwen3_vl_vision")}


class MixresQwen3VLModel(HighResInputs, Qwen3VLModel):
    """``Qwen3VLModel`` whose ``visual`` is a :class:`MixresQwen3VLVisionModel`; takes the high-res views."""

    config_class = MixresQwen3VLConfig


class MixresQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """``Qwen3VLForConditionalGeneration`` with MRA in its vision tower (mrified)."""

    config_class = MixresQwen3VLConfig

    def __init__(self, config: MixresQwen3VLConfig) -> None:
        Qwen3VLPreTrainedModel.__init__(self, config)  # as the source's __init__, with the inner model above
        self.model = MixresQwen3VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    forward = high_res_forward(Qwen3VLForConditionalGeneration)


register_mrified(MixresQwen3VLVisionConfig, MixresQwen3VLVisionModel, MixresQwen3VLConfig, MixresQwen3VLForConditionalGeneration)
