"""Convert official LLaVA-HR checkpoints (vision part + projector) into mixres modules.

The release (github.com/luogen1996/LLaVA-HR) stores the vision tower inside the LLaVA model:

| release prefix | mixres part |
|---|---|
| ``model.vision_tower.fast_vision_tower.vision_tower.`` (HF ``CLIPVisionModel``) | ``token_pathway`` |
| ``model.vision_tower.slow_vision_tower.vision_tower.`` (the release's ConvNeXt) | ``map_pathway`` |
| ``model.vision_tower.align_stages_latent.{i}.`` (``S2FStitchAlignModuleV2``) | ``adapters.{i}`` |
| ``model.vision_tower.align_stages.0.`` (``MultiPathAlignModule``) | ``final_fusion`` |
| ``model.mm_projector.`` | the projector |

Inside the adapters and the final fusion, :data:`mixres.fusions.mr_adapter.OFFICIAL_KEYS`
renames ``slow_*``/``fast_*`` to ``high_*``/``low_*``. The backbones keep their library's key
layout under our pathway's prefix, found by matching key suffixes, with one rename: the release
vendors its own ConvNeXt (``llava_hr/model/multimodal_encoder/convnext.py``) whose layer scale
is ``stages.S.blocks.B.weight``, timm's ``gamma`` (:data:`RELEASE_RENAMES`). Dropped by design:
``position_ids`` buffers and the ConvNeXt classifier ``head.*`` (never run by the release).

Files: only weight files are read (:func:`weight_files`: the HF names ``model*.safetensors`` /
``pytorch_model*.bin`` or what an ``*.index.json`` lists; never ``training_args.bin``), with
safetensors or ``torch.load(weights_only=True)``; unreadable files raise :class:`WeightsError`
naming the file. Writes go to a temporary directory beside the destination that is renamed
into place (:func:`atomic_directory`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_directory, check_destination
from ._checkpoint import read_checkpoint, read_json, weight_files
from .errors import WeightsError
from .fusions.mr_adapter import OFFICIAL_KEYS, convert_official_state_dict

__all__ = [
    "OFFICIAL_PREFIXES",
    "RELEASE_RENAMES",
    "ConversionReport",
    "weight_files",
    "read_checkpoint",
    "read_json",
    "split_official_state_dict",
    "projector_from_checkpoint",
    "preset_for",
    "load_llava_hr_vision",
    "save_converted",
    "load_converted",
    "convert_checkpoint",
    "resolve_encoder_config",
    "checkpoint_dtype",
    "DTYPES",
    "atomic_directory",
    "check_destination",
]

OFFICIAL_PREFIXES: dict[str, str] = {
    "model.vision_tower.fast_vision_tower.vision_tower.": "token_pathway",
    "model.vision_tower.slow_vision_tower.vision_tower.": "map_pathway",
    "model.vision_tower.align_stages_latent.": "adapters",
    "model.vision_tower.align_stages.0.": "final_fusion",
    "model.mm_projector.": "projector",
}
# per part: (release key pattern, our name); the release's ConvNeXtBlock calls its layer scale
# `weight` where timm's is `gamma` (its checkpoint_filter_fn does k.replace('gamma', 'weight'))
RELEASE_RENAMES: dict[str, list[tuple[re.Pattern[str], str]]] = {
    "map_pathway": [(re.compile(r"^(stages\.\d+\.blocks\.\d+)\.weight$"), r"\1.gamma")],
}
# release keys with no counterpart that are dropped on purpose (reported, never silent)
_DROPPABLE = (re.compile(r"(^|\.)position_ids$"), re.compile(r"^head\."))
CONFIG_NAME, WEIGHTS_NAME = "mixres_config.json", "model.safetensors"


@dataclass
class ConversionReport:
    """What a conversion did: every key is in exactly one list.

    Attributes:
        loaded: release keys loaded into the encoder / projector.
        dropped: release keys with no counterpart by design (``position_ids`` buffers, the
            CNN's classifier ``head.*``).
        unexpected: release vision keys that found no place (a wrong preset, usually).
        missing: our parameters (``part.key``) that received no tensor; they keep their init.
        other: keys outside the vision part and the projector (the LLM's), untouched here.
    """

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is unexpected and nothing is missing."""
        return not self.unexpected and not self.missing

    def summary(self) -> str:
        """One line per list with its count and the first few keys."""
        parts = []
        for name in ("loaded", "dropped", "unexpected", "missing", "other"):
            keys = getattr(self, name)
            head = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            parts.append(f"{name}: {len(keys)}" + (f" ({head})" if keys and name != "loaded" else ""))
        return "\n".join(parts)


def split_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group release keys by mixres part (prefix stripped); return the groups and the other keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {part: {} for part in OFFICIAL_PREFIXES.values()}
    other = []
    for key, value in state_dict.items():
        for prefix, part in OFFICIAL_PREFIXES.items():
            if key.startswith(prefix):
                groups[part][key[len(prefix):]] = value
                break
        else:
            other.append(key)
    return groups, other


def projector_from_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The projector config the release's ``model.mm_projector.*`` tensors describe, widths included.

    ``mlp{N}x_gelu`` saves Linear layers at ``0, 2, ..., 2(N-1)``; ``linear`` one Linear. The LLM
    width is the last layer's output (4096 for the 7B models, 5120 for the 13B of LLaVA-HR-X).

    Example:
        >>> sd = {"model.mm_projector.0.weight": torch.zeros(8, 4), "model.mm_projector.2.weight": torch.zeros(8, 8)}
        >>> projector_from_checkpoint(sd)
        {'name': 'mlp2x_gelu', 'in_dim': 4, 'out_dim': 8}

    Raises:
        WeightsError: no projector weights, or an arrangement of layers no projector saves.
    """
    pre = "model.mm_projector."
    if pre + "weight" in state_dict:
        w = state_dict[pre + "weight"]
        return {"name": "linear", "in_dim": int(w.shape[1]), "out_dim": int(w.shape[0])}
    layers = sorted(int(k[len(pre):].split(".")[0]) for k in state_dict if re.match(rf"^{re.escape(pre)}\d+\.weight$", k))
    if not layers or layers != list(range(0, 2 * len(layers), 2)):
        raise WeightsError(f"the checkpoint's projector layers are {layers or 'absent'}; expected {pre}weight (linear) "
                           f"or {pre}0/2/... .weight (mlpNx_gelu)")
    first, last = state_dict[f"{pre}0.weight"], state_dict[f"{pre}{layers[-1]}.weight"]
    return {"name": f"mlp{len(layers)}x_gelu", "in_dim": int(first.shape[1]), "out_dim": int(last.shape[0])}


def preset_for(official: Mapping[str, Any]) -> str:
    """The encoder preset of a release ``config.json``: ``llava-hr-7b-<input_image_size>`` or,
    with a ConvNeXt-XXL (``vision_tower_slow``), ``llava-hr-x-1024``.

    Raises:
        WeightsError: the size / tower pair has no preset (the message lists those that exist).
    """
    from .registry import ENCODERS

    size = official.get("input_image_size") or 1024
    kind = "x" if "xxlarge" in str(official.get("vision_tower_slow", "")) else "7b"
    name = f"llava-hr-{kind}-{size}"
    if name not in ENCODERS.list("llava-hr-*"):
        raise WeightsError(f"the release config (input_image_size={size}, vision_tower_slow="
                           f"{official.get('vision_tower_slow')!r}) has no preset {name!r}; presets: "
                           f"{ENCODERS.list('llava-hr-*')}; pass the preset explicitly")
    return name


def _match_prefix(ours: Iterable[str], theirs: Iterable[str]) -> tuple[str, str]:
    """``(our_prefix, their_prefix)`` such that ``our_prefix + key[len(their_prefix):]`` is one of
    our keys for the most of their keys (the backbones keep their library's layout under a
    wrapper prefix; e.g. ``vision_model.`` of ``CLIPVisionModel`` -> ``model.``)."""
    ours = set(ours)
    counts: dict[tuple[str, str], int] = {}
    for key in theirs:
        parts = key.split(".")
        for cut in range(min(2, len(parts) - 1) + 1):  # their key as is, or without 1-2 leading parts
            tail = ".".join(parts[cut:])
            theirs_prefix = key[: len(key) - len(tail)]
            for candidate in ours:
                if candidate == tail or candidate.endswith("." + tail):
                    pair = (candidate[: len(candidate) - len(tail)], theirs_prefix)
                    counts[pair] = counts.get(pair, 0) + 1
    return max(counts, key=counts.get) if counts else ("", "")


def _renamed(part: str, key: str) -> str:
    for pattern, repl in RELEASE_RENAMES.get(part, []):
        key = pattern.sub(repl, key)
    return key


def _load_part(module: nn.Module, tensors: Mapping[str, torch.Tensor], part: str, report: ConversionReport) -> None:
    release_prefix = {v: k for k, v in OFFICIAL_PREFIXES.items()}[part]
    ours = module.state_dict()
    prefix, strip = _match_prefix(ours, [_renamed(part, k) for k in tensors])
    mapped = {}
    for key, value in tensors.items():
        # the release's name renamed (ConvNeXt `weight` -> `gamma`), else as is (a timm-layout file)
        candidates = [prefix + name[len(strip):] for name in (_renamed(part, key), key) if name.startswith(strip)]
        target = next((c for c in candidates if c in ours), None)
        if target is not None:
            _check_shape(release_prefix + key, value, f"{part}.{target}", ours[target])
            mapped[target] = value
            report.loaded.append(release_prefix + key)
        elif any(p.search(key) for p in _DROPPABLE):
            report.dropped.append(release_prefix + key)
        else:
            report.unexpected.append(release_prefix + key)
    module.load_state_dict(mapped, strict=False)
    report.missing += [f"{part}.{k}" for k in ours if k not in mapped and not k.endswith("position_ids")]


def _check_shape(name: str, value: torch.Tensor, target: str, ours: torch.Tensor) -> None:
    if ours.shape != value.shape:
        raise WeightsError(
            f"{name} has shape {tuple(value.shape)}, but mixres expects {tuple(ours.shape)} for {target}: "
            "is the preset the checkpoint's?"
        )


def _release_name(key: str) -> str:
    """Our adapter key back to the release's name (``high_proj.weight`` -> ``slow_proj.weight``)."""
    for release, ours in OFFICIAL_KEYS.items():
        if key.startswith(ours + "."):
            return release + key[len(ours):]
    return key


def _load_fusion(module: nn.Module, tensors: Mapping[str, torch.Tensor], release_prefix: str, part: str,
                 report: ConversionReport) -> None:
    ours = module.state_dict()
    for key, value in tensors.items():
        name = release_prefix + _release_name(key)
        if key not in ours:
            report.unexpected.append(name)
        else:
            _check_shape(name, value, f"{part}.{key}", ours[key])
            report.loaded.append(name)
    module.load_state_dict({k: v for k, v in tensors.items() if k in ours}, strict=False)
    report.missing += [f"{part}.{k}" for k in ours if k not in tensors]


def load_llava_hr_vision(
    encoder: nn.Module, state_dict: Mapping[str, torch.Tensor], projector: nn.Module | None = None
) -> ConversionReport:
    """Load an official LLaVA-HR state dict into a :class:`~mixres.encoders.dual.DualPathwayEncoder`.

    Tensors are copied into the encoder's parameters, so they take its dtype (build it in the
    checkpoint's dtype, e.g. ``encoder.to(torch.bfloat16)``, to keep the values bit for bit).

    Args:
        encoder: a dual-pathway encoder built from the checkpoint's preset (e.g.
            ``llava-hr-7b-1024``), with three adapters and a final fusion.
        state_dict: the release's keys (see the module docstring); the LLM's keys are ignored
            and listed in ``report.other``.
        projector: the projector to load ``model.mm_projector.*`` into (optional).

    Returns:
        A :class:`ConversionReport`: loaded, dropped, unexpected and missing keys.

    Raises:
        WeightsError: a tensor's shape does not fit the encoder.
    """
    groups, other = split_official_state_dict(state_dict)
    report = ConversionReport(other=other)
    inv = {v: k for k, v in OFFICIAL_PREFIXES.items()}
    _load_part(encoder.token_pathway, groups["token_pathway"], "token_pathway", report)
    _load_part(encoder.map_pathway, groups["map_pathway"], "map_pathway", report)
    adapters: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in groups["adapters"].items():
        index, rest = key.split(".", 1)
        adapters.setdefault(int(index), {})[rest] = value
    for i, adapter in enumerate(encoder.adapters):
        _load_fusion(adapter, convert_official_state_dict(adapters.pop(i, {})), f"{inv['adapters']}{i}.", f"adapters.{i}", report)
    report.unexpected += [f"{inv['adapters']}{i}.{k}" for i, sd in adapters.items() for k in sd]
    if encoder.final_fusion is not None:
        _load_fusion(encoder.final_fusion, convert_official_state_dict(groups["final_fusion"]), inv["final_fusion"],
                     "final_fusion", report)
    else:
        report.unexpected += [inv["final_fusion"] + k for k in groups["final_fusion"]]
    if projector is not None:
        _load_fusion(projector, groups["projector"], inv["projector"], "projector", report)
    else:
        report.other += [inv["projector"] + k for k in groups["projector"]]
    return report


def save_converted(dst: str | Path, encoder: nn.Module, projector: nn.Module | None = None, *,
                   overwrite: bool = False, notes: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (keys ``encoder.*``, ``projector.*``, in the modules' dtype)
    and ``mixres_config.json`` into ``dst`` as one unit (a temporary directory renamed into place).

    Args:
        dst: the output directory; it must not exist, be an empty directory, or (with
            ``overwrite``) an earlier conversion's output.
        encoder: the encoder.
        projector: the projector (optional).
        overwrite: replace an existing conversion at ``dst``.
        notes: JSON data kept under ``"conversion"`` in the config (e.g. missing keys).

    Raises:
        MixresError: ``dst`` is a file, a non-empty directory (without ``overwrite``) or not writable.
    """
    from safetensors.torch import save_file

    dst = check_destination(dst, overwrite=overwrite, marker=CONFIG_NAME)
    tensors = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    config: dict[str, Any] = {"encoder": encoder.config}
    if projector is not None:
        tensors.update({f"projector.{k}": v.contiguous() for k, v in projector.state_dict().items()})
        config["projector"] = projector.config
    if notes:
        config["conversion"] = dict(notes)
    with atomic_directory(dst, overwrite=overwrite, marker=CONFIG_NAME) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return dst


def load_converted(src: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Module | None]:
    """Rebuild ``(encoder, projector)`` written by :func:`save_converted`, weights loaded.

    Args:
        src: the directory (``mixres_config.json`` + ``model.safetensors``).
        dtype: cast to this dtype; ``None``: as stored (no upcast of a bf16 conversion).

    Returns:
        The encoder (eval mode not set) and the projector (``None`` if none was saved).

    Raises:
        WeightsError: a file is missing or unreadable, or the weights do not fit the config.
    """
    import warnings

    from .registry import build

    src = Path(src)
    if not (src / CONFIG_NAME).exists():
        raise WeightsError(f"{str(src / CONFIG_NAME)!r} does not exist; convert a checkpoint first (mixres convert llava-hr SRC DST)")
    config = read_json(src / CONFIG_NAME, "converted config")
    if not isinstance(config.get("encoder"), dict):
        raise WeightsError(f"converted config {str(src / CONFIG_NAME)!r} has no 'encoder' object")
    tensors = read_checkpoint(src / WEIGHTS_NAME)
    missing = config.get("conversion", {}).get("missing") or []
    if missing:
        warnings.warn(f"{str(src)!r} was converted with {len(missing)} missing key(s) left at their init "
                      f"(e.g. {missing[:3]}); its features differ from the release's", stacklevel=2)
    modules = []
    for part in ("encoder", "projector"):
        if part not in config:
            modules.append(None)
            continue
        module = build(config[part])
        state = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        stored = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        module.to(dtype or stored)
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsError(f"{str(src / WEIGHTS_NAME)!r} does not fit its {CONFIG_NAME} ({part}): "
                               f"{str(err).splitlines()[0][:300]}") from None
        modules.append(module)
    return modules[0], modules[1]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MISSING_EFFECT = ("they keep the values the preset was built with (random init; ConvNeXt layer scales at timm's 1e-6), "
                   "so the features differ from the release's")


def resolve_encoder_config(preset: str | Mapping[str, Any] | None, src: Path, official: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder config (no ``kind``, no hub ``weights``) from a preset name, a config dict,
    a ``.json`` file holding one, or (``None``) the release config via :func:`preset_for`."""
    from .registry import ENCODERS

    if isinstance(preset, Mapping):
        config = dict(preset)
    elif preset is not None and preset.endswith(".json"):
        config = read_json(preset, "encoder config (--preset)")
    else:
        config = ENCODERS.resolve(preset or preset_for(official))
    config.pop("weights", None)  # the preset's hub ids of the backbones: the checkpoint replaces them
    config.pop("kind", None)
    return config


def checkpoint_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of the elements (``float32`` if there is none)."""
    counts: dict[torch.dtype, int] = {}
    for v in tensors.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    preset: str | Mapping[str, Any] | None = None,
    llm_dim: int | None = None,
    dtype: str | torch.dtype | None = None,
    allow_missing: bool = False,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert an official LLaVA-HR checkpoint's vision part + projector to a mixres directory.

    Args:
        src: the release directory (``config.json`` + weight shards) or a weight file.
        dst: the output directory (validated before anything is read; written as one unit).
        preset: encoder preset name, an encoder config dict, or a ``.json`` file holding one;
            ``None``: from the release ``config.json`` (:func:`preset_for`).
        llm_dim: the LLM width the projector maps to; ``None``: read from the checkpoint
            (``model.mm_projector.*`` shapes); a value that differs is an error.
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype; ``None``: the checkpoint's own.
        allow_missing: write even when keys are missing or unexpected (they are listed in the
            report, the warning and the output's config).
        overwrite: replace an earlier conversion at ``dst``.

    Returns:
        The :class:`ConversionReport`.

    Raises:
        MixresError: bad destination; WeightsError: unreadable files, shapes that do not fit,
            or (without ``allow_missing``) unexpected / missing keys.
    """
    import warnings

    from . import create_projector
    from .registry import build

    src = Path(src).expanduser()
    dst = check_destination(dst, overwrite=overwrite, marker=CONFIG_NAME)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise WeightsError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    official = read_json(src / "config.json", "release config") if (src / "config.json").is_file() else {}
    state = read_checkpoint(src, keep=("model.vision_tower.", "model.mm_projector."))
    projector_cfg = projector_from_checkpoint(state)
    if llm_dim is not None and llm_dim != projector_cfg["out_dim"]:
        raise WeightsError(f"--llm-dim {llm_dim} does not match the checkpoint, whose projector maps to "
                           f"{projector_cfg['out_dim']} (model.mm_projector.* shapes); leave --llm-dim out")
    target = DTYPES[dtype] if isinstance(dtype, str) else (dtype or checkpoint_dtype(state))
    encoder = build({"kind": "encoder", **resolve_encoder_config(preset, src, official)}).to(target)
    if projector_cfg["in_dim"] != encoder.out_dim:
        raise WeightsError(f"the checkpoint's projector reads width {projector_cfg['in_dim']}, but the preset's encoder "
                           f"gives {encoder.out_dim}: is the preset the checkpoint's?")
    projector = create_projector(projector_cfg["name"], in_dim=projector_cfg["in_dim"], out_dim=projector_cfg["out_dim"]).to(target)
    report = load_llava_hr_vision(encoder, state, projector)
    if not report.ok:
        if not allow_missing:
            raise WeightsError(f"the checkpoint does not fit the encoder preset; nothing written:\n{report.summary()}")
        warnings.warn(f"writing with {len(report.missing)} missing and {len(report.unexpected)} unexpected key(s): "
                      f"missing {report.missing}; unexpected {report.unexpected}; {_MISSING_EFFECT}", stacklevel=2)
    notes = {"source": str(src), "dtype": str(target).removeprefix("torch."), "missing": report.missing,
             "unexpected": report.unexpected}
    save_converted(dst, encoder, projector, overwrite=overwrite, notes=notes)
    return report
