"""LLaVA training data: a ``Dataset`` over LLaVA JSON + an image folder.

Follows LLaVA's ``LazySupervisedDataset`` / ``DataCollatorForSupervisedDataset``
(``llava/train/train.py``) with three changes, all for clear failures:

- **Masking by character spans.** The template (``templates.py``) says where the answers are in
  the rendered text; the text is tokenised once with offsets and a token is a label iff it
  overlaps an answer span. Labels are ``-100`` everywhere else (system prompt, questions, role
  names, image tokens, padding); answers keep their end-of-turn token.
- **Image tokens expanded in the data.** The single ``<image>`` placeholder becomes
  ``num_image_tokens`` copies of the image token id (the encoder's ``num_tokens``), so
  ``input_ids`` already has the length the LLM sees (HF ``LlavaForConditionalGeneration``
  convention). As LLaVA does, the placeholder is moved to the front of its turn (``<image>\\n``).
- **Nothing silently truncated.** Every sample is checked when the dataset is built: structure,
  image/placeholder agreement, image file present, template fit, length ``<= max_length``. A bad
  sample raises :class:`LlavaDataError` naming its id, or with ``on_error="skip"`` is logged,
  counted in ``skipped`` and left out. A corrupt image is only found when loaded: it raises, or
  is counted and replaced by the next sample.

Batches: :class:`~.collator.LlavaCollator` (re-exported here), images:
:class:`~.preprocess.ImagePreprocessor`. For length-grouped sampling use
:attr:`LlavaDataset.lengths` or :attr:`LlavaDataset.modality_lengths` (negative for text-only,
LLaVA's ``group_by_modality_length``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from mixres.errors import MixresError
from mixres.images import to_rgb
from mixres.utils import check_choice, check_positive_int, lazy_import

from .collator import IGNORE_INDEX
from .preprocess import ImagePreprocessor
from .templates import Rendered, Template, TemplateError, get_template

Image = lazy_import("PIL.Image")

__all__ = [
    "LlavaDataError",
    "tokenize_conversation",
    "LlavaDataset",
]

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
ON_ERROR = ("raise", "skip")


class LlavaDataError(MixresError):
    """A training sample is malformed: the message names the sample id and what was wrong."""


class _UnreadableImage(Exception):
    """Raised inside the dataset when an image cannot be decoded; turned into LlavaDataError."""


# ---------------------------------------------------------------------------------------------
# text


def _image_token_id(tokenizer: Any, image_token: str) -> int:
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise MixresError(
            f"the tokenizer has to encode {image_token!r} as one token, but it gives {ids}; add it with "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) and resize the "
            "LLM's embeddings"
        )
    return ids[0]


def _labels(offsets: Sequence[tuple[int, int]], ids: Sequence[int], targets: Sequence[tuple[int, int]]) -> list[int]:
    """A token is a label iff its (non-empty) character span overlaps an answer span."""
    return [
        i if e > s and any(s < b and e > a for a, b in targets) else IGNORE_INDEX
        for i, (s, e) in zip(ids, offsets)
    ]


def tokenize_conversation(
    rendered: Rendered, tokenizer: Any, *, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Tokenise a rendered conversation; mask all but the answers; expand the image token.

    Args:
        rendered: a template's output (text + answer spans).
        tokenizer: a fast HF tokenizer (it has to return offsets).
        image_token_id: id of the image placeholder token.
        num_image_tokens: copies of ``image_token_id`` that replace each placeholder.

    Returns:
        ``(input_ids, labels)`` of equal length; labels are ``IGNORE_INDEX`` except on answers.
    """
    enc = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    labels = _labels(enc["offset_mapping"], enc["input_ids"], rendered.targets)
    input_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(enc["input_ids"], labels):
        n = num_image_tokens if token == image_token_id else 1
        input_ids += [token] * n
        out_labels += [IGNORE_INDEX if token == image_token_id else label] * n
    return input_ids, out_labels


def _image_first(turns: list[dict[str, Any]], image_token: str) -> list[dict[str, Any]]:
    """Move the placeholder to the front of its turn, ``<image>\\n...`` (LLaVA's preprocess_multimodal)."""
    return [
        dict(t, value=image_token + "\n" + t["value"].replace(image_token, "").strip())
        if isinstance(t, Mapping) and isinstance(t.get("value"), str) and image_token in t["value"] else t
        for t in turns
    ]


# ---------------------------------------------------------------------------------------------
# dataset


