"""mixres.integrations.hf: MRA inside tiny random LLaVA-1.5 / LLaVA-NeXT / PaliGemma models.

Everything is built locally (word-level tokenizer, 4-block width-32 ViTs, a 2-layer LLM, a
ConvNeXt-atto map pathway at 64 px); nothing is downloaded.
"""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import mixres  # noqa: E402
from mixres.integrations.hf import (  # noqa: E402
    ImageInputError,
    MixresVisionConfig,
    MixresVisionModel,
    ModelPathError,
    PromptError,
    UnsupportedModelError,
    chat,
    check_image,
    generate,
    load_pretrained,
    mrify,
    reference_pixel_values,
)
from mixres.integrations.hf.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_next, tiny_paligemma  # noqa: E402

SIZE = 64  # high-res side: the ConvNeXt map is 2x2, the ViT reads 16 px (its native size)
MAP = {"name": "timm_map", "model_name": "convnext_atto", "out_indices": [-1]}
FAMILIES = {
    "llava": (tiny_llava, "USER: <image> what is in the image ? ASSISTANT:"),
    "llava_next": (tiny_llava_next, "USER: <image> describe the picture ASSISTANT:"),
    "paligemma": (tiny_paligemma, "<image> caption en"),
}


def _images():
    rng = np.random.default_rng(0)
    # different sizes and aspect ratios, all larger than every scaled AnyRes pinpoint
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((140, 130), (150, 200))]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, original model, original processor, mrified model, mrified processor, prompts)."""
    build, prompt = FAMILIES[request.param]
    model, processor = build()
    mr_model, mr_processor = mrify(copy.deepcopy(model), map_pathway=MAP, image_size=SIZE, processor=processor)
    return request.param, model, processor, mr_model.eval(), mr_processor, [prompt, prompt.replace("<image>", "<image> a")]


def _inputs(processor, prompts, images=None):
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images or _images(), text=prompts, return_tensors="pt", padding=True)
    inputs.pop("labels", None)
    return inputs


def _low_res_view(model, pixel_values):
    """What the ViT reads inside the encoder: the high-res tensor resized (bilinear, align_corners)."""
    encoder = model.model.vision_tower.encoder
    if pixel_values.ndim == 5:  # AnyRes: [B, tiles, 3, R, R]
        return encoder.vit_images(pixel_values.flatten(0, 1)).unflatten(0, pixel_values.shape[:2])
    return encoder.vit_images(pixel_values)


def test_generate_produces_tokens(family):
    name, *_, model, processor, prompts = family
    answers = generate(model, processor, _images(), prompts, max_new_tokens=3, min_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert any(len(a.split()) >= 1 for a in answers), answers
    inputs = _inputs(processor, prompts)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_image_feature_positions_equal_num_tokens(family):
    name, *_, model, processor, prompts = family
    encoder = model.model.vision_tower.encoder
    tokens = encoder.num_tokens(SIZE)
    assert tokens == model.config.vision_config.num_image_tokens == 16
    inputs = _inputs(processor, prompts)
    kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
    with torch.no_grad():
        features = model.model.get_image_features(**kwargs).pooler_output
    per_image = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert [len(f) for f in features] == per_image
    if name != "llava_next":
        assert per_image == [tokens, tokens]
        return
    # AnyRes: the base view's tokens first, then the unpadded 2x2-tile grid with a newline per row
    assert per_image[0] == tokens + 4 * tokens + 2 * 4  # a near-square image: nothing unpadded
    with torch.no_grad():
        base = model.model.vision_tower(inputs["pixel_values"][:, 0]).last_hidden_state
        projected = model.model.multi_modal_projector(base)
    for feature, expected in zip(features, projected):
        torch.testing.assert_close(feature[:tokens], expected, rtol=0, atol=1e-6)


def test_logits_equal_original_on_the_low_res_view(family):
    _, original, _, model, processor, prompts = family
    inputs = _inputs(processor, prompts)
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = original(**{**inputs, "pixel_values": _low_res_view(model, inputs["pixel_values"])}).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_save_pretrained_from_pretrained_identical_logits(family, tmp_path):
    _, _, _, model, processor, prompts = family
    model = copy.deepcopy(model)
    with torch.no_grad():  # trained-looking adapters, so the map pathway matters
        torch.manual_seed(1)
        for p in model.model.vision_tower.encoder.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(tmp_path)
    assert isinstance(loaded.model.vision_tower, MixresVisionModel)
    inputs, loaded_inputs = _inputs(processor, prompts), _inputs(loaded_processor, prompts)
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    # what save/load guarantees bitwise: the same tensors under the same names
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    with torch.no_grad():
        before, after = model(**inputs).logits, loaded(**loaded_inputs).logits
    # The logits are not bitwise equal run to run: with equal weights, CPU kernels (oneDNN /
    # MKL GEMM, SDPA) may still sum in another order, e.g. when the two models' buffers are
    # aligned differently or the threads are scheduled differently on a busy machine; we saw
    # ~1e-7. torch's float32 defaults (rtol 1.3e-6, atol 1e-5) bound such reassociation for
    # these logits (|max| 0.4-0.6, sums of a few hundred terms), and stay well below what a
    # wrong weight does: adding 1e-3 * randn to one adapter tensor moved the logits by 5e-4 to
    # 3e-3 (measured per family), 50x the tolerance or more.
    torch.testing.assert_close(after, before, rtol=1.3e-6, atol=1e-5)


def test_llava_config_builds_with_our_tower():
    encoder = mixres.build({
        "kind": "encoder", "name": "dual_pathway",
        "token_pathway": {"name": "hf_clip", "config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                             num_attention_heads=2, image_size=16, patch_size=4)},
        "map_pathway": MAP, "injections": [{"after_block": 2, "fusion": {"name": "mr_adapter"}}], "image_size": 256,
    })
    vision = MixresVisionConfig.from_encoder(encoder)
    assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.num_image_tokens) == (32, 256, 32, 64)
    data = {k: v for k, v in vision.to_dict().items() if k != "model_type"}
    assert AutoConfig.for_model("mixres_vision", **data).encoder == vision.encoder
    assert isinstance(AutoModel.from_config(vision), MixresVisionModel)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, vocab_size=32), image_token_index=4,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([[1] + [4] * 64 + [2]])
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=torch.randn(1, 3, 256, 256)).logits.shape == (1, 66, 32)
    with pytest.raises(UnsupportedModelError, match="vision_feature_layer=-1"):
        model.model.vision_tower(torch.randn(1, 3, 256, 256), output_hidden_states=-2)


def test_missing_checkpoint_key_gets_the_constructor_init(tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = mrify(tiny_llava()[0], map_pathway=MAP, image_size=SIZE, processor=tiny_llava()[1])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    weights = load_file(file)
    key = next(k for k in weights if k.endswith("adapters.0.low_proj.weight"))
    save_file({k: v for k, v in weights.items() if k != key}, file, metadata={"format": "pt"})
    loaded, _ = load_pretrained(tmp_path)
    encoder = loaded.model.vision_tower.encoder
    assert torch.equal(encoder.adapters[0].low_proj.weight, torch.zeros_like(encoder.adapters[0].low_proj.weight))
    assert torch.equal(encoder.token_pathway.model.embeddings.position_ids, torch.arange(17)[None])


def test_final_fusion_keeps_the_projector_width():
    model, processor = tiny_llava()
    model, processor = mrify(model, map_pathway=MAP, image_size=SIZE, final_fusion="mr_final", processor=processor)
    assert model.model.vision_tower.encoder.final_fusion.out_dim == 32
    assert len(generate(model, processor, _images()[:1], ["USER: <image> what ? ASSISTANT:"], max_new_tokens=2)) == 1
    with pytest.raises(UnsupportedModelError, match="projector's input width"):
        mrify(tiny_llava()[0], map_pathway=MAP, image_size=SIZE, final_fusion={"name": "mr_final", "out_dim": 48})


def test_custom_positions_and_paper_fusion():
    model, _ = mrify(tiny_llava()[0], map_pathway=MAP, image_size=SIZE, positions=[1, 3], fusion="mr_adapter_paper")
    encoder = model.model.vision_tower.encoder
    assert [k for k, _ in encoder.injection_points] == [1, 3]
    assert encoder.adapters[0].gate_kind == "channel"


def test_mrify_refuses_a_model_without_a_vit():
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        mrify(llm, map_pathway=MAP, image_size=SIZE)
    mrified, _ = mrify(tiny_llava()[0], map_pathway=MAP, image_size=SIZE)
    with pytest.raises(UnsupportedModelError, match="mrified already"):
        mrify(mrified, map_pathway=MAP, image_size=SIZE)


def test_mrify_refuses_bad_settings():
    model, _ = tiny_llava()
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(UnsupportedModelError, match="several ViT layers"):
        mrify(model, map_pathway=MAP, image_size=SIZE)
    with pytest.raises(UnsupportedModelError, match="multiple of the map pathway's stride 32"):
        mrify(tiny_llava()[0], map_pathway=MAP, image_size=100)


def test_generate_refuses_image_prompt_mismatch(family):
    *_, model, processor, prompts = family
    with pytest.raises(PromptError, match=r"hold 2 '<image>' token\(s\).*but 1 image"):
        generate(model, processor, _images()[:1], prompts)
    with pytest.raises(ImageInputError, match="empty"):
        generate(model, processor, [], ["no image here"])


def test_generate_refuses_too_small_and_unsupported_images(family):
    *_, model, processor, prompts = family
    with pytest.raises(ImageInputError, match=r"images\[1\] is 5x40 pixels"):
        generate(model, processor, [_images()[0], Image.new("RGB", (5, 40))], prompts)
    with pytest.raises(ImageInputError, match=r"images\[0\] has PIL mode 'I;16'"):
        generate(model, processor, [Image.new("I;16", (32, 32)), _images()[0]], prompts)
    with pytest.raises(ImageInputError, match="has to be a PIL.Image"):
        generate(model, processor, ["cat.jpg", _images()[0]], prompts)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_convertible_modes_become_rgb(mode):
    assert check_image(Image.new(mode, (20, 12))).mode == "RGB"


def test_reference_preprocessing_pads_with_the_mean_colour():
    wide = Image.fromarray(np.full((16, 64, 3), 255, dtype=np.uint8))
    pixels = reference_pixel_values([wide], 32)
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels[0, :, :6].abs().max() < 0.02  # the padding normalises to ~0
    assert pixels[0, :, 14:18].min() > 1.5  # the white image


def test_load_pretrained_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelPathError, match="no config.json"):
        load_pretrained(tmp_path)


def test_chat_cli(tmp_path, capsys):
    model, processor = mrify(tiny_paligemma()[0], map_pathway=MAP, image_size=SIZE, processor=tiny_paligemma()[1])
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    _images()[1].save(tmp_path / "image.png")
    argv = ["--model", str(tmp_path / "model"), "--image", str(tmp_path / "image.png"), "--prompt", "caption en",
            "--max-new-tokens", "3", "--device", "cpu"]
    assert chat.main(argv) == 0
    assert capsys.readouterr().out.strip() != ""
    assert chat.main([*argv[:1], str(tmp_path / "nowhere"), *argv[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert chat.main([*argv[:3], str(tmp_path / "none.png"), *argv[4:]]) == 2
    assert "image file" in capsys.readouterr().err


def _release_checkpoint(directory, encoder, projector, llm):
    """Write a tiny checkpoint in the official LLaVA-HR layout (LlavaLlamaForCausalLM keys)."""
    import json

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mixres.fusions.mr_adapter import OFFICIAL_KEYS
    from mixres.integrations.hf.tiny import WORDS

    release = {ours: theirs for theirs, ours in OFFICIAL_KEYS.items()}
    prefixes = {"token_pathway.model.": "model.vision_tower.fast_vision_tower.vision_tower.vision_model.",
                "map_pathway.model.": "model.vision_tower.slow_vision_tower.vision_tower.",
                "adapters.": "model.vision_tower.align_stages_latent.", "final_fusion.": "model.vision_tower.align_stages.0."}
    state = {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()} | llm.state_dict()
    for key, value in encoder.state_dict().items():
        ours = next(p for p in prefixes if key.startswith(p))
        rest = key[len(ours):]
        index, rest = rest.split(".", 1) if ours == "adapters." else ("", rest)
        module = next((m for m in release if rest.startswith(m + ".")), None)
        rest = release[module] + rest[len(module):] if module else rest
        state[prefixes[ours] + (f"{index}." if index else "") + rest] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config = {**llm.config.to_diff_dict(), "architectures": ["LlavaLlamaForCausalLM"], "input_image_size": 256,
              "mm_projector_type": "mlp2x_gelu", "is_multipath_encoder": True}
    (directory / "config.json").write_text(json.dumps(config))
    words = [w for w in WORDS if w != "<image>"]  # the release has no image token
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(directory)


def test_convert_official_llava_hr_checkpoint(tmp_path):
    from mixres.integrations.hf.convert import convert_llava_hr

    torch.manual_seed(0)
    encoder = mixres.create_encoder("llava-hr-tiny").eval()
    with torch.no_grad():
        for p in encoder.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))
    projector = mixres.create_projector("mlp2x_gelu", in_dim=32, out_dim=32)
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       vocab_size=31)).eval()
    (tmp_path / "release").mkdir()
    _release_checkpoint(tmp_path / "release", encoder, projector, llm)
    report = convert_llava_hr(tmp_path / "release", tmp_path / "hf", preset="llava-hr-tiny")
    assert report.ok and not report.dropped
    model, processor = load_pretrained(tmp_path / "hf")
    assert model.config.image_token_id == 31 and model.config.text_config.vocab_size == 64  # <image> added, padded
    pixels = torch.randn(2, 3, 256, 256)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        features = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        torch.testing.assert_close(features, projector(encoder(pixels)[0]), rtol=0, atol=1e-6)
        torch.testing.assert_close(model(input_ids=ids).logits[..., :31], llm(ids).logits, rtol=0, atol=1e-6)
    prompt = chat.format_prompt(processor, "what is this ?", 1)
    assert prompt.endswith("USER: <image>\nwhat is this ? ASSISTANT:")
    assert len(generate(model, processor, _images()[:1], [prompt], max_new_tokens=2)) == 1
    with pytest.raises(ModelPathError, match="no config.json"):
        convert_llava_hr(tmp_path / "hf-missing", tmp_path / "out")


def test_llava_with_a_siglip_tower_keeps_its_features():
    """LLaVA reads SigLIP's hidden_states (no post-norm), PaliGemma its last_hidden_state (post-norm)."""
    from transformers import SiglipVisionConfig

    from mixres.integrations.hf.tiny import _llama

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                image_size=16, patch_size=4, vision_use_head=False)
    config = LlavaConfig(vision_config=vision, text_config=_llama(), image_token_index=IMAGE_TOKEN_ID,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    original = LlavaForConditionalGeneration(config).eval()
    model, _ = mrify(copy.deepcopy(original), map_pathway=MAP, image_size=SIZE)
    assert model.model.vision_tower.encoder.token_pathway.post_norm is False
    ids, pixels = torch.tensor([[2] + [IMAGE_TOKEN_ID] * 16 + [7, 8]]), torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        theirs = original(input_ids=ids, pixel_values=_low_res_view(model, pixels)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_gradient_checkpointing_reaches_the_encoder():
    model, _ = mrify(tiny_llava()[0], map_pathway=MAP, image_size=SIZE)
    model.train()
    model.activation_checkpointing_enable()
    encoder = model.model.vision_tower.encoder
    assert encoder.map_pathway.grad_checkpointing and encoder.token_pathway.model.encoder.layers[0].gradient_checkpointing
    ids = torch.tensor([[2] + [IMAGE_TOKEN_ID] * 16 + [7, 8]])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, SIZE, SIZE), labels=ids).loss.backward()
    assert encoder.adapters[0].low_proj.weight.grad.abs().sum() > 0  # zero-init, yet it learns
    model.activation_checkpointing_disable()
    assert not encoder.map_pathway.grad_checkpointing
