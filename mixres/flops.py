"""FLOP counting for encoders and the LLM prefill.

Convention: **one multiply-add is 2 FLOPs**, so a matmul ``[M, K] @ [K, N]`` costs ``2·M·N·K``
(a linear layer on ``n`` tokens ``2·n·C_in·C_out``; a convolution ``2·C_out·(C_in/groups)·k²``
per output pixel). This is the convention of ``torch.utils.flop_counter.FlopCounterMode``,
which does the counting here. It counts matmuls, convolutions and attention only: norms,
activations, softmax, interpolation and pooling are not counted (they are a few % at most of
a ViT's or an LLM's cost and memory-bound, not compute-bound).

Models are built on the **meta device** (``torch.device("meta")``): parameters and
activations have shapes but no storage, so a full-size ConvNeXt-L + ViT-L or a 7B LLM costs no
memory and no compute to count. ``tests/test_flops.py`` checks that a meta count equals a CPU
count on a small model.

LLM prefill, analytic (:func:`llm_prefill_flops`), for ``n`` prompt tokens (visual tokens +
:data:`TEXT_TOKENS` text tokens), width ``d``, MLP width ``d_ff``, ``L`` layers, vocab ``V``::

    per layer:  Q/K/V/O projections   4 · 2·n·d²        (2·2·n·d·d_kv for K, V with GQA)
                SwiGLU MLP            3 · 2·n·d·d_ff
                attention             2 · 2·n²·d        (Q·Kᵀ and A·V, full n×n: the causal
                                                          mask is not subtracted, as the counter)
    LM head:    2·d·V per token, on the LAST token only (what ``generate`` runs in prefill;
                ``lm_head="all"`` counts every token, as a plain forward without
                ``logits_to_keep``)

For Llama-2-7B (:data:`LLAMA2_7B`) this equals FlopCounterMode on a meta ``LlamaForCausalLM``
exactly (``python -m benchmarks.flops`` and the tests check it).

This module is the counter of ``benchmarks/cost.py`` (which imports it through
``benchmarks/flops.py``) and of ``mixres plan`` (:mod:`mixres.plan`), so both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .errors import MixresError

__all__ = [
    "LLAMA2_7B",
    "TEXT_TOKENS",
    "FlopCount",
    "count_flops",
    "on_meta",
    "num_params",
    "encoder_flops",
    "llm_prefill_flops",
    "projector_flops",
    "llama_config",
    "counted_prefill_flops",
    "token_shape",
    "llm_costs",
]

# Llama-2-7B (the LLM of LLaVA-1.5-7B and LLaVA-HR-7B; Vicuna-7B has the same shapes)
LLAMA2_7B: dict[str, int] = dict(
    hidden_size=4096, num_layers=32, num_heads=32, num_key_value_heads=32, intermediate_size=11008, vocab_size=32000
)
TEXT_TOKENS = 64  # prompt tokens besides the visual ones

LMHead = Literal["last", "all"]


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter has no formula for the fused CPU attention kernel (it counts 0); on meta and
# CUDA SDPA is counted already. Same formula as torch's own for the CUDA kernels.
_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


@dataclass
class FlopCount:
    """The result of :func:`count_flops`.

    Attributes:
        total: all FLOPs (2 per multiply-add).
        by_module: FLOPs per module, keyed ``"<RootClass>.<dotted.path>"`` as FlopCounterMode
            names them; a module's entry includes its children.
        by_op: FLOPs per aten op (``"aten.mm"``, ``"aten.convolution"``, ...).
    """

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)

    def module(self, path: str) -> int:
        """FLOPs of the module at dotted ``path`` below the root (``"map_pathway"``), 0 if it ran none.

        A container that is never called itself (an ``nn.ModuleList`` such as ``"adapters"``) gets
        the sum of its direct children.
        """
        relative = {key.split(".", 1)[1]: v for key, v in self.by_module.items() if "." in key}
        if path in relative:
            return relative[path]
        return sum(v for key, v in relative.items() if key.startswith(path + ".") and "." not in key[len(path) + 1 :])


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Run ``fn(*args, **kwargs)`` under ``no_grad`` and FlopCounterMode; return the counts.

    Example:
        >>> count_flops(nn.Linear(3, 5), torch.randn(7, 3)).total  # 2 * 7 * 3 * 5
        210
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn(*args, **kwargs)
    by_module = {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items() if k != "Global"}
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(int(counter.get_total_flops()), by_module, by_op)


def on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build ``factory()`` on the meta device: full-size shapes, no storage, no init cost."""
    with torch.device("meta"):
        return factory().eval()


