"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from nanoseek.model import cpu_ops


@pytest.fixture(scope="module")
def kernels():
    """The fused CPU kernels (`nanoseek.model.cpu_ops`); the test is skipped where they cannot be built."""
    module = cpu_ops.load()
    if module is None:
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    return module
