"""``mixres eval``: score a trained (mrified) model on a local question file.

::

    mixres eval --model runs/s2 --data textvqa_val.jsonl --metric vqa --image-folder images/

Loads a ``save_pretrained`` LLaVA directory with a mixres vision tower (what the recipe writes,
or an mrified model), answers every question greedily in left-padded batches with a progress
bar (:func:`mixres.integrations.llava.evaluation.predict`, the recipe's own generation, so
images are prepared as in training), scores the answers with :mod:`mixres.scoring`, and writes
a JSON report (scores overall and per question type, every answer with its score and
references) and a markdown table. The file formats are those of
:func:`~mixres.integrations.llava.evaluation.read_questions` (LLaVA conversations, or
question rows such as LLaVA's TextVQA ``.jsonl``).

The template and aspect-ratio handling default to the model directory's ``recipe.json`` when
there is one (else ``vicuna_v1`` and ``pad``). Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MixresError
from .scoring import METRICS

__all__ = ["load_model", "evaluate_model", "report_markdown", "build_parser", "run", "main"]


def _recipe_defaults(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "recipe.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(model_dir: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a save_pretrained directory with a mixres vision tower.

    Raises:
        MixresError: no such directory, or a model without a mixres tower.
    """
    model_dir = Path(model_dir)
    import mixres.integrations.hf  # noqa: F401  (registers the mixres tower with the Auto classes)
    from mixres.integrations.hf import load_pretrained

    model, processor = load_pretrained(model_dir, device=device)
    vision = getattr(model.config, "vision_config", None)
    if getattr(vision, "num_image_tokens", None) is None:
        raise MixresError(f"{str(model_dir)!r} is not a model with a mixres vision tower (its vision_config has no "
                          "num_image_tokens); mrify it first (mixres.integrations.hf.mrify) and save it")
    return model, processor.tokenizer


def evaluate_model(
    model_dir: str | Path,
    data: str | Path,
    metric: str = "vqa",
    *,
    image_folder: str | Path | None = None,
    template: str | None = None,
    aspect_ratio: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load ``model_dir``, answer ``data``, score with ``metric``; the JSON report as a dict.

    Returns:
        ``{"model", "data", "metric", "num_questions", "scores": {"all": {"score", "count"},
        "<type>": ...}, "questions": [{"id", "type", "answer", "references", "score"}]}``.

    Raises:
        MixresError: unknown metric, missing files, a model without a mixres tower, bad rows.
    """
    from mixres.integrations.llava.evaluation import evaluate, read_questions

    if metric not in METRICS:
        raise MixresError(f"metric has to be one of {list(METRICS)}, but got {metric!r}")
    model_dir = Path(model_dir)
    defaults = _recipe_defaults(model_dir)
    model, tokenizer = load_model(model_dir, device)
    result = evaluate(
        model, tokenizer, data, template=template or defaults.get("template", "vicuna_v1"),
        image_folder=image_folder, aspect_ratio=aspect_ratio or defaults.get("aspect_ratio", "pad"), limit=limit,
        metric=metric, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
    )
    questions = read_questions(data, limit)
    return {
        "model": str(model_dir), "data": str(data), "metric": metric, "num_questions": len(questions),
        "scores": {k: {"score": v, "count": result["counts"][k]} for k, v in result["accuracy"].items()},
        "questions": [{"id": q.id, "type": q.type, "answer": result["predictions"].get(q.id, ""),
                       "references": list(q.answers), "score": result["scores"][q.id]} for q in questions],
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The per-type table of a report from :func:`evaluate_model`.

    Example:
        >>> print(report_markdown({"model": "m", "data": "d.json", "metric": "exact", "num_questions": 2,
        ...                        "scores": {"all": {"score": 0.5, "count": 2}, "digit": {"score": 0.5, "count": 2}}}))
        # mixres eval: exact on d.json
        <BLANKLINE>
        model `m`, 2 questions
        <BLANKLINE>
        | question type | questions | exact |
        |---|---|---|
        | all | 2 | 50.00 |
        | digit | 2 | 50.00 |
    """
    lines = [f"# mixres eval: {report['metric']} on {Path(report['data']).name}", "",
             f"model `{report['model']}`, {report['num_questions']} questions", "",
             f"| question type | questions | {report['metric']} |", "|---|---|---|"]
    lines += [f"| {k} | {v['count']} | {100 * v['score']:.2f} |" for k, v in report["scores"].items()]
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``mixres eval`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="mixres eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="save_pretrained directory (recipe output or mrified model)")
    p.add_argument("--data", required=True, help="question file, .json or .jsonl")
    p.add_argument("--metric", default="vqa", choices=sorted(METRICS))
    p.add_argument("--image-folder", help="where image paths are relative to (default: the data file's folder)")
    p.add_argument("--template", help="conversation template (default: recipe.json's, else vicuna_v1)")
    p.add_argument("--aspect-ratio", help="pad | resize (default: recipe.json's, else pad)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--device", help="e.g. cuda:0 (default: where the model loads, CPU)")
    p.add_argument("--out", help="report path prefix (default: MODEL/eval-<data stem>-<metric>); writes .json and .md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``mixres eval`` from parsed arguments; returns the exit code."""
    try:
        report = evaluate_model(args.model, args.data, args.metric, image_folder=args.image_folder,
                                template=args.template, aspect_ratio=args.aspect_ratio, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, limit=args.limit, device=args.device,
                                progress=not args.no_progress)
    except MixresError as err:
        print(f"mixres eval: {err}", file=sys.stderr)
        return 2
    prefix = Path(args.out) if args.out else Path(args.model) / f"eval-{Path(args.data).stem}-{args.metric}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md = report_markdown(report)
    md_path.write_text(md + "\n")
    print(md + f"\n\nwrote {json_path} and {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixres.evaluate --model DIR --data FILE [--metric vqa|exact|anls]``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
