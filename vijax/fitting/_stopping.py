"""The tuning-free stopping rule of ``vijax.fit(..., auto_stop=True)``.

The rule works on the host, between compiled chunks, at steps growing
geometrically (every 5% of the steps so far, at least every 10 steps). It
needs no tolerance in the user's units, because it measures progress in nats:

* **Candidates.** The optimizer is wrapped in a polynomial-decay iterate
  average (:func:`vijax.iterate_average` with ``start=0, eta=3``; Shamir and
  Zhang 2013), which forgets the burn-in without a ``start`` to tune and
  removes the jitter a constant step leaves (Dhaka et al. 2020). It is kept
  in the family's ``average_space`` where it has one: the mean-field and
  low-rank families average variances, in which the expected gradient is
  linear near a Gaussian target, so the average is not biased by the
  jitter (the bias that averaging ``raw_scale`` leaves grows with d). At each
  check the candidate is the average, or the last iterate when its ELBO is
  higher beyond doubt (a last iterate converging on its own, as full-rank
  on a Gaussian posterior does). The best candidate of the checks is kept
  (scored beside each new one on the check's draws), and the fit returns it
  when it beats the last one: Adam's iterates can spike after reaching the
  optimum, and the result reached is not lost.
* **Progress.** At a check, the candidates compared are scored on one
  fresh noise (common random numbers; antithetic pairs ``mean +- S eps``
  for families with a Gaussian view), so a difference of two candidates'
  ELBOs is precise even when the ELBOs are not, and an unlucky noise does
  not carry over to the next check. With candidates ``c_t`` at the check ``t``, ``c_a`` at the
  last check at or before ``2t/3`` and ``c_b`` at the last check at or
  before ``2a/3``, the gains are ``G2 = ELBO(c_t) - ELBO(c_a)`` and ``G1 =
  ELBO(c_a) - ELBO(c_b)``, with standard errors from the per-draw
  differences. A gain starts on 256 draws (64 before step 2048, where the
  gains are large); while ``G2`` is within ``Z = 2`` standard errors of
  ``tol``, its two candidates are scored again on more draws (4, 16, ...
  times as many, the first that its standard error says may resolve it),
  up to 16384, so the draws are spent only where the decision is in
  doubt; a gain that says "stop" is always confirmed on at least 4096.
  ``c_b`` is scored on those draws too only when a stop hangs on ``G1``.
* **Remaining gap.** If the gap to the optimum shrinks like a power of the
  step count (what averaging gives), gains over geometrically spaced windows
  form a geometric sequence, and Aitken's extrapolation ``G2**2 / (G1 - G2)``
  is the remaining gap; if it shrinks exponentially (a last iterate
  converging linearly), the same formula overestimates it. The fit stops
  when ``G2 + Z se(G2) < tol`` and either the extrapolated gap is below
  ``tol`` or ``G1 + Z se(G1) < tol`` too (no progress left over both
  windows). ``tol = 0.05`` nats.

Measured (``benchmarks/results/cpu/stopping.md``; ``tests/test_stopping.py``
checks a subset): over 25 runs on Bayesian linear regression (d = 10 to 100,
mean-field and full-rank, Adam at learning rates whose noise floor is below
0.1 nats) the returned q was within 0.059 nats of the family's optimum, and
the stop came after 1.15 to 2.01 times the steps that took; on four zoo
models (12 runs), within 0.08 nats of the ELBO of a run three times as long,
after 1.47 to 2.04 times the steps. Known limits, measured there too: on
Neal's funnel the ELBO still creeps up by 0.13 to 0.17 nats over 20,000
steps after the rule has stopped (slow progress looks like none); like every
rule that reads progress, a plateau can fool it; with a learning rate too
large for 0.1 nats to be reachable it stops at the optimizer's noise floor
(lower the learning rate then). Its checks are not free: on these small
models they spend 2 to 88 times the steps' own log-joint evaluations (forward
only, in large batches), 0.05 to 1.5 s of wall time per fit.

References:
  A. K. Dhaka, A. Catalina, M. R. Andersen, M. Magnusson, J. Huggins,
  A. Vehtari. Robust, accurate stochastic optimization for variational
  inference. NeurIPS 2020.

  O. Shamir and T. Zhang. Stochastic gradient descent for non-smooth
  optimization: convergence results and optimal averaging schemes. ICML 2013.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from vijax._cache import LRU
from vijax._objectives import draws_and_log_weights
from vijax.optim._adaptive import decrease, find_adaptive
from vijax.optim._averaging import _find_states, iterate_average, restart_average

#: The rule's settings (see the module docstring).
TOL = 0.05
GAP_TOL = 0.08
Z = 2.0
NUM_DRAWS = 256
MAX_DRAWS = 16384
MIN_DRAWS = 64
FINAL_DRAWS = 1024
CONFIRM_DRAWS = 4096
REFINE = 4
UNIT_DRAWS = 64  # the rule scores its draws in blocks of this many (one compiled program)
RATIO = 2.0 / 3.0
GROWTH = 1.05
MIN_GAP = 10
FIRST_CHECK = 50
ETA = 3.0
#: :class:`AdaptiveStop`: a stage runs at least ``MIN_STAGE`` times as many
#: steps as the one before and at least ``MIN_STAGE_STEPS`` steps, and the
#: fit stops when a stage gains less than ``STAGE_TOL * tol`` nats on the one
#: before.
MIN_STAGE = 1.0
MIN_STAGE_STEPS = 500
STAGE_TOL = 0.5
#: :class:`AdaptiveStop`'s stage rule: :class:`AutoStop` at ``STAGE_RULE_TOL *
#: tol`` on at most ``STAGE_MAX_DRAWS`` draws, deciding on its point estimates
#: where that many draws leave it in doubt.
STAGE_RULE_TOL = 0.35
STAGE_MAX_DRAWS = 4096
#: :class:`AdaptiveStop`'s stage rule reads a gain above its threshold by more
#: than ``STAGE_GO_ON_Z`` standard errors as "go on" without more draws.
STAGE_GO_ON_Z = 1.0

_averaged = LRU(32)
_evaluators = LRU(32)


def averaging(optimizer, params, family=None) -> Any:
    """``optimizer`` wrapped in the rule's iterate average, unless it already holds one.

    The average is kept in ``family.average_space`` when the family has one
    (the mean-field and low-rank families: their variances). Cached on the
    optimizer and the space, so that repeated fits reuse the compiled chunk.
    """
    if _find_states(jax.eval_shape(optimizer.init, params)):
        return optimizer
    space = getattr(family, "average_space", None)
    return _averaged.get((optimizer, space), lambda: iterate_average(
        optimizer, start=0, eta=ETA, space=space))


def _evaluator(family, log_joint) -> Callable:
    """``values(key, block, params) -> (units,)``: one block's per-unit ELBO terms, compiled.

    A block is ``UNIT_DRAWS`` draws on ``fold_in(key, block)``'s noise; every
    draw count the rule scores is made of such blocks (:func:`_values`), so a
    fit compiles one program for all of them. For a family with a Gaussian
    view (``to_gaussian``) the draws are antithetic pairs ``mean +- S eps`` and
    a unit is a pair's mean log weight: between two nearby candidates the
    difference of log weights is then free of its terms odd in ``eps``, which
    dominate its noise near an optimum (where the mean difference is second
    order). Otherwise a unit is one draw of ``family.sample``.
    """

    def build():
        to_gaussian = getattr(family, "to_gaussian", None)

        def plain(key, block, params):
            key = jax.random.fold_in(key, block)
            return draws_and_log_weights(key, params, family, log_joint, UNIT_DRAWS)[1]

        def antithetic(key, block, params):
            key = jax.random.fold_in(key, block)
            g = to_gaussian(params)
            example = jax.tree_util.tree_map(lambda x: x[0], family.sample(key, params, 1))
            unravel = ravel_pytree(example)[1]
            eps = jax.random.normal(key, (UNIT_DRAWS // 2, g.scale.base_dim), g.mean.dtype)
            z = g.mean[None, :] + g.scale.apply(jnp.concatenate([eps, -eps]))

            def one(zi):
                return jnp.asarray(log_joint(unravel(zi))) - g.log_prob(zi)

            lw = jax.vmap(one)(z)
            return 0.5 * (lw[: UNIT_DRAWS // 2] + lw[UNIT_DRAWS // 2:])

        return jax.jit(plain if to_gaussian is None else antithetic)

    return _evaluators.get((family, log_joint), build)


def _values(family, log_joint, key, params, num_draws: int) -> np.ndarray:
    """The rule's per-unit ELBO terms of ``params`` on ``key``'s noise (see :func:`_evaluator`).

    ``num_draws`` draws in blocks of ``UNIT_DRAWS`` (the last block's surplus
    dropped), so the same key and count give the same noise to every
    candidate.
    """
    values = _evaluator(family, log_joint)
    num_blocks = -(-num_draws // UNIT_DRAWS)
    parts = [values(key, np.int32(b), params) for b in range(num_blocks)]
    per_block = parts[0].shape[0]
    units = num_draws // (UNIT_DRAWS // per_block)
    return np.concatenate([np.asarray(p) for p in parts])[:units]


class _Snapshot(NamedTuple):
    step: int
    params: Any


def _gain(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``new - old`` (per-draw ELBO terms on the same noise)."""
    diff = new.astype(np.float64) - old.astype(np.float64)
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))


