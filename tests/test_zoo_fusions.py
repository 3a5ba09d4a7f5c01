"""Property tests of the fusion zoo: patch_mining, sva, gated_xattn, channel_concat, hybrid_split."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mixres
from mixres import ConfigError, ShapeError
from mixres.fusions.channel_concat import ChannelConcat, channel_concat
from mixres.fusions.gated_xattn import GatedCrossAttention, cross_attention
from mixres.fusions.hybrid_split import HybridSplit
from mixres.fusions.patch_mining import PatchMining, gather_windows, window_attention, window_grid
from mixres.fusions.sva import SVA

NAMES = ["patch_mining", "sva", "gated_xattn", "channel_concat", "hybrid_split"]
MULTI = {"sva", "channel_concat"}  # take a list of maps, one per source
ZERO_INIT = ["patch_mining", "sva", "gated_xattn"]  # the identity at init

sides = st.integers(1, 5)
map_sides = st.integers(1, 12)


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny tensors run several times faster on one thread (the slow full-size tests keep them all)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(name, cl, chs, *, zero_init=True, out_dim=None, query_grid=None, dtype=None):
    """A tiny instance of ``name``; heads and widths chosen to exercise the options."""
    if name == "patch_mining":
        return PatchMining(cl, chs[0], num_heads=2, zero_init=zero_init, dtype=dtype)
    if name == "sva":
        return SVA(cl, chs, out_dim, query_grid=query_grid, num_layers=2, num_heads=2, zero_init=zero_init, dtype=dtype)
    if name == "gated_xattn":
        return GatedCrossAttention(cl, chs[0], num_heads=2, attn_dim=6, mlp_ratio=2.0, dtype=dtype)
    if name == "channel_concat":
        return ChannelConcat(cl, chs, out_dim, dtype=dtype)
    return HybridSplit(cl, chs[0], out_dim, dtype=dtype)


def _perturb(module):
    """Move every parameter off its init (zero-inits included) so outputs depend on all of them."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.eval()


@dataclass
class Problem:
    name: str
    b: int
    cl: int
    chs: list
    grid: tuple
    sizes: list
    out_dim: int | None = None
    query_grid: tuple | None = None
    seed: int = 0

    def inputs(self, dtype=torch.float32):
        h, w = self.grid
        tokens = torch.randn(self.b, h * w, self.cl, dtype=dtype)
        maps = [torch.randn(self.b, c, H, W, dtype=dtype) for c, (H, W) in zip(self.chs, self.sizes)]
        return tokens, self.grid, maps if self.name in MULTI else maps[0]

    def build(self, **kw):
        torch.manual_seed(self.seed)  # init and inputs depend on the drawn example only
        return _build(self.name, self.cl, self.chs, out_dim=self.out_dim, query_grid=self.query_grid, **kw)

    def expected_shape(self):
        grid = self.query_grid or self.grid
        width = self.out_dim or (self.cl + sum(self.chs) if self.name == "channel_concat" else self.cl)
        return (self.b, grid[0] * grid[1], width)


