"""The mrified Qwen2.5-VL: its vision tower with MRA inside, and the model classes that hold it.

:class:`MixresQwen2_5_VisionModel` replaces ``model.visual``: a
:class:`~mixres.encoders.packed.PackedDualPathwayEncoder` over Qwen's own ViT (the
``hf_qwen2_5_vl`` pathway, merger included) and a high-res CNN, called as Qwen calls its
``visual`` -- ``(pixel_values, grid_thw)`` -- plus the high-res views
(``high_res_pixel_values``, ``high_res_grid``, :mod:`~mixres.integrations.hf.qwen_processor`), and
returning what Qwen's returns: ``last_hidden_state`` (the ViT's stream, window order) and
``pooler_output`` (the merger's LLM tokens, processor order).

``Qwen2_5_VLModel`` builds its ViT class from the config directly, so a mrified model becomes a
:class:`MixresQwen2_5_VLForConditionalGeneration` (``model_type`` ``mixres_qwen2_5_vl``, vision
``model_type`` ``mixres_qwen2_5_vl_vision``, registered with the Auto classes; the image processor
with ``AutoImageProcessor``), so ``save_pretrained`` / ``from_pretrained`` round-trip. Its
``forward`` / ``generate`` take the two high-res inputs besides Qwen's own; an image without them
is refused (no silent low-res-only run). Videos are refused: the processor makes no high-res view
of a video (MRA is applied to still images). :class:`HighResInputs` and :func:`high_res_forward`
are shared with Qwen3-VL (:mod:`~mixres.integrations.hf.qwen3_tower`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel, Qwen2_5_VLTextModel

from mixres.encoders.packed import PackedDualPathwayEncoder

from .errors import UnsupportedModelError
from .modeling import without_weight_paths
from .qwen_processor import MixresQwen2VLImageProcessor, unpack_high_res

__all__ = ["MixresQwen2_5_VLVisionConfig", "MixresQwen2_5_VisionModel", "MixresQwen2_5_VLConfig", "MixresQwen2_5_VLModel",
           "MixresQwen2_5_VLForConditionalGeneration", "HighResInputs", "high_res_forward", "register_mrified"]


class MixresQwen2_5_VLVisionConfig(Qwen2_5_VLVisionConfig):
    """Qwen2.5-VL's vision config (the fields Qwen's code reads) plus the MRA encoder's.

    Attributes:
        encoder: the :class:`~mixres.encoders.packed.PackedDualPathwayEncoder` config (weight paths cleared).
        high_res_scale: ``k``, the high-res view's sides over the ViT view's.
        high_res_stride: the map pathway's final stride (the high-res sides' multiple, the packing cell).
    """

    model_type = "mixres_qwen2_5_vl_vision"
    base_config_key = "vision_config"
    encoder: dict | None = None
    high_res_scale: float = 32 / 14
    high_res_stride: int = 32

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.encoder = without_weight_paths(self.encoder) if self.encoder is not None else None


class MixresQwen2_5_VisionModel(PreTrainedModel):
    """Qwen2.5-VL's ``visual`` with MRA: ``(pixel_values, grid_thw, high-res views) -> BaseModelOutputWithPooling``.

    Args:
        config: the tower's config; ``config.encoder`` builds the encoder.
        encoder: an already built encoder to hold instead.
    """

    config_class = MixresQwen2_5_VLVisionConfig
    base_model_prefix = "mixres_qwen_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["Qwen2_5_VLVisionBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: MixresQwen2_5_VLVisionConfig, encoder: PackedDualPathwayEncoder | None = None) -> None:
        super().__init__(config)
        if not config.encoder and encoder is None:
            raise UnsupportedModelError("MixresQwen2_5_VLVisionConfig has no encoder config")
        self.encoder = PackedDualPathwayEncoder(**_args(config.encoder)) if encoder is None else encoder
        self.spatial_merge_size = config.spatial_merge_size
        if torch.empty(0).device.type != "meta":  # built for real: keep the libraries' own inits (zero-init adapters)
            for tensor in (*self.encoder.parameters(), *self.encoder.buffers()):
                tensor._is_hf_initialized = True
        self.post_init()

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, high_res_pixel_values: torch.Tensor | None = None,
                high_res_grid: torch.Tensor | None = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Encode the packed ViT patches with each image's high-res view fused in.

        Args:
            hidden_states (Tensor[S, 3 * 2 * 14 * 14]): the processor's ``pixel_values``.
            grid_thw (Tensor[n, 3]): ``image_grid_thw``.
            high_res_pixel_values (Tensor[N, 3 * s * s]) / high_res_grid (Tensor[n, 2]): the high-res views.

        Raises:
            UnsupportedModelError: no high-res views (use the processor mrify returned).
        """
        if high_res_pixel_values is None or high_res_grid is None:
            raise UnsupportedModelError(
                "the mrified Qwen2.5-VL reads each image's high-res view too: pass high_res_pixel_values and high_res_grid "
                "(the processor returned by mrify emits them)")
        views = unpack_high_res(high_res_pixel_values, high_res_grid, self.config.high_res_stride)
        x, layout = self.encoder(hidden_states.to(self.dtype), grid_thw, views)
        tp = self.encoder.token_pathway
        merged = tp.merge(x, layout)
        if not tp.tap_blocks:
            return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=merged)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(last_hidden_state=x, pooler_output=merged, deepstack_features=tp.deepstack(layout))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Tensors ``from_pretrained`` did not load get their constructor values (as MixresVisionModel)."""
        if module is not self:
            return
        submodels = [n for n, m in self.encoder.named_modules() if n and isinstance(m, PreTrainedModel)]
        named = {**dict(self.encoder.named_parameters()), **dict(self.encoder.named_buffers())}
        unset = {n: t for n, t in named.items() if not getattr(t, "_is_hf_initialized", False)
                 and not any(n == p or n.startswith(p + ".") for p in submodels)}
        if not unset or any(t.device.type == "meta" for t in unset.values()):
            return
        with torch.device("cpu"):
            fresh = PackedDualPathwayEncoder(**_args(self.config.encoder))
        reference = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
        for name, tensor in unset.items():
            tensor.copy_(reference[name].to(tensor.dtype))
            tensor._is_hf_initialized = True


def _with_high_res(signature: inspect.Signature) -> inspect.Signature:
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("high_res_pixel_values", "high_res_grid")]
    rest = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    return signature.replace(parameters=[*params, *extra, *rest])


def _args(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("kind", "name")}


class MixresQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL's config whose ``vision_config`` is a :class:`MixresQwen2_5_VLVisionConfig`."""

    model_type = "mixres_qwen2_5_vl"
    sub_configs_defaults = {**Qwen2_5_VLConfig.sub_configs_defaults,
                            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="mixres_qwen2_5_vl_vision")}


