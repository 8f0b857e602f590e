"""Patched batch-and-match (pBaM): BaM for low-rank-plus-diagonal Gaussians, linear in d.

Modi, Cai and Saul (2025). Each iteration is a batch-and-match step
(:mod:`vijax.algorithms._bam`) followed by a *patch* that projects the new
covariance back onto ``Sigma = W W^T + Psi`` (``W`` of shape (d, k), ``Psi``
diagonal), the covariance of :func:`vijax.low_rank`. No d x d matrix is
formed: with ``q_t = N(mu_t, W W^T + Psi)`` and a batch of ``B`` draws and
scores,

    V = Psi + F F^T,   F = [W, sqrt(lambda / B) Zc^T, sqrt(lambda / (1 + lambda)) (mu_t - z_bar)]
    U = G G^T,         G = [sqrt(lambda / B) Gc^T, sqrt(lambda / (1 + lambda)) g_bar]

(``Zc``, ``Gc`` the centred draws and scores), and BaM's new covariance,
the solution of ``Sigma U Sigma + Sigma = V``, is in closed form

    Sigma_BaM = V - (V G) f(G^T V G) (V G)^T,   f(w) = 4 / (1 + sqrt(1 + 4 w))^2

(``f`` applied to the eigenvalues of the small (B + 1) x (B + 1) matrix
``G^T V G``): a diagonal plus a low-rank term of rank ``k + 2B + 2``, whose
products with thin matrices and whose diagonal cost O(d (k + B)^2). It
follows from the symmetric solution ``Sigma = R Q diag(t) Q^T R^T`` of
:func:`vijax.algorithms._bam.bam_update`: ``R^T U R`` has rank ``B + 1``,
so ``t = 1`` off that subspace, and on it ``1 - t = w f(w)``. The new mean
is BaM's, ``mu_t / (1 + lambda) + lambda / (1 + lambda) (Sigma_BaM g_bar +
z_bar)``.

The patch: the maximum-likelihood factor analysis of ``Sigma_BaM``, i.e. the
``W W^T + Psi`` minimising ``KL(N(0, Sigma_BaM) || N(0, W W^T + Psi))``,
warm-started at the current ``(W, Psi)``. The paper runs EM for it; here
each round alternates the two stationarity conditions (see :func:`patch`):
the best ``W`` for fixed ``Psi`` from the top-k eigenpairs of ``Psi^{-1/2}
Sigma_BaM Psi^{-1/2}`` (subspace iteration, O(d (k + B) k)), then ``Psi =
diag(Sigma_BaM - W W^T)``, safeguarded by an EM step so that no round
raises the objective. Same fixed points as EM, far fewer rounds.

For a Gaussian target whose covariance is itself ``W* W*^T + Psi*`` of
rank k, the target is a fixed point (tested). The guard and the KL trust
region are those of :mod:`vijax.algorithms._score` (the trust region's KL by
the Woodbury identity, O(d k^2)).

References:
  C. Modi, D. Cai and L. K. Saul. Batch, match, and patch: low-rank
  approximations for score-based variational inference. AISTATS 2025.

  D. N. Lawley and A. E. Maxwell. Factor Analysis as a Statistical Method.
  Butterworths, 1971 (the loading for fixed uniquenesses).

  D. B. Rubin and D. T. Thayer. EM algorithms for ML factor analysis.
  Psychometrika 47, 1982.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

from vijax import _checks
from vijax._gaussian import LowRankScale
from vijax.algorithms._bam import _check_learning_rate, default_learning_rate
from vijax.algorithms._score import (
    DEFAULT_MAX_KL,
    algorithm_of,
    rank_family,
    check_common,
    check_max_kl,
    finite_or_zero,
    run_score_algorithm,
    score_step,
    weighted_batch,
)
from vijax.families._gaussian import LowRankParams, low_rank
from vijax.fitting._engine import Algorithm
from vijax.fitting._types import FitInfo, FitResult, FitState

ArrayTree = Any
Schedule = Callable[[jax.Array], jax.Array]
DEFAULT_PATCH_STEPS = 3


class Matched(NamedTuple):
    """BaM's new covariance in factored form: ``diag(psi) + A diag(sign) A^T``."""

    psi: jax.Array
    a: jax.Array
    sign: jax.Array

    def matmul(self, x):
        """``Sigma_BaM @ x`` for ``x`` of shape (d, m) or (d,)."""
        if x.ndim == 1:
            return self.psi * x + self.a @ (self.sign * (self.a.T @ x))
        return self.psi[:, None] * x + self.a @ (self.sign[:, None] * (self.a.T @ x))

    def diagonal(self):
        return self.psi + jnp.square(self.a) @ self.sign

    def dense(self):
        """The d x d matrix (for tests and small d only)."""
        return jnp.diag(self.psi) + (self.a * self.sign[None, :]) @ self.a.T


