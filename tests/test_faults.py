"""Fault tests: the recipe killed with SIGKILL in the middle of a checkpoint save.

The kill moment is deterministic: a worker script wraps one of ``Trainer``'s save steps so
that, at the chosen step, the process sends itself ``SIGKILL`` after the weights are written
and before the optimizer (or the RNG state) is: a real ``kill -9`` half-way through a save,
not an exception the trainer could catch. ``--resume_from_checkpoint true`` must then skip the
torn checkpoint with a warning, resume from the last complete one, and end with the parameters
of an uninterrupted run; a foreign ``checkpoint-999`` in ``output_dir`` is neither resumed
from nor rotated away.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerCallback  # noqa: E402

from mixres.integrations.llava import train as recipe  # noqa: E402
from mixres.integrations.llava.checkpoints import MANIFEST, checkpoint_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
        "--dataloader_num_workers", "0", "--seed", "0"]
COMMON = ["--max_steps", "6", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "3",
          "--save_total_limit", "1", "--lr_scheduler_type", "cosine", "--warmup_steps", "1"]

WORKER = """
import os, signal, sys
from mixres.integrations.llava.trainer import LlavaTrainer
from mixres.integrations.llava.train import main

kill_step, method = int(sys.argv[1]), sys.argv[2]
original = getattr(LlavaTrainer, method)

def killed(self, *args, **kwargs):
    if self.state.global_step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no exception handlers
    return original(self, *args, **kwargs)

setattr(LlavaTrainer, method, killed)
main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return recipe.synthetic_data(tmp_path_factory.mktemp("data"), num_train=12, num_test=4, image_size=256, seed=0)


def _args(out, data):
    return ["--recipe", "tiny-stage2", "--output_dir", str(out), "--data_path", str(data["train"]), *FAST, *COMMON]


def _run(argv, callbacks=()):
    return recipe.train(*recipe.parse_args(argv), callbacks=callbacks)


class Steps(TrainerCallback):
    """The global steps this process trained (a resume from checkpoint-3 trains 4, 5, 6 only)."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


@pytest.mark.parametrize("method", ["_save_optimizer_and_scheduler", "_save_rng_state"])
def test_kill_9_during_a_save_then_resume_matches_an_uninterrupted_run(tmp_path, data, method, caplog):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "killed"
    res = subprocess.run([sys.executable, str(worker), "6", method, *_args(out, data)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    torn = out / "checkpoint-6"
    assert torn.is_dir() and not (torn / MANIFEST).exists()  # killed half-way: weights, no seal
    assert (torn / "model.safetensors").is_file()
    assert checkpoint_problem(out / "checkpoint-3") is None
    foreign = out / "checkpoint-999"  # someone else's, dropped in: never resumed from, never deleted
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"not ours")

    steps = Steps()
    with caplog.at_level(logging.WARNING, logger="mixres.integrations.llava.checkpoints"):
        resumed = _run([*_args(out, data), "--resume_from_checkpoint", "true"], [steps]).model
    assert steps.seen == [4, 5, 6]  # it did resume, from the complete checkpoint-3
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any("checkpoint-999" in m for m in skipped) and any("checkpoint-6" in m for m in skipped), skipped
    assert foreign.is_dir() and (foreign / "model.safetensors").read_bytes() == b"not ours"
    assert checkpoint_problem(out / "checkpoint-6") is None  # re-saved, sealed
    assert not (out / "checkpoint-3").exists()  # ours, rotated away (save_total_limit=1)

    whole = _run(_args(tmp_path / "whole", data)).model
    diffs = {n: (a - b).abs().max().item() for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters())}
    worst = max(diffs.values())
    print(f"\nkill -9 in {method} at step 6, resumed from checkpoint-3: max |param diff| = {worst:.3g}")
    (tmp_path / "diff.json").write_text(json.dumps({"method": method, "max_abs_diff": worst}))
    # same tolerance as test_recipe's resume test: one process, same ops; the only freedom is
    # the float summation order of the restored optimizer state's first use
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
