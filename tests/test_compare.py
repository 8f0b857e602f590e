"""Tests for compare_gradients: its metrics, its reference paths, its table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import vijax

ALL = ("reparam", "closed_entropy", "stl", "score", "iwae", "dreg")


def _regression(rng, n=8, d=3):
    x = rng.normal(size=(n, d))
    x[:, 1] += 0.8 * x[:, 0]
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    return vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(y), noise_scale=1.0, prior_scale=1.0)


def _params(rng, family, latent, spread=0.3):
    params = family.init(latent)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [x + jnp.asarray(spread * rng.normal(size=np.shape(x)), x.dtype) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _numpy_metrics(g, ref):
    """The documented metrics, computed independently with NumPy in float64."""
    g = np.asarray(g, np.float64)
    ref = np.asarray(ref, np.float64)
    mean = g.mean(axis=0)
    variance = np.trace(np.cov(g, rowvar=False, ddof=1))
    cos = (g @ ref) / (np.linalg.norm(g, axis=1) * np.linalg.norm(ref))
    return {
        "bias_norm": np.linalg.norm(mean - ref),
        "bias_stderr": np.sqrt(variance / g.shape[0]),
        "variance": variance,
        "snr": np.linalg.norm(mean) / np.sqrt(variance),
        "cosine": cos.mean(),
        "relative_error": np.sqrt(np.mean(np.sum((g - ref) ** 2, axis=1)))
        / np.linalg.norm(ref),
    }


@pytest.mark.slow
def test_metrics_match_numpy_on_the_same_replicates(x64, rng):
    model = _regression(rng)
    family = vijax.mean_field()
    params = _params(rng, family, model.latent)
    key = jax.random.key(0, impl="rbg")  # rbg only to shorten compile times
    num_rep = 200
    result = vijax.compare_gradients(
        key, params, family, model, estimators=ALL, num_samples=(1, 3),
        num_replicates=num_rep)
    assert result.estimators == ALL
    assert result.num_samples == (1, 3)
    assert result.num_replicates == num_rep
    assert result.reference_name == "-grad KL"
    for m in ("bias_norm", "bias_stderr", "variance", "snr", "cosine", "relative_error"):
        assert getattr(result, m).shape == (len(ALL), 2)

    ref = -np.asarray(ravel_pytree(jax.grad(vijax.exact_kl)(params, family, model))[0])
    np.testing.assert_allclose(result.reference_norm, np.linalg.norm(ref), rtol=1e-12)
    keys = jax.random.split(key, num_rep)  # the documented replicate keys
    for j, s in enumerate((1, 3)):
        grads = jax.jit(jax.vmap(lambda k, s=s: vijax.estimator_gradients(
            k, params, family, model.log_joint, num_samples=s, estimators=ALL)))(keys)
        for i, e in enumerate(ALL):
            g = jax.vmap(lambda t: ravel_pytree(t)[0])(grads[e])
            for m, want in _numpy_metrics(g, ref).items():
                np.testing.assert_allclose(
                    getattr(result, m)[i, j], want, rtol=1e-9, err_msg=f"{e} S={s} {m}")

    # Common random numbers: rows that are the same estimator on the same draws agree.
    row = {e: i for i, e in enumerate(ALL)}
    np.testing.assert_allclose(result.variance[row["iwae"], 0], result.variance[row["reparam"], 0],
                               rtol=1e-10)
    np.testing.assert_allclose(result.variance[row["dreg"], 0], result.variance[row["stl"], 0],
                               rtol=1e-10)
    # For mean_field (and full_rank), reparam and closed_entropy share their gradient.
    np.testing.assert_allclose(
        result.variance[row["closed_entropy"]], result.variance[row["reparam"]], rtol=1e-10)
    assert not np.allclose(result.variance[row["stl"]], result.variance[row["reparam"]])


@pytest.mark.slow
def test_unbiased_estimators_sit_at_the_noise_floor_and_variance_scales_as_one_over_s(x64, rng):
    model = _regression(rng)
    family = vijax.mean_field()
    params = _params(rng, family, model.latent, spread=0.5)
    result = vijax.compare_gradients(
        jax.random.key(1, impl="rbg"), params, family, model,
        estimators=("reparam", "stl", "score", "dreg"), num_samples=(1, 16),
        num_replicates=1000)
    for e in ("reparam", "stl", "score"):
        m1, m16 = result.at(e, 1), result.at(e, 16)
        # ||mean - exact||^2 has expectation variance / R for an unbiased estimator.
        assert m1["bias_norm"] < 4.0 * m1["bias_stderr"], (e, m1)
        assert m16["bias_norm"] < 4.0 * m16["bias_stderr"], (e, m16)
        assert m16["cosine"] > m1["cosine"]
        assert m16["relative_error"] < m1["relative_error"]
        assert m16["snr"] > m1["snr"]
    # Averages of S independent terms: total variance / S (up to replicate noise).
    for e in ("reparam", "stl"):
        ratio = result.at(e, 1)["variance"] / result.at(e, 16)["variance"]
        assert 16 / 1.5 < ratio < 16 * 1.5, (e, ratio)
    # DReG estimates the IWAE gradient; at S = 1 it is STL on the same draws.
    assert result.at("dreg", 1) == result.at("stl", 1)


@pytest.mark.slow
def test_reference_paths_for_models_without_closed_form(x64, rng):
    # A conjugate model with the reference passed explicitly gives the default result.
    model = _regression(rng)
    family = vijax.mean_field()
    params = _params(rng, family, model.latent)
    kwargs = dict(estimators=("stl", "score"), num_samples=4, num_replicates=50)
    key = jax.random.key(2, impl="rbg")
    default = vijax.compare_gradients(key, params, family, model, **kwargs)
    ref = jax.tree_util.tree_map(jnp.negative, jax.grad(vijax.exact_kl)(params, family, model))
    given = vijax.compare_gradients(key, params, family, model, reference=ref, **kwargs)
    assert given.reference_name == "reference"
    for m in ("bias_norm", "variance", "snr", "cosine", "relative_error"):
        np.testing.assert_allclose(getattr(given, m), getattr(default, m), rtol=1e-12)

    # Logistic regression has no posterior: its default reference is grad
    # exact_elbo (quadrature); a bare log_joint, or a model with no expected
    # log joint, needs a reference ...
    x = rng.normal(size=(20, 3))
    y = (x @ np.ones(3) + rng.normal(size=20) > 0).astype(np.float64)
    logistic = vijax.models.logistic_regression(jnp.asarray(x), jnp.asarray(y))
    lparams = _params(rng, family, logistic.latent)
    quad = vijax.compare_gradients(key, lparams, family, logistic, **kwargs)
    assert quad.reference_name == "grad exact ELBO"
    gref = jax.grad(vijax.exact_elbo)(lparams, family, logistic)
    np.testing.assert_allclose(quad.reference_norm, np.linalg.norm(ravel_pytree(gref)[0]),
                               rtol=1e-12)
    bare = vijax.models.Model(logistic.log_joint, logistic.latent, name="bare")
    with pytest.raises(ValueError, match="reference="):
        vijax.compare_gradients(key, lparams, family, bare, **kwargs)
    with pytest.raises(ValueError, match="reference="):
        vijax.compare_gradients(key, lparams, family, logistic.log_joint, **kwargs)
    # ... and a Model or its bare log_joint then give the same result.
    lref = jax.tree_util.tree_map(jnp.ones_like, lparams)
    from_model = vijax.compare_gradients(key, lparams, family, logistic, reference=lref, **kwargs)
    from_fn = vijax.compare_gradients(
        key, lparams, family, logistic.log_joint, reference=lref, **kwargs)
    for m in ("bias_norm", "variance", "snr", "cosine", "relative_error"):
        values = getattr(from_model, m)
        assert np.all(np.isfinite(values))
        np.testing.assert_array_equal(values, getattr(from_fn, m))
    np.testing.assert_allclose(from_model.reference_norm, np.sqrt(6.0), rtol=1e-12)


@pytest.mark.slow
def test_batch_size_maps_in_chunks_with_the_same_result(x64, rng):
    model = _regression(rng)
    family = vijax.mean_field()
    params = _params(rng, family, model.latent)
    kwargs = dict(estimators=("stl", "score"), num_samples=4, num_replicates=23)
    # Threefry keys draw the same bits under vmap and lax.map ("rbg" keys need not).
    key = jax.random.key(2)
    whole = vijax.compare_gradients(key, params, family, model, **kwargs)
    chunked = vijax.compare_gradients(key, params, family, model, batch_size=5, **kwargs)
    for m in ("bias_norm", "variance", "snr", "cosine", "relative_error"):
        np.testing.assert_allclose(getattr(chunked, m), getattr(whole, m), rtol=1e-10)


@pytest.mark.slow
def test_zero_variance_and_zero_reference_at_the_posterior(x64, rng):
    x = rng.normal(size=(8, 3))
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(x @ np.ones(3)), noise_scale=1.0, prior_scale=1.0)
    chol = np.linalg.cholesky(np.linalg.solve(x.T @ x + np.eye(3), np.eye(3)))
    s = np.diag(chol)
    family = vijax.full_rank()
    params = family.init(model.latent)._replace(
        loc=model.posterior.mean,
        raw_scale=jnp.asarray(s + np.log(-np.expm1(-s))),
        off_diag=jnp.asarray(chol / s[:, None] - np.eye(3)),
    )
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    result = vijax.compare_gradients(
        jax.random.key(4, impl="rbg"), params, family, model, estimators=("reparam", "stl"),
        num_samples=2, num_replicates=40, reference=zero)
    assert result.reference_norm == 0.0
    assert result.at("stl", 2)["variance"] < 1e-20
    assert result.at("reparam", 2)["variance"] > 1e-3
    # A zero reference gives cosine 0 by convention (no NaN from 0 / 0) and an
    # infinite relative error.
    assert result.at("reparam", 2)["cosine"] == 0.0
    assert result.at("reparam", 2)["relative_error"] == np.inf
    assert "stl" in result.to_markdown()


@pytest.mark.slow
def test_table_and_accessors(x64, rng):
    model = _regression(rng)
    family = vijax.mean_field()
    params = _params(rng, family, model.latent)
    result = vijax.compare_gradients(
        jax.random.key(2, impl="rbg"), params, family, model, estimators=("stl", "score"),
        num_samples=4, num_replicates=50)
    table = result.to_markdown()
    lines = table.splitlines()
    assert len(lines) == 2 + 2  # header, rule, one row per (estimator, S)
    assert "estimator" in lines[0] and "SNR" in lines[0] and "cos(g, -grad KL)" in lines[0]
    assert "variance (tr Cov)" in lines[0]
    assert lines[2].split("|")[1].strip() == "stl" and lines[3].split("|")[1].strip() == "score"
    assert str(result) == table
    short = result.to_markdown(metrics=("cosine", "snr"))
    assert short.splitlines()[0].count("|") == 5
    row = result.at("score", 4)
    assert row["variance"] == result.variance[1, 0]
    assert set(row) == {"bias_norm", "bias_stderr", "variance", "snr", "cosine",
                        "relative_error"}
    with pytest.raises(ValueError, match="metrics"):
        result.to_markdown(metrics=("bias",))
    with pytest.raises(ValueError, match="estimator"):
        result.at("reparam", 4)
    with pytest.raises(ValueError, match="num_samples"):
        result.at("stl", 5)


def test_bad_arguments_raise_clear_errors(rng):
    model = _regression(rng)
    family = vijax.mean_field()
    params = family.init(model.latent)
    key = jax.random.key(0)

    def call(**kwargs):
        return vijax.compare_gradients(key, params, family, model, **kwargs)

    with pytest.raises(ValueError, match="'iwae', 'dreg'.*'sgd'"):
        call(estimators=("stl", "sgd"))
    with pytest.raises(ValueError, match="repeat"):
        call(estimators=("stl", "stl"))
    with pytest.raises(ValueError, match="at least one"):
        call(estimators=())
    with pytest.raises(ValueError, match="num_samples"):
        call(num_samples=())
    with pytest.raises(ValueError, match="num_samples.*got 0"):
        call(num_samples=(1, 0))
    with pytest.raises(TypeError, match="num_samples"):
        call(num_samples=(1.5,))
    with pytest.raises(ValueError, match="repeat"):
        call(num_samples=(4, 4))
    with pytest.raises(ValueError, match="num_replicates.*>= 2"):
        call(num_replicates=1)
    with pytest.raises(ValueError, match="batch_size"):
        call(batch_size=0)
    with pytest.raises(TypeError, match="model"):
        vijax.compare_gradients(key, params, family, "blr")
    with pytest.raises(TypeError, match="family"):
        vijax.compare_gradients(key, params, "mean_field", model)
    with pytest.raises(ValueError, match="reference.*structure"):
        call(reference={"loc": params.loc})
    with pytest.raises(ValueError, match=r"reference.*shape \(3,\)"):
        call(reference=params._replace(raw_scale=jnp.zeros(4)))
