"""The shared machinery of the ViT wrappers (``hf_*``, ``timm_vit``, ``open_clip_vit``).

Block slices with optional gradient checkpointing, ``select_layer``, prefix handling and the
post-norm rule. Private: each wrapper subclasses :class:`_StackedViT` and adds ``embed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._utils import to_2tuple
from ..errors import ConfigError, ShapeError
from .base import TokenPathway

__all__ = ["_StackedViT"]


class _StackedViT(TokenPathway):
    """What every ViT wrapper shares: block slices, checkpointing, select_layer, prefix, post-norm.

    Subclasses build the backbone, then call :meth:`_init_stack`, and provide ``_blocks``,
    ``_run_block`` and ``_post_norm``; ``embed`` stays theirs.
    """

    def _init_stack(
        self,
        *,
        dim: int,
        patch_size: int | Sequence[int],
        num_blocks: int,
        source_prefix: int,
        image_size: int | Sequence[int],
        select_layer: int,
        drop_prefix: bool,
        post_norm: bool | None,
        source_post_norm: bool,
    ) -> None:
        ph, pw = to_2tuple("patch_size", tuple(patch_size) if not isinstance(patch_size, int) else patch_size)
        if ph != pw:
            raise ConfigError(f"mixres token pathways need square patches, but the model has patch size {(ph, pw)}")
        if isinstance(select_layer, bool) or not isinstance(select_layer, int):
            raise TypeError(f"select_layer has to be an int, but got {type(select_layer).__name__} {select_layer!r}")
        if not -num_blocks - 1 <= select_layer <= num_blocks:
            raise ConfigError(
                f"select_layer has to be in [{-num_blocks - 1}, {num_blocks}] for a model with {num_blocks} blocks "
                f"(-1 = last block, 0 = the embeddings), but got {select_layer}"
            )
        for name, value, allowed in (("drop_prefix", drop_prefix, (bool,)), ("post_norm", post_norm, (bool, type(None)))):
            if not isinstance(value, allowed):
                raise TypeError(f"{name} has to be {' or '.join(t.__name__ for t in allowed)}, but got {value!r}")
        self.dim, self.patch_size, self.num_blocks = int(dim), ph, int(num_blocks)
        self.image_size = to_2tuple("image_size", tuple(image_size) if not isinstance(image_size, int) else image_size)
        self.select_layer, self.drop_prefix = select_layer, drop_prefix
        self.source_prefix_tokens = source_prefix
        self.num_prefix_tokens = 0 if drop_prefix else source_prefix
        if post_norm and self._post_norm is None:
            raise ConfigError(f"post_norm=True, but this {type(self).__name__} has no post-norm layer")
        if post_norm is None:  # as the source does for the features of its last layer
            post_norm = source_post_norm and self._post_norm is not None and self.num_selected_blocks == num_blocks
        self.post_norm = post_norm
        self.grad_checkpointing = False

    # -- the three hooks a subclass provides ----------------------------------------------
    @property
    def _blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def _post_norm(self) -> nn.Module | None:
        return None

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x)

    # -- the contract ---------------------------------------------------------------------
    def run_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run blocks ``start .. end-1`` on the stream.

        Args:
            x (Tensor[B, P + h*w, C]): the stream from :meth:`embed` or an earlier slice.
            start: first block (0-based).
            end: one past the last block; ``start == end`` returns ``x``.

        Returns:
            Tensor[B, P + h*w, C].

        Raises:
            ShapeError: ``x`` is not ``Tensor[B, N, dim]``.
            ConfigError: not ``0 <= start <= end <= num_blocks``.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"run_blocks takes the stream Tensor[B, N, {self.dim}], but got {got}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= self.num_blocks):
            raise ConfigError(f"run_blocks needs 0 <= start <= end <= {self.num_blocks}, but got start={start!r}, end={end!r}")
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self._blocks[start:end]:
            x = checkpoint(self._run_block, block, x, use_reentrant=False) if recompute else self._run_block(block, x)
        return x

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the source's post-norm when :attr:`post_norm` is True, else return ``x``."""
        return self._post_norm(x) if self.post_norm else x

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, patch_size={self.patch_size}, num_blocks={self.num_blocks}, "
            f"image_size={self.image_size}, select_layer={self.select_layer}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, post_norm={self.post_norm}"
        )
