"""Measured CPU time and peak memory of the MRA encoder against a single ViT at the same pixels.

``python -m benchmarks.speed`` times, in one process and interleaved (warm-up, then several
repeats, median), the LLaVA-HR dual encoder (``llava-hr-7b-<R>``: ViT-L/14 at ``R/32·14`` px +
ConvNeXt-L at ``R`` px + 3 MR-Adapters + final fusion) and a single CLIP ViT-L/14 at the
nearest multiple of 14 (``R=1024`` -> 1022 px, 5329 tokens), batch 1, ``torch.inference_mode``,
fp32. Forward hooks time every fusion call and the ConvNeXt, so the adapters' share of the
encoder's time is measured in the same forwards.

**Size.** Full size costs ~2 TFLOPs (MRA-1024) and ~6 TFLOPs (ViT at 1022) per image: tens of
seconds per forward on 2 CPU cores. The default ``--size reduced`` keeps every width, the
resolutions, the resolution policy and the 3 adapters + final fusion, and cuts the depth of both
backbones by 3: ViT 24 -> 8 blocks (adapters after blocks 2, 4, 6 instead of 6, 12, 18),
ConvNeXt-L depths (3, 3, 27, 3) -> (1, 1, 9, 1); the single ViT gets the same 8 blocks (all run).
Per-block costs are unchanged, so the MRA / ViT ratio is close to full size, but the adapters'
share is about 3x their full-depth share: compare it with the FLOP share *of the same config*
(printed beside it), and read the full-depth FLOP share in ``benchmarks/results/cost.md``.
``--size full`` runs the presets as they are (minutes).

**Memory.** Each model runs once more in a fresh child process (``MALLOC_MMAP_THRESHOLD_``
fixed so freed activations go back to the OS); its peak RSS growth during that first forward
(Linux ``VmHWM`` after ``/proc/self/clear_refs``) is the activation + workspace peak. Weights are
reported separately (parameters × 4 bytes).

Writes ``benchmarks/results/speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mixres

from . import human, markdown_table, write_results
from .flops import count_flops, num_params, on_meta

__all__ = ["encoder_config", "vit_config", "time_models", "peak_memory", "main"]

DEPTH_DIVISOR = 3  # --size reduced
CONVNEXT_L_DEPTHS = (3, 3, 27, 3)


def _preset(image: int) -> str:
    return f"llava-hr-7b-{image}"


def encoder_config(image: int, size: str = "reduced") -> dict[str, Any]:
    """The config of ``llava-hr-7b-<image>``, depth-reduced by :data:`DEPTH_DIVISOR` unless ``size="full"``."""
    config = copy.deepcopy(mixres.ENCODERS.resolve(_preset(image)))
    config.pop("weights", None)
    if size == "full":
        return config
    vit = config["token_pathway"]
    blocks = vit["config"]["num_hidden_layers"] // DEPTH_DIVISOR
    vit["config"]["num_hidden_layers"] = blocks
    cnn = config["map_pathway"]
    cnn["model_kwargs"] = {**(cnn.get("model_kwargs") or {}), "depths": [d // DEPTH_DIVISOR for d in CONVNEXT_L_DEPTHS]}
    for inj in config["injections"]:
        inj["after_block"] //= DEPTH_DIVISOR
    return config


def vit_config(image: int, size: str = "reduced") -> dict[str, Any]:
    """The single-ViT baseline: the encoder's CLIP ViT-L/14 with its CLS token, as LLaVA-1.5."""
    vit = copy.deepcopy(encoder_config(image, size)["token_pathway"])
    vit.update(drop_prefix=False, select_layer=-1 if size != "full" else -2)
    return vit


def vit_pixels(image: int, patch: int = 14) -> int:
    """The multiple of ``patch`` nearest to ``image`` (1024 -> 1022)."""
    return round(image / patch) * patch


