"""Qwen2.5-VL and Qwen3-VL in mixres: the packed ``hf_qwen2_5_vl`` / ``hf_qwen3_vl`` pathways, the packed
encoder, and mrify (tiny, random, CPU). Every test runs for both families."""

import copy

import pytest
import torch
from einops import rearrange, repeat

pytest.importorskip("transformers")

import mixres  # noqa: E402
from mixres.encoders.packed import PackedDualPathwayEncoder  # noqa: E402
from mixres.errors import ShapeError  # noqa: E402
from mixres.integrations.hf import UnsupportedModelError, generate, load_pretrained, mrify  # noqa: E402
from mixres.integrations.hf.qwen_processor import high_res_size  # noqa: E402
from mixres.integrations.hf.tiny import tiny_llava  # noqa: E402
from mixres.integrations.hf.tiny_qwen import PROMPT, TINY_QWEN3_VISION, TINY_QWEN_VISION, tiny_qwen2_5_vl, tiny_qwen3_vl  # noqa: E402
from mixres.pathways.hf_qwen2_5_vl import _permute, patchify  # noqa: E402

MAP = {"name": "timm_map", "model_name": "convnext_atto", "out_indices": [-1]}
FAMILIES = {
    "qwen2_5_vl": dict(tiny=tiny_qwen2_5_vl, vision=TINY_QWEN_VISION, pathway="hf_qwen2_5_vl", patch=14,
                       cls="MixresQwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": dict(tiny=tiny_qwen3_vl, vision=TINY_QWEN3_VISION, pathway="hf_qwen3_vl", patch=16,
                     cls="MixresQwen3VLForConditionalGeneration"),
}
UNITS = [(2, 3), (4, 2), (3, 4)]  # ViT views in merge units (28 / 32 px): grids 4x6, 8x4, 6x8


def _packed(units, patch, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(1, 3, 2 * patch * h, 2 * patch * w, generator=g) for h, w in units]
    thw = torch.tensor([[1, 2 * h, 2 * w] for h, w in units])
    return images, torch.cat([patchify(i, patch_size=patch) for i in images]), thw


@pytest.fixture(scope="module", params=list(FAMILIES))
def vit(request):
    torch.manual_seed(0)
    spec = FAMILIES[request.param]
    return mixres.create_pathway(spec["pathway"], config=spec["vision"]).eval()


# --- the pathway -------------------------------------------------------------------------------


def test_pathway_equals_qwens_own_vision_model_on_a_packed_batch(vit):
    _, patches, thw = _packed(UNITS, vit.patch_size)
    with torch.no_grad():
        x, layout = vit(patches, thw)
        theirs = vit.model(patches, grid_thw=thw)
        merged = vit.merge(x, layout)
    # the same modules called in the same order on the same tensors: only kernel choice could differ
    torch.testing.assert_close(x, theirs.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, theirs.pooler_output, rtol=0, atol=1e-6)
    for ours, source in zip(vit.deepstack(layout) if vit.tap_blocks else [], getattr(theirs, "deepstack_features", None) or []):
        torch.testing.assert_close(ours, source, rtol=0, atol=1e-6)  # Qwen3-VL's DeepStack features
    assert len(layout.taps) == len(getattr(theirs, "deepstack_features", None) or [])
    assert layout.grids == ((4, 6), (8, 4), (6, 8)) and merged.shape == (sum(h * w for h, w in layout.grids) // 4, 32)


def test_block_slices_equal_one_call(vit):
    _, patches, thw = _packed(UNITS[:2], vit.patch_size)
    with torch.no_grad():
        x, layout = vit.embed(patches, thw)
        stepwise = vit.run_blocks(vit.run_blocks(x, 0, 1, layout), 1, 4, layout)
        whole, _ = vit(patches, thw)
    torch.testing.assert_close(stepwise, whole, rtol=0, atol=0)  # the same calls in the same order


def test_to_grids_gives_each_image_its_raster_grid(vit):
    images, patches, thw = _packed(UNITS, vit.patch_size)
    with torch.no_grad():
        _, layout = vit.embed(patches, thw)
        x = _permute(vit.model.patch_embed(patches), layout.window_index, 4)  # patch embeddings, in window order
        grids = vit.to_grids(x, layout)
        conv, p = vit.model.patch_embed.proj, vit.patch_size
        for image, tokens in zip(images, grids):
            # independent reference: the Conv3d on the 2-frame image itself, read in raster order
            direct = torch.nn.functional.conv3d(repeat(image, "b c h w -> b c t h w", t=2), conv.weight, conv.bias, stride=(2, p, p))
            torch.testing.assert_close(tokens, rearrange(direct, "b c t h w -> b (t h w) c"), rtol=0, atol=1e-5)
    assert torch.equal(vit.from_grids(grids, layout), x)  # scatter is the inverse of gather (index ops)
    assert torch.equal(layout.token_coords(), _qwen_coords(thw, layout.window_index))


def test_pathway_refuses_bad_packing(vit):
    _, patches, thw = _packed(UNITS[:1], vit.patch_size)
    with pytest.raises(ShapeError, match="holds 24 patches"):
        vit.embed(patches[:-4], thw)
    with pytest.raises(ShapeError, match=r"Tensor\[S, (1176|1536)\]"):
        vit.embed(patches[:, :100], thw)


# --- the packed encoder ------------------------------------------------------------------------


def _views(units, stride=32, seed=1):
    g = torch.Generator().manual_seed(seed)  # k = stride / patch: the map has the ViT's grid
    return [torch.randn(1, 3, 2 * stride * h, 2 * stride * w, generator=g) for h, w in units]


def test_zero_init_encoder_equals_the_source(vit):
    encoder = PackedDualPathwayEncoder(copy.deepcopy(vit), MAP, [{"after_block": k, "fusion": {"name": "mr_adapter"}} for k in (1, 2, 3)]).eval()
    _, patches, thw = _packed(UNITS, vit.patch_size)
    with torch.no_grad():
        x, layout = encoder(patches, thw, _views(UNITS))
        theirs = vit.model(patches, grid_thw=thw)
    # zero-init adapters return their input exactly and gather / scatter are index ops
    torch.testing.assert_close(x, theirs.last_hidden_state, rtol=0, atol=1e-6)
    assert PackedDualPathwayEncoder(**encoder.config).config == encoder.config
    with pytest.raises(ShapeError, match="one Tensor"):
        encoder(patches, thw, _views(UNITS[:2]))


# --- mrify -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    model, processor = FAMILIES[request.param]["tiny"]()
    original = copy.deepcopy(model)
    mr_model, mr_processor = mrify(model, map_pathway=MAP, processor=processor)
    return original, processor, mr_model.eval(), mr_processor


def _images(seed, sizes=((60, 90), (200, 90))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *s), generator=g, dtype=torch.uint8) for s in sizes]


