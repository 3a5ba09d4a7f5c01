"""Convert official LLaVA-HR checkpoints (vision part + projector) into mixres modules.

The release (github.com/luogen1996/LLaVA-HR) stores the vision tower inside the LLaVA model:

| release prefix | mixres part |
|---|---|
| ``model.vision_tower.fast_vision_tower.vision_tower.`` (HF ``CLIPVisionModel``) | ``token_pathway`` |
| ``model.vision_tower.slow_vision_tower.vision_tower.`` (timm ConvNeXt) | ``map_pathway`` |
| ``model.vision_tower.align_stages_latent.{i}.`` (``S2FStitchAlignModuleV2``) | ``adapters.{i}`` |
| ``model.vision_tower.align_stages.0.`` (``MultiPathAlignModule``) | ``final_fusion`` |
| ``model.mm_projector.`` | the projector |

Inside the adapters and the final fusion, :data:`mixres.fusions.mr_adapter.OFFICIAL_KEYS`
renames ``slow_*``/``fast_*`` to ``high_*``/``low_*``. The backbones keep their library's own
key layout under our pathway's prefix, which is found by matching key suffixes. Checkpoints are
read with safetensors or ``torch.load(weights_only=True)``, never unrestricted pickle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError
from .fusions.mr_adapter import OFFICIAL_KEYS, convert_official_state_dict

__all__ = [
    "OFFICIAL_PREFIXES",
    "ConversionReport",
    "read_checkpoint",
    "split_official_state_dict",
    "load_llava_hr_vision",
    "save_converted",
    "load_converted",
]

OFFICIAL_PREFIXES: dict[str, str] = {
    "model.vision_tower.fast_vision_tower.vision_tower.": "token_pathway",
    "model.vision_tower.slow_vision_tower.vision_tower.": "map_pathway",
    "model.vision_tower.align_stages_latent.": "adapters",
    "model.vision_tower.align_stages.0.": "final_fusion",
    "model.mm_projector.": "projector",
}
# release keys with no counterpart that are dropped on purpose (reported, never silent)
_DROPPABLE = (re.compile(r"(^|\.)position_ids$"), re.compile(r"^head\."))


@dataclass
class ConversionReport:
    """What a conversion did: every key is in exactly one list.

    Attributes:
        loaded: release keys loaded into the encoder / projector.
        dropped: release keys with no counterpart by design (buffers such as ``position_ids``,
            the CNN's classifier ``head.*``).
        unexpected: release vision keys that found no place (a wrong preset, usually).
        missing: our keys that received no tensor.
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


def read_checkpoint(path: str | Path, keep: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or a directory of shards (safetensors or PyTorch ``.bin``).

    Args:
        path: a ``.safetensors`` / ``.bin`` / ``.pt`` file, or a directory holding them (HF
            layout, sharded or not).
        keep: only keys starting with one of these prefixes (saves memory on LLM-sized shards).

    Raises:
        WeightsError: the path does not exist or holds no checkpoint file.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist; pass a local file or directory path")
    files = [path] if path.is_file() else sorted(
        [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.pt")]
    )
    if not files:
        raise WeightsError(f"no *.safetensors / *.bin / *.pt file in {str(path)!r}")
    prefixes = tuple(keep) if keep is not None else None
    out: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file  # hf extra; the core does not need it

            shard = load_file(str(file))
        else:
            shard = torch.load(file, map_location="cpu", weights_only=True)
        out.update({k: v for k, v in shard.items() if prefixes is None or k.startswith(prefixes)})
    return out


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


def _load_part(module: nn.Module, tensors: Mapping[str, torch.Tensor], release_prefix: str, report: ConversionReport) -> None:
    ours = module.state_dict()
    prefix, strip = _match_prefix(ours, tensors)
    mapped = {}
    for key, value in tensors.items():
        target = prefix + key[len(strip):] if key.startswith(strip) else None
        if target in ours:
            if ours[target].shape != value.shape:
                raise WeightsError(
                    f"{release_prefix}{key} has shape {tuple(value.shape)}, but mixres expects "
                    f"{tuple(ours[target].shape)} for {target}: is the preset the checkpoint's?"
                )
            mapped[target] = value
            report.loaded.append(release_prefix + key)
        elif any(p.search(key) for p in _DROPPABLE):
            report.dropped.append(release_prefix + key)
        else:
            report.unexpected.append(release_prefix + key)
    module.load_state_dict(mapped, strict=False)
    report.missing += [k for k in ours if k not in mapped and not k.endswith("position_ids")]


def load_llava_hr_vision(
    encoder: nn.Module, state_dict: Mapping[str, torch.Tensor], projector: nn.Module | None = None
) -> ConversionReport:
    """Load an official LLaVA-HR state dict into a :class:`~mixres.encoders.dual.DualPathwayEncoder`.

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
    _load_part(encoder.token_pathway, groups["token_pathway"], inv["token_pathway"], report)
    _load_part(encoder.map_pathway, groups["map_pathway"], inv["map_pathway"], report)
    adapters: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in groups["adapters"].items():
        index, rest = key.split(".", 1)
        adapters.setdefault(int(index), {})[rest] = value
    for i, adapter in enumerate(encoder.adapters):
        tensors = convert_official_state_dict(adapters.pop(i, {}))
        _load_fusion(adapter, tensors, f"{inv['adapters']}{i}.", report)
    report.unexpected += [f"{inv['adapters']}{i}.{k}" for i, sd in adapters.items() for k in sd]
    if encoder.final_fusion is not None:
        _load_fusion(encoder.final_fusion, convert_official_state_dict(groups["final_fusion"]), inv["final_fusion"], report)
    else:
        report.unexpected += [inv["final_fusion"] + k for k in groups["final_fusion"]]
    if projector is not None:
        _load_fusion(projector, groups["projector"], inv["projector"], report)
    else:
        report.other += [inv["projector"] + k for k in groups["projector"]]
    return report


def _release_name(key: str) -> str:
    """Our adapter key back to the release's name (``high_proj.weight`` -> ``slow_proj.weight``)."""
    for release, ours in OFFICIAL_KEYS.items():
        if key.startswith(ours + "."):
            return release + key[len(ours):]
    return key


def _load_fusion(module: nn.Module, tensors: Mapping[str, torch.Tensor], release_prefix: str, report: ConversionReport) -> None:
    ours = module.state_dict()
    for key, value in tensors.items():
        name = release_prefix + _release_name(key)
        if key not in ours:
            report.unexpected.append(name)
        elif ours[key].shape != value.shape:
            raise WeightsError(
                f"{name} has shape {tuple(value.shape)}, but mixres expects {tuple(ours[key].shape)} for {key}: "
                "is the preset the checkpoint's?"
            )
        else:
            report.loaded.append(name)
    module.load_state_dict({k: v for k, v in tensors.items() if k in ours}, strict=False)
    report.missing += [f"{type(module).__name__}.{k}" for k in ours if k not in tensors]


def save_converted(dst: str | Path, encoder: nn.Module, projector: nn.Module | None = None) -> Path:
    """Write ``model.safetensors`` (keys ``encoder.*``, ``projector.*``) and ``mixres_config.json``."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    config = {"encoder": encoder.config}
    if projector is not None:
        tensors.update({f"projector.{k}": v.contiguous() for k, v in projector.state_dict().items()})
        config["projector"] = projector.config
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "mixres_config.json").write_text(json.dumps(config, indent=2))
    return dst


def load_converted(src: str | Path) -> tuple[nn.Module, nn.Module | None]:
    """Rebuild the encoder (and projector) written by :func:`save_converted`, weights loaded."""
    from .registry import build

    src = Path(src)
    config_file = src / "mixres_config.json"
    if not config_file.exists():
        raise WeightsError(f"{str(config_file)!r} does not exist; convert a checkpoint first (mixres convert llava-hr SRC DST)")
    config = json.loads(config_file.read_text())
    tensors = read_checkpoint(src / "model.safetensors")
    encoder = build(config["encoder"])
    encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
    projector = None
    if "projector" in config:
        projector = build(config["projector"])
        projector.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("projector.")})
    return encoder, projector
