"""One recipe stage on a family model (LLaVA-OneVision, Gemma 3, Idefics3 / SmolVLM, Qwen2.5-VL / Qwen3-VL), on HF ``Trainer``.

:func:`train_family` is what :func:`~.train.train` runs when the recipe names a ``base_model``
(or ``model`` is a mrified family model): build or load the model (:mod:`.families`), set what
trains from the recipe's ``trainable`` / ``freeze`` / ``lora`` lists (the same part names:
the encoder's parts, ``projector``, ``llm``), train on the family's chat template and processor
(:mod:`.family_data`), save model + processor (``load_pretrained`` reads the directory, and
``model: DIR`` starts the next stage from it), and answer ``eval_data_path`` greedily.

Single process only: the LLaVA recipe's FSDP / ZeRO wiring (:mod:`.distributed`) is not
applied to family models yet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainingArguments

from .families import FamilyRecipe, build_family_model, family_recipe
from .family_data import IMAGE, FamilyCollator, FamilyDataset, _messages
from .recipe import RecipeArguments, RecipeError
from .stages import apply_lora, merge_lora, resolve_parts, set_trainable
from .trainer import LlavaTrainer

__all__ = ["FamilyTrainer", "train_family", "family_dataset", "image_features", "predict_family", "evaluate_family"]

logger = logging.getLogger(__name__)


def image_features(model: Any, image_inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The image features a family model hands its LLM: ``Tensor[N, C]``, N the image tokens they fill.

    ``image_inputs`` are the processor's (or the collator's) image tensors.
    """
    out = model.model.get_image_features(**image_inputs)
    features = getattr(out, "pooler_output", out)
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