def _inputs(processor, images):
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)


def test_vit_weights_kept_and_llm_and_merger_untouched(pair):
    original, _, mr_model, _ = pair
    vit = original.model.visual.state_dict()
    ours = mr_model.model.visual.encoder.token_pathway.model.state_dict()
    assert set(ours) == set(vit) and all(torch.equal(ours[k], vit[k]) for k in vit)  # every key, merger included
    mine = mr_model.state_dict()
    rest = {k: v for k, v in original.state_dict().items() if not k.startswith("model.visual.")}
    assert rest and all(torch.equal(mine[k], v) for k, v in rest.items())
    assert type(mr_model).__name__ in {f["cls"] for f in FAMILIES.values()}


def test_zero_init_logits_equal_the_original_on_the_low_res_view(pair):
    original, processor, mr_model, mr_processor = pair
    images = _images(0)
    inputs = _inputs(mr_processor, images)
    theirs = _inputs(processor, images)
    assert all(torch.equal(inputs[k], theirs[k]) for k in theirs)  # the ViT view and the prompt are Qwen's own
    with torch.no_grad():
        torch.testing.assert_close(mr_model(**inputs).logits, original(**theirs).logits, rtol=0, atol=1e-5)


def test_perturbed_adapters_let_the_high_res_view_change_the_logits(pair):
    original, processor, mr_model, mr_processor = pair
    model = copy.deepcopy(mr_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.model.visual.encoder.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        inputs = _inputs(mr_processor, _images(0))
        base = model(**inputs).logits
        assert (base - original(**_inputs(processor, _images(0))).logits).abs().max() > 1e-3
        other = dict(inputs, high_res_pixel_values=torch.randn_like(inputs["high_res_pixel_values"]))
        assert (model(**other).logits - base).abs().max() > 1e-4  # only the high-res view differs
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()  # trains: the CNN and every adapter get gradients
    encoder = model.model.visual.encoder
    for part in (encoder.map_pathway, *encoder.adapters):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_image_and_high_res_arguments_are_checked(pair):
    _, _, mr_model, mr_processor = pair
    inputs = _inputs(mr_processor, _images(0))
    inputs.pop("high_res_pixel_values")
    with pytest.raises(UnsupportedModelError, match="high_res_pixel_values"):
        mr_model(**inputs)
    with pytest.raises(UnsupportedModelError, match="not image_size"):
        mrify(tiny_qwen3_vl()[0], map_pathway=MAP, image_size=1024)
    with pytest.raises(UnsupportedModelError, match="high_res_scale is for Qwen"):
        mrify(tiny_llava()[0], map_pathway=MAP, image_size=64, high_res_scale=2)
    with pytest.raises(UnsupportedModelError, match="mrified already|not mrified yet"):
        mrify(copy.deepcopy(mr_model), map_pathway=MAP)


def test_save_load_round_trip_and_generate(pair, tmp_path):
    _, _, mr_model, mr_processor = pair
    model = copy.deepcopy(mr_model)
    with torch.no_grad():
        for p in model.model.visual.encoder.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path)
    mr_processor.save_pretrained(tmp_path)
    again, processor = load_pretrained(tmp_path)
    images = _images(3)
    inputs, reloaded = _inputs(mr_processor, images), _inputs(processor, images)
    assert all(torch.equal(inputs[k], reloaded[k]) for k in inputs)
    with torch.no_grad():
        torch.testing.assert_close(again(**reloaded).logits, model.eval()(**inputs).logits, rtol=0, atol=0)  # same weights, same ops
    out = again.generate(**reloaded, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, reloaded["input_ids"].shape[1] + 3)
    from PIL import Image

    answers = generate(again, processor, [Image.new("RGB", (90, 60), "red")], [PROMPT], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)


