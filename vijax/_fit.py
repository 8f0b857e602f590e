"""Fitting a variational family with optax: :func:`fit` and its types.

``fit`` minimizes ``-vijax.elbo`` with any optax transformation. The loop is
compiled: a scan over a chunk of steps (``lax.scan``'s lowering, a
``while_loop`` stacking per-step infos, with a dynamic trip count), called from the host once per
chunk, so that between chunks the host can update a progress bar, write a
checkpoint and test the stopping rules, while the steps themselves run with
no Python in the way. The pieces are public and pure for those who want to
write their own loop: :func:`make_step` (one guarded step) and
:func:`init_fit_state`.

Types come in the blackjax pairing: :class:`FitState` is carried from step to
step (and is all a run needs to continue), :class:`FitInfo` is per step and
stacked by the scan into :attr:`FitResult.trace`.
"""

from __future__ import annotations

import collections
import functools
import os
import pickle
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax import _checks
from vijax._families import VariationalFamily
from vijax._objectives import DEFAULT_ESTIMATOR, ELBO_ESTIMATORS, _check_estimator, elbo

ArrayTree = Any


class FitState(NamedTuple):
    """Everything needed to continue a fit: the carry of the compiled loop.

    Attributes:
      params: the family's parameters after ``step`` steps.
      opt_state: the optax optimizer state.
      step: the number of steps taken so far (int32 scalar array).
      key: the run's base PRNG key (typed); step ``t`` uses
        ``jax.random.fold_in(key, t)``, so results depend only on the state,
        never on how the run was cut into chunks or resumed.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


class FitInfo(NamedTuple):
    """Per-step diagnostics, stacked by ``lax.scan`` into the fit's trace.

    Attributes:
      elbo: the Monte Carlo ELBO estimate at the step's parameters (before
        the update; larger is better). Non-finite when the step was skipped
        for a non-finite loss or gradient; finite when only the update was.
      grad_norm: the global L2 norm of the ELBO gradient estimate.
      skipped: whether the step was skipped: the loss or gradient was not
        finite (the parameters and optimizer state were left unchanged), or
        the updated parameters were not (the parameters were left
        unchanged; the optimizer keeps the state it returned).
    """

    elbo: jax.Array
    grad_norm: jax.Array
    skipped: jax.Array


class FitResult(NamedTuple):
    """The outcome of a fit.

    Attributes:
      params: the fitted parameters (``state.params``); never non-finite.
      state: the final :class:`FitState`; pass it as ``init_state=`` to
        continue the run.
      trace: a :class:`FitInfo` whose fields have a leading axis over the
        steps run by this call.
      num_skipped: the number of skipped steps in ``trace`` (an int).
      interrupted: True when a ``KeyboardInterrupt`` stopped the fit; the
        result then holds the last completed chunk.
      stopped_early: True when the early-stopping rule ended the fit.
    """

    params: Any
    state: FitState
    trace: FitInfo
    num_skipped: int = 0
    interrupted: bool = False
    stopped_early: bool = False


class FitError(RuntimeError):
    """Raised when a fit takes too many consecutive non-finite steps.

    The message names the step. Nothing is lost: ``state`` holds the
    parameters after the last successful step, the optimizer state (as it
    was then, or as the optimizer last returned it when its own updates made
    the parameters non-finite; see :func:`make_step`) and the step counter at
    the failing step; ``result`` is the :class:`FitResult` up to that step.
    So ``fit`` can continue from ``err.state`` once the cause is fixed.

    Attributes:
      state: the :class:`FitState` at the failing step; its parameters are
        finite.
      result: the :class:`FitResult` of the steps run until the failure.
      step: the index of the last (failing) step.
    """

    def __init__(self, message: str, *, state: FitState, result: FitResult, step: int):
        super().__init__(message)
        self.state = state
        self.result = result
        self.step = step


# --------------------------------------------------------------------------
# Argument checks.


def _check_optimizer(optimizer: Any) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    hint = ""
    if callable(optimizer) and not hasattr(optimizer, "update"):
        name = getattr(optimizer, "__name__", "the factory")
        hint = f" Did you mean to call it, e.g. `{name}(learning_rate)`?"
    raise TypeError(
        "`optimizer` must be an optax.GradientTransformation (e.g. "
        f"optax.adam(1e-2)); got {type(optimizer).__name__}.{hint}"
    )


def _check_family(family: Any) -> VariationalFamily:
    if not isinstance(family, VariationalFamily):
        raise TypeError(
            "`family` must be a vijax.VariationalFamily (e.g. vijax.mean_field()); "
            f"got {type(family).__name__}."
        )
    return family


def _check_log_joint(log_joint: Any) -> Callable:
    if not callable(log_joint):
        raise TypeError(f"`log_joint` must be callable; got {type(log_joint).__name__}.")
    return log_joint


def _check_params(name: str, params: Any, family: VariationalFamily) -> Any:
    """Static check that ``params`` belong to ``family``; concrete ones must be finite."""
    if isinstance(params, FitState):
        raise TypeError(
            f"`{name}` must be the family's parameters; got a FitState. To continue a "
            "run, pass the state as `init_params` with `key=None`."
        )
    try:
        jax.eval_shape(family.to_gaussian, params)
    except Exception as e:  # the family names what it expected
        raise TypeError(
            f"`{name}` do not match the {family.name!r} family (build them with "
            f"vijax.{family.name}(...).init(latent)): {e}"
        ) from e
    leaves = jax.tree_util.tree_leaves(params)
    dtypes = {jnp.asarray(leaf).dtype for leaf in leaves}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise TypeError(
            f"`{name}` must be floating-point arrays of one dtype; got "
            f"{sorted(str(d) for d in dtypes)}."
        )
    for leaf in leaves:
        if _checks.is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"`{name}` must be finite; got non-finite entries.")
    return params


def _as_typed_key(name: str, key: Any, batch_ndim: int = 0) -> jax.Array:
    """Returns ``key`` as a typed key array of ``batch_ndim`` dimensions."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    elif key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
        typed = jax.random.wrap_key_data(key)
    else:
        raise TypeError(
            f"`{name}` must be a PRNG key (jax.random.key(0), or a legacy uint32 "
            f"key of shape (..., 2)); got dtype {key.dtype}, shape {tuple(key.shape)}."
        )
    if typed.ndim != batch_ndim:
        want = "a single key" if batch_ndim == 0 else "a 1-d array of keys"
        raise ValueError(
            f"`{name}` must be {want}; got a key array of shape {tuple(typed.shape)}."
        )
    return typed


