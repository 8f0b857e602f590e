"""BLAS threads while vijax's compiled loops run: one by default.

On the CPU, XLA hands Cholesky factorizations, triangular solves, QR and
symmetric eigendecompositions to LAPACK, which jaxlib takes from SciPy's
OpenBLAS. OpenBLAS starts one thread per core and spins them while it waits;
when another process keeps the cores busy, those threads fight it and every
call waits for the slowest: measured on 2 cores next to a busy test run,
``jit(grad(sum(solve_triangular(cholesky(S), B))))`` at d = 400 took 11 to
83 ms per call with OpenBLAS's default threading and 3.8 to 8.7 ms with one
thread (``benchmarks/blas_threads.py`` measures whole fits). The kernels of
a VI step are small, so one thread loses little even on an idle machine.

:func:`limited` caps the BLAS threads (``threadpoolctl``) for the duration of
a fit's host loop (:func:`vijax.fitting._engine.run`: ``fit``,
``fit_batched``, ``batch_and_match``). The cap is read from the environment
variable ``VIJAX_BLAS_THREADS`` at each call: a positive integer, or ``0``
to leave BLAS's threading alone. In a loop of your own, wrap it in
``threadpoolctl.threadpool_limits(1, user_api="blas")``, or start Python
with ``OPENBLAS_NUM_THREADS=1``.
"""

from __future__ import annotations

import contextlib
import os

ENV = "VIJAX_BLAS_THREADS"
DEFAULT = 1

_controller = None


def threads() -> int:
    """The cap from ``VIJAX_BLAS_THREADS`` (default 1; 0: no cap)."""
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"The environment variable {ENV} must be an integer >= 0 (0: leave BLAS "
            f"threading alone); got {raw!r}."
        ) from None
    if value < 0:
        raise ValueError(f"The environment variable {ENV} must be an integer >= 0; got {raw!r}.")
    return value


def limited():
    """A context manager capping the BLAS threads at :func:`threads` (no-op for 0)."""
    global _controller
    n = threads()
    if n == 0:
        return contextlib.nullcontext()
    if _controller is None:
        # jaxlib takes its CPU LAPACK kernels from SciPy's Cython LAPACK, which
        # it loads on the first linear-algebra compile: load it now, so the
        # controller sees it (it only sees libraries loaded when it is made).
        import scipy.linalg.cython_lapack  # noqa: F401
        from threadpoolctl import ThreadpoolController

        # Finding the loaded BLAS libraries walks the process's shared
        # objects (about a millisecond); do it once.
        _controller = ThreadpoolController()
    return _controller.limit(limits=n, user_api="blas")
