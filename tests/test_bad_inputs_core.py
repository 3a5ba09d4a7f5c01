"""Bad input into the core (grid ops, fusions, projectors, compressors, pathways, registry).

Each case is one call that must be refused at the public boundary: the error class is ours
(``MixresError`` family) or ``TypeError``, and the message quotes the bad value (a fragment
matched with ``re.search``). Nothing may run a torch / Python internal error first, and nothing
may return silently. Builders are cached so the table stays fast.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

import mixres
from mixres import ConfigError, MixresError, ShapeError, UnknownNameError
from mixres.errors import DeviceError
from mixres.grid import check_map, check_tokens, map_to_tokens, resample, resample_pos_embed, tokens_to_map

# every fusion family, built tiny: low_dim 8, high_dim 16
FUSIONS = ["mr_adapter", "mr_final", "gated_xattn", "hybrid_split", "patch_mining", "sva", "channel_concat"]
PROJECTORS = ["linear", "mlp2x_gelu", "identity"]


@functools.cache
def fusion(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return mixres.create_fusion(name, low_dim=8, high_dim=16).eval()


@functools.cache
def projector(name: str) -> torch.nn.Module:
    return mixres.create_projector(name, in_dim=8, out_dim=8)


@functools.cache
def compressor(name: str) -> torch.nn.Module:
    kw = dict(num_queries=4, depth=1, hidden_dim=8) if name == "c_abstractor" else dict(embed_dim=8, num_heads=2)
    return mixres.create_projector(name, in_dim=8, out_dim=8, **kw)


@functools.cache
def patchify() -> torch.nn.Module:
    return mixres.create_pathway("patchify", dim=8, patch_size=4, image_size=16)


def tok(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype)


def fuse(name, tokens, grid, map):
    return fusion(name)(tokens, grid, map)


T, M = (2, 4, 8), (2, 16, 4, 4)  # good tokens (grid 2x2) and map shapes

CASES = []


def case(id, fn, error, fragment):
    CASES.append(pytest.param(fn, error, fragment, id=id))


# -- fusions: dtype vs parameters, devices, zero-size maps, ranks, widths ----------------------
for name in FUSIONS:
    if name != "channel_concat":  # parameter-free in its default form: any float dtype is fine
        case(f"{name}-float16-into-float32", lambda n=name: fuse(n, tok(*T).half(), (2, 2), tok(*M).half()), ShapeError, r"torch\.float16 but this \w+'s parameters are torch\.float32")
        case(f"{name}-bfloat16-into-float32", lambda n=name: fuse(n, tok(*T).bfloat16(), (2, 2), tok(*M).bfloat16()), ShapeError, r"torch\.bfloat16 but .* parameters are torch\.float32")
        case(f"{name}-meta-device", lambda n=name: fuse(n, tok(*T, device="meta"), (2, 2), tok(*M, device="meta")), DeviceError, r"tokens is on meta but .* parameters are on cpu")
    case(f"{name}-zero-height-map", lambda n=name: fuse(n, tok(*T), (2, 2), tok(2, 16, 0, 4)), ShapeError, r"zero-size axis \(shape \(2, 16, 0, 4\)")
    case(f"{name}-zero-width-map", lambda n=name: fuse(n, tok(*T), (2, 2), tok(2, 16, 4, 0)), ShapeError, r"zero-size axis \(shape \(2, 16, 4, 0\)")
    case(f"{name}-int-tokens", lambda n=name: fuse(n, tok(*T, dtype=torch.long), (2, 2), tok(*M)), ShapeError, r"torch\.int64")
    case(f"{name}-grid-mismatch", lambda n=name: fuse(n, tok(*T), (3, 2), tok(*M)), ShapeError, r"N=4 tokens, but grid \(3, 2\) needs h\*w=6")
    case(f"{name}-rank2-tokens", lambda n=name: fuse(n, tok(4, 8), (2, 2), tok(*M)), ShapeError, r"rank 3\), but got shape \(4, 8\)")
    case(f"{name}-wrong-low-dim", lambda n=name: fuse(n, tok(2, 4, 5), (2, 2), tok(*M)), ShapeError, r"C=5 channels, but this \w+ was built with low_dim=8")
    case(f"{name}-wrong-high-dim", lambda n=name: fuse(n, tok(*T), (2, 2), tok(2, 7, 4, 4)), ShapeError, r"C=7 channels, but this \w+ was built with high_dim(\[0\])?=16")
    case(f"{name}-batch-mismatch", lambda n=name: fuse(n, tok(*T), (2, 2), tok(3, 16, 4, 4)), ShapeError, r"batch 2 but map(\[0\])? has batch 3")
    case(f"{name}-float-grid", lambda n=name: fuse(n, tok(*T), (2.0, 2), tok(*M)), TypeError, r"grid has to be an int, but got float 2\.0")
    case(f"{name}-zero-channel-tokens", lambda n=name: fuse(n, tok(2, 4, 0), (2, 2), tok(*M)), ShapeError, r"C=0")

# construction
for bad, error, fragment in [(0, MixresError, r"low_dim has to be > 0, but got 0"), (-3, MixresError, r"got -3"),
                             (2.5, TypeError, r"float 2\.5"), (True, TypeError, r"bool True"), ("8", TypeError, r"str '8'")]:
    case(f"mr_adapter-low_dim={bad!r}", lambda b=bad: mixres.MRAdapter(low_dim=b, high_dim=8), error, fragment)
for bad, error in [(math.inf, MixresError), (math.nan, MixresError), (-1.0, MixresError), (0, MixresError), ("4", TypeError), (True, TypeError)]:
    frag = re.escape(repr(bad)) if not isinstance(bad, float) or math.isfinite(bad) else repr(bad)
    case(f"gated_xattn-mlp_ratio={bad!r}", lambda b=bad: mixres.create_fusion("gated_xattn", low_dim=8, high_dim=16, mlp_ratio=b), error, rf"mlp_ratio has to be a number.*{frag}")
case("mr_adapter-even-kernel", lambda: mixres.MRAdapter(8, 8, kernel_size=4), MixresError, r"kernel_size has to be odd .* got 4")
case("mr_adapter-low_dim-1", lambda: mixres.MRAdapter(1, 8), MixresError, r"low_dim has to be >= 2 .* got 1")
case("mr_adapter-bad-gate", lambda: mixres.MRAdapter(8, 8, gate="token"), MixresError, r"gate has to be one of .* got 'token'")
case("mr_adapter-bad-merge", lambda: mixres.MRAdapter(8, 8, merge="max"), MixresError, r"merge has to be one of .* got 'max'")
case("gated_xattn-heads-not-dividing", lambda: mixres.create_fusion("gated_xattn", low_dim=10, high_dim=8, num_heads=4), MixresError, r"num_heads=4")
case("sva-empty-high-dims", lambda: mixres.create_fusion("sva", low_dim=8, high_dim=[]), MixresError, r"got \[\]")
case("sva-wrong-number-of-maps", lambda: mixres.create_fusion("sva", low_dim=8, high_dim=[16, 16])(tok(*T), (2, 2), [tok(*M)]), ShapeError, r"got 1 source map\(s\), but this SVA was built for 2")
case("sva-maps-on-two-devices", lambda: mixres.create_fusion("sva", low_dim=8, high_dim=[16, 16])(tok(*T), (2, 2), [tok(*M), tok(*M, device="meta")]), DeviceError, r"map\[1\] is on meta")
case("mr_adapter-tokens-and-map-devices", lambda: fuse("mr_adapter", tok(*T), (2, 2), tok(*M, device="meta")), DeviceError, r"map is on meta")
case("hybrid_split-odd-out_dim", lambda: mixres.create_fusion("hybrid_split", low_dim=8, high_dim=8, out_dim=7), MixresError, r"out_dim has to be even .* got 7")

# -- grid ops ----------------------------------------------------------------------------------
case("resample-zero-map", lambda: resample(tok(1, 3, 0, 4), (2, 2)), ShapeError, r"shape \(1, 3, 0, 4\)")
case("resample-zero-channels", lambda: resample(tok(1, 0, 4, 4), (2, 2)), ShapeError, r"shape \(1, 0, 4, 4\)")
case("resample-to-zero", lambda: resample(tok(1, 3, 4, 4), (0, 2)), MixresError, r"size has to be > 0, but got 0")
case("resample-int-map", lambda: resample(torch.ones(1, 3, 4, 4, dtype=torch.long), (2, 2)), ShapeError, r"torch\.int64")
case("resample-3-tuple", lambda: resample(tok(1, 3, 4, 4), (2, 2, 2)), TypeError, r"\(2, 2, 2\)")
case("resample-bool-size", lambda: resample(tok(1, 3, 4, 4), True), TypeError, r"True")
case("resample-list", lambda: resample([[1.0]], (2, 2)), TypeError, r"got list")
case("resample-rank3", lambda: resample(tok(3, 4, 4), (2, 2)), ShapeError, r"shape \(3, 4, 4\)")
case("map_to_tokens-zero-width", lambda: map_to_tokens(tok(1, 3, 4, 0)), ShapeError, r"shape \(1, 3, 4, 0\)")
case("tokens_to_map-zero-channels", lambda: tokens_to_map(tok(1, 4, 0), (2, 2)), ShapeError, r"C=0 channels \(shape \(1, 4, 0\)")
case("tokens_to_map-empty-batch", lambda: tokens_to_map(tok(0, 4, 3), (2, 2)), ShapeError, r"empty batch \(shape \(0, 4, 3\)")
case("tokens_to_map-negative-grid", lambda: tokens_to_map(tok(1, 4, 3), (-2, -2)), MixresError, r"got -2")
case("check_tokens-numpy", lambda: check_tokens(torch.zeros(1, 4, 3).numpy(), (2, 2)), TypeError, r"got ndarray")
case("check_map-rank5", lambda: check_map(tok(1, 2, 3, 4, 5)), ShapeError, r"shape \(1, 2, 3, 4, 5\)")
case("pos_embed-not-tensor", lambda: resample_pos_embed([1.0, 2.0], (2, 2)), TypeError, r"got list")
case("pos_embed-int", lambda: resample_pos_embed(torch.ones(1, 5, 8, dtype=torch.long), (3, 3)), ShapeError, r"torch\.int64")
case("pos_embed-prefix-too-many", lambda: resample_pos_embed(tok(1, 5, 8), (2, 2), num_prefix_tokens=9), ShapeError, r"num_prefix_tokens=9 leaves no grid rows")
case("pos_embed-prefix-negative", lambda: resample_pos_embed(tok(1, 5, 8), (2, 2), num_prefix_tokens=-1), TypeError, r"got -1")
case("pos_embed-bad-mode", lambda: resample_pos_embed(tok(1, 5, 8), (3, 3), interpolation="lanczos3"), MixresError, r"got 'lanczos3'")
case("pos_embed-nearest-antialias", lambda: resample_pos_embed(tok(1, 5, 8), (3, 3), interpolation="nearest"), MixresError, r"antialias=True.* got 'nearest'")
case("pos_embed-not-square", lambda: resample_pos_embed(tok(1, 7, 8), (3, 3)), ShapeError, r"6 grid rows, not a square")
case("pos_embed-old-grid-wrong", lambda: resample_pos_embed(tok(1, 7, 8), (3, 3), old_grid=(2, 2)), ShapeError, r"old_grid \(2, 2\) needs 4 rows, but pos_embed has 6")

# -- projectors and compressors ----------------------------------------------------------------
for name in PROJECTORS:
    case(f"{name}-int-tokens", lambda n=name: projector(n)(torch.ones(2, 3, 8, dtype=torch.long)), ShapeError, r"dtype torch\.int64")
    case(f"{name}-wrong-width", lambda n=name: projector(n)(tok(2, 3, 5)), ShapeError, r"in_dim=8, but the input has width 5")
    case(f"{name}-rank1", lambda n=name: projector(n)(tok(8)), ShapeError, r"got torch\.Size\(\[8\]\)")
    case(f"{name}-list", lambda n=name: projector(n)([1.0] * 8), ShapeError, r"got list")
for name in ("linear", "mlp2x_gelu"):
    case(f"{name}-float16-into-float32", lambda n=name: projector(n)(tok(2, 3, 8).half()), ShapeError, r"torch\.float16 but this \w+'s parameters are torch\.float32")
    case(f"{name}-meta-device", lambda n=name: projector(n)(tok(2, 3, 8, device="meta")), DeviceError, r"tokens is on meta")
case("identity-out_dim-differs", lambda: mixres.create_projector("identity", in_dim=8, out_dim=4), ConfigError, r"needs out_dim == in_dim \(8\), but got 4")
case("mlp-depth-0", lambda: mixres.create_projector("mlp_gelu", in_dim=8, out_dim=8, depth=0), MixresError, r"depth has to be > 0, but got 0")
case("linear-in_dim-float", lambda: mixres.create_projector("linear", in_dim=8.0, out_dim=8), TypeError, r"float 8\.0")
case("projector-unknown-name", lambda: mixres.create_projector("mlp_gelu2x", in_dim=8, out_dim=8), UnknownNameError, r"'mlp_gelu2x'")
for name in ("c_abstractor", "tokenpacker"):
    case(f"{name}-float16-into-float32", lambda n=name: compressor(n)(tok(2, 16, 8).half()), ShapeError, r"torch\.float16 but")
    case(f"{name}-meta-device", lambda n=name: compressor(n)(tok(2, 16, 8, device="meta")), DeviceError, r"tokens is on meta")
    case(f"{name}-not-square", lambda n=name: compressor(n)(tok(2, 15, 8)), ShapeError, r"N=15, not a square")
    case(f"{name}-int-tokens", lambda n=name: compressor(n)(torch.ones(2, 16, 8, dtype=torch.long)), ShapeError, r"torch\.int64")
case("c_abstractor-num_queries-not-square", lambda: mixres.create_projector("c_abstractor", in_dim=8, out_dim=8, num_queries=5), MixresError, r"num_queries=5 is not a square")
case("tokenpacker-heads", lambda: mixres.create_projector("tokenpacker", in_dim=8, out_dim=8, embed_dim=9, num_heads=2), MixresError, r"embed_dim=9 is not divisible by num_heads=2")

# -- pathways ----------------------------------------------------------------------------------
case("patchify-meta-images", lambda: patchify()(tok(1, 3, 16, 16, device="meta")), DeviceError, r"images is on meta")
case("patchify-zero-height", lambda: patchify()(tok(1, 3, 0, 16)), ShapeError, r"size \(0, 16\) is smaller than one patch")
case("patchify-smaller-than-patch", lambda: patchify()(tok(1, 3, 2, 16)), ShapeError, r"size \(2, 16\) is smaller than one patch / stride of 4")
case("patchify-not-multiple", lambda: patchify()(tok(1, 3, 18, 16)), ShapeError, r"size \(18, 16\) is not a multiple of the patch size 4")
case("patchify-uint8-images", lambda: patchify()(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), ShapeError, r"dtype torch\.uint8")
case("patchify-one-channel", lambda: patchify()(tok(1, 1, 16, 16)), ShapeError, r"got 1 \(shape \(1, 1, 16, 16\)\)")
case("patchify-empty-batch", lambda: patchify()(tok(0, 3, 16, 16)), ShapeError, r"empty batch \(shape \(0, 3, 16, 16\)\)")
case("patchify-dim-0", lambda: mixres.create_pathway("patchify", dim=0, patch_size=4, image_size=16), MixresError, r"dim has to be > 0, but got 0")
case("timm_map-too-small", lambda: _convnext()(tok(1, 3, 8, 8)), ShapeError, r"images size \(8, 8\) is too small")
case("timm_map-meta-images", lambda: _convnext()(tok(1, 3, 64, 64, device="meta")), DeviceError, r"images is on meta")

# -- registry and configs ----------------------------------------------------------------------
case("fusion-unknown-name", lambda: mixres.create_fusion("mr_adaptor", low_dim=8, high_dim=8), UnknownNameError, r"'mr_adaptor'.*mr_adapter")
case("fusion-unknown-kwarg", lambda: mixres.create_fusion("mr_adapter", low_dim=8, high_dim=8, gates="x"), MixresError, r"gates")
case("build-not-a-dict", lambda: mixres.build(3), TypeError, r"\bint\b")
case("build-unknown-kind", lambda: mixres.build({"kind": "fuser", "name": "mr_adapter"}), MixresError, r"'fuser'")
case("build-unknown-key", lambda: mixres.build({"kind": "projector", "name": "linear", "in_dim": 4, "out_dim": 4, "zz": 1}), MixresError, r"zz")


@functools.cache
def _convnext() -> torch.nn.Module:
    return mixres.create_pathway("timm_map", model_name="convnext_atto", out_indices=[-1])


@pytest.mark.parametrize("fn, error, fragment", CASES)
def test_refused(fn, error, fragment):
    with pytest.raises(error) as info:
        fn()
    assert re.search(fragment, str(info.value)), f"message {str(info.value)!r} lacks {fragment!r}"


def test_the_table_is_large():
    assert len(CASES) >= 100


def test_autocast_accepts_other_dtypes():
    """Under torch.autocast the dtype check steps aside: autocast casts both sides itself."""
    adapter = fusion("mr_final")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(tok(*T).bfloat16(), (2, 2), tok(*M).bfloat16())
    assert out.shape == (2, 4, 8)


# -- encoders and presets (the cycle presets exist only during their own call) ---------------
def _with_presets(registry, presets, call):
    """Register ``presets`` for one call, then remove them (a cycle must not leak into other tests)."""
    for name, config in presets.items():
        registry.register_preset(name, config)
    try:
        return call()
    finally:
        for name in presets:
            registry._presets.pop(name, None)


def _cycle():
    presets = {"zz_cycle_a": {"name": "zz_cycle_b"}, "zz_cycle_b": {"name": "zz_cycle_a"}}
    return _with_presets(mixres.FUSIONS, presets, lambda: mixres.create_fusion("zz_cycle_a", low_dim=8, high_dim=8))


def _self_cycle():
    presets = {"zz_self": {"name": "zz_self", "in_dim": 4}}
    return _with_presets(mixres.PROJECTORS, presets, lambda: mixres.create_projector("zz_self", out_dim=4))


ENCODER_CASES = [
    ("preset-cycle", _cycle, ConfigError, r"fusion presets form a cycle: zz_cycle_a -> zz_cycle_b -> zz_cycle_a"),
    ("preset-names-itself", _self_cycle, ConfigError, r"projector presets form a cycle: zz_self -> zz_self"),
    ("encoder-image-size-250", lambda: mixres.create_encoder("llava-hr-tiny", image_size=250), ShapeError, r"image size \(250, 250\) cannot be aligned: .* stride is 32"),
    ("encoder-image-size-non-square", lambda: mixres.create_encoder("llava-hr-tiny", image_size=(256, 200)), ShapeError, r"\(256, 200\) cannot be aligned"),
    ("num_tokens-250", lambda: _tiny().num_tokens(250), ShapeError, r"image size \(250, 250\) cannot be aligned"),
    ("grid_for-0", lambda: _tiny().grid_for(0), MixresError, r"image_size has to be > 0, but got 0"),
    ("forward-250px", lambda: _tiny()(tok(1, 3, 250, 250)), ShapeError, r"images: image size \(250, 250\) cannot be aligned"),
]


@functools.cache
def _tiny() -> torch.nn.Module:
    return mixres.create_encoder("llava-hr-tiny")


@pytest.mark.parametrize("fn, error, fragment", [pytest.param(f, e, m, id=i) for i, f, e, m in ENCODER_CASES])
def test_encoder_and_preset_refusals(fn, error, fragment):
    with pytest.raises(error) as info:
        fn()
    assert re.search(fragment, str(info.value)), str(info.value)


def test_describe_refuses_what_forward_refuses(capsys):
    """`mixres describe` reports the count forward would produce, or refuses like forward."""
    from mixres.cli import main

    assert main(["describe", "llava-hr-tiny", "--image-size", "250", "250"]) == 2
    assert "cannot be aligned" in capsys.readouterr().err
