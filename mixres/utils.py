"""Public helpers for integrations and plugins: lazy optional imports and the argument checks
mixres' own modules use (each raises a :class:`~mixres.errors.MixresError` naming the value)."""

from ._utils import (
    check_choice,
    check_finite_positive,
    check_like_parameters,
    check_positive_int,
    lazy_import,
    to_2tuple,
)

__all__ = ["lazy_import", "check_choice", "check_positive_int", "check_finite_positive", "check_like_parameters", "to_2tuple"]
