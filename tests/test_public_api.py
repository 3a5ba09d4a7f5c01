"""Every public name of mixres and mixres.integrations has a docstring."""

import importlib
import inspect
import pkgutil

import pytest

import mixres


def _modules():
    names = {"mixres"}
    for pkg in ("mixres", "mixres.integrations"):
        module = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(module.__path__, prefix=pkg + "."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.add(info.name)
    return sorted(names)


def _public(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
    return names


@pytest.mark.parametrize("module_name", _modules())
def test_public_names_have_docstrings(module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # an optional extra missing: the module says which
        pytest.skip(str(err))
    assert inspect.getdoc(module), f"module {module_name} has no docstring"
    missing = []
    for name in _public(module):
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                missing.append(name)
            if inspect.isclass(obj) and obj.__module__ == module_name:
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                        continue
                    if not inspect.getdoc(getattr(obj, attr)):
                        missing.append(f"{name}.{attr}")
    assert not missing, f"{module_name}: no docstring on {missing}"


def test_all_lists_resolve():
    for name in mixres.__all__:
        assert hasattr(mixres, name), name
