"""Pathways: backbone wrappers behind two contracts (:mod:`mixres.pathways.base`).

Importing this package imports every wrapper module so their ``register_pathway`` calls run;
the wrappers import their library (transformers, open_clip, timm) only when one is built.
"""

import importlib
import pkgutil

from ._weights import gathered, load_into
from .base import MapPathway, TokenPathway, check_images

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["MapPathway", "TokenPathway", "check_images", "gathered", "load_into"]
