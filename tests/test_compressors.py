"""Property tests of the token compressors: C-Abstractor (Honeybee) and TokenPacker."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mixres
from mixres import ConfigError, MixresError, ShapeError
from mixres.compressors import CAbstractor, TokenPacker, region_attention

dims = st.integers(1, 10)


def _packer(in_dim, out_dim, s=2, heads=1, **kw):
    return TokenPacker(in_dim, out_dim, scale_factor=s, num_heads=heads, **kw)


def _abstractor(in_dim, out_dim, q=(2, 3), **kw):
    return CAbstractor(in_dim, out_dim, num_queries=q, **kw)


MAKERS = {"c_abstractor": _abstractor, "tokenpacker": _packer}


# -- shape contract, token counts ----------------------------------------------------------------
@settings(max_examples=20)
@given(
    b=st.integers(1, 3), in_dim=dims, out_dim=dims, qh=st.integers(1, 4), qw=st.integers(1, 4),
    h=st.integers(1, 9), w=st.integers(1, 9), depth=st.integers(0, 2), mlp_depth=st.integers(1, 3),
)
def test_c_abstractor_shape_contract(b, in_dim, out_dim, qh, qw, h, w, depth, mlp_depth):
    m = CAbstractor(in_dim, out_dim, hidden_dim=in_dim + 2, depth=depth, mlp_depth=mlp_depth, num_queries=(qh, qw))
    out = m(torch.randn(b, h * w, in_dim), (h, w))
    assert out.shape == (b, m.num_tokens((h, w)), out_dim) == (b, qh * qw, out_dim)
    assert m.grid_for((h, w)) == (qh, qw)


@settings(max_examples=30)
@given(
    b=st.integers(1, 3), in_dim=dims, out_dim=dims, sh=st.integers(1, 3), sw=st.integers(1, 3),
    gh=st.integers(1, 4), gw=st.integers(1, 4), heads=st.sampled_from([1, 2]),
)
def test_tokenpacker_shape_contract(b, in_dim, out_dim, sh, sw, gh, gw, heads):
    m = TokenPacker(in_dim, out_dim, scale_factor=(sh, sw), embed_dim=2 * in_dim, num_heads=heads)
    h, w = gh * sh, gw * sw
    out = m(torch.randn(b, h * w, in_dim), (h, w))
    assert out.shape == (b, m.num_tokens((h, w)), out_dim) == (b, gh * gw, out_dim)


def test_square_default_grid_and_presets_of_the_papers():
    honeybee = CAbstractor(32, 16, depth=1)  # 144 queries by default (12x12)
    assert honeybee(torch.randn(1, 24 * 24, 32)).shape == (1, 144, 16)
    packer = TokenPacker(16, 8)  # s = 2, 8 heads: 24x24 -> 12x12 (LLaVA-TokenPacker-7B at 336 px)
    assert packer(torch.randn(1, 24 * 24, 16)).shape == (1, 144, 8) and packer.num_tokens(24) == 144


# -- batch independence, gradients, dtype, config ------------------------------------------------
@settings(max_examples=10)
@given(name=st.sampled_from(sorted(MAKERS)), in_dim=st.integers(4, 10), out_dim=dims, b=st.integers(2, 3), data=st.data())
def test_batch_independence(name, in_dim, out_dim, b, data):
    m = MAKERS[name](in_dim, out_dim).eval()
    tokens = torch.randn(b, 4 * 6, in_dim)
    j = data.draw(st.integers(0, b - 1))
    out = m(tokens, (4, 6))
    changed = tokens.clone()
    changed[j].normal_()
    out2 = m(changed, (4, 6))
    keep = [i for i in range(b) if i != j]
    torch.testing.assert_close(out[keep], out2[keep])
    assert not torch.allclose(out[j], out2[j])


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_gradients_reach_every_parameter(name):
    m = MAKERS[name](6, 5, **({"depth": 2} if name == "c_abstractor" else {"heads": 2}))
    m(torch.randn(2, 4 * 6, 6), (4, 6)).square().sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bf16(name):
    m = MAKERS[name](8, 6, dtype=torch.bfloat16)
    out = m(torch.randn(2, 4 * 6, 8, dtype=torch.bfloat16), (4, 6))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_config_round_trip(name):
    m = MAKERS[name](8, 6)
    cfg = json.loads(json.dumps(m.config))
    assert cfg["kind"] == "projector" and cfg["name"] == name
    again = mixres.build(cfg)
    assert again.config == m.config
    again.load_state_dict(m.state_dict())
    tokens = torch.randn(2, 24, 8)
    assert torch.equal(again(tokens, (4, 6)), m(tokens, (4, 6)))
    assert "in_dim=8, out_dim=6" in repr(m)


def test_registered_as_projectors():
    assert {"c_abstractor", "tokenpacker"} <= set(mixres.list_projectors())
    for name in ("c_abstractor", "tokenpacker"):
        m = mixres.create_projector(name, in_dim=8, out_dim=8)
        assert m(torch.randn(1, 48 * 48, 8)).shape[1] == m.num_tokens(48)


# -- fidelity ------------------------------------------------------------------------------------
def test_region_attention_hand_computed():
    # one query, a 1x2 region: softmax([q.k1, q.k2] / sqrt(2)) . [v1, v2]
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    v = torch.tensor([[[1.0, 10.0], [0.0, 20.0]]])
    a = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    out = region_attention(q, k, v, (1, 2), (1, 2))
    torch.testing.assert_close(out, torch.tensor([[[a, 10 * a + 20 * (1 - a)]]]))
    # two regions on a 1x4 grid: each query sees only its own pair of keys
    q2 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    k2 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
    v2 = torch.tensor([[[1.0], [0.0], [5.0], [7.0]]])
    out2 = region_attention(q2, k2, v2, (1, 4), (1, 2))
    torch.testing.assert_close(out2.flatten(), torch.tensor([a, 5 * (1 - a) + 7 * a]))


def test_tokenpacker_module_hand_computed_one_query():
    m = TokenPacker(3, 2, scale_factor=(1, 2), embed_dim=4, num_heads=1)
    x = torch.randn(1, 2, 3)  # grid (1, 2): one query, the mean of the two tokens (bilinear, 2 -> 1)
    q = m.ln_q_1(m.q_proj_1(x.mean(1)))
    k, v = m.ln_k_1(m.k_proj_1(x[0])), m.ln_v_1(m.v_proj_1(x[0]))
    wq, wk, wv = m.clip_attn.in_proj_weight.chunk(3)
    bq, bk, bv = m.clip_attn.in_proj_bias.chunk(3)
    scores = (q @ wq.T + bq) @ (k @ wk.T + bk).T / 2.0  # sqrt(embed_dim = 4)
    attended = scores.softmax(-1) @ (v @ wv.T + bv)
    expected = m.mlp(m.clip_attn.out_proj(attended))
    torch.testing.assert_close(m(x, (1, 2))[0], expected)


def _release_tokenpacker(m, x, grid):
    """The release's forward (single level), in its (sequence, batch, channel) layout."""
    b, _, c = x.shape
    h, w = grid
    s = m.scale_factor[0]
    key = m.ln_k_1(m.k_proj_1(x)).permute(1, 0, 2)
    value = m.ln_v_1(m.v_proj_1(x)).permute(1, 0, 2)
    q = F.interpolate(x.reshape(b, h, w, c).permute(0, 3, 1, 2), size=(h // s, w // s), mode="bilinear")
    query = m.ln_q_1(m.q_proj_1(q.permute(0, 2, 3, 1).reshape(b, -1, c))).permute(1, 0, 2)

    def regions(t, k, rows, cols):  # (rows*cols, B, E) -> (k*k, (rows/k)*(cols/k)*B, E)
        t = t.reshape(rows // k, k, cols // k, k, b, t.shape[-1])
        return t.permute(1, 3, 0, 2, 4, 5).reshape(k * k, -1, t.shape[-1])

    attn = torch.nn.MultiheadAttention(m.embed_dim, m.num_heads)  # sequence-first, as released
    attn.load_state_dict(m.clip_attn.state_dict())
    out = attn(regions(query, 1, h // s, w // s), regions(key, s, h, w), regions(value, s, h, w))[0]
    return m.mlp(out.reshape(-1, b, m.embed_dim).permute(1, 0, 2))


@pytest.mark.parametrize("s, side, heads", [(2, 4, 1), (2, 6, 2), (3, 6, 4)])
def test_tokenpacker_matches_the_release_layout(s, side, heads):
    m = TokenPacker(8, 6, scale_factor=s, num_heads=heads)
    x = torch.randn(2, side * side, 8)
    torch.testing.assert_close(m(x), _release_tokenpacker(m, x, (side, side)), rtol=1e-5, atol=1e-5)


def test_tokenpacker_release_init():
    m = TokenPacker(64, 32)
    assert torch.count_nonzero(m.mlp[0].bias) == 0 and m.q_proj_1.bias is None
    assert abs(m.mlp[0].weight.std().item() - 0.02) < 0.003  # trunc_normal_(std=0.02), torch's bounds (+-2)
    assert torch.equal(m.ln_q_1.weight, torch.ones(64)) and m.ln_q_1.eps == 1e-6


def test_c_abstractor_stages_are_timms_regstage():
    timm = pytest.importorskip("timm")
    from timm.layers import LayerNorm2d
    from timm.models.regnet import RegStage

    m = CAbstractor(12, 10, hidden_dim=16, depth=2, num_queries=4)
    for i, (cin, cout) in ((0, (12, 16)), (2, (16, 16))):
        ref = RegStage(2, cin, cout, stride=1, dilation=1, act_layer=torch.nn.SiLU, norm_layer=LayerNorm2d)
        ref.load_state_dict(m.net[i].state_dict())  # strict: same parameter names (released weights load)
        x = torch.randn(2, cin, 5, 3)
        torch.testing.assert_close(m.net[i](x), ref(x))
    assert timm is not None
    assert [k for k in m.state_dict() if k.startswith("readout")] == ["readout.0.weight", "readout.0.bias", "readout.2.weight", "readout.2.bias"]


def test_c_abstractor_pools_to_the_query_grid():
    m = CAbstractor(2, 2, depth=0, mlp_depth=1, num_queries=4)  # pool only, then one linear
    with torch.no_grad():
        m.readout[0].weight.copy_(torch.eye(2))
        m.readout[0].bias.zero_()
    tokens = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 2)
    out = m(tokens)  # 4x4 grid 0..15 -> 2x2 means
    assert out[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


# -- bad inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m: m(torch.randn(1, 12, 8)), ShapeError, "N=12, not a square; pass grid"),
        (lambda m: m(torch.randn(1, 12, 8), (3, 3)), ShapeError, r"N=12 tokens, but grid \(3, 3\)"),
        (lambda m: m(torch.randn(1, 16, 7)), ShapeError, "C=7 channels.*in_dim=8"),
        (lambda m: m(torch.randn(16, 8)), ShapeError, "rank 3"),
        (lambda m: m([[0.0]]), TypeError, "tokens has to be a Tensor"),
        (lambda m: m(torch.zeros(1, 16, 8, dtype=torch.int64)), ShapeError, "floating point"),
        (lambda m: m(torch.zeros(1, 16, 8), (4,)), TypeError, "grid"),
    ],
)
def test_bad_inputs(name, make, error, match):
    with pytest.raises(error, match=match):
        make(MAKERS[name](8, 4))


def test_bad_constructor_arguments_and_grids():
    with pytest.raises(ShapeError, match=r"grid \(5, 4\) is not divisible by scale_factor \(2, 2\)"):
        _packer(8, 4)(torch.randn(1, 20, 8), (5, 4))
    with pytest.raises(ShapeError, match="not divisible"):
        _packer(8, 4).num_tokens((3, 3))
    with pytest.raises(MixresError, match="embed_dim=6 is not divisible by num_heads=4"):
        TokenPacker(6, 4, num_heads=4)
    with pytest.raises(MixresError, match="num_queries=10 is not a square number"):
        CAbstractor(8, 4, num_queries=10)
    with pytest.raises(MixresError, match="depth has to be an int >= 0"):
        CAbstractor(8, 4, depth=-1)
    with pytest.raises(TypeError, match="in_dim has to be an int"):
        CAbstractor(8.0, 4)
    with pytest.raises(ConfigError, match="takes no argument"):
        mixres.create_projector("tokenpacker", in_dim=8, out_dim=8, queries=4)
    with pytest.raises(ShapeError, match="does not divide into 2x2 regions"):
        region_attention(torch.zeros(1, 1, 2), torch.zeros(1, 6, 2), torch.zeros(1, 6, 2), (2, 3), (2, 2))
