"""Greedy answers and their scores on local question files, images prepared as in training.

Two file formats (:func:`read_questions`), JSON or JSON lines:

- **LLaVA conversations** (the recipe's data): ``{"id", "image", "conversations": [human, gpt, ...],
  "meta": {"task"}}``; the first question is asked, the first answer is the reference, the
  question type is ``meta.task``;
- **question rows** (LLaVA's ``llava_textvqa_val_*.jsonl``, VQAv2 / TextVQA annotations):
  ``{"question_id", "image" | "image_id", "text" | "question", "answers" | "answer", "question_type" |
  "category" | "answer_type"}``; ``answers`` is a list of str or of ``{"answer": str}`` (VQAv2);
  a dict with a ``"data"`` list (TextVQA's JSON) holds the rows; ``image_id`` reads
  ``<image_id>.jpg``.

Scores come from :mod:`mixres.scoring` (``exact``, ``vqa``, ``anls``), the scorer of
``mixres eval`` too, so both give the same numbers on the same model and file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixres.errors import MixresError
from mixres.scoring import Metric, score_answers

from .data import tokenize_conversation
from .templates import Rendered, get_template
from .tokenizer import IMAGE_TOKEN

__all__ = ["Question", "read_questions", "as_records", "predict", "evaluate"]


@dataclass(frozen=True)
class Question:
    """One question of an evaluation file: ``answers`` are the references, ``type`` groups scores."""

    id: str
    image: str | None
    text: str
    answers: tuple[str, ...]
    type: str = "unknown"


def _answers(row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    raw = row.get("answers", row.get("answer"))
    if raw is None:
        raise MixresError(f"{where} has no 'answers' or 'answer'; every question needs its reference answer(s)")
    raw = [raw] if isinstance(raw, str) else list(raw)
    out = tuple(a["answer"] if isinstance(a, Mapping) else a for a in raw)
    if not out or not all(isinstance(a, str) for a in out):
        raise MixresError(f"{where} has answers {raw!r}; expected a str or a non-empty list of str / {{'answer': str}}")
    return out


def _question(row: Mapping[str, Any], index: int) -> Question:
    where = f"question {index}"
    if not isinstance(row, Mapping):
        raise MixresError(f"{where} is a {type(row).__name__}; expected a JSON object")
    if "conversations" in row:  # LLaVA conversation record
        turns = row["conversations"]
        if len(turns) < 2:
            raise MixresError(f"{where} (id {row.get('id')!r}) has {len(turns)} turn(s); expected a question and its answer")
        qtype = row.get("meta", {}).get("task", row.get("question_type", "unknown"))
        return Question(str(row["id"]), row.get("image"), turns[0]["value"], (turns[1]["value"],), str(qtype))
    qid = row.get("question_id", row.get("id"))
    text = row.get("text", row.get("question"))
    if qid is None or not isinstance(text, str):
        raise MixresError(f"{where} needs 'question_id' (or 'id') and 'text' (or 'question'); it has {sorted(row)}")
    image = row.get("image") or (f"{row['image_id']}.jpg" if row.get("image_id") is not None else None)
    qtype = row.get("question_type", row.get("category", row.get("answer_type", "unknown")))
    return Question(str(qid), image, text, _answers(row, f"{where} (id {qid!r})"), str(qtype))


def read_questions(path: str | os.PathLike[str], limit: int | None = None) -> list[Question]:
    """Read a JSON / JSON-lines question file in either format of the module docstring.

    Raises:
        MixresError: the file is missing, empty, or a row lacks what it needs.
    """
    path = Path(path)
    if not path.is_file():
        raise MixresError(f"question file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MixresError(f"question file {str(path)!r} is not UTF-8 text ({err})") from None
    rows: Any = []
    # JSON lines are parsed one by one so that the error names the line of the file
    lines = enumerate(text.splitlines(), 1) if path.suffix == ".jsonl" else [(None, text)]
    for number, chunk in lines:
        if not chunk.strip():
            continue
        try:
            value = json.loads(chunk)
        except json.JSONDecodeError as err:
            where = f"line {number}" if number is not None else f"line {err.lineno} column {err.colno}"
            raise MixresError(f"question file {str(path)!r} is not valid JSON at {where}: {err.msg}") from None
        if number is None:
            rows = value
        else:
            rows.append(value)
    if isinstance(rows, Mapping):
        rows = rows.get("data", rows.get("questions"))
    if not isinstance(rows, list) or not rows:
        raise MixresError(f"{str(path)!r} holds no questions; expected a list of objects (or {{'data': [...]}})")
    return [_question(row, i) for i, row in enumerate(rows[:limit])]


def as_records(questions: Sequence[Question]) -> list[dict[str, Any]]:
    """LLaVA records for :func:`predict`; an image question without ``<image>`` gets it in front."""
    records = []
    for q in questions:
        text = q.text if not q.image or IMAGE_TOKEN in q.text else f"{IMAGE_TOKEN}\n{q.text}"
        records.append({"id": q.id, "image": q.image, "conversations": [{"from": "human", "value": text}]})
    return records


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
            max_new_tokens: int = 6, processor: Any = None, progress: bool = False) -> dict[str, str]:
    """Greedy answers to the first question of each record (LLaVA JSON), images as in training.

    A record's ``image`` is a path (relative to ``image_folder``) or a PIL image. Images go
    through ``processor`` (the one saved with the model; default: the recipe's
    :func:`~.model.processor_for`, which is what training used). Prompts are left-padded into
    batches of ``batch_size``; ``progress`` shows a tqdm bar (stderr).

    Returns:
        ``{id: answer}``; an answer ends at the first end-of-turn or newline.
    """
    from tqdm.auto import tqdm

    model.eval()
    vision = model.config.vision_config
    from .model import ProcessorImages, processor_for

    prep = ProcessorImages(processor if processor is not None else processor_for(model, tokenizer, aspect_ratio))
    tpl, image_id = get_template(template), int(model.config.image_token_id)
    stops = [tokenizer.eos_token_id, *([tokenizer.convert_tokens_to_ids("\n")] if "\n" in tokenizer.get_vocab() else [])]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: dict[str, str] = {}
    bar = tqdm(total=len(records), desc="answering", unit="q", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        rows = [tokenize_conversation(_prompt(r, tpl, tokenizer), tokenizer, image_token_id=image_id,
                                      num_image_tokens=int(vision.num_image_tokens))[0] for r in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        images = [prep(_open(r["image"], image_folder)) for r in chunk if r.get("image")]
        if images:
            inputs["pixel_values"] = torch.stack(images).to(device, next(model.parameters()).dtype)
        # synced_gpus=False: this process's own whole model (the recipe evaluates on the main process
        # only); transformers turns the sync on whenever ZeRO-3 is configured and would wait for peers
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad, synced_gpus=False)
        for record, new in zip(chunk, out[:, width:]):
            text = tokenizer.decode(new, skip_special_tokens=True)
            answers[str(record["id"])] = text.strip().split("\n")[0].strip()
        bar.update(len(chunk))
    bar.close()
    return answers


def _open(image: Any, folder: str | os.PathLike[str]) -> Any:
    """A record's image: a path relative to ``folder`` (or absolute), or a PIL image already."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(Path(folder) / image) as opened:
        return opened.convert("RGB")


