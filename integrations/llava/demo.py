"""The main job: does a mixture of resolutions read what low resolution loses? On CPU, from scratch.

``python -m mixres.integrations.llava.demo`` (``python -m mixres.demo``, ``make demo``;
``--quick`` for a smoke run) trains three tiny LLaVA models with **one recipe**
(``recipes/tiny-effect.json``: every hyper-parameter, the same for all of them) on the hatch task
of :mod:`.synthetic` (which way do the 3-4 px lines in the patch run? 4 answers, 25 % by chance)
and answers held-out questions greedily:

============  ================================  =====================================  ======
variant       encoder preset                    what it reads                          tokens
============  ================================  =====================================  ======
low-res       ``llava-hr-tiny-128-lowres``      the ViT at 16 px                       16
MRA           ``llava-hr-tiny-128``             the ViT at 16 px + a CNN at 128 px,    16
                                                three MR-Adapters and the final fusion
ViT 4x        ``llava-hr-tiny-128-vit4x``       the ViT alone at 32 px                 64
============  ================================  =====================================  ======

The three differ only in the encoder preset. Everything starts from random weights (a 4-block
ViT of width 32, a tiny ConvNeXt, a 2-layer Llama of width 64), nothing is downloaded, and one
stage trains everything: LLaVA-HR's stage 1 aligns *pretrained* parts, which these are not.
Prints a table (accuracy, per answer, visual tokens, train time) and writes to ``--output_dir``:
``results.json``, ``effect.png`` (accuracy vs visual tokens, bubble area = train time) and
``sample.png`` (a test image, its question, each model's answer and MRA's high-res contribution
per token, :mod:`mixres.explain`). The numbers printed are the ones measured, whatever they are.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainingArguments

from .recipe import RecipeArguments, load_recipe
from .synthetic import ORIENTATIONS, generate_dataset

__all__ = ["RECIPE", "DATA", "VARIANTS", "effect_data", "run_variant", "main"]

#: the one recipe every variant trains with (hyper-parameters live there, nowhere else)
RECIPE = "tiny-effect"
#: the data every variant sees
DATA: dict[str, Any] = dict(num_train=3000, num_test=200, image_size=128, seed=0)
#: (name, encoder preset)
VARIANTS: tuple[tuple[str, str], ...] = (
    ("low-res", "llava-hr-tiny-128-lowres"),
    ("MRA", "llava-hr-tiny-128"),
    ("ViT 4x", "llava-hr-tiny-128-vit4x"),
)
_QUICK = dict(num_train=32, num_test=8, max_steps=2)


def effect_data(root: str | Path, *, num_train: int, num_test: int, image_size: int = 128, seed: int = 0) -> dict[str, Path]:
    """Write the hatch data once (reused when the folder holds the same spec): ``{"root", "train", "test"}``."""
    root = Path(root)
    stamp, spec = root / "spec.json", {"kind": "hatch", "num_train": num_train, "num_test": num_test,
                                       "image_size": image_size, "seed": seed}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == spec):
        generate_dataset(root, num_train, num_test, image_size=image_size, seed=seed, kind="hatch", text_only_fraction=0.0)
        stamp.write_text(json.dumps(spec))
    return {"root": root, "train": root / "train.json", "test": root / "test.json"}


class _Progress(TrainerCallback):
    """A tqdm bar over the optimizer steps, the last logged loss beside it."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", leave=True, dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.close()


def _arguments(preset: str, data: dict[str, Path], out: Path, seed: int, **overrides: Any) -> tuple[RecipeArguments, TrainingArguments]:
    values = dict(load_recipe(RECIPE), vision_preset=preset, data_path=str(data["train"]), eval_data_path=None,
                  vocab_data=str(data["test"]), output_dir=str(out), seed=seed, disable_tqdm=True, **overrides)
    recipe = RecipeArguments(**{k: v for k, v in values.items() if k in RecipeArguments.__dataclass_fields__})
    training = TrainingArguments(**{k: v for k, v in values.items() if k in TrainingArguments.__dataclass_fields__})
    return recipe, training


