"""Qwen2.5-VL's own ViT as a *packed* token pathway: ``hf_qwen2_5_vl``.

Source: ``Qwen2_5_VisionTransformerPretrainedModel`` (transformers
``models/qwen2_5_vl/modeling_qwen2_5_vl.py``; Qwen2.5-VL, arXiv 2502.13923 Sec. 2.1). Its forward,
which this wrapper re-states as calls an encoder can interleave with fusions:

1. the processor has already cut every image (``H x W``, multiples of 28) into 14-px patches,
   each repeated ``temporal_patch_size = 2`` times (a still image is a 2-frame clip), flattened
   to ``3 * 2 * 14 * 14`` values, in *merge-block order* (each 2x2 block of patches, the unit the
   merger folds into one LLM token, is contiguous), all images concatenated:
   ``patches (Tensor[S, 1176])`` with ``grid_thw (Tensor[n, 3])`` = ``(1, H/14, W/14)`` per image;
2. ``patch_embed`` (a Conv3d), then the **window permutation**: merge units are re-ordered so that
   each 112-px window (8x8 patches) is contiguous (``get_vision_window_index``);
3. 2D rotary position embeddings (rows, columns) computed per image and permuted the same way;
4. blocks over *packed variable-length sequences*: a block in ``fullatt_block_indexes`` attends
   within each image (``cu_seqlens``), every other block within each window (``cu_window_seqlens``);
5. the 2x2 ``merger`` (RMS norm, MLP to the LLM width) on each merge unit, and the reverse
   permutation back to the processor's order (:meth:`HFQwen2_5_VLPathway.merge`).

So one stream ``x (Tensor[S, C])`` holds every image of a batch, in window order. A fusion needs
each image's tokens as its ``(h, w)`` grid: :class:`PackedLayout` holds, per image, the stream
position of every raster token ``(row, col)`` (the inverse of the merge-block and window
orders composed), and :meth:`~HFQwen2_5_VLPathway.to_grids` / :meth:`~HFQwen2_5_VLPathway.from_grids`
gather each image's tokens into raster order and scatter them back (pure index ops, so a fusion
that is the identity leaves the stream bit-for-bit unchanged).

Contract (differs from :class:`~mixres.pathways.base.TokenPathway`, whose ``(B, N, C)`` stream
cannot hold images of different sizes): ``embed(patches, grid_thw) -> (x, layout)``,
``run_blocks(x, start, end, layout)``, ``merge(x, layout)``; ``to_grids`` / ``from_grids``.
Videos (``t > 1``) run through embed / blocks / merge as in the source; ``to_grids`` takes
still images only. The wrapper holds the unchanged model as ``.model`` (``state_dict`` keys are
transformers' own, prefixed ``model.``; the merger included). Weights: as ``hf_siglip``
(``weights`` a local ``save_pretrained`` directory of the vision model, or a weight file of it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._utils import lazy_import
from ..errors import ConfigError, ShapeError
from ..registry import Configurable, register_pathway
from .hf import _build_model

__all__ = ["PackedLayout", "HFQwen2_5_VLPathway", "patchify", "raster_index"]


def patchify(images: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2) -> torch.Tensor:
    """Qwen2-VL's processor packing of still images: merge-block order, each patch repeated in time.

    Args:
        images (Tensor[B, 3, H, W]): normalised images; ``H, W`` multiples of ``patch_size * merge_size``.

    Returns:
        patches (Tensor[B * (H/p) * (W/p), 3 * temporal_patch_size * p * p]).

    Example:
        >>> patchify(torch.randn(2, 3, 28, 56)).shape  # 2 x (2 x 4) patches of 3 x 2 x 14 x 14
        torch.Size([16, 1176])
    """
    unit = patch_size * merge_size
    if images.ndim != 4 or images.shape[-2] % unit or images.shape[-1] % unit:
        raise ShapeError(f"images have to be Tensor[B, 3, H, W] with H, W multiples of {unit}, but got {tuple(images.shape)}")
    return repeat(images, "b c (gh m1 p1) (gw m2 p2) -> (b gh gw m1 m2) (c t p1 p2)",
                  m1=merge_size, m2=merge_size, p1=patch_size, p2=patch_size, t=temporal_patch_size)


def _permute(x: torch.Tensor, window_index: torch.Tensor, unit: int) -> torch.Tensor:
    """Merge units of ``x (Tensor[S, D])`` in ``window_index`` order (the source's ``permute_input_for_window_attn``)."""
    return rearrange(rearrange(x, "(u m) d -> u m d", m=unit)[window_index], "u m d -> (u m) d")


def raster_index(grids: list[tuple[int, int]], window_index: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Stream position of every image's tokens in raster order (images one after another).

    The processor's flat index of patch ``(r, c)`` of an image with offset ``o`` is
    ``o + ((r // m) * (w // m) + c // m) * m**2 + (r % m) * m + c % m``; the window permutation
    moves merge unit ``u`` to position ``argsort(window_index)[u]``.

    Example:
        >>> raster_index([(2, 4)], torch.tensor([0, 1]), 2).tolist()  # one window: processor order
        [0, 1, 4, 5, 2, 3, 6, 7]
    """
    unit, out, offset = merge_size * merge_size, [], 0
    where = torch.argsort(window_index)
    for h, w in grids:
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        flat = offset + ((r // merge_size) * (w // merge_size) + c // merge_size) * unit + (r % merge_size) * merge_size + c % merge_size
        out.append((where.to(flat.device)[flat // unit] * unit + flat % unit).flatten())
        offset += h * w
    return torch.cat(out)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each image's tokens lie in a packed, window-ordered stream, and what the blocks need.

    Attributes:
        grid_thw: ``(n, 3)`` frames, rows, columns of patches per image (the processor's).
        grids: ``(h, w)`` per still image.
        window_index: merge-unit permutation into window order (Tensor[S / m**2]).
        cu_seqlens / cu_window_seqlens: packed boundaries per image / per window (int32).
        max_seqlen / max_window_seqlen: their longest segment (flash attention only; else None).
        position_embeddings: rotary ``(cos, sin)``, each Tensor[S, head_dim], in stream order.
        raster: stream positions of the images' raster tokens (Tensor[S], image after image).
        stream: its inverse, ``argsort(raster)``.
        taps: the stream after each block in the pathway's ``tap_blocks`` (Qwen3-VL's DeepStack),
            filled by ``run_blocks``.
    """

    grid_thw: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    window_index: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_window_seqlens: torch.Tensor
    max_seqlen: int | None
    max_window_seqlen: int | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    raster: torch.Tensor | None
    stream: torch.Tensor | None
    taps: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def token_coords(self) -> torch.Tensor:
        """``(image, row, col)`` of every stream position: Tensor[S, 3] (still images only)."""
        if self.raster is None:
            raise ShapeError("token_coords needs still images (grid t == 1)")
        parts = []
        for i, (h, w) in enumerate(self.grids):
            r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            parts.append(torch.stack([torch.full((h * w,), i), r.flatten(), c.flatten()], dim=1))
        coords = torch.cat(parts)  # row k: the coordinates of raster token k
        return coords[self.stream.cpu()]


class HFQwen2_5_VLPathway(Configurable, nn.Module):
    """transformers ``Qwen2_5_VisionTransformerPretrainedModel`` as a packed token pathway (``hf_qwen2_5_vl``).

    Args:
        config: keyword arguments of ``Qwen2_5_VLVisionConfig`` (``depth``, ``hidden_size``, ...);
            with ``weights`` they override the loaded config. ``None``: transformers' defaults.
        weights: a local ``save_pretrained`` directory of the vision model, or a weight file of it.
        device: where to put the parameters.
        dtype: parameter dtype.

    Attributes:
        dim: the ViT's width.
        patch_size: pixels per patch side (14).
        num_blocks: the ViT's depth.
        merge_size: the merger's side (2: 2x2 patches per output token).
        temporal_patch_size: frames per patch (2; an image is repeated).
        out_dim: the merger's width (the LLM's).

    Example:
        >>> vit = HFQwen2_5_VLPathway(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
        ...                                out_hidden_size=48, fullatt_block_indexes=[1]))
        >>> images = [torch.randn(1, 3, 56, 84), torch.randn(1, 3, 28, 28)]
        >>> patches = torch.cat([patchify(i) for i in images])
        >>> x, layout = vit.embed(patches, torch.tensor([[1, 4, 6], [1, 2, 2]]))
        >>> x = vit.run_blocks(x, 0, 2, layout)
        >>> x.shape, layout.grids, vit.merge(x, layout).shape  # 24 + 4 patches -> 7 LLM tokens
        (torch.Size([28, 32]), ((4, 6), (2, 2)), torch.Size([7, 48]))
    """

    _model_class = "Qwen2_5_VisionTransformerPretrainedModel"
    _config_class = "Qwen2_5_VLVisionConfig"

    def __init__(self, config: dict[str, Any] | None = None, weights: str | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = _build_model(self._model_class, self._config_class, dict(config or {}), weights)
        cfg = self.model.config
        self.dim, self.patch_size, self.num_blocks = int(cfg.hidden_size), int(cfg.patch_size), int(cfg.depth)
        self.merge_size, self.temporal_patch_size = int(cfg.spatial_merge_size), int(cfg.temporal_patch_size)
        self.out_dim, self.num_prefix_tokens = int(cfg.out_hidden_size), 0
        self.full_attention_blocks = tuple(int(i) for i in getattr(cfg, "fullatt_block_indexes", range(cfg.depth)))
        self.tap_blocks: tuple[int, ...] = ()
        self.grad_checkpointing = False
        self.model.to(device=device, dtype=dtype)
        self.train()

    @property
    def unit(self) -> int:
        """Pixels per side of one merge unit (one LLM token): ``patch_size * merge_size`` (28)."""
        return self.patch_size * self.merge_size

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of an ``(H, W)`` image (multiples of :attr:`unit`); no computation."""
        h, w = int(image_size[0]), int(image_size[1])
        if h % self.unit or w % self.unit or h <= 0 or w <= 0:
            raise ShapeError(f"image size {(h, w)} is not a positive multiple of {self.unit} px (patch x merge size)")
        return h // self.patch_size, w // self.patch_size

    def layout(self, grid_thw: torch.Tensor) -> PackedLayout:
        """Window order, packed boundaries and raster indices for images of ``grid_thw (Tensor[n, 3])``."""
        vision = lazy_import("transformers.vision_utils")
        generic = lazy_import("transformers.utils.generic")
        m, cfg = self.model, self.model.config
        cu_seqlens, max_seqlen = vision.get_vision_attention_seqlens(grid_thw, cfg)
        window_index, cu_window = self._windows(grid_thw, cu_seqlens)
        max_window = generic.get_max_seqlen(cu_window, cfg, kwarg_name="max_window_seqlen")
        device = m.patch_embed.proj.weight.device  # the rotary tables and raster indices go where the blocks run
        still = bool((grid_thw[:, 0] == 1).all())
        grids = tuple((int(h), int(w)) for _, h, w in grid_thw.tolist())
        raster = raster_index(list(grids), window_index, self.merge_size).to(device) if still else None
        positions = vision.get_vision_position_ids(grid_thw, m.spatial_merge_size).to(device)
        freqs = m.rotary_pos_emb(torch.empty(0, device=device), positions)
        freqs = tuple(_permute(f, window_index, self.merge_size**2) for f in freqs)
        return PackedLayout(grid_thw, grids, window_index, cu_seqlens, cu_window, max_seqlen, max_window, freqs,
                            raster, torch.argsort(raster) if still else None)

    def _windows(self, grid_thw: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vision, m = lazy_import("transformers.vision_utils"), self.model
        return vision.get_vision_window_index(grid_thw, spatial_merge_size=m.spatial_merge_size, window_size=m.window_size,
                                              patch_size=m.patch_size)

    def _add_positions(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return x  # Qwen2.5-VL has rotary positions only

    def embed(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, PackedLayout]:
        """Patch embedding and the window permutation.

        Args:
            patches (Tensor[S, 3 * t * p * p]): the processor's ``pixel_values`` (:func:`patchify`).
            grid_thw (Tensor[n, 3]): the processor's ``image_grid_thw``.

        Returns:
            ``(x (Tensor[S, dim]) in window order, layout)``.

        Raises:
            ShapeError: ``patches`` / ``grid_thw`` of the wrong shape or not matching each other.
        """
        self._check(patches, grid_thw)
        layout = self.layout(grid_thw)
        x = self._add_positions(self.model.patch_embed(patches), grid_thw)
        return _permute(x, layout.window_index, self.merge_size**2), layout

    def _check(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> None:
        width = 3 * self.temporal_patch_size * self.patch_size**2
        if not isinstance(patches, torch.Tensor) or patches.ndim != 2 or patches.shape[1] != width:
            got = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ShapeError(f"patches have to be Tensor[S, {width}] (the processor's pixel_values), but got {got}")
        if not isinstance(grid_thw, torch.Tensor) or grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ShapeError(f"grid_thw has to be Tensor[n, 3] (the processor's image_grid_thw), but got {grid_thw!r}")
        if int(grid_thw.prod(-1).sum()) != patches.shape[0] or bool((grid_thw[:, 1:] % self.merge_size).any()):
            raise ShapeError(f"grid_thw {grid_thw.tolist()} holds {int(grid_thw.prod(-1).sum())} patches (rows and columns "
                             f"multiples of {self.merge_size}), but patches has {patches.shape[0]} rows")

    def _run_block(self, index: int, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        full = index in self.full_attention_blocks
        return self.model.blocks[index](
            x, cu_seqlens=layout.cu_seqlens if full else layout.cu_window_seqlens,
            max_seqlen=layout.max_seqlen if full else layout.max_window_seqlen,
            position_embeddings=layout.position_embeddings)

    def run_blocks(self, x: torch.Tensor, start: int, end: int, layout: PackedLayout) -> torch.Tensor:
        """Run blocks ``start .. end-1`` (full attention per image or windowed, as the source).

        Raises:
            ShapeError: ``x`` is not ``Tensor[S, dim]``.
            ConfigError: not ``0 <= start <= end <= num_blocks``.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[-1] != self.dim:
            raise ShapeError(f"run_blocks takes the packed stream Tensor[S, {self.dim}], but got {getattr(x, 'shape', x)!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= self.num_blocks):
            raise ConfigError(f"run_blocks needs 0 <= start <= end <= {self.num_blocks}, but got start={start!r}, end={end!r}")
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(start, end):
            x = checkpoint(self._run_block, i, x, layout, use_reentrant=False) if recompute else self._run_block(i, x, layout)
            if i in self.tap_blocks:
                layout.taps[i] = x
        return x

    def merge(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """The 2x2 merger, back in the processor's order: Tensor[S / m**2, out_dim] (the source's ``pooler_output``)."""
        return self.model.merger(x)[torch.argsort(layout.window_index)]

    def to_grids(self, x: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
        """Each still image's tokens in raster order: ``[Tensor[1, h*w, C]]`` (grids in ``layout.grids``)."""
        if layout.raster is None:
            raise ShapeError(f"to_grids takes still images (t == 1), but grid_thw is {layout.grid_thw.tolist()}")
        sizes = [h * w for h, w in layout.grids]
        return [t.unsqueeze(0) for t in torch.split(x[layout.raster], sizes)]

    def from_grids(self, tokens: list[torch.Tensor], layout: PackedLayout) -> torch.Tensor:
        """The inverse of :meth:`to_grids`: the stream ``Tensor[S, C]`` in window order."""
        return torch.cat([t.squeeze(0) for t in tokens])[layout.stream]

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, PackedLayout]:
        """Every block: ``(x (Tensor[S, dim]) in window order, layout)``; :meth:`merge` gives the LLM tokens."""
        x, layout = self.embed(patches, grid_thw)
        return self.run_blocks(x, 0, self.num_blocks, layout), layout

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory)."""
        self.grad_checkpointing = enable

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, patch_size={self.patch_size}, num_blocks={self.num_blocks}, merge_size={self.merge_size}, "
                f"full_attention_blocks={list(self.full_attention_blocks)}, out_dim={self.out_dim}")


register_pathway("hf_qwen2_5_vl")(HFQwen2_5_VLPathway)
