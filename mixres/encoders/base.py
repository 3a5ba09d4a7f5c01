"""The encoder contract: images in, tokens for the LLM out.

An encoder composes pathways, fusions and a resolution policy. It is the only place that knows
both backbones and fusions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._utils import to_2tuple
from ..registry import Configurable

__all__ = ["Encoder"]


class Encoder(Configurable, nn.Module):
    """Base class of every encoder.

    Attributes:
        out_dim: width of the tokens returned by :meth:`forward`.
        image_size: the input ``(H, W)`` the encoder is meant for.
    """

    out_dim: int
    image_size: tuple[int, int]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encode normalised images.

        Args:
            images (Tensor[B, 3, H, W]): normalised pixels at the encoder's input resolution.

        Returns:
            ``(tokens (Tensor[B, N, out_dim]), (h, w))`` with ``N = h * w``.
        """
        raise NotImplementedError

    def grid_for(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """The token grid ``(h, w)`` for an input of ``image_size``; runs nothing."""
        raise NotImplementedError

    def num_tokens(self, image_size: int | Sequence[int] | None = None) -> int:
        """Tokens handed to the LLM for an input of ``image_size`` (default: the encoder's own
        ``image_size``); runs nothing."""
        if image_size is None:
            image_size = self.image_size
        h, w = self.grid_for(to_2tuple("image_size", tuple(image_size) if not isinstance(image_size, int) else image_size))
        return h * w
