"""timm backbones as pathways: ``timm_vit`` (a ViT, token pathway) and ``timm_map`` (any CNN).

Source: timm (github.com/huggingface/pytorch-image-models), ``models/vision_transformer.py``
and the ``forward_intermediates`` / ``feature_info`` contract shared by its models.

- ``timm_vit`` wraps a ``VisionTransformer``: it is built with ``dynamic_img_size=True`` so
  timm's own ``_pos_embed`` resamples the absolute position embedding (bicubic + antialias,
  ``resample_abs_pos_embed``) to any grid; class / register tokens, ``no_embed_class`` and
  ``norm_pre`` behave exactly as in ``forward_features``.
- ``timm_map`` wraps a hierarchical model (ConvNeXt, ResNet, EfficientNet, ...) and returns the
  maps of ``forward_intermediates(..., intermediates_only=True)``; what the maps do not need
  (the head, trailing stages) is pruned with timm's ``prune_intermediate_layers``. A model
  without ``forward_intermediates`` is wrapped in timm's ``FeatureListNet`` (``features_only``).
  ``dims`` and ``strides`` come from ``feature_info``. LLaVA-HR's high-res pathway is
  ``timm_map("convnext_large_mlp", out_indices=[3])`` (or ``convnext_xxlarge``).

Weights: ``weights`` is a local timm checkpoint (``.safetensors`` or a weights-only torch
file) of the whole model; keys of pruned parts (e.g. a classifier head of another size) are
skipped. ``pretrained=True`` is refused: mixres never downloads.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._utils import lazy_import
from ..errors import ConfigError, ShapeError, UnknownNameError
from ..registry import register_pathway
from ._vit import _StackedViT
from ._weights import load_into, load_state_dict_file
from .base import MapPathway, check_images

__all__ = ["TimmViTPathway", "TimmMapPathway", "create_timm_model", "feature_backbone", "prune_and_load", "forward_maps"]

# timm arguments that download weights or change what the model returns
_REFUSED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "features_only", "checkpoint_path")


def create_timm_model(model_name: str, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, **model_kwargs)`` with mixres errors.

    Raises:
        UnknownNameError: timm has no model of that name (the message lists close matches).
        ConfigError: a downloading / ``features_only`` argument, or one the model does not take.
    """
    timm = lazy_import("timm")
    if not isinstance(model_name, str):
        raise TypeError(f"model_name has to be a timm model name (str), but got {type(model_name).__name__}")
    kwargs = dict(model_kwargs or {})
    refused = [k for k in _REFUSED_KWARGS if k in kwargs]
    if refused:
        raise ConfigError(
            f"model_kwargs may not set {refused}: mixres builds timm models with random weights and "
            "loads local weights from weights='/path/to/model.safetensors'"
        )
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(f"unknown timm model {model_name!r}{hint} (list them with timm.list_models('pattern*'))")
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError as err:
        raise ConfigError(f"timm model {model_name!r} does not take model_kwargs {sorted(kwargs)}: {err}") from None


