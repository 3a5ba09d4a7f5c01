"""Checkpoints the recipe can trust: a manifest written last, checked before resuming.

``transformers.Trainer`` writes ``checkpoint-N/`` file by file and, on
``resume_from_checkpoint=True``, takes the highest-numbered directory whatever it holds: a save
killed half-way is resumed from (``FileNotFoundError`` or a torn safetensors), missing optimizer
/ scheduler / RNG files are silently replaced by fresh ones, and rotation deletes any
``checkpoint-*`` it finds, a foreign one included. Here:

- every checkpoint ends with :data:`MANIFEST`, written last and atomically (temp file, fsync,
  rename, fsync of the directory), holding the run id, the step and each file's size and
  SHA-256 (the files are fsynced while hashed), so a complete checkpoint is one whose manifest
  is there and matches;
- the run id lives in ``output_dir/``:data:`RUN_FILE`; a fresh run refuses an ``output_dir``
  holding checkpoints unless ``overwrite_output_dir``;
- resume picks the last complete checkpoint of this run, skipping torn ones with a warning;
- rotation deletes only complete checkpoints of this run.

Hashing costs one read of each checkpoint (about 1 s per GB); it runs on the main process.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from mixres.errors import CheckpointError

__all__ = [
    "MANIFEST",
    "RUN_FILE",
    "STATE_FILES",
    "write_manifest",
    "checkpoint_problem",
    "missing_state",
    "last_complete_checkpoint",
    "run_id",
    "new_run",
    "rotate",
]

logger = logging.getLogger(__name__)

MANIFEST = "mixres_checkpoint.json"
RUN_FILE = "mixres_run.json"
# what Trainer needs to continue exactly (besides the weights): one pattern per kind
STATE_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "RNG": "rng_state*.pth",
               "trainer state": "trainer_state.json"}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())  # the bytes are on disk before the manifest says they are
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | os.PathLike[str], run: str, step: int) -> Path:
    """Seal ``folder`` as a complete checkpoint of run ``run`` at ``step``; returns the manifest path."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _digest(p)} for p in _files(folder)}
    _fsync_dir(folder)
    path = folder / MANIFEST
    _write_atomic(path, json.dumps({"run_id": run, "step": step, "files": files}, indent=1) + "\n")
    return path


def _manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"no {MANIFEST} (the save did not finish, or another program wrote it)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        run = manifest["run_id"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        return None, f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(files, dict) or not isinstance(run, str):
        return None, f"{MANIFEST} does not hold a run id and a file list"
    return manifest, None


def checkpoint_problem(folder: str | os.PathLike[str], run: str | None = None, *, partial: bool = False) -> str | None:
    """Why ``folder`` is not a complete checkpoint (of run ``run``, when given), or ``None``.

    Complete: the manifest is there, names ``run``, and every file it lists has its size and
    SHA-256 (a file changed after saving, e.g. zeroed weights, fails). With ``partial``, a
    missing optimizer / scheduler / RNG file is tolerated (the caller warns about it).
    """
    folder = Path(folder)
    optional = [p for kind, p in STATE_FILES.items() if kind != "trainer state"] if partial else []
    manifest, problem = _manifest(folder)
    if manifest is None:
        return problem
    if run is not None and manifest["run_id"] != run:
        return f"it belongs to another run ({manifest['run_id']!r}, this one is {run!r})"
    for name, meta in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            if any(fnmatch.fnmatch(name, pattern) for pattern in optional):
                continue
            return f"{name} is missing"
        if file.stat().st_size != meta.get("size") or _digest(file) != meta.get("sha256"):
            return f"{name} changed after it was saved (size or SHA-256 differs from {MANIFEST})"
    return None


def missing_state(folder: str | os.PathLike[str]) -> list[str]:
    """The kinds of :data:`STATE_FILES` that ``folder`` lacks (``[]`` when it can continue exactly)."""
    folder = Path(folder)
    return [kind for kind, pattern in STATE_FILES.items() if not any(folder.glob(pattern))]


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(output_dir: str | os.PathLike[str], run: str | None, *, partial: bool = False) -> Path:
    """The highest-step complete checkpoint of run ``run`` in ``output_dir``; later torn ones are skipped with a warning.

    Raises:
        CheckpointError: there is none; the message lists each directory and why it was skipped.
    """
    skipped = []
    for _step, folder in reversed(_checkpoints(Path(output_dir))):
        problem = checkpoint_problem(folder, run, partial=partial)
        if problem is None:
            for name, why in skipped:
                logger.warning("resume: skipping %s: %s", name, why)
            return folder
        skipped.append((folder.name, problem))
    listed = "; ".join(f"{n}: {why}" for n, why in skipped) or "no checkpoint-* directories"
    raise CheckpointError(f"--resume_from_checkpoint true found no complete checkpoint of this run in "
                          f"{str(output_dir)!r} ({listed})")


def run_id(output_dir: str | os.PathLike[str]) -> str | None:
    """The id of the run that owns ``output_dir``'s checkpoints, or ``None`` if none was recorded."""
    path = Path(output_dir) / RUN_FILE
    try:
        return str(json.loads(path.read_text())["run_id"])
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} is unreadable ({type(err).__name__}: {err}); "
                              "delete it to start a new run in this directory") from None


