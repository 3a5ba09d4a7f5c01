"""GPU benchmark (H100 / H200): encoder throughput, LLM prefill latency and generation speed.

``python -m benchmarks.gpu`` (one command, a few minutes; needs CUDA) measures, in bf16 with
SDPA attention and random weights:

- encoder throughput (images/s at ``--batch``) and batch-1 latency of ``llava-hr-7b-1024``
  (MRA) and of a single CLIP ViT-L/14 (LLaVA-1.5 style, penultimate layer) at 1022 and 672 px;
- with a random-init ``LlamaForCausalLM`` of Llama-2-7B's shapes (:data:`benchmarks.flops.LLAMA2_7B`):
  prefill latency of ``visual tokens + 64`` tokens (``use_cache=True``, LM head on the last
  token), time to first token (encoder at batch 1 + prefill), generated tokens/s end to end
  (``generate``, greedy, exactly ``--new-tokens`` tokens, prefill included) and decode tokens/s
  (single-token steps on the KV cache after the prefill).

Timings are medians over ``--repeats`` after ``--warmup`` runs, synchronised with
``torch.cuda.synchronize``. ``--dry-run`` runs the same code on the CPU with tiny models
(``llava-hr-tiny``, a 2-layer Llama) to check the script without a GPU; its numbers mean nothing
and are printed, not saved.
Nothing is downloaded. Writes ``benchmarks/results/gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


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


def _encoders(device: Any, dtype: Any, dry: bool) -> list[tuple[str, int, Any]]:
    """``(name, input px, module)`` for MRA-1024 and the single ViT at 1022 and 672 px."""
    import torch

    import mixres
    from mixres.pathways.hf import CLIP_VIT_L_14_336

    if dry:
        mra_name, vit_cfg, sizes = "llava-hr-tiny", None, (256, 128)
        vit_cfg = dict(mixres.ENCODERS.resolve(mra_name)["token_pathway"]["config"])
    else:
        mra_name, vit_cfg, sizes = "llava-hr-7b-1024", dict(CLIP_VIT_L_14_336), (1022, 672)
    vit_cfg["attn_implementation"] = "sdpa"
    with torch.device(device):
        mra = mixres.create_encoder(mra_name)
        vit = mixres.create_pathway("hf_clip", config=vit_cfg, select_layer=-2)
    image = mra.image_size[0] if isinstance(mra.image_size, (tuple, list)) else mra.image_size
    models = [(mra_name, int(image), mra)] + [(f"single ViT-L/14 @{s}", s, vit) for s in sizes]
    return [(n, s, m.to(device=device, dtype=dtype).eval()) for n, s, m in models]


def _llm(device: Any, dtype: Any, dry: bool) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    from .flops import llama_config

    shape = (
        dict(hidden_size=64, num_layers=2, num_heads=4, num_key_value_heads=4, intermediate_size=172, vocab_size=100)
        if dry
        else {}
    )
    config = llama_config(**shape)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def decode_rate(llm: Any, embeds: Any, steps: int, device: Any) -> float:
    """Tokens/s of ``steps`` greedy single-token steps after a prefill of ``embeds`` (KV cache kept)."""
    import inspect

    import torch

    key = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"  # transformers 5 / 4
    with torch.inference_mode():
        out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            cache = getattr(out, key)
            out = llm(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{key: cache})
        _sync(device)
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Encoder throughput, prefill latency and tokens/s of MRA-1024 vs a single ViT on one GPU."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=main.__doc__)
    parser.add_argument("--batch", type=int, default=8, help="batch for encoder throughput")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sample")
    parser.add_argument("--gen-repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script, not the GPU")
    args = parser.parse_args(argv)

    import torch

    from . import human, markdown_table, write_results
    from .flops import TEXT_TOKENS, llm_prefill_flops

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU; use --dry-run to check the script on the CPU")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    torch.manual_seed(0)
    start = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for name, size, model in _encoders(device, dtype, dry):
        one = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        batch = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
        with torch.inference_mode():
            tokens = model(one)[0].shape[1]
        latency = bench(lambda m=model, x=one: m(x), device, args.warmup, args.repeats)
        batched = bench(lambda m=model, x=batch: m(x), device, args.warmup, args.repeats)
        rows.append(
            dict(encoder=name, image=size, tokens=tokens, encoder_ms=1e3 * latency, images_per_s=args.batch / batched)
        )
        print(
            f"{name}: {tokens} tokens, {1e3 * latency:.1f} ms at batch 1, {args.batch / batched:.1f} img/s at batch {args.batch}",
            flush=True,
        )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    llm = _llm(device, dtype, dry)
    width = llm.config.hidden_size
    for row in rows:
        n = row["tokens"] + TEXT_TOKENS
        embeds = torch.randn(1, n, width, device=device, dtype=dtype)
        prefill = bench(
            lambda e=embeds: llm(inputs_embeds=e, use_cache=True, logits_to_keep=1), device, args.warmup, args.repeats
        )
        generate = bench(
            lambda e=embeds: llm.generate(
                inputs_embeds=e,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            ),
            device,
            1,
            args.gen_repeats,
        )
        row.update(
            prompt_tokens=n,
            prefill_ms=1e3 * prefill,
            ttft_ms=row["encoder_ms"] + 1e3 * prefill,
            generate_tokens_per_s=args.new_tokens / generate,
            decode_tokens_per_s=statistics.median(
                decode_rate(llm, embeds, args.new_tokens, device) for _ in range(args.gen_repeats)
            ),
            prefill_tflops_per_s=llm_prefill_flops(n) / prefill / 1e12 if not dry else None,
        )
        print(
            f"{row['encoder']}: prefill {n} tokens {1e3 * prefill:.1f} ms, {row['generate_tokens_per_s']:.1f} tokens/s",
            flush=True,
        )

    mra = rows[0]
    for row in rows:
        row["ttft_vs_mra"] = row["ttft_ms"] / mra["ttft_ms"]
    fmt = lambda r: {  # noqa: E731
        "encoder": r["encoder"],
        "image": r["image"],
        "visual tokens": r["tokens"],
        f"encoder img/s (batch {args.batch})": f"{r['images_per_s']:.1f}",
        "encoder ms (batch 1)": f"{r['encoder_ms']:.1f}",
        "prefill ms": f"{r['prefill_ms']:.1f}",
        "time to first token ms": f"{r['ttft_ms']:.1f}",
        "vs MRA": f"{r['ttft_vs_mra']:.2f}x",
        "generate tokens/s": f"{r['generate_tokens_per_s']:.1f}",
        "decode tokens/s": f"{r['decode_tokens_per_s']:.1f}",
    }
    gpu = "CPU dry run (tiny models; numbers mean nothing)" if dry else torch.cuda.get_device_name(0)
    note = (
        f"{gpu}; {'fp32' if dry else 'bf16'}, SDPA, random weights; LLM = LlamaForCausalLM with Llama-2-7B shapes"
        f"{' (tiny in the dry run)' if dry else ''}, prompt = visual tokens + {TEXT_TOKENS}; greedy generation of "
        f"{args.new_tokens} tokens; medians of {args.repeats} (generation: {args.gen_repeats})."
    )
    table = markdown_table([fmt(r) for r in rows], list(fmt(rows[0])))
    md = f"# GPU: encoder throughput, prefill and generation\n\n`python -m benchmarks.gpu{' --dry-run' if dry else ''}`\n\n{note}\n\n{table}"
    print("\n" + md)
    if dry:  # numbers of tiny CPU models: printed, never saved beside real results
        print(f"\ndry run done in {time.perf_counter() - start:.0f} s (nothing written)")
        return rows
    paths = write_results("gpu", {"note": note, "rows": rows, "args": vars(args)}, md)
    print(
        f"\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.0f} s; "
        f"MRA prefill {human(llm_prefill_flops(mra['prompt_tokens']), 'FLOPs')} (7B)"
    )
    return rows


if __name__ == "__main__":
    main()
