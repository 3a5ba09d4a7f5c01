"""Private helpers shared by several modules (lazy imports, small checks)."""

from __future__ import annotations

import importlib
import math
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


def check_finite_positive(name: str, value: Any) -> float:
    """Raise TypeError/MixresError unless ``value`` is a finite real number > 0; return it as float.

    Example:
        >>> check_finite_positive("mlp_ratio", 4)
        4.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} has to be a number, but got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise MixresError(f"{name} has to be a number that is finite and > 0, but got {value!r}")
    return float(value)


def _param_dtype_device(module: Any) -> tuple[Any, Any]:
    """The one floating dtype and the one device of ``module``'s parameters (None where mixed/absent)."""
    dtypes, devices = set(), set()
    for p in module.parameters():
        if p.is_floating_point():
            dtypes.add(p.dtype)
        if p.device.type != "meta":  # accelerate's offloaded weights live on meta until their hook runs
            devices.add(p.device)
    return (dtypes.pop() if len(dtypes) == 1 else None), (devices.pop() if len(devices) == 1 else None)


def check_like_parameters(module: Any, check_dtype: bool = True, **tensors: Any) -> None:
    """Refuse inputs whose dtype or device differ from ``module``'s parameters, before any math.

    Torch would fail deep inside a matmul or conv with its own wording ("mat1 and mat2 must have
    the same dtype"); this names the input, the module and the fix. The dtype check is skipped
    under ``torch.autocast`` (autocast casts both sides itself) and when the module's parameters
    have several dtypes; the device check when they sit on several devices (or on ``meta``).

    Args:
        module: an ``nn.Module``.
        check_dtype: also compare dtypes (False for inputs the module casts itself, e.g. images).
        **tensors: the inputs to check, by name (non-tensors are skipped).

    Raises:
        ShapeError: an input's dtype differs from the parameters' dtype.
        DeviceError: an input is on another device than the parameters.
    """
    import torch

    from .errors import DeviceError, ShapeError

    dtype, device = _param_dtype_device(module)
    who = type(module).__name__
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if device is not None and t.device != device:
            raise DeviceError(
                f"{name} is on {t.device} but this {who}'s parameters are on {device}; "
                f"move one of them, e.g. {name}.to({str(device)!r}) or module.to({str(t.device)!r})"
            )
        if check_dtype and dtype is not None and t.dtype != dtype and not torch.is_autocast_enabled(t.device.type):
            raise ShapeError(
                f"{name} is {t.dtype} but this {who}'s parameters are {dtype}; cast the input "
                f"({name}.to({dtype})) or the module (module.to({dtype})), or run under torch.autocast"
            )