def _float_dtype(params: Any):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------
# The pure core: one step, and a chunk of steps.


def _tree_all_finite(tree: Any) -> jax.Array:
    """Whether every entry of ``tree`` is finite, as one cheap reduction.

    A NaN or inf entry makes the sum non-finite. (A sum that overflows also
    reads as non-finite; that needs entries near the dtype's maximum, which
    no usable parameters hold.) On CPU a plain sum is several times cheaper
    than ``all(isfinite(.))``, and this runs every step.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.isfinite(functools.reduce(jnp.add, [jnp.sum(leaf) for leaf in leaves]))


def _tree_norm(tree: Any) -> jax.Array:
    """The global L2 norm; ``vdot`` per leaf is cheaper on CPU than sum of squares."""
    leaves = jax.tree_util.tree_leaves(tree)
    sq = functools.reduce(jnp.add, [jnp.vdot(leaf, leaf) for leaf in leaves])
    return jnp.sqrt(sq)


def _tree_where(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def init_fit_state(key: jax.Array, params: Any, optimizer: optax.GradientTransformation) -> FitState:
    """Returns the :class:`FitState` at step 0 for ``params`` and ``optimizer``.

    Pure (no checks beyond the key's type), so it can be vmapped over keys or
    parameters; :func:`fit` calls it for you.

    Args:
      key: the run's PRNG key (typed, or a legacy uint32 key).
      params: the family's initial parameters.
      optimizer: an ``optax.GradientTransformation``.

    Returns:
      ``FitState(params, optimizer.init(params), step=0, key)`` with a typed
      key and an int32 step.
    """
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return FitState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )


def _check_step_config(family, log_joint, optimizer, num_samples, estimator):
    """Validates what ``make_step``, ``fit`` and ``fit_batched`` share."""
    family = _check_family(family)
    log_joint = _check_log_joint(log_joint)
    optimizer = _check_optimizer(optimizer)
    num_samples = _checks.check_positive_int("num_samples", num_samples)
    _check_estimator(estimator, ELBO_ESTIMATORS)
    return family, log_joint, optimizer, num_samples


def make_step(
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    num_samples: int = 8,
    estimator: str = DEFAULT_ESTIMATOR,
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
        ``"stl"``, sticking the landing; see :func:`vijax.elbo`).

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
    family, log_joint, optimizer, num_samples = _check_step_config(
        family, log_joint, optimizer, num_samples, estimator
    )

    def neg_elbo(params, key):
        return -elbo(
            key, params, family, log_joint, num_samples=num_samples, estimator=estimator
        )

    loss_and_grad = jax.value_and_grad(neg_elbo)

    def step(state: FitState) -> tuple[FitState, FitInfo]:
        dtype = _float_dtype(state.params)
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = loss_and_grad(state.params, key)
        # A non-finite gradient entry makes the norm non-finite, so one
        # reduction serves as the gradient check and the reported norm.
        grad_norm = _tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ok = _tree_all_finite(params)
            # The optimizer's new state is kept as it returned it: restoring
            # the old one too keeps both states alive and copies them every
            # step, measured at 7 to 10% of a full-rank step on CPU.
            return _tree_where(ok, params, state.params), opt_state, ok

        def keep(_):
            return state.params, state.opt_state, jnp.array(False)

        # ``cond`` (not a select after the fact) skips the optimizer update of
        # a step that is already known to be bad; measured slightly cheaper.
        params, opt_state, ok = jax.lax.cond(finite, update, keep, None)
        new_state = FitState(
            params=params, opt_state=opt_state, step=state.step + 1, key=state.key
        )
        info = FitInfo(
            elbo=(-loss).astype(dtype),
            grad_norm=grad_norm.astype(dtype),
            skipped=jnp.logical_not(ok),
        )
        return new_state, info

    return step


def _make_chunk(step: Callable, chunk_size: int, max_nonfinite: int) -> Callable:
    """Returns ``chunk(state, nonfinite, num_active) -> (state, nonfinite, infos)``.

    Runs up to ``num_active <= chunk_size`` steps and stacks their infos into
    arrays of length ``chunk_size``. This is ``lax.scan``'s own lowering (a
    ``while_loop`` writing each step's info into preallocated buffers) with a
    dynamic trip count: one compiled chunk serves every ``num_steps``, steps
    past ``num_active`` cost nothing (a masked ``scan`` would still run them,
    and a ``cond`` per step costs about 5% on CPU), and the loop stops at the
    step where ``max_nonfinite`` consecutive non-finite steps are reached.
    ``nonfinite`` counts the consecutive non-finite steps so far. Unused
    entries of ``infos`` hold ``elbo = grad_norm = nan`` and ``skipped =
    True``; the host drops them.
    """

    def chunk(state, nonfinite, num_active):
        dtype = _float_dtype(state.params)
        buffers = FitInfo(
            elbo=jnp.full((chunk_size,), jnp.nan, dtype),
            grad_norm=jnp.full((chunk_size,), jnp.nan, dtype),
            skipped=jnp.ones((chunk_size,), bool),
        )

        def cond(carry):
            i, _, nonfinite, _ = carry
            return (i < num_active) & (nonfinite < max_nonfinite)

        def body(carry):
            i, state, nonfinite, buffers = carry
            state, info = step(state)
            nonfinite = jnp.where(info.skipped, nonfinite + 1, 0)
            buffers = jax.tree_util.tree_map(
                lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                buffers, info,
            )
            return i + 1, state, nonfinite, buffers

        _, state, nonfinite, infos = jax.lax.while_loop(
            cond, body, (jnp.zeros((), jnp.int32), state, nonfinite, buffers)
        )
        return state, nonfinite, infos

    return chunk


# Compiled chunks, keyed on everything that changes the traced program except
# shapes and dtypes (jax.jit's own cache handles those). Families, optax
# transformations and log joints hash by the identity of their functions.
_CACHE_SIZE = 32
_chunk_cache: collections.OrderedDict = collections.OrderedDict()


def _compiled_chunk(
    family, log_joint, optimizer, num_samples, estimator, chunk_size, max_nonfinite,
    batched,
) -> Callable:
    cache_key = (
        family, log_joint, optimizer, num_samples, estimator, chunk_size,
        max_nonfinite, batched,
    )
    try:
        hash(cache_key)
    except TypeError:  # an unhashable callable: compile without caching
        cache_key = None
    if cache_key is not None and cache_key in _chunk_cache:
        _chunk_cache.move_to_end(cache_key)
        return _chunk_cache[cache_key]
    step = make_step(
        family, log_joint, optimizer, num_samples=num_samples, estimator=estimator
    )
    chunk = _make_chunk(step, chunk_size, max_nonfinite)
    if batched:
        chunk = jax.vmap(chunk, in_axes=(0, 0, None))
    compiled = jax.jit(chunk)
    if cache_key is not None:
        _chunk_cache[cache_key] = compiled
        while len(_chunk_cache) > _CACHE_SIZE:
            _chunk_cache.popitem(last=False)
    return compiled


# --------------------------------------------------------------------------
# Checkpoints.

_CHECKPOINT_NAME = "fit_state.pkl"
_CHECKPOINT_FORMAT = "vijax.FitState"
_CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: FitState) -> str:
    """Writes ``state`` to ``path`` atomically and returns the path written.

    The state is converted to NumPy (the typed key to its raw data) and
    pickled to ``path + ".tmp"``, flushed to disk, then renamed over ``path``
    (``os.replace``), so a crash never leaves a half-written checkpoint. If
    ``path`` is a directory, the file is ``path/fit_state.pkl``.

    Args:
      path: a file path or an existing directory.
      state: a :class:`FitState` (from ``result.state``), batched or not.

    Returns:
      The path of the file written.
    """
    if not isinstance(state, FitState):
        raise TypeError(f"`state` must be a vijax.FitState; got {type(state).__name__}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, _CHECKPOINT_NAME)
    key = state.key
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "key_impl": str(jax.random.key_impl(key)),
        "state": jax.tree_util.tree_map(
            np.asarray, state._replace(key=jax.random.key_data(key))
        ),
    }
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> FitState:
    """Returns the :class:`FitState` saved at ``path`` (a file or a checkpoint dir).

    Continue the run with ``vijax.fit(None, family, log_joint, state, ...)``;
    the continuation is bitwise identical to a run that was never stopped.
    The file is a pickle: load only checkpoints you trust.

    Args:
      path: the file written by :func:`save_checkpoint` or by ``fit``'s
        ``checkpoint_dir``, or that directory.

    Returns:
      The saved :class:`FitState`, with ``jax.Array`` leaves and a typed key.

    Raises:
      FileNotFoundError: there is no checkpoint at ``path``.
      ValueError: the file is not a vijax checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, _CHECKPOINT_NAME)
    with open(path, "rb") as f:
        payload = pickle.load(f)
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _CHECKPOINT_FORMAT
        or payload.get("version") != _CHECKPOINT_VERSION
    ):
        raise ValueError(
            f"`path` must be a vijax checkpoint (format {_CHECKPOINT_FORMAT!r}, "
            f"version {_CHECKPOINT_VERSION}); got a file that is not: {path}."
        )
    state = jax.tree_util.tree_map(jnp.asarray, payload["state"])
    key = jax.random.wrap_key_data(state.key, impl=payload["key_impl"])
    return state._replace(key=key)


