"""Private helpers shared by several modules (lazy imports, small checks)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .errors import MixresError

# extra that provides each optional top-level package
_EXTRAS = {
    "transformers": "hf",
    "safetensors": "hf",
    "peft": "hf",
    "accelerate": "hf",
    "timm": "timm",
    "open_clip": "open_clip",
    "PIL": "hf",
}


def lazy_import(module: str) -> ModuleType:
    """Import an optional dependency, or raise an ImportError that names the extra to install.

    Args:
        module: dotted module name, e.g. ``"transformers"`` or ``"timm.layers"``.

    Returns:
        The imported module.

    Raises:
        ImportError: the package is not installed; the message gives the ``pip install`` line.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top, "dev")
        raise ImportError(
            f"mixres needs the optional package {top!r} for this feature; "
            f"install it with: pip install 'mixres[{extra}]'"
        ) from err


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise a MixresError if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise MixresError(f"{name} has to be one of {list(choices)}, but got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise TypeError/MixresError unless ``value`` is an int > 0 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} has to be an int, but got {type(value).__name__} {value!r}")
    if value <= 0:
        raise MixresError(f"{name} has to be > 0, but got {value}")


def to_2tuple(name: str, value: Any) -> tuple[int, int]:
    """Accept ``n`` or ``(h, w)`` of positive ints and return ``(h, w)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} has to be an int or a pair (h, w), but got {value!r}")
    for v in value:
        check_positive_int(name, v)
    return int(value[0]), int(value[1])
