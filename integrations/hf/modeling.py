"""A transformers-native vision tower around any mixres encoder (:class:`~mixres.encoders.base.Encoder`).

:class:`MixresVisionConfig` (``model_type = "mixres_vision"``) holds the encoder's config
dict (``mixres.build`` rebuilds it) and the fields LLaVA-style code reads from a
``vision_config``; :class:`MixresVisionModel` is a ``PreTrainedModel`` whose only child is
``encoder``. Importing ``mixres.integrations.hf`` registers both with ``AutoConfig`` /
``AutoModel``, so ``LlavaConfig(vision_config=MixresVisionConfig(...), ...)`` builds a
``LlavaForConditionalGeneration`` with MRA inside, and ``save_pretrained`` /
``from_pretrained`` round-trip (safetensors) once the package is imported.

How the fields fit LLaVA code (transformers 5.x):

- ``hidden_size`` is the encoder's ``out_dim``: the projector's input width;
- ``image_size`` is the high-res input side ``R`` the image processor produces (a LLaVA-NeXT
  tile), and ``patch_size`` is ``R / grid``: input pixels per output token, so that
  ``image_size // patch_size`` is the token grid side that LLaVA-NeXT's packing and every
  processor's token count use (1024 px, ViT 448/14 -> 32x32 tokens: ``patch_size = 32``);
- ``forward`` returns ``last_hidden_state`` = the tokens (PaliGemma reads it) and
  ``hidden_states = (tokens,)``: LLaVA selects ``hidden_states[vision_feature_layer]``, so the
  LLaVA config must say ``vision_feature_layer=-1`` and ``vision_feature_select_strategy="full"``
  (``"default"`` would drop the first *patch* token: the pathway already removed CLS, which a
  fusion must never see). :func:`~mixres.integrations.hf.mrify` sets both.

Weights: the config never names weight files (``weights``
are cleared): the tower's weights live in the HF model's own safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

import mixres
from mixres.encoders.factory import WEIGHTS_ARG

from .errors import UnsupportedModelError

__all__ = ["MixresVisionConfig", "MixresVisionModel", "register_auto_classes", "without_weight_paths"]

# constructor arguments that load weights from files; cleared in a saved config
_WEIGHT_KEYS = frozenset({WEIGHTS_ARG, "pretrained"})


def without_weight_paths(config: Any) -> Any:
    """A copy of an encoder config with every weight-file argument set to ``None`` / ``False``.

    Example:
        >>> without_weight_paths({"name": "hf_clip", "weights": "/w", "config": {"a": 1}})
        {'name': 'hf_clip', 'weights': None, 'config': {'a': 1}}
    """
    if isinstance(config, Mapping):
        return {
            k: (False if k == "pretrained" else None) if k in _WEIGHT_KEYS and v else without_weight_paths(v)
            for k, v in config.items()
        }
    if isinstance(config, (list, tuple)):
        return [without_weight_paths(v) for v in config]
    return config


class MixresVisionConfig(PreTrainedConfig):
    """Config of :class:`MixresVisionModel`.

    Args:
        encoder: the encoder's config (``encoder.config``); weight paths are cleared.
        hidden_size: width of the output tokens (the encoder's ``out_dim``).
        image_size: side ``R`` of the square input the encoder reads (high-res, e.g. 1024).
        patch_size: input pixels per output token, ``R // grid`` (e.g. 32).
        num_image_tokens: tokens per image handed to the LLM: the encoder's count, or the
            projector's when a mixres ``projector`` (a compressor) changes it.
        projection_dim: written by PaliGemma's config (its projector width); unused here.
        projector: a registered mixres projector / compressor config that replaces LLaVA's own
            ``multi_modal_projector`` (:class:`~mixres.integrations.hf.projector.MixresLlavaForConditionalGeneration`);
            ``None``: the MLLM's own projector.
        feature_grid: the tower's token grid ``[h, w]`` (``None`` for encoders without one, AnyRes).
        image_backend: the image-processor backend that reproduces the source's preprocessing
            (``"pil"`` for converted LLaVA-HR checkpoints, whose release resized with PIL);
            :func:`~mixres.integrations.hf.inference.load_pretrained` loads the processor with
            it. ``None``: transformers' default backend.

    ``image_size // patch_size`` squared is the LLM's token count when the tokens lie on a
    square grid that divides the image (LLaVA-NeXT's packing needs it); otherwise
    ``patch_size == image_size`` and the processor adds ``num_image_tokens - 1`` tokens
    (:func:`~mixres.integrations.llava.model.processor_for`). Use :meth:`from_encoder` to fill
    the numbers from a built encoder.
    """

    model_type = "mixres_vision"
    base_config_key = "vision_config"

    encoder: dict | None = None
    hidden_size: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_image_tokens: int = 0
    projection_dim: int | None = None
    projector: dict | None = None
    feature_grid: list | None = None
    image_backend: str | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.encoder = without_weight_paths(self.encoder) if self.encoder is not None else None

    @classmethod
    def from_encoder(cls, encoder: torch.nn.Module, image_size: int | None = None, *,
                     projector: Mapping[str, Any] | None = None, **kwargs: Any) -> MixresVisionConfig:
        """The config of a tower that holds ``encoder`` and reads ``image_size`` (default: the encoder's).

        Args:
            encoder: any mixres encoder (the contract of :class:`~mixres.encoders.base.Encoder`).
            image_size: the square side the processor produces.
            projector: a mixres projector config (``{"name": "c_abstractor", "num_queries": 16}``);
                its ``in_dim`` defaults to the encoder's width, ``out_dim`` has to be given; the
                token count follows its ``output_grid``.

        Raises:
            UnsupportedModelError: a non-square image size.
        """
        if image_size is None:
            height, width = encoder.image_size
            if height != width:
                raise UnsupportedModelError(f"HF vision towers read square images, but the encoder's image_size is {(height, width)}")
            image_size = height
        tower_grid = grid = _grid_or_none(encoder, image_size)
        count = grid[0] * grid[1] if grid is not None else int(encoder.num_tokens(image_size))
        if projector is not None:
            projector = {"kind": "projector", "in_dim": encoder.out_dim, **projector}
            if grid is None:
                raise UnsupportedModelError("a mixres projector needs the tower's token grid; this encoder has none (AnyRes)")
            with torch.device("meta"):  # only its output grid is needed here
                out_grid = tuple(mixres.build(projector).output_grid(grid))
            grid, count = out_grid, out_grid[0] * out_grid[1]
        side = grid[0] if grid is not None and grid[0] == grid[1] and image_size % grid[0] == 0 else None
        return cls(encoder=encoder.config, hidden_size=encoder.out_dim, image_size=image_size,
                   patch_size=image_size // side if side else image_size, num_image_tokens=count,
                   projector=projector, feature_grid=list(tower_grid) if tower_grid else None, **kwargs)

    @property
    def on_grid(self) -> bool:
        """Whether the LLM's tokens lie on a square grid of ``image_size // patch_size`` per side."""
        return (self.image_size // self.patch_size) ** 2 == self.num_image_tokens


def _grid_or_none(encoder: torch.nn.Module, image_size: int) -> tuple[int, int] | None:
    try:
        return tuple(encoder.grid_for(image_size))
    except mixres.MixresError:  # AnyRes: base tokens + tile rows, no single grid
        return None


def _on_meta_device() -> bool:
    return torch.empty(0).device.type == "meta"


def _in_hf_submodel(name: str, submodels: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in submodels)


class MixresVisionModel(PreTrainedModel):
    """A mixres encoder as a transformers vision tower: ``pixel_values -> tokens``.

    Args:
        config: the tower's config; ``config.encoder`` is built with ``mixres.build``.
        encoder: an already built encoder to hold instead (its config has to be ``config.encoder``).

    ``forward(pixel_values (Tensor[B, 3, R, R]))`` returns a ``BaseModelOutputWithPooling``
    with ``last_hidden_state (Tensor[B, grid**2, hidden_size])`` and ``hidden_states`` holding
    that one tensor (see the module docstring for why LLaVA must select it with
    ``vision_feature_layer=-1``, ``vision_feature_select_strategy="full"``).
    """

    config: MixresVisionConfig
    config_class = MixresVisionConfig
    base_model_prefix = "mixres_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["DualPathwayEncoder", "S2Encoder", "AnyResEncoder"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MixresVisionConfig, encoder: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        if not config.encoder:
            raise UnsupportedModelError("MixresVisionConfig has no encoder config; build it with MixresVisionConfig.from_encoder(encoder)")
        self.encoder = mixres.build(config.encoder) if encoder is None else encoder
        if self.encoder.out_dim != config.hidden_size:
            raise UnsupportedModelError(
                f"the encoder's out_dim is {self.encoder.out_dim} but the config says hidden_size={config.hidden_size}"
            )
        self.patch_size = config.patch_size
        self._no_split_modules = [type(self.encoder).__name__]
        if not _on_meta_device():  # built for real: keep the libraries' own inits (zero-init adapters, ...)
            for tensor in (*self.encoder.parameters(), *self.encoder.buffers()):
                tensor._is_hf_initialized = True
        self.post_init()

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the encoder's parts recompute activations in the backward pass.

        Set by transformers' ``gradient_checkpointing_enable`` on the whole MLLM. transformers
        ViT blocks are ``GradientCheckpointingLayer`` s that the same call switches on, so the
        encoder's own checkpointing is used only for the parts without them (a CNN, timm ViTs);
        only the encoder contract (``parts``) is used, so every registered encoder works.
        """
        return bool(getattr(self, "_grad_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        self._grad_checkpointing = bool(enable)
        for part in self.encoder.parts().values():
            if not isinstance(part, torch.nn.Module) or not hasattr(part, "set_grad_checkpointing"):
                continue
            if not any(isinstance(m, GradientCheckpointingLayer) for m in part.modules()):
                part.set_grad_checkpointing(enable)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.parts().get("token_pathway", self.encoder)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode ``pixel_values (Tensor[B, 3, R, R])``; other keyword arguments are ignored."""
        selected = [output_hidden_states] if isinstance(output_hidden_states, int) and not isinstance(output_hidden_states, bool) else output_hidden_states
        if isinstance(selected, (list, tuple)) and any(i not in (0, -1) for i in selected):
            raise UnsupportedModelError(
                f"the mixres vision tower returns one hidden state (the encoder's tokens), but layer(s) {selected} were "
                "requested; set vision_feature_layer=-1 and vision_feature_select_strategy='full' in the model config"
            )
        tokens = self.encoder(pixel_values.to(self.dtype))
        tokens = tokens[0] if isinstance(tokens, tuple) else torch.stack(tokens)  # AnyRes: one tensor per image
        out = BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=None, hidden_states=(tokens,))
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Give tensors that ``from_pretrained`` did not load their constructor values.

        Called by transformers for every submodule (this model last). A loaded tensor carries
        ``_is_hf_initialized``; transformers sub-models (the HF ViT) re-initialise their own
        tensors. Any other tensor left unset -- a key missing from the checkpoint, a
        non-persistent buffer -- is copied from a freshly built encoder (built only then).
        """
        if module is not self:
            return
        submodels = [n for n, m in self.encoder.named_modules() if n and isinstance(m, PreTrainedModel)]
        named = dict(self.encoder.named_parameters())
        named.update(dict(self.encoder.named_buffers()))
        unset = {
            n: t for n, t in named.items()
            if not getattr(t, "_is_hf_initialized", False) and not _in_hf_submodel(n, submodels)
        }
        if not unset or any(t.device.type == "meta" for t in unset.values()):
            return
        with torch.device("cpu"):
            fresh = mixres.build(self.config.encoder)
        reference = dict(fresh.named_parameters())
        reference.update(dict(fresh.named_buffers()))
        for name, tensor in unset.items():
            tensor.copy_(reference[name].to(tensor.dtype))
            tensor._is_hf_initialized = True


def register_auto_classes() -> None:
    """Register the config and model with ``AutoConfig`` / ``AutoModel`` (idempotent)."""
    AutoConfig.register(MixresVisionConfig.model_type, MixresVisionConfig, exist_ok=True)
    AutoModel.register(MixresVisionConfig, MixresVisionModel, exist_ok=True)
