"""The image processor of a mrified Qwen2.5-VL: Qwen's own ViT view plus a high-res view per image.

:class:`MixresQwen2VLImageProcessor` is Qwen2-VL's image processor (``Qwen2VLImageProcessor``,
torchvision backend) unchanged for the ViT view: ``smart_resize`` to sides that are multiples of
28 within the ``min_pixels`` / ``max_pixels`` budget (``size = {"shortest_edge": min_pixels,
"longest_edge": max_pixels}``), normalised, cut into 14-px patches (``pixel_values``,
``image_grid_thw``), so the processor's ``<|image_pad|>`` expansion (``grid.prod() / 4`` per
image) is Qwen's own. Beside it, each image is resized (same resampling and normalisation) to
its **high-res view**: ``k`` times the ViT view's sides (``high_res_scale``), each rounded to a
multiple of the map pathway's stride ``s`` (``high_res_stride``, :func:`high_res_size`). Images
differ in size, so the views are packed as Qwen packs its patches: every view cut into ``s x s``
cells in raster order, all images concatenated:

- ``high_res_pixel_values (Tensor[sum_i h_i * w_i, 3 * s * s])``,
- ``high_res_grid (Tensor[n, 2])``: ``(h_i, w_i) = (H_i / s, W_i / s)`` cells per image,

which concatenate along dim 0 across a batch like ``pixel_values`` (:func:`unpack_high_res`
undoes it). The map pathway reads ``k**2`` times the ViT's pixels; Qwen's LLM sees the ViT
view's token count: ``k**2`` fewer tokens than Qwen reading those pixels itself.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from transformers import Qwen2VLImageProcessor
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessorKwargs

from mixres.errors import ShapeError

__all__ = ["MixresQwen2VLImageProcessor", "high_res_size", "pack_high_res", "unpack_high_res"]


def high_res_size(vit_size: tuple[int, int], scale: float, stride: int) -> tuple[int, int]:
    """The high-res view of an image whose ViT view is ``vit_size``: ``scale`` times, in multiples of ``stride``.

    Example:
        >>> high_res_size((448, 280), 2, 32), high_res_size((448, 280), 32 / 14, 32)
        ((896, 576), (1024, 640))
    """
    return tuple(max(stride, int(side * scale / stride + 0.5) * stride) for side in vit_size)  # type: ignore[return-value]


def pack_high_res(views: list[torch.Tensor], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``[Tensor[3, H_i, W_i]]`` -> ``(Tensor[sum_i h_i w_i, 3 s s], grid (Tensor[n, 2]))``.

    Example:
        >>> values, grid = pack_high_res([torch.zeros(3, 64, 32), torch.zeros(3, 32, 32)], 32)
        >>> values.shape, grid.tolist()
        (torch.Size([3, 3072]), [[2, 1], [1, 1]])
    """
    cells = [rearrange(v, "c (h p) (w q) -> (h w) (c p q)", p=stride, q=stride) for v in views]
    grid = torch.tensor([[v.shape[-2] // stride, v.shape[-1] // stride] for v in views], dtype=torch.long)
    return torch.cat(cells), grid


def unpack_high_res(values: torch.Tensor, grid: torch.Tensor, stride: int) -> list[torch.Tensor]:
    """The inverse of :func:`pack_high_res`, one ``Tensor[1, 3, H_i, W_i]`` per image.

    Raises:
        ShapeError: ``values`` / ``grid`` of the wrong shape, or not holding the same number of cells.
    """
    if not isinstance(values, torch.Tensor) or values.ndim != 2 or values.shape[1] != 3 * stride * stride:
        raise ShapeError(f"high_res_pixel_values have to be Tensor[N, {3 * stride * stride}] (3 x {stride} x {stride} cells), "
                         f"but got {tuple(getattr(values, 'shape', ()))}")
    if not isinstance(grid, torch.Tensor) or grid.ndim != 2 or grid.shape[1] != 2 or int(grid.prod(-1).sum()) != values.shape[0]:
        raise ShapeError(f"high_res_grid has to be Tensor[n, 2] whose cells sum to {values.shape[0]}, but got {grid!r}")
    sizes = grid.prod(-1).tolist()
    return [rearrange(chunk, "(h w) (c p q) -> 1 c (h p) (w q)", h=int(h), w=int(w), p=stride, q=stride)
            for chunk, (h, w) in zip(torch.split(values, sizes), grid.tolist())]


class MixresQwen2VLImageProcessorKwargs(Qwen2VLImageProcessorKwargs, total=False):
    """Qwen2-VL's image processor arguments, plus ``high_res_scale`` (k) and ``high_res_stride`` (s)."""

    high_res_scale: float
    high_res_stride: int


class MixresQwen2VLImageProcessor(Qwen2VLImageProcessor):
    """Qwen2-VL's image processor that also emits each image's high-res view (module docstring).

    Args:
        high_res_scale: ``k``: the high-res view's sides over the ViT view's.
        high_res_stride: ``s``: the map pathway's final stride (the high-res sides' multiple).
        **kwargs: Qwen2-VL's image processor arguments (``size``, ``min_pixels``, ``max_pixels``, ...).

    Example:
        >>> proc = MixresQwen2VLImageProcessor(high_res_scale=2, high_res_stride=32, min_pixels=28 * 28, max_pixels=56 * 56)
        >>> out = proc([torch.zeros(3, 60, 100, dtype=torch.uint8)], return_tensors="pt")
        >>> out["image_grid_thw"].tolist(), out["high_res_grid"].tolist()  # ViT 28 x 56 px; high-res 64 x 128
        ([[1, 2, 4]], [[2, 4]])
    """

    valid_kwargs = MixresQwen2VLImageProcessorKwargs
    model_input_names = ["pixel_values", "image_grid_thw", "high_res_pixel_values", "high_res_grid"]
    high_res_scale = 32 / 14
    high_res_stride = 32

    def _preprocess(self, images: list[torch.Tensor], *, size: SizeDict, resample: Any, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, image_mean: Any, image_std: Any, patch_size: int,
                    return_tensors: Any = None, high_res_scale: float | None = None, high_res_stride: int | None = None,
                    **kwargs: Any) -> BatchFeature:
        out = super()._preprocess(images, size=size, resample=resample, do_rescale=do_rescale, rescale_factor=rescale_factor,
                                  do_normalize=do_normalize, image_mean=image_mean, image_std=image_std, patch_size=patch_size,
                                  return_tensors=None, **kwargs)
        scale, stride = float(high_res_scale or self.high_res_scale), int(high_res_stride or self.high_res_stride)
        views = []
        for image, (_, h, w) in zip(images, out["image_grid_thw"].tolist()):
            height, width = high_res_size((h * patch_size, w * patch_size), scale, stride)
            # the parent's resize is smart_resize; the backend's plain one resizes to a given size
            view = super(Qwen2VLImageProcessor, self).resize(image=image[None], size=SizeDict(height=height, width=width), resample=resample)
            views.append(self.rescale_and_normalize(view, do_rescale, rescale_factor, do_normalize, image_mean, image_std)[0])
        values, grid = pack_high_res(views, stride)
        data = {**out.data, "high_res_pixel_values": values, "high_res_grid": grid}
        return BatchFeature(data=data, tensor_type=return_tensors)
