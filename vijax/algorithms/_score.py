"""What the score-based Gaussian algorithms share: the guarded step, the trust region, the driver.

Batch-and-match (:mod:`vijax.algorithms._bam`) and Gaussian score matching
(:mod:`vijax.algorithms._gsm`) both draw a batch from the current full-rank
Gaussian ``q_t``, evaluate ``grad log p`` there and move to a closed-form new
Gaussian. :func:`score_step` is that loop body, given the closed-form update:
it guards it (no decomposition sees a non-finite matrix; a step with
non-finite log densities, scores or results is rejected), caps
``KL(q_{t+1} || q_t)`` with :func:`trust_region`, and reports the ELBO
estimate of the batch. :func:`run_score_algorithm` is the driver both
public functions call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from vijax import _checks
from vijax._gaussian import CholeskyScale, Gaussian, gaussian_kl
from vijax.families._gaussian import FullRankParams, full_rank
from vijax.families._protocol import check_params
from vijax.fitting._engine import (
    Algorithm,
    check_resume_key,
    check_run_options,
    compiled_chunk,
    resume_state,
    run,
)
from vijax.fitting._types import FitInfo, FitResult, FitState

ArrayTree = Any
FAMILY = full_rank()
DEFAULT_MAX_KL = 1.0


def finite_or_zero(a: jax.Array) -> jax.Array:
    """``a`` if every entry is finite, else zeros (so a decomposition never sees inf or nan)."""
    return jnp.where(jnp.all(jnp.isfinite(a)), a, jnp.zeros_like(a))


def kl_between(mu_a, tril_a, mu_b, tril_b) -> jax.Array:
    """``KL(N(mu_a, L_a L_a^T) || N(mu_b, L_b L_b^T))`` with triangular solves (no inverse)."""
    d = mu_a.shape[0]
    a = jax.scipy.linalg.solve_triangular(tril_b, tril_a, lower=True)
    delta = jax.scipy.linalg.solve_triangular(tril_b, mu_a - mu_b, lower=True)
    log_det = jnp.sum(jnp.log(jnp.diagonal(tril_b))) - jnp.sum(jnp.log(jnp.diagonal(tril_a)))
    return 0.5 * (jnp.sum(jnp.square(a)) + jnp.sum(jnp.square(delta)) - d) + log_det


def trust_region(mu, tril, new_mu, new_tril, radius):
    """The step shrunk towards ``(mu, tril)`` until ``KL(new || old) <~ radius``.

    One shot, no loop: with ``k = KL(new || old)`` both the mean and the
    Cholesky factor move by ``alpha = min(1, sqrt(radius / k))`` of the way
    (a convex combination of two lower-triangular factors with positive
    diagonals is one too, so q stays a valid Gaussian). For a small step the
    KL is quadratic in ``alpha``, so the shrunk step's KL is about
    ``radius``. A KL that is not finite gives ``alpha = nan`` and a
    non-finite step (rejected by the caller). Returns ``(mu, tril, alpha)``.
    """
    mu, scale, alpha = trust_region_scale(
        mu, CholeskyScale(tril), new_mu, CholeskyScale(new_tril), radius)
    return mu, scale.tril, alpha


def trust_region_scale(mu, scale, new_mu, new_scale, radius):
    """:func:`trust_region` for any scale whose arrays may be interpolated.

    A ``CholeskyScale`` (lower factor, positive diagonal) or a
    ``LowRankScale`` (factor ``W`` and positive diagonal standard
    deviations): a convex combination of two valid scales of either kind is
    valid. The KL is :func:`kl_between` for Cholesky factors and
    :func:`vijax.gaussian_kl` (Woodbury, O(d k^2)) for low rank.
    Returns ``(mu, scale, alpha)``.
    """
    if isinstance(scale, CholeskyScale):
        kl = kl_between(new_mu, new_scale.tril, mu, scale.tril)
    else:
        kl = gaussian_kl(Gaussian(new_mu, new_scale), Gaussian(mu, scale))
    alpha = jnp.where(
        jnp.isfinite(kl) & (kl > radius), jnp.sqrt(radius / jnp.where(kl > 0, kl, 1.0)), 1.0
    )
    # A KL that is not finite (an overflow, or a non-finite step) makes the
    # step non-finite, so the caller rejects it.
    alpha = jnp.where(jnp.isfinite(kl), alpha, jnp.nan).astype(mu.dtype)
    moved = jax.tree_util.tree_map(lambda a, b: a + alpha * (b - a), scale, new_scale)
    return mu + alpha * (new_mu - mu), moved, alpha


def _valid_scale(scale) -> jax.Array:
    """Finite, with a positive diagonal (Cholesky) or positive standard deviations (low rank)."""
    finite = jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(scale)]))
    if isinstance(scale, CholeskyScale):
        return finite & jnp.all(jnp.diagonal(scale.tril) > 0)
    return finite & jnp.all(scale.diag_scale > 0)


def check_max_kl(max_kl) -> Optional[float]:
    if max_kl is None:
        return None
    return _checks.check_positive_float("max_kl", max_kl, also=" or None")


def check_init_params(init_params, name: str, family=FAMILY, params_type=FullRankParams):
    if isinstance(init_params, params_type):
        return check_params("init_params", init_params, family)
    kind = params_type.__name__
    if isinstance(init_params, FitState):
        raise TypeError(
            f"`init_params` must be {kind}; got a FitState. To continue a "
            "run, pass it as `init_params` with `key=None`."
        )
    full = params_type is FullRankParams
    maker = "full_rank()" if full else "low_rank(rank=k)"
    raise ValueError(
        f"{name} supports the {'full-rank' if full else 'low-rank'} Gaussian family "
        "only: `init_params` "
        f"must be {kind} (from vijax.{maker}.init(latent)); got "
        f"{type(init_params).__name__}."
    )


# ``update(mu, scale, z, scores, step) -> (new_mu, new_scale, ok)``: the
# closed-form move from one batch (``z``, ``scores``: (B, d)), ``scale`` the
# family's (a ``CholeskyScale`` or a ``LowRankScale``), ``ok`` a bool scalar
# that is False when the move is invalid (e.g. a learning rate <= 0).
Update = Callable[..., tuple]


def score_step(
    log_joint: Callable[[ArrayTree], jax.Array],
    update: Update,
    *,
    batch_size: int,
    max_kl: Optional[float],
    family=FAMILY,
) -> Callable[[FitState], tuple[FitState, FitInfo]]:
    """Returns the guarded ``step(state) -> (state, info)`` of a score-based update.

    The contract of :func:`vijax.make_step`: noise from ``fold_in(state.key,
    state.step)``; a step whose log densities, scores or updated parameters
    are not finite leaves the parameters unchanged and sets
    ``info.skipped``; ``opt_state`` is unused. ``info.elbo`` is ``mean_b
    [log p(z_b) - log q(z_b)]`` and ``info.grad_norm`` the norm of the batch
    mean score. ``family`` is the family of ``state.params`` or a function
    of the params returning it. Arguments are assumed checked.
    """

    def step(state: FitState) -> tuple[FitState, FitInfo]:
        params = state.params
        fam = family(params) if callable(family) else family
        q = fam.to_gaussian(params)
        mu, scale = q.mean, q.scale
        dtype = mu.dtype
        d = mu.shape[0]
        unravel = ravel_pytree(params.loc)[1]
        key = jax.random.fold_in(state.key, state.step)
        z = q.sample(key, (batch_size,))

        def flat_log_joint(x):
            out = log_joint(unravel(x))
            if jnp.shape(out) != ():
                raise ValueError(
                    "`log_joint` must return a scalar for one latent; got shape "
                    f"{jnp.shape(out)}."
                )
            return out

        log_p, scores = jax.vmap(jax.value_and_grad(flat_log_joint))(z)
        scores = scores.astype(dtype)
        inputs_ok = jnp.all(jnp.isfinite(log_p)) & jnp.all(jnp.isfinite(scores))
        # A rejected batch still runs the update (a select, not a branch, so
        # the step vmaps), on zero scores: no decomposition sees a nan.
        new_mu, new_scale, update_ok = update(
            mu, scale, z, jnp.where(inputs_ok, scores, jnp.zeros_like(scores)), state.step)
        if max_kl is not None:
            new_mu, new_scale, _ = trust_region_scale(
                mu, scale, new_mu, new_scale, jnp.asarray(max_kl * d, dtype))
        new_params = fam.from_gaussian(Gaussian(new_mu, new_scale), params.loc)
        elbo = jnp.mean(log_p - q.log_prob(z)).astype(dtype)
        grad_norm = jnp.sqrt(jnp.sum(jnp.square(jnp.mean(scores, axis=0))))
        ok = (
            jnp.isfinite(elbo)
            & inputs_ok
            & update_ok
            & jnp.all(jnp.isfinite(new_mu))
            & _valid_scale(new_scale)
        )
        new_params = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_params, params)
        new_state = FitState(
            params=new_params, opt_state=state.opt_state, step=state.step + 1, key=state.key,
        )
        info = FitInfo(elbo=elbo, grad_norm=grad_norm.astype(dtype), skipped=~ok)
        return new_state, info

    return step


def algorithm_of(step) -> Algorithm:
    """The engine's Algorithm for a score step: no optimizer state (``()``)."""

    def init(key, params):
        return FitState(params=params, opt_state=(), step=jnp.zeros((), jnp.int32), key=key)

    return Algorithm(init=init, step=step)