@st.composite
def problems(draw, name, batch=st.integers(1, 3), keep=False, min_window=1, min_dim=1):
    """Random sizes for ``name``.

    ``keep``: same grid and width out; ``min_window``: map pixels per token along W; ``min_dim``:
    the least token and map widths (a LayerNorm over 2 channels gives only two vectors, +-1, so
    two keys can coincide and leave the query without gradient).
    """
    num_sources = draw(st.integers(1, 3)) if name in MULTI else 1
    h, w = draw(sides), draw(sides)
    if min_window > 1:  # a window of one pixel leaves the queries and keys without gradient
        sizes = [(h * draw(st.integers(1, 3)), w * draw(st.integers(min_window, 3))) for _ in range(num_sources)]
    else:
        sizes = [(draw(map_sides), draw(map_sides)) for _ in range(num_sources)]
    out_dim = query_grid = None
    if not keep and name in ("sva", "channel_concat", "hybrid_split"):
        out_dim = draw(st.none() | st.integers(1, 6).map(lambda k: 2 * k))
    if not keep and name == "sva":
        query_grid = draw(st.none() | st.tuples(st.integers(1, 4), st.integers(1, 4)))
    return Problem(
        name=name,
        b=draw(batch),
        cl=2 * draw(st.integers((min_dim + 1) // 2, 6)),
        chs=[draw(st.integers(max(2, min_dim), 10)) for _ in range(num_sources)],
        grid=(h, w),
        sizes=sizes,
        out_dim=out_dim,
        query_grid=query_grid,
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_shape_contract(name, data):
    p = data.draw(problems(name))
    out = p.build(zero_init=False)(*p.inputs())
    assert out.shape == p.expected_shape()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZERO_INIT)
@given(data=st.data())
def test_identity_at_init(name, data):
    p = data.draw(problems(name, keep=True))
    fusion = p.build(zero_init=True)
    tokens, grid, map = p.inputs()
    assert torch.equal(fusion(tokens, grid, map), tokens)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_batch_independence(name, data):
    p = data.draw(problems(name, batch=st.integers(2, 4)))
    fusion = _perturb(p.build(zero_init=False))
    tokens, grid, map = p.inputs()
    maps = map if isinstance(map, list) else [map]
    j = data.draw(st.integers(0, p.b - 1))
    out = fusion(tokens, grid, map)
    tokens2, maps2 = tokens.clone(), [m.clone() for m in maps]
    tokens2[j].normal_()
    for m in maps2:
        m[j].normal_()
    out2 = fusion(tokens2, grid, maps2 if isinstance(map, list) else maps2[0])
    keep = [i for i in range(p.b) if i != j]
    torch.testing.assert_close(out[keep], out2[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[j], out2[j])


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_dtype_preserved(name, data):
    p = data.draw(problems(name, batch=st.just(2)))
    for dtype in (torch.float32, torch.bfloat16):
        fusion = _perturb(p.build(zero_init=False, dtype=dtype))
        out = fusion(*p.inputs(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_gradients_reach_every_parameter_after_one_step(name, data):
    p = data.draw(problems(name, batch=st.just(2), keep=True, min_window=2, min_dim=3))
    if name in ("sva", "channel_concat"):
        p.out_dim = p.cl + 2  # exercise the final projection (channel_concat has no other parameter)
    fusion = p.build(zero_init=True)
    opt = torch.optim.SGD(fusion.parameters(), lr=0.5)
    tokens, grid, map = p.inputs()
    target = torch.randn(p.expected_shape())
    for _ in range(2):  # zero-init (and tanh(0) gates) block the first layers' gradient until one step is taken
        opt.zero_grad()
        ((fusion(tokens, grid, map) - target) ** 2).mean().backward()
        opt.step()
    for param_name, param in fusion.named_parameters():
        if _key_bias(param_name) and len(p.chs) == 1:
            # a bias on the keys shifts all scores of a query by one amount, which the softmax
            # ignores: no gradient in exact arithmetic (with several sources sharing one softmax, it has one)
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def _key_bias(param_name):
    return "k_proj" in param_name and param_name.endswith("bias")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_config_round_trip(name, data):
    p = data.draw(problems(name, batch=st.just(2)))
    fusion = _perturb(p.build(zero_init=False))
    config = json.loads(json.dumps(fusion.config))
    rebuilt = mixres.build(config)
    assert rebuilt.config == fusion.config and config["name"] == name
    shapes = {k: v.shape for k, v in fusion.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(fusion.state_dict())
    inputs = p.inputs()
    assert torch.equal(rebuilt.eval()(*inputs), fusion(*inputs))
    assert repr(fusion)


# -- parameter counts: the formulas in the module docstrings and docs pages -------------------
def _numel(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_formulas():
    cl, ch = 6, 10
    assert _numel(PatchMining(cl, ch)) == cl**2 + 2 * ch * cl + 5 * cl + 4 * ch
    chs, d, layers, out = [3, 5, 7], 4, 2, 9
    s = len(chs)
    sva_count = sum(chs) * d + s * (d * d + 4 * d) + layers * ((5 + 2 * s) * d * d + 2 * cl * d + (4 + 4 * s) * d)
    assert _numel(SVA(cl, chs, hidden_dim=d, num_layers=layers, num_heads=2)) == sva_count
    assert _numel(SVA(cl, chs, out, hidden_dim=d, num_layers=layers, num_heads=2)) == sva_count + (cl + 1) * out
    attn, r = 4, 2.0
    xattn = 2 * cl * attn + 2 * ch * attn + 2 * cl + 1
    assert _numel(GatedCrossAttention(cl, ch, attn_dim=attn, ffn=False)) == xattn
    assert _numel(GatedCrossAttention(cl, ch, attn_dim=attn, mlp_ratio=r)) == xattn + int(2 * r * cl * cl) + 2 * cl + 1
    assert _numel(ChannelConcat(cl, chs)) == 0
    assert _numel(ChannelConcat(cl, chs, out)) == (cl + sum(chs) + 1) * out
    for depth in (1, 3):
        assert _numel(HybridSplit(cl, ch, 8, depth=depth)) == (ch + cl + 2) * 4 + (depth - 1) * (8 * 8 + 8)


# -- hand-computed small cases ----------------------------------------------------------------
def _softmax_mix(q, keys, values, scale):
    """One query over a few keys, by hand: sum_j exp(s_j) v_j / sum_j exp(s_j)."""
    scores = [math.exp(scale * sum(a * b for a, b in zip(q, k))) for k in keys]
    total = sum(scores)
    return [sum(s * v[c] for s, v in zip(scores, values)) / total for c in range(len(values[0]))]


def test_window_attention_one_query_two_keys():
    q = torch.tensor([[[1.0, 0.0]]])  # B=1, N=1
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # K=2
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = _softmax_mix([1.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]], 1 / math.sqrt(2))
    torch.testing.assert_close(window_attention(q, k, v), torch.tensor([[expected]]))
    # two heads of width 1: each head has its own softmax
    head0 = _softmax_mix([1.0], [[1.0], [0.0]], [[1.0], [3.0]], 1.0)
    head1 = _softmax_mix([0.0], [[0.0], [1.0]], [[2.0], [4.0]], 1.0)
    torch.testing.assert_close(window_attention(q, k, v, num_heads=2), torch.tensor([[head0 + head1]]))


def test_cross_attention_one_query_two_keys():
    q, k, v = torch.tensor([[[2.0, 1.0]]]), torch.tensor([[[1.0, 1.0], [0.0, -1.0]]]), torch.tensor([[[5.0, 0.0], [1.0, 2.0]]])
    expected = _softmax_mix([2.0, 1.0], [[1.0, 1.0], [0.0, -1.0]], [[5.0, 0.0], [1.0, 2.0]], 1 / math.sqrt(2))
    torch.testing.assert_close(cross_attention(q, k, v), torch.tensor([[expected]]))


def test_gather_windows_and_window_grid_by_hand():
    map = torch.arange(8.0).view(1, 1, 2, 4)  # rows [0 1 2 3], [4 5 6 7]; grid (1, 2): 2x2 windows
    assert gather_windows(map, (1, 2)).flatten(2).tolist() == [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]
    assert window_grid((5, 7), (2, 3)) == (3, 2)  # round(2.5) -> 3 (half up), round(2.33) -> 2
    assert window_grid((1, 1), (4, 4)) == (1, 1)  # at least one pixel: the map is up-sampled


def _identity_projections(module, *names):
    for name in names:
        setattr(module, name, nn.Identity())


def test_patch_mining_hand_computed():
    mining = PatchMining(2, 2)
    _identity_projections(mining, "q_proj", "k_proj", "v_proj")
    tokens = torch.tensor([[[1.0, 0.0]]])  # grid (1, 1): the whole 1x2 map is its window
    map = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixels (1, 0) and (0, 1)
    mined = _softmax_mix([1.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], 1 / math.sqrt(2))
    torch.testing.assert_close(mining(tokens, (1, 1), map), torch.tensor([[[1.0 + mined[0], mined[1]]]]))


def test_sva_one_softmax_over_all_sources_hand_computed():
    sva = SVA(2, [2, 2], num_layers=1)
    sva.sources = nn.ModuleList([nn.Identity(), nn.Identity()])
    layer = sva.layers[0]
    _identity_projections(layer, "q_proj", "o_proj", "norm", "out_mlp")
    layer.k_proj = nn.ModuleList([nn.Identity(), nn.Identity()])
    layer.v_proj = nn.ModuleList([nn.Identity(), nn.Identity()])
    with torch.no_grad():
        layer.in_proj.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))  # [I, 0]: ignore the context
    x, a, b = [0.5, 1.0], [1.0, -1.0], [2.0, 0.0]
    maps = [torch.tensor(a).view(1, 2, 1, 1), torch.tensor(b).view(1, 2, 1, 1)]
    # x + (q + attention) with q = x: the two sources' keys share one softmax
    mixed = _softmax_mix(x, [a, b], [a, b], 1 / math.sqrt(2))
    expected = [2 * x[c] + mixed[c] for c in range(2)]
    torch.testing.assert_close(sva(torch.tensor([[x]]), (1, 1), maps), torch.tensor([[expected]]))


def test_gated_xattn_hand_computed():
    xattn = GatedCrossAttention(2, 2, ffn=False)
    _identity_projections(xattn, "norm", "q_proj", "k_proj", "v_proj", "out_proj")
    with torch.no_grad():
        xattn.attn_gate.fill_(math.atanh(0.5))  # tanh(alpha) = 0.5
    tokens = torch.tensor([[[1.0, 2.0]]])
    map = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)  # pixels (0, 1) and (1, 0)
    mixed = _softmax_mix([1.0, 2.0], [[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]], 1 / math.sqrt(2))
    expected = [[[1.0 + 0.5 * mixed[0], 2.0 + 0.5 * mixed[1]]]]
    torch.testing.assert_close(xattn(tokens, (1, 1), map), torch.tensor(expected))


def test_channel_concat_hand_computed():
    tokens = torch.tensor([[[1.0]]])
    maps = [torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2), torch.tensor([7.0]).view(1, 1, 1, 1)]
    assert ChannelConcat(1, [1, 1])(tokens, (1, 1), maps).tolist() == [[[1.0, 2.5, 7.0]]]  # 2x2 mean pooled
    assert channel_concat(tokens, (1, 1), maps).tolist() == [[[1.0, 2.5, 7.0]]]
    assert ChannelConcat(1, 1)(tokens, (1, 1), maps[1]).tolist() == [[[1.0, 7.0]]]  # one source: a tensor


def test_hybrid_split_hand_computed():
    split = HybridSplit(1, 1, out_dim=2, depth=1)
    with torch.no_grad():
        split.high_up_proj.weight.fill_(2.0)
        split.high_up_proj.bias.zero_()
        split.low_up_proj.weight.fill_(3.0)
        split.low_up_proj.bias.fill_(1.0)
    map = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)  # pooled to 2.5
    assert split(torch.tensor([[[1.0]]]), (1, 1), map).tolist() == [[[5.0, 4.0]]]  # [high, low], as released


def test_sva_query_grid_and_out_dim():
    sva = SVA(4, [3, 5], 6, query_grid=2, num_heads=2)
    maps = [torch.randn(1, 3, 7, 7), torch.randn(1, 5, 2, 2)]
    assert sva(torch.randn(1, 9, 4), (3, 3), maps).shape == (1, 4, 6)
    assert sva.output_grid((3, 3)) == (2, 2) and SVA(4, 3).output_grid((3, 5)) == (3, 5)
    assert not sva.in_stream and SVA(4, 3).in_stream


def test_official_key_names():
    from mixres.fusions.patch_mining import OFFICIAL_KEYS

    assert set(OFFICIAL_KEYS.values()) == {"q_proj", "k_proj", "v_proj"}
    keys = set(HybridSplit(4, 4, 8).state_dict())  # DeepSeek-VL's aligner names, unchanged
    assert keys == {"high_up_proj.weight", "high_up_proj.bias", "low_up_proj.weight", "low_up_proj.bias", "layers.1.weight", "layers.1.bias"}


# -- bad inputs ---------------------------------------------------------------------------------
TINY = {
    "patch_mining": lambda: PatchMining(8, 6),
    "sva": lambda: SVA(8, [6, 4]),
    "gated_xattn": lambda: GatedCrossAttention(8, 6),
    "channel_concat": lambda: ChannelConcat(8, [6, 4]),
    "hybrid_split": lambda: HybridSplit(8, 6),
}


def _call(name, tokens, grid, maps):
    return TINY[name]()(tokens, grid, maps if name in MULTI else maps[0])


def _good_maps(b=2):
    return [torch.zeros(b, 6, 3, 3), torch.zeros(b, 4, 5, 5)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "tokens, grid, maps, match",
    [
        (torch.zeros(8, 4), (2, 2), _good_maps(), r"rank 3.*got shape \(8, 4\)"),
        (torch.zeros(2, 4, 8), (2, 2), [torch.zeros(2, 6, 3), torch.zeros(2, 4, 5, 5)], r"rank 4.*got shape \(2, 6, 3\)"),
        (torch.zeros(2, 5, 8), (2, 2), _good_maps(), r"N=5 tokens, but grid \(2, 2\) needs h\*w=4"),
        (torch.zeros(2, 4, 7), (2, 2), _good_maps(), "C=7 channels.*low_dim=8"),
        (torch.zeros(2, 4, 8), (2, 2), [torch.zeros(2, 5, 3, 3), torch.zeros(2, 4, 5, 5)], r"C=5 channels.*high_dim(\[0\])?=6"),
        (torch.zeros(0, 4, 8), (2, 2), _good_maps(0), r"empty batch \(shape \(0, 4, 8\)\)"),
        (torch.zeros(2, 4, 8), (2, 2), _good_maps(3), "tokens have batch 2 but map.* has batch 3"),
        (torch.zeros(2, 4, 8), (2, 2), [m.double() for m in _good_maps()], "float32.*float64"),
    ],
)
def test_bad_inputs(name, tokens, grid, maps, match):
    with pytest.raises(ShapeError, match=match):
        _call(name, tokens, grid, maps)


@pytest.mark.parametrize("name", sorted(MULTI))
def test_bad_source_lists(name):
    tokens = torch.zeros(2, 4, 8)
    with pytest.raises(ShapeError, match=r"got 1 source map\(s\), but this \w+ was built for 2 \(high_dim=\[6, 4\]\)"):
        _call(name, tokens, (2, 2), [torch.zeros(2, 6, 3, 3)])
    with pytest.raises(ShapeError, match=r"got 3 source map\(s\).*built for 2"):
        _call(name, tokens, (2, 2), _good_maps() + [torch.zeros(2, 4, 3, 3)])
    with pytest.raises(ShapeError, match=r"map\[1\] has C=5 channels.*high_dim\[1\]=4"):
        _call(name, tokens, (2, 2), [torch.zeros(2, 6, 3, 3), torch.zeros(2, 5, 3, 3)])
    with pytest.raises(TypeError, match="map has to be a Tensor.*got dict"):
        TINY[name]()(tokens, (2, 2), {"a": torch.zeros(2, 6, 3, 3)})


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_heads has to divide low_dim=8, but got num_heads=3"):
        PatchMining(8, 6, num_heads=3)
    with pytest.raises(ValueError, match="num_heads has to divide hidden_dim=8, but got num_heads=3"):
        SVA(8, 6, num_heads=3)
    with pytest.raises(ValueError, match="num_heads has to divide attn_dim=10, but got num_heads=4"):
        GatedCrossAttention(8, 6, num_heads=4, attn_dim=10)
    with pytest.raises(ValueError, match="mlp_ratio has to be a number.*got 0"):
        GatedCrossAttention(8, 6, mlp_ratio=0)
    with pytest.raises(ValueError, match="out_dim has to be even.*got 7"):
        HybridSplit(8, 6, out_dim=7)
    with pytest.raises(ValueError, match="depth has to be > 0, but got 0"):
        HybridSplit(8, 6, depth=0)
    with pytest.raises(ValueError, match=r"high_dim has to name at least one source width, but got \[\]"):
        ChannelConcat(8, [])
    with pytest.raises(ValueError, match=r"high_dim\[1\] has to be > 0, but got 0"):
        SVA(8, [6, 0])
    with pytest.raises(TypeError, match="high_dim has to be an int or a list of ints"):
        SVA(8, "6")
    with pytest.raises(TypeError, match="query_grid has to be an int or a pair"):
        SVA(8, 6, query_grid=(1, 2, 3))
    with pytest.raises(ValueError, match="num_layers has to be > 0"):
        SVA(8, 6, num_layers=0)
    with pytest.raises(ConfigError, match=r"takes no argument\(s\) \['heads'\]"):
        mixres.create_fusion("gated_xattn", low_dim=8, high_dim=6, heads=2)
    with pytest.raises(ConfigError, match=r"needs argument\(s\) \['high_dim'\]"):
        mixres.create_fusion("sva", low_dim=8)


def test_attention_functions_reject_bad_shapes():
    with pytest.raises(ShapeError, match=r"window_attention needs q Tensor\[B, N, D\].*\(2, 3, 4\), \(2, 4, 5, 4\)"):
        window_attention(torch.zeros(2, 3, 4), torch.zeros(2, 4, 5, 4), torch.zeros(2, 4, 5, 4))
    with pytest.raises(ShapeError, match="divisible by num_heads=3"):
        cross_attention(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), num_heads=3)


