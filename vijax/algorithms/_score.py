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

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from vijax import _checks
from vijax._cache import LRU
from vijax._gaussian import CholeskyScale, Gaussian, gaussian_kl
from vijax.families._gaussian import (
    FullRankParams,
    LowRankParams,
    LowRankPrecisionParams,
    full_rank,
)
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


@functools.lru_cache(maxsize=None)
def rank_family(make: Callable, rank: int):
    """``make(rank=rank)``, one object per (maker, rank), so that checks cached per family hit."""
    return make(rank=rank)


def check_schedule(schedule: Callable) -> Callable:
    """``schedule``, its value at step 0 checked now (positive and finite).

    A schedule <= 0 made every step a no-op that the run then blamed on
    non-finite scores; one that turns non-positive later is not caught here.
    """
    first = np.asarray(schedule(jnp.asarray(0, jnp.int32)))
    if first.shape != () or not (np.isfinite(first) and first > 0):
        raise ValueError(
            "`learning_rate` as a schedule must return a positive finite scalar; "
            f"at step 0 it returned {first.tolist()!r}."
        )
    return schedule


def finite_or_zero(a: jax.Array) -> jax.Array:
    """``a`` if every entry is finite, else zeros (so a decomposition never sees inf or nan)."""
    return jnp.where(jnp.all(jnp.isfinite(a)), a, jnp.zeros_like(a))


def weighted_batch(z, scores, weights=None):
    """Batch statistics with draw weights: ``(p, z_bar, g_bar, zc, gc)``.

    ``p`` the normalised weights (``1 / B`` each when ``weights`` is None),
    ``z_bar = p @ z``, ``g_bar = p @ scores``, and the centred rows scaled by
    ``sqrt(p_b)``, so that ``zc^T zc`` and ``gc^T gc`` are the weighted
    covariances. A draw of weight 0 (dropped) contributes nothing.
    """
    if weights is None:
        weights = jnp.ones(z.shape[0], z.dtype)
    p = weights / jnp.sum(weights)
    z_bar = p @ z
    g_bar = p @ scores
    root = jnp.sqrt(p)[:, None]
    return p, z_bar, g_bar, root * (z - z_bar[None, :]), root * (scores - g_bar[None, :])


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

    A ``CholeskyScale`` (lower factor, positive diagonal), a
    ``LowRankScale`` (factor ``W`` and positive diagonal standard
    deviations) or a ``LowRankPrecisionScale`` (factor ``U`` and positive
    ``diag_scale``): a convex combination of two valid scales of any of these
    kinds is valid. The KL is :func:`kl_between` for Cholesky factors and
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


_MAKERS = {
    FullRankParams: ("full_rank()", "full-rank"),
    LowRankParams: ("low_rank(rank=k)", "low-rank"),
    LowRankPrecisionParams: ("low_rank_precision(rank=k)", "low-rank-precision"),
}


def check_init_params(init_params, name: str, family=FAMILY, params_type=FullRankParams):
    if isinstance(init_params, params_type):
        return check_params("init_params", init_params, family)
    kind = params_type.__name__
    if isinstance(init_params, FitState):
        raise TypeError(
            f"`init_params` must be {kind}; got a FitState. To continue a "
            "run, pass it as `init_params` with `key=None`."
        )
    maker, what = _MAKERS.get(params_type, (f"{family.name}()", family.name))
    raise ValueError(
        f"{name} supports the {what} Gaussian family "
        "only: `init_params` "
        f"must be {kind} (from vijax.{maker}.init(latent)); got "
        f"{type(init_params).__name__}."
    )


class TrustState(NamedTuple):
    """The ``opt_state`` of the score-based algorithms: the adaptive trust region.

    Attributes:
      radius: the KL allowed for the next step, in nats per coordinate.
      last_elbo: the batch ELBO estimate (``mean_b [log p(z_b) - log
        q(z_b)]``) at ``last_params`` (``-inf`` before the first step).
      last_margin: three standard errors of that mean, from the same batch
        (a broken q's own spread is no yardstick).
      last_params: the parameters where ``last_elbo`` was measured, before
        the last accepted step, to return to if that step proves bad.
    """

    radius: jax.Array
    last_elbo: jax.Array
    last_margin: jax.Array
    last_params: Any


