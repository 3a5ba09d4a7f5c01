"""Resume refuses what it cannot continue exactly: torn, changed, partial or foreign checkpoints.

One real checkpoint is written once (a 3-step tiny run); each case copies it, damages the
copy, and checks the refusal: :class:`~mixres.errors.CheckpointError` naming the checkpoint and
what is wrong. Most cases call :mod:`mixres.integrations.llava.checkpoints` directly; the ones
that need the trainer run the recipe (it refuses before training starts).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from mixres.errors import CheckpointError  # noqa: E402
from mixres.integrations.llava import train as recipe  # noqa: E402
from mixres.integrations.llava.checkpoints import (  # noqa: E402
    MANIFEST,
    RUN_FILE,
    checkpoint_problem,
    last_complete_checkpoint,
    new_run,
    rotate,
    run_id,
    write_manifest,
)

FAST = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
        "--dataloader_num_workers", "0", "--seed", "0", "--per_device_train_batch_size", "4",
        "--save_strategy", "steps", "--save_steps", "3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``output_dir`` of a finished 3-step run: ``checkpoint-3`` sealed, ``mixres_run.json``."""
    root = tmp_path_factory.mktemp("resume")
    data = recipe.synthetic_data(root / "data", num_train=12, num_test=0, image_size=256, seed=0)
    out = root / "run"
    recipe.train(*recipe.parse_args(_args(out, data["train"], "--max_steps", 3)))
    return {"out": out, "data": data["train"]}


def _args(out, data_path, *extra):
    return ["--recipe", "tiny-stage2", "--output_dir", str(out), "--data_path", str(data_path), *FAST, *map(str, extra)]


def _copy(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved["out"], out)
    return out


def _zero_weights(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    save_file({k: v.zero_() for k, v in state.items()}, ckpt / "model.safetensors", metadata={"format": "pt"})


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _other_run(ckpt: Path) -> None:
    m = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps(dict(m, run_id="someone-else")))


# (id, damage(out), call(out), fragment)
CK = "checkpoint-3"
CASES = [
    ("zeroed-weights", lambda o: _zero_weights(o / CK), lambda o: checkpoint_problem(o / CK), r"model\.safetensors changed after it was saved"),
    ("truncated-weights", lambda o: _truncate(o / CK / "model.safetensors"), lambda o: checkpoint_problem(o / CK), r"model\.safetensors changed"),
    ("no-optimizer", lambda o: (o / CK / "optimizer.pt").unlink(), lambda o: checkpoint_problem(o / CK), r"optimizer\.pt is missing"),
    ("no-scheduler", lambda o: (o / CK / "scheduler.pt").unlink(), lambda o: checkpoint_problem(o / CK), r"scheduler\.pt is missing"),
    ("no-rng", lambda o: (o / CK / "rng_state.pth").unlink(), lambda o: checkpoint_problem(o / CK), r"rng_state\.pth is missing"),
    ("no-trainer-state-even-partial", lambda o: (o / CK / "trainer_state.json").unlink(), lambda o: checkpoint_problem(o / CK, partial=True), r"trainer_state\.json is missing"),
    ("no-manifest", lambda o: (o / CK / MANIFEST).unlink(), lambda o: checkpoint_problem(o / CK), r"no mixres_checkpoint\.json"),
    ("manifest-not-json", lambda o: (o / CK / MANIFEST).write_text("{torn"), lambda o: checkpoint_problem(o / CK), r"mixres_checkpoint\.json is unreadable \(JSONDecodeError"),
    ("manifest-no-files", lambda o: (o / CK / MANIFEST).write_text('{"run_id": "x"}'), lambda o: checkpoint_problem(o / CK), r"unreadable \(KeyError: 'files'"),
    ("another-run", lambda o: _other_run(o / CK), lambda o: checkpoint_problem(o / CK, run_id(o)), r"belongs to another run \('someone-else'"),
]


@pytest.mark.parametrize("damage, call, fragment", [pytest.param(d, c, f, id=i) for i, d, c, f in CASES])
def test_damaged_checkpoint_is_named(saved, tmp_path, damage, call, fragment):
    out = _copy(saved, tmp_path)
    assert checkpoint_problem(out / CK, run_id(out)) is None  # the copy is complete until damaged
    damage(out)
    problem = call(out)
    assert problem is not None and re.search(fragment, problem), problem