class HighResInputs:
    """Mixin for a Qwen-VL ``*Model``: the image features are computed with the high-res views."""

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                           high_res_pixel_values: torch.Tensor | None = None, high_res_grid: torch.Tensor | None = None,
                           **kwargs: Any) -> BaseModelOutputWithPooling:
        """As the source (``pooler_output``, and DeepStack features, split per image), with the high-res views."""
        out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=image_grid_thw,
                          high_res_pixel_values=high_res_pixel_values, high_res_grid=high_res_grid)
        split = (image_grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
        out.pooler_output = torch.split(out.pooler_output, split)
        if getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [torch.split(f, split) for f in out.deepstack_features]
        return out

    def get_video_features(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: MRA reads a high-res view of each still image; the processor makes none of a video."""
        raise UnsupportedModelError("the mrified Qwen-VL takes still images; videos have no high-res view (not supported)")

    def forward(self, *args: Any, pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                high_res_pixel_values: torch.Tensor | None = None, high_res_grid: torch.Tensor | None = None,
                mm_encoder_outputs: dict | None = None, **kwargs: Any) -> Any:
        """The source's forward; the images' features are computed here with their high-res views."""
        if pixel_values is not None and (mm_encoder_outputs or {}).get("image") is None:
            image = self.get_image_features(pixel_values, image_grid_thw, high_res_pixel_values, high_res_grid)
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": image}
        return super().forward(*args, image_grid_thw=image_grid_thw, mm_encoder_outputs=mm_encoder_outputs, **kwargs)


def high_res_forward(source: type) -> Any:
    """The ``forward`` of a mrified ``*ForConditionalGeneration``: ``source``'s, taking the high-res views."""

    def forward(self: Any, *args: Any, high_res_pixel_values: torch.Tensor | None = None,
                high_res_grid: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The source's forward, taking the high-res views (``high_res_pixel_values``, ``high_res_grid``)."""
        if high_res_pixel_values is not None:
            kwargs.update(high_res_pixel_values=high_res_pixel_values, high_res_grid=high_res_grid)
        return source.forward(self, *args, **kwargs)

    # generate() checks its keyword arguments against forward's signature: the source's plus ours
    forward.__signature__ = _with_high_res(inspect.signature(source.forward))
    return forward


class MixresQwen2_5_VLModel(HighResInputs, Qwen2_5_VLModel):
    """``Qwen2_5_VLModel`` whose ``visual`` is a :class:`MixresQwen2_5_VisionModel`; takes the high-res views."""

    config_class = MixresQwen2_5_VLConfig

    def __init__(self, config: MixresQwen2_5_VLConfig) -> None:
        # the source's __init__ builds its ViT class from config.vision_config; we re-state it with ours
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = MixresQwen2_5_VisionModel._from_config(config.vision_config)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()


class MixresQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` with MRA in its vision tower (mrified)."""

    config_class = MixresQwen2_5_VLConfig

    def __init__(self, config: MixresQwen2_5_VLConfig) -> None:
        Qwen2_5_VLPreTrainedModel.__init__(self, config)  # as the source's __init__, with the inner model above
        self.model = MixresQwen2_5_VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    forward = high_res_forward(Qwen2_5_VLForConditionalGeneration)


def register_mrified(vision_config: type, vision_model: type, config: type, model: type) -> None:
    """Register a mrified Qwen family with the Auto classes (a saved model then loads by its ``model_type``)."""
    AutoConfig.register(vision_config.model_type, vision_config, exist_ok=True)
    AutoModel.register(vision_config, vision_model, exist_ok=True)
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModelForImageTextToText.register(config, model, exist_ok=True)
    AutoImageProcessor.register(config, image_processor_classes={"torchvision": MixresQwen2VLImageProcessor}, exist_ok=True)


register_mrified(MixresQwen2_5_VLVisionConfig, MixresQwen2_5_VisionModel, MixresQwen2_5_VLConfig,
                 MixresQwen2_5_VLForConditionalGeneration)
