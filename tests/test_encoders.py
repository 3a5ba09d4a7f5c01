"""The dual-pathway encoder: every token pathway with every map pathway kind, at tiny size."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixres
from mixres import ConfigError, ShapeError, WeightsError
from mixres.encoders.presets import TINY_CNN, TINY_VIT

TOKEN_PATHWAYS = {
    "hf_clip": {"name": "hf_clip", "config": TINY_VIT, "drop_prefix": True},
    "hf_siglip": {"name": "hf_siglip", "config": TINY_VIT},
    "open_clip_vit": {"name": "open_clip_vit", "config": {"embed_dim": 16, "vision_cfg": dict(
        image_size=24, patch_size=4, width=32, layers=4, head_width=16)}},
    "timm_vit": {"name": "timm_vit", "model_name": "vit_tiny_patch16_224",
                 "model_kwargs": dict(img_size=24, patch_size=4, depth=4, embed_dim=32, num_heads=2)},
}
MAP_PATHWAYS = {
    "timm_map": {"name": "timm_map", "model_name": "convnext_atto", "model_kwargs": TINY_CNN},
    "open_clip_convnext": {"name": "open_clip_convnext", "config": {"embed_dim": 16, "vision_cfg": dict(
        timm_model_name="convnext_atto", timm_pool="", timm_proj="mlp", image_size=64)}},
}
COMBOS = [(t, m) for t in TOKEN_PATHWAYS for m in MAP_PATHWAYS]
sides = st.integers(2, 6).map(lambda k: 32 * k)  # multiples of the CNN's final stride


def _encoder(token, map_, final=False, **kw):
    tp = {"kind": "pathway", **TOKEN_PATHWAYS[token]}
    mp = {"kind": "pathway", **MAP_PATHWAYS[map_]}
    cfg = mixres.encoders.presets.llava_hr_config(128, vit=TINY_VIT)
    cfg.update(token_pathway=tp, map_pathway=mp, final_fusion={"name": "mr_final"} if final else None, **kw)
    return mixres.build({"kind": "encoder", **cfg})


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{t}+{m}" for t, m in COMBOS])
def combo(request):
    torch.manual_seed(0)
    return request.param, _encoder(*request.param).eval()


def test_identity_at_init_equals_plain_vit(combo):
    _, enc = combo
    images = torch.randn(2, 3, 192, 128)
    tokens, grid = enc(images)
    plain, plain_grid = enc.token_pathway(enc.vit_images(images))
    assert grid == plain_grid and torch.equal(tokens, plain)


@settings(max_examples=5)
@given(h=sides, w=sides, b=st.integers(1, 2))
def test_shape_contract(combo, h, w, b):
    _, enc = combo
    with torch.no_grad():
        tokens, grid = enc(torch.randn(b, 3, h, w))
    assert grid == enc.grid_for((h, w))
    assert tokens.shape == (b, enc.num_tokens((h, w)), enc.out_dim)


def test_batch_independence(combo):
    (token, map_), _ = combo
    torch.manual_seed(1)
    enc = _encoder(token, map_, final=True).eval()
    for adapter in enc.adapters:  # leave zero-init so the adapters really mix the map in
        torch.nn.init.normal_(adapter.high_proj.weight, std=0.1)
    images = torch.randn(3, 3, 128, 160)
    with torch.no_grad():
        out = enc(images)[0]
        images[1].normal_()
        out2 = enc(images)[0]
    torch.testing.assert_close(out[[0, 2]], out2[[0, 2]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[1], out2[1])


def test_frozen_parts_get_no_gradient(combo):
    (token, map_), _ = combo
    enc = _encoder(token, map_, final=True, freeze=["token_pathway", "map_pathway"])
    enc(torch.randn(1, 3, 128, 128))[0].square().mean().backward()
    for part in ("token_pathway", "map_pathway"):
        assert all(p.grad is None and not p.requires_grad for p in getattr(enc, part).parameters()), part
    assert all(p.grad is not None for p in enc.final_fusion.parameters())
    assert all(p.grad is not None for p in enc.adapters.parameters())


def test_config_round_trip(combo):
    _, enc = combo
    cfg = json.loads(json.dumps(enc.config))
    again = mixres.build(cfg).eval()
    assert again.config == enc.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    again.load_state_dict(enc.state_dict())
    images = torch.randn(1, 3, 96, 160)
    assert torch.equal(again(images)[0], enc(images)[0])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    enc = _encoder("hf_clip", "timm_map", final=True)
    images = torch.randn(1, 3, 128, 128)
    grads = []
    for flag in (False, True):
        enc.set_grad_checkpointing(flag)
        enc.zero_grad()
        enc(images)[0].square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)


def test_tiny_preset_tokens_and_policy():
    enc = mixres.create_encoder("llava-hr-tiny")
    assert enc.image_size == (256, 256)
    assert enc.vit_size(256) == (32, 32) and enc.num_tokens() == 64
    assert enc.vit_size(96) == (24, 24)  # never below the ViT's native size (LLaVA-HR: 336)
    assert enc.grid_for((512, 256)) == (16, 8)
    assert mixres.create_encoder("llava-hr-tiny-lowres").adapters.__len__() == 0


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.zeros(1, 3, 100, 128), ShapeError, "cannot be aligned.*multiples of 32"),
        (torch.zeros(1, 4, 128, 128), ShapeError, "3 channels"),
        (torch.zeros(3, 128, 128), ShapeError, "rank 4"),
        (torch.zeros(0, 3, 128, 128), ShapeError, "empty batch"),
    ],
)
def test_bad_images(images, error, match):
    with pytest.raises(error, match=match):
        mixres.create_encoder("llava-hr-tiny")(images)


def test_bad_construction():
    with pytest.raises(ConfigError, match=r"after_block'\] has to be in \[1, 4\].*got 9"):
        mixres.create_encoder("llava-hr-tiny", injections=[{"after_block": 9, "fusion": {"name": "mr_adapter"}}])
    with pytest.raises(ConfigError, match=r"widths \[7\], but map stage\(s\) 3 have \[64\] channels"):
        mixres.create_encoder("llava-hr-tiny", injections=[{"after_block": 1, "fusion": {"name": "mr_adapter", "high_dim": 7}}])
    with pytest.raises(ConfigError, match="only the final fusion may"):
        mixres.create_encoder("llava-hr-tiny", injections=[{"after_block": 1, "fusion": {"name": "mr_final", "out_dim": 8}}])
    with pytest.raises(ConfigError, match="freeze takes parts"):
        mixres.create_encoder("llava-hr-tiny", freeze=["vit"])
    with pytest.raises(ConfigError, match="block order"):
        mixres.create_encoder("llava-hr-tiny", injections=[{"after_block": 3, "fusion": {"name": "mr_adapter"}},
                                                           {"after_block": 1, "fusion": {"name": "mr_adapter"}}])
    with pytest.raises(KeyError, match="did you mean 'llava-hr-tiny'"):
        mixres.create_encoder("llava-hr-tiy")


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        mixres.create_encoder("llava-hr-tiny", pretrained=tmp_path / "nope")
    with pytest.raises(WeightsError, match="openai/clip-vit-large-patch14-336"):
        mixres.create_encoder("llava-hr-7b-1024", pretrained=True)


def test_describe_prints_parts(capsys):
    from mixres.cli import main

    assert main(["describe", "llava-hr-tiny"]) == 0
    out = capsys.readouterr().out
    enc = mixres.create_encoder("llava-hr-tiny")
    assert "64 tokens" in out
    assert f"{sum(p.numel() for p in enc.adapters.parameters()):,}" in out


@pytest.mark.slow
@pytest.mark.parametrize("name, tokens", [("llava-hr-7b-1024", 1024), ("llava-hr-7b-1536", 2304), ("llava-hr-x-1024", 1024)])
def test_full_size_presets(name, tokens):
    enc = mixres.create_encoder(name).eval()
    size = enc.image_size
    assert enc.num_tokens() == tokens
    with torch.no_grad():
        out, grid = enc(torch.randn(1, 3, *size))
    assert out.shape == (1, tokens, 1024)


def test_local_backbone_weights(tmp_path):
    """pretrained={"token_pathway": ViT directory, "map_pathway": CNN checkpoint} loads both."""
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(3)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VIT))
    clip.save_pretrained(tmp_path / "vit")
    cnn = timm.create_model("convnext_atto", **TINY_CNN)
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(tmp_path / "cnn.safetensors"))
    enc = mixres.create_encoder(
        "llava-hr-tiny", pretrained={"token_pathway": tmp_path / "vit", "map_pathway": tmp_path / "cnn.safetensors"}
    )
    ours = dict(enc.token_pathway.named_parameters())
    for name, p in clip.named_parameters():
        match = [v for k, v in ours.items() if k.endswith(name)]
        assert len(match) == 1 and torch.equal(match[0], p), name
    assert torch.equal(enc.map_pathway.model.stem[0].weight, cnn.stem[0].weight)
    with pytest.raises(ConfigError, match="'token_pathway' and 'map_pathway'"):
        mixres.create_encoder("llava-hr-tiny", pretrained={"vit": tmp_path / "vit"})
    with pytest.raises(WeightsError):
        mixres.create_encoder("llava-hr-tiny", pretrained={"map_pathway": tmp_path / "missing.safetensors"})
