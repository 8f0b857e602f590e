"""Tests for vijax._gaussian: every scale structure against NumPy/SciPy references."""

import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import vijax
from vijax._gaussian import expected_log_prob
from references import exact_solve, np_kl

KINDS = ("diagonal", "cholesky", "low_rank", "low_rank_precision", "precision")
D = 4


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def make_gaussian(kind, rng, d=D, k=2):
    """Returns (Gaussian, mean, dense covariance), the covariance built in NumPy."""
    mean = rng.normal(size=d)
    if kind == "diagonal":
        s = rng.uniform(0.5, 2.0, size=d)
        return vijax.Gaussian.diagonal(mean, s), mean, np.diag(s**2)
    if kind == "cholesky":
        tril = np.tril(rng.normal(size=(d, d)), -1) + np.diag(rng.uniform(0.5, 2.0, d))
        return vijax.Gaussian.from_cholesky(mean, tril), mean, tril @ tril.T
    if kind == "low_rank":
        w = rng.normal(size=(d, k))
        s = rng.uniform(0.5, 2.0, size=d)
        return vijax.Gaussian.low_rank(mean, w, s), mean, w @ w.T + np.diag(s**2)
    if kind == "low_rank_precision":
        u = rng.normal(size=(d, k))
        s = rng.uniform(0.5, 2.0, size=d)
        cov = np.linalg.inv(u @ u.T + np.diag(s**-2.0))
        return vijax.Gaussian.low_rank_precision(mean, u, s), mean, cov
    if kind == "precision":
        tril = np.tril(rng.normal(size=(d, d)), -1) + np.diag(rng.uniform(0.5, 2.0, d))
        cov = np.linalg.inv(tril @ tril.T)
        return vijax.Gaussian.from_precision_cholesky(mean, tril), mean, cov
    raise AssertionError(kind)


# --------------------------------------------------------------- densities
@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_scipy_batched(x64, rng, kind):
    q, mean, cov = make_gaussian(kind, rng)
    x = rng.normal(size=(3, 5, D)) * 2.0
    got = q.log_prob(jnp.asarray(x))
    chex.assert_shape(got, (3, 5))
    want = stats.multivariate_normal(mean, cov).logpdf(x)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # A single point gives a scalar.
    np.testing.assert_allclose(q.log_prob(x[0, 0]), want[0, 0], rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_entropy_cov_variance_match_numpy(x64, rng, kind):
    q, mean, cov = make_gaussian(kind, rng)
    np.testing.assert_allclose(q.entropy(), stats.multivariate_normal(mean, cov).entropy(),
                               rtol=1e-10)
    np.testing.assert_allclose(q.cov, cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q.variance, np.diag(cov), rtol=1e-10)
    assert q.dim == D


@pytest.mark.parametrize("kind", KINDS)
def test_sample_moments(x64, rng, kind):
    q, mean, cov = make_gaussian(kind, rng, d=3)
    n = 40_000
    x = np.asarray(q.sample(jax.random.key(1), (n,)))
    assert x.shape == (n, 3)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean)
    # With the mean known, (x_i - m)(x_j - m) averages to cov_ij; its SE from the sample.
    r = x - mean
    prods = r[:, :, None] * r[:, None, :]
    se_cov = prods.std(0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(prods.mean(0) - cov) < 5 * se_cov)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_shape_and_dtype(dtype, rng, kind):
    q, _, _ = make_gaussian(kind, rng)
    q = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), q)
    x = q.sample(jax.random.key(0), (2, 7))
    chex.assert_shape(x, (2, 7, D))
    assert x.dtype == dtype
    assert q.log_prob(x).dtype == dtype
    assert q.entropy().dtype == dtype
    assert np.all(np.isfinite(np.asarray(q.log_prob(x))))


def test_sample_accepts_legacy_keys_and_int_shape(x64, rng):
    q, _, _ = make_gaussian("low_rank", rng)
    a = q.sample(jax.random.PRNGKey(3), (4,))
    b = q.sample(jax.random.key(3), 4)
    np.testing.assert_array_equal(a, b)
    chex.assert_shape(q.sample(jax.random.key(3)), (D,))


# ---------------------------------------------------------------------- KL
@pytest.mark.parametrize("qkind,pkind", list(itertools.product(KINDS, KINDS)))
def test_gaussian_kl_all_pairs(x64, rng, qkind, pkind):
    q, mq, cq = make_gaussian(qkind, rng)
    p, mp, cp = make_gaussian(pkind, rng)
    np.testing.assert_allclose(vijax.gaussian_kl(q, p), np_kl(mq, cq, mp, cp), rtol=1e-10)


