"""Tests for vijax.models against NumPy/SciPy references (Bishop, PRML 2.3.3, 3.3-3.5)."""

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import vijax
from vijax import models
from vijax.models import _conjugate


def spd(rng, d, ridge=0.5):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + ridge * np.eye(d)


def linear_gaussian_problem(rng, n=6, d=4):
    return dict(
        prior_mean=rng.normal(size=d),
        prior_cov=spd(rng, d),
        design=rng.normal(size=(n, d)),
        observations=rng.normal(size=n),
        noise_cov=spd(rng, n),
    )


def np_posterior(prior_mean, prior_cov, design, observations, noise_cov):
    """Bishop (2.116)-(2.117): posterior mean and covariance; marginal (2.115)."""
    prec = np.linalg.inv(prior_cov) + design.T @ np.linalg.solve(noise_cov, design)
    cov = np.linalg.inv(prec)
    mean = cov @ (np.linalg.solve(prior_cov, prior_mean)
                  + design.T @ np.linalg.solve(noise_cov, observations))
    marginal_cov = noise_cov + design @ prior_cov @ design.T
    log_z = stats.multivariate_normal(design @ prior_mean, marginal_cov).logpdf(observations)
    return mean, cov, log_z


def np_log_joint(z, prior_mean, prior_cov, design, observations, noise_cov):
    return (stats.multivariate_normal(prior_mean, prior_cov).logpdf(z)
            + stats.multivariate_normal(design @ z, noise_cov).logpdf(observations))


def blr_problem(rng, n, d):
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    return x, y, 0.7, 1.3


def blr_as_linear_gaussian(x, y, s, t):
    n, d = x.shape
    return dict(prior_mean=np.zeros(d), prior_cov=t**2 * np.eye(d), design=x,
                observations=y, noise_cov=s**2 * np.eye(n))


