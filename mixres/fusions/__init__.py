"""Fusions: ``forward(tokens, grid, map) -> tokens``, one file per fusion.

Importing this package imports every module in it, so each file's ``register_fusion`` calls
run (fusion files import only torch and einops).
"""

import importlib
import pkgutil

from .base import Fusion
from .mr_adapter import MRAdapter, MRFinalFusion

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Fusion", "MRAdapter", "MRFinalFusion"]