# --- the marker test: each image's adapter sees its own (h, w) grid ----------------------------


def _qwen_coords(thw, window_index):
    """(image, row, col) of each stream position as Qwen's own code knows it, independent of our
    raster indices: its rotary position ids, permuted by its window index as its forward does."""
    from transformers.vision_utils import get_vision_position_ids

    rows_cols = rearrange(get_vision_position_ids(thw, 2), "(u m) c -> u m c", m=4)[window_index].reshape(-1, 2)
    image = torch.repeat_interleave(torch.arange(len(thw)), thw.prod(-1))  # windows stay inside their image
    return torch.cat([image[:, None], rows_cols], dim=1)


def _high_term(encoder, patches, thw, views):
    """The first adapter's high-res term g * f_h(F_h) per token, in the ViT's own (window) order."""
    tp, adapter = encoder.token_pathway, encoder.adapters[0]
    maps = encoder.run_maps(views)
    x, layout = tp.embed(patches, thw)
    x = tp.run_blocks(x, 0, encoder.points[0][0], layout)
    terms = []
    for tokens, grid, stages in zip(tp.to_grids(x, layout), layout.grids, maps):
        high = adapter.high_branch(stages[-1], grid)
        terms.append(adapter.gate_value(adapter.low_branch(tokens, grid), high) * high)
    return tp.from_grids(terms, layout), layout


