"""Tests of AnyRes tiling (LLaVA-NeXT): the functions in mixres.anyres and the AnyResEncoder."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mixres
from mixres import ConfigError, MixresError, ShapeError
from mixres.anyres import (
    LLAVA_NEXT_PINPOINTS,
    add_newline,
    anyres_layout,
    resize_and_pad,
    select_best_resolution,
    tile,
    unpad_bounds,
    unpad_tokens,
    untile,
)
from mixres.encoders.anyres import AnyResEncoder
from mixres.encoders.s2 import S2Encoder
from mixres.pathways.patchify import PatchifyPathway as Patchify  # noqa: E402  (patch-local by design)

SMALL_PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]  # LLaVA-NeXT's shapes at tile 16


# -- select_best_resolution ----------------------------------------------------------------------
def test_select_best_resolution_hand_cases():
    # 800x600 (w x h): 672x672 keeps 672*504 = 338688 px; the 2:1 pinpoints keep 448*336 at most
    assert select_best_resolution((600, 800), LLAVA_NEXT_PINPOINTS) == (672, 672)
    # 1000x300 banner: 336x1008 keeps 1008*302 > 300000 px -> capped at 300000, more than 672*201
    assert select_best_resolution((300, 1000), LLAVA_NEXT_PINPOINTS) == (336, 1008)
    # a tall page, 400x1200 (w x h): the tall 1008x336 pinpoint
    assert select_best_resolution((1200, 400), LLAVA_NEXT_PINPOINTS) == (1008, 336)
    # 100x100: every pinpoint keeps all 10000 px; least waste: the 2:1 ones; the release's first is
    # (width 336, height 672), so ours must be (672, 336) as (h, w)
    assert select_best_resolution((100, 100), LLAVA_NEXT_PINPOINTS) == (672, 336)


@given(h=st.integers(1, 3000), w=st.integers(1, 3000))
def test_select_best_resolution_agrees_with_transformers(h, w):
    """The same rule as transformers' LLaVA-NeXT select_best_resolution, on the same (h, w) list
    (ours also picks a pinpoint where every one keeps 0 px and transformers returns None)."""
    theirs = pytest.importorskip("transformers.image_processing_utils").select_best_resolution
    expected = theirs((h, w), [tuple(p) for p in LLAVA_NEXT_PINPOINTS])
    ours = select_best_resolution((h, w), LLAVA_NEXT_PINPOINTS)
    if expected is None:
        assert ours in [tuple(p) for p in LLAVA_NEXT_PINPOINTS]
    else:
        assert ours == tuple(expected)


# -- tile / untile / resize_and_pad --------------------------------------------------------------
@given(b=st.integers(1, 3), t=st.integers(1, 8), nh=st.integers(1, 3), nw=st.integers(1, 3))
def test_tile_untile_identity(b, t, nh, nw):
    x = torch.randn(b, 3, nh * t, nw * t)
    tiles = tile(x, (nh * t, nw * t), t)
    assert tiles.shape == (b * nh * nw, 3, t, t)
    assert torch.equal(tiles[nw - 1], x[0, :, :t, (nw - 1) * t:])  # row-major, image by image
    assert torch.equal(untile(tiles, (nh, nw)), x)


@given(h=st.integers(1, 40), w=st.integers(1, 40), th=st.integers(1, 40), tw=st.integers(1, 40))
def test_resize_and_pad_fills_one_side_and_centres(h, w, th, tw):
    out = resize_and_pad(torch.ones(1, 3, h, w), (th, tw))
    assert out.shape == (1, 3, th, tw)
    rows = (out[0, 0].abs().sum(1) > 0).nonzero().flatten()
    cols = (out[0, 0].abs().sum(0) > 0).nonzero().flatten()
    filled_rows, filled_cols = len(rows), len(cols)
    assert filled_rows == th or filled_cols == tw  # one side is filled
    assert abs(rows[0].item() - (th - 1 - rows[-1].item())) <= 1  # centred
    assert abs(cols[0].item() - (tw - 1 - cols[-1].item())) <= 1


def test_resize_and_pad_same_size_is_identity():
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(resize_and_pad(x, (5, 7)), x)


# -- unpad / newline -----------------------------------------------------------------------------
def test_unpad_hand_cases():
    # a 2:1 image (h=100, w=200) on a 4x4 map: 4 * 100/200 = 2 rows hold it, 1 padding row each side
    assert unpad_bounds((4, 4), (100, 200)) == ((1, 3), (0, 4))
    # a 3:1 image: int(4/3) = 1 row, margin (4 - 1) // 2 = 1 -> rows 1..2 (the odd margin keeps one)
    assert unpad_bounds((4, 4), (100, 300)) == ((1, 3), (0, 4))
    # a 1:2 (tall) image on a 4x6 map: 100 * 4/200 = 2 columns hold it, margin (6 - 2) // 2 = 2
    assert unpad_bounds((4, 6), (200, 100)) == ((0, 4), (2, 4))
    # the same aspect: nothing to cut
    assert unpad_bounds((4, 8), (50, 100)) == ((0, 4), (0, 8))
    m = torch.arange(16.0).view(1, 1, 4, 4)
    assert unpad_tokens(m, (100, 200))[0, 0].tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]


def test_add_newline_hand_case():
    m = torch.arange(6.0).view(1, 1, 2, 3).expand(2, 2, 2, 3)
    out = add_newline(m, torch.tensor([-1.0, -2.0]))
    assert out.shape == (2, 2 * 4, 2)
    assert out[0, :, 0].tolist() == [0, 1, 2, -1, 3, 4, 5, -1]
    assert out[1, :, 1].tolist() == [0, 1, 2, -2, 3, 4, 5, -2]


def test_llava_next_token_count():
    lay = anyres_layout((600, 800), LLAVA_NEXT_PINPOINTS, 336, (24, 24))
    # base 24*24, tile map 48x48 unpadded to 36x48, one newline per row
    assert lay.best_resolution == (672, 672) and lay.tile_grid == (2, 2) and lay.unpadded_grid == (36, 48)
    assert lay.num_tokens == 576 + 36 * 49
    assert anyres_layout((600, 800), LLAVA_NEXT_PINPOINTS, 336, (24, 24), newline=False, unpad=False).num_tokens == 576 + 48 * 48


# -- AnyResEncoder -------------------------------------------------------------------------------
@settings(max_examples=30)
@given(
    sizes=st.lists(st.tuples(st.integers(4, 90), st.integers(4, 90)), min_size=1, max_size=3),
    newline=st.booleans(), unpad=st.booleans(),
)
def test_num_tokens_is_the_output_length(sizes, newline, unpad):
    enc = AnyResEncoder(Patchify(dim=4), SMALL_PINPOINTS, newline=newline, unpad=unpad)
    out = enc([torch.randn(3, h, w) for h, w in sizes])
    assert isinstance(out, list) and len(out) == len(sizes)
    for tokens, size in zip(out, sizes):
        assert tokens.shape == (enc.num_tokens(size), 4)


def test_output_is_base_then_rows_with_newlines():
    pathway = Patchify(dim=3)
    enc = AnyResEncoder(pathway, SMALL_PINPOINTS)  # 16 px tiles, 4x4 tokens each
    image = torch.randn(3, 16, 32)  # exactly the (16, 32) pinpoint: no resize, no padding
    out = enc([image])[0]
    lay = enc.layout((16, 32))
    assert lay.best_resolution == (16, 32) and lay.tile_grid == (1, 2) and lay.unpadded_grid == (4, 8)
    base = F.interpolate(image[None], size=(16, 16), mode="bicubic", antialias=True)
    torch.testing.assert_close(out[:16], pathway(base)[0][0])
    rows = out[16:].view(4, 9, 3)  # patch-local: tiles merged = the whole image patchified
    torch.testing.assert_close(rows[:, :8], pathway.proj(image[None])[0].permute(1, 2, 0))
    assert torch.equal(rows[:, 8], enc.image_newline.detach().expand(4, 3))


def test_different_sizes_in_one_call_are_independent():
    enc = AnyResEncoder(Patchify(dim=4), SMALL_PINPOINTS)
    images = [torch.randn(3, 20, 50), torch.randn(3, 70, 33), torch.randn(3, 16, 16)]
    together = enc(images)
    assert len({t.shape[0] for t in together}) == 3
    for image, tokens in zip(images, together):
        torch.testing.assert_close(enc([image])[0], tokens)
    batch = torch.randn(2, 3, 24, 40)  # a batch tensor is a list of equal sizes
    assert [t.shape for t in enc(batch)] == [t.shape for t in enc(list(batch))]


def test_wraps_an_encoder_and_round_trips():
    inner = S2Encoder(Patchify(dim=2), scales=[16, 32])  # an encoder, out_dim 4, 4x4 grid per tile
    enc = AnyResEncoder(inner, SMALL_PINPOINTS, tile_size=16)
    assert enc.out_dim == 4 and enc.image_newline.shape == (4,)
    out = enc([torch.randn(3, 30, 60)])[0]
    assert out.shape == (enc.num_tokens((30, 60)), 4)
    cfg = json.loads(json.dumps(enc.config))
    assert cfg["encoder"]["name"] == "s2" and cfg["encoder"]["pathway"]["name"] == "patchify"
    again = mixres.build(cfg)
    assert again.config == enc.config
    again.load_state_dict(enc.state_dict())
    image = torch.randn(3, 40, 17)
    assert torch.equal(again([image])[0], enc([image])[0])
    by_config = AnyResEncoder({"kind": "pathway", "name": "patchify", "dim": 5}, [[32, 32]])
    assert by_config.tile_size == 16 and by_config.out_dim == 5


def test_gradients_reach_the_newline_and_the_encoder():
    enc = AnyResEncoder(Patchify(dim=4), SMALL_PINPOINTS)
    sum(t.square().sum() for t in enc([torch.randn(3, 20, 45), torch.randn(3, 33, 33)])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert AnyResEncoder(Patchify(), SMALL_PINPOINTS, newline=False).image_newline is None


def test_bf16():
    enc = AnyResEncoder(Patchify(dim=4), SMALL_PINPOINTS, dtype=torch.bfloat16).to(torch.bfloat16)
    out = enc([torch.randn(3, 20, 45, dtype=torch.bfloat16)])[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_inputs():
    enc = AnyResEncoder(Patchify(), SMALL_PINPOINTS)
    with pytest.raises(MixresError, match="not one grid"):
        enc.grid_for(32)
    with pytest.raises(TypeError, match="non-empty list of Tensor"):
        enc([])
    with pytest.raises(TypeError, match="non-empty list of Tensor"):
        enc(torch.randn(3, 16, 16))
    with pytest.raises(ShapeError, match=r"images\[1\] has to be a Tensor\[3, H, W\]"):
        enc([torch.randn(3, 16, 16), torch.randn(1, 16, 16)])
    with pytest.raises(ShapeError, match="float"):
        enc([torch.zeros(3, 16, 16, dtype=torch.uint8)])
    with pytest.raises(MixresError, match=r"pinpoints \[\(16, 40\)\] are not multiples of the tile size 16"):
        AnyResEncoder(Patchify(), [[16, 32], [16, 40]])
    with pytest.raises(MixresError, match="pinpoints is empty"):
        AnyResEncoder(Patchify(), [])
    with pytest.raises(TypeError, match=r"pinpoints\[0\]"):
        AnyResEncoder(Patchify(), [[16, 32, 48]])
    with pytest.raises(ConfigError, match="kind 'fusion'"):
        AnyResEncoder({"kind": "fusion", "name": "mr_adapter"}, [[16, 16]])
    with pytest.raises(TypeError, match="registered encoder or token pathway"):
        AnyResEncoder(torch.nn.Identity(), [[16, 16]])
    with pytest.raises(ConfigError, match="tile_size is needed"):  # S2 at 16x32: not square
        AnyResEncoder(S2Encoder(Patchify(), scales=[(16, 32)]), [[16, 16]])


def test_untile_and_newline_errors():
    with pytest.raises(ShapeError, match=r"Tensor\[B\*2\*2, C, h, w\]"):
        untile(torch.zeros(3, 1, 2, 2), (2, 2))
    with pytest.raises(ShapeError, match="newline has to be a Tensor"):
        add_newline(torch.zeros(1, 3, 2, 2), torch.zeros(4))
    with pytest.raises(ShapeError, match=r"Tensor\[\.\.\., C, H, W\]"):
        unpad_tokens(torch.zeros(4, 4), (1, 1))
    assert math.isclose(len(LLAVA_NEXT_PINPOINTS), 5)


def test_extreme_aspect_ratios():
    # 1x3000: every LLaVA-NeXT pinpoint keeps int(1 * scale) = 0 rows; the least wasteful one wins
    assert select_best_resolution((1, 3000), LLAVA_NEXT_PINPOINTS) == (672, 336)
    enc = AnyResEncoder(Patchify(dim=3), SMALL_PINPOINTS)
    for size in ((1, 300), (300, 1), (2, 90)):
        out = enc([torch.randn(3, *size)])[0]
        assert out.shape == (enc.num_tokens(size), 3) and torch.isfinite(out).all()


def test_image_size_defaults():
    enc = AnyResEncoder(Patchify(), SMALL_PINPOINTS)
    assert enc.image_size == (32, 32) and enc.num_tokens() == enc.num_tokens((32, 32)) == 16 + 8 * 9
    inner = S2Encoder(Patchify(), scales=[16, 32])
    assert inner.image_size == (32, 32) and AnyResEncoder(inner, [[64, 32]]).tile_size == 32


def test_llava_next_preset():
    import inspect

    cfg = mixres.ENCODERS.resolve("llava-next-anyres-672")
    assert cfg["pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] and cfg["convention"] == "hf"
    original = mixres.ENCODERS.resolve("llava-next-anyres-672", pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
                                       convention="llava_next")  # the original release, as an explicit option
    assert original["pinpoints"] == [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]
    assert cfg["tile_size"] == 336 and cfg["encoder"]["select_layer"] == -2
    hf_args = inspect.signature(mixres.PATHWAYS.get_class(cfg["encoder"]["name"])).parameters
    assert set(cfg["encoder"]) - {"kind", "name"} <= set(hf_args)
    # the policy with a cheap stand-in for the ViT: 336 px tiles, 48 px patches -> 7x7 tokens
    stand_in = {"kind": "pathway", "name": "patchify", "dim": 2, "patch_size": 48, "image_size": 336}
    enc = mixres.build({"kind": "encoder", "name": "llava-next-anyres-672", "encoder": stand_in})
    out = enc([torch.randn(3, 600, 800)])[0]
    # 672x672, 2x2 tiles -> 14x14, unpadded to 10 rows (int(600 * 14 / 800) = 10) -> 49 + 10 * 15
    assert out.shape == (49 + 10 * 15, 2) == (enc.num_tokens((600, 800)), 2)
