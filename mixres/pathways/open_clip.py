"""open_clip image towers as pathways: ``open_clip_vit`` (tokens) and ``open_clip_convnext`` (maps).

Source: open_clip (github.com/mlfoundations/open_clip), ``transformer.py`` (``VisionTransformer``),
``timm_model.py`` (``TimmModel``, whose ``.trunk`` is a timm model) and the model JSONs of
``model_configs/``. Only the image tower is built (open_clip's ``_build_vision_tower``), never
the text tower.

Configs are open_clip's own: ``model_name`` names a bundled model config (``"ViT-L-14-336"``,
``"convnext_large_d_320"``, ``"convnext_xxlarge"``; read from the installed package, no
download) and ``config`` is merged over it with the same layout::

    {"embed_dim": 768, "quick_gelu": False, "vision_cfg": {"image_size": 336, "layers": 24, ...}}

- ``open_clip_vit``: the ``VisionTransformer`` held as ``.visual``. :meth:`~OpenCLIPViTPathway.embed`
  is ``_embeds`` with the position embedding resampled to any grid (bicubic + antialias) and
  no patch dropout; blocks are ``transformer.resblocks``; the post-norm is ``ln_post``, which
  open_clip applies to all tokens before pooling unless ``final_ln_after_pool``.
- ``open_clip_convnext``: a ConvNeXt tower (``vision_cfg.timm_model_name``); its ``visual.trunk``
  is kept as ``.model`` and run as ``timm_map`` runs a timm model (``forward_intermediates``);
  the pooling / projection head is dropped.

Weights: ``weights`` is a local open_clip checkpoint (the whole CLIP state dict with
``visual.*`` keys, as ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``; only the
image tower's keys are used). OpenAI's TorchScript archives are not read: convert them with
open_clip first.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .._utils import lazy_import
from ..errors import ConfigError, UnknownNameError
from ..grid import resample_pos_embed
from ..registry import register_pathway
from ._vit import _StackedViT
from ._weights import load_into, load_state_dict_file, strip_prefix
from .base import check_images
from .timm import _TimmMaps, feature_backbone

__all__ = ["OpenCLIPViTPathway", "OpenCLIPConvNeXtPathway", "open_clip_model_config", "build_open_clip_visual"]


def open_clip_model_config(model_name: str | None, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The open_clip model config of ``model_name`` with ``config`` merged over it.

    Args:
        model_name: a bundled open_clip config name (``open_clip.list_models()``) or
            ``"local-dir:<path>"``; ``None``: only ``config``.
        config: ``{"embed_dim": ..., "quick_gelu": ..., "vision_cfg": {...}}``; its
            ``vision_cfg`` keys override the named config's one by one.

    Raises:
        UnknownNameError: no bundled config of that name.
        ConfigError: an ``hf-hub:`` name (needs a download), unknown ``vision_cfg`` keys, or
            ``timm_model_pretrained=True``.
    """
    open_clip = lazy_import("open_clip")
    base: dict[str, Any] = {}
    if model_name is not None:
        if str(model_name).startswith("hf-hub:"):
            raise ConfigError(
                f"model_name {model_name!r} needs a download; mixres never downloads: pass a bundled name, "
                "'local-dir:<path>' or the config itself"
            )
        base = open_clip.get_model_config(model_name)
        if base is None:
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(f"unknown open_clip model {model_name!r}{hint} (see open_clip.list_models())")
    config = dict(config or {})
    vision_cfg = {**base.get("vision_cfg", {}), **config.pop("vision_cfg", {})}
    merged = {**base, **config, "vision_cfg": vision_cfg}
    fields = set(open_clip.CLIPVisionCfg.__dataclass_fields__)
    unknown = sorted(set(vision_cfg) - fields)
    if unknown:
        raise ConfigError(f"vision_cfg has key(s) {unknown} that open_clip's CLIPVisionCfg does not take; its keys are {sorted(fields)}")
    if vision_cfg.get("timm_model_pretrained"):
        raise ConfigError("vision_cfg.timm_model_pretrained=True downloads weights; mixres loads local ones from weights")
    if "embed_dim" not in merged:
        raise ConfigError(f"the open_clip config needs 'embed_dim' (the output projection width), got keys {sorted(merged)}")
    return merged


def build_open_clip_visual(model_cfg: Mapping[str, Any]) -> nn.Module:
    """open_clip's image tower (``CLIP.visual``) for a model config, with random weights."""
    lazy_import("open_clip")
    model = lazy_import("open_clip.model")
    return model._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=bool(model_cfg.get("quick_gelu", False)))


def _visual_state_dict(path: str) -> dict[str, torch.Tensor]:
    return strip_prefix(load_state_dict_file(path), "visual.")


