"""Fusions: ``forward(tokens, grid, map) -> tokens``. One file per fusion; importing this
package registers them all."""

from .base import Fusion
from .mr_adapter import MRAdapter, MRFinalFusion

__all__ = ["Fusion", "MRAdapter", "MRFinalFusion"]
