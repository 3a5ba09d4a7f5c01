"""The ``mixres`` console script: ``mixres list | describe | convert | chat | bench | plan | eval | explain``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import registry
from .errors import MixresError

__all__ = ["main"]


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def cmd_list(args: argparse.Namespace) -> int:
    """Print every registry (or one kind) as a table: kind, name, class or preset target."""
    _import_all()
    rows = []
    for kind, reg in sorted(registry.REGISTRIES.items()):
        if args.kind and kind != args.kind:
            continue
        for name in reg.list(args.pattern):
            if reg.is_preset(name):
                target = f"preset of {reg.get_preset(name)['name']}"
            else:
                cls = reg.get_class(name)
                target = f"{cls.__module__}.{cls.__qualname__}"
            rows.append((kind, name, target))
    print(_table(rows, ("kind", "name", "what")))
    return 0


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def cmd_describe(args: argparse.Namespace) -> int:
    """Build an encoder preset with random weights; print parameters per part, tokens, config."""
    import json

    import mixres

    _import_all()
    encoder = mixres.create_encoder(args.name)
    size = tuple(args.image_size) if args.image_size else encoder.image_size
    rows = [(part, f"{_count(getattr(encoder, part, None)):,}") for part in ("token_pathway", "map_pathway", "adapters", "final_fusion")]
    rows.append(("total", f"{_count(encoder):,}"))
    print(f"encoder {args.name!r}: input {size[0]}x{size[1]}, ViT reads {encoder.vit_size(size)}, "
          f"grid {encoder.grid_for(size)}, {encoder.num_tokens(size)} tokens of width {encoder.out_dim}")
    print(_table(rows, ("part", "parameters")))
    if args.config:
        print(json.dumps(encoder.config, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an official LLaVA-HR checkpoint's vision part + projector to mixres safetensors.

    Exit status: 0 written; 1 keys missing / unexpected (nothing written); 2 bad input (one
    line on stderr, nothing written).
    """
    import warnings

    from mixres.convert import convert_checkpoint
    from mixres.errors import MixresError

    _import_all()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = convert_checkpoint(args.src, args.dst, preset=args.preset, llm_dim=args.llm_dim,
                                        dtype=args.dtype, allow_missing=args.allow_missing, overwrite=args.overwrite)
    except MixresError as err:
        first, _, rest = str(err).partition("\n")
        if rest:  # an incomplete conversion: the report, then the one-line verdict
            print(rest)
            print(f"mixres convert: {first}", file=sys.stderr)
            return 1
        print(f"mixres convert: {first}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(report.summary())
    print(f"wrote {args.dst}/model.safetensors and mixres_config.json")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Answer a prompt about an image with an MRA model directory (needs the ``hf`` extra)."""
    from mixres.integrations.hf.chat import main as chat_main

    return chat_main(args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark script from ``benchmarks/`` (a source checkout): cost, speed or gpu."""
    import importlib

    try:
        module = importlib.import_module(f"benchmarks.{args.which}")
    except ModuleNotFoundError as err:
        print(f"benchmarks.{args.which} is not importable ({err}); run from a source checkout of mixres", file=sys.stderr)
        return 2
    return int(module.main(args.rest) or 0)


def _import_all() -> None:
    """Import the modules whose import registers entries (cheap: no heavy backbones)."""
    import importlib

    import mixres  # noqa: F401

    for mod in ("mixres.encoders", "mixres.presets"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def _tool(name: str):
    """The module of a tool command (``mixres.plan``, ``mixres.evaluate``, ``mixres.explain_cli``)."""
    import importlib

    return importlib.import_module(f"mixres.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mixres`` command."""
    parser = argparse.ArgumentParser(
        prog="mixres",
        description="Resolution adapters for multimodal LLMs.",
        epilog="--debug (before the subcommand's arguments): show the traceback of an error",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered fusions, projectors, pathways and encoders")
    p.add_argument("kind", nargs="?", choices=sorted(registry.REGISTRIES), help="only this kind")
    p.add_argument("--pattern", default="*", help="fnmatch pattern, e.g. 'mr*'")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("describe", help="parameters per part, tokens and config of an encoder preset")
    p.add_argument("name", help="encoder preset, e.g. llava-hr-7b-1024")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the preset's)")
    p.add_argument("--config", action="store_true", help="also print the JSON config")
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("convert", help="convert an official checkpoint: mixres convert llava-hr SRC DST")
    p.add_argument("format", choices=["llava-hr"], help="the checkpoint's origin")
    p.add_argument("src", help="official checkpoint directory (config.json + weight shards) or weight file (local)")
    p.add_argument("dst", help="output directory (must not exist, or be empty; see --overwrite)")
    p.add_argument("--preset", default=None,
                   help="encoder preset name or a JSON encoder config file (default: from SRC/config.json)")
    p.add_argument("--llm-dim", type=int, default=None,
                   help="the LLM width the projector maps to (default: read from the checkpoint; a check if given)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the written weights (default: the checkpoint's own)")
    p.add_argument("--allow-missing", action="store_true",
                   help="write even if keys are missing/unexpected (they keep their init; listed in a warning)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at DST")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("chat", help="chat about an image: mixres chat --model DIR --image IMG --prompt TEXT", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("plan", help="tokens, FLOPs, params and KV cache of every encoder for a budget")
    _tool("plan").build_parser(p).set_defaults(func=lambda a: _tool("plan").run(a))
    p = sub.add_parser("eval", help="score a trained model on a local question file (vqa, exact, anls)")
    _tool("evaluate").build_parser(p).set_defaults(func=lambda a: _tool("evaluate").run(a))
    p = sub.add_parser("explain", help="PNG of where the high-res pathway changed the tokens of an image")
    _tool("explain_cli").build_parser(p).set_defaults(func=lambda a: _tool("explain_cli").run(a))
    p = sub.add_parser("bench", help="run a benchmark: mixres bench cost|speed|gpu [args]")
    p.add_argument("which", choices=["cost", "speed", "gpu"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


# errors that come from what the user typed or pointed at (not from a bug in mixres)
_USER_ERRORS = (MixresError, OSError, ImportError)


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from the mixres-level arguments (before a subcommand's REMAINDER)."""
    head = argv[:2] if argv[:1] in (["chat"], ["bench"]) else argv
    if "--debug" not in head:
        return argv, False
    cut = head.index("--debug")
    return argv[:cut] + argv[cut + 1 :], True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code.

    A user error (a :class:`~mixres.errors.MixresError`, a file that cannot be read or written,
    a missing optional package) prints one line, ``mixres: error: ...``, on stderr and returns
    2, as argparse does for bad arguments; an unexpected exception prints one line and returns
    1. ``--debug`` (anywhere before a ``chat`` / ``bench`` subcommand's own arguments, or
    among them for ``chat``) re-raises instead, for the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, debug = _pop_debug(argv)
    if argv[:1] == ["chat"]:  # forwarded whole: argparse's REMAINDER drops leading --flags
        from mixres.integrations.hf.chat import main as chat_main

        return chat_main(argv[1:] + (["--debug"] if debug else []))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("mixres: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        return _report(err)


def _report(err: Exception) -> int:
    """Print one line for ``err``; 2 for a user error, 1 for an internal one."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, _USER_ERRORS):
        print(f"mixres: error: {text}", file=sys.stderr)
        return 2
    print(f"mixres: internal error ({type(err).__name__}: {text}); rerun with --debug for the traceback "
          "and report it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
