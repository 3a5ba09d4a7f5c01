"""Cost of MRA on today's SigLIP MLLMs: native vs mrified at the same pixels read (one view).

``python -m benchmarks.cost_families`` builds each family's released ViT (SigLIP-so400m/14) at full
size with random weights on the meta device and counts one forward of one square view of ``R`` px:

- **native**: the family's ViT reads the ``R`` px view itself (``R`` rounded down to a multiple
  of 14 times the family's reduction side, so its pool / pixel shuffle divides the grid; ``hf_siglip`` position embeddings resampled, ``hf_idefics3`` bucketed as the source);
- **mrified**: what :func:`~mixres.integrations.hf.mrify` builds (``map_pathway="convnext_large_mlp"``,
  MR-Adapters after L/4, L/2, 3L/4, no final fusion): ConvNeXt-L reads ``R`` px, the ViT reads
  ``max(R / 32 * 14, native)`` px.

Then each family's own reduction (OneVision: none for one view; Gemma 3: 4x4 average pool;
Idefics3-8B: 2x2 pixel shuffle) gives the LLM's visual tokens ``N``; the projector (analytic) and the
LLM prefill on ``N + 64`` tokens (analytic, :func:`benchmarks.flops.llm_prefill_flops`, with that
family's LLM shape) follow. Gemma 3's attention width (8 heads x 256) differs from its hidden size
(2560); the Llama-style formula takes ``d_kv = d / heads * kv``, so its prefill is approximate.

**Qwen2.5-VL-7B** (its own ViT: 14-px patches, window attention, the 2x2 merger, ``hf_qwen2_5_vl``)
reads any size, so "the same pixels read" is a square view of ``R`` px: **native**, the ViT reads
it itself (``R`` rounded down to a multiple of 28), ``(R / 28)**2`` LLM tokens; **mrified**, the CNN
reads ``R`` and the ViT the view ``k = 32 / 14`` times smaller per side (mrify's default: the CNN's
map has the ViT's grid), ``k**2`` fewer tokens (:class:`~mixres.encoders.packed.PackedDualPathwayEncoder`,
adapters after blocks 8, 16, 24). Its encoder count includes the merger (its projector).

Writes ``benchmarks/results/cost_families.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import mixres
from mixres.pathways.hf import SIGLIP_SO400M_14_384

from . import human, markdown_table, write_results
from .flops import TEXT_TOKENS, count_flops, llm_prefill_flops, on_meta, projector_flops

__all__ = ["FAMILIES", "rows", "main"]

# released configs: the ViT's native side, the pathway, the reduction, the projector and the LLM
FAMILIES: dict[str, dict[str, Any]] = {
    "LLaVA-OneVision-7B": dict(
        native=384, pathway="hf_siglip", layer=-1, reduce=1, projector=(1152, 3584, 2), sizes=(768, 1024),
        llm=dict(hidden_size=3584, num_layers=28, num_heads=28, num_key_value_heads=4, intermediate_size=18944,
                 vocab_size=152064)),
    "Gemma-3-4B": dict(
        native=896, pathway="hf_siglip", layer=-1, reduce=4, projector=(1152, 2560, 1), sizes=(1792,),
        llm=dict(hidden_size=2560, num_layers=34, num_heads=8, num_key_value_heads=4, intermediate_size=10240,
                 vocab_size=262208)),
    "Idefics3-8B": dict(
        native=364, pathway="hf_idefics3", layer=-1, reduce=2, projector=(1152 * 4, 4096, 1), sizes=(768, 1024),
        llm=dict(hidden_size=4096, num_layers=32, num_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=128256)),
}
# Qwen2.5-VL-7B's vision config (its own ViT) and its LLM (Qwen2.5-7B)
QWEN2_5_VL_7B: dict[str, Any] = dict(
    vit=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
             fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
    llm=dict(hidden_size=3584, num_layers=28, num_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    sizes=(1024, 2048), scale=32 / 14)
COLUMNS = ["family", "name", "pixels", "vit_px", "vit_grid", "tokens", "encoder", "prefill", "enc_prefill", "vs_native"]


def _vit(spec: dict[str, Any]) -> dict[str, Any]:
    config = {**SIGLIP_SO400M_14_384, "image_size": spec["native"]}
    if spec["pathway"] == "hf_siglip":
        config["vision_use_head"] = False
    return {"kind": "pathway", "name": spec["pathway"], "config": config, "select_layer": spec["layer"]}


def _mrified(spec: dict[str, Any], size: int) -> torch.nn.Module:
    from mixres.integrations.hf.mrify import default_positions

    vit = _vit(spec)
    return mixres.build({
        "kind": "encoder", "name": "dual_pathway", "token_pathway": vit,
        "map_pathway": {"name": "timm_map", "model_name": "convnext_large_mlp", "out_indices": [-1]},
        "injections": [{"after_block": k, "fusion": {"name": "mr_adapter"}} for k in default_positions(27)],
        "resolution": {"policy": "llava_hr", "stride": 32}, "image_size": size,
    })


def _row(family: str, spec: dict[str, Any], name: str, pixels: int, module: torch.nn.Module, side: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    images = torch.zeros(1, 3, side, side, device="meta")
    count = count_flops(lambda: out.setdefault("x", module(images)))
    tokens, grid = out["x"]
    gh = grid[0]
    llm_tokens = (gh // spec["reduce"]) ** 2
    c_in, c_out, depth = spec["projector"]
    prefill = llm_prefill_flops(llm_tokens + TEXT_TOKENS, **spec["llm"])
    encoder = count.total + projector_flops(llm_tokens, c_in, c_out, depth)
    vit_px = module.vit_size(side)[0] if hasattr(module, "vit_size") else side
    return dict(family=family, name=name, pixels=pixels, vit_px=vit_px, vit_grid=f"{gh}x{grid[1]}", tokens=llm_tokens,
                encoder=encoder, prefill=prefill, enc_prefill=encoder + prefill)


def _qwen_row(name: str, pixels: int, vit_side: int, encoder: torch.nn.Module) -> dict[str, Any]:
    from mixres.pathways.hf_qwen2_5_vl import HFQwen2_5_VLPathway

    vit = encoder if isinstance(encoder, HFQwen2_5_VLPathway) else encoder.token_pathway
    grid = torch.tensor([[1, vit_side // 14, vit_side // 14]])
    patches = torch.zeros(vit_side * vit_side // 196, 1176, device="meta")
    views = [torch.zeros(1, 3, pixels, pixels, device="meta")]
    run = (lambda: vit.merge(*vit(patches, grid))) if encoder is vit else (lambda: vit.merge(*encoder(patches, grid, views)))
    flops = count_flops(run).total
    tokens = (vit_side // 28) ** 2
    prefill = llm_prefill_flops(tokens + TEXT_TOKENS, **QWEN2_5_VL_7B["llm"])
    return dict(family="Qwen2.5-VL-7B", name=name, pixels=pixels, vit_px=vit_side, vit_grid=f"{vit_side // 14}x{vit_side // 14}",
                tokens=tokens, encoder=flops, prefill=prefill, enc_prefill=flops + prefill)


def qwen_rows() -> list[dict[str, Any]]:
    """Qwen2.5-VL-7B: native at ``R`` px vs mrified at ``R`` px; and native at the mrified ViT view (equal tokens)."""
    from mixres.encoders.packed import PackedDualPathwayEncoder
    from mixres.integrations.hf.mrify import default_positions

    spec = QWEN2_5_VL_7B
    vit_config = {"kind": "pathway", "name": "hf_qwen2_5_vl", "config": spec["vit"]}
    vit = on_meta(lambda: mixres.build(vit_config))
    out = []
    for size in spec["sizes"]:
        view = int(size / spec["scale"]) // 28 * 28
        mr_encoder = on_meta(lambda: PackedDualPathwayEncoder(
            vit_config, {"kind": "pathway", "name": "timm_map", "model_name": "convnext_large_mlp", "out_indices": [-1]},
            [{"after_block": k, "fusion": {"name": "mr_adapter"}} for k in default_positions(32)]))
        native, mr = _qwen_row("native", size, size // 28 * 28, vit), _qwen_row("mrified", size, view, mr_encoder)
        mr["vs_native"] = f"{native['enc_prefill'] / mr['enc_prefill']:.2f}x fewer FLOPs, {native['tokens'] / mr['tokens']:.1f}x fewer tokens"
        same = _qwen_row("native (the mrified ViT view)", view, view, vit)
        same["vs_native"] = f"mrified costs {mr['enc_prefill'] / same['enc_prefill']:.2f}x this (same tokens, {size} px read)"
        out += [native, mr, same]
    return out


def rows() -> list[dict[str, Any]]:
    """Native at its own size, then native and mrified at each larger size of every family."""
    out = []
    for family, spec in FAMILIES.items():
        vit = on_meta(lambda spec=spec: mixres.build(_vit(spec)))
        # SigLIP's 384 px run as 378 (its valid conv drops the last 6 px: the same 27x27 grid)
        out.append(_row(family, spec, "native (its own size)", spec["native"], vit, spec["native"] // 14 * 14))
        for size in spec["sizes"]:
            step = 14 * spec["reduce"]  # the native grid has to be one the family's reduction divides
            native = _row(family, spec, "native", size, vit, size // step * step)
            mr = _row(family, spec, "mrified", size, on_meta(lambda spec=spec, size=size: _mrified(spec, size)), size)
            mr["vs_native"] = f"{native['enc_prefill'] / mr['enc_prefill']:.2f}x fewer FLOPs, {native['tokens'] / mr['tokens']:.1f}x fewer tokens"
            out += [native, mr]
    return out + qwen_rows()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Count every row, write the table."""
    argparse.ArgumentParser(prog="python -m benchmarks.cost_families", description=main.__doc__).parse_args(argv)
    start = time.perf_counter()
    table = rows()
    shown = [{**r, **{k: human(r[k], "FLOPs") for k in ("encoder", "prefill", "enc_prefill")}} for r in table]
    md = "\n\n".join([
        "# MRA on today's MLLMs: cost at the same pixels read",
        "`python -m benchmarks.cost_families` (meta device, full size, random weights, one square view, batch 1; "
        f"FLOPs = 2 per multiply-add; encoder = ViT (+ ConvNeXt-L + adapters) + projector; prefill on tokens + "
        f"{TEXT_TOKENS} text tokens, analytic). `tokens` is after the family's own reduction.",
        markdown_table(shown, COLUMNS),
    ])
    data = {"rows": table, "seconds": round(time.perf_counter() - start, 1)}
    write_results("cost_families", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