def _more_draws(num: int, margin: float, se: float, max_draws: int, at_least: int = 0) -> int:
    """The draws to score a gain on next, when ``num`` left it in doubt.

    ``margin`` is the gain's distance from its threshold and ``se`` its
    standard error on ``num`` draws. The standard error shrinks like
    ``1 / sqrt(draws)``, so resolving the gain needs about ``num * (Z * se /
    margin)**2`` draws: the next size is the first of ``num * REFINE**k``
    (k >= 1) that reaches that, ``at_least``, or ``max_draws``. A gain that
    ``REFINE`` times as many draws would not resolve goes straight to the
    size that may, rather than through every size in between (each size
    scores the candidates afresh).
    """
    need = max(float(at_least), num * (Z * se / abs(margin)) ** 2 if margin else math.inf)
    nxt = num * REFINE
    while nxt < need and nxt < max_draws:
        nxt *= REFINE
    return min(nxt, max_draws)


def _same(a, b) -> bool:
    """Whether two parameter pytrees are the same arrays (not only equal values)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(x is y for x, y in zip(la, lb))


class AutoStop:
    """The rule's state on the host: its check schedule and the candidates seen.

    ``next_check(step)`` says where the next check falls; ``check(state)``
    records the candidate at a check and says whether to stop; ``select(state)``
    returns the better of the last iterate and the average.

    A gain is first estimated on ``num_draws`` draws; while it is within two
    standard errors of ``tol`` (the decision is in doubt), the candidates
    involved are scored again on more draws (:func:`_more_draws`), up to
    ``max_draws``. Far from convergence the gains are large and the cheap
    estimate decides; near it, the extra draws are spent only where needed:
    on the last gain's two candidates, and on the older reference only when
    a stop depends on the gain before.

    A gain still in doubt on ``max_draws`` draws does not stop the fit,
    unless ``decide_at_limit``: then the point estimates decide, as if the
    confidence bounds were zero (:class:`AdaptiveStop`'s stages, whose end
    only lowers the step). With ``go_on_z``, a gain above ``tol`` by more
    than ``go_on_z`` standard errors is read as "go on" at once, without
    more draws (the stages too: going on costs one more check).

    The rule also keeps the best candidate of its checks (each check scores
    it on its own draws beside the new candidate), and ``select`` returns it
    when it is better than the current one: an optimizer whose iterates
    spike (Adam near the optimum of a full-rank q, whose gradient noise
    vanishes there) does not lose the result it had reached. With
    ``max_fall``, the rule says "stop" too when every check's candidate
    since ``2t/3`` was worse than the best by more than ``max_fall`` nats
    beyond doubt (:class:`AdaptiveStop`'s stages: the step is then lowered,
    from the best). A single check's fall is not enough: early in a stage
    at a large step the candidate can dip and recover (measured: 0.29 nats
    on the stochastic-volatility model, full-rank), and a stage ended there
    leaves the next ones short.
    """

    def __init__(self, family, log_joint, key: jax.Array, *, tol: float = TOL,
                 num_draws: int = NUM_DRAWS, max_draws: int = MAX_DRAWS,
                 decide_at_limit: bool = False, max_fall: float | None = None,
                 go_on_z: float | None = None):
        self.tol = tol
        self.go_on_z = go_on_z
        self.num_draws = num_draws
        self.max_draws = max_draws
        self.decide_at_limit = decide_at_limit
        self.max_fall = max_fall
        self._family, self._log_joint = family, log_joint
        # The rule's noise: split, so it is none of the steps' fold_in(key, t);
        # check i draws from fold_in(base, i).
        self._base = jax.random.split(key)[1]
        self._num_checks = 0
        self._snapshots: list[_Snapshot] = []
        #: The last extrapolated gap to the optimum (nats), for messages.
        self.gap_estimate = float("nan")
        #: Draws scored by the rule so far (its cost, in log-joint evaluations).
        self.num_evaluations = 0
        #: The latest candidate whose ELBO terms were all finite (None before).
        self.last_finite: Any = None
        #: The best candidate so far: each check's candidate replaces it when
        #: it scores higher on that check's draws (None before the first).
        self.best: Any = None
        #: How far (nats) the latest candidate fell below the best, and its
        #: standard error (0 when it replaced the best).
        self.fall: tuple[float, float] = (0.0, 0.0)
        #: The first check of the latest unbroken run of checks whose
        #: candidates fell below the best by more than ``max_fall`` beyond
        #: doubt (None when the latest check's did not).
        self.fallen_since: int | None = None

    @staticmethod
    def next_check(step: int) -> int:
        """The first check strictly after ``step``."""
        if step < FIRST_CHECK:
            return FIRST_CHECK
        return max(step + MIN_GAP, math.ceil(GROWTH * step))

    def _score(self, key, params, num_draws: int) -> np.ndarray:
        self.num_evaluations += num_draws
        return _values(self._family, self._log_joint, key, params, num_draws)

    def _first_draws(self, step: int) -> int:
        """Draws for a check's first estimate: fewer early, where the gains are large."""
        return self.num_draws if step // 8 >= self.num_draws else MIN_DRAWS

    def _candidate(self, key, state, num: int) -> tuple[Any, np.ndarray]:
        (avg,) = [s.average for s in _find_states(state.opt_state)]
        raw_values, avg_values = self._score(key, state.params, num), self._score(key, avg, num)
        # The average unless the last iterate is better beyond doubt: the
        # average is the safer choice, and a noisy pick would mix the two in
        # the gains.
        if not np.all(np.isfinite(raw_values)):
            return avg, avg_values
        if not np.all(np.isfinite(avg_values)):
            return state.params, raw_values
        gain, se = _gain(raw_values, avg_values)
        if gain > Z * se:
            return state.params, raw_values
        return avg, avg_values

    def select(self, state) -> Any:
        """The better of ``state``'s candidate and the best of the checks.

        The candidate is the better of the last iterate and the average on
        ``FINAL_DRAWS`` draws; it is then scored against the best candidate
        of the checks on ``CONFIRM_DRAWS`` common draws, unless it is that
        candidate.
        """
        key = jax.random.fold_in(self._base, self._num_checks)
        current = self._candidate(key, state, FINAL_DRAWS)[0]
        if self.best is None or _same(current, self.best):
            return current
        key = jax.random.fold_in(key, 1)
        new, old = (self._score(key, p, CONFIRM_DRAWS) for p in (current, self.best))
        if not np.all(np.isfinite(new)):
            return self.best
        if not np.all(np.isfinite(old)):
            return current
        return current if _gain(new, old)[0] >= 0 else self.best

    def _before(self, step: float) -> _Snapshot | None:
        found = [s for s in self._snapshots if s.step <= step]
        return found[-1] if found else None

    def _record(self, state) -> tuple:
        """Scores and keeps the candidate at ``state``: ``(step, key, num, params, values)``."""
        step = int(state.step)
        key = jax.random.fold_in(self._base, self._num_checks)
        self._num_checks += 1
        num = self._first_draws(step)
        params, values = self._candidate(key, state, num)
        self._snapshots.append(_Snapshot(step, params))
        if np.all(np.isfinite(values)):
            self.last_finite = params
            self._keep_best(key, num, params, values)
        fall, se = self.fall
        if self.max_fall is None or fall - Z * se <= self.max_fall:
            self.fallen_since = None
        elif self.fallen_since is None:
            self.fallen_since = step
        return step, key, num, params, values

    def _keep_best(self, key, num: int, params, values: np.ndarray) -> None:
        """Scores the best candidate on this check's draws; ``params`` replaces it unless worse."""
        self.fall = (0.0, 0.0)
        if self.best is not None:
            best_values = self._score(key, self.best, num)
            if np.all(np.isfinite(best_values)):
                gain, se = _gain(values, best_values)
                if gain < 0:
                    self.fall = (-gain, se)
                    return
        self.best = params

    def record(self, state) -> None:
        """Keeps the candidate at ``state`` as a later reference, without testing the rule."""
        self._record(state)

    def check(self, state) -> bool:
        """Records the candidate at ``state`` (a check step); True when the fit should stop.

        Each check draws fresh noise (common to the three candidates it
        compares), so an unlucky draw does not bias every later check.
        """
        step, key, num, params, values = self._record(state)
        if self.fallen_since is not None and self.fallen_since <= RATIO * step:
            # Every candidate since 2t/3 worse than the best beyond doubt:
            # at this step the fit has lost ground and is not regaining it.
            return True
        a = self._before(RATIO * step)
        b = None if a is None else self._before(RATIO * a.step)
        if b is None:
            return False
        # Older snapshots can never be a reference again.
        self._snapshots = [s for s in self._snapshots if s.step >= b.step]
        va, vb = self._score(key, a.params, num), self._score(key, b.params, num)
        if not all(np.all(np.isfinite(v)) for v in (values, va, vb)):
            return False
        # G1 on the check's first draws: for the message, and for the
        # decision unless the refinement below rescores it.
        first, (g1, se1) = num, _gain(va, vb)
        while True:
            g2, se2 = _gain(values, va)
            doubt = abs(g2 - self.tol) < Z * se2
            # A "stop" is always confirmed on at least CONFIRM_DRAWS draws.
            if num >= self.max_draws or not (doubt or (g2 < self.tol and num < CONFIRM_DRAWS)):
                break
            if self.go_on_z is not None and g2 - self.tol > self.go_on_z * se2:
                # Likely above the threshold: go on (the next check draws afresh).
                break
            num = _more_draws(num, g2 - self.tol, se2, self.max_draws,
                              CONFIRM_DRAWS if g2 < self.tol else 0)
            values, va = self._score(key, params, num), self._score(key, a.params, num)
            if not (np.all(np.isfinite(values)) and np.all(np.isfinite(va))):
                return False
        limit = self.decide_at_limit and num >= self.max_draws and abs(g2 - self.tol) < Z * se2
        if num != first and g2 < self.tol and (limit or g2 + Z * se2 < self.tol):
            # A stop now hangs on G1: b is scored on the last gain's draws
            # (common noise with a's, as if it had been refined along).
            vb = self._score(key, b.params, num)
            if not np.all(np.isfinite(vb)):
                return False
            g1, se1 = _gain(va, vb)
        # Aitken's extrapolation from the point estimates; the confidence
        # bounds guard the gains themselves.
        g2_pos = max(g2, 0.0)
        self.gap_estimate = g2_pos**2 / (g1 - g2_pos) if g1 > g2_pos else float("inf")
        if limit:
            # Unresolved on the most draws allowed: the point estimates decide.
            return g2 < self.tol and (g1 < self.tol or self.gap_estimate < GAP_TOL)
        if g2 + Z * se2 >= self.tol:
            return False
        return g1 + Z * se1 < self.tol or self.gap_estimate < GAP_TOL


