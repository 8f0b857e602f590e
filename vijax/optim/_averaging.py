"""Iterate averaging (Polyak and Ruppert) for any optax optimizer.

With Monte Carlo gradients and a constant step size, a stochastic optimizer
does not converge: its iterates jitter around the optimum with a spread
proportional to the step size, and a decaying step slow enough to average the
noise away is often too slow to get there (for a mean-field Gaussian the
contraction per step is set by the smallest eigenvalue of the target's
correlation matrix). Averaging the iterates after a burn-in removes most of
that jitter: with a decaying step the mean converges at the statistically
optimal rate whatever the conditioning (Polyak and Juditsky 1992), and with a
constant step it converges on quadratic objectives (Bach and Moulines 2013);
otherwise a bias of the order of the step remains, much smaller than the
jitter it replaces.

:func:`iterate_average` wraps an optimizer and keeps that mean in its state;
:func:`averaged_params` reads it back from a fit's result. The optimizer
itself is unchanged: it still steps from the last iterate, and ``fit``'s
``result.params`` is still the last iterate.

References:
  B. T. Polyak and A. B. Juditsky. Acceleration of stochastic approximation
  by averaging. SIAM Journal on Control and Optimization 30(4), 1992.

  F. Bach and E. Moulines. Non-strongly-convex smooth stochastic
  approximation with convergence rate O(1/n). NeurIPS 2013.

  O. Shamir and T. Zhang. Stochastic gradient descent for non-smooth
  optimization: convergence results and optimal averaging schemes. ICML 2013.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from vijax import _checks, _host, _tree

_INT32_MAX = 2**31 - 1


class IterateAverageState(NamedTuple):
    """State of :func:`iterate_average`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      count: the number of updates so far (int32).
      num_averaged: how many iterates the average holds (int32): 0 until
        update ``start + 1``, then one more per update whose new parameters
        are finite.
      average: a pytree like ``params``: the mean of the iterates after
        updates ``start + 1, start + 2, ...``; until then, the latest finite
        iterate. With a ``space``, the mean is taken there and this is its
        image back in the parameters.
      space_average: with a ``space``, the mean in that space (the pytree its
        ``forward`` returns); None without one.
    """

    inner_state: Any
    count: jax.Array
    num_averaged: jax.Array
    average: Any
    space_average: Any = None


def iterate_average(
    optimizer: optax.GradientTransformation, *, start: int, eta: float = 0.0,
    space: Optional[tuple[Callable, Callable]] = None,
) -> optax.GradientTransformation:
    """Wraps an optax optimizer to keep the running mean of its iterates.

    The wrapped optimizer steps exactly as before (its updates are returned
    unchanged); the state also holds the mean of the parameters it produces
    from update ``start + 1`` on (Polyak-Ruppert averaging). Read it with
    :func:`averaged_params`. Use a constant step size: averaging removes the
    Monte Carlo jitter a constant step leaves, and ``start`` should be past
    the burn-in, when the iterates have stopped drifting and only jitter.

    Wrap the *complete* optimizer: the average is of ``params + updates``
    with the updates this wrapper returns, so a transformation chained after
    it (``optax.chain(iterate_average(optax.scale_by_adam(), start=...),
    optax.scale(-lr))``) changes the real step without the average knowing.
    Write ``iterate_average(optax.chain(...), start=...)`` instead.

    Use it where the noise of the gradient does not vanish at the optimum:
    the mean-field family on a correlated target, any family with
    ``"reparam"``, any target that is not Gaussian. On a Gaussian target with
    the full-rank family and ``"stl"``, the noise vanishes at the posterior,
    the last iterate converges on its own, and averaging only adds the
    burn-in's bias.

    ``eta > 0`` gives polynomial-decay averaging (Shamir and Zhang 2013):
    the ``n``-th averaged iterate enters with weight ``(1 + eta) / (n + eta)``
    instead of ``1 / n``, so iterate ``s`` carries a weight growing like
    ``s**eta`` and the burn-in is forgotten polynomially fast, at the price of
    fewer effective iterates (about ``(2 eta + 1) / (eta + 1)**2`` of them
    per step: 44% for ``eta = 3``). With it, ``start = 0`` needs no tuning;
    :func:`vijax.fit`'s ``auto_stop`` uses ``start=0, eta=3``.

    ``space = (forward, inverse)`` averages in another parameterization:
    the mean is taken of ``forward(params)`` and read back through
    ``inverse``. Averaging removes a constant step's jitter exactly only
    where the expected gradient is linear in the averaged coordinates (the
    iterates' stationary mean then solves the same equation as the
    optimum); otherwise it is biased by about the jitter's variance. For a
    Gaussian family on a nearly Gaussian target the expected gradient is
    linear in the variances, not in their softplus inverse, so the
    mean-field and low-rank families give a ``space`` that averages
    variances (``family.average_space``, which ``fit``'s ``auto_stop``
    uses).

    ``start`` counts calls of ``update``. A step that ``vijax.fit`` skips
    for a non-finite loss or gradient does not call the optimizer, so it is
    not counted. A step whose new parameters are not all finite (one
    ``vijax.fit`` rolls back) is counted but left out of the average; the
    wrapped optimizer's state advances as without the wrapper.

    Args:
      optimizer: any ``optax.GradientTransformation``, e.g.
        ``vijax.natural_gradient(family, 0.1)`` or ``optax.adam(1e-2)``.
      start: the number of updates (an int, 0 <= start < 2**31) before
        averaging begins; the average holds the iterates after updates
        ``start + 1, start + 2, ...``.
      eta: the polynomial-decay weight (a float >= 0); 0 (the default) is the
        plain running mean.
      space: None (average the parameters themselves), or a pair of
        functions ``(forward, inverse)``: ``forward(params)`` returns a pytree
        of floating-point arrays, ``inverse`` maps such a pytree back to
        parameters, and ``inverse(forward(params))`` is ``params``. Both are
        called inside the compiled update.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires
      ``params``; its state is an :class:`IterateAverageState`.

    Raises:
      TypeError: ``optimizer`` is not an ``optax.GradientTransformation``,
        ``start`` is not an int, or ``space`` is not None or a pair of
        callables.
      ValueError: ``start`` out of range or ``eta`` negative; and, from ``update``, missing
        ``params``.

    Example:
      >>> import jax, optax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(3), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.mean_field()
      >>> opt = vijax.iterate_average(optax.adam(0.05), start=200)
      >>> result = vijax.fit(jax.random.key(0), family, model.log_joint,
      ...                    family.init(model.latent), optimizer=opt,
      ...                    num_steps=1000, estimator="reparam", progress=False)
      >>> averaged = vijax.averaged_params(result)
      >>> bool(vijax.exact_kl(averaged, family, model)
      ...      < vijax.exact_kl(result.params, family, model))
      True
    """
    optimizer = _checks.check_optimizer(optimizer)
    start = _checks.check_positive_int("start", start, minimum=0)
    eta = _check_eta(eta)
    forward, inverse = _checks.check_space("space", space) or (None, None)
    if start > _INT32_MAX:
        raise ValueError(
            f"`start` must be an int in [0, {_INT32_MAX}] (the update count is "
            f"int32); got {start}."
        )

    def init(params):
        return IterateAverageState(
            inner_state=optimizer.init(params),
            count=jnp.zeros((), jnp.int32),
            num_averaged=jnp.zeros((), jnp.int32),
            # A copy, so that a jitted step may donate the state.
            average=_host.fresh_copy(params),
            space_average=None if forward is None else _host.fresh_copy(forward(params)),
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "`params` must be passed to the update of vijax.iterate_average "
                "(`opt.update(grads, state, params)`): it averages the new "
                "parameters."
            )
        updates, inner_state = optimizer.update(updates, state.inner_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = _tree.all_finite(new_params)
        count = optax.safe_int32_increment(state.count)
        averaging = count > start
        num = jnp.where(
            averaging & finite,
            optax.safe_int32_increment(state.num_averaged),
            state.num_averaged,
        )

        def fold(avg, new):
            new = new.astype(avg.dtype)
            n = jnp.maximum(num, 1).astype(avg.dtype)
            weight = (1.0 + eta) / (n + eta)
            return jnp.where(averaging, avg + weight * (new - avg), new)

        if forward is None:
            folded, space_average = jax.tree_util.tree_map(fold, state.average, new_params), None
        else:
            space_average = jax.tree_util.tree_map(fold, state.space_average, forward(new_params))
            folded = jax.tree_util.tree_map(lambda a, b: b.astype(a.dtype), state.average,
                                            inverse(space_average))
            space_average = _tree.where(finite, space_average, state.space_average)
        average = _tree.where(finite, folded, state.average)
        return updates, IterateAverageState(inner_state, count, num, average, space_average)

    return optax.GradientTransformation(init, update)


def _check_eta(eta: Any) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"`eta` must be a finite float >= 0; got {eta!r}.")
    return float(eta)


def averaged_params(state: Any) -> Any:
    """Returns the averaged parameters kept by :func:`iterate_average`.

    Args:
      state: a :class:`vijax.FitResult` or :class:`vijax.FitState` of a fit
        whose optimizer is (or contains, e.g. inside ``optax.chain``) an
        :func:`iterate_average`, or that optimizer state itself. Batched
        states (from ``vijax.fit_batched``) give batched averages.

    Returns:
      The ``average`` pytree (shaped like ``params``): the mean of the
      iterates after update ``start``, or the latest iterate before that.

    Raises:
      TypeError: ``state`` holds no :class:`IterateAverageState`.
      ValueError: it holds more than one.
    """
    given = type(state).__name__
    # A FitResult and a FitState are NamedTuples, so pytrees: the search
    # below finds the optimizer state inside them (this module never imports
    # the fitting engine).
    found = _find_states(state)
    if not found:
        raise TypeError(
            "`state` must be a FitResult, FitState or optimizer state that holds a "
            "vijax.IterateAverageState (wrap the optimizer in vijax.iterate_average); "
            f"got a {given} with none."
        )
    if len(found) > 1:
        raise ValueError(
            "`state` must hold one vijax.IterateAverageState; got "
            f"{len(found)} (nested iterate_average wrappers)."
        )
    return found[0].average


def _find_states(tree: Any) -> list:
    """Every IterateAverageState in ``tree``, including ones nested in another's."""
    is_avg = lambda x: isinstance(x, IterateAverageState)  # noqa: E731
    found = []
    for node in jax.tree_util.tree_leaves(tree, is_leaf=is_avg):
        if is_avg(node):
            found += [node, *_find_states(node.inner_state)]
    return found


def restart_average(opt_state: Any, params: Any) -> Any:
    """``opt_state`` with each outermost :class:`IterateAverageState` restarted at ``params``.

    The next averaged iterate replaces the average (``num_averaged`` is 0),
    as after ``init``; the update count and the inner state are kept.
    """

    def reset(node):
        if not isinstance(node, IterateAverageState):
            return node
        average = jax.tree_util.tree_map(
            lambda a, p: jnp.asarray(p, a.dtype), node.average, params)
        return node._replace(num_averaged=jnp.zeros_like(node.num_averaged), average=average)

    return jax.tree_util.tree_map(
        reset, opt_state, is_leaf=lambda n: isinstance(n, IterateAverageState))
