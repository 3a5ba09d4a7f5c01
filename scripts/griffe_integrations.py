"""Griffe extension: document ``integrations/`` as ``mixres.integrations`` (setuptools package-dir)."""

from pathlib import Path

import griffe


class MixresIntegrations(griffe.Extension):
    """Graft the top-level ``integrations`` package into ``mixres`` when ``mixres`` is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.path != "mixres" or "integrations" in pkg.members:
            return
        root = Path(pkg.filepath).parent.parent / "integrations"
        sub = griffe.GriffeLoader(search_paths=[str(root.parent)]).load("integrations")
        pkg.set_member("integrations", sub)
