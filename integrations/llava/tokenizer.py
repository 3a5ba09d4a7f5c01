"""The word-level tokenizer of ``llm: tiny`` (built from the data's own words)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers

from .synthetic import ANSWERS
from .templates import VICUNA_SYSTEM

__all__ = ["IMAGE_TOKEN", "build_tokenizer", "data_texts"]

IMAGE_TOKEN = "<image>"
_SPECIAL = ("<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN)


def _split(text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers

    return [w for w, _ in _pre_tokenizer(pre_tokenizers, Regex).pre_tokenize_str(text)]


def _pre_tokenizer(pre_tokenizers: Any, regex: Any) -> Any:
    # words (with inner hyphens: "top-left"), single punctuation marks, and newlines as tokens
    return pre_tokenizers.Split(regex(r"\n|[\w-]+|[^\w\s]"), behavior="removed", invert=True)


def build_tokenizer(texts: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts`` (plus the answers and Vicuna's prompt).

    Words, punctuation marks and ``"\\n"`` are tokens; ``<image>``, ``<s>``, ``</s>``,
    ``<pad>``, ``<unk>`` are special; a BOS is prepended. The vocabulary is sorted, so every
    process building it from the same texts gets the same ids.

    Example:
        >>> tok = build_tokenizer(["What colour is the small shape?"])
        >>> tok.convert_ids_to_tokens(tok("<image>\\nWhat colour ?")["input_ids"])
        ['<s>', '<image>', '\\n', 'What', 'colour', '?']
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    words = set(ANSWERS) | set(_split(VICUNA_SYSTEM + " USER: ASSISTANT: \n"))
    for text in texts:
        words.update(_split(text))
    vocab = {w: i for i, w in enumerate([*_SPECIAL, *sorted(words - set(_SPECIAL))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer(pre_tokenizers, Regex)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def data_texts(*paths: Any) -> list[str]:
    """Every conversation turn's text in the LLaVA JSON files ``paths`` (missing or ``None`` ones skipped)."""
    texts = []
    for path in paths:
        if path is not None and Path(path).is_file():
            for record in json.loads(Path(path).read_text()):
                texts += [t.get("value", "") for t in record.get("conversations", []) if isinstance(t, Mapping)]
    return texts