GROW, SHRINK, MAX_GROWTH = 1.5, 0.25, 100.0
# The radius (in multiples of ``max_kl``) below which :func:`damping` is < 1.
DAMPING_SPAN = 10.0


def damping(trust: TrustState, max_kl: Optional[float], dtype) -> jax.Array:
    """``min(1, radius / (DAMPING_SPAN * max_kl))``: how far the trust region lets a step go.

    Below 1 at the start (the radius starts at ``max_kl``, so 1 / 10) and
    after undone or skipped steps (which quarter the radius); 1 once the
    accepted steps have grown it to ``DAMPING_SPAN * max_kl`` (six of them
    from the start). 1 without a trust region (``max_kl`` None). An update
    may scale its step size by it (batch-and-match's default schedule does).
    """
    if max_kl is None:
        return jnp.ones((), dtype)
    return jnp.minimum(trust.radius / (DAMPING_SPAN * max_kl), 1.0).astype(dtype)


def init_trust_state(params, max_kl: Optional[float]) -> TrustState:
    """The trust state at the start: radius ``max_kl`` (inf for None), no ELBO yet."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    radius = jnp.inf if max_kl is None else max_kl
    return TrustState(radius=jnp.asarray(radius, dtype), last_elbo=jnp.asarray(-jnp.inf, dtype),
                      last_margin=jnp.zeros((), dtype), last_params=params)


# ``update(mu, scale, z, scores, step, weights, damping) -> (new_mu, new_scale, ok)``:
# the closed-form move from one batch (``z``, ``scores``: (B, d); ``weights``
# (B,), 0 for a dropped draw), ``scale`` the
# family's (a ``CholeskyScale`` or a ``LowRankScale``), ``damping`` the
# trust region's :func:`damping` (a scalar in (0, 1]; an update may ignore
# it), ``ok`` a bool scalar
# that is False when the move is invalid (e.g. a learning rate <= 0).
Update = Callable[..., tuple]


def draw_batch(log_joint, q: Gaussian, params, state: FitState, batch_size: int):
    """The step's batch: ``(z, log_p, scores, finite)`` at ``B`` draws from ``q``.

    The key is ``fold_in(state.key, state.step)``; ``finite`` marks the draws
    whose log density and score are both finite.
    """
    unravel = ravel_pytree(params.loc)[1]
    z = q.sample(jax.random.fold_in(state.key, state.step), (batch_size,))

    def flat_log_joint(x):
        out = log_joint(unravel(x))
        if jnp.shape(out) != ():
            raise ValueError(
                "`log_joint` must return a scalar for one latent; got shape "
                f"{jnp.shape(out)}."
            )
        return out

    log_p, scores = jax.vmap(jax.value_and_grad(flat_log_joint))(z)
    scores = scores.astype(q.mean.dtype)
    finite = jnp.isfinite(log_p) & jnp.all(jnp.isfinite(scores), axis=1)
    return z, log_p, scores, finite


def made_worse(elbo, trust: "TrustState") -> jax.Array:
    """The undo rule: the batch ELBO fell below the last accepted one beyond its noise.

    Beyond ``last_margin`` (three standard errors of the last accepted
    batch) and beyond rounding (for a q so good that every draw's log
    weight is the same). A nan ELBO counts as worse.
    """
    slack = jnp.sqrt(jnp.finfo(elbo.dtype).eps) * (1.0 + jnp.abs(trust.last_elbo))
    return ~(elbo >= trust.last_elbo - trust.last_margin - slack)


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
    ``info.skipped``. ``opt_state`` is a :class:`TrustState`: with
    ``max_kl`` set, each step's ``KL(q_{t+1} || q_t)`` is capped at
    ``radius * d`` (:func:`trust_region_scale`), and the radius adapts: if
    the batch ELBO at the new q falls below the last accepted one by more
    than three of that one's standard errors, the last step
    is undone (q returns to where it was, no update this step) and the
    radius is quartered, as after a skipped step (which returns there too);
    otherwise it grows by half, up to ``100 * max_kl``. Draws with a non-finite log
    density or score are dropped from the batch; only a batch with none
    left is rejected. ``info.elbo`` is ``mean_b [log p(z_b) - log q(z_b)]``
    over the finite draws and ``info.grad_norm`` the norm of their mean
    score. ``family`` is the family of ``state.params`` or a function
    of the params returning it. Arguments are assumed checked.
    """

    def step(state: FitState) -> tuple[FitState, FitInfo]:
        params = state.params
        fam = family(params) if callable(family) else family
        q = fam.to_gaussian(params)
        mu, scale = q.mean, q.scale
        dtype = mu.dtype
        d = mu.shape[0]
        z, log_p, scores, finite = draw_batch(log_joint, q, params, state, batch_size)
        # A draw whose log density or score is not finite is dropped from
        # the batch (weight 0, its score zeroed): where q puts a little mass
        # in a region the target rejects, skipping whole batches would stall
        # the fit (at B = 103 a 1% chance per draw skips 2 batches in 3).
        # Only a batch with no finite draw is rejected, and it still runs
        # the update (a select, not a branch, so the step vmaps) on zero
        # scores: no decomposition sees a nan.
        inputs_ok = jnp.any(finite)
        weights = jnp.where(inputs_ok, finite, True).astype(dtype)
        scores = jnp.where(finite[:, None], scores, jnp.zeros_like(scores))
        trust = state.opt_state
        if not isinstance(trust, TrustState):  # e.g. ``()``: start the adaptation
            trust = init_trust_state(params, max_kl)
        new_mu, new_scale, update_ok = update(mu, scale, z, scores, state.step, weights,
                                              damping(trust, max_kl, dtype))
        if max_kl is not None:
            new_mu, new_scale, _ = trust_region_scale(
                mu, scale, new_mu, new_scale, (trust.radius * d).astype(dtype))
        new_params = fam.from_gaussian(Gaussian(new_mu, new_scale), params.loc)
        n_finite = jnp.sum(finite)
        terms = jnp.where(finite, log_p - q.log_prob(z), 0.0)
        elbo = (jnp.sum(terms) / n_finite).astype(dtype)
        # The noise margin of the batch mean: three standard errors, kept
        # from the last accepted batch (a broken q's own spread, where a
        # few draws have log weights of -1e16, is no yardstick).
        spread = jnp.sum(jnp.where(finite, jnp.square(terms - elbo), 0.0))
        margin = (3.0 * jnp.sqrt(spread / jnp.maximum(n_finite - 1, 1) / n_finite)).astype(dtype)
        grad_norm = jnp.sqrt(jnp.sum(jnp.square(weights @ scores / jnp.sum(weights))))
        ok = (
            jnp.isfinite(elbo)
            & inputs_ok
            & update_ok
            & jnp.all(jnp.isfinite(new_mu))
            & _valid_scale(new_scale)
        )
        if max_kl is None:
            worse = jnp.zeros((), bool)
        else:
            worse = made_worse(elbo, trust)
        take = ok & ~worse
        pick = lambda c, a, b: jax.tree_util.tree_map(  # noqa: E731
            lambda x, y: jnp.where(c, x, y), a, b)
        if max_kl is None:
            out_params = pick(take, new_params, params)
            new_trust = trust
        else:
            # A skipped step also returns to the last point (q may be where
            # every update overflows, and staying there would stall the fit).
            out_params = pick(take, new_params, trust.last_params)
            radius = jnp.where(take, jnp.minimum(GROW * trust.radius, MAX_GROWTH * max_kl),
                               SHRINK * trust.radius)
            new_trust = TrustState(
                radius=radius.astype(dtype),
                # After an undo q is back at ``last_params``: its next batch
                # is a fresh baseline, not judged against the old estimate
                # there (which may have been a lucky high one).
                last_elbo=jnp.where(take, elbo, -jnp.inf).astype(dtype),
                last_margin=jnp.where(take, margin, trust.last_margin).astype(dtype),
                last_params=pick(take, params, trust.last_params),
            )
        new_state = FitState(
            params=out_params, opt_state=new_trust, step=state.step + 1, key=state.key,
        )
        info = FitInfo(elbo=elbo, grad_norm=grad_norm.astype(dtype), skipped=~ok)
        return new_state, info

    return step