# --------------------------------------------------------------------------
# Progress display (tqdm if installed, else a plain stderr line).


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _progress_default() -> bool:
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty or _in_notebook()


class _LinePrinter:
    """A minimal stand-in for tqdm: one stderr line, rewritten in place."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.start = time.perf_counter()

    def update(self, n: int):
        self.n += n
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(
            f"\r{self.desc}: {self.n}/{self.total} steps, {elapsed:.1f}s {self.postfix}"
        )
        sys.stderr.flush()

    def set_postfix_str(self, s: str, refresh: bool = True):
        self.postfix = s

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def _make_bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LinePrinter(total, desc)
    return tqdm(total=total, desc=desc, unit="step")


# --------------------------------------------------------------------------
# The host loop shared by fit and fit_batched.


def _host_hook(step: int) -> None:
    """Called on the host after each completed chunk (a seam for tests)."""


def _concat(parts: list, axis: int) -> FitInfo:
    if not parts:
        return None
    return FitInfo(*(np.concatenate([p[i] for p in parts], axis=axis) for i in range(3)))


def _running_mean(elbos: np.ndarray, skipped: np.ndarray, window: int) -> float:
    """Mean of the finite, non-skipped ELBO estimates of the last ``window`` steps.

    For a batch (2-d arrays, members first) it averages over members too.
    """
    e = elbos[..., -window:]
    ok = ~skipped[..., -window:] & np.isfinite(e)
    if not np.any(ok):
        return float("nan")
    return float(np.mean(e[ok]))


def _run(
    compiled: Callable,
    state: FitState,
    *,
    num_steps: int,
    chunk_size: int,
    max_nonfinite: int,
    batched: bool,
    progress: bool,
    tol: float | None,
    window: int,
    patience: int,
    checkpoint_dir: str | None,
    checkpoint_every: int | None,
) -> FitResult:
    step_axis = 1 if batched else 0
    nonfinite = jnp.zeros(state.step.shape, jnp.int32)
    start_step = int(np.max(np.asarray(state.step)))
    bar = _make_bar(progress, num_steps, "vijax.fit")
    parts: list[FitInfo] = []
    done = 0
    best, stalls = -np.inf, 0
    last_saved = start_step
    stopped_early = interrupted = False

    def result(st, **flags):
        trace = _concat(parts, step_axis)
        if trace is None:
            shape = (state.step.shape[0], 0) if batched else (0,)
            dtype = _float_dtype(state.params)
            trace = FitInfo(
                np.zeros(shape, dtype), np.zeros(shape, dtype), np.zeros(shape, bool)
            )
        skipped = trace.skipped.sum(axis=-1)
        return FitResult(
            params=st.params,
            state=st,
            trace=trace,
            num_skipped=skipped if batched else int(skipped),
            **flags,
        )

    def save(st):
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            save_checkpoint(os.path.join(checkpoint_dir, _CHECKPOINT_NAME), st)

    # Chunks are dispatched one ahead: while chunk k+1 runs, the host reads
    # chunk k's trace, updates the bar, tests the rules and writes checkpoints.
    pending = compiled(state, nonfinite, min(chunk_size, num_steps))
    try:
        while True:
            new_state, new_nonfinite, infos = pending
            active = min(chunk_size, num_steps - done)
            ahead = None
            if done + active < num_steps:
                ahead = compiled(
                    new_state, new_nonfinite, min(chunk_size, num_steps - done - active)
                )
            nf = np.asarray(new_nonfinite)  # waits for chunk k
            steps_now = np.asarray(new_state.step)
            infos = jax.tree_util.tree_map(np.asarray, infos)
            taken = int(np.max(steps_now)) - (start_step + done)
            part = jax.tree_util.tree_map(
                lambda a: a[:, :taken] if batched else a[:taken], infos
            )
            parts.append(part)
            state = new_state
            done += taken
            _host_hook(start_step + done)
            if bar is not None:
                bar.update(taken)
                elbo_now = _running_mean(part.elbo, part.skipped, window)
                bar.set_postfix_str(f"elbo={elbo_now:.4g}", refresh=False)
            if np.any(nf >= max_nonfinite):
                fail = int(np.max(steps_now)) - 1
                save(state)
                res = result(state)
                raise FitError(
                    f"fit stopped at step {fail}: {max_nonfinite} consecutive steps "
                    f"(steps {fail - max_nonfinite + 1} to {fail}) had a non-finite "
                    "ELBO estimate, gradient or updated parameters. The parameters "
                    "were left at their last finite values; `err.state` holds that "
                    "state (its optimizer state may include the rejected steps) and "
                    "`err.result` the trace so far. Check log_joint for "
                    "regions where it returns nan/inf, or lower the learning rate.",
                    state=state,
                    result=res,
                    step=fail,
                )
            if checkpoint_every is not None and (
                start_step + done - last_saved >= checkpoint_every
            ):
                save(state)
                last_saved = start_step + done
            if tol is not None:
                trace = _concat(parts[-(window // chunk_size + 2):], step_axis)
                if trace.elbo.shape[-1] >= window:
                    mean = _running_mean(trace.elbo, trace.skipped, window)
                    if not np.isfinite(best) or mean > best + tol * abs(best):
                        best, stalls = mean, 0
                    else:
                        stalls += 1
                    if stalls >= patience and done < num_steps:
                        stopped_early = True
                        break
            if ahead is None:
                break
            pending = ahead
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(
            f"vijax.fit interrupted; returning the state after step "
            f"{start_step + done} (the last completed chunk), with "
            "`result.interrupted = True`.",
            RuntimeWarning,
            stacklevel=3,
        )
    finally:
        if bar is not None:
            bar.close()
    if checkpoint_dir is not None and start_step + done > last_saved:
        save(state)
    return result(state, interrupted=interrupted, stopped_early=stopped_early)


def _check_run_args(
    num_steps, chunk_size, max_nonfinite, progress, tol, window, patience,
    checkpoint_dir, checkpoint_every,
):
    num_steps = _checks.check_positive_int("num_steps", num_steps)
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    max_nonfinite = _checks.check_positive_int("max_nonfinite", max_nonfinite)
    if progress is None:
        progress = _progress_default()
    elif not isinstance(progress, bool):
        raise TypeError(f"`progress` must be None, True or False; got {progress!r}.")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"`tol` must be None or a float >= 0; got {tol!r}.")
        tol = float(tol)
    window = _checks.check_positive_int("window", window)
    patience = _checks.check_positive_int("patience", patience)
    if checkpoint_every is not None:
        checkpoint_every = _checks.check_positive_int("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            raise ValueError(
                "`checkpoint_every` needs `checkpoint_dir`; got checkpoint_dir=None."
            )
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
    return dict(
        num_steps=num_steps, chunk_size=chunk_size, max_nonfinite=max_nonfinite,
        progress=progress, tol=tol, window=window, patience=patience,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
    )


def _check_no_key(name: str, value: Any) -> None:
    """Raises unless ``value`` is None: a run continued from a FitState uses its key(s)."""
    if value is not None:
        raise ValueError(
            f"`{name}` must be None when `init_params` is a FitState (the state "
            f"carries the run's {name}); got {type(value).__name__}."
        )


def _check_state(state: FitState, family, optimizer, batched: bool) -> FitState:
    """Checks that a FitState to continue from matches the family and optimizer."""
    params = state.params
    if batched:
        params = jax.tree_util.tree_map(lambda a: a[0], params)
    _check_params("init_params.params", params, family)
    want = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, params))
    got = jax.tree_util.tree_structure(state.opt_state)
    if want != got:
        raise ValueError(
            "`init_params.opt_state` does not match `optimizer`: expected the "
            f"structure {want}; got {got}. Continue a run with the optimizer it "
            "was started with."
        )
    key = _as_typed_key("init_params.key", state.key, 1 if batched else 0)
    step = jnp.asarray(state.step, jnp.int32)
    return state._replace(key=key, step=step)


def fit(
    key: jax.Array | None,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Any,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    num_samples: int = 8,
    estimator: str = DEFAULT_ESTIMATOR,
    progress: bool | None = None,
    chunk_size: int = 500,
    max_nonfinite: int = 20,
    tol: float | None = None,
    window: int = 100,
    patience: int = 3,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
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

    ``KeyboardInterrupt`` during a fit is caught: ``fit`` returns the result
    of the last completed chunk with ``result.interrupted = True`` (and a
    ``RuntimeWarning``), which can be continued like any other.

    For many seeds at once, in one compiled loop, see :func:`fit_batched`.

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
      optimizer: an ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-2)``).
      num_steps: the number of steps to run in this call (>= 1); when
        continuing, the number of further steps.
      num_samples: Monte Carlo draws per step (>= 1).
      estimator: the gradient estimator, as in :func:`vijax.elbo` (default
        ``"stl"``: unbiased, and its noise vanishes near a Gaussian posterior,
        so Adam settles far closer to it than with ``"reparam"``).
      progress: show a progress bar (tqdm if installed, else a stderr line)
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
        (``checkpoint_dir/fit_state.pkl``, written atomically) at the end of
        the fit, on interruption or failure, and every ``checkpoint_every``
        steps.
      checkpoint_every: save at the first chunk boundary at least this many
        steps after the previous save (needs ``checkpoint_dir``).

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
        ``estimator``, non-finite ``init_params``, or a ``key`` given together
        with a :class:`FitState`.
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
    """
    family, log_joint, optimizer, num_samples = _check_step_config(
        family, log_joint, optimizer, num_samples, estimator
    )
    run_args = _check_run_args(
        num_steps, chunk_size, max_nonfinite, progress, tol, window, patience,
        checkpoint_dir, checkpoint_every,
    )
    if isinstance(init_params, FitState):
        _check_no_key("key", key)
        state = _check_state(init_params, family, optimizer, batched=False)
    else:
        key = _as_typed_key("key", key)
        params = _check_params("init_params", init_params, family)
        state = init_fit_state(key, params, optimizer)
    compiled = _compiled_chunk(
        family, log_joint, optimizer, num_samples, estimator, run_args["chunk_size"],
        run_args["max_nonfinite"], False,
    )
    return _run(compiled, state, batched=False, **run_args)


