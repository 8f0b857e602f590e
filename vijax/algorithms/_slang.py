"""SLANG-style natural gradient for a low-rank-plus-diagonal precision, linear in d.

The natural-gradient step of a Gaussian's precision (Khan and Lin 2017) is

    P_new = (1 - rho) P + rho H,      mu_new = mu + rho P_new^{-1} E_q[grad log p],

with ``H`` the expected negative Hessian ``E_q[-grad^2 log p]``. SLANG
(Mishkin et al. 2018) keeps ``P = U U^T + D`` (``U`` of shape (d, k), ``D``
diagonal: :func:`vijax.low_rank_precision`) by estimating ``H`` with a
low-rank positive semi-definite matrix, keeping the top k eigenpairs of the
low-rank part of the step and moving the diagonal of the rest into ``D``, so
that ``diag(P_new)`` is exact and no d x d matrix is ever formed.

SLANG's ``H`` is the empirical Fisher of per-example gradients, which needs
a model written as a sum over data. vijax's models are one ``log_joint``, so
here ``H`` is the covariance of the scores at the batch's draws,

    H_hat = 1 / (1 - sum_b p_b^2) sum_b p_b (g_b - g_bar) (g_b - g_bar)^T,   g_b = grad log p(z_b),

of rank B - 1 (``p_b`` the draw weights, equal unless a draw is dropped as
non-finite; the factor makes it unbiased). For a Gaussian target
``N(m, A^{-1})``, ``Cov_q(g) = A Sigma_q A`` whatever the mean, so the
precision iterates ``P <- (1 - rho) P + rho A P^{-1} A``, whose only
positive-definite fixed point is ``A`` (at ``rho = 1/2`` the iteration is
Newton's for the matrix square root: quadratic convergence), and the mean
step is then Newton's. For a non-Gaussian target the fixed point matches
``Cov_q(grad log p)`` to ``Cov_q(grad log q) = P`` with ``E_q[grad log p] =
0``; it is exact when ``q`` is the posterior, and differs from the ELBO's
optimum otherwise (as the empirical Fisher differs from the Hessian).

The truncation is done in the coordinates whitened by the current diagonal
(``S = D^{-1/2}``): there ``P = S^{-1} (I + Ut Ut^T) S^{-1}`` and the step's
low-rank part is ``L = Y Y^T``, ``Y = [sqrt(1 - rho) Ut, sqrt(rho) S Gc^T]``
of rank ``k + B``: one thin QR and an SVD of a (k + B) x (k + B) matrix,
O(d (k + B)^2). The k kept eigenvalues are lowered by ``rho`` (the
isotropic part the batch adds at the fixed point, ``rho I`` in whitened
coordinates, belongs to the diagonal, not to ``U``), and the diagonal takes
the diagonal of everything not kept. Without that shift SLANG's update has
a bias that does not vanish with the step: at the exact posterior of a
regression with fewer observations than weights the truncation drops
``rho`` times the off-diagonal of a projector every step (the README gives
the measured effect). ``D_new >= (1 - rho) D``, so ``P_new`` is
positive definite for every ``rho <= 1`` and batch.

The default step ``rho_t = 0.5 / (1 + t / 5)`` was the best of the
schedules tried on regressions with fewer observations than weights (the
README lists them): a ``c / t`` step with small ``c`` forgets the start too
slowly, and a constant step leaves the iterates jittering.

The guard and the KL trust region are those of :mod:`vijax.algorithms._score`.

References:
  A. Mishkin, F. Kunstner, D. Nielsen, M. Schmidt and M. E. Khan. SLANG:
  fast structured covariance approximations for Bayesian deep learning with
  natural gradient. NeurIPS 2018.

  M. E. Khan and W. Lin. Conjugate-computation variational inference:
  converting variational inference in non-conjugate models to inferences in
  conjugate models. AISTATS 2017.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from vijax import _checks
from vijax._gaussian import LowRankPrecisionScale
from vijax.algorithms._score import (
    DEFAULT_MAX_KL,
    algorithm_of,
    rank_family,
    check_common,
    check_max_kl,
    check_schedule,
    run_score_algorithm,
    score_step,
    weighted_batch,
)
from vijax.families._gaussian import LowRankPrecisionParams, low_rank_precision
from vijax.fitting._engine import Algorithm
from vijax.fitting._types import FitInfo, FitResult, FitState

ArrayTree = Any
Schedule = Callable[[jax.Array], jax.Array]


def default_learning_rate(step, dtype) -> jax.Array:
    """``rho_t = 0.5 / (1 + t / 5)``: the best of the schedules tried (module docstring)."""
    return jnp.asarray(0.5 / (1.0 + step / 5.0), dtype)


def slang_update(mu, prec_factor, diag_scale, z, scores, rho, weights=None):
    """One SLANG step from a batch; returns ``(new_mu, new_prec_factor, new_diag_scale, ok)``.

    Args:
      mu: (d,) the current mean.
      prec_factor: (d, k) ``U`` of the precision ``U U^T + diag(diag_scale^-2)``.
      diag_scale: (d,) positive.
      z: (B, d) draws from the current q.
      scores: (B, d) ``grad log p`` at the draws.
      rho: the step size, 0 < rho <= 1 (scalar).
      weights: (B,) draw weights (0 drops a draw), or None for equal weights.

    ``ok`` is False when ``rho`` is outside (0, 1], fewer than two draws have
    weight, or the result is not finite.
    """
    dtype = mu.dtype
    k = prec_factor.shape[1]
    if weights is None:
        weights = jnp.ones(z.shape[0], dtype)
    p, _, g_bar, _, gc = weighted_batch(z, scores, weights)
    spread = 1.0 - jnp.sum(jnp.square(p))  # 0 with a single draw of weight
    enough = spread > 0
    unbias = 1.0 / jnp.where(enough, spread, 1.0)
    rho_c = jnp.clip(rho, 0.0, 1.0)
    s = diag_scale
    y = s[:, None] * jnp.concatenate(
        [jnp.sqrt(1.0 - rho_c) * prec_factor, jnp.sqrt(rho_c * unbias) * gc.T], axis=1)
    q, r = jnp.linalg.qr(y)
    ur, sv, _ = jnp.linalg.svd(r, full_matrices=False)
    lam = jnp.maximum(jnp.square(sv[:k]) - rho_c, 0.0)
    new_ut = q @ (ur[:, :k] * jnp.sqrt(lam)[None, :])
    kept = jnp.sum(jnp.square(y), axis=1) - jnp.sum(jnp.square(new_ut), axis=1)
    e = (1.0 - rho_c) + jnp.maximum(kept, 0.0)  # the whitened diagonal, >= 1 - rho
    new_s = s * jax.lax.rsqrt(e)
    new_u = new_ut / s[:, None]
    new_mu = mu + rho_c * LowRankPrecisionScale(new_u, new_s).cov_matmul(g_bar[:, None])[:, 0]
    ok = (
        (rho > 0) & (rho <= 1) & enough
        & jnp.all(jnp.isfinite(new_mu)) & jnp.all(jnp.isfinite(new_u))
        & jnp.all(jnp.isfinite(new_s)) & jnp.all(new_s > 0)
    )
    return new_mu, new_u, new_s, ok


def _check_learning_rate(learning_rate) -> Union[None, float, Schedule]:
    if learning_rate is None:
        return learning_rate
    if callable(learning_rate):
        return check_schedule(learning_rate)
    rho = _checks.check_positive_float(
        "learning_rate", learning_rate, also=" (at most 1), None or a schedule (a callable of the step)")
    if rho > 1.0:
        raise ValueError(
            f"`learning_rate` must be a float in (0, 1], None or a schedule; got {learning_rate!r} "
            "(a step above 1 can make the precision indefinite)."
        )
    return rho


def _check_batch_size(batch_size) -> int:
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    if batch_size < 2:
        raise ValueError(
            f"`batch_size` must be an int >= 2 (the curvature is the covariance of the "
            f"batch's scores); got {batch_size}."
        )
    return batch_size


def _family_of(params):
    return rank_family(low_rank_precision, params.prec_factor.shape[-1])


def make_slang_step(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
) -> Callable[[FitState], tuple[FitState, FitInfo]]:
    """Returns ``step(state) -> (state, info)``: one guarded SLANG iteration.

    The pure core of :func:`slang`, with the contract of
    :func:`vijax.make_step` (noise from ``fold_in(state.key, state.step)``;
    a non-finite step keeps the parameters and sets ``info.skipped``;
    ``opt_state`` a :class:`vijax.algorithms.TrustState`); ``state.params``
    are :class:`vijax.LowRankPrecisionParams`. Arguments as in :func:`slang`.
    """
    _checks.check_log_joint(log_joint)
    batch_size = _check_batch_size(batch_size)
    learning_rate = _check_learning_rate(learning_rate)
    max_kl = check_max_kl(max_kl)

    def update(mu, scale, z, scores, step, weights, damping):
        if learning_rate is None:
            rho = default_learning_rate(step, mu.dtype)
        elif callable(learning_rate):
            rho = jnp.asarray(learning_rate(step), mu.dtype)
        else:
            rho = jnp.asarray(learning_rate, mu.dtype)
        new_mu, new_u, new_s, ok = slang_update(
            mu, scale.prec_factor, scale.diag_scale, z, scores, rho, weights)
        return new_mu, LowRankPrecisionScale(new_u, new_s), ok

    return score_step(
        log_joint, update, batch_size=batch_size, max_kl=max_kl, family=_family_of)


def slang_algorithm(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
) -> Algorithm:
    """SLANG as the engine's :class:`vijax.fitting.Algorithm` (``opt_state`` a TrustState)."""
    return algorithm_of(make_slang_step(
        log_joint, batch_size=batch_size, learning_rate=learning_rate, max_kl=max_kl),
        check_max_kl(max_kl))


