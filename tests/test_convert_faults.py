"""Faults: ``mixres convert`` killed with SIGKILL at random points, bad destinations, bad files.

The kill test runs the CLI's ``main`` in children forked from a process that has imported
everything (see :class:`Zygote`), so each trial costs one conversion, not an interpreter start;
the test kills the child after a random delay spread over the whole conversion (measured first). After every kill
the destination must be absent, the old conversion or the new one, complete and loading to the
expected weights; the only other thing allowed is the hidden temporary directory of the dead
writer, which the next write (here :func:`mixres._atomic.recover`) removes.
"""

import json
import os
import random
import shutil
import signal
import stat
import time

import pytest
import torch

from mixres import WeightsError
from mixres._atomic import recover
from mixres.cli import main
from mixres.convert import load_converted, read_checkpoint, read_json
from mixres.errors import MixresError

pytest.importorskip("timm")
from release_checkpoint import mixres_config, write_release  # noqa: E402

TRIALS = 20


def _convert(src, dst, preset, *extra):
    return main(["convert", "llava-hr", str(src), str(dst), "--preset", str(preset), *extra])


# A "zygote": a process that imports mixres, torch, safetensors, timm and transformers once and
# runs no tensor op (so no thread pool exists yet and fork is safe), then forks one child per
# request; each child runs the console script's own `mixres.cli.main(argv)`.
_ZYGOTE = """
import json, os, signal, sys
import mixres, mixres.cli, mixres.convert, safetensors.torch, timm, timm.models.convnext  # noqa: F401
import mixres.pathways.hf, mixres.pathways.timm, transformers.models.clip.modeling_clip  # noqa: F401
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            sys.stdout.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the pipe carries pids only
            code = mixres.cli.main(json.loads(line))
        finally:
            os._exit(code)
    print(pid, flush=True)
"""


