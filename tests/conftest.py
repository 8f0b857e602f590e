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


# Compiling is most of the suite's time (XLA's CPU backend compile took 1,380
# of the 2,430 test-seconds of a full run on 2 cores, not counting the
# notebooks and benchmark runs in subprocesses). The tests check what the
# programs compute, not how fast they run, so they ask for XLA's cheapest CPU
# code generation: LLVM without optimization passes and the elemental emitters
# in place of the fusion emitters. Both keep IEEE semantics (no fast math);
# together they cut the compile time by about 60% and the suite's by about a
# quarter (the long fits run slower). A flag already named in the user's own
# ``XLA_FLAGS`` is left as it is: ``XLA_FLAGS=--xla_backend_optimization_level=3
# --xla_cpu_use_fusion_emitters=true`` tests the default code generation (jaxlib
# 0.10.2's defaults: a fit's bits under them equal those with no flags; level 2 differs).
# The benchmarks' own runs (``python -m benchmarks...``) never see these flags;
# only their quick runs under the tests do, which check the reports, not speed.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_cpu_use_fusion_emitters=false")


_USER_FLAGS_ENV = "VIJAX_TESTS_USER_XLA_FLAGS"


def _ask_for_fast_compiles():
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in _FAST_COMPILE_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ[_USER_FLAGS_ENV] = flags  # for ``xla_default_codegen``
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


@pytest.fixture
def xla_default_codegen(monkeypatch):
    """Subprocesses started in the test (a notebook's kernel) get the user's own
    ``XLA_FLAGS``, without the fast-compile flags above: XLA's default code
    generation, as ``notebooks/build.py`` ran them."""
    if _USER_FLAGS_ENV in os.environ:
        user = os.environ[_USER_FLAGS_ENV]
        if user:
            monkeypatch.setenv("XLA_FLAGS", user)
        else:
            monkeypatch.delenv("XLA_FLAGS", raising=False)


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return
    # Before any test makes JAX start its backend; the workers, notebook
    # kernels and subprocesses inherit the environment.
    _ask_for_fast_compiles()
    if os.environ.get(_CACHE_ENV):
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
    # The user's own XLA_FLAGS back, as the cache variable below (a run from
    # ``pytest.main`` leaves its process as it found it).
    if not hasattr(config, "workerinput") and _USER_FLAGS_ENV in os.environ:
        user = os.environ.pop(_USER_FLAGS_ENV)
        if user:
            os.environ["XLA_FLAGS"] = user
        else:
            os.environ.pop("XLA_FLAGS", None)
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


# Tests that took 15 s or more in a full run on 2 cores (under the fast-compile
# flags above), longest first: the longest fits, notebooks, the README and
# benchmark runs in a subprocess.
_LONGEST = (
    "tests/test_fit_exact.py::test_the_window_grows",
    "tests/test_notebooks.py::test_notebook_executes",
    "tests/test_bam.py::test_fits_item_response",
    "tests/test_fit_exact.py::test_float32_low_rank_crosses",
    "tests/test_big_data_benchmark.py::test_big_data_quick_run",
    "tests/test_flows.py::test_defaults_are_stable_in_float32",
    "tests/test_readme.py::test_readme_examples",
    "tests/test_default_fit_benchmark.py::test_basin_optimum_splits",
    "tests/test_default_fit_benchmark.py::test_quick_run",
    "tests/test_gaussian.py::test_low_rank_mahalanobis_second_derivatives",
    "tests/test_data.py::test_eight_device_sharded",
    "tests/test_exact_fit_benchmark.py::test_a_run_writes",
)