@pytest.mark.parametrize("qkind,pkind", list(itertools.product(KINDS, KINDS)))
def test_expected_log_prob_all_pairs(x64, rng, qkind, pkind):
    q, mq, cq = make_gaussian(qkind, rng)
    p, mp, cp = make_gaussian(pkind, rng)
    diff = mq - mp
    want = -0.5 * (
        D * np.log(2 * np.pi)
        + np.linalg.slogdet(cp)[1]
        + np.trace(np.linalg.solve(cp, cq))
        + diff @ np.linalg.solve(cp, diff)
    )
    np.testing.assert_allclose(expected_log_prob(p, q), want, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_to_itself_is_zero(x64, rng, kind):
    q, _, _ = make_gaussian(kind, rng)
    assert abs(float(vijax.gaussian_kl(q, q))) < 1e-12


def test_kl_between_representations_of_one_distribution_is_zero(x64, rng):
    # The same distribution as a dense covariance and as a precision.
    _, mean, cov = make_gaussian("low_rank", rng)
    a = vijax.Gaussian.from_cov(mean, cov)
    b = vijax.Gaussian.from_precision(mean, np.linalg.inv(cov))
    c, _, _ = make_gaussian("low_rank", np.random.default_rng(20261125))
    assert abs(float(vijax.gaussian_kl(a, b))) < 1e-10
    assert abs(float(vijax.gaussian_kl(b, a))) < 1e-10
    assert abs(float(vijax.gaussian_kl(c, a))) < 1e-10  # same seed, same numbers


@pytest.mark.slow
def test_kl_grad_under_jit_and_vmap(x64, rng):
    q, mq, cq = make_gaussian("low_rank", rng)
    p, mp, cp = make_gaussian("precision", rng)

    def kl_at(m):
        return vijax.gaussian_kl(q._replace(mean=m), p)

    g = jax.jit(jax.grad(kl_at))(jnp.asarray(mq))
    np.testing.assert_allclose(g, np.linalg.solve(cp, mq - mp), rtol=1e-10)

    means = rng.normal(size=(3, D))
    got = jax.vmap(kl_at)(jnp.asarray(means))
    want = [np_kl(m, cq, mp, cp) for m in means]
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.slow
def test_structured_kl_stays_structured():
    # Dense d x d matrices here would need ~ 80 GB; diagonal and low-rank KLs must not form them.
    d = 100_000
    mean = jnp.zeros(d)
    q = vijax.Gaussian.diagonal(mean, jnp.full(d, 2.0))
    p = vijax.Gaussian.low_rank(mean + 1.0, jnp.ones((d, 1)) * 0.01, jnp.ones(d))
    assert np.isfinite(float(jax.jit(vijax.gaussian_kl)(q, p)))
    assert np.isfinite(float(jax.jit(vijax.gaussian_kl)(p, q)))
    assert np.isfinite(float(jax.jit(vijax.gaussian_kl)(q, q)))
    assert np.all(np.isfinite(np.asarray(p.log_prob(p.sample(jax.random.key(0), (2,))))))


# ------------------------------------------------------------ constructors
def test_constructors_match_dense(x64, rng):
    mean = rng.normal(size=D)
    cov = _spd(rng, D)
    np.testing.assert_allclose(vijax.Gaussian.from_cov(mean, cov).cov, cov, rtol=1e-10)
    prec = _spd(rng, D)
    np.testing.assert_allclose(
        vijax.Gaussian.from_precision(mean, prec).cov, np.linalg.inv(prec), rtol=1e-10
    )
    # Only the lower triangle of a Cholesky factor is used.
    full = rng.normal(size=(D, D)) + 3 * np.eye(D)
    low = np.tril(full)
    np.testing.assert_allclose(
        vijax.Gaussian.from_cholesky(mean, full).cov, low @ low.T, rtol=1e-10
    )
    np.testing.assert_allclose(
        vijax.Gaussian.from_precision_cholesky(mean, full).cov,
        np.linalg.inv(low @ low.T), rtol=1e-10,
    )


def test_gaussian_is_a_pytree_under_vmap(x64, rng):
    means = rng.normal(size=(3, D))
    scales = rng.uniform(0.5, 2.0, size=(3, D))
    qs = jax.vmap(lambda m, s: vijax.Gaussian(m, vijax.DiagonalScale(s)))(means, scales)
    got = jax.vmap(lambda q: q.entropy())(qs)
    want = [stats.multivariate_normal(m, np.diag(s**2)).entropy() for m, s in zip(means, scales)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_constructor_errors(rng):
    mean = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=re.escape("`scale` must be positive; got")):
        vijax.Gaussian.diagonal(mean, np.array([1.0, 0.0, 1.0], np.float32))
    with pytest.raises(ValueError, match=re.escape("`scale` must have shape (3,); got shape (2,)")):
        vijax.Gaussian.diagonal(mean, np.ones(2, np.float32))
    with pytest.raises(ValueError, match=re.escape("`mean` must have 1 dimension(s)")):
        vijax.Gaussian.diagonal(np.zeros((3, 1), np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError, match="`mean` must have a floating-point dtype"):
        vijax.Gaussian.diagonal(np.zeros(3, np.int32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match=re.escape("`cov` must be a square (d, d) matrix; got shape (3, 2)")):
        vijax.Gaussian.from_cov(mean, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="`cov` must be symmetric"):
        vijax.Gaussian.from_cov(mean, np.array([[2, 1, 0], [0, 2, 0], [0, 0, 2]], np.float32))
    with pytest.raises(ValueError, match="`cov` must be positive definite; .* -1"):
        vijax.Gaussian.from_cov(mean, np.diag(np.array([1.0, -1.0, 1.0], np.float32)))
    with pytest.raises(ValueError, match=re.escape("`cov` must have shape (3, 3); got shape (2, 2)")):
        vijax.Gaussian.from_cov(mean, np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="`precision` must be positive definite"):
        vijax.Gaussian.from_precision(mean, -np.eye(3, dtype=np.float32))
    singular = np.tril(np.ones((3, 3), np.float32)) - np.diag(np.array([0, 1, 0], np.float32))
    with pytest.raises(ValueError, match=re.escape("`tril` must have a non-zero diagonal")
                       + ".*" + re.escape("tril[1, 1] = 0.0")):
        vijax.Gaussian.from_cholesky(mean, singular)
    with pytest.raises(ValueError, match="`tril` must have a non-zero diagonal"):
        vijax.Gaussian.from_precision_cholesky(mean, singular)
    with pytest.raises(ValueError, match=re.escape("`tril` must have shape (3, 3)")):
        vijax.Gaussian.from_cholesky(mean, np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match=re.escape("`cov_factor` must have shape (3, k); got shape (2, 1)")):
        vijax.Gaussian.low_rank(mean, np.ones((2, 1), np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="`diag_scale` must be positive"):
        vijax.Gaussian.low_rank(mean, np.ones((3, 1), np.float32), -np.ones(3, np.float32))


def test_kl_argument_errors(rng):
    q = vijax.Gaussian.diagonal(np.zeros(3, np.float32), np.ones(3, np.float32))
    p = vijax.Gaussian.diagonal(np.zeros(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="same dimension; got 3 and 2"):
        vijax.gaussian_kl(q, p)
    with pytest.raises(TypeError, match="`q` and `p` must be vijax.Gaussian"):
        vijax.gaussian_kl(q, (np.zeros(3), np.eye(3)))


@pytest.mark.parametrize("dtype,tiny", [(np.float64, 1e-9), (np.float32, 1e-4)])
def test_low_rank_logdet_stays_exact_where_diagonal_sds_head_to_0(rng, dtype, tiny):
    """The boundary optimum of a low-rank fit: W carries some coordinates while their
    diagonal sds head to 0. The covariance itself stays well conditioned there, so
    NumPy's slogdet of the dense matrix (float64) is exact; the Woodbury form must
    follow it. Through the Cholesky of the capacitance ``I + W^T D^{-2} W`` (which
    squares its condition number) the error was 3.7 nats here (1.9 in float32), and
    a fit maximized that error (ELBOs up to 10 nats above the family's optimum)."""
    d, k = 7, 3
    w = rng.normal(size=(d, k))
    sd = rng.uniform(0.5, 1.5, size=d)
    sd[:2] = tiny * np.array([1.0, 0.3])  # fewer than k: C keeps O(1) eigenvalues
    cov = w @ w.T + np.diag(sd ** 2)
    want = np.linalg.slogdet(cov)[1]
    with jax.enable_x64(dtype == np.float64):
        scale = vijax.LowRankScale(jnp.asarray(w, dtype), jnp.asarray(sd, dtype))
        got = float(jax.jit(lambda s: s.logdet())(scale))
        grad = jax.grad(lambda s: s.logdet())(scale)
    assert abs(got - want) < (1e-9 if dtype == np.float64 else 2e-3), (got, want)
    # d logdet / dW = 2 cov^{-1} W, finite and exact (cov is well conditioned).
    want_grad = 2.0 * np.linalg.solve(cov, w)
    np.testing.assert_allclose(np.asarray(grad.cov_factor, np.float64), want_grad,
                               rtol=1e-6 if dtype == np.float64 else 5e-2,
                               atol=1e-6 if dtype == np.float64 else 5e-2)


@pytest.mark.parametrize("dtype,tiny,tol", [(np.float64, 1e-6, 1e-9), (np.float32, 1e-3, 1e-4)])
def test_low_rank_log_prob_stays_exact_where_diagonal_sds_head_to_0(rng, dtype, tiny, tol):
    """log q at q's own draws near a boundary optimum, and its gradients in z and W.

    Woodbury's ``|D^{-1/2} r|^2 - |L^{-1} W^T D^{-1} r|^2`` is a difference of
    numbers ~1/sd^2 large there: in float32, at sds 1e-3 times W's rows, the
    Mahalanobis distance of a draw was off by up to 79 and its gradient (what
    the STL estimator uses) by 3x; in float64 at 1e-6, by 0.3. Checked against
    NumPy's dense solve, and the second derivative (the custom JVP's own
    derivative) against 2 cov^{-1}.
    """
    d, k = 7, 3
    w = rng.normal(size=(d, k))
    sd = rng.uniform(0.5, 1.5, size=d)
    sd[:2] = tiny * np.array([1.0, 0.3])
    cov = w @ w.T + np.diag(sd ** 2)
    r = rng.normal(size=(50, k)) @ w.T + rng.normal(size=(50, d)) * sd  # draws of q - mean
    r = np.concatenate([r, rng.normal(size=(10, d))])  # and points off q's bulk
    want = np.einsum("sd,sd->s", r, np.linalg.solve(cov, r.T).T)
    with jax.enable_x64(dtype == np.float64):
        scale = vijax.LowRankScale(jnp.asarray(w, dtype), jnp.asarray(sd, dtype))
        rj = jnp.asarray(r, dtype)
        got = jax.jit(scale.mahalanobis)(rj)
        grad_r = jax.grad(lambda x: scale.mahalanobis(x).sum())(rj)
        grad_w = jax.grad(lambda s: s.mahalanobis(rj).sum())(scale).cov_factor
        grad_sd = jax.grad(lambda s: s.mahalanobis(rj).sum())(scale).diag_scale
        hess = jax.hessian(scale.mahalanobis)(rj[0])
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol)
    sinv_r = np.linalg.solve(cov, r.T).T
    np.testing.assert_allclose(np.asarray(grad_r, np.float64), 2.0 * sinv_r,
                               rtol=tol, atol=tol * np.abs(sinv_r).max())
    # d/dW sum_s r_s^T cov^{-1} r_s = -2 sum_s cov^{-1} r_s r_s^T cov^{-1} W.
    want_w = -2.0 * (sinv_r.T @ sinv_r) @ w
    np.testing.assert_allclose(np.asarray(grad_w, np.float64), want_w,
                               rtol=tol, atol=tol * np.abs(want_w).max())
    sinv = np.linalg.inv(cov)  # the reference only
    np.testing.assert_allclose(np.asarray(hess, np.float64), 2.0 * sinv,
                               rtol=10 * tol, atol=10 * tol * np.abs(sinv).max())
    # d/dsd_i sum_s r_s^T cov^{-1} r_s = -2 sd_i sum_s (cov^{-1} r_s)_i^2: its two terms
    # cancel at ~1/sd^2 (relative accuracy about eps / sd).
    want_sd = -2.0 * sd * np.sum(np.square(sinv_r), axis=0)
    np.testing.assert_allclose(np.asarray(grad_sd, np.float64), want_sd,
                               rtol=tol / tiny, atol=tol / tiny * np.abs(want_sd).max())


@pytest.mark.parametrize("dtype,tiny,tol", [(np.float64, 1e-6, 1e-9), (np.float32, 1e-3, 1e-5)])
def test_trace_against_a_low_rank_scale_stays_exact_where_its_sds_head_to_0(rng, dtype, tiny, tol):
    """``tr(P^{-1} Q)`` for a low-rank ``P`` near a boundary optimum, each kind of ``Q``.

    Woodbury's ``D^{-1} - A C^{-1} A^T`` is a difference of numbers ~1/sd^2
    there: in float64, at sds 1e-6 times W's rows, a low-rank ``Q``'s trace
    of 7.5 came out as -8e5, and in float32 at 1e-3, 10.0 against 6.8. The
    reference is exact (rational arithmetic on the float inputs), since a
    float64 solve of this P keeps only a few digits. The gradients in both
    sides' parameters are checked too (``-2 P^{-1} Q P^{-1} W`` and its kin).
    """
    d, k = 7, 3
    w = rng.normal(size=(d, k))
    sd = rng.uniform(0.5, 1.5, size=d)
    sd[:2] = tiny * np.array([1.0, 0.3])
    wq = w + 0.05 * rng.normal(size=(d, k))  # a q near p: its W carries the same coordinates
    sdq = sd * rng.uniform(0.8, 1.2, size=d)
    u = 0.3 * rng.normal(size=(d, 2))
    tril = np.linalg.cholesky(wq @ wq.T + np.diag(sdq ** 2) + 0.1 * np.eye(d))
    w, sd, wq, sdq, u, tril = (x.astype(dtype).astype(np.float64) for x in (w, sd, wq, sdq, u, tril))
    cov = w @ w.T + np.diag(sd ** 2)
    sinv = exact_solve(cov, np.eye(d))
    s2 = np.diag(np.square(sdq))
    others = {
        "diagonal": (lambda: vijax.DiagonalScale(jnp.asarray(sdq, dtype)), s2),
        "low_rank": (lambda: vijax.LowRankScale(jnp.asarray(wq, dtype), jnp.asarray(sdq, dtype)),
                     wq @ wq.T + s2),
        "low_rank_precision": (
            lambda: vijax.LowRankPrecisionScale(jnp.asarray(u, dtype), jnp.asarray(sdq, dtype)),
            exact_solve(u @ u.T + np.diag(sdq ** -2.0), np.eye(d))),
        "cholesky": (lambda: vijax.CholeskyScale(jnp.asarray(tril, dtype)), tril @ tril.T),
    }
    for name, (build, ocov) in others.items():
        with jax.enable_x64(dtype == np.float64):
            p = vijax.LowRankScale(jnp.asarray(w, dtype), jnp.asarray(sd, dtype))
            o = build()
            got = jax.jit(p.trace_inv_cov)(o)
            grad_p = jax.grad(lambda s: s.trace_inv_cov(o))(p)
        sinv_q = exact_solve(cov, ocov)
        want = np.trace(sinv_q)
        np.testing.assert_allclose(float(got), want, rtol=tol, err_msg=name)
        x = exact_solve(cov, sinv_q.T)  # P^{-1} Q P^{-1}
        np.testing.assert_allclose(np.asarray(grad_p.cov_factor, np.float64), -2.0 * x @ w,
                                   rtol=tol, atol=tol * np.abs(x @ w).max(), err_msg=name)
        want_sd = -2.0 * sd * np.diag(x)
        np.testing.assert_allclose(np.asarray(grad_p.diag_scale, np.float64), want_sd,
                                   rtol=tol / tiny, atol=tol / tiny * np.abs(want_sd).max(),
                                   err_msg=name)
    with jax.enable_x64(dtype == np.float64):
        p = vijax.LowRankScale(jnp.asarray(w, dtype), jnp.asarray(sd, dtype))
        grad_q = jax.grad(lambda s: p.trace_inv_cov(s))(others["low_rank"][0]())
    np.testing.assert_allclose(np.asarray(grad_q.cov_factor, np.float64), 2.0 * sinv @ wq,
                               rtol=tol, atol=tol * np.abs(sinv @ wq).max())
    np.testing.assert_allclose(np.asarray(grad_q.diag_scale, np.float64),
                               2.0 * sdq * np.diag(sinv), rtol=tol)


def test_low_rank_mahalanobis_second_derivatives_and_rank_above_dim(rng, x64):
    """The custom JVP's own derivative in W (a Hessian), a batch of 2-d draws, and k > d."""
    for d, k in ((5, 2), (4, 6)):
        w = rng.normal(size=(d, k))
        sd = rng.uniform(0.2, 1.5, size=d)
        r = rng.normal(size=(3, 2, d))

        def dense(w_):
            cov = w_ @ w_.T + jnp.diag(jnp.asarray(sd) ** 2)
            return jnp.sum(r * jnp.linalg.solve(cov, r.reshape(-1, d).T).T.reshape(r.shape), -1)

        def ours(w_):
            return vijax.LowRankScale(w_, jnp.asarray(sd)).mahalanobis(jnp.asarray(r))

        wj = jnp.asarray(w)
        np.testing.assert_allclose(ours(wj), dense(wj), rtol=1e-10)
        np.testing.assert_allclose(jax.hessian(lambda a: ours(a).sum())(wj),
                                   jax.hessian(lambda a: dense(a).sum())(wj),
                                   rtol=1e-8, atol=1e-10)
