"""benchmarks/flops.py: the FLOP counter against hand-computed layers, meta against CPU, and the
analytic LLM prefill formula against FlopCounterMode on a tiny LlamaForCausalLM."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed

import mixres  # noqa: E402
from benchmarks.flops import (  # noqa: E402
    count_flops,
    counted_prefill_flops,
    llama_config,
    llm_prefill_flops,
    num_params,
    on_meta,
    projector_flops,
)

DEVICES = ["cpu", "meta"]


@pytest.mark.parametrize("device", DEVICES)
def test_linear_is_2mnk(device):
    with torch.device(device):
        layer, x = nn.Linear(3, 5), torch.zeros(7, 3)
    assert count_flops(layer, x).total == 2 * 7 * 3 * 5


@pytest.mark.parametrize("device", DEVICES)
def test_convolutions(device):
    with torch.device(device):
        pointwise, x = nn.Conv2d(4, 6, 1), torch.zeros(2, 4, 5, 3)
        depthwise, y = nn.Conv2d(6, 6, 7, padding=3, groups=6), torch.zeros(1, 6, 5, 5)
    assert count_flops(pointwise, x).total == 2 * 2 * 6 * 4 * 5 * 3  # 2 · B · C_out · C_in · H · W
    assert count_flops(depthwise, y).total == 2 * 6 * 7 * 7 * 5 * 5  # one 7x7 filter per channel


@pytest.mark.parametrize("device", DEVICES)
def test_attention(device):
    # the fused CPU kernel has no formula in torch (it counts 0): benchmarks.flops adds one
    b, heads, n, m, dh = 2, 4, 7, 9, 8
    with torch.device(device):
        q, k, v = torch.zeros(b, heads, n, dh), torch.zeros(b, heads, m, dh), torch.zeros(b, heads, m, dh)
    assert count_flops(F.scaled_dot_product_attention, q, k, v).total == 2 * (2 * b * heads * n * m * dh)


def test_mr_adapter_by_hand_and_by_module():
    low, high, grid, side = 16, 24, (6, 4), (6, 4)
    adapter = mixres.create_fusion("mr_adapter", low_dim=low, high_dim=high)
    tokens, hires = torch.randn(1, 24, low), torch.randn(1, high, *side)
    hw = grid[0] * grid[1]
    expected = (
        2 * hw * high * high
        + 2 * hw * high * low  # high branch: two 1x1 convs on the map
        + 2 * hw * low * 7 * 7
        + 2 * hw * low * low  # low branch: depthwise 7x7 + 1x1
        + 2 * (2 * low * (low // 2) + (low // 2) * 1)  # the gate MLP on the pooled vector
    )
    count = count_flops(adapter, tokens, grid, hires)
    assert count.total == expected
    assert count.module("gate") == 2 * (2 * low * (low // 2) + (low // 2))


def _tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        attn_implementation="sdpa",
    )
    return CLIPVisionModel(cfg).eval()


def test_meta_count_equals_cpu_count():
    cpu = _tiny_clip()
    meta = on_meta(_tiny_clip)
    assert num_params(meta) == num_params(cpu)
    cpu_count = count_flops(cpu, pixel_values=torch.zeros(2, 3, 56, 56), interpolate_pos_encoding=True)
    meta_count = count_flops(meta, pixel_values=torch.zeros(2, 3, 56, 56, device="meta"), interpolate_pos_encoding=True)
    assert cpu_count.total == meta_count.total > 0
    n, d, ff = 1 + 16, 32, 64  # CLS + 4x4 patches
    per_layer = 2 * n * (4 * d * d + 2 * d * ff) + 2 * 2 * n * n * d
    assert cpu_count.total == 2 * (2 * 16 * 3 * 14 * 14 * d + 2 * per_layer)  # patch conv + 2 layers, batch 2


@pytest.mark.parametrize("lm_head", ["last", "all"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefill_formula_matches_counter(lm_head, kv_heads):
    shape = dict(
        hidden_size=64, num_layers=2, num_heads=4, num_key_value_heads=kv_heads, intermediate_size=172, vocab_size=100
    )
    n = 20
    expected = llm_prefill_flops(n, **shape, lm_head=lm_head)
    assert counted_prefill_flops(llama_config(**shape), n, lm_head=lm_head) == expected
    if kv_heads == 4 and lm_head == "last":  # the real weights give the same count as meta
        assert counted_prefill_flops(llama_config(**shape), n, lm_head=lm_head, device="cpu") == expected


def test_prefill_7b_reference_values():
    # Llama-2-7B: ~2 · 6.5e9 FLOPs per token plus the quadratic attention term
    n = 576 + 64
    linear = 32 * (4 * 2 * n * 4096**2 + 3 * 2 * n * 4096 * 11008)
    assert llm_prefill_flops(n) == linear + 32 * 4 * n * n * 4096 + 2 * 4096 * 32000
    assert llm_prefill_flops(n, lm_head="all") - llm_prefill_flops(n) == 2 * (n - 1) * 4096 * 32000
    with pytest.raises(ValueError, match="lm_head"):
        llm_prefill_flops(n, lm_head="first")


def test_projector_flops_matches_counter():
    projector = mixres.create_projector("mlp2x_gelu", in_dim=12, out_dim=20)
    assert count_flops(projector, torch.zeros(1, 9, 12)).total == projector_flops(9, 12, 20)


def test_meta_count_of_a_dual_encoder_equals_cpu_count():
    # the full-size tables count on the meta device; here the same code runs for real, tiny
    cpu = mixres.create_encoder("llava-hr-tiny").eval()
    meta = on_meta(lambda: mixres.create_encoder("llava-hr-tiny"))
    image = meta.image_size[0] if isinstance(meta.image_size, (tuple, list)) else meta.image_size
    cpu_count = count_flops(cpu, torch.zeros(1, 3, image, image))
    meta_count = count_flops(meta, torch.zeros(1, 3, image, image, device="meta"))
    assert cpu_count.total == meta_count.total > 0
    assert cpu_count.by_module == meta_count.by_module
    # "adapters" (a ModuleList, never called itself) is the sum of its three adapters
    adapters = [meta_count.module(f"adapters.{i}") for i in range(3)]
    assert min(adapters) > 0 and meta_count.module("adapters") == sum(adapters)
    parts = meta_count.module("adapters") + meta_count.module("final_fusion") + meta_count.module("map_pathway")
    assert 0 < parts < meta_count.total  # the ViT is the rest


def test_gpu_script_imports_without_a_gpu(capsys):
    from benchmarks import gpu

    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--help"])
    assert exit_info.value.code == 0 and "--dry-run" in capsys.readouterr().out