# k = stride / patch: the map has the ViT's grid; k = 3: the map is finer (average-pooled down)
@pytest.fixture(scope="module", params=[(f, k) for f in FAMILIES for k in ("aligned", 3.0)], ids=lambda p: f"{p[0]}-{p[1]}")
def perturbed(request):
    family, k = request.param
    spec = FAMILIES[family]
    scale = 32 / spec["patch"] if k == "aligned" else k
    model, _ = mrify(spec["tiny"]()[0], map_pathway=MAP, high_res_scale=scale)
    encoder = model.model.visual.encoder.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in encoder.adapters.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # a trained-looking adapter: no zero branch, a non-zero gate
    return encoder, scale


# Qwen2.5-VL window orders that differ from the processor's in every image (LLM grids 2x3, 4x3, 3x4), and thin images
@pytest.mark.parametrize("units", [[(2, 3), (4, 3), (3, 4)], [(3, 3), (2, 4)], [(1, 5), (5, 1)]])
def test_a_marker_in_one_region_peaks_at_that_token_of_each_image(units, perturbed):
    encoder, scale = perturbed
    patch = encoder.token_pathway.patch_size
    images, patches, thw = _packed(units, patch)
    blank = [torch.zeros(1, 3, *high_res_size(tuple(i.shape[-2:]), scale, 32)) for i in images]
    with torch.no_grad():
        plain, layout = _high_term(encoder, patches, thw, blank)
    coords = _qwen_coords(thw, layout.window_index)  # the ViT's own (image, row, col) of each stream position
    g = torch.Generator().manual_seed(len(units))
    for _ in range(2):  # two marker positions per image
        marked, where = [], []
        for view, (h, w) in zip(blank, (t[1:].tolist() for t in thw)):
            r, c = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
            height, width = view.shape[-2:]  # the pixels of token (r, c) in the high-res view
            view = view.clone()
            view[..., r * height // h:(r + 1) * height // h, c * width // w:(c + 1) * width // w] = 4.0
            marked.append(view)
            where.append((r, c))
        with torch.no_grad():
            term, _ = _high_term(encoder, patches, thw, marked)
        for i, spot in enumerate(where):
            mine = (coords[:, 0] == i).nonzero().flatten()
            for norm in (term.norm(dim=-1), (term - plain).norm(dim=-1)):  # the term, and what the marker changed
                peak = mine[norm[mine].argmax()]
                assert tuple(coords[peak, 1:].tolist()) == spot, f"image {i}: peak at {coords[peak].tolist()}, marker at {spot}"


# --- <|image_pad|> counts == features, for random sizes and budgets ------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def _count_check(pair, height, width, low, high):
    _, _, model, processor = pair
    processor = copy.deepcopy(processor)
    from transformers.image_utils import SizeDict

    processor.image_processor.size = SizeDict(shortest_edge=low, longest_edge=max(low, high))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(height * width))
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                  inputs["high_res_pixel_values"], inputs["high_res_grid"]).pooler_output
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert count == sum(f.shape[0] for f in features) == int(inputs["image_grid_thw"].prod()) // 4
    patch, grid = model.config.vision_config.patch_size, inputs["image_grid_thw"][0, 1:]
    high_res = high_res_size(tuple((grid * patch).tolist()), 32 / patch, 32)
    assert inputs["high_res_grid"][0].tolist() == [s // 32 for s in high_res] == grid.tolist()  # k = 32 / patch: the map is the ViT grid


_SIZES = dict(height=st.integers(8, 700), width=st.integers(8, 700), low=st.integers(32 * 32, 112 * 112),
              high=st.integers(32 * 32, 224 * 224))


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(**_SIZES)
def test_image_token_counts_equal_the_features_quick(pair, height, width, low, high):
    _count_check(pair, height, width, low, high)


@pytest.mark.slow
@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(**_SIZES)
def test_image_token_counts_equal_the_features_200_sizes(pair, height, width, low, high):
    _count_check(pair, height, width, low, high)