def pbam_match(mu, cov_factor, diag_scale, z, scores, lam, weights=None):
    """BaM's step from ``N(mu, W W^T + diag(diag_scale^2))`` in factored form.

    Returns ``(new_mu, matched, ok)``: the new mean, the new covariance as a
    :class:`Matched` (never a d x d matrix), and False where the small
    eigenproblem saw a non-finite matrix (it is then given zeros and the
    step must be rejected).
    """
    dtype = mu.dtype
    _, z_bar, g_bar, zc, gc = weighted_batch(z, scores, weights)
    shrink = lam / (1.0 + lam)
    psi = jnp.square(diag_scale)
    f = jnp.concatenate(
        [cov_factor, jnp.sqrt(lam) * zc.T, jnp.sqrt(shrink) * (mu - z_bar)[:, None]], axis=1)
    g = jnp.concatenate([jnp.sqrt(lam) * gc.T, jnp.sqrt(shrink) * g_bar[:, None]], axis=1)
    vg = psi[:, None] * g + f @ (f.T @ g)
    small = g.T @ vg
    small = 0.5 * (small + small.T)
    ok = jnp.all(jnp.isfinite(small))
    w, vecs = jnp.linalg.eigh(finite_or_zero(small))
    w = jnp.maximum(w, 0.0)
    c = 4.0 / jnp.square(1.0 + jnp.sqrt(1.0 + 4.0 * w))
    y = vg @ vecs
    matched = Matched(
        psi=psi,
        a=jnp.concatenate([f, y], axis=1),
        sign=jnp.concatenate([jnp.ones(f.shape[1], dtype), -c.astype(dtype)]),
    )
    new_mu = mu / (1.0 + lam) + shrink * (matched.matmul(g_bar) + z_bar)
    return new_mu, matched, ok