class Zygote:
    def __init__(self):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_ready(self):  # its imports ran while the test prepared the checkpoints
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv) -> int:
        self.proc.stdin.write(json.dumps([str(a) for a in argv]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    @staticmethod
    def wait(pid, timeout=120.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.005)
        raise TimeoutError(f"child {pid} still running after {timeout} s")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def _wait_for(condition, pid, timeout=60.0):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.0005)


def _weights(path):
    encoder, projector = load_converted(path)
    return {**{f"e.{k}": v for k, v in encoder.state_dict().items()}, **{f"p.{k}": v for k, v in projector.state_dict().items()}}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork and SIGKILL")
def test_kill_9_at_random_points_never_leaves_a_wrong_or_stray_state(tmp_path):
    zygote = Zygote()
    (tmp_path / "preset.json").write_text(json.dumps(mixres_config("7b-1024")))
    write_release(tmp_path / "new", "7b-1024", seed=1)
    write_release(tmp_path / "old", "7b-1024", seed=2)
    preset = tmp_path / "preset.json"
    work = tmp_path / "work"
    work.mkdir()
    assert _convert(tmp_path / "new", tmp_path / "ref-new", preset) == 0
    assert _convert(tmp_path / "old", tmp_path / "ref-old", preset) == 0
    expected = {"new": _weights(tmp_path / "ref-new"), "old": _weights(tmp_path / "ref-old")}
    argv = lambda dst, *extra: ["convert", "llava-hr", tmp_path / "new", dst, "--preset", preset, *extra]  # noqa: E731
    zygote.wait_ready()
    start = time.monotonic()
    zygote.wait(zygote.start(argv(tmp_path / "timing")))
    duration = time.monotonic() - start
    assert _same(_weights(tmp_path / "timing"), expected["new"])
    rng = random.Random(0)
    outcomes, torn = [], 0
    for trial in range(TRIALS):
        dst, overwrite = work / f"out{trial}", trial % 2 == 1
        if overwrite:  # a complete earlier conversion is being replaced
            shutil.copytree(tmp_path / "ref-old", dst)
        pid = zygote.start(argv(dst, *(["--overwrite"] if overwrite else [])))
        if trial % 4 < 2:  # anywhere in the run, past its end too (some finish)
            time.sleep(rng.uniform(0, 1.5 * duration))
        else:  # inside the write: once its temporary directory exists, within the next 50 ms
            tmp_prefix = f".{dst.name}.mixres-tmp-"
            _wait_for(lambda: any(p.name.startswith(tmp_prefix) for p in work.iterdir()), pid)  # noqa: B023
            time.sleep(rng.uniform(0, 0.05))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it had finished
            pass
        zygote.wait(pid)
        leftovers = [p.name for p in work.iterdir() if p.name.startswith(f".{dst.name}.")]
        assert all(f".mixres-tmp-{pid}-" in n or f".mixres-old-{pid}-" in n for n in leftovers), leftovers
        torn += bool(leftovers)
        recover(dst)
        assert not [p for p in work.iterdir() if p.name.startswith(".")], "stray files after recovery"
        if dst.exists():  # whatever is there is complete and is exactly one of the two conversions
            got = _weights(dst)
            state = "new" if _same(got, expected["new"]) else "old" if overwrite and _same(got, expected["old"]) else "wrong"
        else:
            state = "absent"
        assert state != "wrong" and not (overwrite and state == "absent"), (trial, state)
        outcomes.append(state)
    zygote.close()
    # the delays spread over the whole run, so both ends are hit (measured: see the closing note)
    print(f"conversion {duration:.2f} s; outcomes {dict((o, outcomes.count(o)) for o in set(outcomes))}; "
          f"{torn} kills left a temporary directory")
    assert "absent" in outcomes or "old" in outcomes


def test_bad_destinations_are_refused_before_reading(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    missing_src = tmp_path / "nowhere"
    assert main(["convert", "llava-hr", str(missing_src), str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err  # the destination is checked first
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["convert", "llava-hr", str(missing_src), str(tmp_path / "full"), "--overwrite"]) == 2
    assert "no mixres_config.json, so it is not an earlier output" in capsys.readouterr().err


def test_read_only_parent_is_refused(tmp_path, capsys):
    missing_src = tmp_path / "nowhere"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("running as root")
        assert main(["convert", "llava-hr", str(missing_src), str(locked / "out")]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(stat.S_IRWXU)


def test_output_files_share_permissions_and_no_temporary_is_left(tmp_path):
    write_release(tmp_path / "src", "7b-1024")
    (tmp_path / "preset.json").write_text(json.dumps(mixres_config("7b-1024")))
    (tmp_path / "out").mkdir()  # an empty directory is a fine destination
    assert _convert(tmp_path / "src", tmp_path / "out", tmp_path / "preset.json") == 0
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert len(modes) == 1 and modes <= {0o666 & ~_umask()}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "preset.json", "src"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _corrupt(tmp_path, how):
    write_release(tmp_path / "src", "7b-1024", fmt="bin" if how in ("bin-truncated", "bin-objects") else "safetensors")
    name = "pytorch_model.bin" if how.startswith("bin") else "model.safetensors"
    file = tmp_path / "src" / name
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        file.write_bytes(b"\x00garbage" * 64)
    elif how == "bin-truncated":
        file.write_bytes(data[: len(data) // 3])
    elif how == "bin-objects":
        torch.save({"model.vision_tower.x": torch.zeros(1), "epoch": 3}, file)
    return file


@pytest.mark.parametrize("how, fragment", [
    ("truncated", "cannot be read as safetensors"),
    ("garbage", "cannot be read as safetensors"),
    ("bin-truncated", "cannot be read as a PyTorch weights-only checkpoint"),
    ("bin-objects", "holds 'epoch' = a int; weight files hold only tensors"),
])
def test_unreadable_weight_files_are_a_weights_error_naming_the_file(tmp_path, how, fragment):
    file = _corrupt(tmp_path, how)
    with pytest.raises(WeightsError, match=fragment) as info:
        read_checkpoint(tmp_path / "src")
    assert str(file) in str(info.value)


def test_json_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{'single': quotes}")
    with pytest.raises(WeightsError, match=r"converted config '.*bad.json' is not valid JSON: .* line 1"):
        read_json(tmp_path / "bad.json", "converted config")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match="has to hold a JSON object, but holds a list"):
        read_json(tmp_path / "list.json")
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "mixres_config.json").write_text("{")
    with pytest.raises(WeightsError, match="converted config .*mixres_config.json' is not valid JSON"):
        load_converted(tmp_path / "conv")


def test_only_weight_files_are_read(tmp_path):
    (tmp_path / "training_args.bin").write_bytes(b"not a tensor file")
    (tmp_path / "optimizer.pt").write_bytes(b"nor this")
    with pytest.raises(WeightsError, match=r"no weight file in .*it holds \['optimizer.pt', 'training_args.bin'\]"):
        read_checkpoint(tmp_path)
    with pytest.raises(MixresError, match="does not exist"):
        read_checkpoint(tmp_path / "missing")


def test_unwritable_parent_is_refused_first(tmp_path, monkeypatch, capsys):
    """As root every directory is writable, so the permission answer is stubbed (os.access is
    what check_destination asks; a real read-only parent is tested above when not root)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    (tmp_path / "ro").mkdir()
    assert main(["convert", "llava-hr", str(tmp_path / "nowhere"), str(tmp_path / "ro" / "a" / "out")]) == 2
    assert f"{str(tmp_path / 'ro')!r} is not writable" in capsys.readouterr().err
    assert not (tmp_path / "ro" / "a").exists()  # nothing created before the refusal


def test_broken_release_config_is_named(tmp_path, capsys):
    write_release(tmp_path / "src", "7b-1024")
    (tmp_path / "src" / "config.json").write_text('{"input_image_size": 1024,,}')
    assert main(["convert", "llava-hr", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "release config" in err and "src/config.json' is not valid JSON" in err and "line 1" in err
