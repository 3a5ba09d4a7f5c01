"""Pathway wrappers: the token / map contracts, equality with the source models, weights, errors.

Tiny random configs on the CPU; the full-size builds are marked ``slow``.
"""

import json
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixres
from mixres import ConfigError, ShapeError, UnknownNameError, WeightsError
from mixres.pathways._weights import load_state_dict_file

HF_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8, image_size=32)
OPEN_CLIP_TINY = {"embed_dim": 16, "vision_cfg": dict(image_size=32, patch_size=8, width=32, layers=3, head_width=8)}
TIMM_VIT_TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=4)
TOKEN_ARGS = {
    "hf_clip": dict(config=HF_TINY),
    "hf_siglip": dict(config=HF_TINY),
    "open_clip_vit": dict(config=OPEN_CLIP_TINY),
    "timm_vit": dict(model_name="vit_tiny_patch16_224", model_kwargs=TIMM_VIT_TINY),
}
TOKEN_NAMES = sorted(TOKEN_ARGS)
OPEN_CLIP_CONVNEXT_TINY = {"embed_dim": 16, "vision_cfg": dict(timm_model_name="convnext_atto", timm_pool="", timm_proj="mlp", image_size=64)}


def make_token(name, **overrides):
    torch.manual_seed(0)
    return mixres.create_pathway(name, **{**TOKEN_ARGS[name], **overrides})


def rebuild(pathway, **overrides):
    """Same architecture from the JSON config (with overrides), same weights."""
    again = mixres.build({**json.loads(json.dumps(pathway.config)), **overrides})
    again.load_state_dict(pathway.state_dict())
    return again


@pytest.fixture(scope="module", params=TOKEN_NAMES)
def token(request):
    return make_token(request.param).eval()


def _source_features(p, images, select_layer):
    """The source library's own features of one layer, without prefix rows."""
    name, layer = p.registry_name, p.num_blocks + 1 + select_layer
    if name in ("hf_clip", "hf_siglip"):
        out = p.model(images, output_hidden_states=True)
        if name == "hf_siglip" and select_layer == -1:
            return out.last_hidden_state  # SigLIP post-norms its last_hidden_state
        return out.hidden_states[layer][:, p.source_prefix_tokens :]
    if name == "open_clip_vit":
        out = p.visual.forward_intermediates(
            images, indices=[layer - 1], normalize_intermediates=select_layer == -1, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]
    if select_layer == -1:
        return p.model.forward_features(images)[:, p.source_prefix_tokens :]
    return p.model.forward_intermediates(images, indices=[layer - 1], intermediates_only=True, output_fmt="NLC")[0]


# -- token pathways -------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOKEN_NAMES)
@settings(max_examples=10)
@given(b=st.integers(1, 2), gh=st.integers(1, 6), gw=st.integers(1, 6))
def test_token_shape_contract(name, b, gh, gw):
    p = _cached(name)
    ps = p.patch_size
    images = torch.randn(b, 3, gh * ps, gw * ps)
    with torch.no_grad():
        x, grid = p.embed(images)
        tokens, grid2 = p(images)
    assert grid == grid2 == (gh, gw) == p.grid_for((gh * ps, gw * ps))
    assert x.shape == (b, p.num_prefix_tokens + gh * gw, p.dim)
    assert tokens.shape == (b, gh * gw, p.dim) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()


_CACHE = {}


def _cached(name):
    if name not in _CACHE:
        _CACHE[name] = make_token(name).eval()
    return _CACHE[name]


def test_attributes(token):
    assert (token.dim, token.patch_size, token.num_blocks, token.image_size) == (32, 8, 3, (32, 32))
    assert token.num_prefix_tokens == (0 if token.registry_name == "hf_siglip" else 1)
    assert token.select_layer == -1 and token.num_selected_blocks == 3
    assert "num_prefix_tokens" in repr(token)


@pytest.mark.parametrize("select_layer", [-1, -2])
def test_native_size_equals_the_source_model(token, select_layer):
    p = rebuild(token, select_layer=select_layer).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, grid = p(images)
        torch.testing.assert_close(tokens, _source_features(p, images, select_layer))
    assert grid == (4, 4) and p.num_selected_blocks == 3 + 1 + select_layer
    # the post-norm follows the source: on the last layer's features only (never for CLIP)
    assert p.post_norm == (select_layer == -1 and p.registry_name != "hf_clip")