def patch(matched: Matched, cov_factor, diag_scale, num_steps: int, power_steps: int = 2):
    """The rank-k-plus-diagonal Gaussian nearest to ``Sigma_BaM``: ``(W, diag_scale)``.

    Minimises ``KL(N(0, S) || N(0, W W^T + Psi))`` (``S = Sigma_BaM``: the
    maximum-likelihood factor analysis of "sample covariance" S, the
    projection of Modi, Cai and Saul) by alternating its two stationarity
    conditions, warm-started at the given ``(cov_factor, diag_scale)``:

    * for fixed ``Psi`` the best ``W`` is ``Psi^{1/2} X diag(sqrt(max(e - 1,
      0)))`` with ``(e, X)`` the top-k eigenpairs of ``Psi^{-1/2} S
      Psi^{-1/2}`` (Lawley and Maxwell), found by ``power_steps`` steps of
      subspace iteration from the current ``Psi^{-1/2} W`` and a k x k
      Rayleigh-Ritz eigenproblem;
    * for fixed ``W``, ``Psi = diag(S - W W^T)``, kept at or above
      ``sqrt(eps)`` times ``diag(S)`` (rounding can push it to zero or below
      when S is nearly singular).

    The alternation is not monotone by itself (from a poor start it can
    fall into a Heywood case, a variance at the floor), so each round also
    takes one EM step for factor analysis (Rubin and Thayer 1982; the
    paper's patch) from the same point and keeps whichever of the two
    lowers the objective more (evaluated exactly with the Woodbury identity
    and the determinant lemma, O(d (k + B) k)); EM never raises it, so no
    round does. ``num_steps`` rounds (a ``fori_loop``). EM alone has the
    same fixed points but crawls: measured on a rank-5 Gaussian target
    (d = 2000, B = 32), 10 EM iterations per step left the fit at KL 5000
    after 1000 steps, where 3 rounds of this reach KL 1e-4.
    """
    dtype = cov_factor.dtype
    k = cov_factor.shape[1]
    eye = jnp.eye(k, dtype=dtype)
    s_diag = matched.diagonal()
    floor = jnp.sqrt(jnp.finfo(dtype).eps) * jnp.abs(s_diag)

    def objective(w, psi):
        """``2 KL(N(0, S) || N(0, W W^T + Psi))`` up to a constant (Woodbury, lemma)."""
        a = w / psi[:, None]
        lc = jnp.linalg.cholesky(eye + w.T @ a)
        x = solve_triangular(lc, a.T @ matched.a, lower=True)  # (k, r)
        quad_a = jnp.sum(jnp.square(matched.a) / psi[:, None], axis=0) - jnp.sum(
            jnp.square(x), axis=0)
        y = solve_triangular(lc, (a * jnp.sqrt(matched.psi)[:, None]).T, lower=True)
        trace = (jnp.sum(matched.psi / psi) - jnp.sum(jnp.square(y))
                 + jnp.sum(matched.sign * quad_a))
        return trace + jnp.sum(jnp.log(psi)) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(lc)))

    def principal(w, psi):
        root = jnp.sqrt(psi)[:, None]

        def whitened(x):  # Psi^{-1/2} S Psi^{-1/2} x
            return matched.matmul(x / root) / root

        x = jnp.linalg.qr(w / root)[0]
        for _ in range(power_steps):
            x = jnp.linalg.qr(whitened(x))[0]
        small = x.T @ whitened(x)
        e, vecs = jnp.linalg.eigh(finite_or_zero(0.5 * (small + small.T)))
        w = root * (x @ vecs) * jnp.sqrt(jnp.maximum(e - 1.0, 0.0))[None, :]
        return w, jnp.maximum(s_diag - jnp.sum(jnp.square(w), axis=1), floor)

    def em(w, psi):
        a = w / psi[:, None]
        beta_t = cho_solve((jnp.linalg.cholesky(eye + w.T @ a), True), a.T).T  # (d, k)
        sb = matched.matmul(beta_t)  # S beta^T
        m = eye - beta_t.T @ w + beta_t.T @ sb
        w = cho_solve((jnp.linalg.cholesky(0.5 * (m + m.T)), True), sb.T).T
        return w, jnp.maximum(s_diag - jnp.sum(w * sb, axis=1), floor)

    def round_(_, carry):
        w, psi, value = carry
        w_p, psi_p = principal(w, psi)
        value_p = objective(w_p, psi_p)
        w_e, psi_e = em(w, psi)
        value_e = objective(w_e, psi_e)
        take = value_p <= value_e  # False for a nan value
        return (jnp.where(take, w_p, w_e), jnp.where(take, psi_p, psi_e),
                jnp.where(take, value_p, value_e))

    psi0 = jnp.square(diag_scale)
    w, psi, _ = jax.lax.fori_loop(
        0, num_steps, round_, (cov_factor, psi0, objective(cov_factor, psi0)))
    return w, jnp.sqrt(psi)


def pbam_update(mu, cov_factor, diag_scale, z, scores, lam, weights=None, *,
                patch_steps=DEFAULT_PATCH_STEPS):
    """One patched BaM step; returns ``(new_mu, new_cov_factor, new_diag_scale, ok)``.

    Args:
      mu: (d,) current mean.
      cov_factor: (d, k) current ``W``.
      diag_scale: (d,) current diagonal standard deviations (``Psi = diag_scale^2``).
      z: (B, d) samples from the current Gaussian.
      scores: (B, d) ``grad log p`` at the samples.
      lam: the learning rate lambda > 0 (scalar).
      weights: (B,) draw weights (0 drops a draw), or None for equal weights.
      patch_steps: rounds of the patch (>= 1).
    """
    new_mu, matched, ok = pbam_match(mu, cov_factor, diag_scale, z, scores, lam, weights)
    new_w, new_s = patch(matched, cov_factor, diag_scale, patch_steps)
    return new_mu, new_w, new_s, ok


