"""mixres.explain: hook-based high-res maps, gates and cross-attention maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixres
from mixres.errors import MixresError
from mixres.explain import explain, explain_hooks, find_encoder, token_attention
from mixres.fusions.mr_adapter import MRAdapter
from mixres.fusions.patch_mining import PatchMining, gather_windows
from mixres.fusions.sva import SVA


class Holder(nn.Module):
    """Calls a fusion with keyword arguments (the hooks must read both call styles)."""

    def __init__(self, fusion: nn.Module) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, tokens, grid, map):
        return self.fusion(tokens=tokens, grid=grid, map=map)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_zero_init_encoder_maps_are_exactly_zero_and_forward_unchanged():
    torch.manual_seed(0)
    encoder = mixres.create_encoder("llava-hr-tiny").eval()
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        plain, _ = encoder(images)
    exp = explain(encoder, images)
    assert sorted(exp.high_res) == ["adapters.0", "adapters.1", "adapters.2"]
    for value in exp.high_res.values():
        assert value.shape == (2, 8, 8) and torch.count_nonzero(value) == 0  # zero-init high_proj: exactly 0
    assert exp.total is not None and torch.count_nonzero(exp.total) == 0
    assert all(g.shape == (2, 1) and ((g > -1) & (g < 1)).all() for g in exp.gates.values())  # tanh range
    assert exp.attention == {}
    assert _no_hooks(encoder)
    with torch.no_grad():  # the same forward on the same input, on CPU: hooks only read, so equal
        again, _ = encoder(images)
    assert torch.equal(plain, again)


@pytest.mark.parametrize("gate,merge", [("scalar", "sum"), ("channel", "sum"), ("none", "sum"), ("scalar", "concat")])
def test_perturbed_adapter_map_is_the_high_term_and_nonzero_exactly_under_the_changed_pixels(gate, merge):
    torch.manual_seed(1)
    adapter = MRAdapter(low_dim=8, high_dim=6, gate=gate, merge=merge)
    nn.init.normal_(adapter.high_proj.weight)  # perturb: the zero-init projection is now nonzero (bias stays 0)
    if merge == "concat":  # zero-init concat: the merge's high half is the zero part
        with torch.no_grad():
            adapter.merge_proj.weight[:, 8:].normal_()
    tokens, grid = torch.randn(3, 4 * 5, 8), (4, 5)
    map = torch.zeros(3, 6, 8, 10)  # 2x2 average pooling onto the 4x5 grid
    map[:, :, 5, 7] = torch.randn(3, 6)  # one pixel: grid cell (2, 3)
    with explain_hooks(Holder(adapter)) as exp, torch.no_grad():
        Holder(adapter)(tokens, grid, map)
    heat = exp.high_res["fusion"]
    expected = torch.zeros(3, 4, 5, dtype=torch.bool)
    expected[:, 2, 3] = True
    # f_h(0) = W2 GELU(W1 0 + 0) + 0 = 0 exactly, so every other cell is exactly zero
    assert torch.equal(heat != 0, expected)
    with torch.no_grad():  # the term by the adapter's own methods
        high, low = adapter.high_branch(map, grid), adapter.low_branch(tokens, grid)
        g = adapter.gate_value(low, high)
        term = high if g is None else g * high
        if merge == "concat":
            term = term @ adapter.merge_proj.weight[:, 8:].T
    torch.testing.assert_close(heat, term.norm(dim=-1).reshape(3, 4, 5))  # same ops, float32 rounding
    assert (gate == "none") == ("fusion" not in exp.gates)
    if gate != "none":
        assert exp.gates["fusion"].shape == (3, 1 if gate == "scalar" else 8)


def test_patch_mining_attention_of_the_chosen_token_by_hand():
    torch.manual_seed(2)
    mining = PatchMining(low_dim=8, high_dim=6, num_heads=2)
    tokens, grid, map = torch.randn(2, 3 * 4, 8), (3, 4), torch.randn(2, 6, 6, 8)  # 2x2 windows
    with explain_hooks(mining, token=(1, 2)) as exp, torch.no_grad():
        mining(tokens, grid, map)
    att = exp.attention["PatchMining"]
    assert att.shape == (2, 6, 8) and exp.tokens["PatchMining"] == (1, 2)
    with torch.no_grad():
        q = mining.q_proj(tokens)[:, 1 * 4 + 2].reshape(2, 2, 4)  # token (1, 2), two heads of width 4
        k = mining.k_proj(gather_windows(map, grid))[:, 1 * 4 + 2].reshape(2, 4, 2, 4)
        weights = torch.einsum("bmd,bkmd->bmk", q, k).div(math.sqrt(4)).softmax(-1).mean(1)
    torch.testing.assert_close(att[:, 2:4, 4:6].reshape(2, 4), weights)
    outside = att.clone()
    outside[:, 2:4, 4:6] = 0
    assert torch.count_nonzero(outside) == 0


def test_sva_attention_spans_its_sources_and_sums_to_one():
    torch.manual_seed(3)
    sva = SVA(low_dim=8, high_dim=[6, 4], query_grid=(2, 3), num_layers=2, num_heads=2)
    maps = [torch.randn(2, 6, 4, 6), torch.randn(2, 4, 6, 3)]  # 2x2 and 3x1 windows
    with explain_hooks(sva) as exp, torch.no_grad():
        sva(torch.randn(2, 4 * 6, 8), (4, 6), maps)
    assert exp.tokens == {"SVA/layer0": (1, 1), "SVA/layer1": (1, 1)}  # centre of the 2x3 query grid
    assert exp.grids == {"SVA/layer0": (2, 3), "SVA/layer1": (2, 3)}
    for layer in (0, 1):
        a, b = exp.attention[f"SVA/layer{layer}/source0"], exp.attention[f"SVA/layer{layer}/source1"]
        assert a.shape == (2, 4, 6) and b.shape == (2, 6, 3)
        torch.testing.assert_close(a.sum((1, 2)) + b.sum((1, 2)), torch.ones(2))  # one softmax over both


def test_token_attention_matches_softmax():
    q, k = torch.randn(1, 2, 4), torch.randn(1, 2, 3, 4)
    expected = torch.einsum("bnd,bnkd->bnk", q, k).div(2.0).softmax(-1)
    torch.testing.assert_close(token_attention(q, k, num_heads=1), expected)


def test_token_outside_grid_and_hooks_removed_on_error():
    mining = PatchMining(low_dim=8, high_dim=6)
    with pytest.raises(MixresError, match=r"token \(3, 0\) is outside the grid \(3, 4\)"):
        with explain_hooks(mining, token=(3, 0)), torch.no_grad():
            mining(torch.randn(1, 12, 8), (3, 4), torch.randn(1, 6, 6, 8))
    assert _no_hooks(mining)
    with pytest.raises(TypeError, match="token has to be a"):
        with explain_hooks(mining, token=(1.5, 0)), torch.no_grad():
            mining(torch.randn(1, 12, 8), (3, 4), torch.randn(1, 6, 6, 8))


def test_repeated_calls_get_one_entry_each_and_total_needs_one_grid():
    adapter = MRAdapter(low_dim=8, high_dim=6)
    with explain_hooks(adapter) as exp, torch.no_grad():
        adapter(torch.randn(1, 4, 8), (2, 2), torch.randn(1, 6, 4, 4))
        adapter(torch.randn(1, 9, 8), (3, 3), torch.randn(1, 6, 4, 4))
    assert sorted(exp.high_res) == ["MRAdapter", "MRAdapter#1"] and exp.total is None


def test_find_encoder():
    encoder = mixres.create_encoder("llava-hr-tiny")
    assert find_encoder(nn.Sequential(nn.Identity(), encoder)) is encoder
    with pytest.raises(MixresError, match="holds no mixres Encoder"):
        find_encoder(nn.Linear(2, 2))


def _dot_batch(n: int, grid: tuple[int, int], size: int, gen: torch.Generator):
    """Blank images with one 6x6 px bright square inside a random cell; per-token targets."""
    cell = size // grid[0]
    x, y = torch.zeros(n, 3, size, size), torch.zeros(n, grid[0] * grid[1])
    for b in range(n):
        i, j = torch.randint(0, grid[0], (2,), generator=gen).tolist()
        oy, ox = torch.randint(4, cell - 10, (2,), generator=gen).tolist()
        x[b, :, i * cell + oy : i * cell + oy + 6, j * cell + ox : j * cell + ox + 6] = 2.0
        y[b, i * grid[1] + j] = 1
    return x, y


def test_trained_tiny_encoder_heat_is_larger_on_the_small_item_than_on_background():
    """Train the adapters (pathways frozen) + a per-token head to find a 6 px square (< 1 ViT pixel)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    encoder = mixres.create_encoder("llava-hr-tiny", freeze=["token_pathway", "map_pathway"])
    head = nn.Linear(encoder.out_dim, 1)
    grid = encoder.grid_for(256)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(40):  # ~5 s on 2 idle CPU cores (~60 s when 5 jobs share them); loss ~0.9 -> < 0.1
        x, y = _dot_batch(8, grid, 256, gen)
        logits = head(encoder(x)[0]).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(20.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _dot_batch(16, grid, 256, gen)
    heat = explain(encoder.eval(), x).total.flatten(1)
    on = (heat * y).sum(1)
    background = (heat * (1 - y)).sum(1) / (y.shape[1] - 1)
    assert (on > background).all()  # every image: the item's cell beats the mean background cell
    print(f"item cell {on.mean():.3f} vs background {background.mean():.3f}")
    assert on.mean() > 3 * background.mean()  # measured 6.6 vs 1.3 at this seed


def test_cli_writes_the_png_zero_for_a_preset_nonzero_for_trained_weights(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    image_mod = pytest.importorskip("PIL.Image")
    from mixres.cli import main
    from mixres.convert import save_converted

    picture = image_mod.new("RGB", (300, 200), (20, 20, 20))
    picture.paste((255, 255, 0), (40, 30, 48, 38))  # a small item in the top-left
    picture.save(tmp_path / "item.png")
    assert main(["explain", "--encoder", "llava-hr-tiny", "--image", str(tmp_path / "item.png"),
                 "--out", str(tmp_path / "zero.png")]) == 0
    out = capsys.readouterr().out
    assert "adapters.0: max |g f_h| 0 at cell" in out and (tmp_path / "zero.png").stat().st_size > 10_000

    torch.manual_seed(0)
    encoder = mixres.create_encoder("llava-hr-tiny")
    for adapter in encoder.adapters:
        nn.init.normal_(adapter.high_proj.weight, std=0.1)  # stands for trained weights: the term is nonzero
    save_converted(tmp_path / "converted", encoder)
    assert main(["explain", "--model", str(tmp_path / "converted"), "--image", str(tmp_path / "item.png"),
                 "--out", str(tmp_path / "maps.png"), "--json"]) == 0
    maps = json.loads((tmp_path / "maps.json").read_text())
    assert sorted(maps["high_res"]) == ["adapters.0", "adapters.1", "adapters.2"]
    assert all(max(map(max, m)) > 0 for m in maps["high_res"].values())
    assert main(["explain", "--image", str(tmp_path / "item.png")]) == 2  # neither --model nor --encoder
    assert main(["explain", "--encoder", "llava-hr-tiny", "--image", str(tmp_path / "missing.png")]) == 2
