"""Token pathways over HF transformers vision towers: ``hf_clip`` and ``hf_siglip``.

Source: ``CLIPVisionModel`` / ``SiglipVisionModel`` of transformers (``models/clip/modeling_clip.py``,
``models/siglip/modeling_siglip.py``). The wrapper holds the unchanged model as ``.model`` (so its
``state_dict`` keys are transformers' own, prefixed ``model.``) and re-states its forward as
three calls an encoder can interleave with fusions:

- :meth:`~HFVisionPathway.embed`: patch conv, the CLS token (CLIP), position embeddings resampled
  to any ``(H, W)`` grid (bicubic + antialias, :func:`mixres.grid.resample_pos_embed`), CLIP's
  ``pre_layrnorm``; with ``drop_prefix=True`` the CLS row is then dropped;
- :meth:`~HFVisionPathway.run_blocks`: encoder layers ``start .. end-1`` (attention mask None);
- :meth:`~HFVisionPathway.finalize`: ``post_layernorm`` if configured.

LLaVA-HR (arXiv 2403.03003, ``llava_hr/model/multimodal_encoder/clip_encoder.py``) runs CLIP
ViT-L/14-336 this way with ``drop_prefix=True`` and no post-norm, at 448 px or more.

Where we differ from transformers' own ``interpolate_pos_encoding``: we add ``antialias=True``
(as timm and the LLaVA-HR release do); at the native size nothing is resampled, so the
features equal the model's ``output_hidden_states`` exactly.

Weights: ``weights`` is a local ``save_pretrained`` directory (loaded with
``from_pretrained(..., local_files_only=True)``; a full ``CLIPModel`` directory works too), or a
local weight file of the vision tower. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .._utils import lazy_import
from ..errors import ConfigError, WeightsError
from ..grid import resample_pos_embed
from ..registry import register_pathway
from ._vit import _StackedViT
from ._weights import load_into, load_state_dict_file, missing_weights_error, strip_prefix
from .base import check_images

__all__ = ["HFVisionPathway", "HFCLIPPathway", "HFSiglipPathway", "CLIP_VIT_L_14_336", "SIGLIP_SO400M_14_384"]

# transformers CLIPVisionConfig of openai/clip-vit-large-patch14-336 (the LLaVA-HR low-res ViT)
CLIP_VIT_L_14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
# transformers SiglipVisionConfig of google/siglip-so400m-patch14-384
SIGLIP_SO400M_14_384: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def _check_config_keys(config_cls: type, config: Mapping[str, Any]) -> None:
    if not isinstance(config, Mapping):
        raise TypeError(f"config has to be a dict of {config_cls.__name__} arguments, but got {type(config).__name__}")
    allowed = {n for n in inspect.signature(config_cls.__init__).parameters if n != "self"} | {"attn_implementation"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigError(
            f"config has key(s) {unknown} that {config_cls.__name__} does not take; "
            f"its keys are {sorted(allowed - {'transformers_version', 'architectures'})}"
        )


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and not name.endswith((".bin", ".pt", ".pth", ".safetensors"))


def _from_pretrained(model_cls: type, path: str, config: Mapping[str, Any]) -> nn.Module:
    try:
        model, info = model_cls.from_pretrained(
            path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **config
        )
    except OSError as err:
        if not Path(path).expanduser().is_dir():
            raise missing_weights_error(path, "weights") from None
        raise WeightsError(f"{model_cls.__name__}.from_pretrained({path!r}) failed: {err}") from None
    problems = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"])]
    problems += [f"{k}: missing from the checkpoint" for k in sorted(info["missing_keys"])]
    if problems:
        raise WeightsError(
            f"the weights in {path!r} do not fit this {model_cls.__name__}: {'; '.join(problems[:8])}"
            + (f" ... and {len(problems) - 8} more" if len(problems) > 8 else "")
            + ". Check that config matches the checkpoint"
        )
    return model


def _build_model(model_cls_name: str, config_cls_name: str, config: Mapping[str, Any], path: str | None) -> nn.Module:
    transformers = lazy_import("transformers")
    model_cls, config_cls = getattr(transformers, model_cls_name), getattr(transformers, config_cls_name)
    _check_config_keys(config_cls, config)
    if path is None:
        return model_cls(config_cls(**config))
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"weights has to be a str path, but got {type(path).__name__}")
    local = Path(path).expanduser()
    if local.is_dir() or (not local.exists() and _looks_like_hub_id(str(path))):
        return _from_pretrained(model_cls, str(path), config)  # a hub id only works from the local cache
    model = model_cls(config_cls(**config))
    state_dict = strip_prefix(load_state_dict_file(local), "vision_model.")  # CLIPModel / v4 layout
    load_into(model, state_dict, str(path))
    return model


class HFVisionPathway(_StackedViT):
    """A transformers vision tower as a token pathway (the shared code of ``hf_clip`` / ``hf_siglip``).

    Args:
        config: keyword arguments of the transformers vision config (``CLIPVisionConfig`` /
            ``SiglipVisionConfig``), e.g. :data:`CLIP_VIT_L_14_336`; with ``weights``
            they override the loaded config. ``None``: transformers' defaults.
        weights: a local directory saved by ``save_pretrained`` (or a hub id already
            in the local HF cache), or a local weight file of the vision tower. ``None``: random init.
        select_layer: the block whose output :meth:`forward` returns: -1 the last, -2 the
            penultimate (LLaVA), 0 the embeddings.
        drop_prefix: drop the CLS token after :meth:`embed`, before block 1 (the LLaVA-HR release);
            ``False`` keeps it in the stream as the source model does.
        post_norm: apply ``post_layernorm`` after the selected block. ``None``: as the source does
            for its features (CLIP never; SigLIP when the last block is selected).
        device: where to put the parameters.
        dtype: parameter dtype.

    Raises:
        ConfigError: a config key the transformers config does not take, a bad ``select_layer``.
        WeightsError: ``weights`` is not on this machine, or its weights do not fit.
    """

    _model_class = ""
    _config_class = ""
    _source_post_norm = False

    def __init__(
        self,
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
        self.model = _build_model(self._model_class, self._config_class, dict(config or {}), weights)
        cfg = self.model.config
        has_cls = hasattr(self.model.embeddings, "class_embedding")
        self._init_stack(
            dim=cfg.hidden_size,
            patch_size=cfg.patch_size,
            num_blocks=len(self.model.encoder.layers),
            source_prefix=int(has_cls),
            image_size=cfg.image_size,
            select_layer=select_layer,
            drop_prefix=drop_prefix,
            post_norm=post_norm,
            source_post_norm=self._source_post_norm,
        )
        self.model.to(device=device, dtype=dtype)
        self.train()

    @property
    def _blocks(self) -> Sequence[nn.Module]:
        return self.model.encoder.layers

    @property
    def _post_norm(self) -> nn.Module | None:
        return self.model.post_layernorm

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x, attention_mask=None)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, prepend CLS (CLIP), add resampled position embeddings, pre-norm (CLIP).

        Args:
            images (Tensor[B, 3, H, W]): normalised images; ``H, W`` multiples of ``patch_size``.

        Returns:
            ``(x (Tensor[B, P + h*w, C]), (h, w))`` with ``P = num_prefix_tokens``.

        Raises:
            ShapeError: not ``Tensor[B, 3, H, W]`` of floats, or a side not a multiple of the patch.
        """
        check_images(images, self.patch_size, module=self)
        emb = self.model.embeddings
        x = emb.patch_embedding(images.to(emb.patch_embedding.weight.dtype))
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.source_prefix_tokens:
            x = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        pos = resample_pos_embed(emb.position_embedding.weight.unsqueeze(0), grid, num_prefix_tokens=self.source_prefix_tokens)
        x = x + pos.to(x.dtype)
        x = self._pre_norm(x)
        return x[:, self.source_prefix_tokens - self.num_prefix_tokens :], grid

    def _pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HFCLIPPathway(HFVisionPathway):
    """transformers ``CLIPVisionModel`` as a token pathway (``hf_clip``).

    One CLS prefix token; ``pre_layrnorm`` after the embeddings; ``post_layernorm`` is applied
    only to the pooled CLS by the source, so ``post_norm=None`` means no post-norm. Arguments as
    :class:`HFVisionPathway`. The LLaVA-HR low-res pathway is
    ``HFCLIPPathway(CLIP_VIT_L_14_336, "<local dir>", drop_prefix=True)``.

    Example:
        >>> vit = HFCLIPPathway(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                          num_attention_heads=4, patch_size=8, image_size=32))
        >>> tokens, grid = vit(torch.randn(2, 3, 48, 32))  # resampled position embeddings
        >>> tokens.shape, grid
        (torch.Size([2, 24, 32]), (6, 4))
    """

    _model_class = "CLIPVisionModel"
    _config_class = "CLIPVisionConfig"
    _source_post_norm = False

    def _pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pre_layrnorm(x)


class HFSiglipPathway(HFVisionPathway):
    """transformers ``SiglipVisionModel`` as a token pathway (``hf_siglip``).

    No prefix token and no pre-norm; the source applies ``post_layernorm`` to its
    ``last_hidden_state``, so ``post_norm=None`` applies it when the last block is selected.
    The attention-pooling head is kept (for weight loading) but never run; pass
    ``config={"vision_use_head": False, ...}`` to leave it out. Arguments as :class:`HFVisionPathway`.

    Example:
        >>> vit = HFSiglipPathway(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                            num_attention_heads=4, patch_size=8, image_size=32))
        >>> x, grid = vit.embed(torch.randn(1, 3, 16, 40))
        >>> x.shape, grid, vit.num_prefix_tokens
        (torch.Size([1, 10, 32]), (2, 5), 0)
    """

    _model_class = "SiglipVisionModel"
    _config_class = "SiglipVisionConfig"
    _source_post_norm = True


register_pathway("hf_clip")(HFCLIPPathway)
register_pathway("hf_siglip")(HFSiglipPathway)