class _ShiftedState(NamedTuple):
    """What :class:`AutoStop` reads of a state: its step (shifted to the stage's start)."""

    params: Any
    opt_state: Any
    step: int


class AdaptiveStop:
    """The rule of ``fit(..., auto_stop=True)`` when the optimizer holds a :func:`vijax.adaptive_lr`.

    RAABBVI's scheme (Welandawe et al. 2022) on :class:`AutoStop`'s
    measurements. The run is cut into stages at a constant step. A stage
    ends where :class:`AutoStop` (restarted at the stage's first step, with
    ``STAGE_RULE_TOL * tol`` = 0.0175 nats as its tolerance) would stop the
    fit, except that a gain still in doubt on ``STAGE_MAX_DRAWS`` = 4096
    draws is judged on its point estimate; its result is the candidate
    :class:`AutoStop` selects (the iterate average, or the last iterate when
    better). A stage runs at
    least ``MIN_STAGE_STEPS`` = 500 steps, and one after the first at least
    as many steps as the one before (``MIN_STAGE``): at a lower step the
    iterates move more slowly, and a short stage reads slow progress as none
    (measured: on a correlated regression, mean-field stages of 120 steps
    ended 0.1 to 0.2 nats short; with stages of at least 500 steps the
    returned ELBO rose by 0.07 and 0.10 nats on Neal's funnel, mean-field
    and full-rank, and 0.06 on the Cox process, mean-field, for 2 to 4
    times the steps). Within that length the rule only records its
    reference points. At the end of a stage after
    the first, its candidate is scored against the previous stage's on
    common draws (at least ``CONFIRM_DRAWS``, more while the gain is within
    ``Z`` standard errors of the threshold). A stage also ends (past its
    minimum length) when every check's candidate since ``2t/3`` of the
    stage was worse than the stage's best by more than ``tol`` beyond doubt,
    and its result is then that best:
    measured on BLR d = 1000 with a full-rank q, Adam's last iterate reached
    0.025 nats of the optimum and then spiked to 0.41 and, at the halved
    step, to 41, so that a stage's last candidate was not its best (issue
    #19's notes). If the lower step gained less
    than ``STAGE_TOL * tol`` = 0.025 nats, the fit stops and returns the
    better of the two; otherwise the step is lowered again
    (:func:`vijax.optim.decrease`), the run restarts from the stage's
    candidate, and the iterate average restarts there. Once
    ``max_decreases`` decreases were made, the step stays where it is and
    the next stages restart at it, until one gains less than the threshold
    (a stage still gaining is not a reason to stop).

    The result is also offered the last two stages' iterate averages pooled
    (weighted by the iterates each holds, in the family's averaging space),
    and returns it where it scores higher on common draws. The average
    restarts at each stage, so the final one holds only the last stage's
    iterates; where both stages' averages are unbiased (the variances of a
    mean-field or low-rank q near a Gaussian target), pooling them halves the
    Monte Carlo noise the result keeps, and where the earlier one is
    biased the comparison keeps the stage's own. At a cap (``num_steps``,
    a wall clock) the pool is of the previous stage and the current one so
    far.

    Why the gain decides: averaged iterates at a constant step keep a bias
    of the order of the step, so halving it removes about half of the bias
    left; a halving that gains ``g`` leaves a gap of about ``g``, and the
    next would gain about half of it. The threshold is half the rule's
    tolerance because a stage of bounded length may end before its
    iterates have fully settled (so the gap left is larger than the gain).
    The constants were chosen on Bayesian linear regression (d = 30 and
    100) and the Cox process, among stage lengths 1, 1.5 and 2 times the
    previous and thresholds 0.5 and 1 times ``tol``. A stage ends below the
    stage threshold, not at ``tol``, because a stage that ends with up to
    ``tol`` of progress left hands the next one a gain near the threshold
    from its own unfinished progress, and the fit stopped short (measured
    on mean-field regressions at d = 1000; the numbers are in issue #19's
    notes and ``benchmarks/results/cpu/default_fit.md``).

    Why a stage may end on a point estimate: a stage's end is not the fit's
    stop (that is judged by the stage-to-stage gain, on as many draws as it
    takes), only a lower step, and a lower step is safe. Resolving every
    stage gain near its threshold on up to 16384 draws for each of three
    candidates cost up to 56 times the fit's own gradient evaluations; at
    4096, with the stricter stage tolerance, at most 16 times (the rule's
    evaluations fell up to 4.3 times on a fit), every fit that had converged
    still did and four more did (``benchmarks/results/cpu/default_fit.md``).
    For the same reason a stage gain above its threshold by more than
    ``STAGE_GO_ON_Z`` = 1 standard error goes on without more draws: a
    wrong "go on" costs one more check, 5% of the steps later, on fresh
    draws; only a gain that may end the stage is refined.
    """

    def __init__(self, family, log_joint, key: jax.Array, start: int, params: Any, *,
                 tol: float = TOL, max_decreases: int = 8):
        self.tol = tol
        self.max_decreases = max_decreases
        self._family, self._log_joint = family, log_joint
        self._key = key
        self._offset = start
        self._stage = self._stage_rule(key)
        self._num_stages = 0
        self._best: Any = None
        self._start_params = params
        self._done = False
        #: The steps at which a stage ended and the step was lowered.
        self.decreases: list[int] = []
        #: The steps at which the step was lowered after non-finite steps.
        self.recoveries: list[int] = []
        self._spent = 0
        self._min_length = 0.0
        #: The previous stage's iterate average at its end, in the averaging
        #: space, and how many iterates it held (None before a stage ended,
        #: and after a recovery).
        self._previous: tuple | None = None

    def _stage_rule(self, key) -> AutoStop:
        """The rule that ends a stage: :class:`AutoStop` at ``STAGE_RULE_TOL * tol``.

        On at most ``STAGE_MAX_DRAWS`` draws, deciding on its point estimates
        where they leave it in doubt (``decide_at_limit``); candidates worse
        than the stage's best by more than ``tol`` beyond doubt at every check
        since ``2t/3`` end the stage too (``max_fall``).
        """
        return AutoStop(self._family, self._log_joint, key, tol=STAGE_RULE_TOL * self.tol,
                        max_draws=STAGE_MAX_DRAWS, decide_at_limit=True, max_fall=self.tol,
                        go_on_z=STAGE_GO_ON_Z)

    @property
    def gap_estimate(self) -> float:
        """The current stage's extrapolated gap (see :class:`AutoStop`)."""
        return self._stage.gap_estimate

    @property
    def num_evaluations(self) -> int:
        """Draws scored by the rule so far, over all stages."""
        return self._spent + self._stage.num_evaluations

    def next_check(self, step: int) -> int:
        return self._offset + AutoStop.next_check(step - self._offset)

    def _shifted(self, state) -> _ShiftedState:
        return _ShiftedState(state.params, state.opt_state, int(state.step) - self._offset)

    def select(self, state) -> Any:
        if self._done:
            return self._best
        current = self._stage.select(self._shifted(state))
        if self._best is not None:
            current = self._better(current, self._best, self._num_stages)[0]
        return self._with_pooled(state, current, salt=2000 + self._num_stages)

    def _average_of(self, state) -> tuple[Any, int] | None:
        """The outermost iterate average of ``state``: ``(mean in its space, count)``.

        None where it cannot be pooled: its space is not the family's (a
        user's own ``iterate_average`` with another ``space``, whose inverse
        the rule does not know).
        """
        avg = _find_states(state.opt_state)[0]
        if avg.space_average is None:
            return avg.average, int(avg.num_averaged)
        space = getattr(self._family, "average_space", None)
        if space is None or (jax.tree_util.tree_structure(space[0](avg.average))
                             != jax.tree_util.tree_structure(avg.space_average)):
            return None
        return avg.space_average, int(avg.num_averaged)

    def _pooled(self, state) -> Any:
        """The previous stage's average and this stage's, pooled; None where there are not two.

        Each is weighted by the iterates it holds (both polynomial-decay
        averages with the same ``eta``): at the end of the fit the last two
        stages differ by less than the stop threshold, so where their
        averages are unbiased (mean-field and low-rank variances near a
        Gaussian target) pooling them halves the noise each leaves. Kept in
        the averaging space, read back through the family's inverse.
        """
        current = self._average_of(state)
        if self._previous is None or current is None:
            return None
        (a, na), (b, nb) = self._previous, current
        if na == 0 or nb == 0 or (jax.tree_util.tree_structure(a)
                                  != jax.tree_util.tree_structure(b)):
            return None
        w = na / (na + nb)
        pooled = jax.tree_util.tree_map(lambda x, y: (w * x + (1.0 - w) * y).astype(y.dtype),
                                        a, b)
        avg = _find_states(state.opt_state)[0]
        if avg.space_average is None:
            return pooled
        return jax.tree_util.tree_map(lambda p, q: jnp.asarray(q, p.dtype), avg.average,
                                      self._family.average_space[1](pooled))

    def _with_pooled(self, state, chosen, *, salt: int) -> Any:
        """``chosen``, or the pooled average of the last two stages where it scores higher."""
        pooled = self._pooled(state)
        if pooled is None:
            return chosen
        return self._better(pooled, chosen, salt)[0]

    def _better(self, new, old, salt: int) -> tuple[Any, float]:
        """The better of two candidates on common draws, and the gain of ``new`` (nats)."""
        key = jax.random.fold_in(jax.random.split(self._key, 3)[2], salt)
        num = CONFIRM_DRAWS
        while True:
            a, b = (self._score(key, p, num) for p in (new, old))
            if not np.all(np.isfinite(a)):
                return old, -np.inf
            if not np.all(np.isfinite(b)):
                return new, np.inf
            gain, se = _gain(a, b)
            if num >= MAX_DRAWS or abs(gain - STAGE_TOL * self.tol) >= Z * se:
                return (new if gain > 0 else old), gain
            num = _more_draws(num, gain - STAGE_TOL * self.tol, se, MAX_DRAWS)

    def _score(self, key, params, num: int) -> np.ndarray:
        self._spent += num
        return _values(self._family, self._log_joint, key, params, num)

    def check(self, state) -> Any:
        """True to stop; a new :class:`FitState` to continue from (a new stage); False to go on."""
        step = int(state.step)
        if step - self._offset < max(self._min_length, MIN_STAGE_STEPS):
            # Too short to end: keep the reference points only.
            self._stage.record(self._shifted(state))
            return False
        if not self._stage.check(self._shifted(state)):
            return False
        (adaptive,) = find_adaptive(state.opt_state)
        self._num_stages += 1
        current = self._stage.select(self._shifted(state))
        gain = np.inf
        if self._best is not None:
            current, gain = self._better(current, self._best, self._num_stages)
        self._best = current
        if gain < STAGE_TOL * self.tol:
            self._best = self._with_pooled(state, current, salt=2000 + self._num_stages)
            self._done = True
            return True
        lower = int(adaptive.num_decreases) < self.max_decreases
        if lower:
            self.decreases.append(step)
        self._min_length = (step - self._offset) * MIN_STAGE
        self._previous = self._average_of(state)
        opt_state = decrease(state.opt_state) if lower else state.opt_state
        return self._new_stage(state, current, opt_state, salt=self._num_stages)

    def _new_stage(self, state, params, opt_state, *, salt: int) -> Any:
        """``state`` restarted at ``params`` (its iterate average too), with a fresh stage rule.

        The average restarts because the step changed. A continued average
        is more precise where averaging is unbiased, but it lags an iterate
        still drifting at the lower step, so that a stage's gain can look
        like none and the fit stop early (the low-rank family; issue #19's
        notes).
        """
        self._offset = int(state.step)
        self._spent += self._stage.num_evaluations
        self._stage = self._stage_rule(jax.random.fold_in(self._key, salt))
        return state._replace(params=params, opt_state=restart_average(opt_state, params))

    def recover(self, state) -> Any:
        """After ``max_nonfinite`` skipped steps: the state to run on from at a lower step, or None.

        A step too large for the model (its steps leave the region where
        ``log_joint`` is finite) is lowered by the wrapper's factor, and the
        current stage restarts from the latest candidate whose ELBO terms
        were all finite at a check (this stage's, else the previous stage's
        result, else the run's first parameters): the last finite
        parameters themselves may be where the ELBO is not. None
        (``FitError`` as usual) once ``max_decreases`` decreases were made.
        """
        (adaptive,) = find_adaptive(state.opt_state)
        if int(adaptive.num_decreases) >= self.max_decreases:
            return None
        step = int(state.step)
        self.recoveries.append(step)
        params = self._stage.last_finite
        if params is None:
            params = self._best if self._best is not None else self._start_params
        # A stage ended by non-finite steps is not one to pool with.
        self._previous = None
        return self._new_stage(state, params, decrease(state.opt_state),
                               salt=1000 + len(self.recoveries))