def num_params(module: nn.Module) -> int:
    """Number of parameters (works on meta modules)."""
    return sum(p.numel() for p in module.parameters())


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def encoder_flops(encoder: nn.Module, image_size: int | tuple[int, int], batch: int = 1) -> FlopCount:
    """Count one forward of ``encoder`` on ``batch`` images of ``image_size`` (on its device)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = torch.zeros(batch, 3, h, w, device=_param_device(encoder))
    return count_flops(encoder, images)


def projector_flops(num_tokens: int, in_dim: int, out_dim: int = 4096, depth: int = 2) -> int:
    """``mlp{depth}x_gelu``: ``2·n·(C_in·d + (depth-1)·d²)`` (LLaVA-1.5 / LLaVA-HR use depth 2)."""
    return 2 * num_tokens * (in_dim * out_dim + (depth - 1) * out_dim * out_dim)


def llm_prefill_flops(
    num_tokens: int,
    *,
    hidden_size: int = 4096,
    num_layers: int = 32,
    num_heads: int = 32,
    num_key_value_heads: int | None = None,
    intermediate_size: int = 11008,
    vocab_size: int = 32000,
    lm_head: LMHead = "last",
) -> int:
    """Analytic FLOPs of one prefill of ``num_tokens`` tokens through a Llama-style LLM.

    Defaults are Llama-2-7B; the formula is in the module docstring. Pass the *whole* prompt
    length (visual tokens + :data:`TEXT_TOKENS`).

    Example:
        >>> round(llm_prefill_flops(576 + 64) / 1e12, 2)  # LLaVA-1.5 at 336 px
        8.5
    """
    if lm_head not in ("last", "all"):
        raise MixresError(f"lm_head has to be 'last' or 'all', but got {lm_head!r}")
    n, d, ff = num_tokens, hidden_size, intermediate_size
    d_kv = d // num_heads * (num_key_value_heads or num_heads)
    per_layer = 2 * 2 * n * d * d + 2 * 2 * n * d * d_kv + 3 * 2 * n * d * ff + 2 * 2 * n * n * d
    head_tokens = 1 if lm_head == "last" else n
    return num_layers * per_layer + 2 * head_tokens * d * vocab_size


def llama_config(**overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` for Llama-2-7B; keyword overrides use :data:`LLAMA2_7B` names."""
    from transformers import LlamaConfig

    cfg = {**LLAMA2_7B, **overrides}
    return LlamaConfig(
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        attn_implementation="sdpa",
    )


def counted_prefill_flops(config: Any, num_tokens: int, lm_head: LMHead = "last", device: str = "meta") -> int:
    """FlopCounterMode on a ``LlamaForCausalLM(config)`` prefill of ``num_tokens`` tokens.

    Built on ``device`` (meta by default: free at 7B). ``use_cache=True`` as in ``generate``
    (it also keeps transformers' mask code from reading meta data); ``lm_head="last"`` is
    ``logits_to_keep=1``.
    """
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    ids = torch.zeros(1, num_tokens, dtype=torch.long, device=device)
    keep = 1 if lm_head == "last" else 0
    return count_flops(model, input_ids=ids, use_cache=True, logits_to_keep=keep).total


def token_shape(out: Any) -> tuple[int, int]:
    """``(N, C)`` of an encoder output: ``(tokens, grid)``, a tensor, or AnyRes's list (its first image)."""
    if isinstance(out, tuple):
        out = out[0]
    if isinstance(out, list):
        out = out[0][None]
    return int(out.shape[1]), int(out.shape[2])


def llm_costs(out: Any, encoder: int, llm: dict[str, int] = LLAMA2_7B) -> dict[str, int]:
    """What an encoder output costs the LLM: the shared columns of ``benchmarks.cost`` and ``mixres plan``.

    Args:
        out: the encoder's output (anything :func:`token_shape` reads).
        encoder: the encoder's counted FLOPs.
        llm: Llama shapes (:data:`LLAMA2_7B` or the 13B ones).

    Returns:
        ``tokens``, ``width``, ``projector`` (LLaVA's 2-layer MLP to the LLM width; 0 when the
        width already matches), ``prefill`` (on ``tokens + TEXT_TOKENS``), ``enc_prefill``
        (encoder + prefill) and ``kv_cache`` (bytes of K and V in bf16 over the same tokens).

    Example:
        >>> llm_costs(torch.zeros(1, 576, 1024), encoder=0)["kv_cache"] == 2 * 32 * 4096 * (576 + TEXT_TOKENS) * 2
        True
    """
    tokens, width = token_shape(out)
    d = llm["hidden_size"]
    prefill = llm_prefill_flops(tokens + TEXT_TOKENS, **llm)
    return dict(tokens=tokens, width=width, projector=0 if width == d else projector_flops(tokens, width, d),
                prefill=prefill, enc_prefill=encoder + prefill,
                kv_cache=2 * llm["num_layers"] * d * (tokens + TEXT_TOKENS) * 2)  # K and V, bf16
