"""The main job on an embedded default: LLaVA-HR's two-stage recipe, end to end, on CPU.

``python -m mixres.integrations.llava.demo`` (``--quick`` for a smoke run):

1. draws the synthetic fine-detail VQA data from a seed (:mod:`.synthetic`; 256-px images with
   one 8-10 px item in a corner, a question about it, answers from a closed set);
2. trains the tiny LLaVA-HR (``llava-hr-tiny``: a 4-block ViT of width 32 + a tiny ConvNeXt,
   MR-Adapters, final fusion, a 2-layer Llama of width 64, all random) with the recipe of
   :mod:`.train`: stage 1 at 192 px (projector + final fusion), stage 2 at 256 px (everything);
3. trains the same recipe with the low-res pathway only (``llava-hr-tiny-lowres``: the ViT alone,
   reading 24 px);
4. answers the held-out questions greedily before training, after each stage, and prints
   exact-match accuracy, a sample answer and the wall time; writes ``results.json``.

Nothing is downloaded. Everything is random at the start, so what the tiny models learn in a
few CPU minutes is modest; the numbers printed are the ones measured, whatever they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainingArguments

from .train import RecipeArguments, build_model, evaluate, load_recipe, set_image_size, synthetic_data, train

__all__ = ["VARIANTS", "main"]

#: (name, encoder preset, stage-1 image size, stage-2 image size)
VARIANTS: tuple[tuple[str, str, int, int], ...] = (
    ("high-res", "llava-hr-tiny", 192, 256),
    ("low-res", "llava-hr-tiny-lowres", 96, 96),
)
# full run / --quick: synthetic samples, steps per stage, test questions
_FULL = dict(num_train=3000, num_test=150, steps=(60, 1000), batch_size=8)
_QUICK = dict(num_train=24, num_test=6, steps=(2, 2), batch_size=4)
_STAGE2_LR = 2e-3  # the tiny models start from random weights: a larger step than the 7B recipe's 2e-5


def _training_args(out: Path, stage: int, steps: int, batch_size: int, lr: float | None, seed: int = 0) -> TrainingArguments:
    values = {k: v for k, v in load_recipe(f"tiny-stage{stage}").items() if k in TrainingArguments.__dataclass_fields__}
    values.update(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, save_strategy="no",
                  logging_steps=max(1, steps // 4), disable_tqdm=True, report_to="none", seed=seed)
    if lr is not None:
        values["learning_rate"] = lr
    return TrainingArguments(**values)


def _recipe(stage: int, **overrides: Any) -> RecipeArguments:
    values = {k: v for k, v in load_recipe(f"tiny-stage{stage}").items() if k in RecipeArguments.__dataclass_fields__}
    return RecipeArguments(**dict(values, **overrides))


def _score(model: Any, tokenizer: Any, test: Path, template: str) -> dict[str, Any]:
    return evaluate(model, tokenizer, test, template=template)


def run_variant(name: str, preset: str, sizes: tuple[int, int], data: dict[str, Path], out: Path,
                steps: tuple[int, int], batch_size: int, seed: int = 0, **recipe: Any) -> dict[str, Any]:
    """Stage 1 then stage 2 for one encoder; accuracy before, after stage 1 and after stage 2.

    ``seed`` sets the initialisation and the data order of both stages (the data stay the same);
    ``recipe`` overrides recipe arguments of both stages (e.g. ``max_length``).
    """
    start = time.perf_counter()
    common = dict(vision_preset=preset, eval_data_path=None, vocab_data=str(data["train"]), **recipe)
    s1 = _recipe(1, image_size=sizes[0], data_path=str(data["train_stage1"]), **common)
    transformers.set_seed(seed)  # as train() seeds before it builds: this is the model stage 1 starts from
    model, tokenizer = build_model(s1)
    set_image_size(model, sizes[1])
    before = _score(model, tokenizer, data["test"], "vicuna_v1")
    tokens = {}
    stage1 = train(s1, _training_args(out / f"{name}-stage1", 1, steps[0], batch_size, None, seed))
    tokens["stage1"] = int(stage1.model.config.vision_config.num_image_tokens)
    after1 = _score(stage1.model, tokenizer, data["test"], "plain")
    s2 = _recipe(2, image_size=sizes[1], data_path=str(data["train"]), model=str(out / f"{name}-stage1"), **common)
    stage2 = train(s2, _training_args(out / f"{name}-stage2", 2, steps[1], batch_size, _STAGE2_LR, seed))
    tokens["stage2"] = int(stage2.model.config.vision_config.num_image_tokens)
    after2 = _score(stage2.model, stage2.processing_class, data["test"], "vicuna_v1")
    return {
        "preset": preset,
        "image_size": {"stage1": sizes[0], "stage2": sizes[1]},
        "vit_reads": list(stage2.model.model.vision_tower.encoder.vit_size(sizes[1])),
        "image_tokens": tokens,
        "parameters": sum(p.numel() for p in stage2.model.parameters()),
        "accuracy": {"before": before["accuracy"], "after_stage1": after1["accuracy"], "after_stage2": after2["accuracy"]},
        "final_loss": [e["loss"] for e in stage2.state.log_history if "loss" in e][-1:],
        "predictions": after2["predictions"],
        "train_time_s": round(time.perf_counter() - start, 1),
    }


def _table(runs: dict[str, dict[str, Any]]) -> str:
    tasks = sorted({t for r in runs.values() for t in r["accuracy"]["after_stage2"] if t != "all"})
    head = f"{'encoder':<9} {'ViT px':>6} {'tokens':>6} {'before':>7} {'stage 1':>8} {'stage 2':>8}  " + " ".join(f"{t:>6}" for t in tasks)
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        acc = r["accuracy"]
        per_task = " ".join(f"{acc['after_stage2'].get(t, 0.0):>6.0%}" for t in tasks)
        lines.append(f"{name:<9} {r['vit_reads'][0]:>6} {r['image_tokens']['stage2']:>6} {acc['before']['all']:>7.0%} "
                     f"{acc['after_stage1']['all']:>8.0%} {acc['after_stage2']['all']:>8.0%}  {per_task}")
    return "\n".join(lines)


def _sample(data: dict[str, Path], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    record = json.loads(data["test"].read_text())[0]
    return {"id": record["id"], "image": str(data["root"] / record["image"]),
            "question": record["conversations"][0]["value"].replace("<image>\n", ""),
            "truth": record["conversations"][1]["value"],
            "answer": {name: r["predictions"].get(record["id"], "") for name, r in runs.items()}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``<output_dir>/results.json``) the measured results."""
    parser = argparse.ArgumentParser(prog="python -m mixres.integrations.llava.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="mixres-demo", help="where data, models and results.json go")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few samples (smoke test)")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("STAGE1", "STAGE2"), help="optimizer steps per stage")
    args = parser.parse_args(argv)
    logging.getLogger("mixres.integrations.llava.train").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    settings = dict(_QUICK if args.quick else _FULL)
    if args.steps:
        settings["steps"] = tuple(args.steps)
    start = time.perf_counter()
    out = Path(args.output_dir)
    print(f"mixres demo: LLaVA-HR two-stage recipe on the tiny preset, CPU ({torch.get_num_threads()} threads)")
    data = synthetic_data(out / "data", num_train=settings["num_train"], num_test=settings["num_test"], image_size=256, seed=0)
    print(f"data: {settings['num_train']} training / {settings['num_test']} held-out questions in {data['root']}")
    runs = {}
    for name, preset, *sizes in VARIANTS:
        print(f"\n== {name} ({preset}): stage 1 {sizes[0]} px, {settings['steps'][0]} steps; "
              f"stage 2 {sizes[1]} px, {settings['steps'][1]} steps")
        runs[name] = run_variant(name, preset, tuple(sizes), data, out, settings["steps"], settings["batch_size"])
    wall = time.perf_counter() - start
    sample = _sample(data, runs)
    print("\nexact-match accuracy on held-out questions (greedy):\n" + _table(runs))
    print(f"\nsample: {sample['question']}  truth: {sample['truth']!r}  "
          + "  ".join(f"{k}: {v!r}" for k, v in sample["answer"].items()))
    print(f"wall time: {wall:.0f} s")
    results = {"runs": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in runs.items()},
               "sample": sample, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
               "wall_time_s": round(wall, 1), "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
