"""GLM expectations by quadrature: ``vijax.models._glm`` and logistic regression's exact ELBO.

``expected_softplus`` is checked against SciPy's adaptive quadrature (an
independent reference) over spreads from 0.01 to 300, its gradients against
finite differences on both sides of its switch; ``predictor_moments`` against
dense NumPy covariances; logistic regression's ``expected_log_joint`` against
the same SciPy quadrature, and ``grad exact_elbo`` against the Monte Carlo
gradient of ``vijax.elbo`` within its standard error.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from scipy import stats

import vijax
from vijax import models
from vijax.models import _glm

SPREADS = [0.01, 0.1, 0.5, 1.0, 1.9, 2.0, 2.1, 3.0, 10.0, 80.0, 300.0]
MEANS = [-200.0, -30.0, -3.0, -0.3, 0.0, 0.7, 4.0, 150.0]


def quad_softplus(m: float, s: float) -> float:
    """``E[softplus(t)]`` by adaptive quadrature, breaking at 0 and at m."""

    def f(t):
        return np.logaddexp(0.0, t) * math.exp(-0.5 * ((t - m) / s) ** 2) / (
            s * math.sqrt(2 * math.pi))

    lo, hi = m - 40 * s, m + 40 * s
    points = sorted({p for p in (0.0, m) if lo < p < hi}) or None
    return scipy.integrate.quad(f, lo, hi, points=points, limit=2000,
                                epsabs=1e-13, epsrel=1e-13)[0]


def test_expected_softplus_matches_adaptive_quadrature_at_every_spread():
    m, s = (np.array(a, np.float64) for a in np.meshgrid(MEANS, SPREADS))
    with jax.enable_x64(True):
        got = np.asarray(_glm.expected_softplus(jnp.asarray(m), jnp.asarray(s)))
    want = np.vectorize(quad_softplus)(m, s)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # The test can fail: plain 64-point Gauss-Hermite is far off at wide spreads.
    gh = np.logaddexp(0.0, 0.7 + 80.0 * _glm._GH_NODES) @ _glm._GH_WEIGHTS
    assert abs(gh - quad_softplus(0.7, 80.0)) > 0.1


def test_expected_softplus_is_finite_and_close_in_float32():
    m = jnp.asarray([-3.0, 0.7, 40.0], jnp.float32)
    for s in (0.5, 80.0):
        got = _glm.expected_softplus(m, jnp.full(3, s, jnp.float32))
        assert got.dtype == jnp.float32
        want = np.array([quad_softplus(float(x), s) for x in m])
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [1.0, 1.999, 2.001, 80.0])
def test_expected_softplus_gradients_match_finite_differences(s):
    with jax.enable_x64(True):
        f = lambda m, s: _glm.expected_softplus(m, s)  # noqa: E731
        gm, gs = jax.grad(f, argnums=(0, 1))(jnp.float64(0.7), jnp.float64(s))
        h = 1e-5
        fd_m = (f(0.7 + h, s) - f(0.7 - h, s)) / (2 * h)
        fd_s = (f(0.7, s + h) - f(0.7, s - h)) / (2 * h)
    # Stein's lemma: dE/dm = E[sigmoid(t)], dE/ds = s E[sigmoid'(t)]; both finite.
    assert np.isfinite(float(gm)) and np.isfinite(float(gs))
    np.testing.assert_allclose([float(gm), float(gs)], [float(fd_m), float(fd_s)],
                               rtol=1e-6, atol=1e-9)


def _gaussians(rng, d):
    """A diagonal, a low-rank, a full-rank and a precision-form Gaussian, with dense covs."""
    mean = jnp.asarray(rng.normal(size=d))
    sd = rng.uniform(0.3, 1.5, size=d)
    w = rng.normal(size=(d, 2)) * 0.5
    tril = np.tril(rng.normal(size=(d, d)) * 0.3, -1) + np.diag(sd)
    prec_tril = np.linalg.cholesky(np.linalg.inv(tril @ tril.T))
    return [
        (vijax.Gaussian(mean, vijax.DiagonalScale(jnp.asarray(sd))), np.diag(sd**2)),
        (vijax.Gaussian(mean, vijax.LowRankScale(jnp.asarray(w), jnp.asarray(sd))),
         w @ w.T + np.diag(sd**2)),
        (vijax.Gaussian(mean, vijax.CholeskyScale(jnp.asarray(tril))), tril @ tril.T),
        (vijax.Gaussian(mean, vijax.PrecisionScale(jnp.asarray(prec_tril))), tril @ tril.T),
    ]


def test_predictor_moments_match_dense_covariances(x64, rng):
    x = rng.normal(size=(7, 5))
    x[3] = 0.0  # a zero row: sd 0, and a finite gradient
    for (q, cov), x_sq in itertools.product(_gaussians(rng, 5), [None, np.square(x)]):
        # With x_sq the diagonal and low-rank scales take their one-matvec path.
        m, s = _glm.predictor_moments(q, jnp.asarray(x), x_sq)
        np.testing.assert_allclose(m, x @ np.asarray(q.mean), rtol=1e-12)
        np.testing.assert_allclose(s, np.sqrt(np.einsum("id,de,ie->i", x, cov, x)),
                                   rtol=1e-10, atol=1e-12)
        g = jax.grad(lambda q: jnp.sum(_glm.predictor_moments(q, jnp.asarray(x), x_sq)[1]))(q)
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(g))


def _logistic(rng, n=9, d=4, dtype=np.float64):
    x = rng.normal(size=(n, d)).astype(dtype)
    y = (rng.random(n) < 0.5).astype(dtype)
    return x, y


def test_logistic_expected_log_joint_matches_adaptive_quadrature(x64, rng):
    x, y = _logistic(rng)
    tau = 1.3
    model = models.logistic_regression(x, y, prior_scale=tau)
    assert not model.is_conjugate and model.expected_log_joint is not None
    for q, cov in _gaussians(rng, 4):
        mean = np.asarray(q.mean)
        m = x @ mean
        s = np.sqrt(np.einsum("id,de,ie->i", x, cov, x))
        lik = np.sum(y * m - np.vectorize(quad_softplus)(m, s))
        # E log N(w; 0, tau^2 I) = sum_j log N(mean_j; 0, tau^2) - tr(cov) / (2 tau^2).
        pri = stats.norm(0.0, tau).logpdf(mean).sum() - np.trace(cov) / (2 * tau**2)
        np.testing.assert_allclose(model.expected_log_joint(q), lik + pri, rtol=0, atol=1e-9)


@pytest.mark.parametrize("family", [vijax.mean_field(), vijax.low_rank(rank=2),
                                    vijax.full_rank()], ids=["mf", "lr", "fr"])
def test_logistic_exact_elbo_gradient_is_the_monte_carlo_gradient(x64, rng, family):
    """``grad exact_elbo`` equals the mean of reparameterized gradients within 5 s.e.

    The s.e. of each coordinate is computed here from 4000 independent
    one-draw gradients; the test fails if the quadrature's gradient (or its
    sign convention) is off by more than sampling noise.
    """
    x, y = _logistic(rng, n=12, d=3)
    model = models.logistic_regression(x, y)
    params = family.init(model.latent)
    params = jax.tree_util.tree_map(
        lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape)), params)
    exact = jax.flatten_util.ravel_pytree(jax.grad(vijax.exact_elbo)(params, family, model))[0]

    def one(key):
        g = jax.grad(vijax.elbo, argnums=1)(key, params, family, model.log_joint,
                                            num_samples=1, estimator="closed_entropy")
        return jax.flatten_util.ravel_pytree(g)[0]

    draws = jax.vmap(one)(jax.random.split(jax.random.key(3), 4000))
    se = np.std(draws, axis=0, ddof=1) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(np.mean(draws, axis=0) - exact) < 5 * se + 1e-10)
    # And the ELBO value: the exact one is within 5 s.e. of a Monte Carlo mean.
    vals = jax.vmap(lambda k: vijax.elbo(k, params, family, model.log_joint, num_samples=1,
                                         estimator="closed_entropy"))(
        jax.random.split(jax.random.key(4), 4000))
    assert abs(float(np.mean(vals)) - float(vijax.exact_elbo(params, family, model))) < (
        5 * np.std(vals, ddof=1) / np.sqrt(vals.shape[0]))


def test_logistic_exact_elbo_in_float32(rng):
    x, y = _logistic(rng, dtype=np.float32)
    model = models.logistic_regression(x, y)
    family = vijax.mean_field()
    params = family.init(model.latent)
    value = vijax.exact_elbo(params, family, model)
    assert value.dtype == jnp.float32
    with jax.enable_x64(True):
        model64 = models.logistic_regression(x.astype(np.float64), y.astype(np.float64))
        params64 = family.init(model64.latent)
        want = float(vijax.exact_elbo(params64, family, model64))
    np.testing.assert_allclose(float(value), want, rtol=1e-5)


def test_poisson_glm_expected_log_joint_is_its_closed_form(x64, rng):
    """The zoo's Poisson GLM: ``E_q[log p]`` in NumPy (``E exp(t) = exp(m + s^2/2)``).

    Also within 5 s.e. of a Monte Carlo mean of ``log_joint`` under ``q``,
    with the pytree latent ``{"intercept", "w"}`` in ravel order.
    """
    from scipy.special import gammaln

    x = rng.normal(size=(30, 3)) * 0.5
    y = rng.poisson(np.exp(0.5 + x @ np.array([0.3, -0.2, 0.1]))).astype(np.float64)
    model = models.poisson_glm(x=x, y=y)
    design = np.concatenate([np.ones((30, 1)), x], axis=1)  # [intercept, w]
    for q, cov in _gaussians(rng, 4):
        q = vijax.Gaussian(q.mean * 0.3, q.scale)
        mean = np.asarray(q.mean)
        m = design @ mean
        v = np.einsum("id,de,ie->i", design, cov, design)
        lik = np.sum(y * m - np.exp(m + v / 2) - gammaln(y + 1))
        prior = stats.norm.logpdf(mean).sum() - np.trace(cov) / 2
        got = float(model.expected_log_joint(q))
        np.testing.assert_allclose(got, lik + prior, rtol=1e-12)
    # Monte Carlo, through the pytree latent (the last q: precision form).
    z = np.asarray(q.sample(jax.random.key(0), (20000,)))
    lj = jax.vmap(lambda f: model.log_joint({"intercept": f[0], "w": f[1:]}))(jnp.asarray(z))
    assert abs(float(jnp.mean(lj)) - got) < 5 * float(jnp.std(lj)) / np.sqrt(z.shape[0])


def test_fit_exact_on_a_pytree_latent(x64):
    from vijax.models._zoo import poisson_glm_data

    model = models.poisson_glm(**poisson_glm_data(0))  # float64 data (the default is float32)
    family = vijax.mean_field()
    result = vijax.fit_exact(family, model, family.init(model.latent), tol=1e-8)
    assert result.converged, result.message
    assert set(result.params.loc) == {"intercept", "w"}
    # Stationary: the exact ELBO's gradient vanishes (float64).
    assert result.grad_norm < 1e-4
    # And the mean-field optimum sits near the long-NUTS posterior means
    # (intercept about 1 for the synthetic data drawn at intercept 1).
    assert abs(float(result.params.loc["intercept"]) - 1.0) < 0.15
