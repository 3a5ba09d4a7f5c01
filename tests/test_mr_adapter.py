"""Property tests of the MR-Adapter and the final fusion (arXiv 2403.03003 Eq. 3-4)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mixres
from mixres import ConfigError, MRAdapter, MRFinalFusion, ShapeError
from mixres.fusions.mr_adapter import GATE_ACTIVATIONS, GATE_KINDS, MERGES, convert_official_state_dict

dims = st.integers(2, 12)
sides = st.integers(1, 6)
map_sides = st.integers(1, 12)
options = st.fixed_dictionaries(
    {
        "gate": st.sampled_from(GATE_KINDS),
        "gate_act": st.sampled_from(GATE_ACTIVATIONS),
        "merge": st.sampled_from(MERGES),
        "kernel_size": st.sampled_from([1, 3, 7]),
    }
)


def _inputs(b, cl, ch, h, w, H, W, dtype=torch.float32):
    return torch.randn(b, h * w, cl, dtype=dtype), (h, w), torch.randn(b, ch, H, W, dtype=dtype)


@given(b=st.integers(1, 3), cl=dims, ch=dims, h=sides, w=sides, H=map_sides, W=map_sides, opts=options)
def test_shape_contract(b, cl, ch, h, w, H, W, opts):
    adapter = MRAdapter(cl, ch, zero_init=False, **opts)
    tokens, grid, map = _inputs(b, cl, ch, h, w, H, W)
    assert adapter(tokens, grid, map).shape == tokens.shape
    final = MRFinalFusion(cl, ch, out_dim=cl + 3)
    assert final(tokens, grid, map).shape == (b, h * w, cl + 3)


@given(b=st.integers(1, 3), cl=dims, ch=dims, h=sides, w=sides, H=map_sides, W=map_sides, opts=options)
def test_identity_at_init(b, cl, ch, h, w, H, W, opts):
    adapter = MRAdapter(cl, ch, zero_init=True, **opts)
    tokens, grid, map = _inputs(b, cl, ch, h, w, H, W)
    assert torch.equal(adapter(tokens, grid, map), tokens)


@given(b=st.integers(2, 4), cl=dims, ch=dims, h=sides, w=sides, H=map_sides, W=map_sides, opts=options, data=st.data())
def test_batch_independence(b, cl, ch, h, w, H, W, opts, data):
    adapter = MRAdapter(cl, ch, zero_init=False, **opts).eval()
    tokens, grid, map = _inputs(b, cl, ch, h, w, H, W)
    j = data.draw(st.integers(0, b - 1))
    out = adapter(tokens, grid, map)
    tokens2, map2 = tokens.clone(), map.clone()
    tokens2[j].normal_()
    map2[j].normal_()
    out2 = adapter(tokens2, grid, map2)
    keep = [i for i in range(b) if i != j]
    torch.testing.assert_close(out[keep], out2[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[j], out2[j])


@given(cl=dims, ch=dims, h=sides, w=sides, H=map_sides, W=map_sides, opts=options)
def test_dtype_preserved(cl, ch, h, w, H, W, opts):
    for dtype in (torch.float32, torch.bfloat16):
        adapter = MRAdapter(cl, ch, zero_init=False, dtype=dtype, **opts)
        tokens, grid, map = _inputs(2, cl, ch, h, w, H, W, dtype)
        out = adapter(tokens, grid, map)
        assert out.dtype == dtype and torch.isfinite(out).all()


@given(cl=dims, ch=dims, h=sides, w=sides, H=map_sides, W=map_sides, opts=options)
def test_gradients_reach_every_parameter_after_one_step(cl, ch, h, w, H, W, opts):
    adapter = MRAdapter(cl, ch, zero_init=True, **opts)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.5)
    tokens, grid, map = _inputs(2, cl, ch, h, w, H, W)
    target = torch.randn_like(tokens)
    for _ in range(2):  # zero-init blocks the gradient of the first layers until one step is taken
        opt.zero_grad()
        ((adapter(tokens, grid, map) - target) ** 2).mean().backward()
        opt.step()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@given(cl=dims, ch=dims, h=sides, w=sides, H=map_sides, W=map_sides, opts=options)
def test_config_round_trip(cl, ch, h, w, H, W, opts):
    adapter = MRAdapter(cl, ch, zero_init=False, **opts)
    rebuilt = mixres.build(adapter.config)
    assert rebuilt.config == adapter.config
    ours = {k: v.shape for k, v in adapter.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == ours
    rebuilt.load_state_dict(adapter.state_dict())
    tokens, grid, map = _inputs(2, cl, ch, h, w, H, W)
    assert torch.equal(rebuilt(tokens, grid, map), adapter(tokens, grid, map))


def test_config_is_json_and_names_the_entry():
    import json

    for name in mixres.list_fusions("mr*"):
        m = mixres.create_fusion(name, low_dim=8, high_dim=4)
        assert json.loads(json.dumps(m.config)) == m.config
        assert m.config["kind"] == "fusion" and m.config["name"] in ("mr_adapter", "mr_final")


def _released_reference(tokens, map, sd, grid):
    """The LLaVA-HR release's S2FStitchAlignModuleV2 forward, written out with F.* calls."""
    b, _, d = tokens.shape
    h, w = grid
    slow = F.conv2d(F.gelu(F.conv2d(map, sd["slow_conv.weight"], sd["slow_conv.bias"])), sd["slow_proj.weight"], sd["slow_proj.bias"])
    H = slow.shape[-1]
    if H > h:
        slow = F.avg_pool2d(slow, H // h, H // h)
    elif H < h:
        slow = F.interpolate(slow, size=(h, w), mode="bilinear", align_corners=True)
    slow = slow.flatten(2).transpose(1, 2)
    fast = tokens.transpose(1, 2).reshape(b, d, h, w)
    fast = fast + F.conv2d(F.gelu(F.conv2d(fast, sd["fast_conv.weight"], sd["fast_conv.bias"], padding=3, groups=d)), sd["fast_proj.weight"], sd["fast_proj.bias"])
    fast = fast.flatten(2).transpose(1, 2)
    g = F.linear(F.gelu(F.linear(torch.cat([fast, slow], -1).mean(1), sd["gate.0.weight"], sd["gate.0.bias"])), sd["gate.2.weight"], sd["gate.2.bias"])
    return fast + slow * g.unsqueeze(1).tanh()


@pytest.mark.parametrize("map_side", [2, 4, 8])
def test_matches_released_code_with_official_weights(map_side):
    cl, ch, grid = 8, 6, (4, 4)
    torch.manual_seed(1)
    sd = {
        "slow_conv.weight": torch.randn(ch, ch, 1, 1), "slow_conv.bias": torch.randn(ch),
        "slow_proj.weight": torch.randn(cl, ch, 1, 1), "slow_proj.bias": torch.randn(cl),
        "fast_conv.weight": torch.randn(cl, 1, 7, 7), "fast_conv.bias": torch.randn(cl),
        "fast_proj.weight": torch.randn(cl, cl, 1, 1), "fast_proj.bias": torch.randn(cl),
        "gate.0.weight": torch.randn(cl // 2, 2 * cl), "gate.0.bias": torch.randn(cl // 2),
        "gate.2.weight": torch.randn(1, cl // 2), "gate.2.bias": torch.randn(1),
    }
    adapter = MRAdapter(cl, ch)
    adapter.load_state_dict(convert_official_state_dict(sd))  # strict: every key mapped
    tokens, map = torch.randn(2, 16, cl), torch.randn(2, ch, map_side, map_side)
    torch.testing.assert_close(adapter(tokens, grid, map), _released_reference(tokens, map, sd, grid))


def test_released_init():
    a = MRAdapter(16, 8)
    for layer in (a.high_proj, a.low_proj):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0
    for layer in (a.high_conv, a.low_conv):
        assert torch.count_nonzero(layer.bias) == 0
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
        assert layer.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-6  # xavier bound
    assert a.gate[2].out_features == 1 and MRAdapter(16, 8, gate="channel").gate[2].out_features == 16
    assert MRAdapter(16, 8, gate="none").gate is None


def test_gate_value_hand_computed():
    a = MRAdapter(2, 2, gate="scalar", gate_act="sigmoid")
    with torch.no_grad():
        a.gate[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))  # picks mean(low[..., 0])
        a.gate[0].bias.zero_()
        a.gate[2].weight.fill_(1.0)
        a.gate[2].bias.zero_()
    low = torch.tensor([[[1.0, 0], [3.0, 0]]])  # mean of channel 0 = 2
    g = a.gate_value(low, torch.zeros(1, 2, 2))
    assert g.shape == (1, 1, 1)
    torch.testing.assert_close(g.flatten(), torch.sigmoid(F.gelu(torch.tensor([2.0]))))


def test_nan_stays_in_its_sample():
    a = MRAdapter(4, 4, zero_init=False)
    tokens, grid, map = _inputs(2, 4, 4, 2, 2, 4, 4)
    tokens[0, 0, 0] = float("nan")
    out = a(tokens, grid, map)
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()


def test_final_fusion_hand_computed():
    f = MRFinalFusion(1, 1, out_dim=1)
    with torch.no_grad():
        f.low_proj.weight.fill_(2.0)
        f.low_proj.bias.fill_(0.5)
        f.high_proj.weight.fill_(10.0)
        f.high_proj.bias.zero_()
    tokens = torch.tensor([[[1.0]]])
    map = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)  # pooled to its mean 2.5
    assert f(tokens, (1, 1), map).item() == pytest.approx(2.0 + 0.5 + 25.0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda a: a(torch.zeros(2, 4, 8), (2, 2), torch.zeros(2, 6, 3)), ShapeError, "rank 4"),
        (lambda a: a(torch.zeros(8, 4), (2, 2), torch.zeros(1, 6, 3, 3)), ShapeError, "rank 3"),
        (lambda a: a(torch.zeros(2, 5, 8), (2, 2), torch.zeros(2, 6, 3, 3)), ShapeError, r"N=5 tokens, but grid \(2, 2\)"),
        (lambda a: a(torch.zeros(2, 4, 7), (2, 2), torch.zeros(2, 6, 3, 3)), ShapeError, "C=7 channels.*low_dim=8"),
        (lambda a: a(torch.zeros(2, 4, 8), (2, 2), torch.zeros(2, 5, 3, 3)), ShapeError, "C=5 channels.*high_dim=6"),
        (lambda a: a(torch.zeros(0, 4, 8), (2, 2), torch.zeros(0, 6, 3, 3)), ShapeError, "empty batch"),
        (lambda a: a(torch.zeros(2, 4, 8), (2, 2), torch.zeros(3, 6, 3, 3)), ShapeError, "batch 2 but map has batch 3"),
        (lambda a: a(torch.zeros(2, 4, 8), (2, 2), torch.zeros(2, 6, 3, 3, dtype=torch.float64)), ShapeError, "float64"),
        (lambda a: a(torch.zeros(2, 4, 8), (2,), torch.zeros(2, 6, 3, 3)), TypeError, "grid"),
        (lambda a: a([[0.0]], (1, 1), torch.zeros(2, 6, 3, 3)), TypeError, "tokens has to be a Tensor"),
    ],
)
def test_bad_inputs(make, error, match):
    with pytest.raises(error, match=match):
        make(MRAdapter(8, 6))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"gate has to be one of \['scalar', 'channel', 'none'\], but got 'per_token'"):
        MRAdapter(8, 6, gate="per_token")
    with pytest.raises(ValueError, match="gate_act"):
        MRAdapter(8, 6, gate_act="relu")
    with pytest.raises(ValueError, match="odd"):
        MRAdapter(8, 6, kernel_size=4)
    with pytest.raises(TypeError, match="low_dim has to be an int"):
        MRAdapter(8.0, 6)
    with pytest.raises(ValueError, match="high_dim has to be > 0"):
        MRAdapter(8, 0)
    with pytest.raises(ConfigError, match="takes no argument.*'gates'"):
        mixres.create_fusion("mr_adapter", low_dim=8, high_dim=6, gates="scalar")
    with pytest.raises(ConfigError, match=r"needs argument\(s\) \['high_dim'\]"):
        mixres.create_fusion("mr_adapter", low_dim=8)


def test_official_key_conversion_rejects_unknown_keys():
    with pytest.raises(KeyError, match="not a released MR-Adapter key"):
        convert_official_state_dict({"proj.weight": torch.zeros(1)})
