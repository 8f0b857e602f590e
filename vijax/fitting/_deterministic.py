"""``fit_exact``: maximize the exact ELBO with L-BFGS, for models that give ``E_q[log p]``.

Where a model gives ``E_q[log p(x, z)]`` without sampling
(``model.expected_log_joint``: the conjugate models in closed form, logistic
regression by one-dimensional quadrature), the ELBO and its gradient are
deterministic, and a quasi-Newton method with a line search
(``optax.lbfgs``, a zoom line search on the Wolfe conditions) reaches the
family's optimum with no step size to tune and no Monte Carlo noise floor.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from vijax import _checks, _tree
from vijax._cache import LRU
from vijax._exact import exact_elbo
from vijax.families._gaussian import LowRankPrecisionParams
from vijax.families._protocol import VariationalFamily, check_family, require
from vijax.fitting._types import describe_tree
from vijax.models._model import Model

_RUNNING, _CONVERGED, _NONFINITE = 0, 1, 2
_SPAN_FRACTION = 10  # the stopping window spans at least 1/_SPAN_FRACTION of the steps taken
_MAX_LINESEARCH = 20  # a line search's most evaluations (optax.lbfgs's default)
_COMPILED = LRU(16)  # (family, model, options) -> (solver, chunk, value and grads)


def _searched(scaled: bool):
    """``(to, back)``: the family's parameters to those L-BFGS searches over, and back.

    The identity, except for :func:`vijax.low_rank_precision` (``scaled``):
    there its precision factor ``U`` is searched in units of the diagonal's
    precision, ``V = diag(sd) U``, so that ``Lambda = diag(1 / sd) (I + V
    V^T) diag(1 / sd)`` and ``V`` is of order one whatever the posterior's
    scale. In ``U`` itself the factor starts about ``1 / sd`` times smaller
    than where it ends, near a saddle (``U = 0``) whose gains the stopping
    rule cannot tell from convergence: on the Poisson GLM (rank 2) the fit
    stopped at the mean-field optimum, 0.063 nats short, and reached the
    family's optimum only given ``tol=1e-9`` and 10,471 steps; in ``V``,
    within 0.0002 nats in 100 to 230 steps from six starts (measured by hand).
    """
    if not scaled:
        return (lambda p: p), (lambda p: p)

    def to(p):
        return p._replace(prec_factor=p.prec_factor * jax.nn.softplus(p.raw_scale)[:, None])

    def back(p):
        return p._replace(prec_factor=p.prec_factor / jax.nn.softplus(p.raw_scale)[:, None])

    return to, back


class ExactFitResult(NamedTuple):
    """What :func:`fit_exact` returns.

    Attributes:
      params: the family's parameters with the highest exact ELBO seen
        (always finite).
      elbo: the exact ELBO at ``params`` (a Python float).
      trace: the exact ELBO after each step, a NumPy array of ``num_steps``
        entries (a step that met a non-finite value records the best so far).
      num_steps: L-BFGS steps taken.
      num_evals: evaluations of the exact ELBO and its gradient, the one at
        the start and the line searches' included (each costs one
        ``expected_log_joint`` and its reverse-mode gradient); the gradient
        norm at the end adds one more.
      grad_norm: the Euclidean norm of the ELBO's gradient at ``params``.
      converged: whether the stopping rule fired (see :func:`fit_exact`).
      message: why the fit stopped, in words.
    """

    params: Any
    elbo: float
    trace: np.ndarray
    num_steps: int
    num_evals: int
    grad_norm: float
    converged: bool
    message: str

    def __repr__(self) -> str:
        """One line of facts; the params as ``dtype[shape]`` and the trace by its length."""
        return (f"ExactFitResult(elbo={self.elbo:.6g}, converged={self.converged}, "
                f"num_steps={self.num_steps}, num_evals={self.num_evals}, "
                f"grad_norm={self.grad_norm:.3g}, message={self.message!r}, "
                f"params={describe_tree(self.params)}, trace=<{len(self.trace)} ELBOs>)")

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / Jupyter
        p.text(repr(self))


class _Carry(NamedTuple):
    params: Any
    opt_state: Any
    best: Any          # the params with the highest ELBO so far
    best_elbo: jax.Array
    gain: jax.Array      # the ELBO gained since ``ref_step`` (trapezoid rule, each step)
    ref_step: jax.Array  # the last step at which those gains reached ``tol``
    step: jax.Array
    evals: jax.Array
    status: jax.Array


def fit_exact(
    family: VariationalFamily,
    model: Model,
    init_params: Any,
    *,
    max_steps: int = 5000,
    tol: float = 1e-4,
    window: int = 10,
    memory_size: int = 10,
    chunk_size: int = 100,
) -> ExactFitResult:
    """Returns the family's ELBO optimum for a model with an exact expected log joint.

    Maximizes :func:`vijax.exact_elbo` (``model.expected_log_joint(q) +
    H[q]``, no sampling) over the family's parameters with L-BFGS
    (``optax.lbfgs``: ``memory_size`` curvature pairs, a zoom line search on
    the strong Wolfe conditions). Nothing is random and there is no step size
    to tune. The steps run in compiled chunks of up to ``chunk_size`` steps
    (one ``jax.lax.while_loop`` each); ``KeyboardInterrupt`` between chunks
    returns the best point so far (with a ``RuntimeWarning``).

    Stopping rule: the fit has converged when ``window`` steps in a row, or
    a tenth of the steps taken if that is more, gain less than ``tol`` nats
    in all. The growing window is for slow tails, such as a low-rank
    factor's coordinates whose diagonal sds head to 0 (a boundary optimum),
    each step gaining a little: if gains fall off as ``step^-p`` with
    ``p > 1``, what is left after the stop is then a fixed multiple of
    ``tol`` (about ``tol / (0.9^(1-p) - 1)``) however long the run. It also
    means a fit ends at least a tenth of its steps after its last real gain,
    so a fit still gaining near ``max_steps`` ends unconverged. L-BFGS
    converges fast near the optimum, so a small ``tol`` costs few steps
    beyond that tenth (how far from the optimum the default stops is
    measured in ``benchmarks/results/cpu/exact_fit.md``).
    Each step's gain is measured by the trapezoid rule on the gradients at
    its two ends, ``-(g_0 + g_1) . u / 2`` for a step ``u`` of ``-ELBO``
    (exact for a quadratic), not as a difference of two ELBOs: in float32
    that difference resolves no better than a few ulps of the ELBO (0.002
    nats at 3e4 nats), too coarse to see the slow gains of a plateau, such as
    a low-rank factor's escape from the saddle at ``W = 0``.
    A line search that runs out of evaluations (20) restarts L-BFGS from
    the point it reached, its curvature pairs dropped: near a boundary
    optimum (a low-rank factor's coordinates whose diagonal sds head to 0)
    the same direction searched again made no progress, and the rule read
    that stall as convergence.
    For :func:`vijax.low_rank_precision` L-BFGS searches over the precision
    factor in units of the diagonal's precision (``diag(sd) U``; the result
    is in the family's own parameters): in ``U`` itself the fit stayed near
    the saddle at ``U = 0`` and stopped at the mean-field optimum, reporting
    convergence (the Poisson GLM, rank 2: 0.063 nats short; now within 0.001).
    It stops unconverged after ``max_steps`` steps, or when a line search
    meets a non-finite ELBO, gradient or parameters (then with a ``RuntimeWarning``);
    ``result.params`` is always the finite point with the highest ELBO seen.

    Models with ``expected_log_joint``: the Gaussian-conjugate models
    (:func:`vijax.models.bayesian_linear_regression`,
    :func:`vijax.models.linear_gaussian`, :func:`vijax.models.normal_mean`),
    :func:`vijax.models.logistic_regression` and :func:`vijax.models.poisson_glm`.
    For any other model use :func:`vijax.fit`, whose gradients are Monte
    Carlo estimates. Cost per evaluation: the GLMs O(n d) for the mean-field
    family, O(n d k) for rank ``k``, O(n d^2) for full rank. The measured
    steps, evaluations and accuracy are in
    ``benchmarks/results/cpu/exact_fit.md``.

    Args:
      family: a :class:`vijax.VariationalFamily` with a Gaussian view
        (``to_gaussian``): ``mean_field``, ``low_rank``, ``full_rank``, ...
      model: a :class:`vijax.models.Model` whose ``expected_log_joint`` is not
        ``None``.
      init_params: the family's initial parameters (``family.init(model.latent)``),
        finite; their dtype (float32 or float64) is the fit's.
      max_steps: the most L-BFGS steps (>= 1).
      tol: the stopping rule's gain, in nats (> 0).
      window: the fewest steps in the stopping rule's window (>= 1).
      memory_size: L-BFGS curvature pairs kept (>= 1).
      chunk_size: steps per compiled chunk (>= 1).

    Returns:
      An :class:`ExactFitResult`.

    Raises:
      TypeError: ``family`` or ``model`` has the wrong type, ``init_params``
        are not floating point, or a count is not an int.
      ValueError: the model has no ``expected_log_joint``, ``init_params`` do
        not match it (structure or dtype) or are not finite, the ELBO at
        ``init_params`` is not finite, or a count or ``tol`` is out of range.

    Example:
      >>> import jax.numpy as jnp, numpy as np, vijax
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(50, 3)).astype(np.float32)
      >>> y = (rng.random(50) < 0.5).astype(np.float32)
      >>> model = vijax.models.logistic_regression(x, y)
      >>> family = vijax.mean_field()
      >>> result = vijax.fit_exact(family, model, family.init(model.latent))
      >>> result.converged
      True
    """
    check_family(family)
    require(family, "to_gaussian", "fit_exact")
    if not isinstance(model, Model):
        raise TypeError(f"`model` must be a vijax.models.Model; got {type(model).__name__}.")
    max_steps = _checks.check_positive_int("max_steps", max_steps)
    tol = _checks.check_positive_float("tol", tol)
    window = _checks.check_positive_int("window", window)
    memory_size = _checks.check_positive_int("memory_size", memory_size)
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    flat0 = ravel_pytree(init_params)[0]
    if not jnp.issubdtype(flat0.dtype, jnp.floating):
        raise TypeError(f"`init_params` must be floating point; got dtype {flat0.dtype}.")
    _checks.check_finite("init_params", flat0)

    if model.expected_log_joint is None:  # before anything is built for it
        exact_elbo(init_params, family, model)  # raises, naming what is missing
    dtype = flat0.dtype
    scaled = isinstance(init_params, LowRankPrecisionParams)
    to_searched = _searched(scaled)[0]
    solver, chunk, searched, final = _COMPILED.get(
        (family, model, tol, window, _SPAN_FRACTION, memory_size, chunk_size, scaled),
        lambda: _compile(family, model, tol, window, memory_size, chunk_size, scaled))
    # Traces exact_elbo (its checks raise here, naming the argument) before any step;
    # the first step reuses this value and gradient (the evaluation counted first).
    start = to_searched(init_params)
    loss0, grad0 = searched(start)
    if loss0.dtype != dtype:
        raise ValueError(
            f"`init_params` ({dtype}) and the model's ELBO ({loss0.dtype}) must have one "
            "dtype: build the params with family.init(model.latent), or the model from "
            f"{dtype} data."
        )
    if not np.isfinite(float(loss0)):
        raise ValueError(
            f"The exact ELBO at `init_params` must be finite; got {-float(loss0)}. "
            "Start from family.init(model.latent) or a nearby point."
        )
    e0 = -loss0
    opt_state = optax.tree_utils.tree_set(solver.init(start), value=loss0, grad=grad0)
    carry = _Carry(start, opt_state, start, e0, jnp.zeros_like(e0), jnp.int32(0),
                   jnp.int32(0), jnp.int32(1), jnp.int32(_RUNNING))
    traces, interrupted = [], False
    try:
        while int(carry.step) < max_steps and int(carry.status) == _RUNNING:
            stop = min(int(carry.step) + chunk_size, max_steps)
            before = int(carry.step)
            carry, trace = chunk(carry, jnp.int32(stop))
            traces.append(np.asarray(trace)[: int(carry.step) - before])
    except KeyboardInterrupt:
        interrupted = True
    status, steps = int(carry.status), int(carry.step)
    params = _searched(scaled)[1](carry.best)
    value, grad = final(params)  # the gradient in the family's own parameters
    grad_norm = float(_tree.norm(grad))
    if status == _CONVERGED:
        message = (f"converged: the last {steps - int(carry.ref_step)} steps gained less "
                   f"than {tol:g} nats in all")
    elif status == _NONFINITE:
        message = (f"stopped at step {steps}: a line search met a non-finite ELBO, gradient "
                   "or parameters")
    elif interrupted:
        message = f"interrupted at step {steps}"
    else:
        message = f"not converged: max_steps={max_steps} reached"
    if status == _NONFINITE or interrupted:
        warnings.warn(f"fit_exact {message}; returning the best finite point so far.",
                      RuntimeWarning, stacklevel=2)
    trace = np.concatenate(traces) if traces else np.zeros((0,), dtype)
    return ExactFitResult(
        params=params, elbo=float(-value), trace=trace, num_steps=steps,
        num_evals=int(carry.evals), grad_norm=grad_norm,
        converged=status == _CONVERGED, message=message,
    )


def _loss(params, family, model):
    return -exact_elbo(params, family, model)


def _compile(family, model, tol, window, memory_size, chunk_size, scaled):
    """L-BFGS, the compiled chunk, and the loss's value and gradient in the searched
    parameters and in the family's (cached per configuration)."""
    solver = optax.lbfgs(memory_size=memory_size, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=_MAX_LINESEARCH, initial_guess_strategy="one"))
    back = _searched(scaled)[1]

    def loss(params):
        return _loss(back(params), family, model)

    value_and_grad = optax.value_and_grad_from_state(loss)

    def one_step(c: _Carry) -> tuple[_Carry, jax.Array]:
        value, grad = value_and_grad(c.params, state=c.opt_state)
        updates, opt_state = solver.update(
            grad, c.opt_state, c.params, value=value, grad=grad, value_fn=loss)
        params = optax.apply_updates(c.params, updates)
        new_value = optax.tree_utils.tree_get(opt_state, "value")
        searched = optax.tree_utils.tree_get(opt_state, "num_linesearch_steps")
        evals = c.evals + searched.astype(jnp.int32)
        elbo = -new_value
        # The step's ELBO gain by the trapezoid rule on its gradients (see fit_exact).
        new_grad = optax.tree_utils.tree_get(opt_state, "grad")
        # A line search that ran out of steps found (next to) no step: the
        # curvature pairs point badly, e.g. near a boundary optimum. L-BFGS
        # starts afresh from the new point rather than search the same
        # direction again until the stopping rule mistakes the stall for
        # convergence.
        opt_state = _tree.where(
            searched >= _MAX_LINESEARCH,
            optax.tree_utils.tree_set(solver.init(params), value=new_value, grad=new_grad),
            opt_state)
        step_gain = -0.5 * (optax.tree_utils.tree_vdot(grad, updates)
                            + optax.tree_utils.tree_vdot(new_grad, updates))
        ok = jnp.isfinite(elbo) & _tree.all_finite(params) & jnp.isfinite(step_gain)
        # Ties go to the later point: L-BFGS's steps gain (Wolfe), by less than
        # a float32 ELBO's rounding near the optimum.
        better = ok & (elbo >= c.best_elbo)
        best = _tree.where(better, params, c.best)
        best_elbo = jnp.where(better, elbo, c.best_elbo)
        step = c.step + 1
        gain = c.gain + jnp.where(ok, step_gain, 0.0)
        gained = gain >= tol
        ref_step = jnp.where(gained, step, c.ref_step)
        # The window grows with the run (a tenth of its steps): a slow tail's
        # gains are then weighed over a stretch in proportion to the time it has
        # taken, whatever their size per step.
        span = jnp.maximum(window, step // _SPAN_FRACTION)
        status = jnp.select([~ok, step - ref_step >= span], [_NONFINITE, _CONVERGED],
                            _RUNNING)
        carry = _Carry(_tree.where(ok, params, c.params), _tree.where(ok, opt_state, c.opt_state),
                       best,
                       best_elbo, jnp.where(gained, 0.0, gain), ref_step,
                       step, evals,
                       status.astype(jnp.int32))
        return carry, jnp.where(ok, elbo, c.best_elbo)

    @jax.jit
    def chunk(c: _Carry, stop: jax.Array):
        dtype = c.best_elbo.dtype
        trace = jnp.full((chunk_size,), jnp.nan, dtype)
        start = c.step

        def cond(state):
            c, _ = state
            return (c.status == _RUNNING) & (c.step < stop)

        def body(state):
            c, trace = state
            c, elbo = one_step(c)
            return c, trace.at[c.step - 1 - start].set(elbo.astype(dtype))

        return jax.lax.while_loop(cond, body, (c, trace))

    searched = jax.jit(jax.value_and_grad(loss))
    if not scaled:  # the same function: compile it once
        return solver, chunk, searched, searched
    return (solver, chunk, searched,
            jax.jit(jax.value_and_grad(lambda p: _loss(p, family, model))))

