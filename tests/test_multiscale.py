"""Property tests of S2 multi-scale (arXiv 2403.13984): s2_forward and the S2Encoder."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mixres
from mixres import MixresError, ShapeError
from mixres.encoders.s2 import S2Encoder
from mixres.multiscale import merge_chessboard, s2_forward, split_chessboard
from mixres.pathways.patchify import PatchifyPathway as Patchify  # noqa: E402  (patch-local by design)


def _tokens_model(conv):
    return lambda x: conv(x).flatten(2).transpose(1, 2)


def _area(m, size):
    return F.interpolate(m, size=size, mode="area")


# -- s2_forward ----------------------------------------------------------------------------------
@given(p=st.integers(1, 4), c=st.integers(1, 6), side=st.integers(1, 4), b=st.integers(1, 2))
def test_single_scale_without_split_is_the_model(p, c, side, b):
    conv = torch.nn.Conv2d(3, c, p, stride=p)
    x = torch.randn(b, 3, side * p, side * p)
    assert torch.equal(s2_forward(conv, x, [side * p], output_shape="bchw"), conv(x))
    assert torch.equal(s2_forward(_tokens_model(conv), x, [side * p]), _tokens_model(conv)(x))


@given(p=st.integers(1, 4), c=st.integers(1, 6), k=st.integers(1, 3), nh=st.integers(1, 3), nw=st.integers(1, 3))
def test_chessboard_split_of_a_patch_local_model_is_exact(p, c, k, nh, nw):
    """Splitting into tiles, running, merging equals running on the whole image: exactly.

    Integer-valued weights and pixels make every sum exact, whatever order a conv backend picks.
    """
    conv = torch.nn.Conv2d(3, c, p, stride=p)
    with torch.no_grad():
        for param in conv.parameters():
            param.copy_(torch.randint(-3, 4, param.shape))
    m = k * p
    x = torch.randint(-3, 4, (2, 3, nh * m, nw * m)).float()
    out = s2_forward(conv, x, [(nh * m, nw * m)], max_split_size=m, output_shape="bchw")
    assert torch.equal(out, conv(x))
    tokens = s2_forward(_tokens_model(conv), x, [(nh * m, nw * m)], max_split_size=m)  # k x k tokens per tile
    assert torch.equal(tokens, _tokens_model(conv)(x))


@given(b=st.integers(1, 3), h=st.integers(1, 8), w=st.integers(1, 8), nh=st.integers(1, 3), nw=st.integers(1, 3))
def test_split_merge_chessboard_is_identity(b, h, w, nh, nw):
    x = torch.randn(b, 2, nh * h, nw * w)
    tiles = split_chessboard(x, (nh, nw))
    assert tiles.shape == (nh * nw * b, 2, h, w)
    # ordered (nh nw b): the last sub-image is the bottom-right tile of the last image
    assert torch.equal(tiles[-1], x[-1, :, (nh - 1) * h:, (nw - 1) * w:])
    assert torch.equal(tiles[b - 1], x[-1, :, :h, :w])
    assert torch.equal(merge_chessboard(tiles, (nh, nw)), x)


@settings(max_examples=25)
@given(
    p=st.integers(1, 3), c=st.integers(1, 5), m_mult=st.integers(1, 2),
    factors=st.lists(st.integers(1, 3), min_size=1, max_size=3), idx=st.integers(0, 2), data=st.data(),
)
def test_output_shapes_over_random_scales(p, c, m_mult, factors, idx, data):
    m = m_mult * p
    idx = idx % len(factors)
    scales = [f * m for f in factors]
    conv = torch.nn.Conv2d(3, c, p, stride=p)
    in_side = data.draw(st.integers(1, 12))
    x = torch.randn(2, 3, in_side, in_side + 1)
    side = factors[idx] * m_mult
    out = s2_forward(conv, x, scales, max_split_size=m, resize_output_to_scale_idx=idx, output_shape="bchw")
    assert out.shape == (2, c * len(scales), side, side)
    summed = s2_forward(conv, x, scales, max_split_size=m, resize_output_to_scale_idx=idx, output_shape="bchw", merge="sum")
    assert summed.shape == (2, c, side, side)
    torch.testing.assert_close(summed, sum(out.split(c, dim=1)))
    tokens = s2_forward(_tokens_model(conv), x, scales, max_split_size=m, resize_output_to_scale_idx=idx)
    assert tokens.shape == (2, side * side, c * len(scales))


def test_concat_blocks_are_the_scales_in_order():
    conv = torch.nn.Conv2d(3, 4, 2, stride=2)
    x = torch.randn(2, 3, 24, 24)
    out = s2_forward(conv, x, [8, 16, 24], max_split_size=8, output_shape="bchw")
    assert out.shape == (2, 12, 4, 4)
    for i, size in enumerate((8, 16, 24)):
        scale = conv(F.interpolate(x, size=(size, size), mode="bicubic")) if size != 24 else conv(x)
        torch.testing.assert_close(out[:, 4 * i:4 * (i + 1)], _area(scale, (4, 4)), rtol=1e-5, atol=1e-5)


def test_prefix_tokens_are_averaged_over_splits_and_concatenated():
    conv = torch.nn.Conv2d(3, 3, 2, stride=2)

    def with_cls(x):
        tokens = conv(x).flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)

    x = torch.randn(2, 3, 8, 8)
    single = s2_forward(with_cls, x, [8], num_prefix_tokens=1)
    assert torch.equal(single, with_cls(x))
    out = s2_forward(with_cls, x, [4, 8], max_split_size=4, num_prefix_tokens=1)
    assert out.shape == (2, 1 + 4, 6)
    # a mean of means over 4 equal sub-images = the mean over the whole scale-8 grid
    torch.testing.assert_close(out[:, 0, 3:], conv(x).mean((2, 3)))


def test_model_returning_tokens_and_a_non_square_grid():
    pathway = Patchify(dim=5, patch_size=2, image_size=(4, 8))
    x = torch.randn(1, 3, 8, 16)
    out = s2_forward(pathway, x, [(4, 8), (8, 16)], max_split_size=(4, 8))  # pathway -> (tokens, (2, 4))
    assert out.shape == (1, 2 * 4, 10)
    small = pathway.proj(F.interpolate(x, size=(4, 8), mode="bicubic"))
    torch.testing.assert_close(out[..., :5], small.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out[..., 5:], _area(pathway.proj(x), (2, 4)).flatten(2).transpose(1, 2))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scales=[10], max_split_size=4), MixresError, r"scales\[0\] \(10, 10\) is not a multiple of the split size \(4, 4\)"),
        (dict(scales=[]), TypeError, "non-empty list"),
        (dict(scales=8), TypeError, "non-empty list"),
        (dict(scales=[8], output_shape="nchw"), MixresError, "output_shape has to be one of"),
        (dict(scales=[8], merge="mean"), MixresError, "merge has to be one of"),
        (dict(scales=[8], resize_output_to_scale_idx=1), MixresError, "index one of 1 scales"),
        (dict(scales=[8], num_prefix_tokens=-1), MixresError, "num_prefix_tokens"),
        (dict(scales=[8], output_shape="bchw", num_prefix_tokens=1), MixresError, "needs output_shape='bnc'"),
        (dict(scales=[8], output_shape="bnc"), ShapeError, "expects the model to return Tensor\\[B, N, C\\]"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    conv = torch.nn.Conv2d(3, 2, 2, stride=2)
    with pytest.raises(error, match=match):
        s2_forward(conv, torch.randn(1, 3, 8, 8), **kwargs)


def test_bad_models_and_images():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ShapeError, match="N=6 tokens.*not a square"):
        s2_forward(lambda t: torch.zeros(t.shape[0], 6, 2), x, [8])
    with pytest.raises(ShapeError, match="returned batch 1 for 2 sub-images"):
        s2_forward(lambda t: torch.zeros(1, 2, 4, 4), x, [8], output_shape="bchw")
    with pytest.raises(TypeError, match="has to return a Tensor"):
        s2_forward(lambda t: [1, 2, 3], x, [8])
    with pytest.raises(TypeError, match="images has to be a Tensor"):
        s2_forward(torch.nn.Identity(), [[0.0]], [8])
    with pytest.raises(ShapeError, match="non-empty Tensor"):
        s2_forward(torch.nn.Identity(), torch.zeros(3, 8, 8), [8])
    with pytest.raises(ShapeError, match="floating point"):
        s2_forward(torch.nn.Identity(), torch.zeros(1, 3, 8, 8, dtype=torch.int64), [8])


# -- S2Encoder -----------------------------------------------------------------------------------
@settings(max_examples=20)
@given(
    dim=st.integers(1, 6), p=st.integers(1, 3), th=st.integers(1, 3), tw=st.integers(1, 3),
    factors=st.lists(st.integers(1, 3), min_size=1, max_size=3), merge=st.sampled_from(["concat", "sum"]),
    in_side=st.integers(2, 20),
)
def test_encoder_shape_contract(dim, p, th, tw, factors, merge, in_side):
    pathway = Patchify(dim=dim, patch_size=p, image_size=(th * p, tw * p))
    scales = [(f * th * p, f * tw * p) for f in factors]
    enc = S2Encoder(pathway, scales=scales, merge=merge)
    tokens, grid = enc(torch.randn(2, 3, in_side, in_side))
    assert grid == enc.grid_for(in_side) == (factors[0] * th, factors[0] * tw)
    assert tokens.shape == (2, enc.num_tokens((in_side, 3)), enc.out_dim)
    assert enc.out_dim == dim * (len(scales) if merge == "concat" else 1)


def test_encoder_is_s2_over_the_pathway():
    pathway = Patchify(dim=4, patch_size=4)  # native 16 px -> 4x4 tokens
    enc = S2Encoder(pathway, scales=[16, 32, 48])
    x = torch.randn(2, 3, 48, 48)
    tokens, grid = enc(x)
    assert grid == (4, 4) and tokens.shape == (2, 16, 12)
    for i, size in enumerate((16, 32, 48)):
        resized = F.interpolate(x, size=(size, size), mode="bicubic") if size != 48 else x
        expected = _area(pathway.proj(resized), (4, 4)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens[..., 4 * i:4 * (i + 1)], expected, rtol=1e-5, atol=1e-5)


def test_encoder_single_scale_is_the_pathway():
    pathway = Patchify(dim=3)
    x = torch.randn(2, 3, 16, 16)
    tokens, grid = S2Encoder(pathway, scales=[16])(x)
    assert torch.equal(tokens, pathway(x)[0]) and grid == pathway(x)[1]


def test_encoder_config_round_trip_and_gradients():
    enc = S2Encoder({"name": "patchify", "dim": 3}, scales=[16, [32, 32]], merge="sum")
    cfg = json.loads(json.dumps(enc.config))
    assert cfg["kind"] == "encoder" and cfg["name"] == "s2"
    again = mixres.build(cfg)
    assert again.config == enc.config
    again.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 20, 20)
    assert torch.equal(again(x)[0], enc(x)[0])
    from_module = S2Encoder(Patchify(dim=3), scales=[16])
    assert from_module.config["pathway"]["name"] == "patchify"
    enc(x)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert "scales=[(16, 16), (32, 32)]" in repr(enc)


def test_encoder_bf16():
    enc = S2Encoder(Patchify(dim=4), scales=[16, 32]).to(torch.bfloat16)
    tokens, _ = enc(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens).all()


def test_encoder_bad_arguments():
    with pytest.raises(MixresError, match=r"scales\[1\] \(24, 24\) is not a multiple of the split size \(16, 16\)"):
        S2Encoder(Patchify(), scales=[16, 24])
    with pytest.raises(MixresError, match="merge has to be one of"):
        S2Encoder(Patchify(), scales=[16], merge="avg")
    with pytest.raises(MixresError, match="index one of 2 scales"):
        S2Encoder(Patchify(), scales=[16, 32], resize_output_to_scale_idx=2)
    with pytest.raises(TypeError, match="registered pathway"):
        S2Encoder(torch.nn.Conv2d(3, 3, 1), scales=[16])
    with pytest.raises(TypeError, match="non-empty list"):
        S2Encoder(Patchify(), scales=[])
    with pytest.raises(ShapeError, match="rank 4"):
        S2Encoder(Patchify(), scales=[16])(torch.randn(3, 16, 16))
