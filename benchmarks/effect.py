"""The effect at toy scale: does a mixture of resolutions read what low resolution loses?

``python -m benchmarks.effect`` trains the demo's three tiny LLaVA models
(:mod:`mixres.integrations.llava.demo`: one recipe, ``recipes/tiny-effect.json``, the same
data, steps and hyper-parameters for every variant; only the encoder preset differs) on the hatch
task (which way do the 3-4 px lines in the patch run? 4 answers, 25 % by chance) over several
seeds, and reports held-out exact-match accuracy (mean ± population std), visual tokens and
train time:

- **low-res**: the ViT alone reading 16 px (16 tokens);
- **MRA**: the same ViT + a tiny CNN reading the 128-px image through three MR-Adapters and the
  final fusion (16 tokens);
- **ViT 4x**: the ViT alone reading 32 px (64 tokens).

Then the cheap ablations of LLaVA-HR's Table 3 on MRA (fewer seeds, ``--ablation_seeds``): the
gate nonlinearity (tanh / sigmoid / none), the merge (sum / concat) and where the high-res
pathway enters (after blocks 1, 2, 3 / after block 3 only / the final fusion only / the
adapters without the final fusion). The ablation presets are registered here, in this process.

Everything starts from random weights and runs on CPU, so the numbers say what these tiny models
learn in a few hundred steps, nothing about pretrained ones. Writes
``benchmarks/results/effect.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from . import RESULTS, markdown_table, write_results

__all__ = ["ABLATIONS", "register_ablations", "main"]

_BASE = "llava-hr-tiny-128"
#: (name, change to the MRA preset): each one differs from MRA in one respect
ABLATIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("gate sigmoid", {"fusion": {"name": "mr_adapter", "gate_act": "sigmoid"}}),
    ("gate none", {"fusion": {"name": "mr_adapter", "gate": "none"}}),
    ("merge concat", {"fusion": {"name": "mr_adapter", "merge": "concat"}}),
    ("adapter after block 3 only", {"after_blocks": [3]}),
    ("final fusion only", {"after_blocks": []}),
    ("adapters only (no final fusion)", {"final_fusion": None}),
)


def _ablation_preset(change: dict[str, Any]) -> dict[str, Any]:
    import mixres

    config = mixres.ENCODERS.get_preset(_BASE)
    injections = config["injections"]
    if "fusion" in change:
        injections = [dict(i, fusion=change["fusion"]) for i in injections]
    if "after_blocks" in change:
        injections = [i for i in injections if i["after_block"] in change["after_blocks"]]
    config["injections"] = injections
    if "final_fusion" in change:
        config["final_fusion"] = change["final_fusion"]
    return config


def register_ablations() -> dict[str, str]:
    """Register one encoder preset per ablation (``effect-<name>``); returns name -> preset."""
    from mixres.registry import register_encoder_preset

    names = {}
    for name, change in ABLATIONS:
        preset = "effect-" + name.split(" (")[0].replace(" ", "-")
        register_encoder_preset(preset, _ablation_preset(change), override=True)
        names[name] = preset
    return names


def _summary(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r["accuracy"]["all"] for r in runs]
    return {
        "variant": name,
        "preset": f"`{runs[0]['preset']}`",
        "ViT px": runs[0]["vit_reads"][0],
        "tokens": runs[0]["image_tokens"],
        "accuracy": f"{statistics.mean(acc):.1%} ± {statistics.pstdev(acc):.1%}",
        "per seed": ", ".join(f"{a:.0%}" for a in acc),
        "train s": f"{statistics.mean(r['train_time_s'] for r in runs):.0f}",
        "params": f"{runs[0]['parameters']:,}",
        "accuracy_mean": statistics.mean(acc),
        "accuracy_std": statistics.pstdev(acc),
        "image_tokens": runs[0]["image_tokens"],
        "train_time_s": statistics.mean(r["train_time_s"] for r in runs),
    }


def _run_all(variants: list[tuple[str, str]], seeds: list[int], data: dict[str, Path], work: Path,
             overrides: dict[str, Any], raw: dict[str, list[dict[str, Any]]], save: Any) -> None:
    """Seed by seed (every variant of seed 0, then of seed 1, ...), saving after each run, so an
    interrupted benchmark still holds whole seeds."""
    from mixres.integrations.llava.demo import run_variant

    for seed in seeds:
        for name, preset in variants:
            run = run_variant(f"{name} s{seed}", preset, data, work, seed=seed, **overrides)
            for key in ("model", "tokenizer", "predictions"):
                run.pop(key)
            raw.setdefault(name, []).append(run)
            print(f"  {name}, seed {seed}: {run['accuracy']['all']:.1%} in {run['train_time_s']:.0f} s", flush=True)
            save()


def sample_figure(work: Path, data: dict[str, Path], out: Path, *, seed: int = 0, index: int = 1) -> Path:
    """``effect-sample.png`` from the saved seed-``seed`` checkpoints of the three variants: a test
    image, each model's answer, MRA's high-res contribution per token (:mod:`mixres.explain`)."""
    from mixres.integrations.llava.demo import VARIANTS
    from mixres.integrations.llava.demo_figures import sample_figure as figure
    from mixres.integrations.llava.evaluation import predict
    from mixres.integrations.llava.model import build_model
    from mixres.integrations.llava.recipe import RecipeArguments

    out.mkdir(parents=True, exist_ok=True)
    record = json.loads(Path(data["test"]).read_text())[index]
    runs = {}
    for name, _ in VARIANTS:
        model, tokenizer = build_model(RecipeArguments(model=str(work / f"{name} s{seed}".replace(" ", "-"))))
        answers = predict(model.eval(), tokenizer, [record], template="plain", image_folder=data["root"])
        runs[name] = {"model": model, "predictions": answers}
    return figure(runs, data, out / "effect-sample.png", index=index)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every variant for every seed, then the ablations; print and write the tables."""
    from mixres.integrations.llava.demo import DATA, RECIPE, VARIANTS, effect_data
    from mixres.integrations.llava.demo_figures import effect_plot
    from mixres.integrations.llava.recipe import load_recipe

    parser = argparse.ArgumentParser(prog="python -m benchmarks.effect", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation_seeds", type=int, nargs="*", default=[0], help="none: skip the ablations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see the demo's --threads)")
    parser.add_argument("--max_steps", type=int, help="override the recipe's steps for every variant (smoke runs)")
    parser.add_argument("--num_train", type=int, help="override the data's training samples (smoke runs)")
    parser.add_argument("--work_dir", default="/tmp/mixres-effect", help="data and checkpoints (not kept in results)")
    parser.add_argument("--out_dir", default=str(RESULTS))
    parser.add_argument("--sample_only", action="store_true", help="only redraw effect-sample.png from --work_dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("mixres.integrations.llava").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    work, out = Path(args.work_dir), Path(args.out_dir)
    spec = dict(DATA, **({"num_train": args.num_train} if args.num_train else {}))
    overrides = {"max_steps": args.max_steps} if args.max_steps else {}
    data = effect_data(work / "data", **spec)
    if args.sample_only:
        return {"sample": sample_figure(work, data, out, seed=args.seeds[0])}
    start = time.perf_counter()
    raw: dict[str, list[dict[str, Any]]] = {}
    names = register_ablations() if args.ablation_seeds else {}
    recipe = load_recipe(RECIPE)
    setup = (f"`python -m benchmarks.effect --seeds {' '.join(map(str, args.seeds))} --ablation_seeds "
             f"{' '.join(map(str, args.ablation_seeds))}`: recipe `{RECIPE}` for every variant "
             f"({overrides.get('max_steps', recipe['max_steps'])} steps, batch {recipe['per_device_train_batch_size']}, "
             f"lr {recipe['learning_rate']}, Adam beta2 {recipe['adam_beta2']}, LLM init range {recipe['llm_init_range']}, "
             f"template `{recipe['template']}`), {spec['num_train']} training / {spec['num_test']} held-out hatch "
             f"questions on {spec['image_size']}-px images; random init; CPU, {args.threads} torch thread(s); accuracy = "
             f"greedy exact match, mean ± population std over seeds; chance 25 %")
    columns = ["variant", "preset", "ViT px", "tokens", "accuracy", "per seed", "train s", "params"]

    def save(final: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = [_summary(name, raw[name]) for name, _ in VARIANTS if name in raw]
        ablation_rows = [_summary(name, raw[name]) for name in names if name in raw]
        if ablation_rows and "MRA" in raw:
            mra = [r for r in raw["MRA"] if r["seed"] in args.ablation_seeds]
            ablation_rows.insert(0, _summary("MRA (tanh, sum, blocks 1-3 + final)", mra))
        wall = round(time.perf_counter() - start, 1)
        md = "# The effect at toy scale\n\n" + setup + "\n\n" + markdown_table(rows, columns) + "\n"
        if ablation_rows:
            md += ("\n## Ablations (LLaVA-HR Table 3, on MRA; seeds "
                   f"{', '.join(map(str, args.ablation_seeds))})\n\n" + markdown_table(ablation_rows, columns) + "\n")
        md += f"\nTotal wall time {wall:.0f} s" + ("." if final else " so far (PARTIAL: the run was still going).") + "\n"
        write_results("effect", {"setup": setup, "complete": final, "rows": rows, "ablations": ablation_rows,
                                 "runs": raw, "wall_s": wall}, md, out)
        if rows:
            effect_plot({r["variant"]: r for r in rows}, out / "effect.png",
                        title=f"hatch task, {len(args.seeds)} seeds: accuracy vs visual tokens (bubble area: train time)")
        if final:
            print(md)
        return rows, ablation_rows

    _run_all(list(VARIANTS), args.seeds, data, work, overrides, raw, save)
    if names:
        _run_all(list(names.items()), args.ablation_seeds, data, work, overrides, raw, save)
    rows, ablation_rows = save(final=True)
    sample_figure(work, data, out, seed=args.seeds[0])
    return {"rows": rows, "ablations": ablation_rows}


if __name__ == "__main__":
    main()
