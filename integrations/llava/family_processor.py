"""What the family recipe does to a family's processor: its chat template, tokens and vocabulary.

The chat templates are written from each family's own format (used when a processor carries
none, as the tiny ones do); :func:`prepare_processor` sets one, adds the tokens it writes, makes a
word-level tokenizer lossless over the data and grows the LLM's embeddings to fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .families import FamilyRecipe

__all__ = ["ONEVISION_TEMPLATE", "GEMMA3_TEMPLATE", "IDEFICS3_TEMPLATE", "SMOLVLM_TEMPLATE", "QWEN2_5_VL_TEMPLATE",
           "QWEN3_VL_TEMPLATE", "prepare_processor", "extend_word_level"]

# The chat templates, written from each family's own format (used when a processor carries none,
# as the tiny ones do). HF's chat-template renderer trims the newline after a block tag, so every
# newline is an expression. Content is a string, or a list of {"type": "image"} / {"type": "text"}.
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ IMAGE }}"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}")
#: LLaVA-OneVision (Qwen2's ChatML): ``<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n``
ONEVISION_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
                      + _CONTENT.replace("{{ IMAGE }}", "{{ '<image>\\n' }}")
                      + "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
#: Gemma 3: ``<bos><start_of_turn>user\n<start_of_image>Q<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n``
GEMMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                   "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
                   + _CONTENT.replace("{{ IMAGE }}", "{{ '<start_of_image>' }}")
                   + "{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
#: Idefics3: ``<|begin_of_text|>User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n``
IDEFICS3_TEMPLATE = ("{{ '<|begin_of_text|>' }}{% for message in messages %}{{ message['role'] | capitalize }}"
                     "{% if message['content'] is string or message['content'][0]['type'] != 'image' %}{{ ': ' }}"
                     "{% else %}{{ ':' }}{% endif %}" + _CONTENT.replace("{{ IMAGE }}", "{{ '<image>' }}")
                     + "{{ '<end_of_utterance>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
#: SmolVLM: as Idefics3, opened by ``<|im_start|>`` (transformers' ``DEFAULT_CHAT_TEMPLATE`` of SmolVLM)
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>")
#: Qwen3-VL (ChatML; no default system turn): ``<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n``
QWEN3_VL_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
                     + _CONTENT.replace("{{ IMAGE }}", "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}")
                     + "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
#: Qwen2.5-VL: as Qwen3-VL, opened by Qwen's default system turn when the first message is no system one:
#: ``<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n...``
QWEN2_5_VL_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
                       "{% endif %}" + QWEN3_VL_TEMPLATE)


def prepare_processor(model: Any, processor: Any, spec: FamilyRecipe,
                      conversations: Sequence[Sequence[Mapping[str, Any]]] = ()) -> None:
    """Make ``processor`` (and ``model``'s embeddings) ready for the recipe's data, in place.

    - no chat template: the family's (:attr:`FamilyRecipe.chat_template`) is set;
    - the template's tokens the tokenizer lacks are added as special tokens;
    - a word-level tokenizer (the tiny models') is made lossless (whitespace characters are
      tokens, decoding concatenates) and learns the words of ``conversations`` as rendered;
    - the LLM's embeddings grow to the tokenizer (new rows: transformers' mean-resizing);
    - generation stops at the end-of-turn token too.
    """
    from jinja2 import TemplateError as JinjaError

    from mixres.errors import MixresError

    from .family_data import render_conversation

    tokenizer = processor.tokenizer
    if not getattr(processor, "chat_template", None):
        processor.chat_template = spec.chat_template
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.template_tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if _is_word_level(tokenizer):
        texts = []
        for turns in conversations:
            try:
                texts.append(render_conversation(turns, processor).text)
            except (MixresError, JinjaError, TypeError, KeyError, AttributeError):
                continue  # a bad sample is the dataset's to report (with its id), not the vocabulary's
        extend_word_level(tokenizer, texts)
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        model.resize_token_embeddings(len(tokenizer))
    stop = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    model.generation_config.eos_token_id = sorted({*eos, stop})
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _is_word_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def extend_word_level(tokenizer: Any, texts: Sequence[str]) -> int:
    """Make a word-level tokenizer lossless over ``texts`` (in place); returns the words added.

    Pieces are whitespace characters, words (with inner hyphens) and single other characters;
    those of ``texts`` not in the vocabulary get new ids after the existing ones (every existing
    id is kept: the model's image-token ids stay valid). Decoding concatenates the pieces, so
    ``decode(encode(text)) == text``.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|[\w-]+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer.clean_up_tokenization_spaces = False
    vocab = backend.get_vocab(with_added_tokens=True)
    unk = vocab.get(tokenizer.unk_token)
    new: list[str] = [p for p in (" ", "\n", "\t") if p not in vocab]
    for text in texts:
        enc = backend.encode(text, add_special_tokens=False)
        new += [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk and text[a:b] != tokenizer.unk_token]
    new = list(dict.fromkeys(new))
    if new:
        start = max(vocab.values()) + 1
        vocab.update({w: start + k for k, w in enumerate(new)})
        backend.model = models.WordLevel(vocab, unk_token=tokenizer.unk_token)
    return len(new)
