"""The examples in the docstrings run and print what they say."""

import doctest

import pytest

from stn_jax import grids, sampling
from stn_jax.data import distortions
from stn_jax.models import layers


@pytest.mark.parametrize("module", [grids, sampling, layers, distortions], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, "no examples found"
    assert result.failed == 0
