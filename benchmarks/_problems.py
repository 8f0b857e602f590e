"""The benchmark suite's problems and their exact family optima.

Two models, both with a (d,) weight vector ``w ~ N(0, I)``:

* ``blr``: Bayesian linear regression, ``y | w ~ N(X w, I)``, ``X`` with
  standard normal entries, true weights standard normal. Gaussian-conjugate:
  the posterior ``N(P^{-1} X^T y, P^{-1})`` with ``P = X^T X + I`` is exact,
  so ``KL(q || p(w | y))`` has a closed form, and so has the best mean-field
  KL (mean = posterior mean, variances ``1 / P_ii``).
* ``logistic``: Bayesian logistic regression, ``y_i ~ Bernoulli(sigmoid(x_i^T
  w))``, true weights ``N(0, I / d)`` (logits of order one). Non-conjugate:
  the "exact" gap ``KL(q || p) - min_family KL = ELBO* - ELBO(q)`` is computed
  by one-dimensional quadrature (the expected log likelihood depends on ``q``
  only through the 1-d marginals ``N(m_i, s_i^2)`` of ``x_i^T w``;
  ``vijax.models._glm.expected_softplus``, accurate to about 1e-10 per row at any spread),
  and ``ELBO*`` by maximizing that deterministic ELBO over the family with
  L-BFGS in float64.

Everything measured (the gap) is computed in float64 NumPy on the host from
the implementation's current mean and scale, so every implementation is
judged by the same yardstick whatever its parameterization.

The training itself runs in float32. Each problem holds its data, the
library's model (for ``vijax.fit``) and a log joint written by hand with
``jax.numpy`` (for the floor and Blackjax; NumPyro gets its own model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import vijax
from vijax.models._glm import expected_softplus

_LOG_2PI = math.log(2.0 * math.pi)


@jax.jit
def _expected_log_lik_x64(y, m, s):
    return jnp.sum(y * m - expected_softplus(m, s))


def expected_log_lik(y64, m, s) -> float:
    """``sum_i E[y_i t_i - softplus(t_i)]``, ``t_i ~ N(m_i, s_i^2)``, in float64."""
    with jax.enable_x64(True):
        return float(_expected_log_lik_x64(jnp.asarray(y64, jnp.float64),
                                           jnp.asarray(m, jnp.float64),
                                           jnp.asarray(s, jnp.float64)))


@dataclasses.dataclass(frozen=True)
class Problem:
    """A data set, its log joints, and the exact yardstick for any Gaussian.

    Attributes:
      model: ``"blr"`` or ``"logistic"``.
      n, d: data size and latent dimension.
      x, y: float32 device arrays.
      x64, y64: the same data in float64 NumPy.
      library_model: ``vijax.models.<model>(x, y, ...)``, for ``vijax.fit``.
      hand_log_joint: ``log_joint(w) -> scalar`` written with ``jax.numpy``.
      optimum_kl: ``{family: min_q KL(q || p)}`` where known in closed form
        (BLR), else ``nan`` (the gap is still exact: it is an ELBO difference).
      reference: per-family float64 optimum used by the logistic gap,
        filled on first use (:meth:`family_reference`).
      posterior64: BLR's ``(P, posterior mean, log det P)`` in float64.
    """

    model: str
    n: int
    d: int
    x: jax.Array
    y: jax.Array
    x64: np.ndarray
    y64: np.ndarray
    library_model: vijax.models.Model
    hand_log_joint: Callable
    optimum_kl: dict
    reference: dict
    posterior64: tuple | None = None

    def gap(self, family: str, mean: np.ndarray, scale: np.ndarray) -> float:
        """Returns ``KL(q || p) - min_{q' in family} KL(q' || p)`` in float64.

        Args:
          family: ``"mean_field"`` or ``"full_rank"``.
          mean: (d,) mean of q.
          scale: (d,) standard deviations (mean-field) or (d, d) lower
            Cholesky factor of q's covariance (full-rank).
        """
        mean = np.asarray(mean, np.float64)
        scale = np.asarray(scale, np.float64)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))):
            return float("nan")
        if self.model == "blr":
            return _blr_kl(self.posterior64, mean, scale) - self.optimum_kl[family]
        ref = self.family_reference(family)
        return ref["elbo"] - _logistic_elbo(self.x64, self.y64, mean, scale)

    def family_reference(self, family: str) -> dict | None:
        """The logistic family optimum (ELBO, gradient norm, iterations); None for BLR."""
        if self.model == "blr":
            return None
        if family not in self.reference:
            self.reference[family] = _logistic_reference(self.x64, self.y64, family)
        return self.reference[family]


def _data(model: str, n: int, d: int, seed: int):
    rng = np.random.default_rng([seed, n, d, 0 if model == "blr" else 1])
    x = rng.standard_normal((n, d))
    if model == "blr":
        w = rng.standard_normal(d)
        y = x @ w + rng.standard_normal(n)
    else:
        w = rng.standard_normal(d) / math.sqrt(d)
        y = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-(x @ w)))).astype(np.float64)
    return x, y


def hand_log_joint(model: str, x: jax.Array, y: jax.Array) -> Callable:
    """Returns ``log p(y, w)`` for one (d,) weight vector, written out with jnp."""
    n, d = x.shape
    prior_const = -0.5 * d * _LOG_2PI

    if model == "blr":
        lik_const = -0.5 * n * _LOG_2PI

        def log_joint(w):
            return (lik_const - 0.5 * jnp.sum(jnp.square(y - x @ w))
                    + prior_const - 0.5 * jnp.sum(jnp.square(w)))
    else:

        def log_joint(w):
            logits = x @ w
            return (jnp.sum(y * logits - jax.nn.softplus(logits))
                    + prior_const - 0.5 * jnp.sum(jnp.square(w)))

    return log_joint


# ------------------------------------------------------------ float64 yardsticks
def _blr_posterior(x64, y64):
    prec = x64.T @ x64 + np.eye(x64.shape[1])
    return prec, np.linalg.solve(prec, x64.T @ y64), np.linalg.slogdet(prec)[1]


def _blr_kl(posterior64, mean, scale) -> float:
    """KL(N(mean, S S^T) || posterior), S diagonal (given as a vector) or lower."""
    prec, post_mean, logdet_prec = posterior64
    d = mean.shape[0]
    delta = mean - post_mean
    if scale.ndim == 1:
        tr = float(np.sum(np.diagonal(prec) * np.square(scale)))
        logdet_q = 2.0 * float(np.sum(np.log(np.abs(scale))))
    else:
        tr = float(np.sum((prec @ scale) * scale))
        logdet_q = 2.0 * float(np.sum(np.log(np.abs(np.diagonal(scale)))))
    return 0.5 * (tr + float(delta @ prec @ delta) - d - logdet_q - logdet_prec)


def _blr_optimum_kl(posterior64) -> dict:
    prec, _, logdet_prec = posterior64
    # Best mean-field q: posterior mean, variances 1 / P_ii; its KL is
    # 0.5 (sum log P_ii - log det P) (e.g. Bishop 2006, section 10.1.2).
    return {
        "mean_field": 0.5 * (float(np.sum(np.log(np.diagonal(prec)))) - logdet_prec),
        "full_rank": 0.0,
    }


def _logistic_elbo(x64, y64, mean, scale) -> float:
    """The quadrature ELBO of N(mean, S S^T) for logistic regression (see :func:`expected_softplus`)."""
    d = mean.shape[0]
    m = x64 @ mean
    if scale.ndim == 1:
        s = np.sqrt(np.square(x64) @ np.square(scale))
        logdet_q = 2.0 * np.sum(np.log(np.abs(scale)))
        tr = np.sum(np.square(scale))
    else:
        s = np.sqrt(np.sum(np.square(x64 @ scale), axis=1))
        logdet_q = 2.0 * np.sum(np.log(np.abs(np.diagonal(scale))))
        tr = np.sum(np.square(scale))
    lik = expected_log_lik(y64, m, s)
    prior = -0.5 * (d * _LOG_2PI + mean @ mean + tr)
    entropy = 0.5 * d * (1.0 + _LOG_2PI) + 0.5 * logdet_q
    return float(lik + prior + entropy)


def _logistic_reference(x64, y64, family: str) -> dict:
    """Maximizes the quadrature ELBO over the family with L-BFGS, in float64."""
    import scipy.optimize

    n, d = x64.shape
    rows, cols = np.tril_indices(d, -1)

    with jax.enable_x64(True):
        x = jnp.asarray(x64)
        y = jnp.asarray(y64)

        def unpack(theta):
            mean, log_sd = theta[:d], theta[d:2 * d]
            if family == "mean_field":
                return mean, jnp.exp(log_sd)
            tril = jnp.zeros((d, d)).at[rows, cols].set(theta[2 * d:])
            return mean, tril + jnp.diag(jnp.exp(log_sd))

        def neg_elbo(theta):
            mean, scale = unpack(theta)
            m = x @ mean
            if family == "mean_field":
                s = jnp.sqrt(jnp.square(x) @ jnp.square(scale))
                logdet_q = 2.0 * jnp.sum(jnp.log(scale))
            else:
                s = jnp.sqrt(jnp.sum(jnp.square(x @ scale), axis=1))
                logdet_q = 2.0 * jnp.sum(jnp.log(jnp.diagonal(scale)))
            lik = jnp.sum(y * m - expected_softplus(m, s))
            prior = -0.5 * (d * _LOG_2PI + mean @ mean + jnp.sum(jnp.square(scale)))
            entropy = 0.5 * d * (1.0 + _LOG_2PI) + 0.5 * logdet_q
            return -(lik + prior + entropy)

        fun = jax.jit(jax.value_and_grad(neg_elbo))
        size = 2 * d + (0 if family == "mean_field" else rows.shape[0])
        theta0 = np.concatenate([np.zeros(d), np.full(d, math.log(0.1)),
                                 np.zeros(size - 2 * d)])

        def f(theta):
            v, g = fun(jnp.asarray(theta))
            return float(v), np.asarray(g, np.float64)

        res = scipy.optimize.minimize(
            f, theta0, jac=True, method="L-BFGS-B",
            options={"maxiter": 20000, "maxcor": 50, "gtol": 1e-10, "ftol": 1e-15},
        )
        mean, scale = (np.asarray(a, np.float64) for a in unpack(jnp.asarray(res.x)))
        grad_norm = float(np.linalg.norm(f(res.x)[1]))
    elbo = _logistic_elbo(x64, y64, mean, scale)
    sd = scale if scale.ndim == 1 else np.sqrt(np.sum(np.square(scale), axis=1))
    return {"elbo": elbo, "grad_norm": grad_norm, "iterations": int(res.nit),
            "mean": mean, "sd": sd}


@functools.lru_cache(maxsize=None)
def make_problem(model: str, n: int, d: int, seed: int = 0) -> Problem:
    """Returns the seeded problem ``model`` with n observations and d weights.

    For logistic regression the float64 family optima are computed on first
    use (a few seconds each).
    """
    if model not in ("blr", "logistic"):
        raise ValueError(f"`model` must be 'blr' or 'logistic'; got {model!r}.")
    x64, y64 = _data(model, n, d, seed)
    x = jnp.asarray(x64, jnp.float32)
    y = jnp.asarray(y64, jnp.float32)
    if model == "blr":
        library = vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)
        posterior64 = _blr_posterior(x64, y64)
        optimum = _blr_optimum_kl(posterior64)
        reference = {}
    else:
        library = vijax.models.logistic_regression(x, y, prior_scale=1.0)
        posterior64 = None
        optimum = {"mean_field": float("nan"), "full_rank": float("nan")}
        reference = {}
    return Problem(
        model=model, n=n, d=d, x=x, y=y, x64=x64, y64=y64, library_model=library,
        hand_log_joint=hand_log_joint(model, x, y), optimum_kl=optimum, reference=reference,
        posterior64=posterior64,
    )


def low_rank_logdet(sd, factor, xp=np):
    """``log det(diag(sd^2) + F F^T)`` through a QR of ``[F / sd; I]``, its rows sorted by norm.

    The matrix determinant lemma, with the capacitance ``I + F^T diag(sd^-2) F``
    factored by the QR of its square root rather than by Cholesky or LU:
    forming the capacitance squares its condition number, and where some sds
    head to 0 with ``F`` carrying their coordinates (a low-rank optimum on a
    boundary) the answer's O(1) part is lost. Householder QR of the rows in
    decreasing order of norm is accurate row by row (Cox and Higham 1998).
    ``xp``: ``numpy`` or ``jax.numpy`` (differentiable; the order is not).
    """
    g = factor / sd[:, None]
    stacked = xp.concatenate([g, xp.eye(factor.shape[1], dtype=g.dtype)], axis=0)
    norms = xp.sum(stacked * stacked, axis=1)
    if xp is jnp:
        norms = jax.lax.stop_gradient(norms)
    r = xp.linalg.qr(stacked[xp.argsort(-norms)], mode="r")
    return 2.0 * xp.sum(xp.log(sd)) + 2.0 * xp.sum(xp.log(xp.abs(xp.diagonal(r))))


def collapsed_start(x64: np.ndarray, k: int, c: float = 1.0):
    """``(coords, factor)``: ``k`` coordinates chosen greedily by gain, and the factor that carries them.

    For the Gaussian with precision ``Lambda = I + c X^T X`` (BLR's posterior
    at ``c = 1``; ``c = 1/4``, logistic regression's curvature at 0) and
    ``Sigma = Lambda^{-1}``. A rank-k-plus-diagonal q whose diagonal sds
    vanish on a set ``S`` of k coordinates (``F`` carrying them) is at best
    ``N(., Sigma_SS)`` on ``S`` and, given ``z_S``, the mean-field optimum of
    the conditional (precision ``Lambda_{-S,-S}``), so its KL is the
    mean-field optimum's less ``0.5 (sum_S log Lambda_ii + log det
    Sigma_SS)``. The coordinates are picked one at a time by the largest
    ``0.5 log(Lambda_ii v_i)``, ``v_i`` the variance of ``z_i`` given those
    already picked (a pivoted Cholesky of ``Sigma``, whose columns are that
    optimum's ``F``; the diagonal sds are ``Lambda_ii^{-1/2}`` off ``S``).
    Greedy, not a search over sets: on small n < d problems it found the best
    pair of all ``C(d, 2)`` (``tests/test_benchmark_problems.py``). Columns of
    ``Sigma`` are ``e_s - c B^T b_s`` with ``B = K^{-1} X``, ``K K^T = I + c X
    X^T``: O(n^2 d) once, O(n d) per coordinate.
    """
    n, d = x64.shape
    chol = np.linalg.cholesky(np.eye(n) + c * (x64 @ x64.T))
    b = np.linalg.solve(chol, x64)
    cond_var = 1.0 - c * np.sum(np.square(b), axis=0)  # diag(Sigma), then conditional
    prec_diag = 1.0 + c * np.sum(np.square(x64), axis=0)
    coords, factor = [], np.zeros((d, k))
    for t in range(k):
        gain = 0.5 * np.log(np.maximum(cond_var, 1e-300) * prec_diag)
        gain[coords] = -np.inf
        s = int(np.argmax(gain))
        column = -c * (b.T @ b[:, s])
        column[s] += 1.0  # Sigma[:, s]
        column -= factor[:, :t] @ factor[s, :t]
        factor[:, t] = column / math.sqrt(cond_var[s])
        cond_var = cond_var - np.square(factor[:, t])
        coords.append(s)
    return np.asarray(coords), factor


def low_rank_optimum(model: str, x64: np.ndarray, y64: np.ndarray, rank: int, *,
                     inits: int = 2) -> dict:
    """The best ``N(m, diag(sd^2) + F F^T)`` with ``F`` of ``rank`` columns, in float64.

    The low-rank family's optimum, to judge low-rank fits against their own
    family (not the mean-field optimum, which any rank-k q can beat by far).
    BLR: ``min KL(q || p)``, the mean fixed at the posterior mean (the
    mean's term of the KL does not involve the covariance) and ``log sd``,
    ``F`` found by L-BFGS on the closed-form KL, every term in O(n d k):
    ``tr(P S) = sum_i P_ii sd_i^2 + ||F||^2 + ||X F||^2`` and ``log det S =
    2 sum log sd + log det(I + F^T diag(sd^-2) F)`` (:func:`low_rank_logdet`). Logistic: ``max`` of
    the quadrature ELBO (:func:`expected_softplus`, on the rows' variances
    ``x_i^T S x_i``) over ``m``, ``log sd``, ``F``.

    The objective is not convex in ``F`` (``F = 0`` is a saddle point, and
    it has local minima: on a 4-d posterior dominated by one coordinate the
    optimum puts that coordinate's whole variance in ``F``, and random
    starts stopped at a local minimum 0.12 nats above it), so it runs from
    ``inits`` starts and keeps the best: the first at the diagonal of the
    precision's curvature (``sd_i = (1 + c sum_n x_ni^2)^(-1/2)``, ``c = 1``
    for BLR, ``1/4`` for logistic) with ``F`` nearly 0 (entries ``N(0,
    0.01^2)``), the others at ``sd = 0.1`` with ``F`` entries ``N(0,
    0.1^2)``. ``spread`` is the worst start's excess over the best (nats), a
    check that the starts agree (at BLR d = 1000 four different starts agreed
    to 1e-10 nats).

    Where ``n < d`` one more start (:func:`collapsed_start`): there the
    posterior keeps the prior's variance in a null space of ``X``, and the
    optimum gives ``k`` coordinates their whole marginal variance through
    ``F`` (their diagonal sds collapse), each worth about ``0.5 log(Sigma_ii
    Lambda_ii)`` nats over the mean-field optimum. Which ``k`` is a
    combinatorial choice among near-tied coordinates (3.40 to 3.47 nats each
    at BLR d = 10^4) that a local method makes by where it starts: the two
    starts above ended 0.019 nats (BLR, d = 10^4) above a start with ``F`` on
    the ``k`` coordinates of largest gain, and 0.0044 (logistic) below it.
    ``best_start`` says which start won (``inits`` for that one).

    Returns:
      ``{"kl" (BLR) or "elbo" (logistic), "grad_norm", "iterations",
      "spread", "rank", "best_start", "collapsed", "mean", "sd"}``: ``mean`` and ``sd``
      (the marginal standard deviations, ``sqrt(sd_diag^2 + rowsum(F^2))``)
      as float64 arrays, to compare a fit's moments with the optimum's;
      ``collapsed``, how many coordinates keep less than 1% of their
      marginal variance in the diagonal (F holds the rest), and
      ``min_diagonal_share``, the least such share. Where ``collapsed`` is
      positive the optimum lies at a boundary (``sd_diag -> 0``), as on
      BLR at d = 10^4 with n = 1000.
    """
    import scipy.optimize

    n, d = x64.shape
    k = int(rank)
    with jax.enable_x64(True):
        x = jnp.asarray(x64)
        y = jnp.asarray(y64)
        colsq = jnp.sum(jnp.square(x), axis=0)

        def cov_terms(log_sd, f):
            sd = jnp.exp(log_sd)
            return jnp.square(sd), low_rank_logdet(sd, f, jnp)

        if model == "blr":
            logdet_p = float(np.linalg.slogdet(x64.T @ x64 + np.eye(d))[1])

            def unpack(theta):
                return theta[:d], theta[d:].reshape(d, k)

            def objective(theta):  # KL(q || p) with q's mean at the posterior mean
                log_sd, f = unpack(theta)
                var, logdet_q = cov_terms(log_sd, f)
                tr = jnp.sum((1.0 + colsq) * var) + jnp.sum(jnp.square(f)) + jnp.sum(
                    jnp.square(x @ f))
                return 0.5 * (tr - d - logdet_q - logdet_p)
        elif model == "logistic":

            def unpack(theta):
                return theta[:d], theta[d:2 * d], theta[2 * d:].reshape(d, k)

            def objective(theta):  # -ELBO
                mean, log_sd, f = unpack(theta)
                var, logdet_q = cov_terms(log_sd, f)
                m = x @ mean
                s = jnp.sqrt(jnp.square(x) @ var + jnp.sum(jnp.square(x @ f), axis=1))
                lik = jnp.sum(y * m - expected_softplus(m, s))
                prior = -0.5 * (d * _LOG_2PI + mean @ mean + jnp.sum(var)
                                + jnp.sum(jnp.square(f)))
                entropy = 0.5 * d * (1.0 + _LOG_2PI) + 0.5 * logdet_q
                return -(lik + prior + entropy)
        else:
            raise ValueError(f"`model` must be 'blr' or 'logistic'; got {model!r}.")

        fun = jax.jit(jax.value_and_grad(objective))

        def f(theta):
            v, g = fun(jnp.asarray(theta))
            return float(v), np.asarray(g, np.float64)

        results = []
        c = 1.0 if model == "blr" else 0.25
        curvature = c * np.sum(np.square(x64), axis=0)
        for i in range(inits + (n < d)):
            rng = np.random.default_rng([i, n, d, k])
            start = [np.zeros(d)] if model == "logistic" else []
            if i == 0:
                start += [-0.5 * np.log1p(curvature), 0.01 * rng.standard_normal(d * k)]
            elif i < inits:
                start += [np.full(d, math.log(0.1)), 0.1 * rng.standard_normal(d * k)]
            else:  # the greedy collapsed optimum of the curvature's Gaussian
                coords, f0 = collapsed_start(x64, k, c)
                log_sd = -0.5 * np.log1p(curvature)
                log_sd[coords] = math.log(0.01)
                start += [log_sd, f0.ravel()]
            res = scipy.optimize.minimize(
                f, np.concatenate(start), jac=True, method="L-BFGS-B",
                options={"maxiter": 20000, "maxcor": 50, "gtol": 1e-9, "ftol": 1e-15},
            )
            results.append((float(res.fun), float(np.linalg.norm(f(res.x)[1])), int(res.nit),
                            np.asarray(res.x, np.float64)))
    best = min(results, key=lambda r: r[0])
    theta = best[3]
    if model == "blr":
        log_sd, factor = theta[:d], theta[d:].reshape(d, k)
        # The posterior mean, (I + X^T X)^{-1} X^T y = X^T (I + X X^T)^{-1} y.
        mean = x64.T @ np.linalg.solve(np.eye(n) + x64 @ x64.T, y64)
    else:
        mean, log_sd, factor = theta[:d], theta[d:2 * d], theta[2 * d:].reshape(d, k)
    sd = np.sqrt(np.exp(2.0 * log_sd) + np.sum(np.square(factor), axis=1))
    # Coordinates whose diagonal variance is below 1% of their marginal one:
    # F holds (almost) all of their variance, a boundary optimum (sd -> 0;
    # a "Heywood case" in factor analysis) that a fit of softplus(raw)
    # scales approaches only slowly.
    share = np.exp(2.0 * log_sd) / np.square(sd)
    out = {"grad_norm": best[1], "iterations": best[2],
           "spread": max(r[0] for r in results) - best[0], "rank": k,
           "best_start": min(range(len(results)), key=lambda i: results[i][0]),
           "collapsed": int(np.sum(share < 0.01)), "min_diagonal_share": float(np.min(share)),
           "mean": np.asarray(mean, np.float64), "sd": sd}
    out["kl" if model == "blr" else "elbo"] = best[0] if model == "blr" else -best[0]
    return out


def logistic_gradient_noise(x64: np.ndarray, y64: np.ndarray, mean: np.ndarray,
                            sd: np.ndarray, *, num_pairs: int = 2048, block: int = 128,
                            seed: int = 0) -> dict:
    """Mean-field logistic regression: ``tr(H^-1 Sigma)`` of one gradient evaluation at ``(mean, sd)``.

    Sigma is the covariance of the reparameterization gradient of the ELBO
    with respect to ``(mean, log sd)`` from one evaluation, drawn in
    antithetic pairs ``mean +- sd * eps`` (a pair's average counts as two
    evaluations), and H the ELBO's negative Hessian there, taken block
    diagonal: for the means exactly, ``I + X^T diag(E_q[sigma'(logits)]) X``
    (inverted by Woodbury in n, through ``D^1/2 X``), and for each log sd
    ``-sd_i^2 (E[d_i g_i] + E[eps_i^2 d_i g_i])``, with ``d_i g_i = -1 -
    sum_n x_ni^2 sigma'_n`` the diagonal of log p's Hessian (2 on a Gaussian
    target at the mean-field optimum); the expectations are over the same
    draws. At the optimum, an averaged stochastic-gradient fit (Polyak and
    Juditsky 1992) from E such evaluations ends ``tr(H^-1 Sigma) / (2E)`` nats
    below it asymptotically, the least any iterate average of those
    gradients reaches (``default_fit.noise_floor``). The block diagonal is an
    approximation (the cross terms between means and log sds, and between
    log sds, carry the sigmoid's second and third derivatives and are not 0
    off a Gaussian target), as is the asymptotic itself: the returned floor
    is an estimate, not a bound. Float64, in blocks of ``block`` pairs; the
    prior is N(0, I), as :func:`hand_log_joint`'s.

    Returns ``dict(trace, se, mean_part, log_sd_part, num_pairs)``: the
    trace per evaluation, its standard error over the pairs (H, estimated
    from the same draws, is taken as exact there), and the two blocks'
    shares.
    """
    x = np.asarray(x64, np.float64)
    y = np.asarray(y64, np.float64)
    m = np.asarray(mean, np.float64)
    s = np.asarray(sd, np.float64)
    import scipy.linalg

    n, d = x.shape
    rng = np.random.default_rng([seed, n, d])
    xsq = np.square(x)

    def grad_and_curv(eps):
        z = m + s * eps
        logits = z @ x.T  # (B, n)
        p = 1.0 / (1.0 + np.exp(-logits))
        return (y - p) @ x - z, p * (1.0 - p)

    a_mean, a_rho, d_bar = [], [], np.zeros(n)
    e_dg, e_eps2_dg = np.zeros(d), np.zeros(d)
    for start in range(0, num_pairs, block):
        eps = rng.standard_normal((min(block, num_pairs - start), d))
        g_plus, c_plus = grad_and_curv(eps)
        g_minus, c_minus = grad_and_curv(-eps)
        a_mean.append(0.5 * (g_plus + g_minus))
        a_rho.append(0.5 * s * eps * (g_plus - g_minus) + 1.0)
        d_bar += (c_plus + c_minus).sum(axis=0)
        # d_i g_i at each draw; E over both draws of the pair.
        dg_plus, dg_minus = -1.0 - c_plus @ xsq, -1.0 - c_minus @ xsq
        e_dg += (dg_plus + dg_minus).sum(axis=0)
        e_eps2_dg += (np.square(eps) * (dg_plus + dg_minus)).sum(axis=0)
    a_mean, a_rho = np.concatenate(a_mean), np.concatenate(a_rho)
    draws = 2 * num_pairs
    d_bar, e_dg, e_eps2_dg = d_bar / draws, e_dg / draws, e_eps2_dg / draws
    h_rho = -np.square(s) * (e_dg + e_eps2_dg)
    # H^-1 v = v - B^T (I + B B^T)^-1 B v with B = D^1/2 X (D may hold exact zeros:
    # observations whose logits are far out under q).
    b = np.sqrt(d_bar)[:, None] * x
    chol = np.linalg.cholesky(np.eye(n) + b @ b.T)
    centred = a_mean - a_mean.mean(axis=0)
    sol = scipy.linalg.cho_solve((chol, True), b @ centred.T).T  # (K, n)
    h_inv = centred - sol @ b
    per_pair_mean = np.sum(centred * h_inv, axis=1)
    per_pair_rho = np.sum(np.square(a_rho - a_rho.mean(axis=0)) / h_rho, axis=1)
    # A pair's average is two evaluations: one evaluation's covariance is twice a pair's.
    scale = 2.0 * num_pairs / (num_pairs - 1)
    per_pair = scale * (per_pair_mean + per_pair_rho)
    return dict(trace=float(per_pair.mean()),
                se=float(per_pair.std(ddof=1) / math.sqrt(num_pairs)),
                mean_part=float(scale * per_pair_mean.mean()),
                log_sd_part=float(scale * per_pair_rho.mean()), num_pairs=num_pairs)


def blr_variance_noise(x64: np.ndarray) -> np.ndarray:
    """Per coordinate, the noise-to-signal ratio of a variance's gradient from one antithetic pair.

    BLR's posterior precision is ``H = I + X^T X`` (unit noise and prior).
    At the mean-field optimum (``sd_i = H_ii^(-1/2)``) a pair of draws
    ``mu +- sd * eps`` gives coordinate i's curvature as ``eps_i (H (sd *
    eps))_i / sd_i = H_ii (eps_i^2 + eps_i sum_{j != i} rho_ij eps_j)``, with
    ``rho_ij = H_ij / sqrt(H_ii H_jj)`` (the pair cancels the mean's part
    exactly on a Gaussian target). Its variance over ``H_ii^2`` is the
    returned ``r_i = 2 + sum_{j != i} rho_ij^2``.

    A stochastic-gradient fit that updates each variance from that
    coordinate's own gradient (Adam, SGD, a diagonal natural gradient) and
    averages its iterates estimates ``1 / H_ii`` from such pairs: after N
    pairs, at best with variance ``r_i / N`` relative, which costs about
    ``r_i / (4 N)`` nats of KL, so the mean-field gap is at least ``sum_i
    r_i / (4 N)`` nats, ``sum(r) / (2 E)`` after E gradient evaluations.
    The coupling term is ``d / n`` on average for standard-normal X (n < d),
    so at d = 10^4 and n = 1000, ``r`` is about 12. Computed in O(n^2 d)
    without forming H.
    """
    x = np.asarray(x64, np.float64)
    h = 1.0 + np.sum(np.square(x), axis=0)  # H_ii
    gram = (x / h) @ x.T  # X diag(1/H_jj) X^T, (n, n)
    # sum_j (X^T X)_ij^2 / H_jj = [X^T X diag(1/H) X^T X]_ii, less the j = i term.
    coupling = np.sum(x * (gram @ x), axis=0) - np.square(h - 1.0) / h
    return 2.0 + coupling / h