class OpenCLIPViTPathway(_StackedViT):
    """open_clip's ``VisionTransformer`` (``CLIP.visual``) as a token pathway (``open_clip_vit``).

    Args:
        model_name: a bundled open_clip config name, e.g. ``"ViT-L-14-336"``; ``None``: ``config`` only.
        config: open_clip model config merged over the named one (``embed_dim``, ``quick_gelu``,
            ``vision_cfg``).
        weights: a local open_clip checkpoint; ``None``: random init.
        select_layer: the block whose output :meth:`forward` returns (-1 last, -2 penultimate,
            0 the embeddings).
        drop_prefix: drop the CLS token before block 1.
        post_norm: apply ``ln_post`` after the selected block. ``None``: as open_clip does for
            its tokens, i.e. when the last block is selected (and not ``final_ln_after_pool``).
        device: where to put the parameters.
        dtype: parameter dtype.

    Raises:
        ConfigError: not a ViT config, ``patch_dropout > 0``, bad keys or arguments.
        WeightsError: the checkpoint is missing or does not fit.

    Example:
        >>> vit = OpenCLIPViTPathway(config={"embed_dim": 16, "vision_cfg": dict(
        ...     image_size=32, patch_size=8, width=32, layers=2, head_width=16)})
        >>> tokens, grid = vit(torch.randn(2, 3, 32, 16))
        >>> tokens.shape, grid
        (torch.Size([2, 8, 32]), (4, 2))
    """

    def __init__(
        self,
        model_name: str | None = None,
        config: dict[str, Any] | None = None,
        weights: str | None = None,
        select_layer: int = -1,
        drop_prefix: bool = False,
        post_norm: bool | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        model_cfg = open_clip_model_config(model_name, config)
        visual = build_open_clip_visual(model_cfg)
        if not isinstance(visual, lazy_import("open_clip.transformer").VisionTransformer):
            raise ConfigError(
                f"open_clip_vit wraps ViT towers, but this config builds a {type(visual).__name__}; "
                "use open_clip_convnext for ConvNeXt towers"
            )
        if model_cfg["vision_cfg"].get("patch_dropout", 0.0) > 0:
            raise ConfigError("open_clip_vit needs every patch token (the grid); set vision_cfg.patch_dropout=0")
        if not visual.transformer.batch_first:
            raise ConfigError("open_clip_vit needs a batch-first transformer")
        if weights is not None:
            load_into(visual, _visual_state_dict(weights), str(weights))
        self.visual = visual
        self._init_stack(
            dim=visual.transformer.width,
            patch_size=visual.patch_size,
            num_blocks=len(visual.transformer.resblocks),
            source_prefix=1,
            image_size=visual.image_size,
            select_layer=select_layer,
            drop_prefix=drop_prefix,
            post_norm=post_norm,
            source_post_norm=not visual.final_ln_after_pool,
        )
        self.visual.to(device=device, dtype=dtype)

    @property
    def _blocks(self) -> Sequence[nn.Module]:
        return self.visual.transformer.resblocks

    @property
    def _post_norm(self) -> nn.Module | None:
        return None if self.visual.attn_pool is not None else self.visual.ln_post

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, prepend CLS, add resampled position embeddings, ``ln_pre``.

        Args:
            images (Tensor[B, 3, H, W]): normalised images; ``H, W`` multiples of ``patch_size``.

        Returns:
            ``(x (Tensor[B, P + h*w, C]), (h, w))`` with ``P = num_prefix_tokens``.

        Raises:
            ShapeError: not ``Tensor[B, 3, H, W]`` of floats, or a side not a multiple of the patch.
        """
        check_images(images, self.patch_size, module=self)
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = rearrange(x, "b c h w -> b (h w) c")
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        pos = resample_pos_embed(v.positional_embedding.unsqueeze(0), grid, old_grid=v.grid_size, num_prefix_tokens=1)
        x = v.ln_pre(x + pos.to(x.dtype))
        return x[:, 1 - self.num_prefix_tokens :], grid


class OpenCLIPConvNeXtPathway(_TimmMaps):
    """An open_clip ConvNeXt tower's trunk as a map pathway (``open_clip_convnext``).

    Args:
        model_name: a bundled open_clip config name, e.g. ``"convnext_large_d_320"``,
            ``"convnext_xxlarge"``; ``None``: ``config`` only.
        config: open_clip model config merged over the named one; ``vision_cfg`` has to set
            ``timm_model_name``.
        out_indices: the trunk stages to return (indices into its ``feature_info``, negative
            from the end); ``None``: all.
        weights: a local open_clip checkpoint (``visual.trunk.*`` keys are used).
        device: where to put the parameters.
        dtype: parameter dtype.

    Raises:
        ConfigError: the config does not name a timm trunk, bad keys or ``out_indices``.
        WeightsError: the checkpoint is missing or does not fit.

    Example:
        >>> cnn = OpenCLIPConvNeXtPathway(config={"embed_dim": 16, "vision_cfg": dict(
        ...     timm_model_name="convnext_atto", timm_pool="", timm_proj="mlp", image_size=64)})
        >>> maps = cnn(torch.randn(1, 3, 64, 64))
        >>> [tuple(m.shape[1:]) for m in maps], cnn.strides
        ([(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)], (4, 8, 16, 32))
    """

    def __init__(
        self,
        model_name: str | None = None,
        config: dict[str, Any] | None = None,
        out_indices: Sequence[int] | None = None,
        weights: str | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        model_cfg = open_clip_model_config(model_name, config)
        if not model_cfg["vision_cfg"].get("timm_model_name"):
            raise ConfigError(
                "open_clip_convnext wraps towers with a timm trunk, but vision_cfg sets no timm_model_name; "
                "use open_clip_vit for ViT towers"
            )
        trunk = build_open_clip_visual(model_cfg).trunk
        state_dict = None
        if weights is not None:
            state_dict = strip_prefix(_visual_state_dict(weights), "trunk.")
        self.model, self.out_indices, self.dims, self.strides = feature_backbone(
            trunk, out_indices, state_dict, str(weights)
        )
        self.grad_checkpointing = False
        self.model.to(device=device, dtype=dtype)


register_pathway("open_clip_vit")(OpenCLIPViTPathway)
register_pathway("open_clip_convnext")(OpenCLIPConvNeXtPathway)
