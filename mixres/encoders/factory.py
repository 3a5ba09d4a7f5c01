"""``create_encoder``: build an encoder from a preset or class name, optionally with weights."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, WeightsError
from ..registry import ENCODERS, build

__all__ = ["create_encoder", "WEIGHT_ARGS"]

# the constructor argument of each pathway that names its weights (a local path or a hub id)
WEIGHT_ARGS: dict[str, str] = {
    "hf_clip": "model_name_or_path",
    "hf_siglip": "model_name_or_path",
    "timm_vit": "checkpoint_path",
    "timm_map": "checkpoint_path",
    "open_clip_vit": "checkpoint_path",
    "open_clip_convnext": "checkpoint_path",
}


def _with_weights(config: dict[str, Any], part: str, source: str) -> dict[str, Any]:
    pathway = dict(config[part])
    name = pathway["name"]
    if name not in WEIGHT_ARGS:
        raise ConfigError(f"{part} {name!r} takes no weights path; known: {sorted(WEIGHT_ARGS)}")
    pathway[WEIGHT_ARGS[name]] = source
    return {**config, part: pathway}


def create_encoder(name: str, pretrained: bool | str | Path | Mapping[str, str] = False, **overrides: Any) -> nn.Module:
    """Build the encoder ``name`` (a preset such as ``llava-hr-7b-1024`` or a class name).

    Args:
        name: a registered encoder preset or class (``mixres.list_encoders()``).
        pretrained: ``False`` (random weights); a local directory holding either a converted
            mixres encoder (``mixres_config.json`` + ``model.safetensors``) or an official
            LLaVA-HR checkpoint; a dict ``{"token_pathway": path, "map_pathway": path}`` of
            local backbone weights (a ViT directory, a CNN checkpoint file); or ``True``: the
            preset's ``weights`` hub ids, looked up in the local cache only (model hubs may be
            unreachable: the error names the missing file and how to pass a local path).
        **overrides: constructor arguments that replace the preset's (``None`` is dropped).

    Returns:
        The encoder, in training mode as ``nn.Module``s are built.

    Raises:
        UnknownNameError: no encoder of that name.
        WeightsError: weights missing or of the wrong shapes.
    """
    config = ENCODERS.resolve(name, **overrides)
    weights = config.pop("weights", None)
    if pretrained is False or pretrained is None:
        return build(config)
    if pretrained is True:
        if not weights:
            raise WeightsError(f"encoder {name!r} names no pretrained weights; pass local paths: pretrained={{'token_pathway': DIR, 'map_pathway': FILE}}")
        pretrained = weights
    if isinstance(pretrained, Mapping):
        unknown = sorted(set(pretrained) - {"token_pathway", "map_pathway"})
        if unknown:
            raise ConfigError(f"pretrained takes keys 'token_pathway' and 'map_pathway', but got {unknown}")
        for part, source in pretrained.items():
            config = _with_weights(config, part, str(source))
        return build(config)
    return _from_directory(config, Path(pretrained))


def _from_directory(config: dict[str, Any], path: Path) -> nn.Module:
    from ..convert import load_converted, load_llava_hr_vision, read_checkpoint

    if not path.exists():
        raise WeightsError(
            f"pretrained directory {str(path)!r} does not exist; pass a local directory with a converted "
            "encoder (mixres convert llava-hr SRC DST) or an official LLaVA-HR checkpoint"
        )
    if (path / "mixres_config.json").exists():
        return load_converted(path)[0]
    encoder = build(config)
    report = load_llava_hr_vision(encoder, read_checkpoint(path, keep=("model.vision_tower.",)))
    if not report.ok:
        raise WeightsError(f"{str(path)!r} does not fit this encoder:\n{report.summary()}")
    if config_file := next(iter(path.glob("config.json")), None):
        json.loads(config_file.read_text())  # a readable HF config is expected beside the weights
    return encoder
