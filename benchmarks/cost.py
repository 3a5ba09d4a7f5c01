"""Cost against resolution: visual tokens, parameters and FLOPs of each way to read an image.

``python -m benchmarks.cost`` builds every encoder at full size with random weights on the meta
device (no memory, no compute: :mod:`benchmarks.flops`) and counts one forward of one image:

- **single ViT** (LLaVA-1.5): CLIP ViT-L/14-336 (``hf_clip``), position embeddings resampled
  to the input grid; the CLS token stays in the stream; the penultimate layer is selected, so
  23 of 24 blocks run (the LLaVA-1.5 release computes all 24 and discards the last: ~4 % more);
- **AnyRes-672** (LLaVA-NeXT): :class:`mixres.encoders.anyres.AnyResEncoder` around the same ViT,
  a 672×672 image: base 336 + 2×2 tiles of 336, unpadded, one newline per row;
- **S2** (LLaVA-S2): :class:`mixres.encoders.s2.S2Encoder`, scales 336/672(/1008), 336-px tiles,
  channel concat (1024 per scale), 576 tokens;
- **LLaVA-HR MRA**: the ``llava-hr-7b-*`` presets (``mixres.create_encoder``);
- **fusion zoo**: every registered fusion (``mixres.list_fusions()``), one call at the shapes of
  ``llava-hr-7b-1024`` (tokens 32×32×1024, ConvNeXt-L final map 32×32×1536), with the preset's
  ``low_dim`` / ``high_dim`` replaced by those; costed as the encoder's only fusion.

Each row: visual tokens ``N``; encoder parameters; encoder FLOPs (counted); projector FLOPs
(``mlp2x_gelu`` to 4096, analytic); LLM prefill FLOPs (Llama-2-7B, ``N + 64`` tokens, analytic,
:func:`benchmarks.flops.llm_prefill_flops`); ``enc_prefill`` = encoder + prefill; ``kv_cache`` =
the 7B's KV cache after the prefill in bf16 (``2·32·4096·(N + 64)·2`` bytes). FLOPs are 2 per
multiply-add; norms, activations, softmax and resampling are not counted.

Writes ``benchmarks/results/cost.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mixres
from mixres.flops import llm_costs
from mixres.plan import VIT_SIZES  # the ViT sweep mixres plan lists too

from . import RESULTS, human, markdown_table, write_results
from .flops import (
    LLAMA2_7B,
    TEXT_TOKENS,
    FlopCount,
    count_flops,
    num_params,
    on_meta,
)

__all__ = ["measure", "single_vit", "main", "LLM_WIDTH", "TARGETS"]

LLM_WIDTH = 4096
S2_SCALES = ((336, 672), (336, 672, 1008))
HR_PRESETS = ("llava-hr-7b-384", "llava-hr-7b-768", "llava-hr-7b-1024", "llava-hr-7b-1536", "llava-hr-x-1024")
ZOO_AT = "llava-hr-7b-1024"
# llava-hr-7b-1024: ViT-L tokens at 448 px (32x32x1024), ConvNeXt-L final map at 1024 px (32x32x1536)
ZOO_SHAPES: dict[str, Any] = {"low_dim": 1024, "high_dim": 1536, "grid": (32, 32)}
TARGETS = {"adapter_share_max": 0.02, "vs_vit_1022_min": 3.5, "vs_anyres_672_min": 2.5}


def _clip_l(**kwargs: Any) -> nn.Module:
    from mixres.pathways.hf import CLIP_VIT_L_14_336

    return mixres.create_pathway("hf_clip", config=dict(CLIP_VIT_L_14_336), **kwargs)


def single_vit() -> nn.Module:
    """LLaVA-1.5's vision tower: CLIP ViT-L/14-336, penultimate layer, CLS kept in the stream."""
    return _clip_l(select_layer=-2)


