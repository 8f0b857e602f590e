"""Shared test configuration: strict rank promotion, float64 on request, fixtures."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (identity tests use it)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Runs the test in float32 and in float64 (x64 enabled for the latter)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield np.float64
    else:
        yield np.float32


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


# The inner loop (`pytest -m "not slow"`) runs every test function once, with
# its first parameter set; the full run (`pytest`) sweeps every parameter set.
# Sweeps over dtypes, families and models each compile their own programs, and
# compiling is most of a test's time. Argument-error sweeps compile nothing
# and stay whole in the inner loop.
_WHOLE_SWEEPS = {"test_errors.py", "test_api.py"}


def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or item.path.name in _WHOLE_SWEEPS:
            continue
        function = (item.path, item.originalname)
        if function in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(function)
