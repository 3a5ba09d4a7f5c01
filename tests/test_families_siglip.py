"""mrify on today's SigLIP MLLMs: LLaVA-OneVision, Gemma 3, Idefics3 and SmolVLM (tiny, random, CPU).

Each family keeps its own token reduction after the encoder (OneVision's anyres_max_9 resize,
Gemma 3's average pool, Idefics3's pixel shuffle) and the processor's ``<image>`` expansion follows.
"""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from PIL import Image  # noqa: E402

from mixres.integrations.hf import MixresVisionModel, UnsupportedModelError, load_pretrained, mrify  # noqa: E402
from mixres.integrations.hf.tiny_families import (  # noqa: E402
    tiny_gemma3,
    tiny_idefics3,
    tiny_llava_onevision,
    tiny_smolvlm,
)

MAP = {"name": "timm_map", "model_name": "convnext_atto", "out_indices": [-1]}
SIZE = 64  # the ViT reads its native 16 px (grid 4): the zero-init model equals the original there
BIG = 256  # grid 8: MRA's count differs from the native one, and the family's reduction composes with it
FAMILIES = {
    "llava_onevision": (tiny_llava_onevision, "USER: <image> what is in the image ? ASSISTANT:"),
    "gemma3": (tiny_gemma3, "<start_of_image> describe the picture"),
    "idefics3": (tiny_idefics3, "USER: <image> what is in the image ? ASSISTANT:"),
    "smolvlm": (tiny_smolvlm, "USER: <image> what is in the image ? ASSISTANT:"),
}
IMAGE_IDS = {"gemma3": "image_token_id"}


def _build(name):
    if name == "smolvlm":
        pytest.importorskip("num2words")  # SmolVLMProcessor needs it
    return FAMILIES[name][0]()


def _images(sizes=((140, 130), (50, 200)), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _inputs(name, processor, prompts, images):
    processor.tokenizer.padding_side = "left"
    nested = images if name == "llava_onevision" else [[im] for im in images]
    return processor(images=nested, text=prompts, return_tensors="pt", padding=True)


def _prompts(name):
    prompt = FAMILIES[name][1]
    return [prompt, prompt.replace("describe", "what").replace("what is", "what")]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, original model, mrified model, mrified processor)."""
    model, processor = _build(request.param)
    mr_model, mr_processor = mrify(copy.deepcopy(model), map_pathway=MAP, image_size=SIZE, processor=processor)
    return request.param, model, mr_model.eval(), mr_processor


def _tower(model):
    inner = model.model
    return getattr(inner, "vision_tower", None) or inner.vision_model


def _low_res(model, name, inputs):
    """The original model's inputs: every tile resized to what the ViT reads inside the encoder."""
    encoder = _tower(model).encoder
    pixels = inputs["pixel_values"]
    low = encoder.vit_images(pixels.flatten(0, pixels.ndim - 4)).unflatten(0, pixels.shape[: pixels.ndim - 3])
    out = {**inputs, "pixel_values": low}
    if "pixel_attention_mask" in out:  # every real tile is valid everywhere (checked), padding tiles are all zero
        real = ~(pixels == 0).flatten(2).all(-1)
        assert bool(inputs["pixel_attention_mask"][real].all())
        out.pop("pixel_attention_mask")
    return out


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_vit_weights_kept_every_key(family):
    name, original, model, _ = family
    ours = _tower(model).encoder.token_pathway.model.state_dict()
    theirs = _tower(original).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    untouched = {k: v for k, v in original.state_dict().items() if "vision_tower" not in k and "vision_model" not in k}
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in untouched.items())  # the LLM and the projector


def test_zero_init_logits_equal_the_original_on_the_low_res_view(family):
    name, original, model, processor = family
    inputs = _inputs(name, processor, _prompts(name), _images())
    # atol 1e-5: the two models run the same float ops on the same values except the encoder's
    # identity adapters (exactly zero terms), so only summation-order noise is left
    torch.testing.assert_close(_logits(model, inputs), _logits(original, _low_res(model, name, inputs)), rtol=0, atol=1e-5)


def test_perturbed_adapters_let_the_high_res_pixels_change_the_logits(family):
    name, original, model, processor = family
    model = copy.deepcopy(model)
    inputs = _inputs(name, processor, _prompts(name), _images())
    before = _logits(model, inputs)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in _tower(model).encoder.adapters.parameters():
            p.add_(0.5 * torch.randn_like(p))
    after = _logits(model, inputs)
    assert (after - before).abs().max() > 1e-3
    # the ViT's view is the same; what changed is the high-res map read through the adapters: a
    # different high-res image with the same low-res view changes the logits too
    pixels = inputs["pixel_values"]
    bumped = pixels + 0.5 * torch.sign(torch.sin(torch.arange(pixels.shape[-1]) * 1.7)) * (pixels != 0)
    assert (_logits(model, {**inputs, "pixel_values": bumped}) - after).abs().max() > 1e-4