def run_score_algorithm(name, cache_key, algorithm: Algorithm, key, init_params, options,
                        family=FAMILY, params_type=FullRankParams) -> FitResult:
    """The driver of the public score-based algorithms (BaM, patched BaM, GSM)."""
    if isinstance(init_params, FitState):
        check_resume_key("key", key)
        check_init_params(init_params.params, name, family, params_type)
        state = resume_state(init_params, batched=False)
    else:
        params = check_init_params(init_params, name, family, params_type)
        state = algorithm.init(_checks.typed_key("key", key), params)
    compiled = compiled_chunk(
        cache_key, lambda: algorithm.step, chunk_size=options.chunk_size,
        max_nonfinite=options.max_nonfinite, batched=False,
    )
    return run(
        compiled, state, options, batched=False, desc=name,
        failure=(
            "had non-finite log densities or scores (grad log_joint) at the "
            "sampled latents, or a non-finite update",
            "Check log_joint for regions where it or its gradient is nan/inf.",
        ),
    )


def check_common(log_joint, batch_size, max_kl, num_steps, chunk_size, max_nonfinite, progress,
                 checkpoint_dir, checkpoint_every):
    """The checks both drivers share; returns ``(batch_size, max_kl, options)``."""
    if not callable(log_joint):
        raise TypeError(f"`log_joint` must be callable; got {type(log_joint).__name__}.")
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    max_kl = check_max_kl(max_kl)
    options = check_run_options(
        num_steps=num_steps, chunk_size=chunk_size, max_nonfinite=max_nonfinite,
        progress=progress, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
    )
    return batch_size, max_kl, options
