"""``mixres plan``: what to run for a token / FLOP budget.

Every candidate is built at full size on the **meta device** (shapes, no storage: free at 7B)
and one forward of one image is counted with :func:`mixres.flops.count_flops`, the counter of
``benchmarks/cost.py``; the derived numbers use the same formulas, so a row here equals the
row of the same name in ``benchmarks/results/cost.json`` to the digit (``tests/test_plan.py``
checks it). Candidates:

- **single ViT** (LLaVA-1.5): CLIP ViT-L/14-336, penultimate layer, CLS kept, at
  336 / 448 / 672 / 1022 / 1526 px (position embeddings resampled), named ``clip-vit-l-14 @S``;
- **S2 336/672** (two scales, not a preset);
- **every registered encoder preset** except the tiny test ones (``*tiny*``), at its own
  ``image_size``: ``llava-hr-7b-{384,768,1024,1536}``, ``llava-hr-x-1024``,
  ``llava-next-anyres-672``, ``llava-s2-1008``, and any plugin's.

Each row: visual tokens ``N``, encoder parameters, encoder FLOPs (counted), projector FLOPs
(``mlp2x_gelu`` to the LLM width, analytic; 0 when the encoder already outputs that width),
LLM prefill FLOPs on ``N + 64`` tokens (:func:`mixres.flops.llm_prefill_flops`), their sum with
the encoder (``enc_prefill``), and the LLM's KV cache after the prefill in bf16
(``2 * layers * width * (N + 64) * 2`` bytes). 2 FLOPs per multiply-add.

A row **fits** when every budget given holds: ``tokens <= --tokens``, ``enc_prefill <=
--tflops * 1e12``, ``image >= --image-size`` (the input resolution you need to read). The
**recommendation** is, among the rows that fit, the one reading the highest input resolution,
and of those the cheapest in ``enc_prefill``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import MixresError
from .flops import (
    LLAMA2_7B,
    TEXT_TOKENS,
    count_flops,
    llm_costs,
    num_params,
    on_meta,
)

__all__ = ["LLMS", "VIT_SIZES", "Candidate", "candidates", "measure", "plan", "format_plan", "main"]

# Llama-2 shapes (Vicuna-7B / -13B, the LLMs of LLaVA-1.5 / LLaVA-HR / LLaVA-HR-X)
LLMS: dict[str, dict[str, int]] = {
    "7b": dict(LLAMA2_7B),
    "13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_key_value_heads=40, intermediate_size=13824,
                vocab_size=32000),
}
VIT_SIZES: tuple[int, ...] = (336, 448, 672, 1022, 1526)  # multiples of 14 (1022 ~ 1024); benchmarks/cost.py sweeps these


@dataclass
class Candidate:
    """One way to read an image: how to build it on meta and how to call it on one image."""

    family: str
    name: str
    image: int
    build: Callable[[], nn.Module]
    call: Callable[[nn.Module], Any]


def _images(size: int) -> torch.Tensor:
    return torch.zeros(1, 3, size, size, device="meta")


def _single_vit() -> nn.Module:
    import mixres
    from mixres.pathways.hf import CLIP_VIT_L_14_336

    return mixres.create_pathway("hf_clip", config=dict(CLIP_VIT_L_14_336), select_layer=-2)


def _preset(name: str) -> Candidate:
    import mixres
    from mixres.encoders.anyres import AnyResEncoder

    image = int(mixres.ENCODERS.resolve(name).get("image_size") or 0)
    family = "LLaVA-HR MRA" if name.startswith("llava-hr") else "preset"

    def call(m: nn.Module, image: int = image) -> Any:
        size = image or int(m.image_size[0])
        return m([_images(size)[0]]) if isinstance(m, AnyResEncoder) else m(_images(size))

    return Candidate(family, name, image, lambda: mixres.create_encoder(name), call)


def candidates(pattern: str = "*") -> list[Candidate]:
    """The candidates of the module docstring whose name matches the fnmatch ``pattern``."""
    import mixres
    from mixres.encoders.s2 import S2Encoder

    out = [Candidate("single ViT (LLaVA-1.5)", f"clip-vit-l-14 @{s}", s, _single_vit, lambda m, s=s: m(_images(s)))
           for s in VIT_SIZES]
    out.append(Candidate("S2 (LLaVA-S2)", "s2-336/672", 672, lambda: S2Encoder(_single_vit(), scales=[336, 672]),
                         lambda m: m(_images(672))))
    out += [_preset(n) for n in mixres.list_encoders() if mixres.ENCODERS.is_preset(n) and "tiny" not in n]
    return [c for c in out if fnmatch.fnmatch(c.name, pattern)]


def measure(candidate: Candidate, llm: str = "7b") -> dict[str, Any]:
    """Build ``candidate`` on meta, count one forward, derive the row (see the module docstring)."""
    module = on_meta(candidate.build)
    result: dict[str, Any] = {}
    encoder = count_flops(lambda: result.setdefault("out", candidate.call(module))).total
    image = candidate.image or int(module.image_size[0])
    vit_px = module.vit_size(image)[0] if hasattr(module, "vit_size") else (image if "ViT" in candidate.family else "-")
    costs = llm_costs(result["out"], encoder, LLMS[llm])
    return dict(family=candidate.family, name=candidate.name, image=image, vit_px=vit_px, tokens=costs.pop("tokens"),
                width=costs.pop("width"), params=num_params(module), encoder=encoder, **costs)


def plan(
    tokens: int | None = None,
    tflops: float | None = None,
    image_size: int | None = None,
    llm: str = "7b",
    pattern: str = "*",
) -> dict[str, Any]:
    """Measure every candidate, mark which fit the budget, recommend one.

    Args:
        tokens: at most this many visual tokens.
        tflops: at most this many TFLOPs of encoder + LLM prefill.
        image_size: at least this input resolution (px).
        llm: ``"7b"`` or ``"13b"`` (Llama-2 shapes).
        pattern: only candidates whose name matches (fnmatch).

    Returns:
        ``{"budget", "llm", "text_tokens", "rows": [...], "recommended": name | None}``; each
        row has ``fits`` and, when it does not fit, ``why``.

    Raises:
        MixresError: an unknown ``llm``, a budget that is not positive, or no candidate matching.
    """
    if llm not in LLMS:
        raise MixresError(f"llm has to be one of {list(LLMS)}, but got {llm!r}")
    for key, value in (("tokens", tokens), ("tflops", tflops), ("image_size", image_size)):
        if value is not None and not value > 0:
            raise MixresError(f"{key} has to be > 0, but got {value}")
    chosen = candidates(pattern)
    if not chosen:
        raise MixresError(f"no candidate matches {pattern!r}; names look like 'llava-hr-7b-1024' or 'clip-vit-l-14 @672'")
    rows = [measure(c, llm) for c in chosen]
    for row in rows:
        why = []
        if tokens is not None and row["tokens"] > tokens:
            why.append(f"{row['tokens']} tokens > {tokens}")
        if tflops is not None and row["enc_prefill"] > tflops * 1e12:
            why.append(f"{row['enc_prefill'] / 1e12:.2f} TFLOPs > {tflops:g}")
        if image_size is not None and row["image"] < image_size:
            why.append(f"reads {row['image']} px < {image_size}")
        row["fits"] = not why
        if why:
            row["why"] = "; ".join(why)
    fitting = [r for r in rows if r["fits"]]
    best = min(fitting, key=lambda r: (-r["image"], r["enc_prefill"]), default=None)
    budget = {"tokens": tokens, "tflops": tflops, "image_size": image_size}
    return {"budget": budget, "llm": llm, "text_tokens": TEXT_TOKENS, "rows": rows,
            "recommended": best["name"] if best else None}


def _human(value: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:g}"


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a markdown table (FLOPs with SI prefixes) and the recommendation."""
    cols = ["fits", "name", "image", "vit_px", "tokens", "params", "encoder", "prefill", "enc_prefill", "kv_cache", "why"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in result["rows"]:
        cells = dict(r, fits="yes" if r["fits"] else "no", params=f"{r['params'] / 1e6:.1f} M",
                     encoder=_human(r["encoder"]), prefill=_human(r["prefill"]), enc_prefill=_human(r["enc_prefill"]),
                     kv_cache=f"{r['kv_cache'] / 2**30:.2f} GiB", why=r.get("why", ""))
        lines.append("| " + " | ".join(str(cells[c]) for c in cols) + " |")
    given = {k: v for k, v in result["budget"].items() if v is not None}
    head = (f"budget {given or 'none'}; LLM {result['llm']} (Llama-2 shapes), {result['text_tokens']} text tokens; "
            "FLOPs: 2 per multiply-add, counted on the meta device")
    pick = result["recommended"]
    tail = f"recommended: **{pick}** (the highest input resolution that fits, then the fewest FLOPs)" if pick else \
        "recommended: nothing fits this budget"
    return "\n\n".join([head, "\n".join(lines), tail])


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``mixres plan`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="mixres plan", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, help="at most this many visual tokens")
    p.add_argument("--tflops", type=float, help="at most this many TFLOPs (encoder + LLM prefill)")
    p.add_argument("--image-size", type=int, help="at least this input resolution (px)")
    p.add_argument("--llm", default="7b", choices=sorted(LLMS), help="LLM shapes for prefill / KV cache")
    p.add_argument("--only", default="*", help="fnmatch pattern on candidate names, e.g. 'llava-hr*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``mixres plan`` from parsed arguments; returns the exit code."""
    try:
        result = plan(args.tokens, args.tflops, args.image_size, args.llm, args.only)
    except MixresError as err:
        print(f"mixres plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixres.plan [--tokens N] [--tflops T] [--image-size R] [--llm 7b] [--json]``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
