"""``mixres chat``: one answer from a local (mrified) HF model, an image and a prompt.

    mixres chat --model DIR --image cat.jpg --prompt "What is on the left?"

``DIR`` is a ``save_pretrained`` directory (model + processor). Without ``<image>`` in the
prompt, the processor's chat template places the images when it has one; otherwise one
``<image>`` per image is put before the prompt. Errors (a missing directory or image, an
unsupported image) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixres.errors import MixresError

__all__ = ["build_parser", "main", "format_prompt", "open_image"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser(prog: str = "mixres chat") -> argparse.ArgumentParser:
    """The argument parser of ``mixres chat``."""
    parser = argparse.ArgumentParser(prog=prog, description="Answer a prompt about images with a local HF MLLM.")
    parser.add_argument("--model", required=True, help="a local save_pretrained directory (model + processor)")
    parser.add_argument("--image", required=True, action="append", help="an image file; repeat for several")
    parser.add_argument("--prompt", required=True, help="the question; '<image>' marks where images go (optional)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    parser.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype (default: as saved)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse nonsensical numbers before any model is loaded."""
    if args.max_new_tokens <= 0:
        raise MixresError(f"--max-new-tokens has to be > 0, but got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise MixresError(f"--temperature has to be a finite number >= 0, but got {args.temperature}")


def open_image(path: str | Path) -> Any:
    """Open an image file with PIL.

    Raises:
        ImageInputError: the file does not exist, is not an image PIL can read, or is larger
            than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    from PIL import Image, UnidentifiedImageError

    from .errors import ImageInputError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ImageInputError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(file) as image:
            image.load()
            return image
    except Image.DecompressionBombError as err:  # not an OSError: PIL's guard against huge images
        raise ImageInputError(f"{str(path)!r} is refused as a decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"{str(path)!r} is not an image PIL can read ({err})") from None


def format_prompt(processor: Any, prompt: str, num_images: int) -> str:
    """``prompt`` with the images placed: as is if it holds ``<image>``, else by the chat template, else prefixed."""
    token = processor.image_token
    if token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"{token} " * num_images + prompt


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mixres chat`` with ``argv`` (default: ``sys.argv[1:]``); print the answer; return the exit status.

    A user error (bad arguments, a missing or unreadable image or model directory) prints one
    line on stderr and returns 2; an unexpected error prints one line and returns 1. With
    ``--debug`` the exception propagates (traceback).
    """
    args = build_parser().parse_args(argv)
    try:
        answer = _run(args)
    except Exception as err:
        if args.debug:
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, (MixresError, OSError, ImportError)):
            print(f"mixres chat: error: {text}", file=sys.stderr)
            return 2
        print(f"mixres chat: internal error ({type(err).__name__}: {text}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1
    print(answer)
    return 0


def _run(args: argparse.Namespace) -> str:
    _check_args(args)
    import torch

    from .inference import generate, load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise MixresError(f"--device {device!r} is not a torch device ({err})") from None
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    images = [open_image(p) for p in args.image]
    model, processor = load_pretrained(args.model, dtype=dtype, device=device)
    prompt = format_prompt(processor, args.prompt, len(images))
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    return generate(model, processor, images, [prompt], max_new_tokens=args.max_new_tokens, **sampling)[0]


if __name__ == "__main__":
    raise SystemExit(main())
