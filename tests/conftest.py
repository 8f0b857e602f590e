"""Shared test configuration: strict rank promotion, float64 on request, fixtures."""

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# One XLA compilation cache per test run, shared by the xdist workers and by
# the subprocesses and notebook kernels the tests start (they inherit the
# environment): the same programs (a model's fit chunk, a benchmark's step)
# are compiled by several of them. Made empty and removed by the controller,
# so a run never reads another run's programs; a user's own cache directory
# is left alone.
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def pytest_configure(config):
    if hasattr(config, "workerinput") or os.environ.get(_CACHE_ENV):
        return
    path = tempfile.mkdtemp(prefix="vijax-tests-xla-cache-")
    config._vijax_xla_cache = path
    os.environ[_CACHE_ENV] = path
    os.environ.setdefault(_MIN_COMPILE_ENV, "0.1")
    # This process imported JAX before the variables were set (``-n 0`` runs
    # its tests here).
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ[_MIN_COMPILE_ENV]))


def pytest_unconfigure(config):
    path = getattr(config, "_vijax_xla_cache", None)
    if path is not None:
        os.environ.pop(_CACHE_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


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
    # The longest tests come first in the collection, so that the run does
    # not end on one of them while the other worker sits idle: xdist's
    # worksteal gives each worker a contiguous block of the collection (the
    # first worker's block starts with them) and lets an idle worker steal
    # from the end of another's block, where the short tests are.
    items.sort(key=_start_order)


def _start_order(item) -> int:
    """The item's place in ``_LONGEST`` (the longest first), else after all of them."""
    return next((i for i, prefix in enumerate(_LONGEST) if item.nodeid.startswith(prefix)),
                len(_LONGEST))


# Tests that took 15 s or more in a full run on 2 cores (`pytest --durations=60`),
# longest first: the README, notebooks, benchmark runs in a subprocess and the
# longest fits.
_LONGEST = (
    "tests/test_readme.py::test_readme_examples",
    "tests/test_notebooks.py::test_notebook_executes",
    "tests/test_default_fit_benchmark.py::test_quick_run",
    "tests/test_zoo_accuracy.py::test_quick_run",
    "tests/test_big_data_benchmark.py::test_big_data_quick_run",
    "tests/test_benchmark_scripts.py::test_fast_vi_runs",
    "tests/test_benchmark_scripts.py::test_fast_vi_averaged",
    "tests/test_benchmark_scripts.py::test_bam_batch_size",
    "tests/test_fit_exact.py::test_float32_low_rank_crosses",
    "tests/test_fit_exact.py::test_the_window_grows",
    "tests/test_bam.py::test_fits_item_response",
    "tests/test_exact_fit_benchmark.py::test_a_run_writes",
    "tests/test_head_to_head_benchmark.py::test_small_run",
    "tests/test_head_to_head_benchmark.py::test_every_driver_evaluates",
    "tests/test_protocol.py::test_every_objective_runs",
    "tests/test_data.py::test_eight_device_sharded",
    "tests/test_flows.py::test_defaults_are_stable_in_float32",
    "tests/test_taylor.py::test_the_default_fit_uses_auto",
)