def max_default_learning_rate(dtype) -> float:
    """The cap on the default lambda_t: ``3e-6 / eps``, 25 in float32 and ~1e10 in float64.

    The match step's ``Sigma_BaM = V - (V G) f (V G)^T`` subtracts two
    terms of size ``lambda`` to leave one of size 1, so it loses about
    ``eps * lambda`` in relative accuracy (measured: 1e-6 at lambda = 1,
    5e-4 at lambda = 3200 in float32); at the uncapped default's first
    steps (lambda = 100 B d) a float32 step is noise and the patch fails.
    """
    return 3e-6 / float(jnp.finfo(dtype).eps)


def _family_of(params):
    return rank_family(low_rank, params.cov_factor.shape[-1])


def make_pbam_step(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
    patch_steps: int = DEFAULT_PATCH_STEPS,
) -> Callable[[FitState], tuple[FitState, FitInfo]]:
    """Returns ``step(state) -> (state, info)``: one guarded patched-BaM iteration.

    The pure core of :func:`patched_batch_and_match`, with the contract of
    :func:`vijax.make_step` (noise from ``fold_in(state.key, state.step)``;
    a non-finite step keeps the parameters and sets ``info.skipped``;
    ``opt_state`` a :class:`vijax.algorithms.TrustState`); ``state.params`` are
    :class:`vijax.LowRankParams`. Arguments as in
    :func:`patched_batch_and_match`.
    """
    _checks.check_log_joint(log_joint)
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    learning_rate = _check_learning_rate(learning_rate)
    max_kl = check_max_kl(max_kl)
    patch_steps = _checks.check_positive_int("patch_steps", patch_steps)

    def update(mu, scale, z, scores, step, weights, damping):
        lam = default_learning_rate(learning_rate, step, batch_size, mu.shape[0], mu.dtype)
        if learning_rate is None:
            lam = jnp.minimum(lam, max_default_learning_rate(mu.dtype))
        new_mu, new_w, new_s, ok = pbam_update(
            mu, scale.cov_factor, scale.diag_scale, z, scores, lam, weights,
            patch_steps=patch_steps)
        return new_mu, LowRankScale(new_w, new_s), ok & (lam > 0)

    return score_step(
        log_joint, update, batch_size=batch_size, max_kl=max_kl, family=_family_of)


def pbam_algorithm(
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
    patch_steps: int = DEFAULT_PATCH_STEPS,
) -> Algorithm:
    """Patched BaM as the engine's :class:`vijax.fitting.Algorithm` (``opt_state`` a TrustState)."""
    return algorithm_of(make_pbam_step(
        log_joint, batch_size=batch_size, learning_rate=learning_rate, max_kl=max_kl,
        patch_steps=patch_steps), check_max_kl(max_kl))