def new_run(output_dir: str | os.PathLike[str], overwrite: bool) -> str:
    """Start a run in ``output_dir``: refuse existing checkpoints unless ``overwrite``; record a new run id.

    Raises:
        CheckpointError: ``output_dir`` holds ``checkpoint-*`` directories and ``overwrite`` is False.
    """
    output_dir = Path(output_dir)
    existing = [p.name for _, p in _checkpoints(output_dir)]
    if existing and not overwrite:
        raise CheckpointError(
            f"output_dir {str(output_dir)!r} already holds checkpoints {existing[:5]} of another run; pass "
            "--resume_from_checkpoint true to continue it, --overwrite_output_dir true to start a new run there "
            "(its checkpoints are then kept, never rotated away), or choose another --output_dir"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex
    _write_atomic(output_dir / RUN_FILE, json.dumps({"run_id": run}) + "\n")
    return run


def rotate(output_dir: str | os.PathLike[str], run: str, limit: int | None, protect: tuple[str | None, ...] = ()) -> list[Path]:
    """Delete the oldest complete checkpoints of ``run`` beyond ``limit``; never another run's or a torn one.

    The newest checkpoint of the run and any path in ``protect`` (the best model) are kept.
    Returns the deleted directories.
    """
    if not limit or limit <= 0:
        return []
    ours = [p for _, p in _checkpoints(Path(output_dir)) if (m := _manifest(p)[0]) is not None and m["run_id"] == run]
    keep = {ours[-1].resolve()} if ours else set()
    keep |= {Path(p).resolve() for p in protect if p}
    deleted = []
    excess = len(ours) - max(limit, len(keep))
    for folder in ours:
        if excess <= 0:
            break
        if folder.resolve() not in keep:
            shutil.rmtree(folder)
            deleted.append(folder)
            excess -= 1
    return deleted


class SafeCheckpointsMixin:
    """``Trainer`` mixin: manifests on save, checked resume, run-scoped rotation.

    Put it before ``Trainer`` in the bases and give the two options as keyword arguments::

        class MyTrainer(SafeCheckpointsMixin, Trainer): ...
        MyTrainer(model=..., args=..., overwrite_output_dir=False, allow_partial_resume=False)

    Args (keyword, besides ``Trainer``'s):
        overwrite_output_dir: let a fresh run start in an ``output_dir`` holding checkpoints
            (they are kept: rotation never deletes another run's checkpoints).
        allow_partial_resume: resume from a checkpoint that lacks optimizer, scheduler or RNG
            state (those start fresh, with a warning) instead of refusing it.
    """

    def __init__(self, *args: Any, overwrite_output_dir: bool = False, allow_partial_resume: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overwrite_output_dir, self.allow_partial_resume = overwrite_output_dir, allow_partial_resume
        self._run_id: str | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train`` after choosing and checking the checkpoint (see the module docstring).

        Raises:
            CheckpointError: no complete checkpoint to resume from, a checkpoint missing
                optimizer / scheduler / RNG state (unless ``allow_partial_resume``), or a fresh
                run in an ``output_dir`` holding checkpoints (unless ``overwrite_output_dir``).
        """
        return super().train(self._resume_point(resume_from_checkpoint), *args, **kwargs)

    def _resume_point(self, resume: str | bool | None) -> str | None:
        out = self.args.output_dir
        if not resume:
            if self.args.should_save:
                self._run_id = new_run(out, self.overwrite_output_dir)
            else:  # the other processes refuse the same way, without writing
                existing = [p.name for _, p in _checkpoints(Path(out))]
                if existing and not self.overwrite_output_dir:
                    raise CheckpointError(f"output_dir {str(out)!r} already holds checkpoints {existing[:5]}")
            return None
        if resume is True:
            self._run_id = run_id(out)
            folder = last_complete_checkpoint(out, self._run_id, partial=self.allow_partial_resume)
        else:
            folder = Path(resume)
            if not folder.is_dir():
                raise CheckpointError(f"resume_from_checkpoint {str(resume)!r} is not a directory")
            problem = checkpoint_problem(folder, partial=self.allow_partial_resume)
            if problem is not None:
                raise CheckpointError(f"checkpoint {str(folder)!r} cannot be resumed from: {problem}")
            self._run_id = json.loads((folder / MANIFEST).read_text())["run_id"]
        self._check_state(folder)
        logger.info("resuming from %s", folder)
        return str(folder)

    def _check_state(self, folder: Path) -> None:
        if self.args.save_only_model or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # no optimizer files to expect here (DeepSpeed / FSDP keep their own)
        missing = missing_state(folder)
        if not missing:
            return
        text = f"checkpoint {str(folder)!r} has no {', '.join(missing)} state"
        if not self.allow_partial_resume:
            raise CheckpointError(f"{text}; resuming would silently start it afresh. Pass --allow_partial_resume true "
                                  "to continue anyway, or resume from a complete checkpoint")
        logger.warning("%s; continuing with fresh %s (allow_partial_resume)", text, ", ".join(missing))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # Trainer's rotation is off
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (RNG state) are written
        if not self.args.should_save:
            return
        if self._run_id is None:  # Trainer.train called around our train() (e.g. hyperparameter search)
            self._run_id = run_id(self.args.output_dir) or new_run(self.args.output_dir, overwrite=True)
        run_dir = Path(self._get_output_dir(trial=trial))
        write_manifest(run_dir / f"checkpoint-{self.state.global_step}", self._run_id, self.state.global_step)
        rotate(run_dir, self._run_id, limit, (self.state.best_model_checkpoint,))
