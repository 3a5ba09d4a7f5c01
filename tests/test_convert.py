"""Official LLaVA-HR checkpoint conversion, on tiny checkpoints written in the release's layout
(tests/release_checkpoint.py, from the release's module definitions) and checked against the
release's forward written out by hand (tests/release_forward.py)."""

import json

import pytest
import torch

import mixres
from mixres import WeightsError
from mixres.cli import main
from mixres.convert import convert_checkpoint, load_converted, load_llava_hr_vision, read_checkpoint
from mixres.fusions.mr_adapter import OFFICIAL_KEYS

pytest.importorskip("transformers")
pytest.importorskip("timm")
from release_checkpoint import LAYOUTS, mixres_config, release_shapes, write_release  # noqa: E402
from release_forward import release_forward  # noqa: E402

# float32 through ~40 layers on O(1) activations: reassociation differences are ~1e-6 (measured
# max 1e-6 on all three layouts); 1e-5 leaves room and is far below any wrong-weight effect (>1e-2)
ATOL = 1e-5


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """One release directory + preset file per layout (written once per module)."""
    out = {}
    for name in LAYOUTS:
        root = tmp_path_factory.mktemp(name)
        state = write_release(root / "src", name, seed=1)
        (root / "preset.json").write_text(json.dumps(mixres_config(name)))
        out[name] = (root, state)
    return out


def _images(name, batch=1):
    side = LAYOUTS[name].image_size
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cli_converts_every_key_and_matches_the_release_forward(release, name, tmp_path, capsys):
    root, state = release[name]
    assert main(["convert", "llava-hr", str(root / "src"), str(tmp_path / "out"), "--preset", str(root / "preset.json")]) == 0
    out = capsys.readouterr().out
    assert "unexpected: 0" in out and "missing: 0" in out
    encoder, projector = load_converted(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "mixres_config.json").read_text())
    assert config["conversion"]["missing"] == [] and config["conversion"]["unexpected"] == []
    # the LLM width came from the checkpoint: 24 for the 7B stand-ins, 40 for X's 13B stand-in
    assert projector[2].out_features == LAYOUTS[name].llm_dim
    images = _images(name)
    with torch.no_grad():
        tokens, grid = encoder.eval()(images)
        reference = release_forward(images, state, LAYOUTS[name])
        torch.testing.assert_close(tokens, reference, rtol=0, atol=ATOL)
        expected = torch.nn.functional.gelu(reference @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
        expected = expected @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
        torch.testing.assert_close(projector(tokens), expected, rtol=0, atol=ATOL)
    side = LAYOUTS[name].image_size // 32
    assert grid == (side, side)


def test_report_accounts_for_every_key(release):
    root, state = release["7b-1024"]
    encoder = mixres.create_encoder("dual_pathway", **{k: v for k, v in mixres_config("7b-1024").items() if k != "name"})
    projector = mixres.create_projector("mlp2x_gelu", in_dim=32, out_dim=24)
    report = load_llava_hr_vision(encoder, state, projector)
    assert report.ok, report.summary()
    assert not report.unexpected and not report.missing
    # dropped by design: the ConvNeXt classifier the release never runs (position_ids: not saved by 4.31)
    assert report.dropped and all(".slow_vision_tower.vision_tower.head." in k for k in report.dropped)
    assert all(k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head")) for k in report.other)
    assert sorted(report.loaded + report.dropped + report.other) == sorted(release_shapes(LAYOUTS["7b-1024"]))
    # every layer scale arrived: the release's blocks.B.weight became timm's gamma
    scale = "model.vision_tower.slow_vision_tower.vision_tower.stages.2.blocks.1.weight"
    assert scale in report.loaded
    torch.testing.assert_close(encoder.map_pathway.model.stages[2].blocks[1].gamma.detach(), state[scale], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["7b-1024", "x-1024"])
def test_create_encoder_reads_the_official_directory(release, name):
    root, state = release[name]
    overrides = {k: v for k, v in mixres_config(name).items() if k != "name"}
    encoder = mixres.create_encoder("dual_pathway", pretrained=root / "src", **overrides).eval()
    images = _images(name)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images)[0], release_forward(images, state, LAYOUTS[name]), rtol=0, atol=ATOL)


