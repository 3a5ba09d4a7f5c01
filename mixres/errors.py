"""The one error family of mixres.

Every error raised at a public boundary is a :class:`MixresError` (a ``ValueError``), or a
:class:`UnknownNameError` (also a ``KeyError``) for registry look-ups, or a ``TypeError`` for
arguments of the wrong type. Messages say what was received, what was expected and, where it
helps, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "MixresError",
    "ShapeError",
    "DeviceError",
    "ConfigError",
    "UnknownNameError",
    "WeightsError",
    "CheckpointError",
]


class MixresError(ValueError):
    """Base class of the errors mixres raises on bad input."""


class ShapeError(MixresError):
    """A tensor's rank, size or dtype does not fit what the module expects."""


class DeviceError(MixresError):
    """An input sits on another device than the module's parameters (or than the other inputs)."""


class ConfigError(MixresError):
    """A config dict is malformed: missing ``kind``/``name``, unknown keys, bad values."""


class WeightsError(MixresError):
    """Weights could not be found or do not fit the architecture (names or shapes)."""


class CheckpointError(MixresError):
    """A training checkpoint is torn, incomplete or belongs to another run (resume refuses it)."""


class UnknownNameError(MixresError, KeyError):
    """A registry look-up found no entry of that name; the message lists the close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""
