"""The main job on an embedded default: ``python -m mixres.demo`` (``make demo``).

Runs LLaVA-HR's two-stage training recipe end to end on CPU with nothing downloaded: it draws
the seeded fine-detail dataset, trains the tiny LLaVA-HR and the same recipe with the low-res
pathway only, and prints held-out accuracy before and after each stage, a sample answer and the
wall time. The recipe lives in :mod:`mixres.integrations.llava.demo` (it needs the ``hf``
extra, imported here only when the demo runs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo (arguments as ``python -m mixres.integrations.llava.demo --help``)."""
    from mixres.integrations.llava.demo import main as recipe_demo

    return recipe_demo(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
