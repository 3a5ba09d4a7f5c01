"""Resolution policies: which size the ViT reads for a given high-res input.

``llava_hr`` (the reference): the ViT input side is ``max(floor(R / stride) * patch, min_size)``
per axis, i.e. the ViT's patch grid equals the CNN's final map whenever that is larger than the
ViT's native grid (LLaVA-HR: ``max(int(R / 32 * 14), 336)``; 1024 px -> 448 px -> 32x32 tokens).
``fixed``: always the same size (LLaVA-1.5 style, or stage 1 at 336).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._utils import check_choice, to_2tuple
from ..errors import ConfigError

__all__ = ["POLICIES", "vit_input_size", "check_policy"]

POLICIES: tuple[str, ...] = ("llava_hr", "fixed")


def check_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a policy dict and return it with defaults filled in.

    Forms: ``{"policy": "llava_hr", "stride": 32, "min_size": None}`` (``min_size`` None: the
    ViT's native size) and ``{"policy": "fixed", "size": 336}`` (an int or ``[h, w]``).
    """
    if not isinstance(policy, Mapping) or "policy" not in policy:
        raise ConfigError(f"resolution has to be a dict with a 'policy' key, but got {policy!r}")
    check_choice("resolution['policy']", policy["policy"], POLICIES)
    allowed = {"llava_hr": {"policy", "stride", "min_size"}, "fixed": {"policy", "size"}}[policy["policy"]]
    extra = sorted(set(policy) - allowed)
    if extra:
        raise ConfigError(f"resolution policy {policy['policy']!r} takes keys {sorted(allowed)}, but got {extra}")
    if policy["policy"] == "llava_hr":
        out = {"policy": "llava_hr", "stride": policy.get("stride", 32), "min_size": policy.get("min_size")}
        to_2tuple("resolution['stride']", out["stride"])
        if out["min_size"] is not None:
            to_2tuple("resolution['min_size']", out["min_size"])
        return out
    if "size" not in policy:
        raise ConfigError("resolution policy 'fixed' needs a 'size' (int or [h, w])")
    to_2tuple("resolution['size']", policy["size"])
    return dict(policy)


def vit_input_size(
    policy: Mapping[str, Any], image_size: Sequence[int], patch_size: int, native_size: Sequence[int]
) -> tuple[int, int]:
    """The ``(h, w)`` in pixels the ViT reads for an input of ``image_size``.

    Args:
        policy: a dict accepted by :func:`check_policy`.
        image_size: ``(H, W)`` of the high-res input.
        patch_size: the ViT's patch size; the result is a multiple of it.
        native_size: the ViT's native ``(h, w)``, the default ``min_size``.

    Example:
        >>> sides = [vit_input_size({"policy": "llava_hr"}, (r, r), 14, (336, 336))[0] for r in (384, 768, 1024, 1536)]
        >>> sides
        [336, 336, 448, 672]
    """
    policy = check_policy(policy)
    if policy["policy"] == "fixed":
        return to_2tuple("size", policy["size"])
    stride = to_2tuple("stride", policy["stride"])
    floor = to_2tuple("min_size", policy["min_size"] if policy["min_size"] is not None else tuple(native_size))
    return tuple(  # type: ignore[return-value]
        max(side // s * patch_size, (f // patch_size) * patch_size) for side, s, f in zip(image_size, stride, floor)
    )
