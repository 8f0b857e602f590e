"""Gaussian score matching (GSM) for the full-rank Gaussian family (Modi et al. 2023).

Each iteration draws ``B`` samples ``z_b`` from ``q_t = N(mu_t, Sigma_t)``,
evaluates the scores ``g_b = grad log p(z_b)``, and for each sample solves in
closed form for the Gaussian closest to ``q_t`` in KL whose score at ``z_b``
equals ``g_b`` (the paper's Theorem); the new mean and covariance are the
averages of the per-sample moves. With ``delta_b = mu_t - z_b``:

    rho_b   = (sqrt(1 + 4 (g_b^T Sigma_t g_b + (delta_b^T g_b)^2)) - 1) / 2
    eps_b   = Sigma_t g_b - delta_b
    step_b  = (eps_b - delta_b (g_b^T eps_b) / (1 + rho_b + delta_b^T g_b)) / (1 + rho_b)
    mu_{t+1}    = mu_t + mean_b step_b
    Sigma_{t+1} = Sigma_t + mean_b [delta_b delta_b^T - (delta_b + step_b)(delta_b + step_b)^T]

For one sample the new Gaussian's score at ``z_b`` is exactly ``g_b``
(tested); for a Gaussian target the target is a fixed point. Each
per-sample covariance is positive definite (the paper's theorem), so their
average is too; should rounding break that, the Cholesky factorization fails
and the step is rejected. The trust region of
:mod:`vijax.algorithms._score` (``max_kl``) keeps single batches from
throwing q far. Each iteration costs ``B`` score evaluations and O((B + d)
d^2) arithmetic (one Cholesky factorization of the new covariance).

References:
  C. Modi, C. Margossian, Y. Yao, R. Gower, D. Blei and L. Saul. Variational
  inference with Gaussian score matching. NeurIPS 2023.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from vijax.algorithms._score import (
    DEFAULT_MAX_KL,
    algorithm_of,
    check_common,
    check_max_kl,
    run_score_algorithm,
    score_step,
)
from vijax import _checks
from vijax._gaussian import CholeskyScale
from vijax.families._gaussian import FullRankParams
from vijax.fitting._engine import Algorithm
from vijax.fitting._types import FitInfo, FitResult, FitState

ArrayTree = Any


def gsm_update(mu, tril, z, scores, weights=None):
    """Returns the GSM step ``(mu_new, tril_new, ok)`` from one batch.

    Args:
      mu: (d,) current mean.
      tril: (d, d) current Cholesky factor.
      z: (B, d) samples from the current Gaussian.
      scores: (B, d) ``grad log p`` at the samples.
      weights: (B,) non-negative draw weights (0 drops a draw), or None
        for equal weights.

    Returns:
      The new mean, the Cholesky factor of the new covariance, and whether
      that covariance was positive definite (and finite). When it was not,
      the factor is the identity's and ``ok`` is False.
    """
    cov = tril @ tril.T
    delta = mu[None, :] - z  # (B, d)
    s_g = scores @ cov  # rows Sigma g_b (Sigma symmetric)
    g_s_g = jnp.sum(scores * s_g, axis=1)
    d_g = jnp.sum(delta * scores, axis=1)
    rho = 0.5 * (jnp.sqrt(1.0 + 4.0 * (g_s_g + jnp.square(d_g))) - 1.0)
    eps = s_g - delta
    g_eps = jnp.sum(scores * eps, axis=1)
    steps = (eps - delta * (g_eps / (1.0 + rho + d_g))[:, None]) / (1.0 + rho)[:, None]
    p = jnp.full(z.shape[0], 1.0 / z.shape[0], mu.dtype) if weights is None else (
        weights / jnp.sum(weights))
    new_mu = mu + p @ steps
    moved = delta + steps  # mu_t + step_b - z_b
    new_cov = cov + (delta.T @ (p[:, None] * delta) - moved.T @ (p[:, None] * moved))
    new_cov = 0.5 * (new_cov + new_cov.T)
    finite = jnp.all(jnp.isfinite(new_cov))
    # Never factor a non-finite matrix: the identity instead, and reject.
    new_cov = jnp.where(finite, new_cov, jnp.eye(mu.shape[0], dtype=mu.dtype))
    new_tril = jnp.linalg.cholesky(new_cov)
    ok = finite & jnp.all(jnp.isfinite(new_tril)) & jnp.all(jnp.isfinite(new_mu))
    new_tril = jnp.where(ok, new_tril, jnp.eye(mu.shape[0], dtype=mu.dtype))
    return new_mu, new_tril, ok


def make_gsm_step(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
) -> Callable[[FitState], tuple[FitState, FitInfo]]:
    """Returns ``step(state) -> (state, info)``: one guarded GSM iteration.

    The pure core of :func:`gaussian_score_matching`, with the contract of
    :func:`vijax.make_bam_step` (noise from ``fold_in(state.key,
    state.step)``; a step with non-finite log densities or scores, a
    covariance that is not positive definite, or non-finite parameters is
    skipped; ``opt_state`` is a :class:`vijax.algorithms.TrustState`).

    Args:
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree.
      batch_size: samples (score evaluations) per step, B >= 1.
      max_kl: the trust region, as in :func:`vijax.batch_and_match`
        (default 1.0).

    Raises:
      TypeError: ``log_joint`` is not callable.
      ValueError: ``batch_size < 1`` or ``max_kl`` not positive.
    """
    _checks.check_log_joint(log_joint)
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    max_kl = check_max_kl(max_kl)

    def update(mu, scale, z, scores, step, weights, damping):
        new_mu, new_tril, ok = gsm_update(mu, jnp.tril(scale.tril), z, scores, weights)
        return new_mu, CholeskyScale(new_tril), ok

    return score_step(log_joint, update, batch_size=batch_size, max_kl=max_kl)


def gsm_algorithm(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
) -> Algorithm:
    """GSM as the engine's :class:`vijax.fitting.Algorithm` (``opt_state`` a TrustState)."""
    return algorithm_of(make_gsm_step(log_joint, batch_size=batch_size, max_kl=max_kl),
                        check_max_kl(max_kl))