def slang(
    key: Optional[jax.Array],
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Union[LowRankPrecisionParams, FitState],
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
    progress: Optional[bool] = None,
    chunk_size: int = 100,
    max_nonfinite: int = 20,
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: Optional[int] = None,
) -> FitResult:
    """Returns a Gaussian with low-rank-plus-diagonal precision fitted by SLANG-style natural gradient.

    The family is :func:`vijax.low_rank_precision` (``Sigma^{-1} = U U^T +
    diag(s^-2)``, rank k). Each step draws ``batch_size`` samples, evaluates
    their scores ``grad log p``, and takes the natural-gradient step of the
    precision with the curvature estimated by the scores' covariance
    (rank B - 1), truncated back to rank k plus diagonal as in SLANG
    (Mishkin et al. 2018); the mean takes the natural-gradient step
    ``mu + rho Sigma_new E[grad log p]``. See the module docstring for the
    update, its fixed points and a bias of the plain truncation that this
    version removes. No d x d matrix is formed: a step costs ``batch_size``
    score evaluations plus O(d (k + B)^2) arithmetic and O(d (k + B))
    memory.

    On a Gaussian target whose precision is itself rank k plus diagonal (a
    linear regression with k observations and more than k weights), the
    iterates converge to the posterior as the step decays. On other targets
    the fit is the Gaussian whose precision matches the covariance of the
    target's scores under it, which is not the maximizer of the ELBO within
    the family (as SLANG's empirical Fisher is not the Hessian).

    Args:
      key: a PRNG key; ``None`` when continuing from a :class:`vijax.FitState`.
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree; differentiable.
      init_params: :class:`vijax.LowRankPrecisionParams` (from
        ``vijax.low_rank_precision(rank=k).init(latent)``), or the ``state``
        of an earlier result to continue it.
      num_steps: the number of steps in this call (>= 1).
      batch_size: samples (score evaluations) per step, B >= 2.
      learning_rate: the step size rho in (0, 1]: a float, a schedule
        ``step -> rho``, or ``None`` (default) for ``0.5 / (1 + t / 5)``.
        A constant step leaves the iterates jittering at a distance that
        grows with rho and shrinks with B; the default decays it.
      max_kl: the trust region in nats per coordinate, as in
        :func:`vijax.batch_and_match` (default 1.0; ``None`` turns it off).
      progress, chunk_size, max_nonfinite, checkpoint_dir, checkpoint_every:
        as in :func:`vijax.batch_and_match`.

    Returns:
      A :class:`vijax.FitResult` whose ``params`` are
      ``LowRankPrecisionParams`` (use them with
      ``vijax.low_rank_precision(rank=k)``), verified by one more batch as in
      :func:`vijax.batch_and_match`; ``trace.elbo`` holds the batch's
      ``mean_b [log p(z_b) - log q(z_b)]`` per step.

    Raises:
      TypeError: ``log_joint`` not callable, ``key`` not a key, or a
        ``learning_rate`` of the wrong type.
      ValueError: ``init_params`` not low-rank-precision parameters,
        ``batch_size`` below 2, ``num_steps``, ``chunk_size`` or
        ``max_nonfinite`` below 1, ``learning_rate`` not in (0, 1],
        ``max_kl`` not a finite number > 0, or non-finite ``init_params``.
      FitError: ``max_nonfinite`` consecutive skipped steps.

    References:
      A. Mishkin, F. Kunstner, D. Nielsen, M. Schmidt and M. E. Khan. SLANG:
      fast structured covariance approximations for Bayesian deep learning
      with natural gradient. NeurIPS 2018.

    Example:
      >>> import jax, vijax
      >>> X = jax.random.normal(jax.random.key(0), (2, 20))
      >>> model = vijax.models.bayesian_linear_regression(
      ...     X, X @ jax.numpy.ones(20), noise_scale=1.0, prior_scale=1.0)
      >>> family = vijax.low_rank_precision(rank=2)
      >>> result = vijax.slang(
      ...     jax.random.key(1), model.log_joint, family.init(model.latent),
      ...     num_steps=300, batch_size=16, progress=False)
      >>> bool(vijax.exact_kl(result.params, family, model) < 0.1)
      True
    """
    batch_size = _check_batch_size(batch_size)
    batch_size, max_kl, options = check_common(
        log_joint, batch_size, max_kl, num_steps, chunk_size, max_nonfinite, progress,
        checkpoint_dir, checkpoint_every)
    learning_rate = _check_learning_rate(learning_rate)
    algorithm = slang_algorithm(
        log_joint, batch_size=batch_size, learning_rate=learning_rate, max_kl=max_kl)
    params = init_params.params if isinstance(init_params, FitState) else init_params
    family = (_family_of(params) if isinstance(params, LowRankPrecisionParams)
              else rank_family(low_rank_precision, 1))
    return run_score_algorithm(
        "slang", ("slang", log_joint, batch_size, learning_rate, max_kl),
        algorithm, key, init_params, options, family=family,
        params_type=LowRankPrecisionParams, log_joint=log_joint, batch_size=batch_size,
        max_kl=max_kl)
