"""``create_encoder``: build an encoder from a preset or class name, optionally with weights."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, WeightsError
from ..registry import ENCODERS, PATHWAYS, build

__all__ = ["create_encoder", "WEIGHTS_ARG", "takes_weights"]

#: the constructor argument through which every pathway loads weights (a local path)
WEIGHTS_ARG = "weights"


def takes_weights(pathway_name: str) -> bool:
    """Whether the registered pathway ``pathway_name`` loads weights through ``weights=``.

    Example:
        >>> takes_weights("hf_clip"), takes_weights("patchify")
        (True, False)
    """
    cls = PATHWAYS.get_class(pathway_name)
    return WEIGHTS_ARG in inspect.signature(cls.__init__).parameters


def _with_weights(config: dict[str, Any], part: str, source: str) -> dict[str, Any]:
    if not isinstance(config.get(part), Mapping):
        raise ConfigError(f"this encoder has no {part} config to load {source!r} into; its keys are {sorted(config)}")
    pathway = dict(config[part])
    if not takes_weights(pathway["name"]):
        raise ConfigError(f"{part} {pathway['name']!r} takes no weights path")
    pathway[WEIGHTS_ARG] = source
    return {**config, part: pathway}


def _preset_weights(name: str) -> dict[str, str] | None:
    """The hub ids of a preset's backbones, following presets of presets."""
    from .presets import PRESET_WEIGHTS

    while True:
        if name in PRESET_WEIGHTS:
            return dict(PRESET_WEIGHTS[name])
        if not ENCODERS.is_preset(name):
            return None
        name = ENCODERS.get_preset(name)["name"]


def create_encoder(name: str, pretrained: bool | str | Path | Mapping[str, str] = False, **overrides: Any) -> nn.Module:
    """Build the encoder ``name`` (a preset such as ``llava-hr-7b-1024`` or a class name).

    The architecture is always ``name`` with ``overrides`` (``None`` is a value: ``final_fusion=None``
    builds no final fusion); ``pretrained`` only says where the weights come from.

    Args:
        name: a registered encoder preset or class (``mixres.list_encoders()``).
        pretrained: ``False`` (random weights); a local directory holding either a converted
            mixres encoder (``mixres_config.json`` + ``model.safetensors``) or an official
            LLaVA-HR checkpoint, loaded into the encoder ``name`` builds (every key has to fit);
            a dict ``{"token_pathway": path, "map_pathway": path}`` of local backbone weights
            (a ViT directory, a CNN checkpoint file); or ``True``: the preset's hub ids, looked
            up in the local cache only (model hubs may be unreachable: the error names the
            missing file and how to pass a local path).
        **overrides: constructor arguments that replace the preset's.

    Returns:
        The encoder, in training mode as ``nn.Module``s are built.

    Raises:
        UnknownNameError: no encoder of that name.
        WeightsError: weights missing, or not fitting the encoder ``name`` (names or shapes).
    """
    config = ENCODERS.resolve(name, **overrides)
    if pretrained is False or pretrained is None:
        return build(config)
    if pretrained is True:
        weights = _preset_weights(name)
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
    if not isinstance(pretrained, (str, Path)):
        raise TypeError(f"pretrained has to be False, True, a directory or a dict of paths, but got {type(pretrained).__name__}")
    return _from_directory(name, config, Path(pretrained))


def _from_directory(name: str, config: dict[str, Any], path: Path) -> nn.Module:
    from ..convert import load_llava_hr_vision, read_checkpoint
    from ..pathways._weights import gathered

    if not path.is_dir():
        raise WeightsError(
            f"pretrained directory {str(path)!r} does not exist; pass a local directory with a converted "
            "encoder (mixres convert llava-hr SRC DST) or an official LLaVA-HR checkpoint"
        )
    encoder = build(config)
    with gathered(encoder):  # under deepspeed.zero.Init the parameters are partitioned: load them whole
        if (path / "mixres_config.json").exists():
            state = _converted_state(path)
            _check_shapes(encoder, state, path, name)
            missing, unexpected = encoder.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise WeightsError(f"the converted encoder in {str(path)!r} does not fit {name!r} (with the overrides given): "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} keys)")
        else:
            report = load_llava_hr_vision(encoder, read_checkpoint(path, keep=("model.vision_tower.",)))
            if not report.ok:
                raise WeightsError(f"{str(path)!r} does not fit {name!r}:\n{report.summary()}")
    return encoder  # load_state_dict copies values in place: the config's freeze stays as built


def _converted_state(path: Path) -> dict[str, Any]:
    """The encoder's tensors of a converted directory (``model.safetensors``, keys ``encoder.*``).

    Read as the file holds them (no second encoder is built: under ``deepspeed.zero.Init`` it
    would be partitioned too). The directory's config is :func:`load_converted`'s to check.
    """
    from ..convert import load_converted, read_checkpoint

    if not (path / "model.safetensors").is_file():
        load_converted(path)  # raises its own error naming what is missing
    return {k[len("encoder."):]: v for k, v in read_checkpoint(path / "model.safetensors").items() if k.startswith("encoder.")}


def _check_shapes(encoder: nn.Module, state: Mapping[str, Any], path: Path, name: str) -> None:
    own = encoder.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise WeightsError(f"the converted encoder in {str(path)!r} does not fit {name!r}: shapes differ at {bad[:5]}")
