"""A learning rate that a host-side rule lowers: the optimizer behind ``fit``'s default.

With Monte Carlo gradients a constant step size converges, at best, to a
neighbourhood of the optimum whose size grows with the step: averaging the
iterates removes the jitter but, off quadratic objectives, leaves a bias of
the order of the step. A step small enough for a 0.05-nat answer is slow to
get anywhere, and the right one depends on the model, the family and the
dimension. Welandawe et al. (2022, RAABBVI) remove the choice: run at a
large step until the iterates are stationary, lower the step by a constant
factor, restart from the averaged iterate, and stop when lowering it no
longer pays.

:func:`adaptive_lr` is the optimizer half of that scheme: an optax wrapper
that multiplies its optimizer's updates by a factor kept in its state
(:class:`AdaptiveLRState`), so that lowering the step changes a number in
the state, not the compiled program. ``vijax.fit(..., auto_stop=True)``
(the default when ``optimizer`` is omitted) is the rule half: it lowers the
factor each time its stopping rule finds the iterates stationary, and stops
when a lower step no longer gains ``0.025`` nats (see
:class:`vijax.fitting._stopping.AdaptiveStop`).

References:
  M. Welandawe, M. R. Andersen, A. Vehtari, J. H. Huggins. Robust,
  automated, and accurate black-box variational inference. arXiv:2203.15945,
  2022 (JMLR 2024).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vijax import _checks
from vijax.optim._averaging import _find_states


class AdaptiveLRState(NamedTuple):
    """State of :func:`adaptive_lr`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      scale: the factor its updates are multiplied by (a float32 scalar
        array): 1 at the start, multiplied by the wrapper's ``factor`` at
        each decrease.
      num_decreases: how many times the scale was lowered (int32).
      factor: the wrapper's decrease per stage (a float32 scalar array).
    """

    inner_state: Any
    scale: jax.Array
    num_decreases: jax.Array
    factor: jax.Array


def adaptive_lr(
    optimizer: optax.GradientTransformation, *, factor: float = 0.5
) -> optax.GradientTransformation:
    """Wraps an optax optimizer so that ``vijax.fit``'s ``auto_stop`` rule can lower its step.

    The wrapped optimizer's updates are multiplied by ``scale`` (1 at the
    start), a number kept in the state; :func:`decrease` multiplies it by
    ``factor``. For an optimizer whose learning rate is a last multiplicative
    step (``optax.adam``, ``optax.sgd``, ``optax.rmsprop``, ...) that is the
    same as lowering its learning rate, and its moment estimates are kept.

    Under ``vijax.fit(..., auto_stop=True)`` the rule lowers the scale each
    time it finds the iterates stationary, restarting the iterate average
    from the best candidate, and stops when a stage at the lower step gains
    less than ``0.025`` nats on the one before (RAABBVI, Welandawe et al.
    2022). ``vijax.fit`` without an ``optimizer`` uses
    ``adaptive_lr(optax.adam(lr))`` this way, ``lr = 0.1 * min(1, sqrt(2 d / P))``
    (:func:`vijax.fitting._drivers.default_learning_rate`; for the low-rank
    family with the factor's steps in units of q's marginal sds,
    :func:`vijax.fitting._drivers.factor_in_sd_units`, and its mean's at 0.1,
    :func:`vijax.fitting._drivers.loc_steps_scaled`).

    Not for ``vijax.natural_gradient``: its step size enters the precision
    update, not as a last factor, and scaling its updates would break the
    positive-definite guarantee.

    Args:
      optimizer: an ``optax.GradientTransformation`` whose step is a last
        multiplicative factor.
      factor: the decrease per stage (a float in (0, 1)); 0.5 halves the
        step, as in RAABBVI.

    Returns:
      An ``optax.GradientTransformation`` whose state is an
      :class:`AdaptiveLRState`.

    Raises:
      TypeError: ``optimizer`` is not an ``optax.GradientTransformation``
        (or, at ``init``, it holds a ``vijax.natural_gradient``).
      ValueError: ``factor`` is not in (0, 1).

    Example:
      >>> import jax, optax, vijax
      >>> opt = vijax.adaptive_lr(optax.adam(0.1))
      >>> state = vijax.optim.decrease(opt.init(jax.numpy.zeros(2)))
      >>> vijax.optim.learning_rate_scale(state)
      0.5
    """
    optimizer = _checks.check_optimizer(optimizer)
    if (isinstance(factor, bool) or not isinstance(factor, (int, float))
            or not 0.0 < factor < 1.0):
        raise ValueError(f"`factor` must be a float in (0, 1); got {factor!r}.")

    def init(params):
        inner_state = optimizer.init(params)
        from vijax.optim._natural import NaturalGradientState

        if any(isinstance(node, NaturalGradientState) for node in jax.tree_util.tree_leaves(
                inner_state, is_leaf=lambda n: isinstance(n, NaturalGradientState))):
            raise TypeError(
                "vijax.adaptive_lr cannot wrap vijax.natural_gradient: its step size "
                "enters the precision update, and scaling its updates would break the "
                "positive-definite guarantee. Give natural_gradient a decaying step "
                "(e.g. lambda t: 0.3 / (1 + t / 50)) instead."
            )
        return AdaptiveLRState(
            inner_state=inner_state,
            scale=jnp.ones((), jnp.float32),
            num_decreases=jnp.zeros((), jnp.int32),
            factor=jnp.asarray(factor, jnp.float32),
        )

    def update(updates, state, params=None):
        updates, inner_state = optimizer.update(updates, state.inner_state, params)
        updates = jax.tree_util.tree_map(lambda u: u * state.scale.astype(u.dtype), updates)
        return updates, state._replace(inner_state=inner_state)

    return optax.GradientTransformation(init, update)


def _is_adaptive(node: Any) -> bool:
    return isinstance(node, AdaptiveLRState)


def find_adaptive(tree: Any) -> list[AdaptiveLRState]:
    """Every :class:`AdaptiveLRState` in ``tree`` (an optimizer state, a FitState, ...)."""
    found = []
    for node in jax.tree_util.tree_leaves(tree, is_leaf=_is_adaptive):
        if _is_adaptive(node):
            found += [node, *find_adaptive(node.inner_state)]
    return found


def learning_rate_scale(state: Any) -> float:
    """The factor :func:`adaptive_lr` multiplies its updates by, read from a state.

    Args:
      state: a :class:`vijax.FitResult`, :class:`vijax.FitState` or optimizer
        state holding one :class:`AdaptiveLRState` (unbatched).

    Returns:
      The scale as a Python float: ``factor ** num_decreases``.

    Raises:
      TypeError: ``state`` holds no :class:`AdaptiveLRState`.
      ValueError: it holds more than one.
    """
    found = find_adaptive(state)
    if len(found) != 1:
        if not found:
            raise TypeError(
                "`state` must hold a vijax.AdaptiveLRState (an optimizer wrapped in "
                f"vijax.adaptive_lr); got a {type(state).__name__} with none."
            )
        raise ValueError(
            f"`state` must hold one vijax.AdaptiveLRState; got {len(found)}."
        )
    return float(found[0].scale)


def decrease(state: Any) -> Any:
    """``state`` with the scale of every :class:`AdaptiveLRState` in it lowered by its factor."""

    def lower(node):
        if not _is_adaptive(node):
            return node
        return node._replace(
            scale=(node.scale * node.factor).astype(node.scale.dtype),
            num_decreases=optax.safe_int32_increment(node.num_decreases),
        )

    return jax.tree_util.tree_map(lower, state, is_leaf=_is_adaptive)


def check_nesting(opt_state: Any) -> bool:
    """Whether ``opt_state`` holds a :class:`AdaptiveLRState`; raises where one cannot work.

    Raises:
      ValueError: more than one, or an iterate average inside one (the
        average would be of the unscaled steps: wrap the other way round,
        ``vijax.iterate_average(vijax.adaptive_lr(opt), ...)``).
    """
    found = find_adaptive(opt_state)
    if len(found) > 1:
        raise ValueError(
            f"`optimizer` must hold at most one vijax.adaptive_lr; got {len(found)}."
        )
    if found and _find_states(found[0].inner_state):
        raise ValueError(
            "`optimizer` wraps a vijax.iterate_average in vijax.adaptive_lr, so the "
            "average would be of the unscaled steps; wrap it the other way round: "
            "vijax.iterate_average(vijax.adaptive_lr(opt), ...)."
        )
    return bool(found)