def evaluate(model: Any, tokenizer: Any, data_path: str | os.PathLike[str], *, template: str = "vicuna_v1",
             image_folder: str | os.PathLike[str] | None = None, aspect_ratio: str = "pad",
             limit: int | None = None, metric: Metric = "exact", batch_size: int = 32, max_new_tokens: int = 6,
             processor: Any = None, progress: bool = False) -> dict[str, Any]:
    """Score greedy answers on a question file (:func:`read_questions`) with :mod:`mixres.scoring`.

    Generation as :func:`predict` (``processor``: the saved one; default the recipe's).

    Returns:
        ``{"accuracy": {"all": ..., "<type>": ...}, "counts": {...}, "scores": {id: score},
        "predictions": {id: answer}, "num_samples", "metric"}``.
    """
    questions = read_questions(data_path, limit)
    folder = image_folder if image_folder is not None else Path(data_path).parent
    answers = predict(model, tokenizer, as_records(questions), template=template, image_folder=folder,
                      aspect_ratio=aspect_ratio, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      processor=processor, progress=progress)
    report = score_answers(answers, [(q.id, q.answers, q.type) for q in questions], metric)
    per_question = report.pop("questions")
    return {"accuracy": {k: v["score"] for k, v in report.items()}, "counts": {k: v["count"] for k, v in report.items()},
            "scores": per_question, "predictions": answers, "num_samples": len(questions), "metric": metric}
