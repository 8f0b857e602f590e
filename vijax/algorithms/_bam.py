"""Batch-and-match (BaM) variational inference for the full-rank Gaussian family.

Each iteration draws a batch of ``B`` samples from ``q_t = N(mu_t, Sigma_t)``,
evaluates the scores ``g_b = grad log p(z_b)`` (batched with ``vmap``), and
solves in closed form for the Gaussian that minimises a score-based divergence
on the batch plus a KL proximity term (Cai et al. 2024, Algorithm 1). With the
batch statistics

    z_bar, g_bar              batch means of samples and scores
    C     = mean (z_b - z_bar)(z_b - z_bar)^T
    Gamma = mean (g_b - g_bar)(g_b - g_bar)^T

and the learning rate ``lambda``::

    U = lambda Gamma + lambda / (1 + lambda) g_bar g_bar^T
    V = Sigma_t + lambda C + lambda / (1 + lambda) (mu_t - z_bar)(mu_t - z_bar)^T
    Sigma_{t+1} solves  Sigma U Sigma + Sigma = V,
    mu_{t+1} = mu_t / (1 + lambda) + lambda / (1 + lambda) (Sigma_{t+1} g_bar + z_bar).

For a Gaussian target ``N(m, A^{-1})`` the scores are ``-A (z - m)``; at
``mu = m``, ``Sigma = A^{-1}`` the batch statistics (for large B) give
``U = lambda A``, ``V = (1 + lambda) A^{-1}``, which ``Sigma = A^{-1}``
solves, and the mean is unchanged: the target is the fixed point.

The quadratic matrix equation is solved in a symmetric form, with no
non-symmetric square root and no explicit inverse: with ``V = R R^T``
(``R`` from a QR factorization of the stacked square-root factors, so the
condition number is never squared) and ``W = R^T U R = Q diag(w) Q^T``,

    Sigma = R Q diag(t) Q^T R^T,    t = 2 / (1 + sqrt(1 + 4 w)),

because ``t`` solves ``w t^2 + t = 1``; the new Cholesky factor then comes
from a QR factorization of ``(R Q diag(sqrt t))^T``. Each iteration costs
``B`` score evaluations plus O((d + B) d^2) arithmetic.

Robustness (vijax's, not the paper's): an adaptive trust region caps
``KL(q_{t+1} || q_t)`` per step (:func:`trust_region`, ``max_kl``) and damps
the default learning rate while its radius is small, draws
whose log density or score is not finite are dropped from the batch, and no
decomposition ever
sees a non-finite matrix: a batch with non-finite log densities or scores is
replaced by zero scores before the update (and rejected), and an overflow
inside the update zeroes the matrix before ``eigh``/QR (and the step is
rejected); non-finite input to LAPACK hung a run in a futex wait.

References:
  D. Cai, C. Modi, L. Pillaud-Vivien, C. C. Margossian, R. M. Gower,
  D. M. Blei and L. K. Saul. Batch and match: black-box variational inference
  with a score-based divergence. ICML 2024.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from vijax import _checks
from vijax._gaussian import CholeskyScale
from vijax.algorithms._score import (
    DEFAULT_MAX_KL,
    algorithm_of,
    check_common,
    check_max_kl,
    check_schedule,
    finite_or_zero,
    run_score_algorithm,
    weighted_batch,
    score_step,
)
from vijax.families._gaussian import FullRankParams
from vijax.fitting._engine import Algorithm
from vijax.fitting._types import FitInfo, FitResult, FitState

ArrayTree = Any
Schedule = Callable[[jax.Array], jax.Array]


def _lower_from_qr(a: jax.Array) -> jax.Array:
    """Lower-triangular L with positive diagonal and ``L L^T = a^T a``."""
    r = jnp.linalg.qr(a, mode="r")
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(r.dtype)
    return (r * sign[:, None]).T


def bam_update(mu, tril, z, scores, lam, weights=None):
    """Returns the BaM step ``(mu_new, tril_new)`` from one batch.

    Args:
      mu: (d,) current mean.
      tril: (d, d) current Cholesky factor.
      z: (B, d) samples from the current Gaussian.
      scores: (B, d) ``grad log p`` at the samples.
      lam: the learning rate lambda > 0 (scalar).
      weights: (B,) non-negative draw weights (0 drops a draw), or None
        for equal weights.

    Returns:
      The new mean and lower-triangular Cholesky factor (positive diagonal).
    """
    _, z_bar, g_bar, zc, gc = weighted_batch(z, scores, weights)
    shrink = lam / (1.0 + lam)
    # V = R R^T from its square-root factors [L, sqrt(lam/B) Zc^T, sqrt(shrink) dmu].
    dmu = mu - z_bar
    v_factors = jnp.concatenate(
        [
            tril.T,
            jnp.sqrt(lam) * zc,
            jnp.sqrt(shrink) * dmu[None, :],
        ],
        axis=0,
    )
    r = _lower_from_qr(v_factors)
    # W = R^T U R = M^T M with M = [sqrt(lam/B) Gc R; sqrt(shrink) g_bar^T R].
    m = jnp.concatenate(
        [jnp.sqrt(lam) * (gc @ r), jnp.sqrt(shrink) * (g_bar @ r)[None, :]], axis=0
    )
    # W = M^T M is formed from M / scale (so that huge but finite scores,
    # as in the far tails of a stochastic-volatility posterior, do not
    # overflow its entries) and its eigenvalues are w = scale^2 w_s, with
    # t = 2 / (1 + hypot(1, 2 sqrt(w))) never squaring sqrt(w) either.
    scale = jnp.max(jnp.abs(m))
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    ms = m / scale
    w_mat = ms.T @ ms
    w_mat = 0.5 * (w_mat + w_mat.T)
    # Never hand a decomposition a non-finite matrix (non-finite input hung
    # LAPACK in a futex wait): a zero matrix instead, and the mean returned
    # is then nan, so the caller rejects the step.
    w_ok = jnp.all(jnp.isfinite(w_mat))
    w_mat = finite_or_zero(w_mat)
    w, vecs = jnp.linalg.eigh(w_mat)
    root_w = jnp.sqrt(jnp.maximum(w, 0.0)) * scale
    t = 2.0 / (1.0 + jnp.hypot(1.0, 2.0 * root_w))
    f = (r @ vecs) * jnp.sqrt(t)[None, :]  # Sigma_new = F F^T
    f_ok = jnp.all(jnp.isfinite(f))
    new_tril = _lower_from_qr(finite_or_zero(f.T))
    sigma_g = new_tril @ (new_tril.T @ g_bar)
    new_mu = mu / (1.0 + lam) + shrink * (sigma_g + z_bar)
    # A zeroed matrix gave a wrong step: make it non-finite, so it is rejected.
    new_mu = jnp.where(w_ok & f_ok, new_mu, jnp.nan)
    return new_mu, new_tril


def _check_learning_rate(learning_rate) -> Union[None, float, Schedule]:
    if learning_rate is None:
        return learning_rate
    if callable(learning_rate):
        return check_schedule(learning_rate)
    return _checks.check_positive_float(
        "learning_rate", learning_rate,
        also=", None or a schedule (a callable of the step)",
    )


def default_learning_rate(learning_rate, step, batch_size: int, dim: int, dtype) -> jax.Array:
    """lambda_t: the schedule or constant given, or ``100 B d / (t + 1)`` for ``None``."""
    if learning_rate is None:
        lam = 100.0 * batch_size * dim / (step + 1.0)
    elif callable(learning_rate):
        lam = learning_rate(step)
    else:
        lam = learning_rate
    return jnp.asarray(lam, dtype)


def make_bam_step(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
) -> Callable[[FitState], tuple[FitState, FitInfo]]:
    """Returns ``step(state) -> (state, info)``: one guarded batch-and-match iteration.

    The pure core of :func:`batch_and_match`, with the contract of
    :func:`vijax.make_step`: noise from ``fold_in(state.key, state.step)``,
    a step whose log densities, scores or updated parameters are not finite
    leaves the parameters unchanged and sets ``info.skipped``. ``opt_state``
    is a :class:`vijax.algorithms.TrustState` (the adaptive trust region;
    start from ``bam_algorithm(...).init(key, params)``; a ``()`` is
    replaced by a fresh one, for a single call). ``jit``, ``vmap`` or
    ``lax.scan`` it as you like.

    Args:
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree.
      batch_size: the number B of samples (and score evaluations) per step.
      learning_rate: as in :func:`batch_and_match`.
      max_kl: as in :func:`batch_and_match`.

    Returns:
      ``step(state: FitState) -> (FitState, FitInfo)``; ``info.elbo`` is
      ``mean_b [log p(z_b) - log q(z_b)]`` (unbiased for the ELBO, exact when
      q is the posterior) and
      ``info.grad_norm`` the norm of the batch mean score, the ELBO gradient
      estimate with respect to the mean.

    Raises:
      TypeError: ``log_joint`` is not callable or ``learning_rate`` has the
        wrong type.
      ValueError: ``batch_size < 1`` or ``learning_rate`` not a finite number > 0.
    """
    _checks.check_log_joint(log_joint)
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    learning_rate = _check_learning_rate(learning_rate)
    max_kl = check_max_kl(max_kl)

    def update(mu, scale, z, scores, step, weights, damping):
        lam = default_learning_rate(learning_rate, step, batch_size, mu.shape[0], mu.dtype)
        if learning_rate is None:
            lam = lam * damping
        new_mu, new_tril = bam_update(mu, jnp.tril(scale.tril), z, scores, lam, weights)
        return new_mu, CholeskyScale(new_tril), lam > 0

    return score_step(log_joint, update, batch_size=batch_size, max_kl=max_kl)


def batch_and_match(
    key: Optional[jax.Array],
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Union[FullRankParams, FitState],
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
    """Returns a full-rank Gaussian fitted by batch and match (Cai et al. 2024).

    Each step draws ``batch_size`` samples from the current Gaussian,
    evaluates ``grad log p`` at them (one batched ``vmap`` of
    ``jax.value_and_grad(log_joint)``) and moves to the closed-form
    minimiser of the batch's score-based divergence plus a KL proximity term
    weighted by ``2 / learning_rate`` (see the module docstring). No optimizer
    and no ELBO gradient are involved; the cost per step is ``batch_size``
    score evaluations and O((d + B) d^2) linear algebra.

    For a Gaussian target the exact posterior is a fixed point for any batch,
    and with ``batch_size > d`` the iteration reaches it in a handful of
    steps. For other targets BaM converges towards the minimiser of the
    score-based divergence, which is close to, but not the same as, the
    minimiser of KL(q || p) that ELBO methods find; it needs a decreasing
    learning rate to settle. Take ``batch_size`` larger than d, say 1.5 d
    or more: with ``batch_size <= d`` the batch covariances of the draws and
    of the scores are singular or nearly so (the smallest eigenvalue of a
    sample covariance of B draws in d dimensions is of the order of
    ``(1 - sqrt(d / B))**2``), the match leaves those directions to the
    proximal term alone, and the trust region undoes most steps: on
    ill-conditioned regressions at d = 100 and 1000 such fits crawled where
    1.5 d converged in a few steps (``benchmarks/results/cpu/bam_batch_size.md``).
    With ``batch_size`` much smaller than d each step only learns about the
    covariance in the span of the batch (:func:`vijax.patched_batch_and_match`
    is the low-rank method for that regime).

    The loop is the engine :func:`vijax.fit` runs (compiled chunks of
    ``chunk_size`` steps, a progress bar and checkpoints between chunks,
    ``KeyboardInterrupt`` returning the last completed chunk), and the
    result has the same type.
    A step whose log densities, scores or updated parameters are not finite
    is skipped (the parameters are kept and ``trace.skipped`` is set);
    ``max_nonfinite`` consecutive skipped steps raise :class:`vijax.FitError`.

    Args:
      key: a PRNG key (typed, or legacy uint32); ``None`` when continuing
        from a :class:`vijax.FitState`.
      log_joint: ``log_joint(z) -> scalar``, the unnormalized log p(x, z) of
        one latent pytree; must be differentiable.
      init_params: :class:`vijax.FullRankParams` (from
        ``vijax.full_rank().init(latent)``), or the ``state`` of an earlier
        batch-and-match result to continue it.
      num_steps: the number of steps in this call (>= 1).
      batch_size: samples (score evaluations) per step, B >= 1.
      learning_rate: the step size lambda_t > 0 of the proximal term: a float
        (constant), a callable ``step -> lambda`` (an optax schedule), or
        ``None`` (default) for ``lambda_t = 100 B d / (t + 1)``: large at
        the start (nearly a full match of each batch, which is what a
        Gaussian target rewards; when the mean is far off, a step moves it by
        about ``sqrt(lambda)`` current standard deviations) and decreasing so
        that the iterates settle on non-Gaussian targets. The constant 100
        was chosen on ``benchmarks/fast_vi.py``; it is a heuristic, not the
        paper's. With the trust region on, the default is also damped by it:
        multiplied by ``min(1, radius / (10 max_kl))``
        (:func:`vijax.algorithms._score.damping`): a tenth at the start,
        less after undone steps (each quarters the radius), 1 once accepted
        steps have grown the radius tenfold (six in a row from the start).
        Undamped, a step that nearly matches a batch of a non-Gaussian
        target can throw q where its log weights are heavy-tailed, or, shrunk
        by the trust region, keep making q worse (every step undone, the fit
        stalled); a smaller lambda blends the batch into q instead
        (``benchmarks/results/cpu/bam_trust_region.md`` measures both). A
        ``learning_rate`` you pass is not damped.
      max_kl: the starting trust region, in nats per coordinate: a step
        whose ``KL(q_{t+1} || q_t)`` exceeds ``radius * d`` is shrunk
        towards ``q_t`` (mean and Cholesky factor moved by ``sqrt(radius * d
        / KL)`` of the way, once, no loop), so that one batch of a
        non-Gaussian or badly scaled target cannot throw q where the log
        density overflows. The radius starts at ``max_kl`` (default 1.0)
        and adapts: it grows by half after each accepted step (up to
        ``100 * max_kl``); when the batch ELBO at the new q falls below the
        last one by more than three of its standard errors, the step is
        undone and the radius quartered (also after a skipped step). Its
        state is ``state.opt_state``
        (:class:`vijax.algorithms.TrustState`). It also damps the default
        learning rate (above). ``benchmarks/results/cpu/bam_trust_region.md``
        measures the variants: the cost on Gaussian targets, and how many
        fit keys go astray on the zoo's stochastic volatility and item
        response models. ``None`` turns it off (the paper's update).
      progress: show a progress bar; ``None`` shows it in a terminal or
        notebook, as :func:`vijax.fit` does.
      chunk_size: steps per compiled chunk (>= 1).
      max_nonfinite: consecutive skipped steps allowed before ``FitError``.
      checkpoint_dir, checkpoint_every: checkpoints, as in :func:`vijax.fit`
        (continue with ``batch_and_match(None, log_joint,
        vijax.load_checkpoint(dir), ...)``).

    Returns:
      A :class:`vijax.FitResult` whose ``params`` are ``FullRankParams``
      (use them with ``vijax.full_rank()``). With ``max_kl`` set they are
      verified: the last step is judged by one more batch (the one the next
      step would draw, ``batch_size`` more evaluations), and if it made q
      worse, ``params`` are the point before it (``state`` is left as the
      run ended, so continuing it is the same as one longer run).
      ``state.opt_state`` is the :class:`vijax.algorithms.TrustState`;
      ``trace.elbo`` holds ``mean_b [log p(z_b) - log q(z_b)]`` per step (an
      unbiased ELBO estimate) and ``trace.grad_norm`` the norm of the mean score.

    Raises:
      TypeError: ``log_joint`` is not callable, ``key`` is not a key, or
        ``learning_rate`` has the wrong type.
      ValueError: ``init_params`` are not full-rank parameters (an
        unsupported family), ``batch_size``, ``num_steps``, ``chunk_size``
        or ``max_nonfinite`` below 1, ``learning_rate`` not a finite number
        > 0, or non-finite ``init_params``.
      FitError: ``max_nonfinite`` consecutive steps with non-finite
        log densities or scores.

    References:
      D. Cai, C. Modi, L. Pillaud-Vivien, C. C. Margossian, R. M. Gower,
      D. M. Blei and L. K. Saul. Batch and match: black-box variational
      inference with a score-based divergence. ICML 2024.

    Example:
      >>> import jax, vijax
      >>> X = jax.random.normal(jax.random.key(0), (50, 3))
      >>> model = vijax.models.bayesian_linear_regression(
      ...     X, X @ jax.numpy.ones(3), noise_scale=1.0, prior_scale=1.0)
      >>> result = vijax.batch_and_match(
      ...     jax.random.key(1), model.log_joint,
      ...     vijax.full_rank().init(model.latent),
      ...     num_steps=20, batch_size=8, progress=False)
      >>> float(vijax.exact_kl(result.params, vijax.full_rank(), model)) < 1e-3
      True
    """
    batch_size, max_kl, options = check_common(
        log_joint, batch_size, max_kl, num_steps, chunk_size, max_nonfinite, progress,
        checkpoint_dir, checkpoint_every)
    learning_rate = _check_learning_rate(learning_rate)
    algorithm = bam_algorithm(
        log_joint, batch_size=batch_size, learning_rate=learning_rate, max_kl=max_kl)
    return run_score_algorithm(
        "batch_and_match", ("batch_and_match", log_joint, batch_size, learning_rate, max_kl),
        algorithm, key, init_params, options, log_joint=log_joint, batch_size=batch_size,
        max_kl=max_kl)


def bam_algorithm(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
) -> Algorithm:
    """Batch-and-match as the engine's :class:`vijax.fitting.Algorithm`.

    ``init(key, params)`` starts at step 0 with a fresh
    :class:`vijax.algorithms.TrustState`; ``step`` is :func:`make_bam_step`.
    """
    return algorithm_of(make_bam_step(
        log_joint, batch_size=batch_size, learning_rate=learning_rate, max_kl=max_kl),
        check_max_kl(max_kl))