class _FusionClock:
    """Forward hooks that add up the wall time of the fusions and the map pathway."""

    def __init__(self, encoder: nn.Module) -> None:
        self.totals = {"fusions": 0.0, "map_pathway": 0.0}
        self._start: dict[int, float] = {}
        self.handles = []
        parts = [(m, "fusions") for m in encoder.adapters]
        if encoder.final_fusion is not None:
            parts.append((encoder.final_fusion, "fusions"))
        parts.append((encoder.map_pathway, "map_pathway"))
        for module, key in parts:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(lambda m, a, o, key=key: self._post(m, key)))

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, module: nn.Module, key: str) -> None:
        self.totals[key] += time.perf_counter() - self._start.pop(id(module))

    def reset(self) -> dict[str, float]:
        out, self.totals = self.totals, {k: 0.0 for k in self.totals}
        return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def time_models(encoder: nn.Module, vit: nn.Module, image: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Interleaved timings (seconds, medians) of the encoder at ``image`` and the ViT at ``vit_pixels``."""
    x_enc, x_vit = torch.randn(1, 3, image, image), torch.randn(1, 3, vit_pixels(image), vit_pixels(image))
    clock = _FusionClock(encoder)
    samples: dict[str, list[float]] = {"encoder": [], "vit": [], "fusions": [], "map_pathway": []}
    for i in range(warmup + repeats):
        t_enc = _timed(lambda: encoder(x_enc))
        parts = clock.reset()
        t_vit = _timed(lambda: vit(x_vit))
        if i >= warmup:
            samples["encoder"].append(t_enc)
            samples["vit"].append(t_vit)
            samples["fusions"].append(parts["fusions"])
            samples["map_pathway"].append(parts["map_pathway"])
    for handle in clock.handles:
        handle.remove()
    med = {k: statistics.median(v) for k, v in samples.items()}
    shares = [f / e for f, e in zip(samples["fusions"], samples["encoder"])]
    return {**{f"{k}_s": v for k, v in med.items()}, "fusion_time_share": statistics.median(shares), "samples": samples}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(kind: str, image: int, size: str) -> None:
    """In a fresh process: build one model, run one forward, print the peak RSS growth (JSON)."""
    torch.manual_seed(0)
    model = (
        mixres.build(encoder_config(image, size)) if kind == "encoder" else mixres.build(vit_config(image, size))
    ).eval()
    side = image if kind == "encoder" else vit_pixels(image)
    x = torch.randn(1, 3, side, side)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _rss_kib("VmRSS")
    with torch.inference_mode():
        model(x)
    print(json.dumps({"peak_growth_bytes": (_rss_kib("VmHWM") - before) * 1024}))


def peak_memory(kind: str, image: int, size: str) -> int | None:
    """Peak RSS growth (bytes) of one forward of ``kind`` ("encoder" / "vit") in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "benchmarks.speed", "--child", kind, "--images", str(image), "--size", size]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    if done.returncode != 0:
        print(f"memory child {kind} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def _flops(config: dict[str, Any], image: int) -> tuple[Any, int]:
    model = on_meta(lambda: mixres.build(config))
    return count_flops(model, torch.zeros(1, 3, image, image, device="meta")), num_params(model)


def measure(image: int, size: str, warmup: int, repeats: int, memory: bool) -> dict[str, Any]:
    """Time, memory and FLOPs of MRA-``image`` against the single ViT at the same pixels."""
    enc_cfg, vit_cfg = encoder_config(image, size), vit_config(image, size)
    enc_flops, enc_params = _flops(enc_cfg, image)
    vit_flops, vit_params = _flops(vit_cfg, vit_pixels(image))
    torch.manual_seed(0)
    encoder, vit = mixres.build(enc_cfg).eval(), mixres.build(vit_cfg).eval()
    timing = time_models(encoder, vit, image, warmup, repeats)
    del encoder, vit
    fusion_flops = enc_flops.module("adapters") + enc_flops.module("final_fusion")
    row: dict[str, Any] = dict(
        image=image,
        vit_px=vit_pixels(image),
        size=size,
        encoder_s=timing["encoder_s"],
        vit_s=timing["vit_s"],
        time_ratio=timing["vit_s"] / timing["encoder_s"],
        flop_ratio=vit_flops.total / enc_flops.total,
        fusion_time_share=timing["fusion_time_share"],
        fusion_flop_share=fusion_flops / enc_flops.total,
        cnn_time_share=timing["map_pathway_s"] / timing["encoder_s"],
        encoder_flops=enc_flops.total,
        vit_flops=vit_flops.total,
        encoder_params=enc_params,
        vit_params=vit_params,
        samples=timing["samples"],
    )
    if memory:
        row["encoder_peak_bytes"] = peak_memory("encoder", image, size)
        row["vit_peak_bytes"] = peak_memory("vit", image, size)
        if row["encoder_peak_bytes"] and row["vit_peak_bytes"]:
            row["memory_ratio"] = row["vit_peak_bytes"] / row["encoder_peak_bytes"]
    return row


def _display(r: dict[str, Any]) -> dict[str, Any]:
    mib = lambda b: "-" if not b else f"{b / 2**20:.0f} MiB"  # noqa: E731
    return {
        "MRA": f"llava-hr-7b-{r['image']}",
        "ViT px": r["vit_px"],
        "MRA s": f"{r['encoder_s']:.2f}",
        "ViT s": f"{r['vit_s']:.2f}",
        "ViT/MRA time": f"{r['time_ratio']:.2f}x",
        "ViT/MRA FLOPs": f"{r['flop_ratio']:.2f}x",
        "fusions time share": f"{100 * r['fusion_time_share']:.2f} %",
        "fusions FLOP share": f"{100 * r['fusion_flop_share']:.2f} %",
        "CNN time share": f"{100 * r['cnn_time_share']:.0f} %",
        "MRA peak act.": mib(r.get("encoder_peak_bytes")),
        "ViT peak act.": mib(r.get("vit_peak_bytes")),
        "ViT/MRA memory": f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else "-",
        "weights MRA / ViT": f"{r['encoder_params'] * 4 / 2**20:.0f} / {r['vit_params'] * 4 / 2**20:.0f} MiB",
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Time the MRA encoder against a single ViT at the same pixels on this CPU; write the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=main.__doc__)
    parser.add_argument(
        "--images", type=int, nargs="+", default=[1024], help="LLaVA-HR preset resolutions (384/768/1024/1536)"
    )
    parser.add_argument("--size", choices=["reduced", "full"], default="reduced")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--child", choices=["encoder", "vit"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        _child(args.child, args.images[0], args.size)
        return []
    start = time.perf_counter()
    rows = [measure(i, args.size, args.warmup, args.repeats, not args.no_memory) for i in args.images]
    what = (
        "full size"
        if args.size == "full"
        else f"REDUCED depth (ViT 8 of 24 blocks, ConvNeXt-L depths 1/1/9/1 of 3/3/27/3; widths, resolutions and the "
        f"3 adapters + final fusion as in the preset: the fusions' share is ~{DEPTH_DIVISOR}x their full-depth share)"
    )
    note = (
        f"CPU, {torch.get_num_threads()} threads, fp32, batch 1, inference_mode; {what}; median of {args.repeats} "
        f"after {args.warmup} warm-up, MRA and ViT interleaved in one process. Peak act. = peak RSS growth of one "
        "forward in a fresh process. FLOP columns: FlopCounterMode on the same configs."
    )
    columns = list(_display(rows[0]))
    table = markdown_table([_display(r) for r in rows], columns)
    cmd = " ".join(["python -m benchmarks.speed", *(sys.argv[1:] if argv is None else argv)])
    md = f"# Encoder speed on CPU\n\n`{cmd}`\n\n{note}\n\n{table}"
    print(md)
    paths = write_results("speed", {"note": note, "rows": rows}, md)
    print(
        f"\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.0f} s ({human(sum(r['encoder_flops'] for r in rows), 'FLOPs')} MRA per forward)"
    )
    return rows


if __name__ == "__main__":
    main()