def _images(size: int | tuple[int, int], batch: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.zeros(batch, 3, h, w, device="meta")


def measure(
    family: str,
    name: str,
    image: int,
    vit_px: int | str,
    module: nn.Module,
    call: Callable[[nn.Module], Any],
    note: str = "",
) -> dict[str, Any]:
    """Count one forward ``call(module)`` and derive tokens, projector and prefill FLOPs."""
    result: dict[str, Any] = {}
    count = count_flops(lambda: result.setdefault("out", call(module)))
    costs = llm_costs(result["out"], count.total, LLAMA2_7B)
    return dict(family=family, name=name, image=image, vit_px=vit_px, tokens=costs.pop("tokens"), width=costs.pop("width"),
                params=num_params(module), encoder=count.total, **costs, note=note, _count=count)


def _vit_rows() -> list[dict[str, Any]]:
    vit = on_meta(single_vit)
    return [
        measure("single ViT (LLaVA-1.5)", f"clip-vit-l-14 @{s}", s, s, vit, lambda m, s=s: m(_images(s)))
        for s in VIT_SIZES
    ]


def _anyres_rows() -> list[dict[str, Any]]:
    from mixres.anyres import LLAVA_NEXT_PINPOINTS
    from mixres.encoders.anyres import AnyResEncoder

    enc = on_meta(lambda: AnyResEncoder(single_vit(), pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS]))
    note = "base 336 + 2x2 tiles of 336, unpadded, newline per row"
    return [measure("AnyRes (LLaVA-NeXT)", "anyres-672", 672, "5x336", enc, lambda m: m([_images(672)[0]]), note)]


