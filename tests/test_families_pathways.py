"""The ``hf_idefics3`` / ``hf_smolvlm`` token pathways against their source ViTs (tiny, random, CPU)."""

import pytest
import torch

pytest.importorskip("transformers")

import mixres  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8, image_size=32)


@pytest.fixture(scope="module", params=["hf_idefics3", "hf_smolvlm"])
def vit(request):
    torch.manual_seed(0)
    return mixres.create_pathway(request.param, config=TINY).eval()


@pytest.mark.parametrize("size", [(32, 32), (24, 48), (64, 40)])
def test_tokens_equal_the_source_last_hidden_state_at_any_grid(vit, size):
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        tokens, grid = vit(images)
        # the source's own bucketed positions: no resampling of ours in between, at every grid
        theirs = vit.model(images).last_hidden_state
    assert grid == (size[0] // 8, size[1] // 8) == vit.grid_for(size)
    torch.testing.assert_close(tokens, theirs, rtol=0, atol=1e-6)  # same ops; 1e-6 for fused-kernel order


def test_contract_attributes_and_blocks(vit):
    assert (vit.dim, vit.patch_size, vit.num_blocks, vit.num_prefix_tokens, vit.post_norm) == (32, 8, 3, 0, True)
    images = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        x, grid = vit.embed(images)
        stepwise = vit.finalize(vit.run_blocks(vit.run_blocks(x, 0, 1), 1, 3))
        tokens, _ = vit(images)
    assert x.shape == (1, 6, 32) and grid == (2, 3)
    torch.testing.assert_close(stepwise, tokens, rtol=0, atol=0)  # the same calls in the same order


def test_penultimate_layer_has_no_post_norm():
    p = mixres.create_pathway("hf_idefics3", config=TINY, select_layer=-2).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = p(images)
        x, _ = p.embed(images)
        expected = p.run_blocks(x, 0, 2)
    assert p.post_norm is False
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_weights_from_a_saved_directory(tmp_path, vit):
    vit.model.save_pretrained(tmp_path)
    again = mixres.create_pathway(vit.registry_name, config=TINY, weights=str(tmp_path)).eval()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), vit.state_dict().values()))
