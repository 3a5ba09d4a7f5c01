"""The effect at toy scale: does reading more pixels help, and at what cost in tokens?

``python -m benchmarks.effect`` trains three tiny LLaVA-HR-style models with the same two-stage
recipe (:mod:`mixres.integrations.llava.demo`, HF Trainer, CPU) on the seeded fine-detail
dataset (:mod:`mixres.integrations.llava.synthetic`) for the same number of steps, over several
seeds, and reports held-out exact-match accuracy (mean and spread), visual tokens and train time:

- **low-res only** (``llava-hr-tiny-lowres``): the tiny ViT reading 24 px, 36 tokens;
- **single high-res ViT** (``llava-hr-tiny-vit-hr``): the same ViT reading 64 px, 256 tokens
  (4x ``llava-hr-tiny``'s);
- **MRA** (``llava-hr-tiny``): the ViT reading 32 px (64 tokens) + the tiny ConvNeXt reading the
  256-px image through three MR-Adapters and the final fusion.

Everything starts from random weights, so the numbers say what these tiny models learn in a
few CPU minutes, nothing about pretrained ones. Writes ``benchmarks/results/effect.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import transformers

from . import markdown_table, write_results

__all__ = ["VARIANTS", "main"]

#: (name, encoder preset, stage-1 image size, stage-2 image size)
VARIANTS: tuple[tuple[str, str, int, int], ...] = (
    ("low-res only", "llava-hr-tiny-lowres", 96, 96),
    ("single high-res ViT", "llava-hr-tiny-vit-hr", 256, 256),
    ("MRA", "llava-hr-tiny", 192, 256),
)


def _summary(name: str, preset: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r["accuracy"]["after_stage2"]["all"] for r in runs]
    before = [r["accuracy"]["before"]["all"] for r in runs]
    tasks = sorted({t for r in runs for t in r["accuracy"]["after_stage2"] if t != "all"})
    return {
        "encoder": name,
        "preset": preset,
        "ViT px": runs[0]["vit_reads"][0],
        "tokens": runs[0]["image_tokens"]["stage2"],
        "params": runs[0]["parameters"],
        "accuracy": f"{statistics.mean(acc):.1%} ± {statistics.pstdev(acc):.1%}",
        "accuracy_mean": statistics.mean(acc),
        "accuracy_std": statistics.pstdev(acc),
        "per seed": ", ".join(f"{a:.0%}" for a in acc),
        "before": f"{statistics.mean(before):.0%}",
        **{t: f"{statistics.mean(r['accuracy']['after_stage2'].get(t, 0.0) for r in runs):.0%}" for t in tasks},
        "train s": f"{statistics.mean(r['train_time_s'] for r in runs):.0f}",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every variant for every seed; print and write the table."""
    from mixres.integrations.llava.demo import run_variant
    from mixres.integrations.llava.train import synthetic_data

    parser = argparse.ArgumentParser(prog="python -m benchmarks.effect", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs=2, default=[60, 600], metavar=("STAGE1", "STAGE2"))
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=384, help="room for 256 image tokens + the text")
    parser.add_argument("--work_dir", default="/tmp/mixres-effect", help="data and checkpoints (not kept in results)")
    args = parser.parse_args(argv)
    logging.getLogger("mixres.integrations.llava.train").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    work = Path(args.work_dir)
    data = synthetic_data(work / "data", num_train=args.num_train, num_test=args.num_test, image_size=256, seed=0)
    start = time.perf_counter()
    rows, raw = [], {}
    for name, preset, *sizes in VARIANTS:
        runs = []
        for seed in args.seeds:
            print(f"{name} ({preset}), seed {seed} ...", flush=True)
            run = run_variant(f"{preset}-s{seed}", preset, tuple(sizes), data, work, tuple(args.steps), args.batch_size, seed,
                              max_length=args.max_length)
            run.pop("predictions")
            runs.append(run)
        raw[name] = runs
        rows.append(_summary(name, preset, runs))
    columns = [c for c in rows[0] if c not in ("preset", "accuracy_mean", "accuracy_std")]
    setup = (f"`python -m benchmarks.effect --seeds {' '.join(map(str, args.seeds))} --steps {args.steps[0]} {args.steps[1]}` "
             f"({args.num_train} training / {args.num_test} held-out synthetic questions, 256-px images with 8-10 px "
             f"details; stage 1 {args.steps[0]} steps, stage 2 {args.steps[1]} steps, batch {args.batch_size}; CPU; "
             f"random init; accuracy = greedy exact match after stage 2, mean ± spread (population std) over seeds; "
             f"chance is about 1/#answers of each task)")
    md = "# The effect at toy scale\n\n" + setup + "\n\n" + markdown_table(rows, columns) + "\n"
    print(md)
    write_results("effect", {"setup": setup, "rows": rows, "runs": raw, "wall_s": round(time.perf_counter() - start, 1)}, md)
    return {"rows": rows}


if __name__ == "__main__":
    main()