def test_hf_clip_drop_prefix_equals_llava_hr_reference():
    """LLaVA-HR: embeddings (CLS + pos-embed), pre_layrnorm, drop CLS, the encoder, no post-norm."""
    p = make_token("hf_clip", drop_prefix=True).eval()
    images = torch.randn(2, 3, 32, 32)
    m = p.model
    with torch.no_grad():
        ref = m.encoder(inputs_embeds=m.pre_layrnorm(m.embeddings(images))[:, 1:]).last_hidden_state
        tokens, _ = p(images)
    torch.testing.assert_close(tokens, ref)
    assert p.num_prefix_tokens == 0 and not p.post_norm


@pytest.mark.parametrize("hw", [(48, 64), (64, 40), (16, 24)])
def test_hf_clip_resampled_pos_embed(hw):
    """Same grid layout as transformers' interpolate_pos_encoding; ours adds antialias (as LLaVA-HR)."""
    p = _cached("hf_clip")
    emb, (H, W) = p.model.embeddings, hw
    grid = (H // 8, W // 8)
    table = emb.position_embedding.weight[None]
    with torch.no_grad():
        theirs = emb.interpolate_pos_encoding(torch.zeros(1, 1 + grid[0] * grid[1], 32), H, W)
        torch.testing.assert_close(mixres.resample_pos_embed(table, grid, antialias=False), theirs)
        images = torch.randn(1, 3, H, W)
        patches = emb.patch_embedding(images).flatten(2).transpose(1, 2)
        stream = torch.cat([emb.class_embedding.expand(1, 1, -1), patches], 1) + mixres.resample_pos_embed(table, grid)
        torch.testing.assert_close(p.embed(images)[0], p.model.pre_layrnorm(stream))


def test_timm_vit_pos_embed_uses_timm_resampling():
    from timm.layers import resample_abs_pos_embed

    p = _cached("timm_vit")
    ours = mixres.resample_pos_embed(p.model.pos_embed, (3, 7))
    torch.testing.assert_close(ours, resample_abs_pos_embed(p.model.pos_embed, [3, 7], num_prefix_tokens=1))


def test_keep_and_drop_prefix(token):
    dropped = rebuild(token, drop_prefix=True).eval()
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        kept_x, grid = token.embed(images)
        drop_x, grid2 = dropped.embed(images)
        tokens, _ = dropped(images)
    P = token.num_prefix_tokens
    assert grid == grid2 and dropped.num_prefix_tokens == 0
    torch.testing.assert_close(drop_x, kept_x[:, P:])  # the pre-norm acts per token
    assert tokens.shape == (2, 6, 32)
    if P:  # without CLS in the stream attention sees other tokens, so the features change
        assert not torch.allclose(tokens, token(images)[0])


@pytest.mark.parametrize("split", [0, 1, 2, 3])
def test_run_blocks_in_two_slices_equals_one_pass(token, split):
    images = torch.randn(2, 3, 24, 16)
    with torch.no_grad():
        x, _ = token.embed(images)
        whole = token.run_blocks(x, 0, token.num_blocks)
        sliced = token.run_blocks(token.run_blocks(x, 0, split), split, token.num_blocks)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
    assert torch.equal(token.run_blocks(x, 1, 1), x)


def test_batch_independence(token):
    images = torch.randn(3, 3, 16, 32)
    changed = images.clone()
    changed[1].normal_()
    with torch.no_grad():
        out, _ = token(images)
        out2, _ = token(changed)
    torch.testing.assert_close(out[[0, 2]], out2[[0, 2]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[1], out2[1])


def test_config_round_trip(token):
    cfg = json.loads(json.dumps(token.config))
    assert cfg["kind"] == "pathway" and cfg["name"] == token.registry_name
    again = mixres.build(cfg).eval()
    assert again.config == token.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in token.state_dict().items()}
    again.load_state_dict(token.state_dict())
    images = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(again(images)[0], token(images)[0])


def test_grad_checkpointing_gives_the_same_grads(token):
    images = torch.randn(2, 3, 24, 32)
    grads = []
    for enable in (False, True):
        p = rebuild(token).train()
        p.set_grad_checkpointing(enable)
        calls = []
        p._blocks[0].register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        tokens, _ = p(images)
        tokens.square().mean().backward()
        assert len(calls) == 1 + enable  # checkpointing recomputes the block in the backward pass
        grads.append({k: v.grad for k, v in p.named_parameters() if v.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=k)


@pytest.mark.parametrize("name", [*TOKEN_NAMES, "timm_map"])
def test_bfloat16_parameters_take_float32_images(name):
    if name == "timm_map":
        p = mixres.create_pathway(name, model_name="resnet10t", out_indices=[-1], dtype=torch.bfloat16)
    else:
        p = make_token(name, dtype=torch.bfloat16)
    assert "dtype" not in p.config and {t.dtype for t in p.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = p.eval()(torch.randn(1, 3, 32, 16))
    out = out[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_every_token_pathway_is_registered():
    assert set(TOKEN_NAMES) | {"timm_map", "open_clip_convnext"} <= set(mixres.list_pathways())


# -- map pathways ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["convnext_atto", "resnet10t", "efficientnet_b0"])
def test_timm_map_dims_and_strides_match_the_maps(model_name):
    p = mixres.create_pathway("timm_map", model_name=model_name).eval()
    with torch.no_grad():
        maps = p(torch.randn(1, 3, 32, 64))
    assert len(maps) == p.num_stages == len(p.dims) == len(p.strides)
    for m, dim, stride in zip(maps, p.dims, p.strides):
        assert m.shape == (1, dim, 32 // stride, 64 // stride)
    assert list(p.strides) == sorted(p.strides) and p.strides[-1] == 32


@pytest.fixture(scope="module")
def convnext_file(tmp_path_factory):
    """A timm convnext_atto checkpoint (with its head) and the model it came from."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "convnext_atto.safetensors"
    save_file(model.state_dict(), str(path))
    return str(path), model


@pytest.mark.parametrize("out_indices", [None, [1, -1]])
def test_timm_map_equals_timm_forward_intermediates(convnext_file, out_indices):
    path, model = convnext_file
    p = mixres.create_pathway("timm_map", model_name="convnext_atto", out_indices=out_indices, weights=path).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_intermediates(images, indices=list(p.out_indices), intermediates_only=True)
        maps = p(images)
    assert len(maps) == len(ref) == len(out_indices or range(4))
    for ours, theirs in zip(maps, ref):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not any(k.startswith("model.head") for k in p.state_dict())  # pruned: no unused parameters


def test_timm_map_config_round_trip_and_grad_checkpointing():
    torch.manual_seed(0)
    p = mixres.create_pathway("timm_map", model_name="convnext_atto", out_indices=[2, 3])
    again = rebuild(p)
    assert again.config == p.config and (again.dims, again.strides) == (p.dims, p.strides) == ((160, 320), (16, 32))
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for q, enable in ((p, False), (again, True)):  # same weights
        q.train().set_grad_checkpointing(enable)
        calls = []
        q.model.stages[0].blocks[0].register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        sum(m.square().mean() for m in q(images)).backward()
        assert len(calls) == 1 + enable
        grads.append({k: v.grad for k, v in q.named_parameters() if v.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=k)


def test_timm_map_skips_a_head_of_another_size(tmp_path):
    import timm

    sd = timm.create_model("resnet10t", pretrained=False, num_classes=11).state_dict()
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)  # a training checkpoint
    p = mixres.create_pathway("timm_map", model_name="resnet10t", weights=str(path))
    torch.testing.assert_close(p.model.conv1[0].weight, sd["conv1.0.weight"])


def test_open_clip_convnext_equals_its_trunk_and_loads_open_clip_checkpoints(tmp_path):
    from mixres.pathways.open_clip import build_open_clip_visual, open_clip_model_config

    torch.manual_seed(2)
    visual = build_open_clip_visual(open_clip_model_config("convnext_large_d_320", OPEN_CLIP_CONVNEXT_TINY)).eval()
    full = {f"visual.{k}": v for k, v in visual.state_dict().items()} | {"logit_scale": torch.ones([])}
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(full, path)
    p = mixres.create_pathway(
        "open_clip_convnext", model_name="convnext_large_d_320", config=OPEN_CLIP_CONVNEXT_TINY, weights=str(tmp_path)
    ).eval()
    assert p.dims == (40, 80, 160, 320) and p.strides == (4, 8, 16, 32)
    images = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        ref = visual.trunk.forward_intermediates(images, intermediates_only=True)
        maps = p(images)
    for ours, theirs in zip(maps, ref):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    again = rebuild(p)
    assert again.config == p.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in p.state_dict().items()}


class _NoIntermediates(torch.nn.Module):
    """A timm-registered model without forward_intermediates (uses the features_only path)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 2, stride=2)
        self.stage = torch.nn.Conv2d(4, 8, 2, stride=2)
        self.head = torch.nn.Linear(8, 3)
        self.feature_info = [dict(num_chs=4, reduction=2, module="stem"), dict(num_chs=8, reduction=4, module="stage")]

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def test_timm_map_without_forward_intermediates_uses_feature_list_net(tmp_path):
    import timm

    if not timm.is_model("mixres_test_no_intermediates"):

        def mixres_test_no_intermediates(pretrained=False, **kwargs):
            return _NoIntermediates()

        timm.models.register_model(mixres_test_no_intermediates)
    source = _NoIntermediates()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    p = mixres.create_pathway("timm_map", model_name="mixres_test_no_intermediates", weights=str(tmp_path / "w.pt"))
    images = torch.randn(1, 3, 8, 12)
    maps = p(images)
    assert (p.dims, p.strides) == ((4, 8), (2, 4)) and [m.shape[1:] for m in maps] == [(4, 4, 6), (8, 2, 3)]
    torch.testing.assert_close(maps[1], source.stage(source.stem(images)))


# -- weights --------------------------------------------------------------------------------
def test_hf_clip_loads_a_local_save_pretrained_dir(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    full = CLIPModel(CLIPConfig(vision_config=HF_TINY, text_config=text)).eval()
    full.save_pretrained(tmp_path)  # a whole CLIPModel: the text tower is left out
    p = mixres.create_pathway("hf_clip", weights=str(tmp_path), select_layer=-2).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = full.vision_model(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(p(images)[0], ref)
    assert rebuild(p).config["weights"] == str(tmp_path)


def test_hf_weight_file_with_vision_model_prefix(tmp_path):
    from safetensors.torch import save_file

    src = _cached("hf_siglip")
    save_file({f"vision_model.{k}": v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    p = mixres.create_pathway("hf_siglip", config=HF_TINY, weights=str(tmp_path / "w.safetensors")).eval()
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(p(images)[0], src(images)[0])


def test_open_clip_vit_loads_a_checkpoint(tmp_path):
    src = _cached("open_clip_vit")
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in src.visual.state_dict().items()}}, tmp_path / "ckpt.pt")
    p = make_token("open_clip_vit", weights=str(tmp_path / "ckpt.pt")).eval()
    images = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(p(images)[0], src(images)[0])


def test_timm_vit_loads_a_checkpoint_with_its_head(tmp_path):
    import timm

    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_VIT_TINY).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    p = make_token("timm_vit", weights=str(tmp_path / "vit.pth")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(p(images)[0], model.forward_features(images)[:, 1:])


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("hf_clip", dict(weights="/no/such/dir")),
        ("hf_clip", dict(weights="openai/clip-vit-large-patch14-336")),  # a hub id: never downloaded
        ("timm_vit", dict(weights="/no/such/vit.safetensors")),
        ("open_clip_vit", dict(weights="/no/such/open_clip_model.safetensors")),
    ],
)
def test_missing_weights_fail_fast_with_a_local_path_hint(name, kwargs):
    start = time.monotonic()
    with pytest.raises(WeightsError, match="is not a local file or directory.*pass the local path"):
        make_token(name, **kwargs)
    assert time.monotonic() - start < 20  # no network waits


def test_missing_map_weights():
    with pytest.raises(WeightsError, match="'/no/such.pth' is not a local file"):
        mixres.create_pathway("timm_map", model_name="resnet10t", weights="/no/such.pth")


def test_checkpoint_with_wrong_shapes_lists_them(tmp_path, convnext_file):
    path, _ = convnext_file
    with pytest.raises(WeightsError, match=r"124 key\(s\) with other shapes: stages.0.blocks.0.conv_dw.bias: checkpoint \(40,\) vs model \(48,\)"):
        mixres.create_pathway("timm_map", model_name="convnext_femto", weights=path)
    big = make_token("timm_vit", model_kwargs={**TIMM_VIT_TINY, "img_size": 48})
    torch.save({k.removeprefix("model."): v for k, v in big.state_dict().items()}, tmp_path / "vit48.pt")
    with pytest.raises(WeightsError, match=r"pos_embed: checkpoint \(1, 37, 32\) vs model \(1, 17, 32\)"):
        make_token("timm_vit", weights=str(tmp_path / "vit48.pt"))


def test_hf_dir_with_wrong_shapes_lists_them(tmp_path):
    _cached("hf_clip").model.save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match=r"position_embedding.weight: checkpoint \(17, 32\) vs model \(37, 32\)"):
        mixres.create_pathway("hf_clip", config={"image_size": 48}, weights=str(tmp_path))


def test_weight_files_are_never_unpickled(tmp_path):
    torch.save({"weight": torch.ones(1), "obj": _NoIntermediates}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="never unpickles arbitrary objects"):
        load_state_dict_file(tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="holds none of the weight files"):
        load_state_dict_file(tmp_path)


# -- bad inputs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(1, 3, 30, 32), r"size \(30, 32\) is not a multiple of the patch size 8"),
        (torch.zeros(1, 4, 32, 32), "3 channels"),
        (torch.zeros(3, 32, 32), "rank 4"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "normalised floats"),
    ],
)
def test_bad_images(token, images, match):
    with pytest.raises(ShapeError, match=match):
        token(images)


