"""Write docs/composition.md: every registered piece in every role, from the same checks the tests run.

    python scripts/composition_matrix.py      # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import composition as comp  # noqa: E402

import mixres  # noqa: E402


def _row(name: str, cells: list[tuple[str, str]]) -> str:
    shown = [f"{s} ({d})" if s == "pass" else f"{s}: {d}" for s, d in cells]
    return f"| `{name}` | " + " | ".join(shown) + " |"


def _safe(check, *args) -> tuple[str, str]:
    try:
        return comp.run_cell(check, *args)
    except Exception as err:  # noqa: BLE001 -- a failing cell is written as FAIL, and the docs test fails on it
        return "FAIL", f"{type(err).__name__}: {err}"[:200]


def main() -> None:
    logging.disable(logging.WARNING)
    tmp = Path(tempfile.mkdtemp())
    lines = [
        "# Composition matrix",
        "",
        "Every registered piece in every role, at tiny size, random weights, on the CPU. Each cell is a",
        "test in `tests/test_composition.py` (parametrised over the registries, so a new registration",
        "gets its cells without anyone writing them); this page is written from the same checks by",
        "`python scripts/composition_matrix.py`, and a test fails when a registered name is missing here.",
        "A cell is *pass* (with what it produced) or *n/a* with the library's own refusal; none is skipped.",
        "",
        "## Fusions",
        "",
        "*in-stream*: after ViT block 2 of `llava-hr-tiny`; *final*: its final fusion. Each cell runs forward",
        "and backward, checks the declared `grid_for` / `num_tokens` / `out_dim` against what came out, and",
        "rebuilds the encoder from its JSON config. Multi-source fusions read map stages `[1, 3]`.",
        "",
        "| fusion | in-stream | final |",
        "|---|---|---|",
    ]
    for name in mixres.list_fusions():
        lines.append(_row(name, [_safe(comp.check_fusion, name, r) for r in comp.FUSION_ROLES]))
    lines += ["", "## Projectors and compressors", "",
              "*forward*: 8x8 tokens of width 32 to width 64, `output_grid` checked; *recipe*: in the LLaVA",
              "projector slot of `llava-hr-tiny` (no final fusion), the `<image>` count checked against the features,",
              "generation, then one stage-2 step of the recipe.", "",
              "| projector | forward | recipe (HF tower + one step) |", "|---|---|---|"]
    for name in mixres.list_projectors():
        lines.append(_row(name, [_safe(comp.check_projector, name, r, tmp / name / r) for r in comp.PROJECTOR_ROLES]))
    lines += ["", "## Encoders", "",
              "*HF tower*: inside a transformers Llava (the recipe's assembly), its saved processor's `<image>`",
              "count equal to the tower's features, batched generation; *recipe*: one stage-2 step of `train()`,",
              "only trainable parts moving.", "",
              "| encoder | HF tower | recipe |", "|---|---|---|"]
    for name in comp.tiny_encoders():
        lines.append(_row(name, [_safe(comp.check_encoder, name, r, tmp / name / r) for r in comp.ENCODER_ROLES]))
    lines += ["", "Full-size presets build from their config on the meta device (no memory, no weights):", "",
              "| encoder | builds |", "|---|---|"]
    for name in comp.full_size_encoders():
        lines.append(_row(name, [_safe(comp.check_meta_build, name)]))
    lines += ["", "The class entries (`dual_pathway`, `s2`, `anyres`) are covered by their tiny presets above:", ""]
    lines += [f"| `{n}` | via {', '.join(t for t in comp.tiny_encoders() if mixres.ENCODERS.get_class(t) is mixres.ENCODERS.get_class(n))} |"
              for n in mixres.list_encoders() if not mixres.ENCODERS.is_preset(n)]
    (ROOT / "docs" / "composition.md").write_text("\n".join(lines) + "\n")
    print("wrote docs/composition.md")


if __name__ == "__main__":
    main()
