"""Inference: load a (mrified) model from a local directory and generate from images + prompts.

:func:`generate` batches images of any sizes and aspect ratios: each image is checked and
converted to RGB (:func:`~mixres.integrations.hf.images.check_image`), padded to a square with
the image processor's mean colour for LLaVA-1.5 (as LLaVA-1.5 and LLaVA-HR train; PaliGemma
stretches and LLaVA-NeXT's AnyRes keeps the aspect ratio itself, as their processors do), then the model's own processor resizes, normalises and
expands each ``<image>`` into the model's image-token count. Prompts are left-padded so the
new tokens line up; only the new tokens are decoded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mixres.errors import MixresError

from .errors import ImageInputError, ModelPathError, PromptError
from .families import find_family
from .images import OPENAI_CLIP_MEAN, check_image, pad_to_square

__all__ = ["generate", "load_pretrained", "check_prompts"]


def check_prompts(prompts: Sequence[str], num_images: int, image_token: str) -> None:
    """Check that the prompts hold exactly one ``image_token`` per image, in total.

    Raises:
        PromptError: prompts are not a list of str, or the counts differ.

    Example:
        >>> check_prompts(["<image> what is this ?", "<image> <image> compare"], 3, "<image>")
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise PromptError(f"prompts has to be a list of str, but got {type(prompts).__name__}")
    counts = [p.count(image_token) for p in prompts]
    if sum(counts) != num_images:
        raise PromptError(
            f"the prompts hold {sum(counts)} {image_token!r} token(s) (per prompt: {counts}) but {num_images} image(s) "
            f"were given; put one {image_token!r} where each image goes, e.g. 'USER: {image_token}\\nWhat is shown? ASSISTANT:'"
        )


def _pad_fill(processor: Any) -> Sequence[float]:
    return getattr(processor.image_processor, "image_mean", None) or OPENAI_CLIP_MEAN


def generate(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    pad_to_square: bool | None = None,
    max_new_tokens: int = 64,
    **gen_kwargs: Any,
) -> list[str]:
    """Generate one answer per prompt, in one batch.

    Args:
        model: a supported HF MLLM (mrified or not).
        processor: its processor (as :func:`~mixres.integrations.hf.mrify` returned it).
        images: PIL images (or uint8 arrays), any size, in the order of the ``<image>`` tokens.
        prompts: one str per answer, each holding its images' ``<image>`` tokens.
        pad_to_square: pad with the mean colour first; ``None``: the family's default (yes for
            LLaVA-1.5, no for PaliGemma and AnyRes).
        max_new_tokens: the longest answer.
        **gen_kwargs: passed to ``model.generate`` (greedy unless ``do_sample=True``).

    Returns:
        The decoded new tokens of each prompt, special tokens skipped.

    Raises:
        ImageInputError: no images (or not a list), or an image that is too small / of an
            unsupported mode.
        PromptError: the ``<image>`` tokens do not match the images.
        MixresError: ``max_new_tokens`` is not an int > 0.
    """
    if not isinstance(images, (list, tuple)):
        raise ImageInputError(f"images has to be a list of PIL images, but got {type(images).__name__}; "
                              "wrap a single image as [image]")
    if not images:
        raise ImageInputError("images is empty; pass at least one PIL image")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise MixresError(f"max_new_tokens has to be an int > 0, but got {max_new_tokens!r}")
    check_prompts(prompts, len(images), processor.image_token)
    family = find_family(model)
    checked = [check_image(image, i) for i, image in enumerate(images)]
    if family.square_pad if pad_to_square is None else pad_to_square:
        checked = [_pad_to_square(image, _pad_fill(processor)) for image in checked]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        images_arg = _per_prompt(checked, prompts, processor.image_token) if family.nested_images else checked
        inputs = processor(images=images_arg, text=list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    inputs.pop("labels", None)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    gen_kwargs.setdefault("do_sample", False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **gen_kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]


def _model_class(directory: Path) -> type:
    """transformers' Auto class, or ours for a Llava whose tower names a mixres projector."""
    from transformers import AutoConfig

    from .projector import MixresLlavaForConditionalGeneration, llava_class_for

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if config.model_type == "llava" and llava_class_for(config) is MixresLlavaForConditionalGeneration:
        return MixresLlavaForConditionalGeneration
    return AutoModelForImageTextToText


_pad_to_square = pad_to_square  # the argument of generate shadows the function


def _per_prompt(images: list[Any], prompts: Sequence[str], image_token: str) -> list[list[Any]]:
    """The images as one list per prompt, in order (Gemma 3 / Idefics3 processors take them so)."""
    it = iter(images)
    return [[next(it) for _ in range(prompt.count(image_token))] for prompt in prompts]


def load_pretrained(path: str | Path, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, backend: str | None = None) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, processor)`` from a local ``save_pretrained`` directory (nothing is downloaded).

    Args:
        path: the directory (``config.json``, ``model.safetensors``, processor files).
        dtype: e.g. ``torch.bfloat16``; ``None``: as saved.
        device: where to put the model.
        backend: the image processor's backend (``"pil"`` / ``"torchvision"``); ``None``: the
            one the mixres tower's config names (``image_backend``: ``"pil"`` for converted
            LLaVA-HR checkpoints, which reproduces the release's preprocessing), else
            transformers' default.

    Raises:
        ModelPathError: the directory does not exist, holds no valid ``config.json``, or
            transformers cannot load a model and processor from it.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelPathError(
            f"model directory {str(path)!r} does not exist; pass a local directory written by save_pretrained "
            "(mixres never downloads: fetch hub models yourself, e.g. `huggingface-cli download <repo> --local-dir DIR`)"
        )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelPathError(f"{str(path)!r} holds no config.json; is it a save_pretrained directory?")
    try:
        json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelPathError(f"{str(config_file)!r} is not valid JSON ({err})") from None
    try:
        model = _model_class(directory).from_pretrained(directory, local_files_only=True, dtype=dtype)
        backend = backend or getattr(getattr(model.config, "vision_config", None), "image_backend", None)
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True, **({"backend": backend} if backend else {}))
    except (OSError, ValueError, KeyError) as err:  # transformers' errors for a directory it cannot load
        if isinstance(err, MixresError):
            raise
        raise ModelPathError(f"{str(path)!r} could not be loaded as a model + processor "
                             f"({type(err).__name__}: {' '.join(str(err).split())})") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), processor
