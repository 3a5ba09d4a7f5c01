"""The recipe's stage 1 and stage 2 on mrified families (LLaVA-OneVision, Gemma 3, Idefics3, SmolVLM, Qwen2.5-VL,
Qwen3-VL), tiny, CPU.

Each family starts from its tiny random model (``base_model: <family>-tiny``), is mrified, and trains
stage 1 (adapters + projector) then stage 2 (+ the LLM) from stage 1's output, with its own chat
template and its own processor's image-token expansion.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from mixres.integrations.hf import generate, load_pretrained  # noqa: E402
from mixres.integrations.llava import train as recipe  # noqa: E402
from mixres.integrations.llava.data import LlavaDataError  # noqa: E402
from mixres.integrations.llava.families import (  # noqa: E402
    FAMILY_RECIPES,
    build_family_model,
    family_image_size,
    family_parts,
    family_recipe,
    set_family_image_size,
)
from mixres.integrations.llava.family_data import FamilyCollator, align_labels  # noqa: E402
from mixres.integrations.llava.family_train import family_dataset, image_features, predict_family  # noqa: E402
from mixres.integrations.llava.recipe import RecipeError  # noqa: E402

FAST = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
        "--logging_steps", "1", "--dataloader_num_workers", "0", "--seed", "0", "--warmup_steps", "0",
        "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "2"]
BASES = ["onevision-tiny", "gemma3-tiny", "idefics3-tiny", "smolvlm-tiny", "qwen2_5_vl-tiny", "qwen3_vl-tiny"]
STAGE1 = {"adapters", "projector"}  # the recipe also names final_fusion, which mrify's default tower lacks
STAGE2 = STAGE1 | {"llm"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return recipe.synthetic_data(tmp_path_factory.mktemp("data"), num_train=8, num_test=2, image_size=256, seed=0)


class Snapshot(TrainerCallback):
    """A copy of every parameter as training starts (by identity: LoRA's merge renames the LLM's weights)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {id(p): p.detach().clone() for p in model.parameters()}


def _stage(base, stage, out, data_path, *extra):
    snap = Snapshot()
    argv = ["--recipe", f"tiny-family-stage{stage}", "--base_model", base, "--output_dir", str(out),
            "--data_path", str(data_path), "--max_steps", "3", *FAST, *map(str, extra)]
    return recipe.train(*recipe.parse_args(argv), callbacks=[snap]), snap


@pytest.fixture(scope="module", params=BASES)
def run(request, data, tmp_path_factory):
    """(base, stage-1 trainer and snapshot, stage-2 trainer and snapshot, output root)."""
    if request.param == "smolvlm-tiny":
        pytest.importorskip("num2words", reason="SmolVLMProcessor imports num2words, which is not installed")
    root = tmp_path_factory.mktemp(request.param)
    s1 = _stage(request.param, 1, root / "s1", data["train_stage1"])
    s2 = _stage(request.param, 2, root / "s2", data["train"], "--model", root / "s1")
    return request.param, s1, s2, root


def _changes(trainer, snap):
    """``{part: (changed names, unchanged names)}`` by value, every parameter in exactly one part."""
    now = dict(trainer.model.named_parameters())
    by_id = {id(p): n for n, p in now.items()}
    out, seen = {}, set()
    for part, params in family_parts(trainer.model).items():
        names = {by_id[id(p)] for _, p in params if id(p) in by_id}
        seen |= names
        changed = {n for n in names if not torch.equal(snap.before[id(now[n])], now[n].detach())}
        out[part] = (changed, names - changed)
    assert seen == set(now), f"parameters in no part: {sorted(set(now) - seen)[:5]}"
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_each_stage_trains_exactly_its_parts(run, stage):
    base, *stages, _ = run
    trainer, snap = stages[stage - 1]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    trained = STAGE1 if stage == 1 else STAGE2
    for part, (changed, unchanged) in _changes(trainer, snap).items():
        if part in trained:  # every tensor of a trained part moved (3 Adam steps, constant lr)
            assert changed and not unchanged, (base, stage, part, sorted(unchanged)[:5])
        else:  # every frozen tensor is bit-for-bit what it was
            assert not changed, (base, stage, part, sorted(changed)[:5])


