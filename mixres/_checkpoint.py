"""Reading checkpoint files safely: only weight files, only tensors, errors that name the file.

Public through :mod:`mixres.convert` (``read_checkpoint``, ``weight_files``, ``read_json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError

__all__ = ["read_json", "weight_files", "read_checkpoint"]

_WEIGHT_NAMES = (re.compile(r"^model(-\d+-of-\d+)?\.safetensors$"), re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$"))
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_json(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a JSON object file; errors name the file, the line and what it was for.

    Raises:
        WeightsError: the file is missing, not JSON, or not a JSON object.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise WeightsError(f"{what} {str(path)!r} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise WeightsError(f"{what} {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{what} {str(path)!r} has to hold a JSON object, but holds a {type(value).__name__}")
    return value


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: ``path`` itself, or in a directory the files an
    ``*.index.json`` lists, else ``model[-k-of-n].safetensors``, else ``pytorch_model[-k-of-n].bin``.

    Other files (``training_args.bin``, ``optimizer.pt``, ...) are never read.

    Raises:
        WeightsError: the path does not exist, or a directory holds no weight file.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist; pass a local file or directory path")
    if path.is_file():
        return [path]
    for index in _INDEXES:
        if (path / index).is_file():
            weight_map = read_json(path / index, "checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"checkpoint index {str(path / index)!r} has no 'weight_map' object")
            return [path / name for name in sorted(set(weight_map.values()))]
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    for pattern in _WEIGHT_NAMES:
        found = [path / n for n in names if pattern.match(n)]
        if found:
            return found
    raise WeightsError(
        f"no weight file in {str(path)!r} (looked for model[-0000k-of-0000n].safetensors, pytorch_model[...].bin "
        f"or an *.index.json); it holds {names[:8]}"
    )


def _read_file(file: Path, prefixes: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise WeightsError(f"weight file {str(file)!r} does not exist (listed in the checkpoint index?)")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open  # hf extra; the core does not need it

            with safe_open(str(file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if prefixes is None or k.startswith(prefixes)}
        shard = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / pickle / zip errors of a corrupt, truncated or foreign file
        kind = "safetensors" if file.suffix == ".safetensors" else "a PyTorch weights-only checkpoint"
        raise WeightsError(f"weight file {str(file)!r} cannot be read as {kind}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(shard, Mapping):
        raise WeightsError(f"weight file {str(file)!r} holds a {type(shard).__name__}, not a dict of tensors")
    bad = next(((k, v) for k, v in shard.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WeightsError(f"weight file {str(file)!r} holds {bad[0]!r} = a {type(bad[1]).__name__}; weight files hold only tensors")
    return {k: v for k, v in shard.items() if prefixes is None or k.startswith(prefixes)}


def read_checkpoint(path: str | Path, keep: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or a directory of shards (safetensors or PyTorch ``.bin``).

    Args:
        path: a ``.safetensors`` / ``.bin`` / ``.pt`` file, or a directory (see :func:`weight_files`).
        keep: only keys starting with one of these prefixes (saves memory on LLM-sized shards).

    Returns:
        ``{key: tensor}`` in the stored dtypes.

    Raises:
        WeightsError: no weight file, or a file that is corrupt, truncated or holds non-tensors
            (the message names the file).
    """
    prefixes = tuple(keep) if keep is not None else None
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        out.update(_read_file(file, prefixes))
    return out
