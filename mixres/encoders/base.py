"""The encoder contract: images in, tokens for the LLM out.

An encoder composes pathways, fusions and a resolution policy. It is the only place that knows
both backbones and fusions. The HF vision tower (:mod:`mixres.integrations.hf`) and the
training recipe (:mod:`mixres.integrations.llava`) use only what this class declares, so every
registered encoder (dual-pathway, S2, AnyRes, a plugin's) is a tower and a recipe model:

- :attr:`out_dim`, :attr:`image_size`, :meth:`grid_for` / :meth:`num_tokens` (run nothing; they
  follow the final fusion, so the LLM's ``<image>`` expansion is always right);
- :meth:`parts`: the named sub-modules that run in ``forward``, one vocabulary for freezing
  (:meth:`set_freeze`), the recipe's ``trainable`` lists and the docs;
- :meth:`set_grad_checkpointing`: recompute activations in the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._utils import to_2tuple
from ..errors import ConfigError
from ..registry import Configurable

__all__ = ["Encoder", "KNOWN_PARTS"]

#: the part names of mixres' own encoders (plugins may add their own)
KNOWN_PARTS: tuple[str, ...] = ("token_pathway", "map_pathway", "adapters", "final_fusion", "newline")


class Encoder(Configurable, nn.Module):
    """Base class of every encoder.

    Attributes:
        out_dim: width of the tokens returned by :meth:`forward`.
        image_size: the input ``(H, W)`` the encoder is meant for.
        frozen: the parts that :meth:`set_freeze` froze.
    """

    out_dim: int
    image_size: tuple[int, int]
    frozen: tuple[str, ...] = ()

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

    def parts(self) -> dict[str, nn.Module | nn.Parameter]:
        """The named parts that run in :meth:`forward` (absent or unused ones are left out).

        Every parameter of the encoder that ``forward`` uses belongs to exactly one part; a part
        is a module or a single parameter (AnyRes' ``newline``).
        """
        raise NotImplementedError

    def set_freeze(self, parts: Sequence[str]) -> None:
        """Freeze (no gradient) the named parts and unfreeze the others.

        A known part name that this encoder lacks (``final_fusion`` when there is none) is
        ignored, so one freeze list serves several encoders.

        Raises:
            ConfigError: a name that is neither one of :meth:`parts` nor of :data:`KNOWN_PARTS`.
        """
        if isinstance(parts, str):
            raise ConfigError(f"freeze takes a list of part names, but got the string {parts!r}")
        own = self.parts()
        unknown = sorted(set(parts) - set(own) - set(KNOWN_PARTS))
        if unknown:
            raise ConfigError(f"freeze takes parts {list(own)} of this {type(self).__name__}, but got {unknown}")
        self.frozen = tuple(p for p in own if p in parts)
        for name, module in own.items():
            module.requires_grad_(name not in self.frozen)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of every part that supports it in the backward pass."""
        self.grad_checkpointing = bool(enable)
        for module in self.parts().values():
            if hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(enable)