class FamilyTrainer(LlavaTrainer):
    """:class:`~.trainer.LlavaTrainer` for family models: an image-free batch runs one blank image.

    Args:
        blank_image_inputs: the processor's image tensors of a blank image.
    """

    def __init__(self, *args: Any, blank_image_inputs: Mapping[str, torch.Tensor], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blank_image_inputs = dict(blank_image_inputs)

    def _blank_image_features(self, model: Any) -> torch.Tensor:
        inner = self.accelerator.unwrap_model(model)
        ref = next(inner.parameters())
        inputs = {k: v.to(ref.device, ref.dtype if v.is_floating_point() else v.dtype) for k, v in self.blank_image_inputs.items()}
        return image_features(inner, inputs).sum()


def family_dataset(recipe: RecipeArguments, processor: Any, spec: FamilyRecipe, data_path: Any) -> FamilyDataset:
    """The recipe's data for a family model (its chat template, its processor)."""
    from ..hf.families import FAMILIES

    nested = next(f.nested_images for f in FAMILIES if f.name == spec.name)
    return FamilyDataset(data_path, processor, end_of_turn=spec.end_of_turn, image_folder=recipe.image_folder,
                         max_length=recipe.max_length, on_error=recipe.on_error, nested_images=nested)


def train_family(recipe: RecipeArguments, training: TrainingArguments,
                 callbacks: Sequence[transformers.TrainerCallback] = ()) -> FamilyTrainer:
    """Run one stage on a family model: mrify (or load), set what trains, train, save, evaluate.

    Saves to ``training.output_dir`` the model (LoRA merged) with its processor (tokenizer and
    chat template included), ``recipe.json``, and ``eval.json`` when there is eval data.

    Raises:
        RecipeError: a template other than ``chat_template``, a sharded (FSDP / ZeRO) run, or
            what :func:`~.families.build_family_model` refuses.
    """
    if recipe.template != "chat_template":
        raise RecipeError(f"a family recipe formats conversations with the family's own chat template: set template: "
                          f"chat_template (got {recipe.template!r})")
    if training.world_size > 1 or training.deepspeed or training.fsdp:
        raise RecipeError("family recipes run in one process for now (FSDP / ZeRO are wired for the LLaVA recipe only)")
    dtype = torch.bfloat16 if training.bf16 else torch.float32
    model, processor = build_family_model(recipe, dtype)
    spec = family_recipe(model)
    trained, absent = resolve_parts(model, recipe.trainable_parts, recipe.frozen_parts)
    set_trainable(model, recipe.trainable_parts, recipe.frozen_parts)
    if recipe.lora_parts:
        apply_lora(model, recipe)
    dataset = family_dataset(recipe, processor, spec, recipe.data_path)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("stage %d (%s): training %s (%s parameters%s)%s; %r", recipe.stage, spec.name, trained, f"{n_train:,}",
                ", LoRA on the LLM" if recipe.lora_parts else "", f"; this model has no {absent}" if absent else "", dataset)
    pad = processor.tokenizer.pad_token_id
    trainer = FamilyTrainer(model=model, args=training, train_dataset=dataset, processing_class=processor,
                            data_collator=FamilyCollator(pad if pad is not None else 0), callbacks=list(callbacks),
                            overwrite_output_dir=recipe.overwrite_output_dir, allow_partial_resume=recipe.allow_partial_resume,
                            blank_image_inputs=dataset.blank_image_inputs())
    resume = training.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=(resume.lower() == "true") if isinstance(resume, str) and resume.lower() in ("true", "false") else resume)
    if recipe.lora_parts:
        merge_lora(trainer.model)
    trainer.save_model()
    if training.output_dir:
        Path(training.output_dir, "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
        if recipe.eval_data_path:
            scores = evaluate_family(trainer.model, processor, recipe.eval_data_path, spec, image_folder=recipe.image_folder)
            Path(training.output_dir, "eval.json").write_text(json.dumps(scores, indent=1) + "\n")
            logger.info("eval exact match: %s", scores["accuracy"])
    return trainer


@torch.no_grad()
def predict_family(model: Any, processor: Any, records: Sequence[Mapping[str, Any]], spec: FamilyRecipe, *,
                   image_folder: str | Path = ".", max_new_tokens: int = 6) -> dict[str, str]:
    """Greedy answers to the first question of each record, prompted with the family's chat template.

    Returns:
        ``{id: answer}``, special tokens skipped, up to the first newline.
    """
    from ..hf.families import FAMILIES
    from .evaluation import _open

    nested = next(f.nested_images for f in FAMILIES if f.name == spec.name)
    model.eval()
    ref = next(model.parameters())
    answers = {}
    for record in records:
        question = record["conversations"][0]["value"]
        prompt = processor.apply_chat_template(_messages([(question, "")], 0, False), tokenize=False, add_generation_prompt=True)
        kwargs: dict[str, Any] = {}
        if record.get("image"):
            image = _open(record["image"], image_folder)
            kwargs["images"] = [[image]] if nested else [image]
        elif IMAGE in question:
            raise RecipeError(f"eval record {record.get('id')!r} has {IMAGE!r} but no image")
        inputs = processor(text=[prompt], add_special_tokens=False, return_tensors="pt", **kwargs).to(ref.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(ref.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers[str(record["id"])] = text.strip().split("\n")[0].strip()
    return answers


def evaluate_family(model: Any, processor: Any, data_path: str | Path, spec: FamilyRecipe, *,
                    image_folder: str | Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """Exact-match scores of :func:`predict_family` on a question file (as :func:`~.evaluation.evaluate`)."""
    from mixres.scoring import score_answers

    from .evaluation import as_records, read_questions

    questions = read_questions(data_path, limit)
    folder = image_folder if image_folder is not None else Path(data_path).parent
    answers = predict_family(model, processor, as_records(questions), spec, image_folder=folder)
    report = score_answers(answers, [(q.id, q.answers, q.type) for q in questions], "exact")
    report.pop("questions")
    return {"accuracy": {k: v["score"] for k, v in report.items()}, "predictions": answers, "num_samples": len(questions)}
