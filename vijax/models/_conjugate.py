"""Gaussian-conjugate models with exact posteriors, evidences and expected log joints.

All closed forms use Cholesky factors and triangular solves; no matrix is
inverted. Constructors are traceable (their arguments may be tracers, e.g. to
differentiate the evidence with respect to a noise scale); value checks such as
positive definiteness run only when the arguments are concrete. Construction
validates and prepares only what ``log_joint`` needs; the posterior and log
evidence are computed on first access and cached (see :class:`Model`).

References:
  C. M. Bishop, Pattern Recognition and Machine Learning (2006), sections
  2.3.3 (linear-Gaussian marginals and posteriors) and 3.3-3.5 (Bayesian
  linear regression and its evidence).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_solve, solve_triangular

from vijax import _checks, _host
from vijax._gaussian import (
    CholeskyScale,
    DiagonalScale,
    Gaussian,
    LowRankScale,
    PrecisionScale,
    expected_log_prob,
)
from vijax.models._model import Model, _Lazy

_LOG_2PI = math.log(2.0 * math.pi)


def _lower_solve(tril, b, *, transpose=False):
    return solve_triangular(tril, b, lower=True, trans=1 if transpose else 0)


def _scalar(name: str, x, dtype) -> jax.Array | np.ndarray:
    """A positive scalar in the data's dtype (a float64 scale must not promote float32 data).

    A Python or NumPy number stays a NumPy scalar on the host, and so does
    what models derive from it (``_square``): eager ``jnp`` ops on it would
    each compile a small XLA program when the model is built.
    """
    if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    ):
        _checks.check_positive(name, x)
        return np.asarray(x, dtype)
    x = _checks.as_float_array(name, x)
    if x.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {tuple(x.shape)}.")
    _checks.check_positive(name, x)
    return x.astype(dtype)


# The closed forms below are jitted private helpers: evaluated eagerly,
# op-by-op dispatch would compile each of a few dozen small operations
# separately (seconds); one compiled program per shape costs a fraction of
# that. Nested in a user's jit, vmap or grad they simply inline. Models call
# them through `_Lazy`, on first access of `posterior` or `log_evidence`, so a
# model used only through `log_joint` never compiles them.
@jax.jit
def _linear_gaussian_closed_form(m0, l0, lr, hw, h, y):
    """Exact posterior and log evidence from the Cholesky factors and Lr^{-1} H."""
    n, d = h.shape
    b = hw @ l0  # (n, d)
    resid = _lower_solve(lr, y - h @ m0)  # whitened residual, (n,)
    pu = jnp.eye(d, dtype=m0.dtype) + b.T @ b
    lu = jnp.linalg.cholesky(pu)
    bt_r = b.T @ resid
    u_mean = cho_solve((lu, True), bt_r)
    post_mean = m0 + l0 @ u_mean
    # Posterior precision L0^{-T} Pu L0^{-1}, by two triangular solves.
    y_half = _lower_solve(l0, pu, transpose=True)
    post_prec = _lower_solve(l0, y_half.T, transpose=True)
    post_prec = 0.5 * (post_prec + post_prec.T)
    posterior = Gaussian(post_mean, PrecisionScale(jnp.linalg.cholesky(post_prec)))
    log_evidence = -0.5 * (
        n * _LOG_2PI
        + 2.0 * jnp.sum(jnp.log(jnp.diagonal(lr)))
        + 2.0 * jnp.sum(jnp.log(jnp.diagonal(lu)))
        + jnp.sum(jnp.square(resid))
        - jnp.sum(jnp.square(_lower_solve(lu, bt_r)))
    )
    return posterior, log_evidence


@jax.jit
def _column_sq_sums(x):
    return jnp.sum(jnp.square(x), axis=0)


@jax.jit
def _gram(x):
    return x.T @ x


@jax.jit
def _isotropic_closed_form(x, y, s2, t2, prior_loc, xtx):
    """Exact posterior and log evidence of isotropic linear regression."""
    n, d = x.shape
    dtype = x.dtype
    resid0 = y - x @ prior_loc
    prec = xtx / s2 + jnp.eye(d, dtype=dtype) / t2
    lp = jnp.linalg.cholesky(prec)
    xtr = x.T @ resid0 / s2
    post_mean = prior_loc + cho_solve((lp, True), xtr)
    posterior = Gaussian(post_mean, PrecisionScale(lp))
    if n >= d:
        # Woodbury and the determinant lemma through the d x d precision.
        log_evidence = -0.5 * (
            n * _LOG_2PI
            + n * jnp.log(s2)
            + d * jnp.log(t2)
            + 2.0 * jnp.sum(jnp.log(jnp.diagonal(lp)))
            + jnp.sum(jnp.square(resid0)) / s2
            - jnp.sum(jnp.square(_lower_solve(lp, xtr)))
        )
    else:
        gram = s2 * jnp.eye(n, dtype=dtype) + t2 * (x @ x.T)
        lk = jnp.linalg.cholesky(gram)
        log_evidence = -0.5 * (
            n * _LOG_2PI
            + 2.0 * jnp.sum(jnp.log(jnp.diagonal(lk)))
            + jnp.sum(jnp.square(_lower_solve(lk, resid0)))
        )
    return posterior, log_evidence


def linear_gaussian(
    *, prior_mean, prior_cov, design, observations, noise_cov
) -> Model:
    """Returns the linear-Gaussian model, the general Gaussian-conjugate case.

    ``z ~ N(prior_mean, prior_cov)``, ``observations | z ~ N(design @ z,
    noise_cov)``. The latent is a (d,) array.

    The posterior is computed in whitened coordinates ``z = m0 + L0 u``
    (``L0 L0^T = prior_cov``): with ``B = Lr^{-1} H L0`` and ``Pu = I + B^T B``
    the posterior precision of ``u``, the evidence follows from the matrix
    determinant lemma and the Woodbury identity at O(n^2 d + n d^2 + d^3).

    Args:
      prior_mean: (d,) prior mean m0.
      prior_cov: (d, d) prior covariance, symmetric positive definite.
      design: (n, d) observation matrix H.
      observations: (n,) observed vector y.
      noise_cov: (n, n) noise covariance R, symmetric positive definite.

    Returns:
      A conjugate :class:`Model`; ``posterior`` is stored by the Cholesky
      factor of its precision.

    Raises:
      TypeError: an argument is not a floating-point array, or the arrays do
        not share one dtype.
      ValueError: shapes disagree, or a covariance is not square, symmetric or
        (when known eagerly) positive definite.
    """
    m0 = _checks.as_data("prior_mean", prior_mean)
    s0 = _checks.as_data("prior_cov", prior_cov)
    h = _checks.as_data("design", design)
    y = _checks.as_data("observations", observations)
    r = _checks.as_data("noise_cov", noise_cov)
    _checks.check_same_dtype(
        {"prior_mean": m0, "prior_cov": s0, "design": h, "observations": y, "noise_cov": r}
    )
    _checks.check_ndim("prior_mean", m0, 1)
    _checks.check_ndim("design", h, 2)
    _checks.check_ndim("observations", y, 1)
    d, n = m0.shape[0], y.shape[0]
    _checks.check_square("prior_cov", s0)
    _checks.check_shape("prior_cov", s0, (d, d))
    _checks.check_shape("design", h, (n, d))
    _checks.check_square("noise_cov", r)
    _checks.check_shape("noise_cov", r, (n, n))
    _checks.check_covariance("prior_cov", s0)
    _checks.check_covariance("noise_cov", r)

    l0 = jnp.linalg.cholesky(s0)
    lr = jnp.linalg.cholesky(r)
    hw = _Lazy(_lower_solve, lr, h)  # Lr^{-1} H, (n, d): only the exact functions use it
    prior = Gaussian(m0, CholeskyScale(l0))
    noise = Gaussian(y, CholeskyScale(lr))  # log N(y; Hz, R) = noise.log_prob(Hz)

    def log_joint(z):
        z = jnp.asarray(z)
        return prior.log_prob(z) + noise.log_prob(h @ z)

    def expected_log_joint(q: Gaussian):
        # E_q log N(y; Hz, R) = log N(y; H m_q, R) - 0.5 tr(R^{-1} H Q H^T),
        # and tr(R^{-1} H Q H^T) = ||Lr^{-1} H S_q||_F^2.
        lik = noise.log_prob(h @ q.mean) - 0.5 * jnp.sum(
            jnp.square(q.scale.matmul_factor(hw()))
        )
        return expected_log_prob(prior, q) + lik

    return Model._deferred(
        _Lazy(_linear_gaussian_closed_form, m0, l0, lr, hw, h, y),
        log_joint=log_joint,
        latent=m0,
        expected_log_joint=expected_log_joint,
        name="linear_gaussian",
    )


def _square(x):
    """x**2 on the host for a NumPy scalar (see ``_scalar``), in JAX otherwise."""
    return np.square(x) if isinstance(x, np.ndarray) else jnp.square(x)


def _isotropic_regression(x, y, noise_scale, prior_loc, prior_scale, latent, name):
    """y ~ N(X w, s^2 I), w ~ N(m0, t^2 I), w flat (d,); shared by two models.

    ``log_joint`` costs O(n d) and forms no n x n matrix. The posterior uses
    the d x d precision ``X^T X / s^2 + I / t^2``; the evidence uses it too when
    n >= d, and the n x n matrix ``s^2 I + t^2 X X^T`` when n < d.
    ``expected_log_joint`` costs O(n d) for the mean and O(d) for a diagonal
    q's variances (O(n d k) rank k), with no d x d matrix; dense scales use
    ``X^T X``.
    """
    n, d = x.shape
    _, unravel = ravel_pytree(latent)
    s2 = _square(noise_scale)
    t2 = _square(prior_scale)
    xtx = _Lazy(_gram, x)  # only the exact functions use X^T X
    colsq = _Lazy(_column_sq_sums, x)  # diag(X^T X), for structured q

    def log_joint(z):
        w, _ = ravel_pytree(z)
        lik = -0.5 * (n * (_LOG_2PI + jnp.log(s2)) + jnp.sum(jnp.square(y - x @ w)) / s2)
        pri = -0.5 * (
            d * (_LOG_2PI + jnp.log(t2)) + jnp.sum(jnp.square(w - prior_loc)) / t2
        )
        return lik + pri

    def expected_log_joint(q: Gaussian):
        # tr(X^T X Sigma) without the d x d X^T X where q is structured: with the
        # column sums of X^2, O(d) for a diagonal scale, O(n d k) for low rank
        # (plus ||X W||_F^2), ||X S||_F^2 for a low-rank precision; a dense
        # scale uses X^T X (formed once).
        if isinstance(q.scale, DiagonalScale):
            spread = colsq() @ jnp.square(q.scale.scale)
        elif isinstance(q.scale, LowRankScale):
            spread = colsq() @ jnp.square(q.scale.diag_scale) + jnp.sum(
                jnp.square(x @ q.scale.cov_factor))
        elif isinstance(q.scale, (CholeskyScale, PrecisionScale)):
            spread = q.scale.trace_cov(xtx())
        else:
            spread = jnp.sum(jnp.square(q.scale.matmul_factor(x)))
        lik = -0.5 * (
            n * (_LOG_2PI + jnp.log(s2))
            + (jnp.sum(jnp.square(y - x @ q.mean)) + spread) / s2
        )
        pri = -0.5 * (
            d * (_LOG_2PI + jnp.log(t2))
            + (jnp.sum(jnp.square(q.mean - prior_loc)) + jnp.sum(q.variance)) / t2
        )
        return lik + pri

    return Model._deferred(
        _Lazy(_isotropic_closed_form, x, y, s2, t2, prior_loc, xtx),
        log_joint=log_joint,
        latent=latent,
        expected_log_joint=expected_log_joint,
        name=name,
    )


def bayesian_linear_regression(X, y, *, noise_scale, prior_scale) -> Model:
    """Returns Bayesian linear regression with known noise.

    ``w ~ N(0, prior_scale^2 I)``, ``y | w ~ N(X w, noise_scale^2 I)``; the
    latent is a (d,) array. ``log_joint`` costs O(n d) and forms no n x n
    matrix; the posterior and evidence go through a d x d Cholesky factor (the
    evidence through an n x n one when n < d).

    Args:
      X: (n, d) design matrix, floating point.
      y: (n,) responses, floating point.
      noise_scale: the observation noise standard deviation (> 0, scalar).
      prior_scale: the prior standard deviation of each weight (> 0, scalar).

    Returns:
      A conjugate :class:`Model`.

    Raises:
      TypeError: ``X`` or ``y`` is not floating point, or their dtypes differ.
      ValueError: shapes disagree or a scale is not a positive scalar.

    Example:
      >>> import jax, jax.numpy as jnp, vijax
      >>> X = jax.random.normal(jax.random.key(0), (50, 3))
      >>> model = vijax.models.bayesian_linear_regression(
      ...     X, X @ jnp.ones(3), noise_scale=1.0, prior_scale=1.0)
      >>> model.posterior.mean.shape
      (3,)
    """
    x = _checks.as_data("X", X)
    y = _checks.as_data("y", y)
    _checks.check_same_dtype({"X": x, "y": y})
    _checks.check_ndim("X", x, 2)
    _checks.check_shape("y", y, (x.shape[0],))
    noise_scale = _scalar("noise_scale", noise_scale, x.dtype)
    prior_scale = _scalar("prior_scale", prior_scale, x.dtype)
    d = x.shape[1]
    if d < 1 or x.shape[0] < 1:
        raise ValueError(f"`X` must have at least one row and column; got {x.shape}.")
    # Host zeros (jnp.zeros would compile a program); two buffers, so that
    # donating the latent cannot delete the prior mean.
    latent = _host.constant(0.0, (d,), x.dtype)
    return _isotropic_regression(
        x, y, noise_scale, _host.constant(0.0, (d,), x.dtype), prior_scale, latent,
        "bayesian_linear_regression",
    )


def normal_mean(x, *, noise_scale, prior_loc, prior_scale) -> Model:
    """Returns the normal-mean model: a scalar mean with known noise.

    ``mu ~ N(prior_loc, prior_scale^2)``, ``x_i | mu ~ N(mu, noise_scale^2)``
    for each of the n observations. The latent is a scalar (shape ``()``).

    Args:
      x: (n,) observations, floating point.
      noise_scale: the known noise standard deviation (> 0).
      prior_loc: the prior mean (scalar).
      prior_scale: the prior standard deviation (> 0).

    Returns:
      A conjugate :class:`Model` whose latent is a scalar.
    """
    x = _checks.as_data("x", x)
    _checks.check_ndim("x", x, 1)
    if x.shape[0] < 1:
        raise ValueError("`x` must hold at least one observation; got shape (0,).")
    noise_scale = _scalar("noise_scale", noise_scale, x.dtype)
    prior_scale = _scalar("prior_scale", prior_scale, x.dtype)
    loc = _checks.as_data("prior_loc", prior_loc)
    if loc.ndim != 0:
        raise ValueError(f"`prior_loc` must be a scalar; got shape {tuple(loc.shape)}.")
    design = jnp.ones((x.shape[0], 1), x.dtype)
    latent = jnp.zeros((), x.dtype)
    return _isotropic_regression(
        design, x, noise_scale, jnp.reshape(loc, (1,)).astype(x.dtype), prior_scale,
        latent, "normal_mean",
    )