# -- registry and presets -----------------------------------------------------------------------
PRESETS = {
    # name: (token grid, token width, one (C, H, W) per source, expected output width)
    "patch_mining_mgm": ((24, 24), 1024, [(2880, 192, 192)], 1024),
    "sva_cambrian": ((24, 24), 1024, [(1152, 27, 27), (1024, 24, 24), (1536, 27, 27), (5760, 96, 96)], 1024),
    "gated_xattn_cogagent": ((16, 16), 4096, [(1024, 80, 80)], 4096),
    "channel_concat_eagle": ((32, 32), 1024, [(3072, 32, 32), (1024, 32, 32), (1024, 64, 64), (1536, 64, 64)], 7680),
    "hybrid_split_deepseek": ((24, 24), 1024, [(1024, 24, 24)], 4096),
}
TOKENS_OUT = {"patch_mining_mgm": 576, "sva_cambrian": 576, "gated_xattn_cogagent": 256, "channel_concat_eagle": 1024, "hybrid_split_deepseek": 576}


def test_names_and_presets_are_registered():
    assert set(NAMES) <= set(mixres.list_fusions())
    for preset, (_, cl, sources, _) in PRESETS.items():
        config = mixres.FUSIONS.resolve(preset)
        assert config["name"] in NAMES and config["low_dim"] == cl
        dims = config["high_dim"] if isinstance(config["high_dim"], list) else [config["high_dim"]]
        assert dims == [c for c, _, _ in sources], preset


def test_presets_resolve_with_tiny_overrides():
    sva = mixres.create_fusion("sva_cambrian", low_dim=8, high_dim=[2, 2, 2, 2], hidden_dim=4, num_heads=2, query_grid=3)
    assert sva.config["num_layers"] == 3 and sva.output_grid((5, 5)) == (3, 3)
    maps = [torch.randn(1, 2, s, s) for s in (27, 24, 27, 96)]
    assert sva(torch.randn(1, 25, 8), (5, 5), maps).shape == (1, 9, 8)
    xattn = mixres.create_fusion("gated_xattn_cogagent", low_dim=8, high_dim=4, attn_dim=8, num_heads=4)
    assert xattn.config["ffn"] is False and xattn.ffn is None


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_size_presets_forward(preset):
    (h, w), cl, sources, out_dim = PRESETS[preset]
    fusion = mixres.create_fusion(preset)
    maps = [torch.randn(1, c, H, W) for c, H, W in sources]
    with torch.no_grad():
        out = fusion(torch.randn(1, h * w, cl), (h, w), maps if fusion.config["name"] in MULTI else maps[0])
    assert out.shape == (1, TOKENS_OUT[preset], out_dim)
    assert torch.isfinite(out).all()
