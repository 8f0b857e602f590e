"""The pure step of :func:`vijax.fit`: one guarded optax update on ``-elbo``.

:func:`make_step` and :func:`init_fit_state` are public and pure for those
who write their own loop; the drivers hand ``make_step``'s step to the engine
(and compile ``init_fit_state`` once per optimizer).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vijax import _checks, _taylor, _tree
from vijax._objectives import (
    ADAPTIVE_ESTIMATORS,
    DEFAULT_ESTIMATOR,
    ELBO_ESTIMATORS,
    check_antithetic,
    check_estimator,
    elbo,
)
from vijax.families._protocol import VariationalFamily, check_family, entropy_fn
from vijax.fitting._types import FitInfo, FitState

ArrayTree = Any


def init_fit_state(key: jax.Array, params: Any, optimizer: optax.GradientTransformation,
                   *, control_variate: str | None = None) -> FitState:
    """Returns the :class:`FitState` at step 0 for ``params`` and ``optimizer``.

    Pure (no checks beyond the key's type and ``control_variate``), so it
    can be vmapped over keys or parameters; :func:`fit` calls it for you.

    Args:
      key: the run's PRNG key (typed, or a legacy uint32 key).
      params: the family's initial parameters.
      optimizer: an ``optax.GradientTransformation``.
      control_variate: the :func:`make_step` option the state is for:
        ``"taylor"`` or ``"auto"`` give it a placeholder reference point
        (``state.control``) that the first step replaces; None (the
        default) none.

    Returns:
      ``FitState(params, optimizer.init(params), step=0, key, control)`` with
      a typed key and an int32 step.
    """
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    control = None
    if control_variate is not None:
        if control_variate not in _taylor.CONTROL_VARIATES:
            raise ValueError(
                f"`control_variate` must be None or one of {_taylor.CONTROL_VARIATES}; got "
                f"{control_variate!r}."
            )
        if getattr(params, "loc", None) is None:
            raise ValueError(
                "`control_variate` needs params with a mean, `params.loc` (the mean-field "
                f"and low-rank families'); got {type(params).__name__}."
            )
        control = _taylor.placeholder(params.loc)
    return FitState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
        control=control,
    )


def check_step_config(family, log_joint, optimizer, num_samples, estimator,
                      antithetic=False):
    """Validates what ``make_step``, ``fit`` and ``fit_batched`` share."""
    family = check_family(family)
    _checks.check_log_joint(log_joint)
    optimizer = _checks.check_optimizer(optimizer)
    num_samples = _checks.check_positive_int("num_samples", num_samples)
    check_estimator(estimator, ELBO_ESTIMATORS + ADAPTIVE_ESTIMATORS)
    if estimator == "closed_entropy":
        entropy_fn(family, "estimator='closed_entropy'")
    check_antithetic(antithetic, family, estimator)
    return family, log_joint, optimizer, num_samples


def guarded_update(optimizer, state: FitState, loss, grads) -> tuple[FitState, FitInfo]:
    """The optax update of ``state`` by ``grads``, skipped when anything is non-finite.

    Shared by every gradient step (:func:`make_step`, the data step): see
    :func:`make_step` for the two ways a step is skipped.
    """
    dtype = _tree.float_dtype(state.params)
    # A non-finite gradient entry makes the norm non-finite, so one
    # reduction serves as the gradient check and the reported norm.
    grad_norm = _tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = _tree.all_finite(params)
        # The optimizer's new state is kept as it returned it: restoring
        # the old one too keeps both states alive and copies them every
        # step, measured at 7 to 10% of a full-rank step on CPU.
        return _tree.where(ok, params, state.params), opt_state, ok

    def keep(_):
        return state.params, state.opt_state, jnp.array(False)

    # ``cond`` (not a select after the fact) skips the optimizer update of
    # a step that is already known to be bad; measured slightly cheaper.
    params, opt_state, ok = jax.lax.cond(finite, update, keep, None)
    new_state = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
    info = FitInfo(
        elbo=(-loss).astype(dtype),
        grad_norm=grad_norm.astype(dtype),
        skipped=jnp.logical_not(ok),
    )
    return new_state, info


def make_step(
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    num_samples: int = 8,
    estimator: str = DEFAULT_ESTIMATOR,
    antithetic: bool = False,
    control_variate: str | None = None,
    refresh_every: int | None = None,
) -> Callable[[FitState], tuple[FitState, FitInfo]]:
    """Returns ``step(state) -> (state, info)``: one guarded optax step on -ELBO.

    The step draws its noise from ``fold_in(state.key, state.step)`` (so the
    result depends on the state alone), computes ``-elbo`` and its gradient
    with :func:`vijax.elbo`, and applies the optax update. A step is skipped
    (``info.skipped`` is True) in two cases:

    * the loss or the gradient is not finite: the optimizer is not called,
      and the parameters and optimizer state stay as they were;
    * the gradient is finite but the updated parameters are not (the
      optimizer returned a non-finite update, or one that overflows; e.g.
      ``optax.adam(lr, eps=0.0)`` on a coordinate whose gradient is exactly
      zero): the parameters stay as they were, and the optimizer keeps the
      state it returned, since restoring it would copy the whole optimizer
      state every step.

    The step counter advances either way, so a skipped step's successor
    draws fresh noise.

    The returned function is pure: ``jit``, ``vmap`` and ``lax.scan`` it as
    you like (``fit`` scans it).

    Args:
      family: a :class:`vijax.VariationalFamily`.
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree.
      optimizer: an ``optax.GradientTransformation``; it minimizes -ELBO.
      num_samples: Monte Carlo draws per step (>= 1).
      estimator: the gradient estimator of :func:`vijax.elbo` (default
        ``"adaptive_stl"``, sticking the landing where it helps; see
        :func:`vijax.elbo`).
      antithetic: draw the samples in pairs reflected through q's mean (see
        :func:`vijax.elbo`; default False).
      control_variate: ``"taylor"`` for the Taylor control variate
        (:func:`vijax.elbo`'s ``control``), ``"auto"`` for it where it pays
        (see :func:`vijax.fit`), or None. The step then keeps its
        reference point in ``state.control``. ``"taylor"`` moves it to q's
        mean at every step ``t`` with ``t % refresh_every == 0``; ``"auto"``
        probes it every 50 steps and moves it when it no longer pays, or
        after ``refresh_every`` steps unless one draw is as good as exact
        there (its steps then take one draw: :func:`vijax._taylor.auto_branch`).
        Both take a point at the first step, when ``state.control`` is a
        placeholder: ``vijax.init_fit_state(key, params, optimizer,
        control_variate=...)`` makes a state with one (:func:`fit` does it for you).
        Each new point costs ``d`` Hessian-vector products.
      refresh_every: steps between reference points (default
        ``max(50, 10 ceil(d / num_samples))``, about 10% more Hessian-vector
        products than the draws' own).

    Returns:
      ``step(state: FitState) -> (FitState, FitInfo)``.

    Raises:
      TypeError: ``family``, ``log_joint`` or ``optimizer`` has the wrong type.
      ValueError: ``num_samples < 1`` or an unknown ``estimator``.

    Example:
      >>> import jax, optax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family, opt = vijax.mean_field(), optax.adam(1e-2)
      >>> step = vijax.make_step(family, model.log_joint, opt, num_samples=4)
      >>> state = vijax.init_fit_state(
      ...     jax.random.key(0), family.init(model.latent), opt)
      >>> state, info = jax.jit(step)(state)
    """
    family, log_joint, optimizer, num_samples = check_step_config(
        family, log_joint, optimizer, num_samples, estimator, antithetic
    )
    control_variate = check_control_variate(control_variate, estimator)
    if refresh_every is not None:
        refresh_every = _checks.check_positive_int("refresh_every", refresh_every)

    def neg_elbo(params, key, control, name=estimator, draws=num_samples):
        return -elbo(
            key, params, family, log_joint, num_samples=draws, estimator=name,
            antithetic=antithetic, control=control,
        )

    loss_and_grad = jax.value_and_grad(neg_elbo)

    def step(state: FitState) -> tuple[FitState, FitInfo]:
        key = jax.random.fold_in(state.key, state.step)
        if control_variate is None:
            loss, grads = loss_and_grad(state.params, key, None)
            return guarded_update(optimizer, state, loss, grads)
        control = _refreshed(state, key, family, log_joint, num_samples, refresh_every,
                             control_variate)
        state = state._replace(control=control)
        if control_variate == "taylor":
            loss, grads = loss_and_grad(state.params, key, control)
        else:
            # "auto": the given estimator without the control variate, the closed-form
            # entropy with it (with which a Gaussian posterior's gradient is exact),
            # on one draw where that is as good as exact.
            branches = [
                lambda: loss_and_grad(state.params, key, None),
                lambda: loss_and_grad(state.params, key, control, "closed_entropy"),
                lambda: loss_and_grad(state.params, key, control, "closed_entropy", 1),
            ][:3 if num_samples > 1 else 2]
            loss, grads = jax.lax.switch(_taylor.auto_branch(control.ratio, num_samples),
                                         branches)
        return guarded_update(optimizer, state, loss, grads)

    return step


def check_control_variate(control_variate, estimator: str) -> str | None:
    """Returns ``control_variate`` (None, ``"taylor"`` or ``"auto"``) checked against ``estimator``."""
    if control_variate is None:
        return None
    if control_variate not in _taylor.CONTROL_VARIATES:
        raise ValueError(
            f"`control_variate` must be None or one of {_taylor.CONTROL_VARIATES}; got "
            f"{control_variate!r}."
        )
    _taylor.check_pathwise(estimator, "control_variate")
    return control_variate


def _refreshed(state: FitState, key, family, log_joint, num_samples: int, every, mode: str):
    """``state.control`` after this step's refresh or probe (see :func:`make_step`)."""
    control = state.control
    if not isinstance(control, _taylor.TaylorReference):
        raise ValueError(
            "A step with `control_variate` needs `state.control` to hold a "
            "vijax.TaylorReference (vijax.fit sets one); got "
            f"{type(control).__name__}. Make the state with vijax.init_fit_state(key, "
            f"params, optimizer, control_variate={mode!r})."
        )
    params, step = state.params, state.step
    d = control.loc.shape[0]
    every = _taylor.refresh_steps(d, num_samples) if every is None else every
    block = min(d, max(num_samples, 8))
    fresh = control.step < 0
    if mode == "taylor":
        # An "auto" run's unused point (its ratio at or above the limit) has no
        # Hessian diagonal: replace it at once.
        unused = control.ratio >= _taylor.AUTO_MAX_RATIO
        return jax.lax.cond(
            (step % every == 0) | fresh | unused,
            lambda: _taylor.reference_at(log_joint, params.loc, step, block),
            lambda: control,
        )
    limit = _taylor.AUTO_MAX_RATIO

    def probe():
        f, mean, z, u, grads = _taylor.probe_draws(
            jax.random.fold_in(key, 1), params, family, log_joint, num_samples)
        # The reference in use (an active one: ratio below the limit; NaN is not)
        # is probed again; an unused one is only replaced.
        was_active = control.ratio < limit
        old = jax.lax.cond(was_active,
                           lambda: _taylor.probe_ratio(f, control.loc, z, u, grads),
                           lambda: jnp.asarray(jnp.inf, control.ratio.dtype))
        keep = was_active & (old < limit) & (
            (step - control.step < every) | _taylor.near_exact(old, num_samples))

        def new():
            ratio = _taylor.probe_ratio(f, mean, z, u, grads)
            return jax.lax.cond(
                ratio < limit,
                lambda: _taylor.reference_at(log_joint, params.loc, step, block, ratio),
                # Not worth it here: no Hessian diagonal, and "auto" leaves it unused.
                lambda: _taylor.TaylorReference(mean, jnp.zeros_like(mean),
                                                jnp.asarray(step, jnp.int32),
                                                ratio.astype(mean.dtype)),
            )

        return jax.lax.cond(keep, lambda: control._replace(ratio=old), new)

    return jax.lax.cond(probe_due(state), probe, lambda: control)


def probe_due(state: FitState) -> jax.Array:
    """Whether an ``"auto"`` step probes its point: every ``PROBE_STEPS`` steps, and when the
    point is a placeholder (``step < 0``)."""
    return (state.step % _taylor.PROBE_STEPS == 0) | (state.control.step < 0)


def make_data_step(
    family,
    model,
    optimizer: optax.GradientTransformation,
    *,
    num_samples: int,
    estimator: str,
    batch_size,
    batching: str,
    local_family=None,
) -> Callable:
    """Returns ``step(state, data) -> (state, info)`` for a :class:`vijax.models.DataModel`.

    As :func:`make_step`, on :func:`vijax.data.data_elbo`'s surrogate: step
    ``t`` draws q's noise from ``fold_in(state.key, t)`` and its minibatch
    (when ``batch_size`` is set) from the batch stream of ``state.key``
    (:func:`vijax.data._objective.step_keys`), and ``info.elbo`` is the
    unbiased estimate of the full-data ELBO. ``state.params`` are the
    family's parameters or a :class:`vijax.data.JointParams`. ``data`` is
    the model's data, passed in (never closed over) so that it can be large
    and sharded. Arguments are assumed checked (:func:`vijax.fit` does).
    """
    from vijax.data._objective import as_joint, batch_elbo, select, step_keys

    def neg_elbo(params, key, batch, scale):
        return -batch_elbo(key, as_joint(params), family, local_family, model, batch, scale,
                           num_samples=num_samples, estimator=estimator)

    loss_and_grad = jax.value_and_grad(neg_elbo)

    def step(state: FitState, data) -> tuple[FitState, FitInfo]:
        mc_key, batch_key = step_keys(state.key, state.step)
        batch, scale = select(batch_key, state.step, model, batch_size, batching, data)
        loss, grads = loss_and_grad(state.params, mc_key, batch, scale)
        return guarded_update(optimizer, state, loss, grads)

    return step
