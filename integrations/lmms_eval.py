"""lmms-eval model plugin: ``lmms-eval --model mixres --model_args pretrained=DIR --tasks ...``.

`lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ (``pip install 'mixres[lmms]'``)
finds models through the entry-point group ``lmms_eval.models``; mixres declares
``mixres = "mixres.integrations.lmms_eval:manifests"`` there (``pyproject.toml``), so once
mixres is installed, ``--model mixres`` loads :class:`MixresLMM`.

:class:`MixresLMM` runs a ``save_pretrained`` LLaVA directory with a mixres vision tower (what the
recipe writes, or an mrified model) through the recipe's own greedy generation
(:func:`mixres.integrations.llava.evaluation.predict`: the saved template, images padded and
resized as in training, left-padded batches). It answers ``generate_until`` requests (the
VQA-style tasks: TextVQA, DocVQA, ChartQA, VQAv2, GQA, ...); one image per request.
``loglikelihood`` (multiple-choice scoring by likelihood) is not implemented.

``model_args``: ``pretrained`` (the directory), ``device`` (default
CPU, or ``cuda:0``), ``template`` / ``aspect_ratio`` (default: the directory's ``recipe.json``,
else ``vicuna_v1`` / ``pad``), ``max_new_tokens`` (default 16; a task's
``generation_kwargs.max_new_tokens`` wins). The batch size is lmms-eval's own ``--batch_size``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms

__all__ = ["MixresLMM", "manifests"]


def manifests() -> list[Any]:
    """The entry point's payload: one ``ModelManifest`` naming :class:`MixresLMM` ``mixres``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="mixres", simple_class_path="mixres.integrations.lmms_eval.MixresLMM")]


class MixresLMM(lmms):
    """A mixres / mrified LLaVA directory as an lmms-eval model (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = None,
                 template: str | None = None, aspect_ratio: str | None = None, max_new_tokens: int | str = 16,
                 **kwargs: Any) -> None:
        super().__init__()
        from mixres.evaluate import load_model

        directory = Path(pretrained)
        recipe = json.loads((directory / "recipe.json").read_text()) if (directory / "recipe.json").is_file() else {}
        self.model, self.tokenizer = load_model(directory, device)
        self.template = template or recipe.get("template", "vicuna_v1")
        self.aspect_ratio = aspect_ratio or recipe.get("aspect_ratio", "pad")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.unused_args = kwargs  # lmms-eval passes e.g. device_map; nothing else here reads them

    def _record(self, index: int, context: str, visuals: list[Any]) -> dict[str, Any]:
        from mixres.integrations.llava.tokenizer import IMAGE_TOKEN

        if len(visuals) > 1:
            raise NotImplementedError(f"request {index} has {len(visuals)} images; the mixres plugin takes one per request")
        image = visuals[0] if visuals else None
        text = context if image is None or IMAGE_TOKEN in context else f"{IMAGE_TOKEN}\n{context}"
        return {"id": str(index), "image": image, "conversations": [{"from": "human", "value": text}]}

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy answers, cut at the first of each request's ``until`` strings."""
        from mixres.integrations.llava.evaluation import predict

        groups: dict[int, list[tuple[int, dict[str, Any], list[str]]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            steps = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            groups.setdefault(steps, []).append((i, self._record(i, context, visuals), until))
        out: dict[int, str] = {}
        for steps, items in groups.items():
            answers = predict(self.model, self.tokenizer, [r for _, r, _ in items], template=self.template,
                              aspect_ratio=self.aspect_ratio, batch_size=self.batch_size, max_new_tokens=steps,
                              progress=self.rank == 0)
            for i, record, until in items:
                text = answers[record["id"]]
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out[i] = text.strip()
        return [out[i] for i in range(len(requests))]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """Not implemented: the plugin answers ``generate_until`` tasks."""
        raise NotImplementedError("the mixres lmms-eval plugin answers generate_until tasks only (no loglikelihood)")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        """Not implemented: single-round questions only."""
        raise NotImplementedError("the mixres lmms-eval plugin answers single-round generate_until tasks only")