class LlavaDataset(Dataset):
    """LLaVA-format conversations + images, tokenised for supervised fine-tuning.

    Each item is ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values":
    FloatTensor[3, S, S] (image samples only), "has_image": bool, "id": str}``.

    Args:
        data: path to a LLaVA JSON file (a list of ``{"id", "image"?, "conversations"}``), or
            that list itself.
        tokenizer: a fast HF tokenizer holding ``image_token`` as one token.
        num_image_tokens: tokens the encoder hands the LLM per image (``encoder.num_tokens(size)``).
        image_folder: where ``"image"`` paths are relative to; default the JSON file's folder
            (the working directory for an in-memory list).
        template: a name in ``TEMPLATES`` (``plain``, ``vicuna_v1``, ``chat_template``) or a
            :class:`Template`.
        image_processor: turns PIL images into tensors; default ``ImagePreprocessor()`` (336 px,
            CLIP mean/std, pad to square).
        max_length: longest sample in tokens, image tokens included; longer ones are errors.
        on_error: ``"raise"`` on a bad sample, or ``"skip"``: log it, count it in
            :attr:`skipped` (ids in :attr:`skipped_ids`) and leave it out.
        image_token: the placeholder in the text.
        allow_outside_image_folder: accept ``"image"`` paths that leave ``image_folder``
            (absolute paths, ``../``). Off by default: a dataset file is untrusted input, and
            its paths are checked lexically (symlinks you placed inside the folder are followed).

    Raises:
        LlavaDataError: a bad sample (with ``on_error="raise"``); the message names its id and
            the file. Also a data file that is not valid JSON / UTF-8 or holds no list.
        UnknownNameError: unknown template name.
        MixresError: a bad argument, or a tokenizer without the image token.
        TypeError: a tokenizer that cannot return offsets (not a fast tokenizer).
    """

    def __init__(
        self,
        data: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
        tokenizer: Any,
        *,
        num_image_tokens: int,
        image_folder: str | os.PathLike[str] | None = None,
        template: str | Template = "vicuna_v1",
        image_processor: ImagePreprocessor | None = None,
        max_length: int = 2048,
        on_error: OnError = "raise",
        image_token: str = "<image>",
        allow_outside_image_folder: bool = False,
    ) -> None:
        check_positive_int("num_image_tokens", num_image_tokens)
        check_positive_int("max_length", max_length)
        check_choice("on_error", on_error, ON_ERROR)
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"tokenizer has to be a fast HF tokenizer (it must return offsets), "
                            f"but got {type(tokenizer).__name__}")
        self.template = get_template(template)
        self.tokenizer, self.num_image_tokens, self.max_length = tokenizer, num_image_tokens, max_length
        self.on_error, self.image_token = on_error, image_token
        self.image_token_id = _image_token_id(tokenizer, image_token)
        self.image_processor = image_processor or ImagePreprocessor()
        records, source = _load_records(data)
        self.source = Path(data) if isinstance(data, (str, os.PathLike)) else None
        self.image_folder = Path(image_folder) if image_folder is not None else source
        self.allow_outside_image_folder = bool(allow_outside_image_folder)
        self.skipped = 0
        self.skipped_ids: list[str] = []
        self._records: list[dict[str, Any]] = []
        self._lengths: list[int] = []
        self._broken: set[int] = set()
        for index, record in enumerate(records):
            self._add(index, record)

    # -- building -------------------------------------------------------------------------------

    def _fail(self, sample_id: str, message: str) -> None:
        if self.on_error == "raise":
            where = f" (in {str(self.source)!r})" if self.source is not None else ""
            raise LlavaDataError(f"sample {sample_id!r}: {message}{where}")
        logger.warning("skipping sample %r: %s", sample_id, message)
        self.skipped += 1
        self.skipped_ids.append(sample_id)

    def _add(self, index: int, record: Any) -> None:
        sample_id = str(record.get("id", f"#{index}")) if isinstance(record, Mapping) else f"#{index}"
        try:
            record = self._check(record)
            rendered = self._render(record)
        except (LlavaDataError, TemplateError) as err:
            return self._fail(sample_id, str(err))
        length = self._length(rendered)
        if isinstance(length, str):
            return self._fail(sample_id, length)
        self._records.append(record)
        self._lengths.append(length)

    def _length(self, rendered: Rendered) -> int | str:
        """The sample's token count with its images expanded, or why it is refused."""
        n_images = rendered.text.count(self.image_token)
        length = len(self.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"])
        length += n_images * (self.num_image_tokens - 1)
        if length > self.max_length:
            return (f"{length} tokens ({n_images * self.num_image_tokens} of them image tokens) exceed "
                    f"max_length={self.max_length}; raise max_length or drop the sample (samples are never truncated)")
        return length

    def _check(self, record: Any) -> dict[str, Any]:
        """Structure and image checks; returns the record with the placeholder moved first."""
        if not isinstance(record, Mapping) or not isinstance(record.get("conversations"), list):
            raise LlavaDataError(f"a sample has to be a dict with a 'conversations' list, but got {_brief(record)}")
        image = record.get("image")
        turns = record["conversations"]
        texts = [t.get("value") if isinstance(t, Mapping) else None for t in turns]
        in_answers = sum(self.image_token in v for v in texts[1::2] if isinstance(v, str))
        placeholders = sum(v.count(self.image_token) for v in texts if isinstance(v, str))
        if in_answers:
            raise LlavaDataError(f"{self.image_token!r} is in an answer; it may only be in a human turn")
        if image is None and placeholders:
            raise LlavaDataError(f"the text has {placeholders} {self.image_token!r} placeholder(s) but the sample "
                                 "has no 'image'; add the image or remove the placeholder")
        if image is not None:
            if not isinstance(image, str):
                raise LlavaDataError(f"'image' has to be one path (str), but got {_brief(image)}")
            if placeholders != 1:
                raise LlavaDataError(f"a sample with an image needs exactly one {self.image_token!r} placeholder in "
                                     f"its text, but has {placeholders}")
            if not self.image_path(image).is_file():
                raise LlavaDataError(f"image file {str(self.image_path(image))!r} not found")
        return dict(record, conversations=_image_first(list(turns), self.image_token))

    def image_path(self, image: str) -> Path:
        """Where the record's ``"image"`` path points, checked to stay inside :attr:`image_folder`.

        Raises:
            LlavaDataError: an empty path, a NUL byte, or (unless ``allow_outside_image_folder``)
                a path that leaves the folder (absolute, or ``..`` above it).
        """
        if not image or "\0" in image:
            raise LlavaDataError(f"'image' has to be a non-empty file path without NUL bytes, but got {image!r}")
        path = self.image_folder / image
        if not self.allow_outside_image_folder:
            folder = os.path.normpath(os.path.abspath(self.image_folder))
            target = os.path.normpath(os.path.abspath(path))
            if os.path.commonpath([folder, target]) != folder:
                raise LlavaDataError(
                    f"image path {image!r} leaves image_folder {str(self.image_folder)!r} (it points to {target!r}); "
                    "keep dataset images inside the folder, or pass allow_outside_image_folder=True if you trust the file"
                )
        return path

    def _render(self, record: Mapping[str, Any]) -> Rendered:
        try:
            return self.template.render(record["conversations"], self.tokenizer, self.image_token)
        except TemplateError as err:
            raise LlavaDataError(f"template {self.template.name!r}: {err}") from None

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    @property
    def lengths(self) -> list[int]:
        """Token count of each sample, image tokens included (for ``LengthGroupedSampler``)."""
        return list(self._lengths)

    @property
    def modality_lengths(self) -> list[int]:
        """As :attr:`lengths`, negative for text-only samples (LLaVA's ``group_by_modality_length``)."""
        return [n if "image" in r and r["image"] is not None else -n for n, r in zip(self._lengths, self._records)]

    def record(self, index: int) -> dict[str, Any]:
        """The (checked) JSON record of sample ``index``."""
        return self._records[index]

    def render(self, index: int) -> Rendered:
        """The templated text of sample ``index`` and its answer spans (for inspection)."""
        return self._render(self._records[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} samples")
        for step in range(len(self)):
            i = (index + step) % len(self)
            if i in self._broken:
                continue
            try:
                return self._item(i)
            except _UnreadableImage as err:
                self._fail(self._id(i), str(err))  # raises unless on_error="skip"
                self._broken.add(i)
        raise LlavaDataError(f"no sample of the dataset can be loaded ({self.skipped} skipped)")

    def _id(self, i: int) -> str:
        return str(self._records[i].get("id", f"#{i}"))

    def _item(self, i: int) -> dict[str, Any]:
        record = self._records[i]
        ids, labels = tokenize_conversation(self._render(record), self.tokenizer,
                                            image_token_id=self.image_token_id, num_image_tokens=self.num_image_tokens)
        item: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                                "has_image": record.get("image") is not None, "id": self._id(i)}
        if item["has_image"]:
            item["pixel_values"] = self._load_image(self.image_path(record["image"]))
        return item

    def _load_image(self, path: Path) -> torch.Tensor:
        # a bad file is a bad sample: decode errors, PIL's decompression-bomb guard (not an
        # OSError) and a mode with no agreed RGB conversion all become _UnreadableImage
        try:
            with Image.open(path) as image:
                image.load()  # decode now, while the file is open (to_rgb may return it as is)
                image = to_rgb(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _UnreadableImage(f"image file {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None
        return self.image_processor(image)

    def __repr__(self) -> str:
        return (f"LlavaDataset(samples={len(self)}, skipped={self.skipped}, template={self.template.name!r}, "
                f"num_image_tokens={self.num_image_tokens}, image_size={self.image_processor.size}, "
                f"max_length={self.max_length})")


def _load_records(data: Any) -> tuple[list[Any], Path]:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise MixresError(f"data has to be a LLaVA JSON file or a list of samples, but {str(path)!r} is no file")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise LlavaDataError(f"{str(path)!r} is not UTF-8 text ({err})") from None
        except json.JSONDecodeError as err:
            raise LlavaDataError(f"{str(path)!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        source, where = path.parent, f"{str(path)!r}"
    else:
        records, source, where = data, Path.cwd(), "data"
    if not isinstance(records, list):
        raise LlavaDataError(f"{where} has to hold a list of samples, but holds a {type(records).__name__}")
    return records, source


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
