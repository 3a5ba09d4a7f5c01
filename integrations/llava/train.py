"""LLaVA-HR's two-stage training recipe on transformers' ``Trainer``.

Source: arXiv 2403.03003 Sec. 4.1 (training details) and the release's ``scripts/v1_5/``
(``pretrain_llava_hr.sh``, ``finetune_llava_hr.sh``). The model is a transformers
``LlavaForConditionalGeneration`` whose vision tower is a
:class:`~mixres.integrations.hf.MixresVisionModel` (a dual-pathway encoder), so what this
recipe saves loads with :func:`~mixres.integrations.hf.load_pretrained`.

- **Stage 1** (``stage: 1``, low res: 384 px, ViT 336): ``trainable: [projector, final_fusion]``;
  both encoders, the MR-Adapters (identity at init, so absent in effect) and the LLM are
  frozen. Template ``plain``; lr 1e-3, batch 256.
- **Stage 2** (``stage: 2``, high res: 1024 px, ViT 448): ``trainable: all``, adapters included;
  ``freeze: [token_pathway, map_pathway, llm]`` keeps named parts fixed and ``lora: [llm]``
  trains the LLM through LoRA (peft) instead. Template ``vicuna_v1``; lr 2e-5, batch 128, max length 2496, ZeRO-3,
  images padded to square with the mean colour.

The recipe is split by job: :mod:`.recipe` (arguments and files), :mod:`.model` (assembly),
:mod:`.stages` (what trains), :mod:`.trainer`, :mod:`.evaluation`; this module runs a stage and is
the command line. A recipe is a JSON / YAML file of arguments (:class:`RecipeArguments` and transformers'
``TrainingArguments``, flat), shipped in ``recipes/``; command-line flags override it::

    python -m mixres.integrations.llava.train --recipe tiny-stage1 --output_dir runs/s1
    python -m mixres.integrations.llava.train --recipe tiny-stage2 --model runs/s1 --output_dir runs/s2
    accelerate launch --config_file integrations/llava/fsdp.yaml -m mixres.integrations.llava.train ...
    torchrun --nproc_per_node 8 -m mixres.integrations.llava.train --recipe llava-hr-7b-stage2 ...

Where we differ from the release: the model is transformers' Llava (image tokens are expanded
in the data, :mod:`.data`); a batch with no image at all still runs the vision tower on a
blank image (weight 0 in the loss), so every process of a DDP / ZeRO-3 job uses the same
parameters in every step, as the release does with its zero-size image features; with no
``data_path`` the recipe trains on the synthetic fine-detail data (:mod:`.synthetic`) and a
tiny word-level tokenizer built from it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import transformers
from transformers import TrainingArguments

from . import distributed
from .collator import LlavaCollator
from .data import LlavaDataset
from .evaluation import evaluate, predict
from .families import is_family_directory
from .model import TINY_LLM, ProcessorImages, build_model, processor_for, set_image_size
from .recipe import RECIPES, RecipeArguments, RecipeError, list_recipes, load_recipe, parse_args
from .stages import apply_lora, merge_lora, model_parts, part_parameters, resolve_parts, set_trainable
from .synthetic import generate_dataset
from .tokenizer import build_tokenizer
from .trainer import LlavaTrainer

__all__ = [
    "RECIPES",
    "TINY_LLM",
    "RecipeError",
    "RecipeArguments",
    "list_recipes",
    "load_recipe",
    "parse_args",
    "synthetic_data",
    "build_tokenizer",
    "build_model",
    "set_image_size",
    "set_trainable",
    "apply_lora",
    "merge_lora",
    "part_parameters",
    "model_parts",
    "resolve_parts",
    "LlavaTrainer",
    "processor_for",
    "train",
    "predict",
    "evaluate",
    "main",
    "cli",
]

logger = logging.getLogger(__name__)


def synthetic_data(root: str | os.PathLike[str], *, num_train: int, num_test: int = 0,
                   image_size: int = 256, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic fine-detail data once and a stage-1 view of it.

    Returns ``{"root", "train", "train_stage1", "test"}``: ``train_stage1`` holds the image
    samples' first question and answer only (``plain`` takes one image and one answer; it drops
    the question, so the answer acts as the caption). Images are square, ``image_size`` px,
    with details 8-10 px. A folder already written with the same arguments is reused.
    """
    root = Path(root)
    stamp = root / "synthetic.json"
    spec = {"num_train": num_train, "num_test": num_test, "image_size": image_size, "seed": seed}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == spec):
        detail = (8, min(12, image_size // 24))
        paths = generate_dataset(root, num_train, num_test, image_size=image_size, seed=seed, detail_px=detail)
        records = json.loads(paths.train_json.read_text())
        single = [dict(r, conversations=r["conversations"][:2]) for r in records if r.get("image")]
        (root / "train_stage1.json").write_text(json.dumps(single, indent=1) + "\n")
        stamp.write_text(json.dumps(spec))
    return {"root": root, "train": root / "train.json", "train_stage1": root / "train_stage1.json",
            "test": root / "test.json"}


def _dataset(recipe: RecipeArguments, tokenizer: Any, model: Any, data_path: Any) -> LlavaDataset:
    images = ProcessorImages(processor_for(model, tokenizer, recipe.aspect_ratio))  # the processor saved with the model
    return LlavaDataset(data_path, tokenizer, num_image_tokens=int(model.config.vision_config.num_image_tokens),
                        image_folder=recipe.image_folder, template=recipe.template, max_length=recipe.max_length,
                        image_processor=images, on_error=recipe.on_error)


def _default_data(recipe: RecipeArguments, training: TrainingArguments) -> RecipeArguments:
    """Point ``data_path`` at the synthetic data (written by the main process first)."""
    if recipe.data_path is not None:
        return recipe
    root = Path(training.output_dir or ".") / "data"
    with training.main_process_first(desc="writing the synthetic data"):
        paths = synthetic_data(root, num_train=recipe.synthetic_samples, num_test=max(16, recipe.synthetic_samples // 8),
                               image_size=recipe.synthetic_image_size, seed=training.seed)
    recipe.data_path = str(paths["train_stage1" if recipe.stage == 1 else "train"])
    recipe.eval_data_path = recipe.eval_data_path or str(paths["test"])
    recipe.vocab_data = recipe.vocab_data or str(paths["train"])
    return recipe


def train(recipe: RecipeArguments, training: TrainingArguments,
          callbacks: Sequence[transformers.TrainerCallback] = ()) -> LlavaTrainer:
    """Run one stage: build or load the model, set what trains, train, save, evaluate.

    Saves to ``training.output_dir``: the model (LoRA merged), tokenizer and processor
    (``load_pretrained`` reads it), ``recipe.json``, and ``eval.json`` when there is eval data.
    Checkpoints every ``save_steps``; ``resume_from_checkpoint`` continues one.

    Returns:
        The trainer (``trainer.model`` is the trained model).
    """
    transformers.set_seed(training.seed)
    recipe = _default_data(recipe, training)
    training.remove_unused_columns = False  # the collator reads the dataset's own keys
    distributed.prepare(training)  # DeepSpeed on CPU: zero.Init needs deepspeed.comm on the job's group
    if recipe.base_model or is_family_directory(recipe.model):  # LLaVA-OneVision, Gemma 3, Idefics3 / SmolVLM
        from .family_train import train_family

        return train_family(recipe, training, callbacks)
    model, tokenizer = build_model(recipe, training)
    trained, absent = resolve_parts(model, recipe.trainable_parts, recipe.frozen_parts)
    set_trainable(model, recipe.trainable_parts, recipe.frozen_parts)
    if getattr(training, "activation_checkpointing", False) or getattr(training, "gradient_checkpointing", False):
        # the encoder's own (transformers' reaches the LLM and an HF ViT only)
        model.model.vision_tower.encoder.set_grad_checkpointing(True)
    if recipe.lora_parts:
        apply_lora(model, recipe)
    dataset = _dataset(recipe, tokenizer, model, recipe.data_path)
    _log_plan(recipe, model, trained, absent, dataset)
    trainer = LlavaTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer,
                           data_collator=LlavaCollator.from_dataset(dataset), callbacks=list(callbacks),
                           overwrite_output_dir=recipe.overwrite_output_dir, allow_partial_resume=recipe.allow_partial_resume)
    distributed.configure(trainer, model)  # FSDP: the recipe's wrap policy unless the user named one
    trainer.train(resume_from_checkpoint=_resume(training.resume_from_checkpoint))
    final = _final_model(trainer, recipe, training)
    if trainer.is_world_process_zero() and training.output_dir:
        processor_for(final, tokenizer, recipe.aspect_ratio).save_pretrained(training.output_dir)
        Path(training.output_dir, "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
        if dataset.skipped:
            logger.warning("%d samples were skipped (on_error='skip'): %s", dataset.skipped, dataset.skipped_ids[:10])
        if recipe.eval_data_path:
            scores = evaluate(final, tokenizer, recipe.eval_data_path, template=recipe.template,
                              image_folder=recipe.image_folder, aspect_ratio=recipe.aspect_ratio)
            Path(training.output_dir, "eval.json").write_text(json.dumps(scores, indent=1) + "\n")
            logger.info("eval exact match: %s", scores["accuracy"])
    # every process leaves together: a rank that exits while the main one still writes the export
    # tears its process group down under it (gloo: the exiting rank aborts, CI saw SIGABRT)
    trainer.accelerator.wait_for_everyone()
    return trainer


def _final_model(trainer: LlavaTrainer, recipe: RecipeArguments, training: TrainingArguments) -> Any:
    """Save the trained model (LoRA merged); returns it on the main process.

    Under FSDP / ZeRO-3 no process holds the whole model: the weights are gathered into a plain
    copy on the main process (:func:`.distributed.export_model`), which is merged, saved and
    evaluated there; ``trainer.model`` stays sharded.
    """
    if not distributed.is_sharded(trainer):
        if recipe.lora_parts:
            merge_lora(trainer.model)
        trainer.save_model()
        return trainer.model

    def rebuild() -> Any:
        model, _ = build_model(recipe, training)
        if recipe.lora_parts:
            apply_lora(model, recipe)
        return model

    final = distributed.export_model(trainer, rebuild)
    if final is not None:
        if recipe.lora_parts:
            merge_lora(final)
        if training.output_dir:
            final.save_pretrained(training.output_dir)
            trainer.processing_class.save_pretrained(training.output_dir)
    return final


def _resume(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _log_plan(recipe: RecipeArguments, model: Any, trained: list[str], absent: list[str], dataset: LlavaDataset) -> None:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    lacks = f"; this model has no {absent}" if absent else ""
    logger.info("stage %d: training %s (%s of %s parameters%s%s); %r", recipe.stage, trained, f"{n_train:,}",
                f"{n_all:,}", ", LoRA on the LLM" if recipe.lora_parts else "", lacks, dataset)


def main(argv: Sequence[str] | None = None) -> LlavaTrainer:
    """The command line: ``python -m mixres.integrations.llava.train --recipe NAME [--flag value ...]``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)  # the plan (what trains, the data) and the eval scores
    recipe, training = parse_args(argv)
    return train(recipe, training)


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` as a console command: a user error is one line on stderr and status 2.

    A bare ``--debug`` (transformers' ``--debug`` always takes a value) shows the traceback.
    """
    import sys

    from mixres.errors import MixresError

    argv = list(sys.argv[1:] if argv is None else argv)
    bare = [i for i, a in enumerate(argv) if a == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("--"))]
    for i in reversed(bare):
        del argv[i]
    try:
        trainer = main(argv)
    except (MixresError, OSError, ImportError) as err:
        if bare:
            raise
        print(f"train: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    trainer.accelerator.end_training()  # trackers closed, the process group destroyed before exit
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
