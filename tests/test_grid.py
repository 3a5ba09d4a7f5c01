import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixres import ShapeError, map_to_tokens, resample, tokens_to_map
from mixres.grid import resample_pos_embed

sides = st.integers(1, 9)


@given(b=st.integers(1, 3), c=st.integers(1, 8), h=sides, w=sides)
def test_tokens_map_tokens_is_exact(b, c, h, w):
    tokens = torch.randn(b, h * w, c)
    m = tokens_to_map(tokens, (h, w))
    assert m.shape == (b, c, h, w)
    back, grid = map_to_tokens(m)
    assert grid == (h, w) and torch.equal(back, tokens)


def test_tokens_to_map_is_row_major():
    tokens = torch.arange(6.0).view(1, 6, 1)  # grid 2x3
    m = tokens_to_map(tokens, (2, 3))
    assert m[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]


@given(b=st.integers(1, 2), c=st.integers(1, 4), h=sides, w=sides)
def test_resample_same_size_is_identity(b, c, h, w):
    m = torch.randn(b, c, h, w)
    assert torch.equal(resample(m, (h, w)), m)


@given(b=st.integers(1, 2), c=st.integers(1, 4), H=sides, W=sides, h=sides, w=sides)
def test_resample_shape_and_dtype(b, c, H, W, h, w):
    for dtype in (torch.float32, torch.bfloat16):
        out = resample(torch.randn(b, c, H, W, dtype=dtype), (h, w))
        assert out.shape == (b, c, h, w) and out.dtype == dtype


def test_average_pool_matches_hand_computed_mean():
    m = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]).view(1, 1, 2, 4)
    out = resample(m, (1, 2))  # 2x2 windows
    assert out.flatten().tolist() == [(1 + 2 + 5 + 6) / 4, (3 + 4 + 7 + 8) / 4]


def test_non_integer_down_factor_uses_area_pooling():
    m = torch.arange(9.0).view(1, 1, 3, 3)
    out = resample(m, (2, 2))  # adaptive windows: rows {0,1},{1,2}, cols {0,1},{1,2}
    assert out.flatten().tolist() == [(0 + 1 + 3 + 4) / 4, (1 + 2 + 4 + 5) / 4, (3 + 4 + 6 + 7) / 4, (4 + 5 + 7 + 8) / 4]


def test_upsampling_is_bilinear_align_corners():
    m = torch.tensor([0.0, 3.0]).view(1, 1, 1, 2)
    assert resample(m, (1, 4)).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    # align_corners=False puts the source pixels at centres instead
    assert resample(m, (1, 4), align_corners=False).flatten().tolist() == [0.0, 0.75, 2.25, 3.0]


def test_bad_inputs():
    with pytest.raises(ShapeError, match="N=5 tokens, but grid"):
        tokens_to_map(torch.zeros(1, 5, 2), (2, 3))
    with pytest.raises(ShapeError, match="rank 3"):
        tokens_to_map(torch.zeros(5, 2), (1, 5))
    with pytest.raises(ShapeError, match="rank 4"):
        resample(torch.zeros(3, 4, 4), (2, 2))
    with pytest.raises(ShapeError, match="empty batch"):
        map_to_tokens(torch.zeros(0, 3, 2, 2))
    with pytest.raises(TypeError, match="size"):
        resample(torch.zeros(1, 1, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="> 0"):
        resample(torch.zeros(1, 1, 4, 4), (0, 2))


@pytest.mark.parametrize("new", [(24, 24), (32, 32), (16, 40), (7, 5)])
def test_resample_pos_embed_matches_timm(new):
    timm_pos = pytest.importorskip("timm.layers").resample_abs_pos_embed
    pos = torch.randn(1, 1 + 24 * 24, 16)
    ours = resample_pos_embed(pos, new)
    theirs = timm_pos(pos, new_size=list(new), num_prefix_tokens=1, interpolation="bicubic", antialias=True)
    assert ours.shape == (1, 1 + new[0] * new[1], 16)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(ours[:, :1], pos[:, :1])  # the CLS row is kept


def test_resample_pos_embed_non_square_source():
    pos = torch.randn(1, 2 + 3 * 4, 8)
    out = resample_pos_embed(pos, (6, 8), old_grid=(3, 4), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 48, 8)
    with pytest.raises(ShapeError, match="not a square"):
        resample_pos_embed(pos[:, 2:], (6, 8), num_prefix_tokens=1)