def test_bad_images_for_map_pathways():
    p = mixres.create_pathway("timm_map", model_name="resnet10t")
    with pytest.raises(ShapeError, match="3 channels"):
        p(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ShapeError, match="rank 4"):
        p(torch.zeros(3, 32, 32))


def test_bad_run_blocks_calls(token):
    x, _ = token.embed(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match=r"0 <= start <= end <= 3, but got start=2, end=1"):
        token.run_blocks(x, 2, 1)
    with pytest.raises(ShapeError, match=r"Tensor\[B, N, 32\], but got \(1, 17, 16\)"):
        token.run_blocks(torch.zeros(1, 17, 16), 0, 1)


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("timm_map", dict(model_name="convnext_atoo"), UnknownNameError, "unknown timm model 'convnext_atoo'; did you mean 'convnext_atto'"),
        ("timm_vit", dict(model_name="vit_tiny_patch16_22"), UnknownNameError, "did you mean"),
        ("timm_vit", dict(model_name="resnet10t"), ConfigError, "use timm_map"),
        ("timm_map", dict(model_name="resnet10t", model_kwargs={"pretrained": True}), ConfigError, "may not set.*pretrained"),
        ("timm_map", dict(model_name="resnet10t", model_kwargs={"colour": 1}), ConfigError, "does not take model_kwargs"),
        ("timm_map", dict(model_name="resnet10t", out_indices=[5]), ConfigError, r"stages in \[-5, 4\]"),
        ("timm_map", dict(model_name="resnet10t", out_indices=[1, -4]), ConfigError, "twice"),
        ("hf_clip", dict(config={**HF_TINY, "hiden_size": 8}), ConfigError, r"\['hiden_size'\] that CLIPVisionConfig does not take"),
        ("hf_clip", dict(config=HF_TINY, select_layer=4), ConfigError, r"select_layer has to be in \[-4, 3\]"),
        ("hf_clip", dict(config=HF_TINY, drop_prefix="yes"), TypeError, "drop_prefix has to be bool"),
        ("open_clip_vit", dict(model_name="ViT-L-14-333"), UnknownNameError, "did you mean 'ViT-L-14-336'"),
        ("open_clip_vit", dict(model_name="hf-hub:timm/vit"), ConfigError, "needs a download"),
        ("open_clip_vit", dict(config={**OPEN_CLIP_TINY, "vision_cfg": {"widht": 3}}), ConfigError, r"\['widht'\]"),
        ("open_clip_vit", dict(config=OPEN_CLIP_CONVNEXT_TINY), ConfigError, "use open_clip_convnext"),
        ("open_clip_convnext", dict(config=OPEN_CLIP_TINY), ConfigError, "use open_clip_vit"),
        ("open_clip_convnext", dict(config={**OPEN_CLIP_CONVNEXT_TINY, "vision_cfg": {**OPEN_CLIP_CONVNEXT_TINY["vision_cfg"], "timm_model_pretrained": True}}), ConfigError, "downloads"),
    ],
)
def test_bad_constructor_arguments(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        mixres.create_pathway(name, **kwargs)


# -- full size (random init, no download) ---------------------------------------------------
@pytest.mark.slow
def test_full_size_llava_hr_pathways():
    from mixres.pathways.hf import CLIP_VIT_L_14_336

    vit = mixres.create_pathway("hf_clip", config=CLIP_VIT_L_14_336, drop_prefix=True)
    assert (vit.dim, vit.patch_size, vit.num_blocks, vit.image_size) == (1024, 14, 24, (336, 336))
    assert sum(p.numel() for p in vit.parameters()) == 303_507_456
    assert vit.grid_for(448) == (32, 32)
    cnn = mixres.create_pathway("timm_map", model_name="convnext_large_mlp", out_indices=[-1])
    assert cnn.dims == (1536,) and cnn.strides == (32,)
    assert sum(p.numel() for p in cnn.parameters()) == 196_227_264  # convnext_large without its head
    with torch.no_grad():
        tokens, grid = vit.eval()(torch.randn(1, 3, 448, 448))
        (map,) = cnn.eval()(torch.randn(1, 3, 1024, 1024))
    assert tokens.shape == (1, 1024, 1024) and grid == (32, 32) and map.shape == (1, 1536, 32, 32)