def test_bf16_round_trips_without_upcasting(tmp_path):
    state = write_release(tmp_path / "src", "7b-1024", dtype=torch.bfloat16)
    (tmp_path / "preset.json").write_text(json.dumps(mixres_config("7b-1024")))
    convert_checkpoint(tmp_path / "src", tmp_path / "out", preset=str(tmp_path / "preset.json"))
    written = read_checkpoint(tmp_path / "out")
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {torch.bfloat16}
    encoder, projector = load_converted(tmp_path / "out")
    assert next(encoder.parameters()).dtype == torch.bfloat16
    assert torch.equal(projector[0].weight, state["model.mm_projector.0.weight"])  # bit for bit
    scale = state["model.vision_tower.slow_vision_tower.vision_tower.stages.0.blocks.0.weight"]
    assert torch.equal(encoder.map_pathway.model.stages[0].blocks[0].gamma, scale)
    convert_checkpoint(tmp_path / "src", tmp_path / "fp32", preset=str(tmp_path / "preset.json"), dtype="fp32")
    assert {v.dtype for v in read_checkpoint(tmp_path / "fp32").values()} == {torch.float32}
    with pytest.raises(WeightsError, match="dtype 'fp8' is not one of"):
        convert_checkpoint(tmp_path / "src", tmp_path / "x", preset=str(tmp_path / "preset.json"), dtype="fp8")


def test_sharded_bin_checkpoint_beside_training_args(tmp_path, capsys):
    state = write_release(tmp_path / "src", "x-1024", fmt="bin", shards=3)
    assert (tmp_path / "src" / "training_args.bin").exists()  # never read: not a weight file
    (tmp_path / "preset.json").write_text(json.dumps(mixres_config("x-1024")))
    assert main(["convert", "llava-hr", str(tmp_path / "src"), str(tmp_path / "out"), "--preset",
                 str(tmp_path / "preset.json")]) == 0
    assert read_checkpoint(tmp_path / "src").keys() == state.keys()


def test_allow_missing_names_the_keys_and_their_effect(tmp_path, capsys):
    state = write_release(tmp_path / "src", "7b-1024")
    scales = [k for k in state if k.endswith(".weight") and ".blocks." in k and k.split(".")[-2].isdigit()]
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if k not in scales}, str(tmp_path / "src" / "model.safetensors"))
    (tmp_path / "preset.json").write_text(json.dumps(mixres_config("7b-1024")))
    argv = ["convert", "llava-hr", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", str(tmp_path / "preset.json")]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert f"missing: {len(scales)} (map_pathway.model.stages.0.blocks.0.gamma" in captured.out
    assert "nothing written" in captured.err and not (tmp_path / "out").exists()
    assert main([*argv, "--allow-missing"]) == 0
    err = capsys.readouterr().err
    assert "map_pathway.model.stages.3.blocks.0.gamma" in err and "layer scales at timm's 1e-6" in err
    with pytest.warns(UserWarning, match="5 missing key"):
        encoder, _ = load_converted(tmp_path / "out")
    images = _images("7b-1024")
    with torch.no_grad():  # the effect is real: far beyond rounding
        assert (encoder.eval()(images)[0] - release_forward(images, state, LAYOUTS["7b-1024"])).abs().max() > 1e-2


def test_llm_width_is_read_not_assumed(release, tmp_path, capsys):
    root, _ = release["x-1024"]
    argv = ["convert", "llava-hr", str(root / "src"), str(tmp_path / "out"), "--preset", str(root / "preset.json")]
    assert main([*argv, "--llm-dim", "4096"]) == 2
    assert "--llm-dim 4096 does not match the checkpoint, whose projector maps to 40" in capsys.readouterr().err
    assert main([*argv, "--llm-dim", "40"]) == 0


def test_wrong_preset_is_refused_before_writing(release, tmp_path, capsys):
    root, state = release["7b-1024"]
    with pytest.raises(WeightsError, match=r"has shape .* but mixres expects"):
        load_llava_hr_vision(mixres.create_encoder("llava-hr-tiny"), state)
    assert main(["convert", "llava-hr", str(root / "src"), str(tmp_path / "out"), "--preset", "llava-hr-tiny"]) == 2
    assert not (tmp_path / "out").exists()
    config = {k: v for k, v in mixres_config("7b-1024").items() if k != "name"}
    encoder = mixres.create_encoder("dual_pathway", **{**config, "injections": [], "final_fusion": None})
    report = load_llava_hr_vision(encoder, state)
    assert not report.ok and any("align_stages_latent.0" in k for k in report.unexpected)


def test_preset_from_the_release_config():
    from mixres.convert import preset_for

    assert preset_for({"input_image_size": 1536, "vision_tower_slow": "convnext_large_mlp.clip_laion2b_ft_320"}) == "llava-hr-7b-1536"
    assert preset_for({"input_image_size": 1024, "vision_tower_slow": "convnext_xxlarge.clip_laion2b_soup"}) == "llava-hr-x-1024"
    with pytest.raises(WeightsError, match="has no preset 'llava-hr-x-1536'"):
        preset_for({"input_image_size": 1536, "vision_tower_slow": "convnext_xxlarge"})


def test_official_key_table_is_complete():
    assert set(OFFICIAL_KEYS) == {"slow_conv", "slow_proj", "fast_conv", "fast_proj", "gate.0", "gate.2"}
