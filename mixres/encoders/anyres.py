"""AnyResEncoder: LLaVA-NeXT's dynamic-resolution tiling around any encoder or token pathway.

Source: LLaVA-NeXT (Liu et al., blog, January 2024); ``process_anyres_image`` in
``llava/mm_utils.py`` and the ``spatial_unpad`` branch with ``image_newline`` in
``llava/model/llava_arch.py`` of github.com/LLaVA-VL/LLaVA-NeXT. The tiling math and the
differences from the release are in :mod:`mixres.anyres`.

Preset: ``llava-next-anyres-672``, LLaVA-NeXT's vision side (CLIP ViT-L/14-336 through ``hf_clip``,
``select_layer=-2``, tiles of 336 on :data:`mixres.anyres.HF_PINPOINTS`, transformers' reading and
rounding); the original release's order and rounding with the overrides
``pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS], convention="llava_next"``; pass
``encoder=`` to swap the inner encoder (its ``weights`` to load weights).

Unlike other encoders, the input is a list of images of different sizes and the output a list
of token sequences of different lengths (base image tokens, then the unpadded tile map row by
row, each row closed by the learned newline): the output is not one grid, so
:meth:`AnyResEncoder.grid_for` raises and :meth:`AnyResEncoder.num_tokens` /
:meth:`AnyResEncoder.layout` answer for a given original size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import check_positive_int, to_2tuple
from ..anyres import (
    HF_PINPOINTS,
    AnyResLayout,
    Convention,
    add_newline,
    anyres_layout,
    check_convention,
    check_pinpoints,
    tile,
    unpad_tokens,
    untile,
)
from ..errors import ConfigError, MixresError, ShapeError
from ..grid import map_to_tokens, tokens_to_map
from ..pathways.hf import CLIP_VIT_L_14_336
from ..registry import Configurable, build_if_config, register_encoder, register_encoder_preset
from .base import Encoder

__all__ = ["AnyResEncoder"]

_INNER_KINDS = ("encoder", "pathway")


def _build_inner(value: Any) -> nn.Module:
    """An encoder or token pathway from a module, a config dict or an encoder name."""
    if isinstance(value, Mapping):
        kind = value.get("kind", "encoder")
        if kind not in _INNER_KINDS:
            raise ConfigError(f"encoder has to be an encoder or pathway config, but got kind {kind!r}")
        return build_if_config(value, kind, "encoder")
    if isinstance(value, Configurable) and value.registry_kind in _INNER_KINDS:
        return value
    if isinstance(value, str):
        return build_if_config(value, "encoder", "encoder")
    raise TypeError(
        "encoder has to be a registered encoder or token pathway (module, config dict or encoder name), "
        f"but got {type(value).__name__}"
    )


def _as_list(images: Any) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    if isinstance(images, torch.Tensor) or not isinstance(images, (list, tuple)) or not images:
        raise TypeError(
            "images has to be a non-empty list of Tensor[3, H, W] (or a Tensor[B, 3, H, W]), "
            f"but got {getattr(images, 'shape', type(images).__name__)}"
        )
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise ShapeError(f"images[{i}] has to be a Tensor[3, H, W], but got {getattr(image, 'shape', type(image).__name__)}")
        if not image.is_floating_point() or 0 in image.shape:
            raise ShapeError(f"images[{i}] has to be a non-empty float tensor, but got {image.dtype} {tuple(image.shape)}")
    return list(images)


class AnyResEncoder(Encoder):
    """Encode each image as a resized base image plus a grid of tiles (LLaVA-NeXT AnyRes).

    Args:
        encoder: the encoder or token pathway run on every ``tile_size`` crop (a registered module,
            its config dict with ``kind`` "encoder" or "pathway", or an encoder name); it returns
            ``(tokens, grid)``.
        pinpoints: candidate resolutions ``(h, w)``, multiples of ``tile_size``, e.g.
            :data:`mixres.anyres.LLAVA_NEXT_PINPOINTS`.
        tile_size: the crop side in pixels; default the inner encoder's square ``image_size``.
        newline: append the learned ``image_newline`` (width ``out_dim``) after each row of the tile
            map, as LLaVA-NeXT.
        unpad: drop the rows/columns of the tile map that only saw padding (``spatial_unpad``).
        convention: ``"hf"`` (transformers' llava_next unpad rounding, what an HF LLaVA-NeXT
            processor counts) or ``"llava_next"`` (the original release's); see :mod:`mixres.anyres`.
        device: where to create ``image_newline``.
        dtype: the dtype of ``image_newline``.

    Attributes:
        image_size: the largest pinpoint (images of any size work).
        tile_grid: the inner encoder's token grid on one tile.

    Shape:
        images: a list of ``Tensor[3, H_i, W_i]`` (normalised; a ``Tensor[B, 3, H, W]`` also works)
        -> a list of ``Tensor[N_i, out_dim]`` with ``N_i = num_tokens((H_i, W_i))``.

    Example:
        >>> from mixres.pathways.patchify import PatchifyPathway as Patchify  # a zero-block ViT
        >>> enc = AnyResEncoder(Patchify(), pinpoints=[[16, 32], [32, 16], [32, 32]])
        >>> out = enc([torch.randn(3, 20, 40), torch.randn(3, 50, 45)])
        >>> [o.shape for o in out], [enc.num_tokens((20, 40)), enc.num_tokens((50, 45))]
        ([torch.Size([52, 8]), torch.Size([88, 8])], [52, 88])
    """

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any] | str,
        pinpoints: Sequence[Sequence[int]],
        tile_size: int | None = None,
        newline: bool = True,
        unpad: bool = True,
        convention: Convention = "hf",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.encoder = _build_inner(encoder)
        if tile_size is None:
            size = getattr(self.encoder, "image_size", None)
            if size is None or to_2tuple("image_size", size)[0] != to_2tuple("image_size", size)[1]:
                raise ConfigError(f"tile_size is needed: the inner encoder has no square image_size (got {size!r})")
            tile_size = to_2tuple("image_size", size)[0]
        check_positive_int("tile_size", tile_size)
        self.tile_size, self.newline, self.unpad = tile_size, bool(newline), bool(unpad)
        self.convention = check_convention(convention)
        self.pinpoints = check_pinpoints(pinpoints, tile_size)
        self.tile_grid = self.encoder.grid_for(tile_size)
        self.image_size = max(self.pinpoints, key=lambda size: size[0] * size[1])
        self.out_dim = getattr(self.encoder, "out_dim", None) or self.encoder.dim
        self.image_newline = None
        if newline:  # LLaVA's init: N(0, 1/width)
            self.image_newline = nn.Parameter(torch.randn(self.out_dim, device=device, dtype=dtype) * self.out_dim**-0.5)

    def layout(self, image_size: int | Sequence[int] | None = None) -> AnyResLayout:
        """Chosen resolution, tile grid, unpadded grid and token count for an original ``(H, W)``
        (default :attr:`image_size`)."""
        size = to_2tuple("image_size", self.image_size if image_size is None else image_size)
        return anyres_layout(size, self.pinpoints, self.tile_size, self.tile_grid, self.newline, self.unpad, self.convention)

    def num_tokens(self, image_size: int | Sequence[int] | None = None) -> int:
        """Exact length of the output for an original image of ``image_size`` (default
        :attr:`image_size`, the largest pinpoint: the most tokens a pinpoint-shaped image gets); runs nothing."""
        return self.layout(image_size).num_tokens

    def grid_for(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Not defined: the output is base tokens + unpadded rows with newlines, not one grid.

        Raises:
            MixresError: always; use :meth:`num_tokens` or :meth:`layout`.
        """
        raise MixresError("AnyResEncoder output is not one grid (base tokens + tile rows); use num_tokens() or layout()")

    def parts(self) -> dict[str, nn.Module | nn.Parameter]:
        """The inner encoder's parts (a bare pathway is ``token_pathway``), and ``newline``."""
        inner = self.encoder.parts() if isinstance(self.encoder, Encoder) else {"token_pathway": self.encoder}
        return {**inner, **({"newline": self.image_newline} if self.image_newline is not None else {})}

    def crops(self, image: torch.Tensor) -> tuple[torch.Tensor, AnyResLayout]:
        """The base image and the tiles of one ``image (Tensor[3, H, W])``: ``Tensor[1 + nh*nw, 3, t, t]``."""
        layout = self.layout(tuple(image.shape[-2:]))
        t = self.tile_size
        base = image[None]
        if tuple(image.shape[-2:]) != (t, t):  # squashed to t x t, aspect not kept, as released
            base = F.interpolate(base.float(), size=(t, t), mode="bicubic", antialias=True).to(image.dtype)
        return torch.cat([base, tile(image[None], layout.best_resolution, t)]), layout

    def _merge(self, tokens: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int], layout: AnyResLayout) -> torch.Tensor:
        """One image's crop tokens ``Tensor[1 + nh*nw, g_h*g_w, C]`` -> ``Tensor[N, C]``."""
        fmap = untile(tokens_to_map(tokens[1:], grid), layout.tile_grid)
        if self.unpad:
            fmap = unpad_tokens(fmap, image_size, self.convention)
        rows = add_newline(fmap, self.image_newline) if self.image_newline is not None else map_to_tokens(fmap)[0]
        return torch.cat([tokens[0], rows[0]])

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """Encode; see the class docstring for shapes. All crops of all images run in one batch."""
        images = _as_list(images)
        crops, layouts = zip(*(self.crops(image) for image in images))
        tokens, grid = self.encoder(torch.cat(crops))
        if tuple(grid) != tuple(self.tile_grid):
            raise ShapeError(f"the inner encoder returned grid {tuple(grid)} on a tile, but grid_for said {self.tile_grid}")
        chunks = tokens.split([len(c) for c in crops])
        return [self._merge(c, grid, tuple(im.shape[-2:]), lay) for c, im, lay in zip(chunks, images, layouts)]

    def extra_repr(self) -> str:
        return (
            f"pinpoints={self.pinpoints}, tile_size={self.tile_size}, newline={self.newline}, "
            f"unpad={self.unpad}, convention={self.convention!r}, out_dim={self.out_dim}"
        )


register_encoder("anyres")(AnyResEncoder)
# LLaVA-NeXT (v1.6): CLIP ViT-L/14-336, penultimate layer, CLS dropped after it ("patch"),
# tiles of 336 on five pinpoints (up to 672x672, 1008x336, 336x1008), as transformers' llava_next
# reads and rounds them; the original release's: pinpoints=LLAVA_NEXT_PINPOINTS, convention="llava_next"
_LLAVA_NEXT = {
    "name": "anyres",
    "encoder": {"kind": "pathway", "name": "hf_clip", "config": dict(CLIP_VIT_L_14_336), "select_layer": -2},
    "tile_size": 336,
}
register_encoder_preset("llava-next-anyres-672", {**_LLAVA_NEXT, "pinpoints": [list(p) for p in HF_PINPOINTS], "convention": "hf"})