RAISING = [
    ("resume-nothing-complete", lambda o: (o / CK / MANIFEST).unlink(), lambda o: last_complete_checkpoint(o, run_id(o)), r"found no complete checkpoint .*checkpoint-3: no mixres_checkpoint\.json"),
    ("resume-empty-dir", lambda o: shutil.rmtree(o / CK), lambda o: last_complete_checkpoint(o, run_id(o)), r"no checkpoint-\* directories"),
    ("fresh-run-over-checkpoints", lambda o: None, lambda o: new_run(o, overwrite=False), r"already holds checkpoints \['checkpoint-3'\] of another run"),
    ("run-file-corrupt", lambda o: (o / RUN_FILE).write_text("[1,"), lambda o: run_id(o), r"mixres_run\.json' is unreadable"),
]


@pytest.mark.parametrize("damage, call, fragment", [pytest.param(d, c, f, id=i) for i, d, c, f in RAISING])
def test_refused(saved, tmp_path, damage, call, fragment):
    out = _copy(saved, tmp_path)
    damage(out)
    with pytest.raises(CheckpointError) as info:
        call(out)
    assert re.search(fragment, str(info.value)), str(info.value)


def test_partial_state_is_tolerated_only_when_asked(saved, tmp_path):
    out = _copy(saved, tmp_path)
    (out / CK / "optimizer.pt").unlink()
    assert checkpoint_problem(out / CK, partial=True) is None


def test_the_recipe_refuses_and_continues_when_told(saved, tmp_path):
    """Through the trainer: a fresh run over checkpoints, a partial checkpoint, then --allow_partial_resume."""
    out = _copy(saved, tmp_path)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \['checkpoint-3'\].*--overwrite_output_dir true"):
        recipe.train(*recipe.parse_args(_args(out, saved["data"], "--max_steps", 3)))
    (out / CK / "optimizer.pt").unlink()
    write_manifest(out / CK, run_id(out), 3)  # a sealed checkpoint saved without optimizer state
    resume = ["--resume_from_checkpoint", str(out / CK), "--max_steps", 4]
    with pytest.raises(CheckpointError, match=r"checkpoint-3' has no optimizer state; resuming would silently start it afresh"):
        recipe.train(*recipe.parse_args(_args(out, saved["data"], *resume)))
    trainer = recipe.train(*recipe.parse_args(_args(out, saved["data"], *resume, "--allow_partial_resume", "true")))
    assert trainer.state.global_step == 4


def test_rotation_deletes_only_this_runs_complete_checkpoints(saved, tmp_path):
    out = _copy(saved, tmp_path)
    run = run_id(out)
    for step in (6, 9):
        shutil.copytree(out / CK, out / f"checkpoint-{step}")
        write_manifest(out / f"checkpoint-{step}", run, step)
    shutil.copytree(out / CK, out / "checkpoint-1")
    _other_run(out / "checkpoint-1")  # another run's, older than ours
    (out / "checkpoint-999").mkdir()  # unsealed: torn or foreign
    deleted = rotate(out, run, limit=1)
    assert sorted(p.name for p in deleted) == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-9", "checkpoint-999"]


@pytest.mark.parametrize("name, text, fragment", [
    ("r.json", '{"stage": 2,}', r"r\.json' is not valid JSON: .* line 1 column 13"),
    ("r.yaml", "stage: [2", r"r\.yaml' is not valid YAML"),
    ("r.json", "[1, 2]", r"r\.json' has to hold a mapping"),
])
def test_recipe_files_name_themselves(tmp_path, name, text, fragment):
    (tmp_path / name).write_text(text)
    with pytest.raises(recipe.RecipeError, match=fragment):
        recipe.load_recipe(tmp_path / name)


def test_train_cli_is_one_line_and_status_2(tmp_path, capsys):
    assert recipe.cli(["--recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: error: recipe 'no-such-recipe' is neither a file")
    with pytest.raises(recipe.RecipeError):
        recipe.cli(["--recipe", "no-such-recipe", "--debug"])
