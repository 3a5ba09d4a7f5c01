"""Encoders: pathways + fusions + a resolution policy. Importing this package imports every
module in it so their ``register_encoder`` calls run (no heavy library is imported)."""

import importlib
import pkgutil

from .base import Encoder

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Encoder"]