@pytest.mark.parametrize(("count", "size"), [(25, SIZE), pytest.param(200, BIG, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_image_tokens_equal_features_for_random_sizes(name, count, size):
    """25 sizes at 64 px tiles in the quick suite; the issue's 200 at 256 px (grid 8) with ``-m slow``
    (about 10 minutes on a busy 2-core machine, most of it Idefics3's up to 17 tiles per image)."""
    model, processor = _build(name)
    model, processor = mrify(model, map_pathway=MAP, image_size=size, processor=processor)
    if name == "gemma3":  # pan-and-scan: a varying number of crops per image
        processor.image_processor.do_pan_and_scan = True
        processor.image_processor.pan_and_scan_min_crop_size = 16
    rng = np.random.default_rng(15)
    sizes = [tuple(int(v) for v in rng.integers(8, 700, 2)) for _ in range(count)]
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    for start in range(0, count, 25):
        images = _images(sizes[start:start + 25], seed=start)
        inputs = _inputs(name, processor, ["<start_of_image> a" if name == "gemma3" else "<image> a"] * len(images), images)
        inputs.pop("token_type_ids", None)
        kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "pixel_attention_mask")}
        with torch.no_grad():
            features = model.model.get_image_features(**kwargs).pooler_output
        per_row = (inputs["input_ids"] == image_id).sum(1)
        if name == "gemma3":  # one tensor [images + crops, tokens, C]: count per prompt row
            assert int(per_row.sum()) == features.shape[0] * features.shape[1]
            assert features.shape[1] == (max(size // 32, 4) // 2) ** 2  # grid max(R/32, native 4), pooled 2x2
        else:
            assert [len(f) for f in features] == per_row.tolist()


def test_family_reduction_composes_with_the_mra_grid():
    model, processor = mrify(tiny_gemma3()[0], map_pathway=MAP, image_size=BIG, processor=tiny_gemma3()[1])
    assert model.config.mm_tokens_per_image == processor.image_seq_length == (8 // 2) ** 2
    model, processor = mrify(tiny_idefics3()[0], map_pathway=MAP, image_size=BIG, processor=tiny_idefics3()[1])
    assert processor.image_seq_len == model.model.image_seq_len == (8 // 2) ** 2
    assert processor.image_processor.max_image_size == {"longest_edge": BIG}
    assert processor.image_processor.size == {"longest_edge": 4 * BIG}  # same tile layouts as before
    model, processor = mrify(tiny_llava_onevision()[0], map_pathway=MAP, image_size=BIG, processor=tiny_llava_onevision()[1])
    assert processor.num_image_tokens == 64 and model.config.image_grid_pinpoints[0] == [BIG, 2 * BIG]


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_idefics3])
def test_a_grid_the_family_reduction_does_not_divide_is_refused(build):
    with pytest.raises(UnsupportedModelError, match="multiple of 2"):
        mrify(build()[0], map_pathway=MAP, image_size=160)  # grid 5


def test_save_pretrained_from_pretrained_identical_logits(family, tmp_path):
    name, _, model, processor = family
    model = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in _tower(model).encoder.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(tmp_path)
    assert isinstance(_tower(loaded), MixresVisionModel) and type(loaded) is type(model)
    inputs = _inputs(name, processor, _prompts(name), _images())
    again = _inputs(name, loaded_processor, _prompts(name), _images())
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    torch.testing.assert_close(_logits(loaded, again), _logits(model, inputs), rtol=0, atol=0)


def test_generate(family):
    name, _, model, processor = family
    inputs = _inputs(name, processor, _prompts(name), _images())
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert all(isinstance(t, str) for t in processor.batch_decode(out[:, -3:]))


def test_smolvlm_model_without_its_processor(tmp_path):
    """SmolVLM's model path (SmolVLMProcessor needs num2words): inputs made by the Idefics3 processor,
    whose tiny config is the same (16-px tiles, scale 2, the same tokens)."""
    original, _ = tiny_smolvlm(with_processor=False)
    model, _ = mrify(copy.deepcopy(original), map_pathway=MAP, image_size=SIZE)
    _, processor = mrify(tiny_idefics3()[0], map_pathway=MAP, image_size=SIZE, processor=tiny_idefics3()[1])
    assert type(model).__name__ == "MixresSmolVLMForConditionalGeneration"
    inputs = _inputs("smolvlm", processor, _prompts("idefics3"), _images())
    torch.testing.assert_close(_logits(model.eval(), inputs), _logits(original, _low_res(model, "smolvlm", inputs)),
                               rtol=0, atol=1e-5)  # as the zero-init test above
    with torch.no_grad():
        torch.manual_seed(1)
        for p in _tower(model).encoder.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llava_onevision", "gemma3", "idefics3"])
def test_mixres_generate_helper(name):
    """``mixres.integrations.hf.generate`` (flat image list) hands each family's processor its layout."""
    from mixres.integrations.hf import generate

    model, processor = _build(name)
    model, processor = mrify(model, map_pathway=MAP, image_size=SIZE, processor=processor)
    answers = generate(model, processor, _images(), _prompts(name), max_new_tokens=2, min_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
