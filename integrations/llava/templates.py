"""Conversation templates: LLaVA conversations to one training string plus its answer spans.

A template turns ``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]`` into
the text the LLM is trained on and the character spans of the assistant answers (each with its
end-of-turn token). The dataset tokenises the text once with offsets and keeps labels only on
tokens inside those spans, so masking never depends on how a tokenizer splits a prefix
(LLaVA's ``preprocess_v1`` subtracts prefix lengths and warns when they drift).

Templates (from LLaVA's ``llava/conversation.py``):

- ``plain`` (``conv_llava_plain``, stage 1): ``<image>`` + answer + ``"\\n"``. As LLaVA's
  ``preprocess_plain``, the human text is dropped (only the image placeholder stays) and a
  sample is exactly one image, one question, one answer.
- ``vicuna_v1`` (``conv_vicuna_v1``, stage 2): ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``;
  the end-of-turn is the tokenizer's ``eos_token`` (``</s>`` for Vicuna / LLaMA-2).
- ``chat_template``: the tokenizer's own ``apply_chat_template`` (Qwen, LLaMA-3, ...). The answer
  span of turn *k* is what rendering turn *k* adds after the generation prompt, so it includes
  the template's end-of-turn marker; the template must render conversations prefix-stably.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixres.errors import MixresError, UnknownNameError

__all__ = [
    "VICUNA_SYSTEM",
    "TemplateError",
    "Rendered",
    "Template",
    "PlainTemplate",
    "VicunaV1Template",
    "ChatTemplate",
    "TEMPLATES",
    "get_template",
    "conversation_pairs",
]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


class TemplateError(MixresError):
    """A conversation does not fit the template (roles, turn count, missing image, ...)."""


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered by a template.

    Attributes:
        text: the full training string.
        targets: ``(start, end)`` character spans of the answers (with their end-of-turn).
        add_special_tokens: whether to tokenise ``text`` with the tokenizer's own BOS etc.
            (``False`` where the template writes them itself).
    """

    text: str
    targets: tuple[tuple[int, int], ...]
    add_special_tokens: bool = True

    def target_text(self) -> list[str]:
        """The answer strings, as the spans cut them from :attr:`text`."""
        return [self.text[a:b] for a, b in self.targets]


def conversation_pairs(turns: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Check that ``turns`` alternate human/gpt, starting with human, and pair them up.

    Args:
        turns: LLaVA conversation turns ``{"from": "human" | "gpt", "value": str}``
            (``"user"`` / ``"assistant"`` are accepted too).

    Returns:
        ``[(question, answer), ...]``.

    Raises:
        TemplateError: empty, odd length, wrong role order, or a non-string value.

    Example:
        >>> conversation_pairs([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}])
        [('Hi?', 'Hello.')]
    """
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns or len(turns) % 2:
        n = len(turns) if isinstance(turns, Sequence) else type(turns).__name__
        raise TemplateError(f"conversations has to be a non-empty list of human/gpt turn pairs, but got {n} turns")
    pairs = []
    for k, turn in enumerate(turns):
        expected = _HUMAN if k % 2 == 0 else _GPT
        role = turn.get("from") if isinstance(turn, Mapping) else None
        if role not in expected:
            raise TemplateError(f"turn {k} has to be from {expected[0]!r}, but got {role!r} (turns alternate human, gpt)")
        if not isinstance(turn.get("value"), str):
            raise TemplateError(f"turn {k} has to have a string 'value', but got {type(turn.get('value')).__name__}")
    for k in range(0, len(turns), 2):
        pairs.append((turns[k]["value"], turns[k + 1]["value"]))
    return pairs


class Template:
    """Base class: ``render(turns, tokenizer) -> Rendered``.

    Attributes:
        name: the registry name.
    """

    name: str = ""

    def render(self, turns: Sequence[Mapping[str, Any]], tokenizer: Any, image_token: str = "<image>") -> Rendered:
        """Render ``turns`` (LLaVA format) to a :class:`Rendered` for ``tokenizer``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _Builder:
    """Collects text pieces and the spans of those marked as targets."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.targets: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, target: bool = False) -> None:
        if target:
            self.targets.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def build(self, add_special_tokens: bool = True) -> Rendered:
        return Rendered("".join(self.parts), tuple(self.targets), add_special_tokens)


class PlainTemplate(Template):
    """LLaVA's ``plain`` (stage-1 pretraining): ``<image>answer\\n``; the question is dropped."""

    name = "plain"

    def render(self, turns: Sequence[Mapping[str, Any]], tokenizer: Any, image_token: str = "<image>") -> Rendered:
        pairs = conversation_pairs(turns)
        if len(pairs) != 1:
            raise TemplateError(f"template 'plain' takes one question and one answer, but got {len(pairs)} turn pairs")
        if image_token not in pairs[0][0]:
            raise TemplateError(f"template 'plain' needs an image ({image_token!r} in the question); text-only samples "
                                "belong to a stage-2 template such as 'vicuna_v1'")
        out = _Builder()
        out.add(image_token)
        out.add(pairs[0][1] + "\n", target=True)
        return out.build()


@dataclass(frozen=True, repr=False)
class VicunaV1Template(Template):
    """LLaVA's ``vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>``.

    Args:
        system: the system prompt (LLaVA's by default).
    """

    system: str = VICUNA_SYSTEM
    name = "vicuna_v1"

    def render(self, turns: Sequence[Mapping[str, Any]], tokenizer: Any, image_token: str = "<image>") -> Rendered:
        pairs = conversation_pairs(turns)
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise TemplateError("template 'vicuna_v1' ends each answer with the tokenizer's eos_token, but the "
                                "tokenizer has none; set tokenizer.eos_token ('</s>' for Vicuna / LLaMA-2)")
        out = _Builder()
        out.add(self.system + " ")
        for question, answer in pairs:
            out.add(f"USER: {question} ASSISTANT: ")
            out.add(answer + eos, target=True)
        return out.build()


class ChatTemplate(Template):
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

    name = "chat_template"

    def render(self, turns: Sequence[Mapping[str, Any]], tokenizer: Any, image_token: str = "<image>") -> Rendered:
        pairs = conversation_pairs(turns)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'chat_template' needs a tokenizer with a chat_template, but "
                                f"{type(tokenizer).__name__} has none; use 'vicuna_v1' or set tokenizer.chat_template")
        messages: list[dict[str, str]] = []
        targets, done = [], ""
        for question, answer in pairs:
            messages.append({"role": "user", "content": question})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": answer})
            full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise TemplateError(
                    f"the chat template of {type(tokenizer).__name__} is not prefix-stable (rendering turn "
                    f"{len(messages) // 2} rewrites earlier text), so answer spans cannot be found; use 'vicuna_v1'"
                )
            targets.append((len(prompt), len(full)))
            done = full
        return Rendered(done, tuple(targets), add_special_tokens=False)


TEMPLATES: dict[str, Template] = {
    t.name: t for t in (PlainTemplate(), VicunaV1Template(), ChatTemplate())
}


def get_template(name: str | Template) -> Template:
    """Look up a template by name (a :class:`Template` instance is returned as is).

    Args:
        name: one of ``TEMPLATES`` (``plain``, ``vicuna_v1``, ``chat_template``) or a template.

    Returns:
        The template.

    Raises:
        UnknownNameError: no template of that name; the message lists the known names.

    Example:
        >>> get_template("vicuna_v1").name
        'vicuna_v1'
    """
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        close = difflib.get_close_matches(str(name), list(TEMPLATES), n=3, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown template {name!r}; known templates: {sorted(TEMPLATES)}{hint}")
    return TEMPLATES[name]
