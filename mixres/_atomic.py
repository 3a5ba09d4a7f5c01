"""Write a directory of outputs as one unit: all of it or none of it.

:func:`atomic_directory` hands out a temporary directory in the destination's parent
(``.<name>.mixres-tmp-<pid>-*``, on the same file system so that ``rename(2)`` is atomic); when
the block ends without error every file is flushed to disk, given the same permissions
(``0o666`` less the umask; the directory ``0o777`` less the umask, as ``mkdir`` would) and the
directory is renamed onto the destination. On an error it is removed.

A process killed with ``SIGKILL`` cannot clean up: what it leaves is only a hidden
``.<name>.mixres-tmp-<pid>-*`` directory (never a half-written destination). The next write to
the same destination removes such leftovers of dead processes first. Replacing an existing
destination (``overwrite``) moves it aside (``.<name>.mixres-old-<pid>-*``), renames the new
one in and deletes the old; if the process dies between the two renames, the next write (or
:func:`recover`) puts the old one back.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MixresError

__all__ = ["check_destination", "atomic_directory", "recover"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _leftovers(dst: Path) -> list[tuple[str, int, Path]]:
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.mixres-(tmp|old)-(\d+)-")
    if not dst.parent.is_dir():
        return []
    found = []
    for entry in dst.parent.iterdir():
        match = pattern.match(entry.name)
        if match:
            found.append((match.group(1), int(match.group(2)), entry))
    return found


def recover(dst: str | Path) -> None:
    """Remove the temporary directories that dead writers left beside ``dst``; restore an old
    ``dst`` that a writer killed mid-replacement had moved aside."""
    dst = Path(dst).expanduser().absolute()
    for kind, pid, entry in _leftovers(dst):
        if _alive(pid) and pid != os.getpid():
            continue
        if kind == "old" and not dst.exists():
            os.rename(entry, dst)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def check_destination(dst: str | Path, *, overwrite: bool = False, marker: str | None = None) -> Path:
    """Validate an output directory before any work is done; return it as an absolute path.

    Args:
        dst: the directory to write.
        overwrite: allow replacing an existing non-empty directory.
        marker: a file every earlier output holds (e.g. ``mixres_config.json``); with
            ``overwrite``, a directory without it is refused (it is not ours to delete).

    Raises:
        MixresError: ``dst`` is a file; a non-empty directory without ``overwrite`` (or without
            ``marker``); or its parent is not a writable directory.
    """
    dst = Path(dst).expanduser().absolute()
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise MixresError(f"destination {str(dst)!r} exists and is not a directory; pass a directory path")
        if any(dst.iterdir()):
            if not overwrite:
                raise MixresError(f"destination {str(dst)!r} is not empty; pass a new path, or overwrite=True "
                                  "(--overwrite) to replace an earlier output")
            if marker is not None and not (dst / marker).is_file():
                raise MixresError(f"destination {str(dst)!r} holds files but no {marker}, so it is not an earlier output; "
                                  "refusing to replace it")
    ancestor = dst.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MixresError(f"cannot create {str(dst)!r}: {str(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MixresError(f"cannot write {str(dst)!r}: {str(ancestor)!r} is not writable (permission denied)")
    return dst


def _flush(directory: Path, file_mode: int) -> None:
    for entry in directory.iterdir():
        if entry.is_file():
            os.chmod(entry, file_mode)
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(dst: str | Path, *, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``dst`` in one rename.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "result"
        >>> with atomic_directory(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("a")
        >>> sorted(p.name for p in out.parent.iterdir()), (out / "a.txt").read_text()
        (['result'], 'a')

    Raises:
        MixresError: see :func:`check_destination`.
    """
    dst = check_destination(dst, overwrite=overwrite, marker=marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover(dst)
    mask = _umask()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.mixres-tmp-{os.getpid()}-", dir=dst.parent))
    try:
        os.chmod(tmp, 0o777 & ~mask)
        yield tmp
        _flush(tmp, 0o666 & ~mask)
        if dst.exists() and any(dst.iterdir()):  # overwrite: move the old one aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.mixres-old-{os.getpid()}-", dir=dst.parent))
            os.rename(dst, old)  # replaces the empty `old` placeholder
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)  # onto a missing or empty directory: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