def algorithm_of(step, max_kl: Optional[float]) -> Algorithm:
    """The engine's Algorithm for a score step; ``opt_state`` a :class:`TrustState`."""

    def init(key, params):
        return FitState(params=params, opt_state=init_trust_state(params, max_kl),
                        step=jnp.zeros((), jnp.int32), key=key)

    return Algorithm(init=init, step=step)


def make_verify(log_joint, *, batch_size: int, family=FAMILY):
    """Returns ``verify(state) -> params``: the last point a fit may return.

    The last step of a run is judged only by the next step's batch. This
    draws that batch now (the same key, ``fold_in(state.key, state.step)``,
    so a continued run decides the same way) and applies the same rule as
    :func:`score_step`: if the batch ELBO at ``state.params`` falls below
    ``last_elbo`` by more than the margin (or no draw is finite), the
    answer is ``state.opt_state.last_params``; otherwise ``state.params``.
    One batch of ``batch_size`` evaluations.
    """

    def verify(state: FitState):
        trust = state.opt_state
        params = state.params
        fam = family(params) if callable(family) else family
        q = fam.to_gaussian(params)
        z, log_p, _, finite = draw_batch(log_joint, q, params, state, batch_size)
        terms = jnp.where(finite, log_p - q.log_prob(z), 0.0)
        elbo = (jnp.sum(terms) / jnp.sum(finite)).astype(q.mean.dtype)
        worse = made_worse(elbo, trust) | ~jnp.any(finite)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(worse, a, b),
                                      trust.last_params, params)

    return verify


