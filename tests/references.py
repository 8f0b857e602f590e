"""NumPy references and random parameters shared by the test modules."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def perturb(params, rng, scale=0.5):
    """Random params: every leaf moved by N(0, scale^2), keeping dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [x + jnp.asarray(scale * rng.normal(size=x.shape), x.dtype) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def softplus(x):
    return np.logaddexp(0.0, x)


def np_moments(name, params):
    """Mean and dense covariance of q, computed from the raw params in NumPy (float64)."""
    mean = np.asarray(ravel_pytree(params.loc)[0], np.float64)
    s = softplus(np.asarray(params.raw_scale, np.float64))
    if name == "mean_field":
        return mean, np.diag(s**2)
    if name == "full_rank":
        tril = s[:, None] * (np.eye(s.shape[0]) + np.tril(np.asarray(params.off_diag), -1))
        return mean, tril @ tril.T
    if name == "low_rank_precision":
        u = np.asarray(params.prec_factor, np.float64)
        return mean, np.linalg.inv(u @ u.T + np.diag(s**-2.0))
    w = np.asarray(params.cov_factor, np.float64)
    return mean, w @ w.T + np.diag(s**2)


def np_kl(mq, cq, mp, cp):
    """KL(N(mq, cq) || N(mp, cp)) in NumPy."""
    diff = mp - mq
    return 0.5 * (
        np.trace(np.linalg.solve(cp, cq))
        + diff @ np.linalg.solve(cp, diff)
        - len(mq)
        + np.linalg.slogdet(cp)[1]
        - np.linalg.slogdet(cq)[1]
    )


def correlated_blr(d, rho, *, seed=0, n=200):
    """Bayesian linear regression with features of pairwise correlation ``rho``.

    Unit prior and noise scales. Returns ``(model, x, y, mean, prec)``: the
    vijax model and, by NumPy in float64, the data, the posterior mean and
    the posterior precision ``X^T X + I``.
    """
    import vijax

    r = np.random.default_rng(seed)
    corr = rho * np.ones((d, d)) + (1 - rho) * np.eye(d)
    x = r.standard_normal((n, d)) @ np.linalg.cholesky(corr).T
    y = x @ r.standard_normal(d) + r.standard_normal(n)
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(y), noise_scale=1.0, prior_scale=1.0)
    prec = x.T @ x + np.eye(d)
    return model, x, y, np.linalg.solve(prec, x.T @ y), prec


def exact_solve(a, b):
    """``a^{-1} b`` in exact rational arithmetic (Gauss-Jordan on ``Fraction``s), as floats.

    For small ill-conditioned references, where a float64 solve of a matrix with
    condition number 1e12 keeps only a few digits.
    """
    from fractions import Fraction

    n, m = a.shape[0], b.shape[1]
    t = [[Fraction(float(x)) for x in a[i]] + [Fraction(float(x)) for x in b[i]] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda i: abs(t[i][c]))
        t[c], t[p] = t[p], t[c]
        for i in range(n):
            if i != c and t[i][c] != 0:
                f = t[i][c] / t[c][c]
                t[i] = [x - f * y for x, y in zip(t[i], t[c])]
    return np.array([[float(t[i][n + j] / t[i][i]) for j in range(m)] for i in range(n)])
