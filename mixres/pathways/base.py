"""The two pathway contracts every backbone wrapper implements.

A **token pathway** wraps a ViT (HF CLIP / SigLIP, open_clip, timm) so an encoder can run it in
slices and inject features between blocks; a **map pathway** wraps a hierarchical backbone
(timm ConvNeXt / ResNet / EfficientNet, open_clip ConvNeXt) and returns one map per stage.
Pathways know nothing of fusions.

Token stream layout: ``embed`` returns ``x (Tensor[B, P + h*w, C])`` where the first
``P = num_prefix_tokens`` rows are the prefix (CLS / register) tokens the pathway keeps in the
stream (``P = 0`` when they are dropped before block 1, as the LLaVA-HR release does), and the
grid ``(h, w)``. Fusions only ever see ``x[:, P:]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._utils import check_like_parameters, to_2tuple
from ..errors import ShapeError
from ..registry import Configurable

__all__ = ["TokenPathway", "MapPathway", "check_images"]


def check_images(
    images: torch.Tensor, multiple_of: int = 1, name: str = "images", module: nn.Module | None = None
) -> tuple[int, int]:
    """Validate ``images (Tensor[B, 3, H, W])``; ``H`` and ``W`` multiples of ``multiple_of``.

    Pathways cast float images to their weights' dtype themselves, so any float dtype is
    accepted; the device has to be the module's (when ``module`` is given).

    Raises:
        TypeError: not a tensor.
        ShapeError: not float, wrong rank or channel count, empty batch, a side of 0 or one
            that is not a multiple of ``multiple_of``.
        DeviceError: ``images`` are not on ``module``'s device.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} has to be a Tensor[B, 3, H, W], but got {type(images).__name__}")
    if images.ndim != 4:
        raise ShapeError(f"{name} has to be a Tensor[B, 3, H, W] (rank 4), but got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ShapeError(f"{name} has to have 3 channels (RGB), but got {images.shape[1]} (shape {tuple(images.shape)})")
    if images.shape[0] == 0:
        raise ShapeError(f"{name} has an empty batch (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise ShapeError(f"{name} have to be normalised floats, but got dtype {images.dtype}")
    h, w = int(images.shape[2]), int(images.shape[3])
    if h < multiple_of or w < multiple_of:
        raise ShapeError(f"{name} size {(h, w)} is smaller than one patch / stride of {multiple_of} px")
    if h % multiple_of or w % multiple_of:
        raise ShapeError(
            f"{name} size {(h, w)} is not a multiple of the patch size {multiple_of}; "
            f"resize to e.g. {(max(1, h // multiple_of) * multiple_of, max(1, w // multiple_of) * multiple_of)}"
        )
    if module is not None:
        check_like_parameters(module, check_dtype=False, **{name: images})
    return h, w


class TokenPathway(Configurable, nn.Module):
    """A ViT behind one interface.

    Attributes:
        dim: token width ``C``.
        patch_size: pixels per patch side.
        num_blocks: transformer blocks.
        num_prefix_tokens: prefix rows kept in the stream (0 if dropped before block 1).
        image_size: the native ``(H, W)`` the position embedding was trained for.
        select_layer: which block's output :meth:`forward` returns (-1 last, -2 penultimate...).
    """

    dim: int
    patch_size: int
    num_blocks: int
    num_prefix_tokens: int
    image_size: tuple[int, int]
    select_layer: int

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, add (resampled) position embeddings and any pre-norm.

        Args:
            images (Tensor[B, 3, H, W]): ``H, W`` multiples of ``patch_size``.

        Returns:
            ``(x (Tensor[B, P + h*w, C]), (h, w))``.
        """
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run blocks ``start .. end-1`` on the stream ``x (Tensor[B, P + h*w, C])``."""
        raise NotImplementedError

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply what the source model applies after the selected block (post-norm, if any)."""
        return x

    def grid_for(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """The patch grid ``(h, w)`` for an input of ``image_size``; no computation."""
        h, w = to_2tuple("image_size", tuple(image_size) if not isinstance(image_size, int) else image_size)
        if h % self.patch_size or w % self.patch_size:
            raise ShapeError(f"image size {(h, w)} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    @property
    def num_selected_blocks(self) -> int:
        """How many blocks run to reach :attr:`select_layer`."""
        return self.num_blocks + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Plain features: tokens of the selected layer without prefix rows, and the grid.

        Returns:
            ``(tokens (Tensor[B, h*w, C]), (h, w))``.
        """
        x, grid = self.embed(images)
        x = self.finalize(self.run_blocks(x, 0, self.num_selected_blocks))
        return x[:, self.num_prefix_tokens :], grid

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory)."""
        self.grad_checkpointing = enable


class MapPathway(Configurable, nn.Module):
    """A hierarchical backbone that returns one map per stage.

    Attributes:
        dims: channels of each stage's map.
        strides: the input-to-map reduction of each stage.
    """

    dims: tuple[int, ...]
    strides: tuple[int, ...]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the backbone.

        Args:
            images (Tensor[B, 3, H, W]): normalised images.

        Returns:
            One ``map (Tensor[B, dims[i], H / strides[i], W / strides[i]])`` per stage (sizes
            rounded as the backbone's convolutions round them).
        """
        raise NotImplementedError

    @property
    def num_stages(self) -> int:
        """Number of stages (maps) returned by :meth:`forward`."""
        return len(self.dims)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in the backward pass (saves memory)."""
        self.grad_checkpointing = enable