def _out_indices(out_indices: Sequence[int] | None, num: int) -> tuple[int, ...]:
    if out_indices is None:
        return tuple(range(num))
    if isinstance(out_indices, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
        raise TypeError(f"out_indices has to be a list of ints, but got {out_indices!r}")
    bad = [i for i in out_indices if not -num <= i < num]
    if bad or not out_indices:
        raise ConfigError(f"out_indices has to name stages in [{-num}, {num - 1}] (the model has {num}), but got {list(out_indices)}")
    indices = sorted(i % num for i in out_indices)
    if len(set(indices)) != len(indices):
        raise ConfigError(f"out_indices {list(out_indices)} names a stage twice")
    return tuple(indices)


def prune_and_load(
    model: nn.Module,
    prune: Callable[[nn.Module], nn.Module],
    state_dict: Mapping[str, torch.Tensor] | None,
    source: str,
) -> nn.Module:
    """Apply ``prune`` (returns the module to keep), then load the whole model's ``state_dict``.

    Checkpoint keys of what ``prune`` dropped (a head, trailing stages) are skipped; every kept
    key has to be present with its shape (:func:`~mixres.pathways._weights.load_into`).
    """
    before = model.state_dict(keep_vars=True)  # holds the tensors, so their ids stay unique
    kept_module = prune(model)
    kept = {id(t) for t in kept_module.state_dict(keep_vars=True).values()}
    if state_dict is not None:
        load_into(model, state_dict, source, ignore=[k for k, t in before.items() if id(t) not in kept])
    return kept_module


def feature_backbone(
    model: nn.Module,
    out_indices: Sequence[int] | None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    source: str = "",
) -> tuple[nn.Module, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Prune (or wrap) a timm model to the stages ``out_indices``, then load ``state_dict``.

    Args:
        model: a timm model with ``feature_info``.
        out_indices: indices into ``feature_info``; negative count from the end; ``None`` all.
        state_dict: the whole model's weights (keys of pruned parts are skipped), or ``None``.
        source: where the weights came from, for errors.

    Returns:
        ``(module, out_indices, dims, strides)``: ``module`` has ``forward_intermediates``
        (pruned in place) or is a ``FeatureListNet`` returning the maps.
    """
    info = list(model.feature_info)
    indices = _out_indices(out_indices, len(info))
    dims = tuple(int(info[i]["num_chs"]) for i in indices)
    strides = tuple(int(info[i]["reduction"]) for i in indices)

    def prune(m: nn.Module) -> nn.Module:
        if not hasattr(m, "forward_intermediates"):
            return lazy_import("timm.models").FeatureListNet(m, out_indices=indices)
        if hasattr(m, "prune_intermediate_layers"):
            m.prune_intermediate_layers(list(indices), prune_norm=True, prune_head=True)
        return m

    return prune_and_load(model, prune, state_dict, source), indices, dims, strides


def forward_maps(module: nn.Module, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """The maps of ``indices``, through ``forward_intermediates`` or a ``FeatureListNet``."""
    check_images(images)
    images = images.to(next(module.parameters()).dtype)  # as the token pathways do
    if hasattr(module, "forward_intermediates"):
        return list(module.forward_intermediates(images, indices=list(indices), intermediates_only=True))
    return list(module(images))


_TOO_SMALL = "Kernel size can't be greater than actual input size"


class _TimmMaps(MapPathway):
    """Shared by ``timm_map`` and ``open_clip_convnext``: ``self.model`` returns the maps."""

    model: nn.Module
    out_indices: tuple[int, ...]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One map per stage of :attr:`out_indices`.

        Args:
            images (Tensor[B, 3, H, W]): normalised images (any size the backbone accepts).

        Returns:
            ``[map (Tensor[B, dims[i], ~H / strides[i], ~W / strides[i]]) for each stage]``.

        Raises:
            ShapeError: not ``Tensor[B, 3, H, W]`` of floats, or too small for the backbone's
                convolutions (a stage's input below its kernel).
            DeviceError: ``images`` are not on the backbone's device.
        """
        h, w = check_images(images, module=self)
        try:
            return forward_maps(self.model, images, self.out_indices)
        except RuntimeError as err:
            # backbones without padding (ConvNeXt's stem / downsample convs) cannot shrink a
            # too-small input; the size that fits depends on the padding, so torch's own
            # refusal is caught and reworded rather than guessed beforehand
            if _TOO_SMALL not in str(err):
                raise
            raise ShapeError(
                f"images size {(h, w)} is too small for this map pathway (strides {list(self.strides)}): "
                f"a stage's input shrank below its kernel; use images of at least {max(self.strides)} px a side"
            ) from None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in the backward pass (timm's ``set_grad_checkpointing``)."""
        self.grad_checkpointing = enable
        self.model.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return f"out_indices={self.out_indices}, dims={self.dims}, strides={self.strides}"


class TimmMapPathway(_TimmMaps):
    """Any timm model as a map pathway (``timm_map``): one map per selected stage.

    Args:
        model_name: a timm model name, e.g. ``"convnext_large_mlp"`` (LLaVA-HR),
            ``"convnext_xxlarge"``, ``"resnet18"``, ``"efficientnet_b0"``.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``drop_path_rate``).
        out_indices: the stages to return, indices into the model's ``feature_info``
            (negative from the end); ``None``: all.
        weights: a local timm checkpoint of the model (``.safetensors`` / weights-only
            torch file); ``None``: random init.
        device: where to put the parameters.
        dtype: parameter dtype.

    Raises:
        UnknownNameError: no timm model of that name.
        ConfigError: bad ``model_kwargs`` (``pretrained`` is refused) or ``out_indices``.
        WeightsError: the checkpoint is missing or does not fit.

    Example:
        >>> cnn = TimmMapPathway("resnet10t", out_indices=[-2, -1])
        >>> [tuple(m.shape) for m in cnn(torch.randn(1, 3, 64, 96))], cnn.dims, cnn.strides
        ([(1, 256, 4, 6), (1, 512, 2, 3)], (256, 512), (16, 32))
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict[str, Any] | None = None,
        out_indices: Sequence[int] | None = None,
        weights: str | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        model = create_timm_model(model_name, model_kwargs)
        state_dict = load_state_dict_file(weights) if weights is not None else None
        self.model, self.out_indices, self.dims, self.strides = feature_backbone(
            model, out_indices, state_dict, str(weights)
        )
        self.grad_checkpointing = False
        self.model.to(device=device, dtype=dtype)


class TimmViTPathway(_StackedViT):
    """A timm ``VisionTransformer`` as a token pathway (``timm_vit``).

    Built with ``dynamic_img_size=True`` (so any grid works); the classifier head is pruned.
    Prefix tokens are the class token and any register tokens (``num_prefix_tokens`` of timm).

    Args:
        model_name: a timm ViT name, e.g. ``"vit_large_patch14_clip_336"``.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``depth``, ...).
        weights: a local timm checkpoint of the model; ``None``: random init.
        select_layer: the block whose output :meth:`forward` returns (-1 last, -2 penultimate,
            0 the embeddings).
        drop_prefix: drop the prefix tokens before block 1 (as LLaVA-HR does for CLIP).
        post_norm: apply timm's final ``norm`` after the selected block. ``None``: as
            ``forward_features`` does, i.e. when the last block is selected.
        device: where to put the parameters.
        dtype: parameter dtype.

    Raises:
        UnknownNameError: no timm model of that name.
        ConfigError: the model is not a ``VisionTransformer``, uses patch dropout, or bad arguments.
        WeightsError: the checkpoint is missing or does not fit.

    Example:
        >>> vit = TimmViTPathway("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
        >>> tokens, grid = vit(torch.randn(2, 3, 24, 40))
        >>> tokens.shape, grid
        (torch.Size([2, 15, 192]), (3, 5))
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        select_layer: int = -1,
        drop_prefix: bool = False,
        post_norm: bool | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        timm = lazy_import("timm")
        try:
            model = create_timm_model(model_name, {**(model_kwargs or {}), "dynamic_img_size": True})
        except ConfigError as err:
            raise ConfigError(f"{err} (timm_vit builds timm VisionTransformer models with dynamic_img_size=True; "
                              "use timm_map for hierarchical models)") from None
        if not isinstance(model, timm.models.VisionTransformer):
            raise ConfigError(
                f"timm_vit wraps timm VisionTransformer models, but {model_name!r} is a {type(model).__name__}; "
                "use timm_map for hierarchical models"
            )
        if not isinstance(model.patch_drop, nn.Identity):
            raise ConfigError("timm_vit needs every patch token (the grid); remove patch_drop_rate from model_kwargs")
        state_dict = load_state_dict_file(weights) if weights is not None else None
        self.model = prune_and_load(model, _prune_vit_head, state_dict, str(weights))
        self._init_stack(
            dim=model.embed_dim,
            patch_size=model.patch_embed.patch_size,
            num_blocks=len(model.blocks),
            source_prefix=model.num_prefix_tokens,
            image_size=model.patch_embed.img_size,
            select_layer=select_layer,
            drop_prefix=drop_prefix,
            post_norm=post_norm,
            source_post_norm=True,
        )
        self.model.to(device=device, dtype=dtype)

    @property
    def _blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @property
    def _post_norm(self) -> nn.Module | None:
        return None if isinstance(self.model.norm, nn.Identity) else self.model.norm

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, add prefix tokens and resampled position embeddings, ``norm_pre``.

        Args:
            images (Tensor[B, 3, H, W]): normalised images; ``H, W`` multiples of ``patch_size``.

        Returns:
            ``(x (Tensor[B, P + h*w, C]), (h, w))`` with ``P = num_prefix_tokens``.

        Raises:
            ShapeError: not ``Tensor[B, 3, H, W]`` of floats, or a side not a multiple of the patch.
        """
        check_images(images, self.patch_size, module=self)
        m = self.model
        x = m.patch_embed(images.to(m.patch_embed.proj.weight.dtype))  # NHWC (dynamic_img_size)
        grid = (int(x.shape[1]), int(x.shape[2]))
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))  # as forward_features
        return x[:, self.source_prefix_tokens - self.num_prefix_tokens :], grid


def _prune_vit_head(model: nn.Module) -> nn.Module:
    model.prune_intermediate_layers(list(range(len(model.blocks))), prune_norm=False, prune_head=True)
    return model


register_pathway("timm_vit")(TimmViTPathway)
register_pathway("timm_map")(TimmMapPathway)
