"""Greedy answers and exact-match scores on LLaVA JSON data, images through the saved processor."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import ImagePreprocessor, tokenize_conversation
from .synthetic import exact_match
from .templates import Rendered, get_template
from .tokenizer import IMAGE_TOKEN

__all__ = ["predict", "evaluate"]


def _prompt(record: Mapping[str, Any], template: Any, tokenizer: Any) -> Rendered:
    """The first question rendered up to where its answer starts."""
    question = record["conversations"][0]["value"]
    if record.get("image") and IMAGE_TOKEN in question:
        question = IMAGE_TOKEN + "\n" + question.replace(IMAGE_TOKEN, "").strip()
    rendered = template.render([{"from": "human", "value": question}, {"from": "gpt", "value": ""}], tokenizer)
    return Rendered(rendered.text[: rendered.targets[0][0]], (), rendered.add_special_tokens)


@torch.no_grad()
def predict(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], *, template: str = "vicuna_v1",
            image_folder: str | os.PathLike[str] = ".", aspect_ratio: str = "pad", batch_size: int = 32,
            max_new_tokens: int = 6) -> dict[str, str]:
    """Greedy answers to the first question of each record (LLaVA JSON), images as in training.

    Returns:
        ``{id: answer}``; an answer ends at the first end-of-turn or newline.
    """
    model.eval()
    vision = model.config.vision_config
    prep = ImagePreprocessor(int(vision.image_size), aspect_ratio=aspect_ratio)
    tpl, image_id = get_template(template), int(model.config.image_token_id)
    stops = [tokenizer.eos_token_id, *([tokenizer.convert_tokens_to_ids("\n")] if "\n" in tokenizer.get_vocab() else [])]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: dict[str, str] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        rows = [tokenize_conversation(_prompt(r, tpl, tokenizer), tokenizer, image_token_id=image_id,
                                      num_image_tokens=int(vision.num_image_tokens))[0] for r in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        images = [prep(_open(Path(image_folder) / r["image"])) for r in chunk if r.get("image")]
        if images:
            inputs["pixel_values"] = torch.stack(images).to(device, next(model.parameters()).dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad)
        for record, new in zip(chunk, out[:, width:]):
            text = tokenizer.decode(new, skip_special_tokens=True)
            answers[str(record["id"])] = text.strip().split("\n")[0].strip()
    return answers


def _open(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def evaluate(model: Any, tokenizer: Any, data_path: str | os.PathLike[str], *, template: str = "vicuna_v1",
             image_folder: str | os.PathLike[str] | None = None, aspect_ratio: str = "pad",
             limit: int | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on a LLaVA JSON file (first question of each sample).

    Returns:
        ``{"accuracy": {"all": ..., "<task>": ...}, "predictions": {id: answer}, "num_samples"}``.
    """
    records = json.loads(Path(data_path).read_text())[:limit]
    folder = image_folder if image_folder is not None else Path(data_path).parent
    answers = predict(model, tokenizer, records, template=template, image_folder=folder, aspect_ratio=aspect_ratio)
    return {"accuracy": exact_match(answers, records), "predictions": answers, "num_samples": len(records)}
