"""Tests for vijax._exact: exact_elbo + exact_kl == log_evidence, against NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import vijax
from references import np_kl, np_moments, perturb
from vijax import models

FAMILY_NAMES = ("mean_field", "full_rank", "low_rank")
MODEL_NAMES = ("linear_gaussian", "blr", "blr_wide", "normal_mean")


def make_family(name, d):
    if name == "mean_field":
        return vijax.mean_field(init_scale=0.5)
    if name == "full_rank":
        return vijax.full_rank(init_scale=0.5)
    return vijax.low_rank(rank=min(2, d), init_scale=0.5)


def make_problem(name, rng, dtype=np.float64):
    """Returns (model, dense NumPy description m0, S0, H, y, R of the same model)."""
    if name == "linear_gaussian":
        n, d = 6, 4
        a = rng.normal(size=(d, d))
        b = rng.normal(size=(n, n))
        dense = dict(prior_mean=rng.normal(size=d), prior_cov=a @ a.T / d + 0.5 * np.eye(d),
                     design=rng.normal(size=(n, d)), observations=rng.normal(size=n),
                     noise_cov=b @ b.T / n + 0.5 * np.eye(n))
        model = models.linear_gaussian(**{k: v.astype(dtype) for k, v in dense.items()})
        return model, dense
    if name in ("blr", "blr_wide"):
        n, d = (12, 4) if name == "blr" else (3, 5)
        x = rng.normal(size=(n, d))
        y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
        s, t = 0.6, 1.4
        model = models.bayesian_linear_regression(
            x.astype(dtype), y.astype(dtype), noise_scale=s, prior_scale=t)
        return model, dict(prior_mean=np.zeros(d), prior_cov=t**2 * np.eye(d), design=x,
                           observations=y, noise_cov=s**2 * np.eye(n))
    x = rng.normal(loc=1.0, size=7)
    s, m0, t = 0.9, 0.4, 2.0
    model = models.normal_mean(x.astype(dtype), noise_scale=s, prior_loc=m0, prior_scale=t)
    return model, dict(prior_mean=np.array([m0]), prior_cov=np.array([[t**2]]),
                       design=np.ones((7, 1)), observations=x, noise_cov=s**2 * np.eye(7))


def np_gauss_expect(m, c, mean, cov):
    """E_{z ~ N(m, c)} log N(z; mean, cov)."""
    diff = m - mean
    return -0.5 * (len(m) * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1]
                   + np.trace(np.linalg.solve(cov, c)) + diff @ np.linalg.solve(cov, diff))


def np_elbo(mq, cq, prior_mean, prior_cov, design, observations, noise_cov):
    n = observations.shape[0]
    resid = observations - design @ mq
    lik = -0.5 * (n * np.log(2 * np.pi) + np.linalg.slogdet(noise_cov)[1]
                  + resid @ np.linalg.solve(noise_cov, resid)
                  + np.trace(np.linalg.solve(noise_cov, design @ cq @ design.T)))
    entropy = 0.5 * (len(mq) * (1 + np.log(2 * np.pi)) + np.linalg.slogdet(cq)[1])
    return np_gauss_expect(mq, cq, prior_mean, prior_cov) + lik + entropy


def np_posterior(prior_mean, prior_cov, design, observations, noise_cov):
    prec = np.linalg.inv(prior_cov) + design.T @ np.linalg.solve(noise_cov, design)
    cov = np.linalg.inv(prec)
    mean = cov @ (np.linalg.solve(prior_cov, prior_mean)
                  + design.T @ np.linalg.solve(noise_cov, observations))
    return mean, cov


CASES = [(m, f) for m in MODEL_NAMES for f in FAMILY_NAMES]


@pytest.mark.parametrize("model_name,family_name", CASES)
def test_identity_and_numpy_references(x64, rng, model_name, family_name):
    model, dense = make_problem(model_name, rng)
    d = dense["prior_mean"].shape[0]
    family = make_family(family_name, d)
    log_z = float(model.log_evidence)
    mp, cp = np_posterior(**dense)
    for _ in range(2):
        params = perturb(family.init(model.latent), rng)
        elbo = float(vijax.exact_elbo(params, family, model))
        kl = float(vijax.exact_kl(params, family, model))
        assert abs(elbo + kl - log_z) <= 1e-10 * max(1.0, abs(log_z))
        mq, cq = np_moments(family_name, params)
        np.testing.assert_allclose(elbo, np_elbo(mq, cq, **dense), rtol=1e-10)
        np.testing.assert_allclose(kl, np_kl(mq, cq, mp, cp), rtol=1e-9, atol=1e-11)
        assert kl > 0 and elbo < log_z


@pytest.mark.parametrize("model_name,family_name", CASES)
def test_gradient_identity(x64, rng, model_name, family_name):
    model, dense = make_problem(model_name, rng)
    family = make_family(family_name, dense["prior_mean"].shape[0])
    params = perturb(family.init(model.latent), rng)
    g_elbo = ravel_pytree(jax.grad(vijax.exact_elbo)(params, family, model))[0]
    g_kl = ravel_pytree(jax.grad(vijax.exact_kl)(params, family, model))[0]
    assert float(jnp.linalg.norm(g_kl)) > 1e-3  # not at the optimum: the check has teeth
    rel = jnp.linalg.norm(g_elbo + g_kl) / jnp.linalg.norm(g_kl)
    assert float(rel) < 1e-10


def test_elbo_gradient_matches_finite_difference(x64, rng):
    # The grad identity would also hold if both gradients were wrong the same way.
    model, dense = make_problem("linear_gaussian", rng)
    family = make_family("full_rank", 4)
    params = perturb(family.init(model.latent), rng)
    flat, unravel = ravel_pytree(params)
    direction = rng.normal(size=flat.shape)
    g = ravel_pytree(jax.grad(vijax.exact_elbo)(params, family, model))[0]

    def ref(p):
        return np_elbo(*np_moments("full_rank", unravel(p)), **dense)

    h = 1e-6
    fd = (ref(flat + h * direction) - ref(flat - h * direction)) / (2 * h)
    np.testing.assert_allclose(g @ direction, fd, rtol=1e-6)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_full_rank_at_the_posterior(x64, rng, model_name):
    model, dense = make_problem(model_name, rng)
    mp, cp = np_posterior(**dense)
    family = vijax.full_rank()
    params = family.init(model.latent)
    tril = np.linalg.cholesky(cp)
    s = np.diag(tril)
    params = params._replace(
        loc=jnp.reshape(jnp.asarray(mp), jnp.shape(model.latent)),
        raw_scale=jnp.asarray(s + np.log(-np.expm1(-s))),
        off_diag=jnp.asarray(tril / s[:, None] - np.eye(len(s))),
    )
    kl = float(vijax.exact_kl(params, family, model))
    elbo = float(vijax.exact_elbo(params, family, model))
    assert abs(kl) < 1e-10
    np.testing.assert_allclose(elbo, model.log_evidence, rtol=1e-12)
    g = ravel_pytree(jax.grad(vijax.exact_elbo)(params, family, model))[0]
    assert float(jnp.max(jnp.abs(g))) < 1e-7


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_float32(rng, model_name, family_name):
    model, dense = make_problem(model_name, rng, dtype=np.float32)
    family = make_family(family_name, dense["prior_mean"].shape[0])
    params = perturb(family.init(model.latent), rng)
    elbo = vijax.exact_elbo(params, family, model)
    kl = vijax.exact_kl(params, family, model)
    assert elbo.dtype == np.float32 and kl.dtype == np.float32
    log_z = float(model.log_evidence)
    assert abs(float(elbo) + float(kl) - log_z) <= 1e-4 * max(1.0, abs(log_z))
    mq, cq = np_moments(family_name, params)
    np.testing.assert_allclose(float(kl), np_kl(mq, cq, *np_posterior(**dense)),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_jit_and_vmap_over_stacked_params(x64, rng):
    model, dense = make_problem("blr", rng)
    family = make_family("low_rank", 4)
    stack = [perturb(family.init(model.latent), rng) for _ in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *stack)
    kls = jax.jit(jax.vmap(lambda p: vijax.exact_kl(p, family, model)))(stacked)
    elbos = jax.vmap(lambda p: vijax.exact_elbo(p, family, model))(stacked)
    chex.assert_shape(kls, (3,))
    for i, p in enumerate(stack):
        mq, cq = np_moments("low_rank", p)
        np.testing.assert_allclose(kls[i], np_kl(mq, cq, *np_posterior(**dense)), rtol=1e-9)
        np.testing.assert_allclose(elbos[i], vijax.exact_elbo(p, family, model), rtol=1e-12)
    np.testing.assert_allclose(elbos + kls, np.full(3, float(model.log_evidence)), rtol=1e-10)


def test_exact_elbo_differentiable_in_model_data(x64, rng):
    # The model built inside the function: d/ds of the ELBO at fixed q, against finite differences.
    x = rng.normal(size=(10, 3))
    y = rng.normal(size=10)
    family = vijax.full_rank()

    def elbo_at(s):
        model = models.bayesian_linear_regression(x, y, noise_scale=s, prior_scale=1.0)
        params = family.init(model.latent)
        return vijax.exact_elbo(params, family, model)

    def ref(s):
        dense = dict(prior_mean=np.zeros(3), prior_cov=np.eye(3), design=x, observations=y,
                     noise_cov=s**2 * np.eye(10))
        return np_elbo(np.zeros(3), 0.01 * np.eye(3), **dense)

    h = 1e-6
    np.testing.assert_allclose(jax.grad(elbo_at)(0.8), (ref(0.8 + h) - ref(0.8 - h)) / (2 * h),
                               rtol=1e-7)


def test_errors(rng):
    x = rng.normal(size=(10, 3)).astype(np.float32)
    y = (rng.random(10) < 0.5).astype(np.float32)
    logistic = models.logistic_regression(x, y)
    family = vijax.mean_field()
    params = family.init(logistic.latent)
    with pytest.raises(ValueError, match=r"logistic_regression.*no closed form"):
        vijax.exact_kl(params, family, logistic)
    # exact_elbo needs only an expected log joint, which logistic regression has ...
    assert np.isfinite(float(vijax.exact_elbo(params, family, logistic)))
    # ... and a model without one is refused, naming what is missing.
    bare = models.Model(log_joint=logistic.log_joint, latent=logistic.latent, name="bare")
    with pytest.raises(ValueError, match=r"bare.*expected_log_joint.*got None"):
        vijax.exact_elbo(params, family, bare)

    blr = models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)
    wrong = family.init(jnp.zeros(4))
    with pytest.raises(ValueError, match=r"`params` do not match `model.latent`.*dimension 3.*"
                                         r"dimension 4"):
        vijax.exact_elbo(wrong, family, blr)
    wrong_structure = family.init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="`params` do not match"):
        vijax.exact_kl(wrong_structure, family, blr)
    with pytest.raises(TypeError, match="`params` must be"):
        vijax.exact_kl(vijax.full_rank().init(blr.latent), family, blr)
    with pytest.raises(TypeError, match="`family` must be a vijax.VariationalFamily"):
        vijax.exact_kl(params, "mean_field", blr)
    with pytest.raises(TypeError, match="`model` must be a vijax.models.Model"):
        vijax.exact_elbo(params, family, blr.log_joint)


def test_blr_elbo_for_a_low_rank_precision_q(x64, rng):
    """BLR's expected log joint for a low-rank-precision q (its ||X S||_F^2 path)."""
    for name in ("blr", "blr_wide"):
        model, dense = make_problem(name, rng)
        family = vijax.low_rank_precision(rank=2, init_scale=0.5)
        params = perturb(family.init(model.latent), rng)
        q = family.to_gaussian(params)
        cq = np.asarray(q.scale.cov())
        np.testing.assert_allclose(vijax.exact_elbo(params, family, model),
                                   np_elbo(np.asarray(q.mean), cq, **dense), rtol=1e-10)