def gaussian_score_matching(
    key: Optional[jax.Array],
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Union[FullRankParams, FitState],
    *,
    num_steps: int,
    batch_size: int,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
    progress: Optional[bool] = None,
    chunk_size: int = 100,
    max_nonfinite: int = 20,
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: Optional[int] = None,
) -> FitResult:
    """Returns a full-rank Gaussian fitted by Gaussian score matching (Modi et al. 2023).

    Each step draws ``batch_size`` samples from the current Gaussian,
    evaluates ``grad log p`` at them, and moves to the average of the
    per-sample closed-form Gaussians closest to the current one in KL whose
    score matches the target's at the sample (see the module docstring). No
    learning rate and no optimizer. For a Gaussian target the posterior is a
    fixed point and, in exact arithmetic, ``d + 1`` samples in general
    position pin it down; on other targets GSM moves towards a Gaussian whose
    score matches the target's where q puts its mass (not the ELBO optimum),
    and a per-step trust region (``max_kl``, as in
    :func:`vijax.batch_and_match`) keeps one batch from throwing q where the
    log density overflows. Measured on linear regression (d = 5, from the
    family's default start, 160 steps): KL to the posterior 140 with B = 2,
    4.1 with B = 4, 5e-8 with B = 6 and 3e-13 with B = 8; take B of the
    order of d, and expect many more steps as d grows and the posterior
    concentrates (GSM is the slowest of vijax's methods in
    ``benchmarks/results/cpu/head_to_head.md``).

    Runs on the engine :func:`vijax.fit` uses (compiled chunks, progress,
    checkpoints, ``KeyboardInterrupt``); skipped steps and ``FitError`` as in
    :func:`vijax.batch_and_match`.

    Args:
      key: a PRNG key; ``None`` when continuing from a :class:`vijax.FitState`.
      log_joint: ``log_joint(z) -> scalar``; must be differentiable.
      init_params: :class:`vijax.FullRankParams` (from
        ``vijax.full_rank().init(latent)``), or the ``state`` of an earlier
        result to continue it.
      num_steps: the number of steps in this call (>= 1).
      batch_size: samples (score evaluations) per step (>= 1; of the order
        of d for a fast start).
      max_kl: the starting trust region in nats per coordinate, adapted as
        in :func:`vijax.batch_and_match` (default 1.0; ``None``: off).
      progress, chunk_size, max_nonfinite, checkpoint_dir, checkpoint_every:
        as in :func:`vijax.batch_and_match`.

    Returns:
      A :class:`vijax.FitResult` with ``FullRankParams``, verified by one
      more batch as in :func:`vijax.batch_and_match`.

    Raises:
      TypeError: ``log_joint`` is not callable or ``key`` is not a key.
      ValueError: ``init_params`` are not full-rank parameters,
        ``batch_size``, ``num_steps``, ``chunk_size`` or ``max_nonfinite``
        below 1, or ``max_kl`` not positive.
      FitError: ``max_nonfinite`` consecutive skipped steps.

    References:
      C. Modi, C. Margossian, Y. Yao, R. Gower, D. Blei and L. Saul.
      Variational inference with Gaussian score matching. NeurIPS 2023.

    Example:
      >>> import jax, vijax
      >>> X = jax.random.normal(jax.random.key(0), (50, 3))
      >>> model = vijax.models.bayesian_linear_regression(
      ...     X, X @ jax.numpy.ones(3), noise_scale=1.0, prior_scale=1.0)
      >>> result = vijax.gaussian_score_matching(
      ...     jax.random.key(1), model.log_joint, vijax.full_rank().init(model.latent),
      ...     num_steps=100, batch_size=4, progress=False)
    """
    batch_size, max_kl, options = check_common(
        log_joint, batch_size, max_kl, num_steps, chunk_size, max_nonfinite, progress,
        checkpoint_dir, checkpoint_every)
    algorithm = gsm_algorithm(log_joint, batch_size=batch_size, max_kl=max_kl)
    return run_score_algorithm(
        "gaussian_score_matching", ("gsm", log_joint, batch_size, max_kl), algorithm, key,
        init_params, options, log_joint=log_joint, batch_size=batch_size, max_kl=max_kl)