def test_saved_stage_loads_back_and_generates(run, data):
    base, _, _, root = run
    model, processor = load_pretrained(root / "s2")
    spec = family_recipe(model)
    assert spec is FAMILY_RECIPES[{"onevision-tiny": "llava_onevision"}.get(base, base.removesuffix("-tiny"))]
    image = Image.open(data["root"] / "images/test-000000.png")
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                                           add_generation_prompt=True)
    assert len(generate(model, processor, [image], [prompt], max_new_tokens=3)) == 1
    records = json.loads(data["test"].read_text())
    assert set(predict_family(model, processor, records, spec, image_folder=data["root"], max_new_tokens=2)) == \
        {r["id"] for r in records}


def _runs(labels):
    """The maximal runs of positions whose label is not -100."""
    runs, current = [], []
    for k, label in enumerate(labels.tolist()):
        if label != -100:
            current.append(k)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


def test_labels_are_exactly_the_answers(run, data):
    _, _, (trainer, _), _ = run
    dataset = trainer.train_dataset
    spec = family_recipe(trainer.model)
    tokenizer = dataset.tokenizer
    multi_turn = 0
    for i in range(len(dataset)):
        item, record = dataset[i], dataset.record(i)
        ids, labels = item["input_ids"], item["labels"]
        kept = labels != -100
        assert torch.equal(labels[kept], ids[kept])  # a label is the token at its place
        answers = [t["value"] for t in record["conversations"][1::2]]
        decoded = [tokenizer.decode(ids[run]) for run in _runs(labels)]
        # the template writes "Assistant: " (Idefics3) before an answer: the space belongs to it
        assert [d.lstrip(" ") for d in decoded] == [a + spec.end_of_turn for a in answers], (record["id"], decoded)
        multi_turn += len(answers) > 1
    assert multi_turn  # the stage-2 data has multi-turn samples


