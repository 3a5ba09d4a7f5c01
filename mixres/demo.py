"""The main job on an embedded default: ``python -m mixres.demo`` (``make demo``).

Shows LLaVA-HR's point on CPU with nothing downloaded: three tiny LLaVA models (low-res ViT,
MRA, and a ViT at 4x the tokens) are trained from scratch with one recipe on a task whose 3-4 px
details vanish at the low-res view, and the held-out accuracy, visual tokens and train time are
printed, with a plot and a sample image overlaid with the MR-Adapters' contribution. The recipe
lives in :mod:`mixres.integrations.llava.demo` (it needs the ``hf`` extra, imported here only
when the demo runs).
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
