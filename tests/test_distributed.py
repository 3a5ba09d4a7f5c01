"""The tiny stage-2 recipe under FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3, 2 processes over gloo, against DDP (CPU).

Launched as a user would: ``accelerate launch --config_file integrations/llava/fsdp-cpu.yaml``
for FSDP, ``torchrun ... --deepspeed integrations/llava/deepspeed/zero{2,3}.json`` for DeepSpeed
(its CPU accelerator), ``torchrun`` for DDP. Each multi-process run takes 10-60 s on 2 cores: slow tests.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from mixres.integrations.llava import distributed  # noqa: E402
from mixres.integrations.llava import train as recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FSDP_CPU = ROOT / "integrations" / "llava" / "fsdp-cpu.yaml"
ZERO = {stage: ROOT / "integrations" / "llava" / "deepspeed" / f"zero{stage}.json" for stage in (2, 3)}
COMMON = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
          "--dataloader_num_workers", "0", "--seed", "0", "--max_steps", "4", "--per_device_train_batch_size", "4",
          "--save_strategy", "steps", "--save_steps", "2"]
WORKER = (
    "import json, sys\n"
    "from mixres.integrations.llava.train import main\n"
    "trainer = main(sys.argv[1:])\n"
    "if trainer.is_world_process_zero():\n"
    "    losses = [e['loss'] for e in trainer.state.log_history if 'loss' in e]\n"
    "    ds = trainer.accelerator.state.deepspeed_plugin\n"
    "    json.dump({'world': trainer.args.world_size, 'fsdp': trainer.is_fsdp_enabled, 'losses': losses,\n"
    "               'zero_stage': ds.zero_stage if trainer.is_deepspeed_enabled else None},\n"
    "              open(f'{trainer.args.output_dir}/losses.json', 'w'))\n"
    "trainer.accelerator.end_training()\n"  # as the console command does: the process group goes first
)
# fp32 on CPU. For 2 processes the gradient mean is exact in every engine (a/2 + b/2 == (a+b)/2:
# halving is exact), forward passes run the same kernels on the same (gathered) weights, and the
# AdamW update is elementwise; what differs is the clipping norm (FSDP and ZeRO sum per-shard or
# per-bucket squares then all-reduce), about 1 ulp per step (measured:
# grad norm 5.974153548 under ZeRO-3 vs 5.974153042 under DDP). 1e-5 relative covers that with room,
# and is far below a real difference (one optimizer step changes the loss by ~1e-2 here). The
# closest weights are CLIP's k_proj biases, whose true gradient is zero (softmax ignores a shift
# shared by all keys) so AdamW turns rounding noise into their update: measured within 0.3 of it.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return recipe.synthetic_data(tmp_path_factory.mktemp("data"), num_train=24, num_test=4, image_size=256, seed=0)


def _launch(out: Path, data_path: Path, *extra: str, fsdp: bool, launch: tuple[str, ...] = (),
            zero: int | None = None) -> dict:
    worker = out.parent / "worker.py"
    worker.write_text(WORKER)
    argv = ["--recipe", "tiny-stage2", "--output_dir", str(out), "--data_path", str(data_path), *COMMON, *extra]
    if fsdp:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU), *launch]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        argv += ["--ddp_backend", "gloo"]
        if zero is not None:  # --use_cpu true selects DeepSpeed's CPU accelerator path (gloo)
            argv += ["--deepspeed", str(ZERO[zero])]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*launcher, str(worker), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "losses.json").read_text())
    assert result["world"] == 2 and result["fsdp"] == fsdp and result["zero_stage"] == zero
    return result


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def _assert_same_curve(losses: list, reference: list) -> None:
    assert len(losses) == len(reference) == 4
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    print(f"loss curve {losses} vs {reference}: largest relative gap {gap:.2e}")
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64), **TOL)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOL, msg=name)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, data):
    """The reference: plain DDP (torchrun, gloo), run once for every engine compared with it."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    return dict(_launch(out, data["train"], fsdp=False), weights=_weights(out))


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_from_its_sharded_checkpoint(tmp_path, data, ddp):
    fsdp = _launch(tmp_path / "fsdp", data["train"], fsdp=True)
    _assert_same_curve(fsdp["losses"], ddp["losses"])
    _assert_same_weights(ddp["weights"], _weights(tmp_path / "fsdp"))
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded (DCP)
    resumed = _launch(tmp_path / "resumed", data["train"], "--resume_from_checkpoint", str(checkpoint), fsdp=True)
    # the log holds steps 1-2 from the checkpoint's trainer state and steps 3-4 computed again
    _assert_same_curve(resumed["losses"], fsdp["losses"])
    _assert_same_weights(_weights(tmp_path / "fsdp"), _weights(tmp_path / "resumed"))


