"""mixres eval: the recipe's trained tiny model scores the same through the CLI as in the recipe."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from mixres.cli import main  # noqa: E402
from mixres.errors import MixresError  # noqa: E402
from mixres.integrations.llava import train as recipe  # noqa: E402
from mixres.integrations.llava.evaluation import read_questions  # noqa: E402

FAST = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
        "--logging_steps", "1", "--dataloader_num_workers", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny stage-2 recipe overfitted on 8 samples for 30 steps; its own evaluate writes eval.json."""
    root = tmp_path_factory.mktemp("eval")
    data = recipe.synthetic_data(root / "data", num_train=24, num_test=4, image_size=256, seed=0)
    records = [r for r in json.loads(data["train"].read_text()) if r.get("image")][:8]
    batch = data["root"] / "batch.json"
    batch.write_text(json.dumps(records))
    out = root / "model"
    argv = ["--recipe", "tiny-stage2", "--output_dir", str(out), "--data_path", str(batch), "--eval_data_path",
            str(batch), "--max_steps", "30", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
            "--lr_scheduler_type", "constant", "--warmup_steps", "0", *FAST]
    recipe.train(*recipe.parse_args(argv))
    return out, batch, records


def test_cli_accuracy_equals_the_recipe_evaluate(trained, capsys):
    out, batch, records = trained
    recipe_scores = json.loads((out / "eval.json").read_text())
    assert main(["eval", "--model", str(out), "--data", str(batch), "--metric", "exact", "--no-progress",
                 "--out", str(out / "cli")]) == 0
    report = json.loads((out / "cli.json").read_text())
    assert {k: v["score"] for k, v in report["scores"].items()} == recipe_scores["accuracy"]
    assert {q["id"]: q["answer"] for q in report["questions"]} == recipe_scores["predictions"]
    assert report["scores"]["all"]["count"] == len(records)
    assert report["scores"]["all"]["score"] > 0  # it learned something, so the equality is not 0 == 0
    md = (out / "cli.md").read_text()
    assert "| all | 8 |" in md and "| question type | questions | exact |" in md


def test_question_rows_jsonl_and_vqa_metric(trained, tmp_path):
    out, batch, records = trained
    recipe_scores = json.loads((out / "eval.json").read_text())
    rows = [{"question_id": r["id"], "image": str(batch.parent / r["image"]),
             "text": r["conversations"][0]["value"].replace("<image>", "").strip(),
             "answers": [r["conversations"][1]["value"]] * 10, "question_type": r["meta"]["task"]} for r in records]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["eval", "--model", str(out), "--data", str(path), "--metric", "vqa", "--no-progress",
                 "--batch-size", "3", "--out", str(tmp_path / "vqa")]) == 0
    report = json.loads((tmp_path / "vqa.json").read_text())
    # ten identical references: VQA accuracy is 1 exactly when the normalised answers agree
    answers = {q["id"]: q["answer"] for q in report["questions"]}
    assert answers == recipe_scores["predictions"]  # the same answers with another batch size and prompt source
    assert report["scores"]["all"]["score"] == pytest.approx(recipe_scores["accuracy"]["all"], abs=1e-12)


def test_read_questions_formats_and_errors(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"data": [{"question_id": 7, "image_id": "abc", "question": "what?",
                                          "answers": [{"answer": "x"}, {"answer": "y"}], "answer_type": "other"}]}))
    (q,) = read_questions(path)
    assert (q.id, q.image, q.text, q.answers, q.type) == ("7", "abc.jpg", "what?", ("x", "y"), "other")
    path.write_text(json.dumps([{"question_id": 1, "text": "q"}]))
    with pytest.raises(MixresError, match="has no 'answers' or 'answer'"):
        read_questions(path)
    with pytest.raises(MixresError, match="does not exist"):
        read_questions(tmp_path / "missing.json")
    assert main(["eval", "--model", str(tmp_path), "--data", str(path), "--metric", "exact"]) != 0


@pytest.mark.parametrize("name, payload, fragment", [
    ("q.json", b'[{"question_id": 1,', "q.json' is not valid JSON at line 1 column"),
    ("q.jsonl", b'{"question_id": 1, "text": "a", "answer": "b"}\n\n{"question_id": 2\n', "q.jsonl' is not valid JSON at line 3"),
    ("q.json", b"\xff\xfe[]", "q.json' is not UTF-8 text"),
    ("q.json", b"", "holds no questions"),
])
def test_unreadable_question_files_are_named_with_the_line(tmp_path, name, payload, fragment):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(MixresError, match=re.escape(fragment)):
        read_questions(path)


TASK_UTILS = '''
from PIL import Image

from mixres.scoring import exact_match


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answer"])}
'''

TASK_YAML = '''task: mixres_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''


def _lmms_eval_ready(cwd) -> str | None:
    """None when lmms-eval can run here, else why not."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("lmms_eval") is None:
        return "lmms-eval is not installed (pip install 'mixres[lmms]')"
    if importlib.util.find_spec("filelock._api") is None:
        return "lmms-eval 0.7.x imports filelock._api, which filelock 4 removed: pip install 'filelock<4'"
    # asked from outside the source tree, as lmms-eval will run: a stale mixres.egg-info there hides it
    code = "from importlib.metadata import entry_points; print([e.value for e in entry_points().select(group='lmms_eval.models')])"
    found = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True).stdout
    if "mixres.integrations.lmms_eval:manifests" not in found:
        return "the installed mixres metadata lacks the lmms_eval.models entry point: reinstall mixres (pip install -e .)"
    return None


def test_lmms_eval_plugin_runs_a_local_task_end_to_end(request, tmp_path):
    """`python -m lmms_eval --model mixres` on a local JSON-lines task: the same score as mixres eval."""
    import os
    import subprocess
    import sys

    reason = _lmms_eval_ready(tmp_path)
    if reason:
        pytest.skip(reason)
    out, batch, records = request.getfixturevalue("trained")
    rows = [{"question_id": r["id"], "image": str(batch.parent / r["image"]), "answer": r["conversations"][1]["value"],
             "question": r["conversations"][0]["value"].replace("<image>", "").strip()} for r in records]
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "mixres_local_vqa.yaml").write_text(TASK_YAML.format(data=data))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mixres", "--model_args", f"pretrained={out}", "--batch_size", "4",
           "--tasks", "mixres_local_vqa", "--include_path", str(tasks), "--output_path", str(tmp_path / "results")]
    # run outside the source tree: a stale mixres.egg-info there would hide the entry point
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "Error during evaluation" not in log, log[-3000:]  # lmms-eval exits 0 on errors
    (found,) = (tmp_path / "results").rglob("*_results.json")
    score = json.loads(found.read_text())["results"]["mixres_local_vqa"]["exact_match,none"]
    assert main(["eval", "--model", str(out), "--data", str(data), "--metric", "exact", "--max-new-tokens", "6",
                 "--no-progress", "--out", str(tmp_path / "ours")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["scores"]["all"]["score"]
    assert score == pytest.approx(ours, abs=1e-12) and score > 0
