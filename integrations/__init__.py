"""Integrations: glue between mixres encoders and existing MLLMs, plus training recipes.

Shipped in the wheel as ``mixres.integrations``; each family is a subpackage
(``mixres.integrations.hf``, ...). Nothing here is imported by ``import mixres``.
"""

__all__: list[str] = []
