"""Official LLaVA-HR checkpoint conversion, on a synthetic state dict with the release's key names."""

import pytest
import torch
import torch.nn.functional as F

import mixres
from mixres import WeightsError
from mixres.convert import load_llava_hr_vision, read_checkpoint, save_converted
from mixres.encoders.presets import TINY_CNN, TINY_VIT
from mixres.fusions.mr_adapter import OFFICIAL_KEYS

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from test_mr_adapter import _released_reference  # noqa: E402  (the release's adapter, by hand)

LLM_DIM = 24


def _official_modules():
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VIT)).eval()
    cnn = timm.create_model("convnext_atto", **TINY_CNN).eval()
    return clip, cnn


def _official_state_dict(clip, cnn):
    cl, ch = TINY_VIT["hidden_size"], TINY_CNN["dims"][-1]
    # the release saved CLIPVisionModel with transformers 4.x, whose keys start with vision_model.
    sd = {f"model.vision_tower.fast_vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()}
    sd.update({f"model.vision_tower.slow_vision_tower.vision_tower.{k}": v for k, v in cnn.state_dict().items()})
    shapes = {"slow_conv": ((ch, ch, 1, 1), ch), "slow_proj": ((cl, ch, 1, 1), cl), "fast_conv": ((cl, 1, 7, 7), cl),
              "fast_proj": ((cl, cl, 1, 1), cl), "gate.0": ((cl // 2, 2 * cl), cl // 2), "gate.2": ((1, cl // 2), 1)}
    for i in range(3):
        for name, (w, b) in shapes.items():
            sd[f"model.vision_tower.align_stages_latent.{i}.{name}.weight"] = torch.randn(w) * 0.1
            sd[f"model.vision_tower.align_stages_latent.{i}.{name}.bias"] = torch.randn(b) * 0.1
    sd["model.vision_tower.align_stages.0.fast_proj.weight"] = torch.randn(cl, cl) * 0.1
    sd["model.vision_tower.align_stages.0.fast_proj.bias"] = torch.randn(cl) * 0.1
    sd["model.vision_tower.align_stages.0.slow_proj.weight"] = torch.randn(cl, ch) * 0.1
    sd["model.vision_tower.align_stages.0.slow_proj.bias"] = torch.randn(cl) * 0.1
    sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"] = torch.randn(LLM_DIM, cl), torch.randn(LLM_DIM)
    sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"] = torch.randn(LLM_DIM, LLM_DIM), torch.randn(LLM_DIM)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.randn(LLM_DIM, LLM_DIM)  # the LLM: left alone
    sd["lm_head.weight"] = torch.randn(10, LLM_DIM)
    return sd


def _hand_wired(clip, cnn, sd, images):
    """The release's MultiPathCLIPVisionTower.forward, written out on the HF / timm modules."""
    vm = getattr(clip, "vision_model", clip)  # transformers 5 flattened CLIPVisionModel
    y = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=True)  # max(192/32*4, 24)
    y = vm.pre_layrnorm(vm.embeddings(y)[:, 1:])
    x = cnn.stages(cnn.stem(images))
    for i, layer in enumerate(vm.encoder.layers):
        y = layer(y, None)
        y = y[0] if isinstance(y, tuple) else y
        if i + 1 in (1, 2, 3):
            prefix = f"model.vision_tower.align_stages_latent.{i}."
            y = _released_reference(y, x, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, (6, 6))
    final = "model.vision_tower.align_stages.0."
    slow = x.flatten(2).transpose(1, 2)
    return F.linear(y, sd[final + "fast_proj.weight"], sd[final + "fast_proj.bias"]) + \
        F.linear(slow, sd[final + "slow_proj.weight"], sd[final + "slow_proj.bias"])


def test_every_key_maps_and_output_equals_hand_wired_reference(tmp_path):
    clip, cnn = _official_modules()
    sd = _official_state_dict(clip, cnn)
    encoder = mixres.create_encoder("llava-hr-tiny").eval()
    projector = mixres.create_projector("mlp2x_gelu", in_dim=32, out_dim=LLM_DIM)
    report = load_llava_hr_vision(encoder, sd, projector)
    assert report.ok, report.summary()
    assert sorted(report.other) == ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert all(".head." in k or k.endswith("position_ids") for k in report.dropped), report.dropped
    assert len(report.loaded) + len(report.dropped) + len(report.other) == len(sd)  # nothing left over
    images = torch.randn(2, 3, 192, 192)
    with torch.no_grad():
        ours, grid = encoder(images)
        reference = _hand_wired(clip, cnn, sd, images)
    assert grid == (6, 6)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(projector[0].weight, sd["model.mm_projector.0.weight"])

    # write as safetensors, read back through create_encoder(pretrained=DIR)
    save_converted(tmp_path / "converted", encoder, projector)
    again = mixres.create_encoder("llava-hr-tiny", pretrained=tmp_path / "converted").eval()
    with torch.no_grad():
        assert torch.equal(again(images)[0], ours)

    # an official checkpoint directory loads directly too (safetensors shards)
    from safetensors.torch import save_file

    official = tmp_path / "official"
    official.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(official / "model.safetensors"))
    direct = mixres.create_encoder("llava-hr-tiny", pretrained=official).eval()
    with torch.no_grad():
        assert torch.equal(direct(images)[0], ours)


def test_cli_convert(tmp_path, capsys):
    from safetensors.torch import save_file

    from mixres.cli import main

    clip, cnn = _official_modules()
    sd = _official_state_dict(clip, cnn)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")  # read back with weights_only=True
    assert main(["convert", "llava-hr", str(src), str(tmp_path / "dst"), "--preset", "llava-hr-tiny", "--llm-dim", str(LLM_DIM)]) == 0
    assert "unexpected: 0" in capsys.readouterr().out
    assert (tmp_path / "dst" / "model.safetensors").exists()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unused.safetensors"))


def test_wrong_shapes_are_a_clear_error():
    clip, cnn = _official_modules()
    sd = _official_state_dict(clip, cnn)
    sd["model.vision_tower.align_stages_latent.0.slow_proj.weight"] = torch.zeros(5, 64, 1, 1)
    with pytest.raises(WeightsError, match=r"slow_proj.weight has shape \(5, 64, 1, 1\), but mixres expects \(32, 64, 1, 1\)"):
        load_llava_hr_vision(mixres.create_encoder("llava-hr-tiny"), sd)


def test_wrong_preset_reports_unexpected_and_missing():
    clip, cnn = _official_modules()
    sd = _official_state_dict(clip, cnn)
    encoder = mixres.create_encoder("llava-hr-tiny", injections=[], final_fusion=None)
    report = load_llava_hr_vision(encoder, sd)
    assert not report.ok and any("align_stages_latent.0" in k for k in report.unexpected)


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_checkpoint(tmp_path / "missing")
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        read_checkpoint(tmp_path)


def test_official_key_table_is_complete():
    assert set(OFFICIAL_KEYS) == {"slow_conv", "slow_proj", "fast_conv", "fast_proj", "gate.0", "gate.2"}
