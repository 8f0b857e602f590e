"""The drivers :func:`fit` and :func:`fit_batched`: check, build the algorithm, run the engine."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.flatten_util import ravel_pytree

from vijax import _checks
from vijax._cache import LRU
from vijax._taylor import check_control, check_family_supports, placeholder
from vijax._objectives import DEFAULT_ESTIMATOR, antithetic_allowed
from vijax._gaussian import LowRankScale
from vijax.families._gaussian import LowRankParams, LowRankPrecisionParams
from vijax.families._protocol import VariationalFamily, check_params
from vijax.fitting._engine import (
    check_resume_key,
    check_run_options,
    compiled_chunk,
    resume_state,
    run,
)
from vijax.fitting._step import (
    check_control_variate,
    check_step_config,
    init_fit_state,
    make_data_step,
    make_step,
)
from vijax.models._data import DataModel
from vijax.fitting._stopping import AdaptiveStop, AutoStop, averaging
from vijax.optim._adaptive import adaptive_lr, check_nesting, find_adaptive
from vijax.fitting._types import FitResult, FitState

ArrayTree = Any


def _check_params(name: str, params: Any, family: VariationalFamily) -> Any:
    if isinstance(params, FitState):
        raise TypeError(
            f"`{name}` must be the family's parameters; got a FitState. To continue a "
            "run, pass the state as `init_params` with `key=None`."
        )
    return check_params(name, params, family)


_inits = LRU(32)


#: The learning rate ``fit``'s default optimizer starts at for a family with
#: two parameters per latent dimension (mean-field); see
#: :func:`default_learning_rate`.
DEFAULT_LEARNING_RATE = 0.1

_defaults = LRU(32)


def _sizes(params: Any) -> tuple[int, int]:
    """``(P, d)``: the parameters' total size, and the latent's (0 where unknown).

    d is the size of ``params.loc``, or of a flow's base Gaussian's
    (``params.base.loc``, :class:`vijax.flows.FlowParams`).
    """
    total = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    loc = getattr(params, "loc", None)
    if loc is None:
        loc = getattr(getattr(params, "base", None), "loc", None)
    d = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(loc)) if loc is not None else 0
    return total, d


def default_learning_rate(params: Any) -> float:
    """The default optimizer's first step: ``0.1 * min(1, sqrt(2 d / P))``, rounded down to 2 digits.

    ``P`` parameters and ``d`` latent dimensions (the size of ``params.loc``,
    or of a flow's base's, else ``P / 2``). Adam moves every parameter by
    about its step, so a step moves q by an amount growing with the
    parameters per latent dimension: the full-rank family (``P / d`` about
    ``d / 2``) at 0.1 and d = 1000 was left hundreds of nats from its optimum
    after 3,000 steps. Scaling by ``sqrt(2 d / P)`` keeps the first steps'
    move per dimension that of the mean-field family at 0.1: 0.1 for
    mean-field, 0.053 for rank 5 plus diagonal, 0.014 for full rank at
    d = 100 (whose factor is stored as a d x d array), 0.0044 at d = 1000.
    A flow's many network weights per latent dimension give it a small step:
    0.002 for ``vijax.flows.affine_coupling()`` (4 layers of width 32) at
    d = 2, near the 0.005 a hand-tuned Adam uses in ``notebooks/06_flows``.
    Flows started at 0.1 before: over three flow types and three keys the
    default fit ended 0.28 to 3e9 nats from the target (KL, where
    ``log Z = 0``) on a banana and on a Gaussian target of a pytree latent
    (d = 7), all 18 fits; at the scaled step all 18 stopped on their own
    within 0.0022 to 0.065 nats (``benchmarks/results/cpu/flows_default_fit.md``;
    ``tests/test_adaptive_lr.py`` runs one).
    """
    total, d = _sizes(params)
    d = d or total / 2
    lr = DEFAULT_LEARNING_RATE * min(1.0, math.sqrt(2.0 * d / max(total, 1)))
    digits = 1 - math.floor(math.log10(lr))
    return math.floor(lr * 10**digits) / 10**digits


#: Monte Carlo draws per step of ``fit`` and ``fit_batched`` when none are given.
DEFAULT_NUM_SAMPLES = 8


def default_num_samples(params: Any) -> int:
    """The default fit's draws per step: 8 up to d = 100, then ``round(8 sqrt(d / 100))``.

    ``d`` is the size of ``params.loc``, or of a flow's base's (25 draws at
    d = 1000, 80 at d = 10^4); 8 for params without either, whose
    parameter count says little about d. Used by ``fit`` when neither ``optimizer``
    nor ``num_samples`` is given. The bias a constant step leaves in the
    iterates (which the default's halvings must remove) grows with the
    gradient noise summed over the dimensions, so more draws let a stage end
    nearer the optimum; the square root keeps a step's cost growing more
    slowly than ``d`` times a draw's. What it gains and costs is measured in
    ``benchmarks/results/cpu/default_fit.md`` (the README's "No tuning").
    """
    d = _sizes(params)[1]
    return max(DEFAULT_NUM_SAMPLES, round(DEFAULT_NUM_SAMPLES * math.sqrt(d / 100)))


#: From this latent dimension on, the default fit draws antithetic pairs.
ANTITHETIC_MIN_DIM = 1000


def default_antithetic(params: Any, family: Any, estimator: str) -> bool:
    """The default fit's draws: antithetic pairs from d = ``ANTITHETIC_MIN_DIM`` (1000) on.

    ``d`` is the size of ``params.loc`` (or of a flow's base's). Pairs only where they are allowed:
    a family with a Gaussian view (``to_gaussian``) and a pathwise estimator
    (:data:`vijax._objectives.ANTITHETIC_ESTIMATORS`); otherwise independent
    draws, without an error. Used by ``fit`` when no ``optimizer`` is given
    and ``antithetic`` is None.

    Why d: a pair ``mu +- L eps`` cancels the part of the mean's gradient
    noise that is odd in ``eps``, which on a posterior close to Gaussian is
    the coupling ``(P - diag P) L eps`` between the dimensions, and that
    grows with d; the scale's gradient gets half as many independent draws.
    With the default optimizer, pairs made every measured fit at d = 1000
    and 10^4 better or no worse except the low-rank family (slower to the
    same gap at d = 1000, further from it at the wall cap at d = 10^4), and
    two below: a full-rank fit at d = 501 and a mean-field one at d = 102
    (``benchmarks/results/cpu/default_fit_antithetic.md``, against
    independent draws in ``default_fit.md`` below d = 1000 and
    ``default_fit_independent.md`` above). The low-rank family now draws in
    fours instead (:func:`vijax._objectives.antithetic_sample`), which
    cancels the noise that held its factor back: its rows in
    ``default_fit.md`` (6574e7b) are 3 to 12 times closer to its optimum,
    except logistic regression at d = 10^4 (6.0 nats at the cap, against
    4.7 with pairs).
    """
    if _sizes(params)[1] < ANTITHETIC_MIN_DIM:
        return False
    return antithetic_allowed(family, estimator)


def default_control_variate(params: Any, family: Any, log_joint: Callable,
                            estimator: str) -> str | None:
    """The default fit's control variate: ``"auto"`` where it can run, else None.

    It can run for a family whose Gaussian view has a diagonal or
    low-rank-plus-diagonal covariance (:func:`vijax.mean_field`,
    :func:`vijax.low_rank`), a pathwise ``estimator``, and a ``log_joint``
    whose Hessian-vector products trace (forward over reverse mode; a
    ``custom_vjp`` inside it does not); the check traces one, abstractly.
    Used by ``fit`` when no ``optimizer`` is given and ``control_variate``
    is None. ``"auto"`` uses the Taylor control variate only where it cuts
    the gradient's variance by more than 4 (:mod:`vijax._taylor`); what it
    changed in the default fit is in ``benchmarks/results/cpu/default_fit.md``.
    """
    if estimator == "score":
        return None
    try:
        check_family_supports(family, params)
        flat, unravel = ravel_pytree(params.loc)

        def hvp(m):
            grad = jax.grad(lambda z: log_joint(unravel(z)))
            return jax.jvp(grad, (m,), (m,))

        jax.eval_shape(hvp, flat)
    except Exception:  # noqa: BLE001 - any failure means: not this model
        return None
    return "auto"


def factor_in_sd_units() -> optax.GradientTransformation:
    """Multiplies the updates of a low-rank factor ``W`` by q's marginal sds, row by row.

    For :class:`vijax.LowRankParams` (``cov = W W^T + diag(sd^2)``): after
    Adam, whose steps are about its learning rate in every entry, row i of
    ``W``'s update is scaled by q's marginal sd ``sqrt(sd_i^2 + |W_i|^2)``
    (``sd_i = softplus(raw_scale_i)``), so ``W`` moves in units of q's scale,
    as the full-rank family's dimensionless factor does. ``W``'s entries are
    about that sd times a dimensionless number (a direction of extra variance
    spread over d coordinates), so an unscaled step can be many times an
    entry at large d (measured in the README's "No tuning"). The marginal sd,
    not the diagonal's: where the optimum puts a coordinate's whole variance
    in ``W`` (its ``sd_i`` heading to 0, as on regressions with fewer
    observations than dimensions), the diagonal's sd gave that row ever
    smaller steps just where it has to grow. Other parameters pass unchanged.
    """

    def scale(updates, params):
        if params is None:
            raise ValueError("factor_in_sd_units needs `params` in update (the current sds).")
        q_scale = LowRankScale(params.cov_factor, jax.nn.softplus(params.raw_scale))
        marginal = jnp.sqrt(q_scale.cov_diag())
        factor = updates.cov_factor * marginal[:, None].astype(updates.cov_factor.dtype)
        return updates._replace(cov_factor=factor)

    return optax.stateless(scale)


def factor_in_precision_units() -> optax.GradientTransformation:
    """Multiplies the updates of a precision factor ``U`` by the roots of q's marginal precisions, row by row.

    For :class:`vijax.LowRankPrecisionParams` (``precision = U U^T +
    diag(sd^-2)``), the counterpart of :func:`factor_in_sd_units`: row i of
    ``U``'s update (after Adam, about its learning rate in every entry) is
    scaled by ``sqrt(sd_i^-2 + |U_i|^2)``, the root of q's precision's
    diagonal, so ``U`` moves in the units its entries are of. Unscaled, the
    default fit's factor stayed near its start, close to a saddle (``U = 0``)
    and about ``1 / sd`` times smaller than where it ends, and the fit stopped
    at the mean-field optimum: on the Poisson GLM (rank 2) 0.059 to 0.061
    nats short over three keys; scaled, 0.0002 to 0.0006 (measured by hand;
    ``tests/test_adaptive_lr.py`` runs one). The marginal precision, not the
    diagonal's, for the reason :func:`factor_in_sd_units` gives. Other
    parameters pass unchanged.
    """

    def scale(updates, params):
        if params is None:
            raise ValueError(
                "factor_in_precision_units needs `params` in update (the current sds).")
        diag = jnp.square(jax.nn.softplus(params.raw_scale))
        marginal = jnp.sqrt(1.0 / diag + jnp.sum(jnp.square(params.prec_factor), axis=1))
        factor = updates.prec_factor * marginal[:, None].astype(updates.prec_factor.dtype)
        return updates._replace(prec_factor=factor)

    return optax.stateless(scale)


def loc_steps_scaled(ratio: float) -> optax.GradientTransformation:
    """Multiplies the updates of q's mean (``params.loc``) by ``ratio``; other parameters pass unchanged.

    For parameters with a ``loc`` field (:class:`vijax.MeanFieldParams`,
    :class:`vijax.LowRankParams`, :class:`vijax.FullRankParams` and any
    NamedTuple like them). The default optimizer chains it after Adam for
    the low-rank family, so that its mean moves at the mean-field family's
    step (:data:`DEFAULT_LEARNING_RATE`) while the covariance's parameters
    move at :func:`default_learning_rate`'s smaller one.
    """
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"`ratio` must be a positive finite number; got {ratio!r}.")

    def scale(updates, params):
        del params
        if getattr(updates, "loc", None) is None or not hasattr(updates, "_replace"):
            raise ValueError("loc_steps_scaled needs parameters with a `loc` field "
                             f"(a NamedTuple such as vijax.MeanFieldParams); got "
                             f"{type(updates).__name__}.")
        loc = jax.tree_util.tree_map(lambda u: u * jnp.asarray(ratio, u.dtype), updates.loc)
        return updates._replace(loc=loc)

    return optax.stateless(scale)


def default_optimizer(params: Any = None) -> optax.GradientTransformation:
    """``fit``'s optimizer when none is given: ``adaptive_lr(optax.adam(default_learning_rate(params)))``.

    For the low-rank family (:class:`vijax.LowRankParams`), two scalings
    follow Adam. The factor's updates are multiplied by q's marginal sds
    (:func:`factor_in_sd_units`). For the low-rank precision family
    (:class:`vijax.LowRankPrecisionParams`), Adam's steps on its factor are
    multiplied by the roots of q's marginal precisions
    (:func:`factor_in_precision_units`). The low-rank family's mean's are multiplied by
    ``DEFAULT_LEARNING_RATE / default_learning_rate(params)``
    (:func:`loc_steps_scaled`), so the mean moves at the mean-field family's
    step, 0.1, while the diagonal and the factor move at 0.053: the mean has
    d parameters in every family, and at 0.053 it was the slow part of
    low-rank fits at large d. The full-rank family keeps one step for all
    its parameters: its mean at 0.1 (23 times its factor's step at d = 1000)
    made BLR's fit slower, not faster. What each choice measured is in the
    README's "No tuning" and ``benchmarks/results/cpu/default_fit.md``. One
    object per learning rate and kind, so that repeated fits reuse the
    compiled chunk.
    """
    lr = DEFAULT_LEARNING_RATE if params is None else default_learning_rate(params)
    if isinstance(params, LowRankParams):
        return _defaults.get((lr, "low_rank"), lambda: adaptive_lr(optax.chain(
            optax.adam(lr), factor_in_sd_units(),
            loc_steps_scaled(DEFAULT_LEARNING_RATE / lr))))
    if isinstance(params, LowRankPrecisionParams):
        return _defaults.get((lr, "low_rank_precision"), lambda: adaptive_lr(optax.chain(
            optax.adam(lr), factor_in_precision_units())))
    return _defaults.get(lr, lambda: adaptive_lr(optax.adam(lr)))


def _holds_adaptive(optimizer, params) -> bool:
    """Whether ``optimizer``'s state holds a :func:`vijax.adaptive_lr` (checked: one, not averaged inside)."""
    return check_nesting(jax.eval_shape(optimizer.init, params))


def _init_state(optimizer, batch: str, key, params) -> FitState:
    """``init_fit_state``, compiled once per optimizer.

    ``batch`` is ``"none"`` (one run), ``"shared"`` (a batch of keys, one set
    of params) or ``"stacked"`` (keys and params batched). Eager, optax's
    ``init`` dispatches one small op per state leaf: about a millisecond per
    fit, which a short fit of a small model notices.
    """

    def build():
        def init(key, params):
            return init_fit_state(key, params, optimizer)

        if batch != "none":
            init = jax.vmap(init, in_axes=(0, 0 if batch == "stacked" else None))
        return jax.jit(init)

    return _inits.get((optimizer, batch), build)(key, params)


def _run(family, log_joint, optimizer, num_samples, estimator, state, options, batched,
         stopper=None, antithetic=False, control_variate=None):
    compiled = compiled_chunk(
        ("fit", family, log_joint, optimizer, num_samples, estimator, antithetic,
         control_variate),
        lambda: make_step(
            family, log_joint, optimizer, num_samples=num_samples, estimator=estimator,
            antithetic=antithetic, control_variate=control_variate,
        ),
        chunk_size=options.chunk_size,
        max_nonfinite=options.max_nonfinite,
        batched=batched,
    )
    return run(compiled, state, options, batched=batched, stopper=stopper)


def _check_state(state: FitState, family, optimizer, batched: bool) -> FitState:
    """Checks that a FitState to continue from matches the family and optimizer."""
    params = state.params
    if batched:
        params = jax.tree_util.tree_map(lambda a: a[0], params)
    _check_params("init_params.params", params, family)
    _check_opt_state(state, optimizer, params)
    return resume_state(state, batched)


def _check_opt_state(state: FitState, optimizer, params) -> None:
    """Raises unless ``state.opt_state`` has the structure ``optimizer.init(params)`` gives."""
    want = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, params))
    got = jax.tree_util.tree_structure(state.opt_state)
    if want != got:
        raise ValueError(
            "`init_params.opt_state` does not match `optimizer`: expected the "
            f"structure {want}; got {got}. Continue a run with the optimizer it "
            "was started with."
        )


def _check_stacked(name: str, params: Any, size: int) -> Any:
    """The first member of ``params``; raises unless every leaf has a leading batch axis of ``size``."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
             for leaf in jax.tree_util.tree_leaves(params)}
    if sizes != {size}:
        raise ValueError(
            f"`{name}` must have a leading batch axis of size {size} "
            f"(the number of keys) on every leaf; got sizes {sorted(map(str, sizes))}."
        )
    return jax.tree_util.tree_map(lambda a: a[0], params)


def fit(
    key: jax.Array | None,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Any,
    *,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int,
    num_samples: int | None = None,
    estimator: str | None = None,
    antithetic: bool | None = None,
    progress: bool | None = None,
    chunk_size: int = 500,
    max_nonfinite: int = 20,
    tol: float | None = None,
    window: int = 100,
    patience: int = 3,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    auto_stop: bool | None = None,
    batch_size: int | None = None,
    batching: str = "epoch",
    local_family: Any = None,
    control_variate: str | bool | None = None,
) -> FitResult:
    """Returns the result of maximizing the ELBO over ``family`` with ``optimizer``.

    Minimizes ``-vijax.elbo`` with any optax transformation. The steps run in
    a compiled loop over chunks of ``chunk_size`` steps (one ``jit``-compiled
    scan per chunk); between
    chunks the host updates the progress bar, writes checkpoints and tests the
    stopping rules. The compiled chunk is cached: calling ``fit`` again with
    the same family, log joint, optimizer, ``num_samples``, ``estimator``,
    ``chunk_size`` and ``max_nonfinite`` (the same objects) and parameters of
    the same shapes does not trace or compile again, whatever ``num_steps``.

    Step ``t`` draws its noise from ``fold_in(key, t)``, so a run continued
    from ``result.state`` (or a checkpoint) gives bitwise the same parameters
    as an uninterrupted run, whatever the chunk sizes.

    NaN safety: a step whose loss or gradient is not finite leaves the
    parameters and optimizer state unchanged, and one whose updated
    parameters are not finite leaves the parameters unchanged (see
    :func:`make_step`). Both are counted in ``trace.skipped``; after
    ``max_nonfinite`` consecutive such steps the fit stops and raises
    :class:`FitError` (naming the step, carrying the last finite state).
    Returned parameters are always finite.

    Early stopping (``tol`` not None), checked after each chunk: the running
    mean ELBO over the last ``window`` steps is compared with the best one
    seen at earlier checks; a check that does not improve it by at least
    ``tol * |best|`` is a stall, and ``patience`` stalls in a row stop the fit.
    The rule is tested once per chunk, so its granularity is ``chunk_size``
    steps: lower ``chunk_size`` for a finer one.

    Automatic stopping (``auto_stop=True``; ``num_steps`` is then the most
    steps): a rule with nothing to tune, measured in nats. The optimizer is
    wrapped in a polynomial-decay iterate average (``vijax.iterate_average(
    optimizer, start=0, eta=3, space=family.average_space)``, unless it holds
    one already; the mean-field and low-rank families average their
    variances, not their softplus inverse, which a constant step's jitter
    would bias), and at steps
    growing by 5% the better of the average and the last iterate is scored
    against earlier candidates on common draws (fresh at each check, more of
    them while the decision is in doubt). The fit stops when the ELBO gained over the last
    third of the steps, and the gap to the optimum extrapolated from the last
    two such gains, are below 0.05 nats (with a margin of 2 standard
    errors; see :mod:`vijax.fitting._stopping`). ``result.params`` is then
    the better of the average and the last iterate (``result.state.params``
    is still the last iterate, and ``vijax.averaged_params(result)`` the
    average). It stops once q is within about 0.1 nats of the family's
    optimum when the learning rate lets the fit get there; with a learning
    rate too large for that, it stops at the optimizer's noise floor. A
    continued run starts its reference points afresh, so it checks for
    convergence only after the steps so far have grown by a factor of about
    2.25.

    Default optimizer (``optimizer=None``): Adam whose step the automatic
    stopping rule halves, as in RAABBVI (Welandawe et al. 2022):
    ``vijax.adaptive_lr(optax.adam(lr))`` with ``auto_stop``, from
    ``lr = 0.1`` for mean-field, lower for families with more parameters per
    latent dimension (``0.1 * sqrt(2 d / P)``: 0.014 for full rank at
    d = 100; :func:`vijax.fitting._drivers.default_learning_rate`); for the
    low-rank family, Adam's steps on the factor ``W`` are scaled by q's
    marginal sds (:func:`vijax.fitting._drivers.factor_in_sd_units`) and
    its mean's kept at 0.1 (:func:`vijax.fitting._drivers.loc_steps_scaled`). The run is cut
    into stages at a constant step; a stage ends where the rule above, at
    0.35 times its tolerance (0.0175 nats, judged on the point estimates
    where 4096 draws leave it in doubt), finds the iterates stationary (and
    runs at least 500 steps, and at least as long as the stage before); the step
    is then halved and the run restarts from the stage's
    candidate, with a fresh average. The fit stops when a stage gains less
    than 0.025 nats on the one before (the bias a constant step leaves
    shrinks with the step, so the next halving would gain about half as
    much), and returns the better of the two. Any optimizer wrapped in
    :func:`vijax.adaptive_lr` runs this way. The default draws per step
    grow with d above d = 100 (``num_samples=None``; 25 at d = 1000), and
    from d = 1000 on they come in antithetic pairs (``antithetic=None``;
    :func:`vijax.fitting._drivers.default_antithetic`).
    ``num_steps`` is the most steps (a ``RuntimeWarning`` says when they
    ran out before the rule stopped the fit, here and under ``auto_stop``);
    ``vijax.optim.learning_rate_scale(result)`` is the final step's factor;
    a continued run starts a new stage at the step it had reached.
    For the mean-field and low-rank families the default also uses the
    Taylor control variate where it pays (``control_variate=None`` means
    ``"auto"`` there; :func:`vijax.fitting._drivers.default_control_variate`).
    The measured steps and accuracy, on the zoo and on regressions up to
    d = 10^4, are in ``benchmarks/results/cpu/default_fit.md``. Not for
    ``vijax.natural_gradient``, whose step is not a last factor, and not
    for data models or :func:`fit_batched` yet (no ``auto_stop`` there).
    Where the model gives ``E_q[log p(x, z)]`` without sampling
    (``model.expected_log_joint``: the conjugate models, logistic
    regression, the Poisson GLM), :func:`vijax.fit_exact` maximizes the exact ELBO with
    L-BFGS instead: no Monte Carlo noise and nothing to tune (measured
    beside this in ``benchmarks/results/cpu/exact_fit.md``).

    ``KeyboardInterrupt`` during a fit is caught: ``fit`` returns the result
    of the last completed chunk with ``result.interrupted = True`` (and a
    ``RuntimeWarning``), which can be continued like any other.

    For many seeds at once, in one compiled loop, see :func:`fit_batched`.

    Data models (``log_joint`` a :class:`vijax.models.DataModel`, from
    :func:`vijax.models.data_model`): the model's data is an argument of the
    compiled loop (one compilation for any data of the same shapes), and

    * ``batch_size=B`` draws a minibatch of ``B`` rows per step inside the
      loop (``batching="epoch"``: without replacement within each epoch of
      ``n // B`` steps, through a keyed pseudo-random permutation that never
      builds an ``n``-sized array; ``"with_replacement"``: ``B`` uniform
      draws) and scales the likelihood by ``n / B``, so the gradient is
      unbiased for every family and estimator and ``trace.elbo`` holds
      unbiased estimates of the *full-data* ELBO (noisier than full-batch
      ones). ``batch_size=None`` uses all the data every step;
    * model parameters ``theta`` are learned with q: pass
      ``init_params=vijax.data.JointParams(q=family.init(model.latent),
      theta=model.theta)``; ``optimizer`` is one optax transformation for
      all, or a dict with one per group (``{"q": ..., "theta": ...}``);
    * local latents take ``local_family=`` (an amortized family,
      :func:`vijax.families.amortized`) with its encoder's parameters in
      ``JointParams.encoder``; ``family`` is ``None`` when the model has no
      global latent (a VAE);
    * data sharded over a mesh (:func:`vijax.data.shard`) is used where it
      lies: the state is replicated on the mesh and XLA partitions the sum.

    ``auto_stop`` is not available for data models yet (use ``tol``);
    :func:`fit_batched` takes them (the data shared by every member).

    Args:
      key: the run's PRNG key (typed or legacy uint32); ``None`` when
        continuing from a :class:`FitState`.
      family: a :class:`vijax.VariationalFamily`.
      log_joint: ``log_joint(z) -> scalar``, the unnormalized log p(x, z) of
        one latent pytree. Keep the same function object between calls to
        reuse the compiled loop.
      init_params: the family's initial parameters (``family.init(latent)``),
        or a :class:`FitState` (``result.state``, :func:`load_checkpoint`) to
        continue a run.
      optimizer: an ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-2)``),
        or ``None`` (the default) for vijax's default, which needs no tuning:
        ``vijax.adaptive_lr(optax.adam(lr))`` with ``auto_stop`` (see
        "Default optimizer" above). Required for data models.
      num_steps: the number of steps to run in this call (>= 1); when
        continuing, the number of further steps.
      num_samples: Monte Carlo draws per step (>= 1), or ``None`` (the
        default): 8, and with the default optimizer more as the latent
        dimension grows (:func:`vijax.fitting._drivers.default_num_samples`:
        8 up to d = 100, 25 at d = 1000, 80 at d = 10^4).
      estimator: the gradient estimator, as in :func:`vijax.elbo` (default
        ``"adaptive_stl"``: unbiased, its noise vanishes near a Gaussian
        posterior, so Adam settles far closer to it than with ``"reparam"``,
        and it stays tame far from it, where plain ``"stl"`` can drive a
        full-rank factor singular; ``"closed_entropy"`` with a
        ``control_variate``).
      antithetic: draw each step's samples in pairs reflected through q's
        mean, ``mu +- L eps`` (see :func:`vijax.elbo`), for a family with a
        Gaussian view and a pathwise estimator. It removes the noise of the
        mean's gradient that is odd in ``eps`` (all of it on a Gaussian
        posterior) and doubles at most that of the scale's. ``None`` (the
        default): pairs in the default fit (no ``optimizer``) from d = 1000
        on, where the family and estimator allow them
        (:func:`vijax.fitting._drivers.default_antithetic`), else
        independent draws; False or True to choose. What pairs gain and cost
        with the default optimizer at every d measured is in
        ``benchmarks/results/cpu/default_fit_antithetic.md``. The auto_stop
        rule scores its candidates on antithetic pairs whatever this says.
        Not for data models yet (``None`` means False there).
      progress: show a tqdm progress bar (a widget in notebooks)
        with the step and running ELBO; ``None`` (default) shows it when
        stderr is a terminal or in a Jupyter kernel.
      chunk_size: steps per compiled chunk (>= 1). Larger chunks lower the
        host overhead; smaller ones refresh the bar, checkpoints and stopping
        rule more often.
      max_nonfinite: consecutive non-finite steps allowed before ``FitError``.
      tol: relative tolerance of the early-stopping rule; ``None`` disables it.
      window: steps in the running mean used by the stopping rule and the bar.
      patience: consecutive stalled checks that stop the fit.
      checkpoint_dir: a directory to save the state in
        (``checkpoint_dir/fit_state.npz``, data only, written atomically) at the end of
        the fit, on interruption or any error (the last finished chunk), and
        every ``checkpoint_every`` steps. Made if missing and checked writable
        before the first step; a final save that fails warns and the result
        is still returned.
      checkpoint_every: save at the first chunk boundary at least this many
        steps after the previous save (needs ``checkpoint_dir``).
      auto_stop: stop automatically when converged (see above); not
        together with ``tol``. Continue such a run with ``auto_stop=True``
        too (the optimizer state holds the average). ``None`` (the default)
        means True when ``optimizer`` holds a :func:`vijax.adaptive_lr` (as
        the default optimizer does) and ``tol`` is None, else False.
      batch_size: data models only: rows per step (``1 <= B <= n``), or
        ``None`` for the full data.
      batching: data models only: ``"epoch"`` or ``"with_replacement"``.
      local_family: data models with local latents only: the amortized
        family of ``q(z_i | x_i)``.
      control_variate: ``"taylor"``: subtract from ``log p`` its
        second-order expansion at a reference point and add back its exact
        expectation (:func:`vijax.elbo`'s ``control``; :mod:`vijax._taylor`).
        Still unbiased; with the closed-form entropy (the estimator it
        defaults to) the gradient is exact on a Gaussian posterior, and near
        one its noise shrinks with how far ``log p`` is from quadratic over
        q. Each draw costs a Hessian-vector product more (about twice the
        step), and the reference point moves to q's mean every
        ``max(50, 10 ceil(d / num_samples))`` steps (``d`` Hessian-vector
        products each time; kept in ``result.state.control``). Where the
        expansion is poor (far from q's mean, or ``log p`` far from
        quadratic over q) it can add noise instead. ``"auto"``: the same
        where it pays, and the plain ``estimator`` elsewhere: every 50 steps
        a probe on ``num_samples`` fresh draws measures the share of the
        gradient's variation over q that the expansion leaves
        (``result.state.control.ratio``), and the control variate is used
        (with ``"closed_entropy"``) while that share is below a quarter
        (:data:`vijax._taylor.AUTO_MAX_RATIO`), on one draw instead of
        ``num_samples`` while that share times ``num_samples`` is at most 0.01
        (:data:`vijax._taylor.ONE_DRAW_MAX_NOISE`: the gradient is then as good
        as exact, as on a Gaussian posterior, and more draws buy nothing); a
        new point is taken when the share at the current one is not below a
        quarter, or after the interval above unless one draw is enough. For
        the mean-field and low-rank families and a ``log_joint`` that
        differentiates in forward mode; not for data models. ``False``: none.
        None (the default): ``"auto"`` in the default fit (no ``optimizer``)
        where it can run (:func:`vijax.fitting._drivers.default_control_variate`),
        else none.

    Returns:
      A :class:`FitResult`: ``params``, ``state`` (to continue), ``trace``
      (a :class:`FitInfo` of NumPy arrays over the steps run),
      ``num_skipped``, ``interrupted``, ``stopped_early``.

    Raises:
      TypeError: ``optimizer`` is not an optax transformation, ``family`` or
        ``log_joint`` has the wrong type, or ``init_params`` do not match the
        family.
      ValueError: ``num_steps``, ``num_samples``, ``chunk_size``,
        ``max_nonfinite``, ``window`` or ``patience`` below 1, an unknown
        ``estimator``, non-finite ``init_params``, a ``key`` given together
        with a :class:`FitState`, or an :func:`vijax.adaptive_lr` optimizer
        with ``auto_stop=False`` or ``tol``.
      FitError: ``max_nonfinite`` consecutive non-finite steps.

    Example:
      >>> import jax, optax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.mean_field()
      >>> result = vijax.fit(
      ...     jax.random.key(0), family, model.log_joint, family.init(model.latent),
      ...     optimizer=optax.adam(1e-2), num_steps=1000, progress=False)
      >>> more = vijax.fit(None, family, model.log_joint, result.state,
      ...     optimizer=optax.adam(1e-2), num_steps=500, progress=False)
      >>> auto = vijax.fit(  # the default: nothing to tune, num_steps a ceiling
      ...     jax.random.key(1), family, model.log_joint, family.init(model.latent),
      ...     num_steps=20000, progress=False)
      >>> bool(auto.stopped_early), vijax.optim.learning_rate_scale(auto) < 1
      (True, True)
    """
    run_options = dict(
        num_steps=num_steps, chunk_size=chunk_size, max_nonfinite=max_nonfinite,
        progress=progress, tol=tol, window=window, patience=patience,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
    )
    if estimator is None:
        estimator = "closed_entropy" if control_variate == "taylor" else DEFAULT_ESTIMATOR
    if isinstance(log_joint, DataModel):
        if control_variate not in (None, False):
            raise ValueError(
                "`control_variate` is not supported for a data model (vijax.models."
                f"DataModel) yet; got control_variate={control_variate!r}.")
        _no_antithetic_for_data(antithetic, allow_none=True)
        return _fit_data(
            key, family, log_joint, init_params, optimizer=optimizer,
            num_samples=DEFAULT_NUM_SAMPLES if num_samples is None else num_samples,
            estimator=estimator, run_options=run_options, auto_stop=auto_stop,
            batch_size=batch_size, batching=batching, local_family=local_family,
        )
    _no_data_options(batch_size, batching, local_family)
    if control_variate is not False:
        check_control_variate(control_variate, estimator)
    resuming = isinstance(init_params, FitState)
    start = init_params.params if resuming else init_params
    default = optimizer is None
    if default:
        optimizer = default_optimizer(start)
    if num_samples is None:
        num_samples = default_num_samples(start) if default else DEFAULT_NUM_SAMPLES
    if antithetic is None:
        antithetic = default and default_antithetic(start, family, estimator)
    if control_variate is None and default:
        control_variate = default_control_variate(start, family, log_joint, estimator)
    control_variate = control_variate or None  # False (or no default): none; checked above
    family, log_joint, optimizer, num_samples = check_step_config(
        family, log_joint, optimizer, num_samples, estimator, antithetic
    )
    options = check_run_options(**run_options)
    example = _check_params("init_params.params" if resuming else "init_params", start, family)
    adaptive = _holds_adaptive(optimizer, example)
    if auto_stop is None:
        auto_stop = adaptive and options.tol is None
    if not isinstance(auto_stop, bool):
        raise TypeError(f"`auto_stop` must be a bool or None; got {auto_stop!r}.")
    if auto_stop and options.tol is not None:
        raise ValueError(
            "`tol` and `auto_stop=True` are two stopping rules; pass one of them "
            f"(got tol={options.tol!r})."
        )
    if adaptive and not auto_stop:
        raise ValueError(
            "`optimizer` holds a vijax.adaptive_lr (the default optimizer does), whose "
            "step only the auto_stop rule lowers; pass auto_stop=True or None (not "
            f"auto_stop={auto_stop!r}, tol={options.tol!r}), or an optimizer without it "
            "(e.g. optax.adam(1e-2))."
        )
    if auto_stop:
        optimizer = averaging(optimizer, example, family)
    if resuming:
        check_resume_key("key", key)
        state = _check_state(init_params, family, optimizer, batched=False)
    else:
        key = _checks.typed_key("key", key)
        params = _check_params("init_params", init_params, family)
        state = _init_state(optimizer, "none", key, params)
    state = _with_control(state, control_variate, family, estimator)
    stopper = None
    if adaptive:
        stopper = AdaptiveStop(family, log_joint, state.key, int(state.step), state.params)
    elif auto_stop:
        stopper = AutoStop(family, log_joint, state.key)
    result = _run(family, log_joint, optimizer, num_samples, estimator, state, options, False,
                  stopper, antithetic, control_variate)
    if stopper is not None and not (result.stopped_early or result.interrupted):
        warnings.warn(
            f"vijax.fit ran its num_steps={options.num_steps} steps before its stopping rule "
            "found the fit converged (`result.stopped_early` is False), so q may be short of "
            "the family's optimum. `num_steps` is a ceiling here: give more, or continue "
            "with vijax.fit(None, family, log_joint, result.state, num_steps=...).",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def _with_control(state: FitState, control_variate, family, estimator: str) -> FitState:
    """``state`` with a control-variate reference where ``fit`` uses one (a placeholder
    the first step replaces), checked when a resumed state brings its own; None otherwise."""
    if control_variate is None:
        return state._replace(control=None)
    if state.control is None:
        check_family_supports(family, state.params)
        return state._replace(control=placeholder(state.params.loc))
    check_control(state.control, family, state.params, estimator, "init_params.control")
    return state


def _no_antithetic_for_data(antithetic, *, allow_none: bool = False) -> None:
    """Raises for ``antithetic=True`` with a data model (not supported there yet).

    ``fit``'s default, None, means independent draws there (``allow_none``).
    """
    if antithetic is None and allow_none:
        return
    if not isinstance(antithetic, bool):
        raise TypeError(
            f"`antithetic` must be a bool{' or None' if allow_none else ''}; got {antithetic!r}."
        )
    if antithetic:
        raise ValueError(
            "`antithetic=True` is not supported for data models (vijax.models.data_model) "
            f"yet; got antithetic={antithetic!r}. Pass the model's log_joint instead."
        )


def _no_data_options(batch_size, batching, local_family) -> None:
    """Raises when a data-model option is given with a plain log joint."""
    for name, value, default in (("batch_size", batch_size, None),
                                 ("local_family", local_family, None),
                                 ("batching", batching, "epoch")):
        if value is not default:
            raise ValueError(
                f"`{name}` is for data models (`log_joint` a vijax.models.DataModel, from "
                f"vijax.models.data_model); got {name}={value!r} with a plain log joint."
            )


_groups = LRU(32)


def group_optimizer(optimizer: Any, params: Any) -> optax.GradientTransformation:
    """One optax transformation, or a dict of one per JointParams group (:func:`_by_group`)."""
    from vijax.data._objective import GROUPS, JointParams

    if not isinstance(optimizer, dict):
        return _checks.check_optimizer(optimizer)
    if not isinstance(params, JointParams):
        raise TypeError(
            "`optimizer` as a dict (one per group) needs `init_params` to be "
            f"vijax.data.JointParams; got {type(params).__name__}."
        )
    present = tuple(g for g in GROUPS if getattr(params, g) is not None)
    if set(optimizer) != set(present):
        raise ValueError(
            f"`optimizer` as a dict must have one entry per group of `init_params`: "
            f"{sorted(present)}; got {sorted(map(str, optimizer))}."
        )
    items = tuple((g, _checks.check_optimizer(optimizer[g], f"optimizer[{g!r}]"))
                  for g in present)
    return _groups.get(items, lambda: _by_group(items))


def _by_group(items: tuple) -> optax.GradientTransformation:
    """Each group's transformation on its own field of :class:`vijax.JointParams`.

    Its params, updates and state are that field's alone (not the whole tree
    with the other groups masked, as ``optax.multi_transform`` passes them), so
    a transformation that reads its parameters' type sees q's own:
    ``{"q": vijax.natural_gradient(family, ...), "theta": optax.adam(...)}``
    (natural gradient on q, Adam on the model's parameters) failed with
    multi_transform on a JointParams it did not expect.
    """

    def init(params):
        return {g: opt.init(getattr(params, g)) for g, opt in items}

    def update(updates, state, params=None):
        new_updates, new_state = {}, {}
        for g, opt in items:
            new_updates[g], new_state[g] = opt.update(
                getattr(updates, g), state[g], None if params is None else getattr(params, g))
        return updates._replace(**new_updates), new_state

    return optax.GradientTransformation(init, update)


def _fit_data(key, family, model, init_params, *, optimizer, num_samples, estimator,
              run_options, auto_stop, batch_size, batching, local_family,
              batched=False, params_batched=False) -> FitResult:
    """:func:`fit` (and, with ``batched``, :func:`fit_batched`) on a :class:`vijax.models.DataModel`."""
    from vijax.data._batching import check_batch_size, check_batching
    from vijax.data._objective import check_setup
    from vijax.data._sharding import as_auto, data_mesh, replicate
    from vijax._objectives import ADAPTIVE_ESTIMATORS, ELBO_ESTIMATORS, check_estimator

    if auto_stop is None:
        auto_stop = False
    if not isinstance(auto_stop, bool):
        raise TypeError(f"`auto_stop` must be a bool or None; got {auto_stop!r}.")
    if auto_stop:
        raise ValueError(
            "`auto_stop=True` is not available for data models yet; stop with `tol` or "
            "`num_steps`."
        )
    if optimizer is None:
        raise ValueError(
            "`optimizer` must be given for data models (the default, an adaptive "
            "learning rate lowered by auto_stop, is not available for them yet); "
            "e.g. optimizer=optax.adam(1e-2)."
        )
    resuming = isinstance(init_params, FitState)
    name = "init_params.params" if resuming else "init_params"
    params = init_params.params if resuming else init_params
    stacked = batched and (resuming or params_batched)
    if stacked:
        # The batch size: the keys' (checked below) or, when resuming, the state's.
        size = (jnp.shape(init_params.step)[0] if resuming
                else jax.tree_util.tree_leaves(params)[0].shape[0])
        params = _check_stacked(name, params, size)
    family, local_family = check_setup(family, model, local_family, params, name)
    optimizer = group_optimizer(optimizer, params)
    if _holds_adaptive(optimizer, params):
        raise ValueError(
            "`optimizer` holds a vijax.adaptive_lr, whose step only fit's auto_stop "
            "rule lowers, and auto_stop is not available for data models yet; pass an "
            "optimizer without it (e.g. optax.adam(1e-2))."
        )
    num_samples = _checks.check_positive_int("num_samples", num_samples)
    check_estimator(estimator, ELBO_ESTIMATORS + ADAPTIVE_ESTIMATORS)
    batch_size = check_batch_size(batch_size, model.num_data)
    batching = check_batching(batching, batch_size)
    options = check_run_options(**run_options)
    key_name = "keys" if batched else "key"
    if resuming:
        check_resume_key(key_name, key)
        _check_opt_state(init_params, optimizer, params)
        state = resume_state(init_params, batched)
    else:
        key = _checks.typed_key(key_name, key, 1 if batched else 0)
        if stacked:
            _check_stacked("init_params", init_params, key.shape[0])
        mode = ("stacked" if stacked else "shared") if batched else "none"
        state = _init_state(optimizer, mode, key, init_params)
    data = model.data
    mesh = data_mesh(data)
    if mesh is not None:
        data = as_auto(data)
        mesh = data_mesh(data)
        state = replicate(state, mesh)
    compiled = compiled_chunk(
        ("fit_data", family, local_family, model.log_lik, model.log_prior, model.num_data,
         model.latent is None, model.theta is None, model.local_latent is None,
         optimizer, num_samples, estimator, batch_size, batching),
        lambda: make_data_step(
            family, model, optimizer, num_samples=num_samples, estimator=estimator,
            batch_size=batch_size, batching=batching, local_family=local_family,
        ),
        chunk_size=options.chunk_size,
        max_nonfinite=options.max_nonfinite,
        batched=batched,
        num_args=1,
    )
    return run(compiled, state, options, batched=batched, args=(data,))


def fit_batched(
    keys: jax.Array | None,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Any,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    params_batched: bool = False,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    estimator: str = DEFAULT_ESTIMATOR,
    antithetic: bool = False,
    progress: bool | None = None,
    chunk_size: int = 500,
    max_nonfinite: int = 20,
    tol: float | None = None,
    window: int = 100,
    patience: int = 3,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    batch_size: int | None = None,
    batching: str = "epoch",
    local_family: Any = None,
) -> FitResult:
    """Returns the results of one fit per key, run together in one compiled loop.

    ``jax.vmap`` of :func:`fit`'s chunk over a batch of runs: a sweep over
    seeds (and, with ``params_batched=True``, over initial parameters) costs
    one compilation. Member ``b`` gives the same parameters as
    ``fit(keys[b], ..., init_params[b])`` up to floating-point reassociation.

    Everything in the result has a leading batch axis: ``params``, ``state``
    (continue with ``fit_batched(None, ..., result.state, ...)``), and
    ``trace`` fields of shape ``(B, steps)``; ``num_skipped`` is an array of
    shape ``(B,)``. ``FitError`` is raised as soon as any member reaches
    ``max_nonfinite`` consecutive non-finite steps (members that stopped have
    ``skipped = True`` and NaN entries in the trace after their last step).
    Early stopping stops the batch when the batch-mean running ELBO stalls.

    Args:
      keys: an array of B keys (e.g. ``jax.random.split(key, B)``), typed or
        legacy uint32 of shape (B, 2); ``None`` when continuing from a
        batched :class:`FitState`.
      family, log_joint, optimizer, num_steps, num_samples, estimator,
        antithetic, progress, chunk_size, max_nonfinite, tol, window, patience,
        checkpoint_dir, checkpoint_every, batch_size, batching,
        local_family: as in :func:`fit` (a data model's data is shared by
        every member; each member draws its own minibatches).
      init_params: the initial parameters shared by every member, or (with
        ``params_batched=True``) stacked along a leading axis of size B, or a
        batched :class:`FitState` to continue.
      params_batched: whether ``init_params`` carry a leading batch axis.

    Returns:
      A batched :class:`FitResult`.

    Raises:
      As :func:`fit`; ValueError also when the batch sizes of ``keys`` and
      ``init_params`` differ.

    Example:
      >>> import jax, optax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.mean_field()
      >>> res = vijax.fit_batched(
      ...     jax.random.split(jax.random.key(0), 4), family, model.log_joint,
      ...     family.init(model.latent), optimizer=optax.adam(1e-2),
      ...     num_steps=500, progress=False)
      >>> res.trace.elbo.shape
      (4, 500)
    """
    run_options = dict(
        num_steps=num_steps, chunk_size=chunk_size, max_nonfinite=max_nonfinite,
        progress=progress, tol=tol, window=window, patience=patience,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
    )
    if isinstance(log_joint, DataModel):
        if not isinstance(params_batched, bool):
            raise TypeError(f"`params_batched` must be a bool; got {params_batched!r}.")
        _no_antithetic_for_data(antithetic)
        return _fit_data(
            keys, family, log_joint, init_params, optimizer=optimizer, num_samples=num_samples,
            estimator=estimator, run_options=run_options, auto_stop=False, batch_size=batch_size, batching=batching,
            local_family=local_family, batched=True, params_batched=params_batched,
        )
    _no_data_options(batch_size, batching, local_family)
    family, log_joint, optimizer, num_samples = check_step_config(
        family, log_joint, optimizer, num_samples, estimator, antithetic
    )
    if not isinstance(params_batched, bool):
        raise TypeError(f"`params_batched` must be a bool; got {params_batched!r}.")
    options = check_run_options(**run_options)
    resuming = isinstance(init_params, FitState)
    if not resuming:
        keys = _checks.typed_key("keys", keys, batch_ndim=1)
        if params_batched:
            example = _check_stacked("init_params", init_params, keys.shape[0])
        else:
            example = init_params
        _check_params("init_params", example, family)
    # Refused before any work (no optimizer state is built for it).
    opt_state = (init_params.opt_state if resuming
                 else jax.eval_shape(optimizer.init, example))
    if find_adaptive(opt_state):
        raise ValueError(
            "`optimizer` holds a vijax.adaptive_lr, whose step only vijax.fit's auto_stop "
            "rule lowers, and fit_batched has no auto_stop; pass an optimizer without it "
            "(e.g. optax.adam(1e-2)), or run vijax.fit per seed."
        )
    if resuming:
        check_resume_key("keys", keys)
        state = _check_state(init_params, family, optimizer, batched=True)
    else:
        batch = "stacked" if params_batched else "shared"
        state = _init_state(optimizer, batch, keys, init_params)
    return _run(family, log_joint, optimizer, num_samples, estimator, state, options, True,
                antithetic=antithetic)