# ----------------------------------------------------------- linear_gaussian
def test_linear_gaussian_posterior_and_evidence(x64, rng):
    prob = linear_gaussian_problem(rng)
    model = models.linear_gaussian(**prob)
    mean, cov, log_z = np_posterior(**prob)
    np.testing.assert_allclose(model.posterior.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(model.posterior.cov, cov, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(model.log_evidence, log_z, rtol=1e-10)
    assert model.is_conjugate
    np.testing.assert_allclose(model.latent, prob["prior_mean"])


@pytest.mark.slow
def test_linear_gaussian_log_joint_vmap_grad(x64, rng):
    prob = linear_gaussian_problem(rng)
    model = models.linear_gaussian(**prob)
    zs = rng.normal(size=(5, 4))
    got = jax.vmap(model.log_joint)(jnp.asarray(zs))
    want = [np_log_joint(z, **prob) for z in zs]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    g = jax.jit(jax.grad(model.log_joint))(jnp.asarray(zs[0]))
    h, r = prob["design"], prob["noise_cov"]
    want_g = (-np.linalg.solve(prob["prior_cov"], zs[0] - prob["prior_mean"])
              + h.T @ np.linalg.solve(r, prob["observations"] - h @ zs[0]))
    np.testing.assert_allclose(g, want_g, rtol=1e-10)


def test_log_joint_at_posterior_mode_has_zero_gradient(x64, rng):
    # Ties log_joint and posterior together: a Gaussian posterior's mean is the mode.
    prob = linear_gaussian_problem(rng)
    model = models.linear_gaussian(**prob)
    g = jax.grad(model.log_joint)(model.posterior.mean)
    np.testing.assert_allclose(g, np.zeros(4), atol=1e-10)
    # log p(x, z) - log p(z | x) = log p(x) at any z.
    z = jnp.asarray(rng.normal(size=4))
    np.testing.assert_allclose(model.log_joint(z) - model.posterior.log_prob(z),
                               model.log_evidence, rtol=1e-10)


# ----------------------------------------------------- bayesian_linear_regression
@pytest.mark.slow
@pytest.mark.parametrize("n,d", [(20, 4), (3, 6)], ids=["n>=d", "n<d"])
def test_blr_matches_numpy_and_linear_gaussian(x64, rng, n, d):
    x, y, s, t = blr_problem(rng, n, d)
    model = models.bayesian_linear_regression(x, y, noise_scale=s, prior_scale=t)
    prob = blr_as_linear_gaussian(x, y, s, t)
    mean, cov, log_z = np_posterior(**prob)
    np.testing.assert_allclose(model.posterior.mean, mean, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(model.posterior.cov, cov, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(model.log_evidence, log_z, rtol=1e-10)

    general = models.linear_gaussian(**prob)
    np.testing.assert_allclose(model.log_evidence, general.log_evidence, rtol=1e-10)
    np.testing.assert_allclose(model.posterior.mean, general.posterior.mean,
                               rtol=1e-10, atol=1e-13)
    zs = jnp.asarray(rng.normal(size=(4, d)))
    np.testing.assert_allclose(jax.vmap(model.log_joint)(zs),
                               [np_log_joint(np.asarray(z), **prob) for z in zs], rtol=1e-10)
    np.testing.assert_allclose(jax.vmap(model.log_joint)(zs),
                               jax.vmap(general.log_joint)(zs), rtol=1e-10)
    chex.assert_shape(model.latent, (d,))


def test_blr_log_joint_grad(x64, rng):
    x, y, s, t = blr_problem(rng, 10, 3)
    model = models.bayesian_linear_regression(x, y, noise_scale=s, prior_scale=t)
    w = rng.normal(size=3)
    g = jax.grad(model.log_joint)(jnp.asarray(w))
    np.testing.assert_allclose(g, x.T @ (y - x @ w) / s**2 - w / t**2, rtol=1e-10)


@pytest.mark.parametrize("n,d", [(20, 4), (3, 6)], ids=["n>=d", "n<d"])
def test_evidence_grad_through_constructor(x64, rng, n, d):
    # Constructors are traceable: differentiate log Z in the noise scale and the prior scale.
    x, y, s, t = blr_problem(rng, n, d)

    def log_z(noise_scale, prior_scale):
        return models.bayesian_linear_regression(
            x, y, noise_scale=noise_scale, prior_scale=prior_scale).log_evidence

    def np_log_z(noise_scale, prior_scale):
        return np_posterior(**blr_as_linear_gaussian(x, y, noise_scale, prior_scale))[2]

    gs, gt = jax.jit(jax.grad(log_z, argnums=(0, 1)))(s, t)
    h = 1e-5
    np.testing.assert_allclose(gs, (np_log_z(s + h, t) - np_log_z(s - h, t)) / (2 * h), rtol=1e-7)
    np.testing.assert_allclose(gt, (np_log_z(s, t + h) - np_log_z(s, t - h)) / (2 * h), rtol=1e-7)


@pytest.mark.slow
def test_linear_gaussian_traceable_under_jit_and_vmap(x64, rng):
    prob = linear_gaussian_problem(rng)

    def log_z(noise_var):
        p = dict(prob, noise_cov=noise_var * np.eye(6))
        return models.linear_gaussian(**p).log_evidence

    noise_vars = np.array([0.5, 1.0, 2.0])
    got = jax.jit(jax.vmap(log_z))(jnp.asarray(noise_vars))
    want = [np_posterior(**dict(prob, noise_cov=v * np.eye(6)))[2] for v in noise_vars]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    g = jax.grad(log_z)(1.0)
    h = 1e-5
    fd = (np_posterior(**dict(prob, noise_cov=(1 + h) * np.eye(6)))[2]
          - np_posterior(**dict(prob, noise_cov=(1 - h) * np.eye(6)))[2]) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-7)


# ------------------------------------------------------------- normal_mean
@pytest.mark.slow
def test_normal_mean_closed_form(x64, rng):
    x = rng.normal(loc=2.0, size=8)
    s, m0, t = 0.8, -0.5, 1.7
    model = models.normal_mean(x, noise_scale=s, prior_loc=m0, prior_scale=t)
    n = x.shape[0]
    post_prec = 1 / t**2 + n / s**2
    post_mean = (m0 / t**2 + x.sum() / s**2) / post_prec
    np.testing.assert_allclose(model.posterior.mean, [post_mean], rtol=1e-12)
    np.testing.assert_allclose(model.posterior.cov, [[1 / post_prec]], rtol=1e-12)
    log_z = stats.multivariate_normal(np.full(n, m0), s**2 * np.eye(n) + t**2).logpdf(x)
    np.testing.assert_allclose(model.log_evidence, log_z, rtol=1e-10)

    chex.assert_shape(model.latent, ())
    mus = np.array([-1.0, 0.3, 2.5])
    want = [stats.norm(m0, t).logpdf(mu) + stats.norm(mu, s).logpdf(x).sum() for mu in mus]
    np.testing.assert_allclose(jax.vmap(model.log_joint)(jnp.asarray(mus)), want, rtol=1e-12)
    g = jax.grad(model.log_joint)(0.3)
    np.testing.assert_allclose(g, -(0.3 - m0) / t**2 + (x - 0.3).sum() / s**2, rtol=1e-10)


# ----------------------------------------------------------------- dtypes
@pytest.mark.parametrize("which", ["linear_gaussian", "blr", "normal_mean", "logistic"])
def test_models_keep_the_data_dtype(dtype, rng, which):
    if which == "linear_gaussian":
        prob = {k: v.astype(dtype) for k, v in linear_gaussian_problem(rng).items()}
        model = models.linear_gaussian(**prob)
    elif which == "blr":
        x, y, _, _ = blr_problem(rng, 10, 3)
        model = models.bayesian_linear_regression(
            x.astype(dtype), y.astype(dtype), noise_scale=0.5, prior_scale=1.0)
    elif which == "normal_mean":
        model = models.normal_mean(rng.normal(size=5).astype(dtype), noise_scale=1.0,
                                   prior_loc=0.0, prior_scale=2.0)
    else:
        x = rng.normal(size=(10, 3)).astype(dtype)
        model = models.logistic_regression(x, (rng.random(10) < 0.5).astype(dtype))
    assert model.latent.dtype == dtype
    assert model.log_joint(model.latent).dtype == dtype
    if which != "logistic":
        assert model.log_evidence.dtype == dtype
        assert model.posterior.mean.dtype == dtype
        assert model.posterior.cov.dtype == dtype
        assert np.isfinite(float(model.log_evidence))


# ----------------------------------------------------------------- logistic
def test_logistic_regression_log_joint(x64, rng):
    x = rng.normal(size=(15, 3))
    y = (rng.random(15) < 0.5).astype(np.float64)
    tau = 1.5
    model = models.logistic_regression(x, y, prior_scale=tau)
    assert not model.is_conjugate
    assert model.posterior is None and model.log_evidence is None
    ws = rng.normal(size=(4, 3)) * 2

    def ref(w):
        logits = x @ w
        lik = np.sum(y * logits - np.logaddexp(0.0, logits))
        return lik + stats.norm(0.0, tau).logpdf(w).sum()

    np.testing.assert_allclose(jax.vmap(model.log_joint)(jnp.asarray(ws)),
                               [ref(w) for w in ws], rtol=1e-12)
    g = jax.grad(model.log_joint)(jnp.asarray(ws[0]))
    p = 1 / (1 + np.exp(-(x @ ws[0])))
    np.testing.assert_allclose(g, x.T @ (y - p) - ws[0] / tau**2, rtol=1e-10)


# Label data mostly arrive as integers or bools: cast to X's dtype, not rejected.
LABEL_FORMS = {
    "int64": lambda y: y.astype(np.int64),
    "bool": lambda y: y.astype(bool),
    "int32": lambda y: y.astype(np.int32),
    "uint8": lambda y: y.astype(np.uint8),
    "list": lambda y: [int(v) for v in y],
}


@pytest.mark.parametrize("form", list(LABEL_FORMS))
def test_logistic_regression_takes_integer_and_bool_labels(dtype, rng, form):
    x = rng.normal(size=(12, 3)).astype(dtype)
    y = rng.random(12) < 0.5
    model = models.logistic_regression(x, LABEL_FORMS[form](y), prior_scale=1.5)
    assert model.latent.dtype == dtype
    ws = (2.0 * rng.normal(size=(4, 3))).astype(dtype)
    got = jax.vmap(model.log_joint)(jnp.asarray(ws))
    assert got.dtype == dtype
    # The same numbers as float labels, and as an independent NumPy log joint.
    same = models.logistic_regression(x, y.astype(dtype), prior_scale=1.5)
    np.testing.assert_array_equal(got, jax.vmap(same.log_joint)(jnp.asarray(ws)))
    x64_, w64 = x.astype(np.float64), ws.astype(np.float64)
    logits = w64 @ x64_.T
    want = (np.sum(y * logits - np.logaddexp(0.0, logits), axis=1)
            + stats.norm(0.0, 1.5).logpdf(w64).sum(axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
    q = vijax.Gaussian.diagonal(jnp.asarray(ws[0]), jnp.full(3, 0.5, dtype))
    np.testing.assert_array_equal(model.expected_log_joint(q), same.expected_log_joint(q))


def test_logistic_regression_casts_traced_integer_labels(rng):
    # A model built under jit: the labels are a tracer, cast without value checks.
    x = rng.normal(size=(10, 2)).astype(np.float32)
    y = (rng.random(10) < 0.5).astype(np.int32)
    w = jnp.asarray([0.3, -1.2], jnp.float32)
    value = jax.jit(lambda y: models.logistic_regression(x, y).log_joint(w))(y)
    assert value.dtype == jnp.float32
    want = models.logistic_regression(x, y.astype(np.float32)).log_joint(w)
    np.testing.assert_allclose(value, want, rtol=1e-6)


@pytest.mark.parametrize("y, error, fragments", [
    (np.array([0, 1, 2, 0]), ValueError, ("`y` must hold 0.0 or 1.0", "got 2")),
    (np.array([0, -1, 1, 0], np.int8), ValueError, ("`y`", "got -1")),
    (np.array([0, 1, 1, 0], np.complex64), TypeError, ("`y`", "complex64")),
    (np.array(["0", "1", "1", "0"]), TypeError, ("`y`", "<U1")),
    (np.array([0, 1, 1], np.int32), ValueError, ("`y` must have shape (4,)", "(3,)")),
    (np.ones((1, 4), bool), ValueError, ("`y` must have shape (4,)", "(1, 4)")),
])
def test_logistic_regression_rejects_bad_labels(y, error, fragments):
    with pytest.raises(error) as info:
        models.logistic_regression(np.ones((4, 2), np.float32), y)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_logistic_regression_still_needs_floating_x():
    with pytest.raises(TypeError, match="`X` must have a floating-point dtype"):
        models.logistic_regression(np.ones((4, 2), np.int32), np.array([0, 1, 1, 0]))


@pytest.mark.slow
def test_float64_scales_do_not_promote_float32_data(x64, rng):
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=8).astype(np.float32)
    s, t = jnp.asarray(0.5, jnp.float64), jnp.asarray(2.0, jnp.float64)
    for model in (
        models.bayesian_linear_regression(x, y, noise_scale=s, prior_scale=t),
        models.normal_mean(y, noise_scale=s, prior_loc=t, prior_scale=t),
        models.logistic_regression(x, (y > 0).astype(np.float32), prior_scale=t),
    ):
        assert model.log_joint(model.latent).dtype == np.float32, model.name
        if model.is_conjugate:
            assert model.log_evidence.dtype == np.float32, model.name
            assert model.posterior.mean.dtype == np.float32, model.name


# ------------------------------------------------- lazy exact quantities
CLOSED_FORMS = {"blr": "_isotropic_closed_form", "normal_mean": "_isotropic_closed_form",
                "linear_gaussian": "_linear_gaussian_closed_form"}


def count_calls(monkeypatch, name):
    """Replaces `_conjugate.<name>` by a wrapper that counts its calls (each a trace or run)."""
    calls = []
    original = getattr(_conjugate, name)

    def counted(*args):
        calls.append(name)
        return original(*args)

    monkeypatch.setattr(_conjugate, name, counted)
    return calls


def build(which, rng, **scales):
    """The model `which` on a small problem, with its NumPy posterior mean and log evidence."""
    if which == "linear_gaussian":
        prob = linear_gaussian_problem(rng)
    elif which == "blr":
        x, y, s, t = blr_problem(rng, 12, 3)
        s, t = scales.get("noise_scale", s), scales.get("prior_scale", t)
        prob = blr_as_linear_gaussian(x, y, s, t)
    else:
        x, s, m0, t = rng.normal(size=7), 0.8, -0.5, 1.7
        prob = dict(prior_mean=np.full(1, m0), prior_cov=t**2 * np.eye(1),
                    design=np.ones((7, 1)), observations=x, noise_cov=s**2 * np.eye(7))
    mean, _, log_z = np_posterior(**prob)

    def make():
        if which == "linear_gaussian":
            return models.linear_gaussian(**prob)
        if which == "blr":
            return models.bayesian_linear_regression(x, y, noise_scale=s, prior_scale=t)
        return models.normal_mean(x, noise_scale=s, prior_loc=m0, prior_scale=t)

    return make, mean, log_z


@pytest.mark.parametrize("which", list(CLOSED_FORMS))
def test_exact_quantities_are_computed_on_first_access_then_cached(x64, rng, monkeypatch, which):
    calls = count_calls(monkeypatch, CLOSED_FORMS[which])
    grams = count_calls(monkeypatch, "_gram")
    make, mean, log_z = build(which, rng)
    model = make()
    assert model.is_conjugate
    model.log_joint(model.latent)
    jax.jit(jax.grad(model.log_joint))(model.latent)
    assert calls == [] and grams == []
    assert "posterior=<computed on first access>" in repr(model)

    np.testing.assert_allclose(model.posterior.mean, mean, rtol=1e-10)  # computes both
    assert len(calls) == 1
    np.testing.assert_allclose(model.log_evidence, log_z, rtol=1e-10)
    np.testing.assert_allclose(model._replace(name="copy").posterior.mean, mean, rtol=1e-10)
    assert len(calls) == 1  # the second access and a copy's access reuse the cache
    assert "<computed on first access>" not in repr(model)


@pytest.mark.parametrize("which", list(CLOSED_FORMS))
def test_posterior_first_accessed_inside_jit_is_cached_concrete(x64, rng, monkeypatch, which):
    calls = count_calls(monkeypatch, CLOSED_FORMS[which])
    make, mean, log_z = build(which, rng)
    model = make()
    assert calls == []

    @jax.jit
    def evidence_gap(z):
        return model.log_joint(z) - model.posterior.log_prob(jnp.reshape(z, (-1,)))

    z = model.latent + 0.3
    np.testing.assert_allclose(evidence_gap(z), log_z, rtol=1e-10)
    assert calls  # a traced call, then one at trace time: nothing is called again below
    first = len(calls)
    # Afterwards, outside the trace: concrete cached values, not leaked tracers.
    assert not isinstance(model.posterior.mean, jax.core.Tracer)
    assert not isinstance(model.log_evidence, jax.core.Tracer)
    np.testing.assert_allclose(model.posterior.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(model.log_evidence, log_z, rtol=1e-10)
    np.testing.assert_allclose(evidence_gap(z + 1.0), log_z, rtol=1e-10)
    np.testing.assert_allclose(jax.jit(lambda: model.log_evidence)(), log_z, rtol=1e-10)
    assert len(calls) == first


@pytest.mark.parametrize("which", list(CLOSED_FORMS))
def test_exact_elbo_first_called_inside_jit_then_eagerly(x64, rng, which):
    # expected_log_joint's lazy precomputation (X^T X, Lr^{-1} H) must not leak tracers either.
    make, _, log_z = build(which, rng)
    model = make()
    family = vijax.full_rank()
    params = family.init(model.latent)
    jitted = jax.jit(lambda p: (vijax.exact_elbo(p, family, model),
                                vijax.exact_kl(p, family, model)))(params)
    eager = (vijax.exact_elbo(params, family, model), vijax.exact_kl(params, family, model))
    chex.assert_trees_all_close(jitted, eager, rtol=1e-10)
    np.testing.assert_allclose(eager[0] + eager[1], log_z, rtol=1e-10)


@pytest.mark.slow
def test_models_built_from_tracers_are_traceable_and_cache_nothing(x64, rng, monkeypatch):
    calls = count_calls(monkeypatch, "_isotropic_closed_form")
    x, y, _, t = blr_problem(rng, 12, 3)
    built = []

    def log_z(noise_scale):
        model = models.bayesian_linear_regression(x, y, noise_scale=noise_scale, prior_scale=t)
        built.append(model)
        return model.log_evidence + 0.0 * jnp.sum(model.posterior.mean)

    def np_log_z(s):
        return np_posterior(**blr_as_linear_gaussian(x, y, s, t))[2]

    h = 1e-5
    fd = (np_log_z(0.7 + h) - np_log_z(0.7 - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(log_z)(0.7), fd, rtol=1e-7)
    np.testing.assert_allclose(jax.jit(jax.grad(log_z))(0.7), fd, rtol=1e-7)
    scales = np.array([0.5, 0.7, 2.0])
    np.testing.assert_allclose(jax.vmap(log_z)(jnp.asarray(scales)),
                               [np_log_z(s) for s in scales], rtol=1e-10)
    np.testing.assert_allclose(jax.jit(jax.vmap(log_z))(jnp.asarray(scales)),
                               [np_log_z(s) for s in scales], rtol=1e-10)
    # Each traced model computed per access (posterior and log evidence: twice)
    # and cached nothing, so no tracer outlives its trace.
    assert len(built) == 4 and len(calls) == 8
    assert all("posterior=<computed on first access>" in repr(m) for m in built)


def test_model_record_keywords_replace_and_repr():
    def log_joint(z):
        return -0.5 * jnp.sum(jnp.square(z))

    model = models.Model(log_joint=log_joint, latent=jnp.zeros(2), name="toy")
    assert not model.is_conjugate and model.posterior is None and model.log_evidence is None
    assert repr(model) == (
        "Model(log_joint=<function test_model_record_keywords_replace_and_repr.<locals>."
        "log_joint>, latent=float32[2], posterior=None, log_evidence=None, "
        "expected_log_joint=None, name='toy', constrain=None)")
    other = model._replace(latent={"w": jnp.zeros(3)}, name="renamed")
    assert (other.name, model.name) == ("renamed", "toy")
    assert other.log_joint is log_joint and repr(other.latent) != repr(model.latent)
    with pytest.raises(AttributeError, match="immutable"):
        model.name = "changed"
    assert copy.copy(model) is model and copy.deepcopy(model) is model
    with pytest.raises(TypeError, match="unexpected keyword"):
        model._replace(nmae="typo")
