"""The ``>>>`` examples in ``mixres.integrations`` run too (pytest's doctest collection skips
``integrations/``, which ships under another import name)."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import mixres.integrations

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(mixres.integrations.__path__, prefix="mixres.integrations.")
    if not info.ispkg
)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:  # an optional extra (lmms-eval) missing: say which, do not fail
        pytest.skip(f"{name} needs {err.name}, which is not installed")
    torch.manual_seed(0)
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