def run_variant(name: str, preset: str, data: dict[str, Path], out: Path, *, seed: int = 0, progress: bool = True,
                **overrides: Any) -> dict[str, Any]:
    """Train ``preset`` with the recipe on ``data`` and score it on the held-out questions.

    Args:
        name: the variant's name (progress bar, output folder ``out / name``).
        preset: the encoder preset (the only thing that differs between variants).
        data: :func:`effect_data`'s paths.
        out: where the checkpoints go.
        seed: initialisation and data order.
        progress: show a progress bar.
        **overrides: recipe / training arguments replacing the recipe file's (e.g. ``max_steps``
            for a smoke run); the demo and the benchmark pass the same ones to every variant.

    Returns:
        ``accuracy`` (``{"all", "<answer>": ...}``), ``image_tokens``, ``vit_reads``, ``parameters``,
        ``train_time_s``, ``final_loss``, ``predictions`` and the trained ``model`` / ``tokenizer``.
    """
    from .evaluation import evaluate
    from .train import train

    recipe, training = _arguments(preset, data, out / name.replace(" ", "-"), seed, **overrides)
    callbacks = [_Progress(f"{name:<8}")] if progress else []
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its log dicts; the bar shows progress
        trainer = train(recipe, training, callbacks=callbacks)
    elapsed = time.perf_counter() - start
    model, tokenizer = trainer.model, trainer.processing_class
    scores = evaluate(model, tokenizer, data["test"], template=recipe.template)
    records = json.loads(Path(data["test"]).read_text())
    truth = {r["id"]: r["conversations"][1]["value"] for r in records}
    accuracy = {"all": scores["accuracy"]["all"]}
    for answer in ORIENTATIONS:
        ids = [i for i, t in truth.items() if t == answer]
        accuracy[answer] = sum(scores["predictions"].get(i, "").strip().lower() == answer for i in ids) / max(1, len(ids))
    encoder = model.model.vision_tower.encoder
    return {
        "preset": preset, "seed": seed, "accuracy": accuracy,
        "image_tokens": int(model.config.vision_config.num_image_tokens),
        "vit_reads": list(encoder.vit_size(recipe.image_size)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_time_s": round(elapsed, 1),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "predictions": scores["predictions"], "model": model, "tokenizer": tokenizer,
    }


def table(runs: dict[str, dict[str, Any]]) -> str:
    """The printed table: one row per variant."""
    head = f"{'variant':<8} {'ViT px':>6} {'tokens':>6} {'accuracy':>8}  " + " ".join(f"{a:>10}" for a in ORIENTATIONS) + f" {'train s':>8}"
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        acc = r["accuracy"]
        lines.append(f"{name:<8} {r['vit_reads'][0]:>6} {r['image_tokens']:>6} {acc['all']:>8.0%}  "
                     + " ".join(f"{acc[a]:>10.0%}" for a in ORIENTATIONS) + f" {r['train_time_s']:>8.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``<output_dir>/results.json``) the measured results."""

    parser = argparse.ArgumentParser(prog="python -m mixres.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="mixres-demo", help="where data, models, results and figures go")
    parser.add_argument("--quick", action="store_true", help="2 steps on a few samples (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: these tensors are tiny, and on a shared machine two "
                             "OpenMP threads spin-waiting on each other were 25x slower (12 s vs 0.5 s per MRA step)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet, level = logging.getLogger("mixres.integrations.llava"), logging.getLogger("mixres.integrations.llava").level
    quiet.setLevel(logging.ERROR)  # the recipe's plan and eval lines; set back at the end (main runs in tests too)
    try:
        return _run(args)
    finally:
        quiet.setLevel(level)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from .demo_figures import effect_plot, sample_figure

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Writing model shards"; our own bars are plain tqdm
    start, out = time.perf_counter(), Path(args.output_dir)
    spec = dict(DATA, **({k: _QUICK[k] for k in ("num_train", "num_test")} if args.quick else {}))
    overrides = {"max_steps": _QUICK["max_steps"]} if args.quick else {}
    recipe = load_recipe(RECIPE)
    print(f"mixres demo: which way do the 3-4 px lines run? ({len(ORIENTATIONS)} answers, chance 25 %)\n"
          f"recipe {RECIPE}: {overrides.get('max_steps', recipe['max_steps'])} steps, batch "
          f"{recipe['per_device_train_batch_size']}, lr {recipe['learning_rate']}, the same for every variant; "
          f"CPU, {torch.get_num_threads()} threads")
    data = effect_data(out / "data", **spec)
    print(f"data: {spec['num_train']} training / {spec['num_test']} held-out questions, {spec['image_size']}-px images")
    runs = {name: run_variant(name, preset, data, out, seed=args.seed, **overrides) for name, preset in VARIANTS}
    print("\nheld-out exact-match accuracy (greedy), overall and per true answer:\n" + table(runs))
    figures = [effect_plot(runs, out / "effect.png"), sample_figure(runs, data, out / "sample.png")]
    wall = time.perf_counter() - start
    results = {"runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("model", "tokenizer", "predictions")}
                        for k, v in runs.items()},
               "data": spec, "recipe": RECIPE, "overrides": overrides, "wall_time_s": round(wall, 1),
               "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwall time {wall:.0f} s; wrote {out / 'results.json'}, " + ", ".join(str(f) for f in figures))
    return results


if __name__ == "__main__":
    main()
