"""Reading weight files and loading them into a backbone, with errors that say what is wrong.

mixres never downloads weights. A pathway takes a **local** file (``.safetensors``, or a
``torch.save`` file read with ``weights_only=True``: no arbitrary pickle is ever executed) or,
for the transformers wrappers, a local ``save_pretrained`` directory. A missing file, a name
that looks like a hub id, a mismatched shape or a missing key is a
:class:`~mixres.errors.WeightsError` that names the file and says how to fix it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .._utils import lazy_import
from ..errors import WeightsError

__all__ = ["gathered", "load_state_dict_file", "load_into", "strip_prefix", "missing_weights_error", "WEIGHT_FILE_NAMES"]

# file names looked for, in order, when a directory is given
WEIGHT_FILE_NAMES: tuple[str, ...] = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
# keys under which training scripts nest the state dict (timm, open_clip, DeepSpeed, ...)
_NESTED_KEYS = ("state_dict", "model", "module", "state_dict_ema")
_SHOWN = 8  # keys listed in one error message


def missing_weights_error(path: str | os.PathLike, what: str = "weights") -> WeightsError:
    """The error for weights that are not on this machine; it explains how to pass a local path."""
    return WeightsError(
        f"{what} {str(path)!r} is not a local file or directory. mixres never downloads weights: "
        "download them yourself (e.g. `huggingface-cli download <repo> --local-dir ./weights`) "
        "and pass the local path, e.g. weights='./weights/model.safetensors' or "
        "weights='./weights'"
    )


def _resolve_file(path: str | os.PathLike) -> Path:
    file = Path(path).expanduser()
    if file.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (file / name).is_file():
                return file / name
        raise WeightsError(
            f"directory {str(file)!r} holds none of the weight files {list(WEIGHT_FILE_NAMES)}; "
            "pass the weight file itself"
        )
    if not file.is_file():
        raise missing_weights_error(path)
    return file


def _unwrap(obj: object, file: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            raise WeightsError(
                f"{str(file)!r} holds a dict with keys {sorted(obj)[:_SHOWN]} but no state dict "
                f"(looked for tensors, or a nested dict under {list(_NESTED_KEYS)})"
            )
        obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{str(file)!r} holds a {type(obj).__name__}, not a state dict of tensors")
    return strip_prefix(dict(obj), "module.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local weight file (or a directory holding one).

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``. A state dict nested under ``state_dict`` /
    ``model`` / ``module`` (training checkpoints) is unwrapped and a DDP ``module.`` prefix dropped.

    Args:
        path: a file, or a directory holding one of :data:`WEIGHT_FILE_NAMES`.

    Returns:
        ``{name: Tensor}`` on the CPU.

    Raises:
        WeightsError: the path does not exist, holds no weight file, or cannot be read safely
            (e.g. a pickle that needs arbitrary code, or a TorchScript archive).

    Example:
        >>> import tempfile, os
        >>> file = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": {"module.fc.weight": torch.ones(2, 3)}}, file)
        >>> {k: v.shape for k, v in load_state_dict_file(file).items()}
        {'fc.weight': torch.Size([2, 3])}
    """
    file = _resolve_file(path)
    try:
        if file.suffix == ".safetensors":
            obj = lazy_import("safetensors.torch").load_file(str(file), device="cpu")
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as err:  # torch / safetensors raise many types for unreadable files
        raise WeightsError(
            f"could not read {str(file)!r} as safetensors or as a weights-only torch file "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); mixres never unpickles "
            "arbitrary objects: re-save the state dict with safetensors or torch.save(model.state_dict())"
        ) from None
    return _unwrap(obj, file)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep the keys that start with ``prefix``, without it; unchanged if no key has it.

    Example:
        >>> sorted(strip_prefix({"visual.a": 1, "text.b": 2}, "visual."))
        ['a']
    """
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _listing(items: Iterable[str]) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


@contextlib.contextmanager
def gathered(module: nn.Module, modifier_rank: int | None = 0) -> Iterator[nn.Module]:
    """Inside, ``module``'s DeepSpeed ZeRO-3 partitioned parameters are whole (a no-op otherwise).

    Under ``deepspeed.zero.Init`` each parameter keeps only its shard (``param.data`` is
    ``torch.Size([0])``), so loading a state dict would fail on every shape. This gathers them
    (``deepspeed.zero.GatheredParameters``); with ``modifier_rank=0`` what rank 0 writes is
    partitioned again to every rank on exit.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> with gathered(lin):  # not partitioned: nothing to do
        ...     tuple(lin.weight.shape)
        (2, 3)
    """
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield module


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    ignore: Iterable[str] = (),
) -> None:
    """Copy ``state_dict`` into ``module``, refusing missing, unexpected or mis-shaped keys.

    Args:
        module: the backbone (its own key names, no wrapper prefix).
        state_dict: the weights.
        source: where they came from (a path), named in the errors.
        ignore: keys the checkpoint may carry that the module does not use (a pruned head);
            they are skipped without checks.

    Raises:
        WeightsError: listing every mismatched key with both shapes, then missing and unexpected
            keys.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> load_into(lin, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, "memory")
        >>> lin.weight.abs().sum().item()
        0.0
    """
    with gathered(module):  # ZeRO-3 partitioned parameters are loaded whole
        _load_checked(module, state_dict, source, ignore)


def _load_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, ignore: Iterable[str]) -> None:
    ignored = set(ignore)
    own = module.state_dict()
    given = {k: v for k, v in state_dict.items() if k not in ignored}
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in given.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = set(own) - set(given) - ignored
    unexpected = set(given) - set(own)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} key(s) with other shapes: {_listing(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) the model does not have: {_listing(unexpected)}")
    if problems:
        raise WeightsError(
            f"the weights in {source!r} do not fit this {type(module).__name__}: " + "; ".join(problems)
            + ". Check that the architecture arguments (model name, config) match the checkpoint"
        )
    module.load_state_dict(given, strict=False)
