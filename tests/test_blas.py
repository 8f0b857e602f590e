"""BLAS threads are capped while a fit runs (vijax/_blas.py), and restored after."""

import jax
import optax
import pytest

import vijax
import vijax.fitting._engine as engine

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def _fit_recording(monkeypatch):
    seen = []
    monkeypatch.setattr(engine, "_host_hook", lambda step: seen.append(_blas_threads()))
    model = vijax.models.normal_mean(jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0,
                                     prior_scale=1.0)
    family = vijax.full_rank()
    vijax.fit(jax.random.key(0), family, model.log_joint, family.init(model.latent),
              optimizer=optax.adam(1e-2), num_steps=20, chunk_size=10, progress=False)
    return seen


def test_fit_runs_with_one_blas_thread_and_restores_the_setting(monkeypatch):
    monkeypatch.delenv("VIJAX_BLAS_THREADS", raising=False)
    import scipy.linalg.cython_lapack  # noqa: F401  (jaxlib's LAPACK: loaded before `before`)

    before = _blas_threads()
    assert before, "no BLAS library found: the cap would be untested"
    seen = _fit_recording(monkeypatch)
    assert seen and all(threads == [1] * len(before) for threads in seen), seen
    assert _blas_threads() == before


def test_zero_leaves_blas_threading_alone_and_bad_values_are_named(monkeypatch):
    import scipy.linalg.cython_lapack  # noqa: F401

    before = _blas_threads()
    monkeypatch.setenv("VIJAX_BLAS_THREADS", "0")
    assert all(threads == before for threads in _fit_recording(monkeypatch))
    monkeypatch.setenv("VIJAX_BLAS_THREADS", "two")
    with pytest.raises(ValueError, match=r"VIJAX_BLAS_THREADS must be an integer >= 0 .*got 'two'"):
        _fit_recording(monkeypatch)
