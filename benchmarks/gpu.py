"""The device script (one H100 / H200, about 8 minutes): sharded training parity and 7B speed.

``python -m benchmarks.gpu`` runs, with nothing downloaded:

1. **Training parity** (:func:`train_parity`): stage 2 of the tiny recipe (``tiny-stage2``,
   synthetic data, bf16) for ``--train-steps`` steps as plain DDP, under FSDP2 (accelerate,
   ``integrations/llava/fsdp.yaml``) and under DeepSpeed ZeRO-3 (``deepspeed/zero3.json``), each
   at world size 1 (ZeRO-3 and FSDP still partition and gather through their own code), and
   reports each engine's largest relative gap to DDP's loss curve. bf16 rounds at ~4e-3, so
   gaps of that order are expected; the fp32 CPU parity is a test (``tests/test_distributed.py``).
2. **Speed** (:func:`speed`), bf16, SDPA, random weights, a random-init ``LlamaForCausalLM`` of
   Llama-2-7B's shapes: LLaVA-HR-1024 (``llava-hr-7b-1024``, 1024 visual tokens) against
   LLaVA-1.5 (CLIP ViT-L/14, penultimate layer) at 336 / 672 / 1022 px and LLaVA-NeXT AnyRes-672
   (``llava-next-anyres-672`` on a 672-px image): vision-encoder time, prefill time
   (visual tokens + 64 text tokens), time to first token (their sum), generated tokens/s at
   batch 1 and 8 (encoder + ``generate`` of ``--new-tokens`` greedy tokens, end to end; the
   tokens/s the paper's speed column reports) and peak GPU memory, with ratios against
   LLaVA-1.5-1022 and AnyRes-672 measured in the same run.

Timings are medians over ``--repeats`` after ``--warmup`` runs, ``torch.cuda.synchronize``-d.
Writes ``benchmarks/results/gpu.{json,md}``. ``--dry-run`` runs the same code on the CPU with tiny
models (the speed rows) and 2 CPU processes over gloo (DDP, FSDP2 and ZeRO-3 through DeepSpeed's
CPU accelerator; ZeRO-3 is recorded as skipped when ``deepspeed`` is not installed); its numbers
mean nothing and nothing is written. DeepSpeed JIT-builds its ops with the device's nvcc; on a machine
without it, bring a wheel (``pip wheel --no-deps deepspeed``: pure Python).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main", "bench", "train_parity", "speed"]

ROOT = Path(__file__).resolve().parents[1]
LLAVA = ROOT / "integrations" / "llava"


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: Any, warmup: int, repeats: int) -> float:
    """Median wall time (s) of ``fn()`` under ``inference_mode``, device synchronised."""
    import torch

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- 1. training parity ------------------------------------------------------------------------


def _launchers(dry: bool) -> dict[str, list[str] | str]:
    py = sys.executable
    procs = "2" if dry else "1"
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", procs]
    fsdp = [py, "-m", "accelerate.commands.launch", "--config_file", str(LLAVA / ("fsdp-cpu.yaml" if dry else "fsdp.yaml")),
            "--num_processes", procs, *([] if dry else ["--mixed_precision", "bf16"])]
    try:
        import deepspeed  # noqa: F401  (only whether it is there: the run imports it itself)
    except ImportError:
        zero3: list[str] | str = "deepspeed is not installed (pip install deepspeed)"
    else:
        zero3 = [*torchrun]
    return {"ddp": torchrun, "fsdp": fsdp, "zero3": zero3}


def train_parity(steps: int, dry: bool, workdir: Path) -> dict[str, Any]:
    """Stage 2 of ``tiny-stage2`` under DDP, FSDP2 and ZeRO-3; loss curves and gaps to DDP."""
    device = ["--use_cpu", "true"] if dry else ["--use_cpu", "false", "--bf16", "true"]
    common = ["--recipe", "tiny-stage2", *device, "--max_steps", str(steps), "--per_device_train_batch_size", "8",
              "--synthetic_samples", "64", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
              "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0"]
    gloo = ["--ddp_backend", "gloo"] if dry else []
    extra = {"ddp": gloo, "fsdp": [], "zero3": [*gloo, "--deepspeed", str(LLAVA / "deepspeed" / "zero3.json")]}
    env = dict(os.environ, OMP_NUM_THREADS="1" if dry else os.environ.get("OMP_NUM_THREADS", "4"), TOKENIZERS_PARALLELISM="false")
    runs: dict[str, Any] = {}
    for engine, launcher in _launchers(dry).items():
        if isinstance(launcher, str):
            runs[engine] = {"skipped": launcher}
            continue
        out = workdir / engine
        cmd = [*launcher, "-m", "benchmarks.gpu_worker", *common, "--output_dir", str(out), *extra[engine]]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            runs[engine] = {"failed": proc.stderr[-3000:]}
        else:
            runs[engine] = json.loads((out / "losses.json").read_text())
        print(f"train {engine}: {runs[engine] if 'failed' not in runs[engine] else 'FAILED'}", flush=True)
    base = runs["ddp"].get("losses")
    for run in runs.values():
        if base and run.get("losses") and len(run["losses"]) == len(base):
            run["max_rel_gap_vs_ddp"] = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], base))
    return runs


# --- 2. speed ------------------------------------------------------------------------------------


def _vision(device: Any, dtype: Any, dry: bool) -> list[tuple[str, int, Any]]:
    """``(name, input px, encoder)``: LLaVA-HR-1024, LLaVA-1.5 at three sizes, AnyRes-672."""
    import torch

    import mixres
    from mixres.pathways.hf import CLIP_VIT_L_14_336

    if dry:
        hr, anyres, sizes, side, vit = "llava-hr-tiny", "anyres-tiny", (24, 48, 72), 48, None
        vit = dict(mixres.ENCODERS.resolve(hr)["token_pathway"]["config"])
    else:
        hr, anyres, sizes, side, vit = "llava-hr-7b-1024", "llava-next-anyres-672", (336, 672, 1022), 672, dict(CLIP_VIT_L_14_336)
    vit["attn_implementation"] = "sdpa"
    with torch.device(device):
        mra = mixres.create_encoder(hr)
        clip = mixres.create_pathway("hf_clip", config=vit, select_layer=-2)
        tiles = mixres.create_encoder(anyres)
    image = mra.image_size[0] if isinstance(mra.image_size, (tuple, list)) else mra.image_size
    rows = [("LLaVA-HR-1024" if not dry else hr, int(image), mra)]
    rows += [(f"LLaVA-1.5-{s}", s, clip) for s in sizes] + [(f"AnyRes-{side}", side, tiles)]
    return [(n, s, m.to(device=device, dtype=dtype).eval()) for n, s, m in rows]


def _num_tokens(out: Any) -> int:
    tokens = out[0] if isinstance(out, tuple) else out
    return int(tokens[0].shape[-2])  # a tensor [B, N, C] or AnyRes's list of [N, C]


def _llm(device: Any, dtype: Any, dry: bool) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    from .flops import llama_config

    tiny = dict(hidden_size=64, num_layers=2, num_heads=4, num_key_value_heads=4, intermediate_size=172, vocab_size=100)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(**(tiny if dry else {})), dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def speed(args: argparse.Namespace, device: Any, dtype: Any, dry: bool) -> list[dict[str, Any]]:
    """Encoder, prefill, TTFT, tokens/s at batch 1 and 8, peak memory of each vision side."""
    import torch

    from .flops import TEXT_TOKENS

    llm, cuda = _llm(device, dtype, dry), device.type == "cuda"
    width, rows = llm.config.hidden_size, []
    for name, size, encoder in _vision(device, dtype, dry):
        row: dict[str, Any] = {"model": name, "image": size}
        for batch in (1, 8):
            images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            with torch.inference_mode():
                row["visual_tokens"] = n = _num_tokens(encoder(images[:1]))
            embeds = torch.randn(batch, n + TEXT_TOKENS, width, device=device, dtype=dtype)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            enc = bench(lambda e=encoder, x=images: e(x), device, args.warmup, args.repeats)
            gen = bench(lambda e=embeds: llm.generate(inputs_embeds=e, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                      do_sample=False, pad_token_id=0), device, 1, args.gen_repeats)
            row[f"tokens_per_s_b{batch}"] = batch * args.new_tokens / (enc + gen)
            row[f"peak_gib_b{batch}"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            if batch == 1:
                prefill = bench(lambda e=embeds: llm(inputs_embeds=e, use_cache=True, logits_to_keep=1), device, args.warmup, args.repeats)
                row.update(encoder_ms=1e3 * enc, prefill_ms=1e3 * prefill, ttft_ms=1e3 * (enc + prefill))
        rows.append(row)
        print(f"{name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})}", flush=True)
        del encoder
        if cuda:
            torch.cuda.empty_cache()
    ref = {r["model"]: r for r in rows}
    for key, against in (("vs_1.5_1022", rows[3]["model"]), ("vs_anyres", rows[4]["model"])):
        for r in rows:
            r[f"ttft_{key}"] = r["ttft_ms"] / ref[against]["ttft_ms"]
            r[f"tokens_per_s_b1_{key}"] = r["tokens_per_s_b1"] / ref[against]["tokens_per_s_b1"]
    return rows


def _markdown(rows: list[dict[str, Any]], runs: dict[str, Any], note: str, dry: bool) -> str:
    from . import markdown_table

    def fmt(r: dict[str, Any]) -> dict[str, str]:
        mem = "n/a" if r["peak_gib_b8"] is None else f"{r['peak_gib_b8']:.1f}"
        return {"model": r["model"], "image px": str(r["image"]), "visual tokens": str(r["visual_tokens"]),
                "encoder ms": f"{r['encoder_ms']:.1f}", "prefill ms": f"{r['prefill_ms']:.1f}", "TTFT ms": f"{r['ttft_ms']:.1f}",
                "TTFT vs 1.5-1022": f"{r['ttft_vs_1.5_1022']:.2f}x", "TTFT vs AnyRes": f"{r['ttft_vs_anyres']:.2f}x",
                "tokens/s b1": f"{r['tokens_per_s_b1']:.1f}", "tokens/s b1 vs 1.5-1022": f"{r['tokens_per_s_b1_vs_1.5_1022']:.2f}x",
                "tokens/s b1 vs AnyRes": f"{r['tokens_per_s_b1_vs_anyres']:.2f}x", "tokens/s b8": f"{r['tokens_per_s_b8']:.1f}",
                "peak GiB (b8)": mem}

    train = [{"engine": e, "world": str(r.get("world", "-")), "losses": ", ".join(f"{x:.4f}" for x in r.get("losses", [])) or "-",
              "max rel gap vs DDP": f"{r['max_rel_gap_vs_ddp']:.1e}" if "max_rel_gap_vs_ddp" in r else "-",
              "status": "skipped: " + r["skipped"] if "skipped" in r else "FAILED" if "failed" in r else "ran"} for e, r in runs.items()]
    parts = [f"# GPU: sharded training parity and 7B speed\n\n`python -m benchmarks.gpu{' --dry-run' if dry else ''}`\n\n{note}\n"]
    if train:
        parts.append("## Stage 2 of tiny-stage2: loss curves\n\n" + markdown_table(train, list(train[0])))
    parts.append("## Speed (random weights)\n\n" + markdown_table([fmt(r) for r in rows], list(fmt(rows[0]))))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Training parity under DDP / FSDP2 / ZeRO-3 and the 7B speed table on one GPU."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=main.__doc__)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample")
    parser.add_argument("--gen-repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--skip-train", action="store_true", help="speed only")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script, not the GPU")
    args = parser.parse_args(argv)

    import torch

    from . import write_results

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU; use --dry-run to check the script on the CPU")
    device, dtype = (torch.device("cpu"), torch.float32) if dry else (torch.device("cuda"), torch.bfloat16)
    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {} if args.skip_train else train_parity(2 if dry else args.train_steps, dry, Path(tmp))
    rows = speed(args, device, dtype, dry)
    gpu = "CPU dry run (tiny models; numbers mean nothing)" if dry else torch.cuda.get_device_name(0)
    note = (f"{gpu}; {'fp32' if dry else 'bf16'}, SDPA, random weights; LLM = LlamaForCausalLM with Llama-2-7B shapes"
            f"{' (tiny in the dry run)' if dry else ''}; prompt = visual tokens + 64 text tokens; tokens/s = batch x "
            f"{args.new_tokens} greedy tokens / (encoder + generate); medians of {args.repeats} (generation: {args.gen_repeats}); "
            f"{time.perf_counter() - start:.0f} s in all.")
    md = _markdown(rows, runs, note, dry)
    print("\n" + md)
    result = {"note": note, "train": runs, "rows": rows, "args": vars(args)}
    if not dry:  # numbers of tiny CPU models: printed, never saved beside real results
        paths = write_results("gpu", result, md)
        print(f"\nwrote {', '.join(map(str, paths))}")
    return result


if __name__ == "__main__":
    main()