@pytest.mark.slow
def test_fsdp_with_frozen_parts_and_lora_resumes_and_saves_full_state_dicts(tmp_path, data):
    lora = ["--freeze", "token_pathway", "--lora", "llm", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]
    first = _launch(tmp_path / "fsdp", data["train"], *lora, fsdp=True)
    resumed = _launch(tmp_path / "resumed", data["train"], *lora, "--resume_from_checkpoint",
                      str(tmp_path / "fsdp" / "checkpoint-2"), fsdp=True)
    _assert_same_curve(resumed["losses"], first["losses"])
    trained = _weights(tmp_path / "fsdp")
    _assert_same_weights(trained, _weights(tmp_path / "resumed"))
    assert not any("lora" in k for k in trained)  # merged into the LLM before the save
    ddp = _launch(tmp_path / "ddp", data["train"], *lora, fsdp=False)
    _assert_same_curve(first["losses"], ddp["losses"])
    _assert_same_weights(_weights(tmp_path / "ddp"), trained)
    # FULL_STATE_DICT checkpoints: one gathered file, written and read back by rank 0 (broadcast)
    full_sd = ("--fsdp_state_dict_type", "FULL_STATE_DICT")
    full = _launch(tmp_path / "full", data["train"], *lora, fsdp=True, launch=full_sd)
    assert (tmp_path / "full" / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()
    _assert_same_curve(full["losses"], first["losses"])
    _assert_same_weights(trained, _weights(tmp_path / "full"))
    again = _launch(tmp_path / "full-resumed", data["train"], *lora, "--resume_from_checkpoint",
                    str(tmp_path / "full" / "checkpoint-2"), fsdp=True, launch=full_sd)
    _assert_same_curve(again["losses"], full["losses"])
    _assert_same_weights(trained, _weights(tmp_path / "full-resumed"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed runs need the deepspeed package (pip install deepspeed)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp_and_resumes_from_its_checkpoint(tmp_path, data, ddp, stage):
    run = _launch(tmp_path / "zero", data["train"], fsdp=False, zero=stage)
    _assert_same_curve(run["losses"], ddp["losses"])
    trained = _weights(tmp_path / "zero")
    _assert_same_weights(ddp["weights"], trained)
    checkpoint = tmp_path / "zero" / "checkpoint-2"
    # DeepSpeed's own checkpoint: the optimizer state partitioned per rank; the model too under ZeRO-3
    model = {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} if stage == 3 else {"mp_rank_00_model_states.pt"}
    assert {p.name for p in (checkpoint / "global_step2").iterdir()} == model | {
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    resumed = _launch(tmp_path / "resumed", data["train"], "--resume_from_checkpoint", str(checkpoint), fsdp=False, zero=stage)
    _assert_same_curve(resumed["losses"], run["losses"])
    _assert_same_weights(trained, _weights(tmp_path / "resumed"))


# --- the pieces, in one process -------------------------------------------------------------


@pytest.fixture(scope="module")
def model(data):
    built, _ = recipe.build_model(recipe.RecipeArguments(data_path=str(data["train"])))
    recipe.set_trainable(built, ["all"])
    return built


def test_wrap_policy_has_a_unit_per_block_of_each_part(model):
    assert distributed.fsdp_wrap_classes(model) == ["CLIPEncoderLayer", "ConvNeXtStage", "LlamaDecoderLayer",
                                                    "MRAdapter", "MRFinalFusion"]


def test_unreached_parameters_are_frozen_and_only_those(model):
    frozen = distributed.freeze_unreached(model)
    # LLaVA-HR takes the ViT's last block without CLIP's post-LayerNorm
    assert frozen == ["model.vision_tower.encoder.token_pathway.model.post_layernorm.weight",
                      "model.vision_tower.encoder.token_pathway.model.post_layernorm.bias"]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    assert distributed.freeze_unreached(model) == []


def test_cpu_fsdp_config_is_a_real_accelerate_config():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(FSDP_CPU))
    assert (config.distributed_type, config.num_processes, config.use_cpu) == ("FSDP", 2, True)
    assert config.fsdp_config["fsdp_version"] == 2 and "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config


@pytest.mark.slow
def test_device_script_dry_run_runs_every_engine_and_row():
    from benchmarks import gpu

    result = gpu.main(["--dry-run", "--warmup", "0", "--repeats", "1", "--gen-repeats", "1", "--new-tokens", "2"])
    train = result["train"]
    assert train["ddp"]["engine"] == "ddp" and train["fsdp"]["engine"] == "fsdp"
    assert train["fsdp"]["max_rel_gap_vs_ddp"] < TOL["rtol"]  # fp32 on CPU: the parity of the slow tests above
    if importlib.util.find_spec("deepspeed") is None:
        assert "deepspeed is not installed" in train["zero3"]["skipped"]
    else:
        assert train["zero3"]["engine"] == "deepspeed" and train["zero3"]["max_rel_gap_vs_ddp"] < TOL["rtol"]
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["llava-hr-tiny", "LLaVA-1.5-24", "LLaVA-1.5-48", "LLaVA-1.5-72", "AnyRes-48"]
    assert rows["llava-hr-tiny"]["visual_tokens"] == 64 and rows["LLaVA-1.5-72"]["visual_tokens"] == 18 * 18
    assert rows["LLaVA-1.5-72"]["ttft_vs_1.5_1022"] == 1.0 and rows["AnyRes-48"]["ttft_vs_anyres"] == 1.0
    for row in rows.values():
        assert row["ttft_ms"] == pytest.approx(row["encoder_ms"] + row["prefill_ms"])
        assert row["tokens_per_s_b1"] > 0 and row["tokens_per_s_b8"] > 0


def test_deepspeed_preparation_refuses_a_launch_the_trainer_does_not_see(monkeypatch):
    from types import SimpleNamespace

    from mixres.integrations.llava.recipe import RecipeError

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.prepare(SimpleNamespace(deepspeed=None, world_size=1)) is False  # no DeepSpeed: nothing to do
    with pytest.raises(RecipeError, match="started 2 processes but the trainer sees 1"):
        distributed.prepare(SimpleNamespace(deepspeed="zero3.json", world_size=1))
    # one process (no process group): nothing to start, and deepspeed is not even imported
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.prepare(SimpleNamespace(deepspeed="zero3.json", world_size=1)) is False
