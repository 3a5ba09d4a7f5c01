"""Every Python code block in docs/ runs, so the examples cannot rot."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for page in sorted(DOCS.rglob("*.md")):
        for i, code in enumerate(BLOCK.findall(page.read_text())):
            yield pytest.param(code, id=f"{page.relative_to(DOCS)}#{i}")


@pytest.fixture
def registries_restored():
    """A block may register a plugin (docs/plugins.md); it must not leak into the other tests."""
    from mixres.registry import REGISTRIES

    saved = {kind: (dict(r._classes), dict(r._presets)) for kind, r in REGISTRIES.items()}
    yield
    for kind, (classes, presets) in saved.items():
        registry = REGISTRIES[kind]
        registry._classes.clear()
        registry._classes.update(classes)
        registry._presets.clear()
        registry._presets.update(presets)


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_block_runs(code, registries_restored):
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