def patched_batch_and_match(
    key: Optional[jax.Array],
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Union[LowRankParams, FitState],
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: Union[None, float, Schedule] = None,
    max_kl: Optional[float] = DEFAULT_MAX_KL,
    patch_steps: int = DEFAULT_PATCH_STEPS,
    progress: Optional[bool] = None,
    chunk_size: int = 100,
    max_nonfinite: int = 20,
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: Optional[int] = None,
) -> FitResult:
    """Returns a low-rank-plus-diagonal Gaussian fitted by patched batch and match.

    :func:`vijax.batch_and_match` for the family :func:`vijax.low_rank`
    (``Sigma = W W^T + diag(s^2)``, rank k): each step draws ``batch_size``
    samples, evaluates their scores, takes BaM's closed-form step and
    projects ("patches") the new covariance back onto rank k plus diagonal
    by ``patch_steps`` rounds of maximum-likelihood factor analysis (Modi,
    Cai and Saul 2025, with a faster solver than their EM; see the module
    docstring). No d x d matrix is formed: a step costs
    ``batch_size`` score evaluations plus O(d (k + B)^2) arithmetic and
    O(d (k + B)) memory, so it runs where a full-rank Gaussian would not fit
    (d = 10^4 and more on a CPU).

    The fit minimises BaM's score-based divergence within the low-rank
    family, which is not the same Gaussian that maximises the ELBO within
    it (for a Gaussian target whose covariance is itself rank k plus
    diagonal, both are the target, a fixed point here). As for BaM, a
    decreasing learning rate settles the iterates on non-Gaussian targets;
    the trust region (``max_kl``) and the guards of
    :func:`vijax.batch_and_match` apply unchanged.

    Args:
      key: a PRNG key; ``None`` when continuing from a :class:`vijax.FitState`.
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree; differentiable.
      init_params: :class:`vijax.LowRankParams` (from
        ``vijax.low_rank(rank=k).init(latent)``), or the ``state`` of an
        earlier result to continue it.
      num_steps: the number of steps in this call (>= 1).
      batch_size: samples (score evaluations) per step, B >= 1.
      learning_rate: as in :func:`vijax.batch_and_match`: a float, a
        schedule, or ``None`` (default) for BaM's ``100 B d / (t + 1)``
        capped at ``3e-6 / eps`` of the dtype: 25 in float32, about 1e10
        (no cap in practice) in float64. The match step subtracts two terms
        of size lambda to leave one of size 1, so it loses about
        ``eps * lambda`` of relative accuracy: a float32 run at the uncapped
        default failed. Measured on rank-5 Gaussian targets with B = 32
        (KL after 1000 steps): at d = 500 float32 with the cap and float64
        both reach 2e-4 or less; at d = 2000 float64 reaches 1e-4 and float32
        32 (float64 at lambda = 25 gives 60, so the cap, not rounding, is
        what slows it), while float32 at lambda = 100 stalls near 1000. Keep
        a lambda you pass in float32 at or below about 25. For
        non-Gaussian targets pass a decreasing schedule, as for BaM.
      max_kl: the trust region in nats per coordinate, as in
        :func:`vijax.batch_and_match` (default 1.0; ``None`` turns it off).
      patch_steps: rounds of the patch per step (>= 1, default 3), each
        O(d (k + B) k); warm-started, so a few per step track the
        projection as q moves.
      progress, chunk_size, max_nonfinite, checkpoint_dir, checkpoint_every:
        as in :func:`vijax.batch_and_match`.

    Returns:
      A :class:`vijax.FitResult` whose ``params`` are ``LowRankParams`` (use
      them with ``vijax.low_rank(rank=k)``), verified by one more batch as in
      :func:`vijax.batch_and_match`; ``trace.elbo`` holds the
      batch's ``mean_b [log p(z_b) - log q(z_b)]`` per step.

    Raises:
      TypeError: ``log_joint`` not callable, ``key`` not a key, or a
        ``learning_rate`` of the wrong type.
      ValueError: ``init_params`` not low-rank parameters, ``batch_size``,
        ``patch_steps``, ``num_steps``, ``chunk_size`` or ``max_nonfinite``
        below 1, ``learning_rate`` or ``max_kl`` not a finite number > 0,
        or non-finite ``init_params``.
      FitError: ``max_nonfinite`` consecutive skipped steps.

    References:
      C. Modi, D. Cai and L. K. Saul. Batch, match, and patch: low-rank
      approximations for score-based variational inference. AISTATS 2025.

    Example:
      >>> import jax, vijax
      >>> X = jax.random.normal(jax.random.key(0), (50, 3))
      >>> model = vijax.models.bayesian_linear_regression(
      ...     X, X @ jax.numpy.ones(3), noise_scale=1.0, prior_scale=1.0)
      >>> family = vijax.low_rank(rank=2)
      >>> result = vijax.patched_batch_and_match(
      ...     jax.random.key(1), model.log_joint, family.init(model.latent),
      ...     num_steps=50, batch_size=8, progress=False)
      >>> bool(vijax.exact_kl(result.params, family, model) < 0.05)
      True
    """
    batch_size, max_kl, options = check_common(
        log_joint, batch_size, max_kl, num_steps, chunk_size, max_nonfinite, progress,
        checkpoint_dir, checkpoint_every)
    learning_rate = _check_learning_rate(learning_rate)
    patch_steps = _checks.check_positive_int("patch_steps", patch_steps)
    algorithm = pbam_algorithm(
        log_joint, batch_size=batch_size, learning_rate=learning_rate, max_kl=max_kl,
        patch_steps=patch_steps)
    params = init_params.params if isinstance(init_params, FitState) else init_params
    family = _family_of(params) if isinstance(params, LowRankParams) else low_rank(rank=1)
    return run_score_algorithm(
        "patched_batch_and_match",
        ("patched_batch_and_match", log_joint, batch_size, learning_rate, max_kl, patch_steps),
        algorithm, key, init_params, options, family=family, params_type=LowRankParams,
        log_joint=log_joint, batch_size=batch_size, max_kl=max_kl)