def fit_batched(
    keys: jax.Array | None,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    init_params: Any,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    params_batched: bool = False,
    num_samples: int = 8,
    estimator: str = DEFAULT_ESTIMATOR,
    progress: bool | None = None,
    chunk_size: int = 500,
    max_nonfinite: int = 20,
    tol: float | None = None,
    window: int = 100,
    patience: int = 3,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
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
        progress, chunk_size, max_nonfinite, tol, window, patience,
        checkpoint_dir, checkpoint_every: as in :func:`fit`.
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
    family, log_joint, optimizer, num_samples = _check_step_config(
        family, log_joint, optimizer, num_samples, estimator
    )
    if not isinstance(params_batched, bool):
        raise TypeError(f"`params_batched` must be a bool; got {params_batched!r}.")
    run_args = _check_run_args(
        num_steps, chunk_size, max_nonfinite, progress, tol, window, patience,
        checkpoint_dir, checkpoint_every,
    )
    if isinstance(init_params, FitState):
        _check_no_key("keys", keys)
        state = _check_state(init_params, family, optimizer, batched=True)
    else:
        keys = _as_typed_key("keys", keys, batch_ndim=1)
        size = keys.shape[0]
        if params_batched:
            sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
                     for leaf in jax.tree_util.tree_leaves(init_params)}
            if sizes != {size}:
                raise ValueError(
                    f"`init_params` must have a leading batch axis of size {size} "
                    f"(the number of keys) on every leaf; got sizes {sorted(map(str, sizes))}."
                )
            _check_params(
                "init_params", jax.tree_util.tree_map(lambda a: a[0], init_params), family
            )
            params_axis = 0
        else:
            _check_params("init_params", init_params, family)
            params_axis = None
        state = jax.vmap(init_fit_state, in_axes=(0, params_axis, None))(
            keys, init_params, optimizer
        )
    compiled = _compiled_chunk(
        family, log_joint, optimizer, num_samples, estimator, run_args["chunk_size"],
        run_args["max_nonfinite"], True,
    )
    return _run(compiled, state, batched=True, **run_args)