def _s2_rows() -> list[dict[str, Any]]:
    from mixres.encoders.s2 import S2Encoder

    rows = []
    for scales in S2_SCALES:
        enc = on_meta(lambda scales=scales: S2Encoder(single_vit(), scales=list(scales)))
        tiles = sum((s // 336) ** 2 for s in scales)
        rows.append(
            measure(
                "S2 (LLaVA-S2)",
                "s2-" + "/".join(map(str, scales)),
                scales[-1],
                f"{tiles}x336",
                enc,
                lambda m, s=scales[-1]: m(_images(s)),
                f"{tiles} ViT runs at 336 px, concat",
            )
        )
    return rows


def _hr_rows() -> list[dict[str, Any]]:
    rows = []
    for name in HR_PRESETS:
        if name not in mixres.list_encoders():
            continue
        image = int(re.search(r"(\d+)$", name).group(1))
        enc = on_meta(lambda name=name: mixres.create_encoder(name))
        vit_px = enc.vit_size(image)[0] if hasattr(enc, "vit_size") else "-"
        family = "LLaVA-HR MRA" if "-x-" not in name else "LLaVA-HR-X MRA"
        row = measure(family, name, image, vit_px, enc, lambda m, s=image: m(_images(s)))
        count: FlopCount = row["_count"]
        row["adapters"], row["final_fusion"] = count.module("adapters"), count.module("final_fusion")
        row["map_pathway"] = count.module("map_pathway")
        # the ViT runs through methods (embed, run_blocks), not one module call: it is the rest
        row["token_pathway"] = count.total - row["map_pathway"] - row["adapters"] - row["final_fusion"]
        row["note"] = f"ViT {row['token_pathway'] / 1e12:.2f} T + CNN {row['map_pathway'] / 1e12:.2f} T"
        rows.append(row)
    return rows


def _zoo_rows(reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every registered fusion, one call at the ``llava-hr-7b-1024`` shapes, as its only fusion."""
    if reference is None:
        return []
    low, high, grid = ZOO_SHAPES["low_dim"], ZOO_SHAPES["high_dim"], ZOO_SHAPES["grid"]
    tokens = torch.zeros(1, grid[0] * grid[1], low, device="meta")
    fmap = torch.zeros(1, high, *grid, device="meta")
    pathways = reference["token_pathway"] + reference["map_pathway"]
    rows = []
    for name in mixres.list_fusions():
        try:
            fusion = on_meta(lambda name=name: mixres.create_fusion(name, low_dim=low, high_dim=high))
            row = measure("fusion zoo", name, 1024, reference["vit_px"], fusion, lambda m: m(tokens, grid, fmap))
        except Exception as err:  # a fusion that cannot take these shapes is reported, not hidden
            rows.append(dict(family="fusion zoo", name=name, note=f"skipped: {type(err).__name__}: {err}"[:160]))
            continue
        row["fusion"] = row["encoder"]
        row["encoder"] = pathways + row["fusion"]
        row["enc_prefill"] = row["encoder"] + row["prefill"]
        row["share"] = row["fusion"] / row["encoder"]
        row["note"] = "the fusion is the projector (out_dim = LLM width)" if row["width"] == LLM_WIDTH else ""
        rows.append(row)
    return rows


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Adapter share at llava-hr-7b-1024 and the enc+prefill ratios against the baselines."""
    by_name = {r["name"]: r for r in rows if "encoder" in r and r["family"] != "fusion zoo"}
    out: dict[str, Any] = {"targets": TARGETS}
    mra = by_name.get("llava-hr-7b-1024")
    if mra is None:
        out["missing"] = "llava-hr-7b-1024 is not registered (mixres.presets not there yet)"
        return out
    out["adapter_share"] = (mra["adapters"] + mra["final_fusion"]) / mra["encoder"]
    out["adapters_only_share"] = mra["adapters"] / mra["encoder"]
    for key, base in (
        ("vs_vit_1022", "clip-vit-l-14 @1022"),
        ("vs_anyres_672", "anyres-672"),
        ("vs_vit_672", "clip-vit-l-14 @672"),
        ("vs_s2_1008", "s2-336/672/1008"),
    ):
        if base in by_name:
            out[key] = by_name[base]["enc_prefill"] / mra["enc_prefill"]
            out[key + "_encoder_only"] = by_name[base]["encoder"] / mra["encoder"]
    return out


def _headline_text(h: dict[str, Any]) -> str:
    if "missing" in h:
        return f"- {h['missing']}"
    t = h["targets"]
    lines = [
        f"- adapters + final fusion share of the `llava-hr-7b-1024` encoder FLOPs: **{100 * h['adapter_share']:.2f} %** "
        f"(3 MR-Adapters alone {100 * h['adapters_only_share']:.2f} %; target <= {100 * t['adapter_share_max']:.0f} %: "
        f"{'met' if h['adapter_share'] <= t['adapter_share_max'] else 'MISSED'})",
    ]
    for key, label, target in (
        ("vs_vit_1022", "single ViT-L at 1022 px", t["vs_vit_1022_min"]),
        ("vs_anyres_672", "AnyRes-672", t["vs_anyres_672_min"]),
        ("vs_vit_672", "single ViT-L at 672 px", None),
        ("vs_s2_1008", "S2 336/672/1008", None),
    ):
        if key not in h:
            continue
        verdict = "" if target is None else f"; target >= {target}x: {'met' if h[key] >= target else 'MISSED'}"
        lines.append(
            f"- {label} costs **{h[key]:.2f}x** the encoder + prefill FLOPs of MRA-1024 "
            f"(encoder alone {h[key + '_encoder_only']:.2f}x{verdict})"
        )
    return "\n".join(lines)


COLUMNS = [
    "family",
    "name",
    "image",
    "vit_px",
    "tokens",
    "params",
    "encoder",
    "projector",
    "prefill",
    "enc_prefill",
    "kv_cache",
    "note",
]


def _display(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("encoder", "projector", "prefill", "enc_prefill", "fusion"):
        out[key] = human(row.get(key))
    if "kv_cache" in row:
        out["kv_cache"] = f"{row['kv_cache'] / 2**30:.2f} GiB"
    if "share" in row:
        out["share"] = f"{100 * row['share']:.2f} %"
    out["params"] = f"{row['params'] / 1e6:.1f} M" if "params" in row else "-"
    return out


def plot(rows: list[dict[str, Any]], path: Any) -> bool:
    """Tokens and enc+prefill FLOPs against input resolution, one line per family (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_tok, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.2))
    families = [f for f in dict.fromkeys(r["family"] for r in rows) if f != "fusion zoo"]
    for family in families:
        pts = sorted(
            (r["image"], r["tokens"], r["enc_prefill"] / 1e12) for r in rows if r["family"] == family and "tokens" in r
        )
        xs, toks, flops = zip(*pts)
        ax_tok.plot(xs, toks, "o-", label=family)
        ax_flops.plot(xs, flops, "o-", label=family)
    ax_tok.set(xlabel="input resolution (px)", ylabel="visual tokens", yscale="log", title="Visual tokens")
    ax_flops.set(
        xlabel="input resolution (px)",
        ylabel="TFLOPs",
        yscale="log",
        title=f"Encoder + 7B prefill ({TEXT_TOKENS} text tokens)",
    )
    for ax in (ax_tok, ax_flops):
        ax.grid(True, which="both", alpha=0.3)
    ax_flops.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build every encoder on the meta device, count FLOPs, write the tables and the plot."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=main.__doc__)
    parser.add_argument("--no-zoo", action="store_true", help="skip the fusion zoo table")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = _vit_rows() + _anyres_rows() + _s2_rows()
    hr = _hr_rows()
    rows += hr
    reference = next((r for r in hr if r["name"] == ZOO_AT), None)
    zoo = [] if args.no_zoo else _zoo_rows(reference)
    head = headline(rows)
    main_table = markdown_table([_display(r) for r in rows], COLUMNS)
    zoo_table = markdown_table(
        [_display(r) for r in zoo],
        [
            "name",
            "tokens",
            "width",
            "params",
            "fusion",
            "share",
            "encoder",
            "projector",
            "prefill",
            "enc_prefill",
            "note",
        ],
    )
    md = "\n\n".join(
        [
            "# Cost against resolution",
            "`python -m benchmarks.cost` (meta device, full size, random weights, batch 1; FLOPs = 2 per multiply-add; "
            f"prefill = Llama-2-7B on visual tokens + {TEXT_TOKENS} text tokens, LM head on the last token; "
            "projector = mlp2x_gelu to 4096, analytic)",
            "Single ViT = CLIP ViT-L/14-336 (`hf_clip`), position embeddings resampled, CLS kept, penultimate layer: "
            "23 of 24 blocks run (LLaVA-1.5's release computes all 24, ~4 % more encoder FLOPs; the ratios below "
            "are therefore slightly conservative). AnyRes and S2 are mixres's `AnyResEncoder` / `S2Encoder` around "
            "that ViT, counted, not estimated. LLaVA-HR rows are `mixres.create_encoder(preset)`; their ViT runs "
            "all 24 blocks without CLS.",
            "## Headline",
            _headline_text(head),
            "## Encoders",
            main_table,
            f"## Fusion zoo at `{ZOO_AT}` shapes",
            "Each registered fusion (`mixres.list_fusions()`), one call on 32x32x1024 tokens and one 32x32x1536 "
            "ConvNeXt-L map; a preset's `low_dim` / `high_dim` are replaced by these (so multi-source presets get one "
            "source, and `*_eagle` equals its class), its other options kept. `fusion` = that call's FLOPs, `share` = "
            "its part of `encoder` = ViT-L@448 + ConvNeXt-L@1024 + this one fusion call; tokens and width are the "
            "fusion's output (a different count changes the prefill). The map is on the token grid, so window-based "
            "fusions (patch_mining, sva) see a 1x1 window per token here (Mini-Gemini's own setting has 2x2). For the MR-Adapter as used by LLaVA-HR "
            "(3 adapters + `mr_final`) see the `llava-hr-7b-1024` row above.",
            zoo_table if zoo else "(no zoo: llava-hr-7b-1024 not registered or --no-zoo)",
        ]
    )
    png = RESULTS / "cost.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plotted = not args.no_plot and plot(rows, png)
    if plotted:
        md += "\n\n![tokens and FLOPs against resolution](cost.png)"
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows + zoo]
    paths = write_results("cost", {"headline": head, "rows": clean}, md)
    print(md)
    print(
        f"\nwrote {', '.join(map(str, paths))}{', ' + str(png) if plotted else ''} in {time.perf_counter() - start:.0f} s"
    )
    return head


if __name__ == "__main__":
    main()
