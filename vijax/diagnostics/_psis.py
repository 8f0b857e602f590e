"""Pareto-smoothed importance sampling (PSIS) and its k-hat diagnostic.

Importance weights ``w = p(x, z) / q(z)`` with ``z ~ q`` estimate the
evidence ``Z = E_q[w]``, but when q is narrower than the posterior their
distribution has a heavy right tail and the plain average is dominated by a
few draws. PSIS (Vehtari et al. 2024) fits a generalized Pareto distribution
(GPD) to the largest weights and replaces them by the expected order
statistics of the fit: the estimate keeps a finite variance for a wider range
of tails, and the fitted shape ``k-hat`` says how far to trust it. A k-hat
below :func:`khat_threshold` (``min(1 - 1/log10(S), 0.7)`` for ``S`` draws)
means the estimate is reliable; between it and 1, it converges too slowly to
be trusted; above 1, the mean of the weights does not exist.

:func:`psis` reproduces ``arviz.psislw(log_weights, reff=1.0)`` (the
Zhang-Stephens fit with arviz's weakly informative prior), in JAX, with
static shapes, so that it runs under ``jit`` and ``vmap``.

References:
  A. Vehtari, D. Simpson, A. Gelman, Y. Yao and J. Gabry. Pareto smoothed
  importance sampling. Journal of Machine Learning Research 25(72), 2024.

  J. Zhang and M. A. Stephens. A new and efficient estimation method for the
  generalized Pareto distribution. Technometrics 51(3), 2009.

  Y. Yao, A. Vehtari, D. Simpson and A. Gelman. Yes, but did it work?:
  Evaluating variational inference. ICML 2018.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks

# Zhang-Stephens prior as in arviz `_gpdfit`: the grid of b is scaled by
# prior_bs times the first quartile, and k is shrunk towards 0.5 by a prior
# worth prior_k observations.
_PRIOR_BS = 3.0
_PRIOR_K = 10.0
# The fit needs more than this many tail draws (arviz: `tail_len <= 4` -> inf).
_MIN_TAIL = 5


def _tail_length(num_draws: int) -> int:
    """The tail size ``M = ceil(min(S / 5, 3 sqrt(S)))`` (arviz, ``reff = 1``).

    Written with the same floating-point operations as arviz so that the
    rounding (for perfect squares, say) agrees.
    """
    return int(math.ceil(min(num_draws / 5.0, 3 * (num_draws / 1.0) ** 0.5)))


#: The smallest number of draws whose Pareto tail holds more than 4 draws
#: (the fewest the GPD fit accepts): 21, with a tail of 5.
MIN_DRAWS: int = next(s for s in itertools.count(1) if _tail_length(s) >= _MIN_TAIL)


def khat_threshold(num_samples: int) -> float:
    """The sample-size-dependent k-hat threshold ``min(1 - 1/log10(S), 0.7)``.

    With ``S`` draws, a PSIS estimate whose k-hat is below this threshold has
    a small error with high probability; above it, the number of draws needed
    grows too fast for the estimate to be trusted (Vehtari et al. 2024,
    Section 3.2.4). The threshold is 0.7 from ``S = 2155`` on, and lower
    for fewer draws: at ``S = 100`` it is 0.5.

    Args:
      num_samples: the number of draws ``S`` (an int >= ``MIN_DRAWS`` = 21,
        the fewest :func:`psis` accepts).

    Returns:
      The threshold, a Python float.

    Raises:
      TypeError: ``num_samples`` is not an int.
      ValueError: ``num_samples`` < 21.

    Example:
      >>> round(khat_threshold(100), 3), khat_threshold(4000)
      (0.5, 0.7)

    References:
      A. Vehtari, D. Simpson, A. Gelman, Y. Yao and J. Gabry. Pareto smoothed
      importance sampling. Journal of Machine Learning Research 25(72), 2024.
    """
    num_samples = _checks.check_positive_int("num_samples", num_samples, minimum=MIN_DRAWS)
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def _isqrt(n: jax.Array) -> jax.Array:
    """``floor(sqrt(n))`` for a traced non-negative int, exact."""
    r = jnp.floor(jnp.sqrt(n.astype(jnp.float32))).astype(n.dtype)
    r = r - (r * r > n).astype(n.dtype)
    return r + ((r + 1) * (r + 1) <= n).astype(n.dtype)


def _psis_1d(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PSIS of one vector of ``S`` log weights (arviz ``_psislw``, static shapes)."""
    num_draws = x.shape[0]
    tail_max = _tail_length(num_draws)          # M: the tail is at most this long
    grid_max = 30 + math.isqrt(tail_max)        # the largest grid the fit can use
    dtype = x.dtype
    finfo = jnp.finfo(dtype)
    eps = float(finfo.eps)
    log_tiny = math.log(float(finfo.tiny))

    invalid = jnp.any(jnp.isnan(x) | (x == jnp.inf))  # NaN or +inf: no answer
    top = jnp.max(x)
    all_zero = top == -jnp.inf                          # every weight is zero
    shift = jnp.where(jnp.isfinite(top), top, jnp.zeros((), dtype))
    z = x - shift                                       # <= 0, the largest is 0

    order = jnp.argsort(z, stable=True)
    xs = x[order]
    zs = xs - shift
    cutoff = jnp.maximum(zs[num_draws - tail_max - 1], log_tiny)
    # The tail is every draw strictly above the cutoff: the last n <= M of the
    # sorted draws (ties at the cutoff, -inf and underflow make n < M).
    tail = zs[num_draws - tail_max:]
    in_tail = tail > cutoff
    n = jnp.sum(in_tail.astype(jnp.int32))
    n_f = n.astype(dtype)

    # The tail's excess over the cutoff, exp(z) - exp(cutoff), sorted; 0 outside.
    # exp(c) * expm1(z - c) avoids the cancellation when z is close to c (where
    # z - c is exact or nearly); far above c the plain difference is more
    # accurate (the rounding of z - c would be amplified by |c|).
    close = (tail - cutoff) <= math.log(2.0)
    excess = jnp.where(
        close,
        jnp.exp(cutoff) * jnp.expm1(tail - cutoff),
        jnp.exp(tail) - jnp.exp(cutoff),
    )
    excess = jnp.where(in_tail, excess, jnp.zeros((), dtype))

    # Zhang-Stephens: a grid of m = 30 + floor(sqrt(n)) values of b = -k / sigma,
    # weighted by their profile likelihood (arviz `_gpdfit`).
    first = tail_max - n                                 # where the tail starts
    quartile = excess[jnp.clip(first + (n + 2) // 4 - 1, 0, tail_max - 1)]
    largest = excess[tail_max - 1]
    m_est = 30 + _isqrt(n)
    grid = jnp.arange(grid_max)
    on_grid = grid < m_est
    b = 1 - jnp.sqrt(m_est.astype(dtype) / (grid.astype(dtype) + 0.5))
    b = jnp.where(on_grid, b, jnp.zeros((), dtype))      # keeps the unused ones finite
    b = b / (_PRIOR_BS * quartile) + 1 / largest
    k_grid = jnp.sum(jnp.log1p(-b[:, None] * excess[None, :]), axis=1) / n_f
    log_lik = n_f * (jnp.log(-(b / k_grid)) - k_grid - 1)
    # weights_j = 1 / sum_l exp(L_l - L_j), over the grid in use.
    diffs = jnp.exp(log_lik[None, :] - log_lik[:, None])
    weights = 1 / jnp.sum(jnp.where(on_grid[None, :], diffs, jnp.zeros((), dtype)), axis=1)
    # Negligible weights are dropped (a NaN one too, as in arviz).
    keep = on_grid & (weights >= 10 * eps)
    weights = jnp.where(keep, weights, jnp.zeros((), dtype))
    weights = weights / jnp.sum(weights)
    b_post = jnp.sum(jnp.where(keep, b * weights, jnp.zeros((), dtype)))
    k_raw = jnp.sum(jnp.where(in_tail, jnp.log1p(-b_post * excess), 0)) / n_f
    sigma = -k_raw / b_post
    k = (n_f * k_raw + _PRIOR_K * 0.5) / (n_f + _PRIOR_K)
    fitted = (n >= _MIN_TAIL) & jnp.isfinite(k) & jnp.isfinite(sigma) & (sigma > 0)

    # The smoothed tail: the GPD quantiles at (i + 1/2) / n, i = 0..n-1,
    # shifted back by exp(cutoff) (arviz `_gpinv`), at the sorted tail positions.
    rank = (jnp.arange(tail_max) - first).astype(dtype)
    probs = (rank + 0.5) / n_f
    neg_log1m = -jnp.log1p(-probs)
    near_zero = jnp.abs(k) < eps
    safe_k = jnp.where(near_zero, jnp.ones((), dtype), k)
    quantiles = jnp.where(near_zero, neg_log1m, jnp.expm1(safe_k * neg_log1m) / safe_k) * sigma
    smoothed = jnp.log(quantiles + jnp.exp(cutoff))
    smoothed = jnp.minimum(smoothed, 0)                  # truncate at the largest raw weight
    # Only the smoothed draws change; the others are returned exactly as given.
    new_tail = jnp.where(in_tail & fitted, smoothed + shift, xs[num_draws - tail_max:])
    new_sorted = jnp.concatenate([xs[: num_draws - tail_max], new_tail])
    out = jnp.zeros_like(x).at[order].set(new_sorted, unique_indices=True)

    khat = jnp.where(fitted, k, jnp.asarray(jnp.inf, dtype))
    nan = jnp.asarray(jnp.nan, dtype)
    out = jnp.where(invalid, nan, jnp.where(all_zero, x, out))
    khat = jnp.where(invalid | all_zero, nan, khat)
    return out, khat


_psis_batched = jax.jit(jnp.vectorize(_psis_1d, signature="(s)->(s),()"))


def _check_values(x: jax.Array) -> None:
    """NaN, +inf and rows of zero weights, when ``x`` is concrete."""
    if not _checks.is_concrete(x):
        return
    a = np.asarray(x)
    nan, pinf = np.isnan(a), np.isposinf(a)
    bad = nan | pinf
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`log_weights` must not contain NaN or +inf; got {int(nan.sum())} NaN and "
            f"{int(pinf.sum())} +inf entries (the first at index {first}). A log weight "
            "of -inf (a zero weight) is allowed."
        )
    dead = np.all(a == -np.inf, axis=-1)
    if dead.any():
        if a.ndim == 1:
            raise ValueError(
                "every entry of `log_weights` is -inf (all weights are zero); PSIS "
                "needs at least one positive weight."
            )
        first = tuple(int(i) for i in np.argwhere(dead)[0])
        raise ValueError(
            f"{int(dead.sum())} row(s) of `log_weights` have every entry -inf (all "
            f"weights zero; the first at batch index {first}); PSIS needs at least "
            "one positive weight per row."
        )


def psis(log_weights: Any) -> tuple[jax.Array, jax.Array]:
    """Pareto-smoothed importance sampling: smoothed log weights and k-hat.

    Fits a generalized Pareto distribution to the largest
    ``M = ceil(min(S / 5, 3 sqrt(S)))`` of the ``S`` weights along the last
    axis (Zhang and Stephens 2009, with arviz's weakly informative prior),
    replaces them by the fit's expected order statistics, truncated at the
    largest raw weight, and returns those log weights with the shape ``k-hat``
    of the fit (Vehtari et al. 2024). Leading axes are independent problems.
    It reproduces ``arviz.psislw(log_weights, reff=1.0)`` (draws that are
    independent, as q's draws are), up to rounding.

    **Scale.** Unlike ``arviz.psislw``, the smoothed log weights are *not*
    normalized: they are on the scale of the input (only the tail is
    changed), so with ``log_weights = log p(x, z) - log q(z)``,
    ``logsumexp(smoothed, axis=-1) - log(S)`` is the PSIS estimate of the log
    evidence ``log p(x)``. ``smoothed - logsumexp(smoothed, axis=-1,
    keepdims=True)`` gives arviz's normalized log weights.

    **k-hat.** Below :func:`khat_threshold` (0.7 for ``S >= 2155``) the
    estimate is reliable; above 1 the weights' mean does not exist. It is
    ``inf``, and the weights are returned unsmoothed, when the tail holds 4
    draws or fewer (only draws strictly above the cutoff count, so ties
    there, -inf weights and weights below ``tiny`` times the largest can
    shorten the tail) or when the fit fails (arviz returns NaN smoothed
    weights in that unreachable-in-practice case).

    **Values.** A log weight of -inf is a zero weight: it is allowed, never
    in the tail, and returned as -inf. NaN and +inf have no meaning: eager
    (concrete) input with any raises ``ValueError``; under ``jit`` or
    ``vmap`` a row with any gives NaN smoothed weights and a NaN k-hat, and a
    ``RuntimeWarning`` says how many rows (never a silent finite number). A
    row whose weights are all zero (every entry -inf) raises ``ValueError``
    when concrete; traced, it is returned unchanged (all -inf) with a NaN
    k-hat and the warning.

    Works under ``jit`` and ``vmap`` (shapes are static: the tail and the
    fit's grid are masked to their data-dependent sizes). The output is not
    meant to be differentiated.

    Args:
      log_weights: a float32 or float64 array of shape ``(..., S)`` of log
        importance weights (log ratios, up to a constant), ``S >= 21``
        (``MIN_DRAWS``).

    Returns:
      ``(smoothed_log_weights, khat)``: an array like ``log_weights``
      (same shape and dtype, same scale) and the k-hats, of shape ``(...)``
      and the same dtype.

    Raises:
      TypeError: ``log_weights`` is not a float32 or float64 array (an int,
        bool, complex or other dtype).
      ValueError: ``log_weights`` is 0-d, has fewer than 21 draws along its
        last axis, or (when concrete) holds NaN or +inf or a row of all -inf.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.scipy.special import logsumexp
      >>> from jax.scipy.stats import norm
      >>> z = jax.random.normal(jax.random.key(0), (4000,))       # z ~ q = N(0, 1)
      >>> log_w = norm.logpdf(z, 0.2, 1.1) - norm.logpdf(z)       # p = N(0.2, 1.1^2)
      >>> smoothed, khat = psis(log_w)
      >>> bool(khat < khat_threshold(4000))
      True
      >>> log_z = logsumexp(smoothed) - jnp.log(4000.0)           # log 1 = 0
      >>> bool(abs(log_z) < 0.05)
      True

    References:
      A. Vehtari, D. Simpson, A. Gelman, Y. Yao and J. Gabry. Pareto smoothed
      importance sampling. Journal of Machine Learning Research 25(72), 2024.

      J. Zhang and M. A. Stephens. A new and efficient estimation method for
      the generalized Pareto distribution. Technometrics 51(3), 2009.
    """
    x = _checks.as_float_array("log_weights", log_weights)
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise TypeError(
            f"`log_weights` must be a float32 or float64 array; got dtype {x.dtype}. "
            "Convert it explicitly, e.g. `log_weights.astype(jnp.float32)`."
        )
    if x.ndim == 0:
        raise ValueError(
            "`log_weights` must have at least one dimension, the draws (shape "
            "(..., S)); got a 0-d array."
        )
    num_draws = x.shape[-1]
    if num_draws < MIN_DRAWS:
        raise ValueError(
            f"`log_weights` needs at least {MIN_DRAWS} draws along its last axis for "
            f"the Pareto tail fit (the tail needs more than {_MIN_TAIL - 1} draws); "
            f"got {num_draws}."
        )
    _check_values(x)
    out = _psis_batched(x)
    if not _checks.is_concrete(x):
        # Traced: no error can be raised, so a warning says which k-hats are NaN.
        bad_rows = jnp.sum(jnp.any(jnp.isnan(x) | (x == jnp.inf), axis=-1))
        dead_rows = jnp.sum(jnp.all(x == -jnp.inf, axis=-1))
        jax.debug.callback(_warn_traced, bad_rows, dead_rows)
    return out


def _warn_traced(bad_rows, dead_rows) -> None:
    bad_rows, dead_rows = int(np.sum(bad_rows)), int(np.sum(dead_rows))
    if bad_rows or dead_rows:
        warnings.warn(
            f"vijax.psis under jit/vmap: {bad_rows} row(s) of `log_weights` hold NaN or "
            f"+inf and {dead_rows} row(s) are all -inf; their k-hat is NaN (and the "
            "smoothed weights of the first kind are NaN).",
            RuntimeWarning,
            stacklevel=2,
        )