_verifiers = LRU(16)


def run_score_algorithm(name, cache_key, algorithm: Algorithm, key, init_params, options,
                        family=FAMILY, params_type=FullRankParams, *, log_joint=None,
                        batch_size=None, max_kl=None) -> FitResult:
    """The driver of the public score-based algorithms (BaM, patched BaM, GSM, SLANG).

    With a trust region (``max_kl`` set), the returned ``params`` are
    verified (:func:`make_verify`): a last step that made q worse is not
    returned (``state`` is left as the run ended, so continuing it gives
    what one longer run gives).
    """
    if isinstance(init_params, FitState):
        check_resume_key("key", key)
        check_init_params(init_params.params, name, family, params_type)
        state = resume_state(init_params, batched=False)
        if not isinstance(state.opt_state, TrustState):
            # A state saved before the trust region adapted (``opt_state`` was
            # ``()``): start the adaptation afresh.
            fresh = algorithm.init(state.key, state.params)
            state = state._replace(opt_state=fresh.opt_state)
    else:
        params = check_init_params(init_params, name, family, params_type)
        state = algorithm.init(_checks.typed_key("key", key), params)
    compiled = compiled_chunk(
        cache_key, lambda: algorithm.step, chunk_size=options.chunk_size,
        max_nonfinite=options.max_nonfinite, batched=False,
    )
    result = run(
        compiled, state, options, batched=False, desc=name,
        failure=(
            "had non-finite log densities or scores (grad log_joint) at the "
            "sampled latents, or a non-finite update",
            "Check log_joint for regions where it or its gradient is nan/inf.",
        ),
    )
    if max_kl is not None and log_joint is not None and isinstance(
            result.state.opt_state, TrustState):
        # Keyed on the family and batch too: the verifier closes over them (a
        # rank sweep with one log joint reused the first rank's family, and
        # failed only after the run).
        verify = _verifiers.get(
            (cache_key, "verify", family, batch_size),
            lambda: jax.jit(make_verify(log_joint, batch_size=batch_size, family=family)))
        result = result._replace(params=verify(result.state))
    return result


def check_common(log_joint, batch_size, max_kl, num_steps, chunk_size, max_nonfinite, progress,
                 checkpoint_dir, checkpoint_every):
    """The checks both drivers share; returns ``(batch_size, max_kl, options)``."""
    _checks.check_log_joint(log_joint)
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    max_kl = check_max_kl(max_kl)
    options = check_run_options(
        num_steps=num_steps, chunk_size=chunk_size, max_nonfinite=max_nonfinite,
        progress=progress, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
    )
    return batch_size, max_kl, options
