"""Root conftest: names available to the doctests in mixres/."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
