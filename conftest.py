"""Names available to the docstring examples run by ``pytest --doctest-modules``."""

import pytest
import torch
from torch import nn

import higher


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    torch.manual_seed(0)
    doctest_namespace.update(torch=torch, nn=nn, higher=higher)