def test_image_tokens_equal_the_features_the_tower_produces(run):
    _, _, (trainer, _), _ = run
    dataset, model = trainer.train_dataset, trainer.model.eval()
    batch = FamilyCollator(dataset.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    assert "pixel_values" in batch and not all(dataset[i]["has_image"] for i in range(len(dataset)))  # mixed batch
    token = model.config.image_token_id
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        features = image_features(model, images)
    count = int((batch["input_ids"] == token).sum())
    assert count == features.shape[0] and features.shape[1] == model.config.text_config.hidden_size
    assert count > sum(dataset[i]["has_image"] for i in range(len(dataset)))  # expanded, not one per image
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_stage2_with_lora_at_another_size_from_a_local_base_directory(tmp_path, data):
    model, processor = FAMILY_RECIPES["gemma3"].tiny()
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    _stage(str(tmp_path / "base"), 1, tmp_path / "s1", data["train_stage1"], "--max_steps", 1)
    trainer, snap = _stage("gemma3-tiny", 2, tmp_path / "s2", data["train"], "--model", tmp_path / "s1",
                           "--lora", "llm", "--lora_r", 2, "--lora_alpha", 4, "--image_size", 256, "--max_steps", 2)
    model = trainer.model
    # stage 2 reads 256 px (grid 8, pooled 2x2: 16 tokens) where stage 1 read 64 (grid 4: 4 tokens)
    assert model.config.mm_tokens_per_image == 16 and model.model.multi_modal_projector.patches_per_image == 8
    item = trainer.train_dataset[0]
    with torch.no_grad():
        features = image_features(model, item["image_inputs"])
    assert int((item["input_ids"] == model.config.image_token_id).sum()) == features.shape[0] == 16
    assert load_pretrained(tmp_path / "s2")[1].image_seq_length == 16
    changes = _changes(trainer, snap)
    assert not any("lora_" in n for n, _ in trainer.model.named_parameters())  # merged before the save
    llm_changed = {n.rsplit(".", 2)[-2] for n in changes["llm"][0]}
    assert llm_changed == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not changes["token_pathway"][0] and not changes["map_pathway"][0]


def test_bad_family_recipes_are_refused(tmp_path, data):
    def args(*extra):
        return recipe.parse_args(["--recipe", "tiny-family-stage1", "--output_dir", str(tmp_path / "o"),
                                  "--data_path", str(data["train_stage1"]), *FAST, *map(str, extra)])

    with pytest.raises(RecipeError, match="base_model has to be one of"):
        recipe.train(*args("--base_model", "qwen-tiny"))
    with pytest.raises(RecipeError, match="chat_template"):
        recipe.train(*args("--template", "vicuna_v1"))
    with pytest.raises(RecipeError, match="mrify has to be a JSON object"):
        build_family_model(args("--mrify", '{"image_size": 64}')[0])


def test_align_labels_refuses_an_answer_inside_the_expansion():
    assert align_labels([5, 4, 6], [-100, -100, 6], [5, 4, 4, 4, 6]) == [-100, -100, -100, -100, 6]
    with pytest.raises(Exception, match="answer token"):
        align_labels([5, 4, 6], [-100, 4, 6], [5, 7, 7, 6])


def test_dataset_of_a_fresh_model_uses_the_family_template(data):
    args = recipe.parse_args(["--recipe", "tiny-family-stage1", "--base_model", "gemma3-tiny", "--output_dir", "unused",
                              "--data_path", str(data["train"]), *FAST])[0]
    model, processor = build_family_model(args)
    dataset = family_dataset(args, processor, family_recipe(model), data["train"])
    text = dataset.render(0).text
    assert text.startswith("<s><start_of_turn>user\n<start_of_image>") and "<start_of_turn>model\n" in text
    item = dataset[0]
    assert int((item["input_ids"] == model.config.image_token_id).sum()) == model.config.mm_tokens_per_image


# Idefics3 at 256 px cuts the synthetic images into 17 tiles of 256 px: seconds more, so slow
@pytest.mark.parametrize("base", ["onevision-tiny", "gemma3-tiny", pytest.param("idefics3-tiny", marks=pytest.mark.slow)])
def test_changing_the_image_size_equals_mrify_at_that_size(base, data):
    def build(size):
        args = recipe.parse_args(["--recipe", "tiny-family-stage1", "--base_model", base, "--output_dir", "unused",
                                  "--data_path", str(data["train_stage1"]), "--image_size", str(size), *FAST])[0]
        return args, *build_family_model(args)

    args, resized, processor = build(64)
    set_family_image_size(resized, processor, 256)
    _, fresh, fresh_processor = build(256)
    spec, ids = family_recipe(fresh), []
    for model, proc in ((resized, processor), (fresh, fresh_processor)):
        item = family_dataset(args, proc, spec, data["train_stage1"])[0]
        with torch.no_grad():
            count = image_features(model, item["image_inputs"]).shape[0]
        assert int((item["input_ids"] == model.config.image_token_id).sum()) == count
        ids.append(item["input_ids"])
    assert torch.equal(*ids)  # the same expansion as a fresh mrify at 256
    for key in ("image_size", "patch_size", "num_image_tokens", "feature_grid"):
        assert getattr(resized.config.vision_config, key) == getattr(fresh.config.vision_config, key), key
    with pytest.raises(RecipeError, match="cannot read the model at image_size=100"):
        set_family_image_size(resized, processor, 100)


def test_a_sample_too_long_once_expanded_is_raised_or_skipped(data):
    args = recipe.parse_args(["--recipe", "tiny-family-stage1", "--base_model", "idefics3-tiny", "--output_dir", "unused",
                              "--data_path", str(data["train"]), "--image_folder", str(data["root"]), *FAST])[0]
    model, processor = build_family_model(args)
    records = json.loads(data["train"].read_text())
    text_only = next(r for r in records if not r.get("image"))
    args.max_length = 60  # a text-only sample fits; 17 tiles of 4 image tokens each do not
    strict = family_dataset(args, processor, family_recipe(model), [records[0], text_only])
    with pytest.raises(LlavaDataError, match=r"train-000000.*exceed max_length=60"):
        strict[0]
    args.on_error = "skip"
    lenient = family_dataset(args, processor, family_recipe(model), [records[0], text_only])
    assert lenient[0]["id"] == text_only["id"] and lenient.skipped_ids == [records[0]["id"]]


# Qwen2.5-VL / Qwen3-VL: each image has its own ViT grid (smart_resize within the pixel budget), the
# projector (merger) sits inside the ViT, and image_size is the ViT view's pixel budget.
QWEN = ["qwen2_5_vl-tiny", "qwen3_vl-tiny"]
OPENING = {"qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", "qwen3_vl": "<|im_start|>user\n"}


@pytest.mark.parametrize("run", QWEN, indirect=True)
def test_qwen_mixed_sizes_image_tokens_equal_the_features_per_image(run, data, tmp_path):
    _, _, (trainer, _), _ = run
    model, processor = trainer.model.eval(), trainer.processing_class
    spec = family_recipe(model)
    source = Image.open(data["root"] / "images/test-000000.png")
    records = json.loads(data["train"].read_text())
    with_image = [r for r in records if r.get("image")][:3]
    text_only = next(r for r in records if not r.get("image"))
    for k, (record, size) in enumerate(zip(with_image, [(256, 256), (256, 128), (128, 256)])):
        source.resize(size).save(tmp_path / f"{k}.png")  # (width, height)
        record["image"] = f"{k}.png"
    args = recipe.parse_args(["--recipe", "tiny-family-stage2", "--model", "unused", "--output_dir", "unused", *FAST])[0]
    args.image_folder = str(tmp_path)
    dataset = family_dataset(args, processor, spec, [*with_image, text_only])
    assert dataset.render(0).text.startswith(OPENING[spec.name] + "<|vision_start|><|image_pad|><|vision_end|>")
    items = [dataset[i] for i in range(len(dataset))]
    batch = FamilyCollator(dataset.tokenizer.pad_token_id)(items)
    grid, merge = batch["image_grid_thw"], model.config.vision_config.spatial_merge_size
    assert len({tuple(g) for g in grid.tolist()}) == 3  # three different ViT grids in one packed batch
    # the collator joined the packed views along dim 0, as the processor packs one image
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert batch["high_res_pixel_values"].shape[0] == int(batch["high_res_grid"].prod(-1).sum())
    assert batch["high_res_grid"].tolist() == [list(item["image_inputs"]["high_res_grid"][0]) for item in items[:3]]
    token = model.config.image_token_id
    per_sample = (batch["input_ids"] == token).sum(-1).tolist()
    expected = (grid.prod(-1) // merge**2).tolist()
    assert per_sample == [*expected, 0]  # each image's <|image_pad|> run is its grid / merge**2; text-only: none
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "high_res_pixel_values", "high_res_grid")}
    with torch.no_grad():
        features = image_features(model, images)
        assert features.shape == (sum(expected), model.config.text_config.hidden_size)
        assert torch.isfinite(model(**batch).loss)
        text_batch = FamilyCollator(dataset.tokenizer.pad_token_id)(items[3:])  # image-free: no image inputs at all
        assert "pixel_values" not in text_batch and torch.isfinite(model(**text_batch).loss)
        assert torch.isfinite(trainer._blank_image_features(model))  # what an image-free training batch adds (x 0)
    with pytest.raises(Exception, match="high_res_pixel_values"):  # no silent low-res-only run
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])


