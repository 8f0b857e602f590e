"""Gaussian score matching (Modi et al. 2023): the defining property, fixed point, convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vijax
from vijax.algorithms._gsm import gsm_update


def _blr(rng, d=5, n=40, dtype=np.float64):
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    return vijax.models.bayesian_linear_regression(
        jnp.asarray(x, dtype), jnp.asarray(y, dtype), noise_scale=0.5, prior_scale=1.0)


def test_one_sample_update_matches_the_score_at_the_sample(x64, rng):
    """The new Gaussian's score at z equals the target's score g there (NumPy solve)."""
    d = 4
    tril = np.tril(rng.normal(size=(d, d))) + 2 * np.eye(d)
    mu, z, g = rng.normal(size=d), rng.normal(size=(1, d)), rng.normal(size=(1, d))
    new_mu, new_tril, ok = gsm_update(jnp.asarray(mu), jnp.asarray(tril), jnp.asarray(z),
                                      jnp.asarray(g))
    assert bool(ok)
    cov = np.asarray(new_tril) @ np.asarray(new_tril).T
    score = -np.linalg.solve(cov, z[0] - np.asarray(new_mu))
    np.testing.assert_allclose(score, g[0], rtol=1e-9, atol=1e-12)


def test_gaussian_target_is_a_fixed_point(x64, rng):
    model = _blr(rng)
    family = vijax.full_rank()
    at_posterior = family.from_gaussian(model.posterior, model.latent)
    result = vijax.gaussian_score_matching(jax.random.key(0), model.log_joint, at_posterior,
                                           num_steps=10, batch_size=3, progress=False)
    assert float(vijax.exact_kl(result.params, family, model)) < 1e-10


def test_reaches_the_exact_posterior(x64, rng):
    model = _blr(rng)
    family = vijax.full_rank()
    result = vijax.gaussian_score_matching(jax.random.key(0), model.log_joint,
                                           family.init(model.latent), num_steps=160,
                                           batch_size=8, progress=False)
    assert result.num_skipped == 0
    assert float(vijax.exact_kl(result.params, family, model)) < 1e-8


def test_float32_and_continuation(rng):
    model = _blr(rng, dtype=np.float32)
    family = vijax.full_rank()
    kw = dict(batch_size=8, progress=False, chunk_size=20)
    whole = vijax.gaussian_score_matching(jax.random.key(1), model.log_joint,
                                          family.init(model.latent), num_steps=60, **kw)
    part = vijax.gaussian_score_matching(jax.random.key(1), model.log_joint,
                                         family.init(model.latent), num_steps=25, **kw)
    rest = vijax.gaussian_score_matching(None, model.log_joint, part.state, num_steps=35, **kw)
    assert whole.params.loc.dtype == jnp.float32
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(rest.params)):
        np.testing.assert_array_equal(a, b)


def test_averaged_covariance_stays_positive_definite_and_non_finite_input_is_rejected(x64):
    """Each per-sample covariance is positive definite (the paper's theorem), so their
    average is, even for scores of a far narrower target; inf scores are rejected."""
    mu, tril = jnp.zeros(2), jnp.eye(2)
    z = jnp.asarray([[0.5, 0.0], [-0.5, 0.0]])
    _, new_tril, ok = gsm_update(mu, tril, z, jnp.asarray([[1e3, 0.0], [-1e3, 0.0]]))
    assert bool(ok) and np.all(np.diagonal(np.asarray(new_tril)) > 0)
    _, new_tril, ok = gsm_update(mu, tril, z, jnp.full((2, 2), jnp.inf))
    assert not bool(ok) and np.array_equal(new_tril, np.eye(2))


def test_errors(rng):
    model = _blr(rng, dtype=np.float32)
    family = vijax.full_rank()
    with pytest.raises(ValueError, match="full-rank Gaussian family only"):
        vijax.gaussian_score_matching(jax.random.key(0), model.log_joint,
                                      vijax.mean_field().init(model.latent), num_steps=1,
                                      batch_size=2, progress=False)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        vijax.gaussian_score_matching(jax.random.key(0), model.log_joint,
                                      family.init(model.latent), num_steps=1, batch_size=0,
                                      progress=False)
    with pytest.raises(TypeError, match="`log_joint` must be callable"):
        vijax.gaussian_score_matching(jax.random.key(0), None, family.init(model.latent),
                                      num_steps=1, batch_size=2, progress=False)
