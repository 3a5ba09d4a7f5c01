"""mixres benchmarks: cost against resolution.

Run each from the repository root; each writes JSON + a markdown table (+ a PNG where it plots)
into ``benchmarks/results/``::

    python -m benchmarks.flops   # analytic LLM prefill FLOPs, checked against FlopCounterMode
    python -m benchmarks.cost    # tokens / params / FLOPs of every encoder against resolution
    python -m benchmarks.speed   # measured CPU time and peak memory, as ratios within one run
    python -m benchmarks.gpu     # throughput / latency on a GPU (bf16, SDPA); not run by tests

This module holds the small report helpers they share (markdown tables, result files).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["RESULTS", "markdown_table", "write_results", "environment", "human"]

RESULTS = Path(__file__).resolve().parent / "results"


def human(value: float | int | None, unit: str = "") -> str:
    """``1.5e12 -> '1.50 T'``: numbers with an SI prefix, for tables."""
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".strip()


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (dicts), one column per key in ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to every result."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, data: Mapping[str, Any], markdown: str, out_dir: Path | None = None) -> list[Path]:
    """Write ``<name>.json`` (``data`` + the environment) and ``<name>.md`` into ``out_dir``."""
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps({"environment": environment(), **data}, indent=2, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return [json_path, md_path]