@pytest.mark.parametrize("run", QWEN, indirect=True)
def test_qwen_projector_is_the_merger_carved_out_of_the_vit(run):
    _, (trainer, _), _, _ = run
    parts = family_parts(trainer.model)
    spec = family_recipe(trainer.model)
    merger = [f"projector.{path}" for path in spec.encoder_projector]
    assert parts["projector"] and all(n.startswith(tuple(merger)) for n, _ in parts["projector"])
    assert not any(".merger." in n or "deepstack_merger" in n for n, _ in parts["token_pathway"])
    visual = trainer.model.model.visual.encoder.token_pathway.model
    in_mergers = {id(p) for path in spec.encoder_projector for p in visual.get_submodule(path.removeprefix("token_pathway.model.")).parameters()}
    assert {id(p) for _, p in parts["projector"]} == in_mergers
    # stage 1 trained exactly adapters + merger: the ViT around it and the LLM did not take gradients
    assert all(p.requires_grad for _, p in parts["projector"]) and not any(p.requires_grad for _, p in parts["token_pathway"])


@pytest.mark.parametrize("run", QWEN, indirect=True)
def test_qwen_stage2_at_a_larger_pixel_budget(run, data):
    _, _, _, root = run
    trainer, snap = _stage("unused", 2, root / "s2-112", data["train"], "--model", root / "s1", "--image_size", 112,
                           "--max_steps", 1)
    model, processor = trainer.model, trainer.processing_class
    unit = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    assert processor.image_processor.size["longest_edge"] == 112 * 112
    item = trainer.train_dataset[0]  # a 256-px square image: ViT view 112 px (Qwen2.5, 28-px units) / 96 px (Qwen3, 32)
    side = 112 // unit * unit
    assert item["image_inputs"]["image_grid_thw"].tolist() == [[1, side // unit * 2, side // unit * 2]]
    with torch.no_grad():
        features = image_features(model, item["image_inputs"])
    assert int((item["input_ids"] == model.config.image_token_id).sum()) == features.shape[0] == (side // unit) ** 2
    reloaded = load_pretrained(root / "s2-112")[1]
    assert reloaded.image_processor.size["longest_edge"] == 112 * 112
    assert family_image_size(model, reloaded) == 112
    with pytest.raises(RecipeError, match="min_pixels"):
        set_family_image_size(model, processor, 40)  # 40**2 px is under the processor's min_pixels


def test_qwen_recipe_budget_and_high_res_scale(data):
    args = recipe.parse_args(["--recipe", "tiny-family-stage1", "--base_model", "qwen2_5_vl-tiny", "--output_dir", "unused",
                              "--data_path", str(data["train_stage1"]), "--mrify",
                              '{"map_pathway": "convnext_atto", "high_res_scale": 3}', *FAST])[0]
    args.image_size = None  # keeps the processor's own budget (the tiny one's 56**2 .. 112**2)
    model, processor = build_family_model(args)
    assert processor.image_processor.size["longest_edge"] == 112 * 112 and family_image_size(model, processor) == 112
    item = family_dataset(args, processor, family_recipe(model), data["train_stage1"])[0]
    # a 256-px image: ViT view 112 px (4x4 merged tokens); high-res 3 x 112 = 336 px, rounded to 352 = 11 x 32 (the stride)
    assert item["image_inputs"]["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert item["image_inputs"]["high_res_grid"].tolist() == [[11, 11]]
    with pytest.raises(Exception, match="high_res_scale is for Qwen"):
        args.base_model, args.image_size = "gemma3-tiny", 64
        build_family_model(args)


@pytest.mark.parametrize("run", QWEN, indirect=True)
def test_qwen_stage_directory_loads_in_a_fresh_process(run):
    """Stage 2 runs in a new process: the mrified classes must be registered by importing mixres's HF integration."""
    base, _, _, root = run
    code = ("import sys; from mixres.integrations.hf import load_pretrained; m, p = load_pretrained(sys.argv[1]); "
            "print(type(m).__name__, type(p.image_processor).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(root / "s1")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    model = {"qwen2_5_vl-tiny": "MixresQwen2_5_VLForConditionalGeneration", "qwen3_vl-tiny": "MixresQwen3VLForConditionalGeneration"}
    assert out.stdout.split() == [model[base], "MixresQwen2VLImageProcessor"]
