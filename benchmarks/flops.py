"""FLOP counting for encoders and the LLM prefill: the counter lives in :mod:`mixres.flops`.

This module re-exports it (``benchmarks/cost.py`` and the tests import it from here) and keeps
the ``python -m benchmarks.flops`` report: the analytic 7B prefill FLOPs, checked against a
meta-device ``LlamaForCausalLM`` count.
"""

from __future__ import annotations

import argparse

from mixres.flops import (
    _EXTRA_FORMULAS,
    LLAMA2_7B,
    TEXT_TOKENS,
    FlopCount,
    LMHead,
    count_flops,
    counted_prefill_flops,
    encoder_flops,
    llama_config,
    llm_prefill_flops,
    num_params,
    on_meta,
    projector_flops,
    token_shape,
)

from . import human, markdown_table, write_results

__all__ = [
    "LLAMA2_7B",
    "TEXT_TOKENS",
    "FlopCount",
    "LMHead",
    "count_flops",
    "on_meta",
    "num_params",
    "encoder_flops",
    "llm_prefill_flops",
    "projector_flops",
    "llama_config",
    "counted_prefill_flops",
    "token_shape",
    "_EXTRA_FORMULAS",
    "main",
]


def main(argv: list[str] | None = None) -> None:
    """Print (and save) the analytic 7B prefill FLOPs, checked against a meta-device count."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=main.__doc__)
    parser.add_argument("--visual-tokens", type=int, nargs="+", default=[576, 1024, 2304, 2928, 5329])
    parser.add_argument("--no-check", action="store_true", help="skip the meta-device LlamaForCausalLM count")
    args = parser.parse_args(argv)
    config = None if args.no_check else llama_config()
    rows = []
    for visual in args.visual_tokens:
        n = visual + TEXT_TOKENS
        analytic = llm_prefill_flops(n, **LLAMA2_7B)
        counted = counted_prefill_flops(config, n) if config is not None else None
        rows.append(
            dict(
                visual_tokens=visual,
                prompt_tokens=n,
                analytic=analytic,
                counted=counted,
                match=None if counted is None else counted == analytic,
            )
        )
    table = markdown_table(
        [{**r, "analytic": human(r["analytic"], "FLOPs"), "counted": human(r["counted"], "FLOPs")} for r in rows],
        ["visual_tokens", "prompt_tokens", "analytic", "counted", "match"],
    )
    note = (
        f"Llama-2-7B prefill, {TEXT_TOKENS} text tokens + visual tokens, LM head on the last token; "
        "2 FLOPs per multiply-add; 'counted' = FlopCounterMode on a meta-device LlamaForCausalLM."
    )
    print(note + "\n\n" + table)
    paths = write_results(
        "flops",
        {"llm": dict(LLAMA2_7B), "text_tokens": TEXT_TOKENS, "rows": rows},
        f"# LLM prefill FLOPs\n\n`python -m benchmarks.flops`\n\n{note}\n\n{table}",
    )
    print("\nwrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
