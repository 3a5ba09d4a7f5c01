"""The data side of the LLaVA-HR training recipe (``mixres.integrations.llava``).

- :mod:`.synthetic`: a fine-detail VQA dataset drawn from a seed (the recipe's default data).
- :mod:`.templates`: conversation templates ``plain``, ``vicuna_v1``, ``chat_template``.
- :mod:`.data`: :class:`LlavaDataset` over LLaVA JSON + images; :mod:`.collator`: :class:`LlavaCollator`;
  :mod:`.preprocess`: :class:`ImagePreprocessor`.

Needs Pillow (``pip install 'mixres[hf]'``); a tokenizer is passed in, so transformers is not
imported here.
"""

from mixres.images import expand2square

from .collator import IGNORE_INDEX, LlavaCollator
from .data import LlavaDataError, LlavaDataset, tokenize_conversation
from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocessor
from .synthetic import ANSWERS, SyntheticExample, SyntheticPaths, exact_match, generate_dataset, make_example
from .templates import (
    TEMPLATES,
    VICUNA_SYSTEM,
    ChatTemplate,
    PlainTemplate,
    Rendered,
    Template,
    TemplateError,
    VicunaV1Template,
    conversation_pairs,
    get_template,
)

__all__ = [
    "generate_dataset",
    "make_example",
    "exact_match",
    "SyntheticExample",
    "SyntheticPaths",
    "ANSWERS",
    "TEMPLATES",
    "get_template",
    "Template",
    "PlainTemplate",
    "VicunaV1Template",
    "ChatTemplate",
    "Rendered",
    "TemplateError",
    "VICUNA_SYSTEM",
    "conversation_pairs",
    "LlavaDataset",
    "LlavaCollator",
    "LlavaDataError",
    "ImagePreprocessor",
    "expand2square",
    "tokenize_conversation",
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
]
