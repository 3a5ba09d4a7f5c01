"""The ``mixres`` console script: ``mixres list | describe | convert | demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import registry

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


def _import_all() -> None:
    """Import the modules whose import registers entries (cheap: no heavy backbones)."""
    import mixres  # noqa: F401
    import importlib

    for mod in ("mixres.encoders", "mixres.presets"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mixres`` command."""
    parser = argparse.ArgumentParser(prog="mixres", description="Resolution adapters for multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered fusions, projectors, pathways and encoders")
    p.add_argument("kind", nargs="?", choices=sorted(registry.REGISTRIES), help="only this kind")
    p.add_argument("--pattern", default="*", help="fnmatch pattern, e.g. 'mr*'")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
