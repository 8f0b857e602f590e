"""The engine every fitting algorithm runs on: compiled chunks of steps, a host loop between them.

An algorithm is an :class:`Algorithm`, an ``(init, step)`` pair of pure
functions over :class:`vijax.FitState` and :class:`vijax.FitInfo` (the shape
of blackjax's ``VIAlgorithm``). The engine knows nothing else about it:

* :func:`make_chunk` turns ``step`` into a chunk of up to ``chunk_size``
  steps, compiled once (:func:`compiled_chunk` caches it, keyed on whatever
  identifies the algorithm) and reused for every ``num_steps``;
* :func:`run` calls the chunk from the host, one chunk ahead, and between
  chunks updates the progress bar, writes checkpoints, tests the stopping
  rule and raises :class:`vijax.FitError` after too many consecutive skipped
  steps, handing back the last completed chunk on ``KeyboardInterrupt``.

:func:`vijax.fit`, :func:`vijax.fit_batched` and :func:`vijax.batch_and_match`
are drivers: they check their arguments, build an algorithm and call
:func:`run`. A new algorithm does the same, and never reaches into a driver.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from typing import Any, Callable, Hashable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _blas, _checks, _tree
from vijax._cache import LRU
from vijax.fitting._checkpoint import CHECKPOINT_NAME, save_checkpoint
from vijax.fitting._progress import make_bar, progress_default
from vijax.fitting._types import FitError, FitInfo, FitResult, FitState


class Algorithm(NamedTuple):
    """A fitting algorithm as two pure functions, run by :func:`run`.

    Attributes:
      init: ``init(key, params) -> FitState`` at step 0 (vmappable over keys
        and parameters).
      step: ``step(state) -> (state, info)``: one step. It draws its noise
        from ``fold_in(state.key, state.step)``, advances ``state.step`` by
        one, and sets ``info.skipped`` (leaving the parameters finite) when
        the step was not taken.
    """

    init: Callable[[jax.Array, Any], FitState]
    step: Callable[[FitState], tuple[FitState, FitInfo]]


class RunOptions(NamedTuple):
    """The host loop's settings, checked by :func:`check_run_options`."""

    num_steps: int
    chunk_size: int
    max_nonfinite: int
    progress: bool
    tol: Optional[float]
    window: int
    patience: int
    checkpoint_dir: Optional[str]
    checkpoint_every: Optional[int]


def check_run_options(
    *,
    num_steps: Any,
    chunk_size: Any,
    max_nonfinite: Any,
    progress: Any,
    tol: Any = None,
    window: Any = 100,
    patience: Any = 3,
    checkpoint_dir: Any = None,
    checkpoint_every: Any = None,
) -> RunOptions:
    """Validates the host loop's settings; each error names the argument."""
    num_steps = _checks.check_positive_int("num_steps", num_steps)
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    max_nonfinite = _checks.check_positive_int("max_nonfinite", max_nonfinite)
    if progress is None:
        progress = progress_default()
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
        checkpoint_dir = _directory_path("checkpoint_dir", checkpoint_dir)
    return RunOptions(
        num_steps, chunk_size, max_nonfinite, progress, tol, window, patience,
        checkpoint_dir, checkpoint_every,
    )


def _directory_path(name: str, path: Any) -> str:
    """``path`` as a string, not an existing file (checked with the other arguments)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a path (str or os.PathLike); got {type(path).__name__}."
        ) from None
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{name}` must be a directory; got {path!r}, an existing file.")
    return path


def _writable_dir(name: str, path: str) -> str:
    """``path``, created if missing and checked writable before a run's first step.

    Not at the first save: a run without ``checkpoint_every`` saves only at
    its end, and a directory that cannot be written would lose the whole run
    there. Not with the other arguments either: a call that then fails on
    another argument leaves no directory behind.
    """
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(
            f"`{name}` must be a directory this process can write; {path!r} is not "
            f"({type(err).__name__}: {err.strerror or err})."
        ) from err
    return path


def check_resume_key(name: str, value: Any) -> None:
    """Raises unless ``value`` is None: a run continued from a FitState uses its key(s)."""
    if value is not None:
        raise ValueError(
            f"`{name}` must be None when `init_params` is a FitState (the state "
            f"carries the run's {name}); got {type(value).__name__}."
        )


def resume_state(state: FitState, batched: bool) -> FitState:
    """A FitState to continue from, with a typed key (array) and an int32 step."""
    key = _checks.typed_key("init_params.key", state.key, 1 if batched else 0)
    return state._replace(key=key, step=jnp.asarray(state.step, jnp.int32))


# --------------------------------------------------------------------------
# The compiled chunk.


def make_chunk(step: Callable, chunk_size: int, max_nonfinite: int) -> Callable:
    """Returns ``chunk(state, nonfinite, num_active, *args) -> (state, nonfinite, infos)``.

    ``args`` (the data of a data model) are handed to every ``step(state,
    *args)`` unchanged: arguments of the compiled loop, never constants in it.

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

    def chunk(state, nonfinite, num_active, *args):
        dtype = _tree.float_dtype(state.params)
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
            state, info = step(state, *args)
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
_chunks = LRU(32)


def compiled_chunk(
    cache_key: Hashable,
    make_step: Callable[[], Callable],
    *,
    chunk_size: int,
    max_nonfinite: int,
    batched: bool,
    num_args: int = 0,
) -> Callable:
    """The ``jit``-compiled chunk of ``make_step()``'s step, cached on ``cache_key``.

    ``cache_key`` must identify the algorithm and its settings (the drivers
    use a tuple starting with the driver's name); an unhashable key (an
    unhashable callable inside) compiles without caching. ``batched`` vmaps
    the chunk over a leading axis of the state; ``num_args`` extra arguments
    of the step (unbatched) follow the chunk's own three.
    """

    def build():
        chunk = make_chunk(make_step(), chunk_size, max_nonfinite)
        if batched:
            # The extra arguments (a data model's data) are shared by every member.
            chunk = jax.vmap(chunk, in_axes=(0, 0, None) + (None,) * num_args)
        return jax.jit(chunk)

    return _chunks.get((cache_key, chunk_size, max_nonfinite, batched, num_args), build)


# --------------------------------------------------------------------------
# The host loop.


def _host_hook(step: int) -> None:
    """Called on the host after each completed chunk (a seam for tests)."""


def _concat(parts: list, axis: int) -> Optional[FitInfo]:
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


DEFAULT_FAILURE = (
    "had a non-finite ELBO estimate, gradient or updated parameters",
    "Check log_joint for regions where it returns nan/inf, or lower the learning rate.",
)


def run(
    compiled: Callable,
    state: FitState,
    options: RunOptions,
    *,
    batched: bool,
    desc: str = "vijax.fit",
    failure: tuple[str, str] = DEFAULT_FAILURE,
    stopper: Any = None,
    args: tuple = (),
) -> FitResult:
    """Runs ``options.num_steps`` steps of a compiled chunk from ``state``; returns the result.

    Args:
      compiled: from :func:`compiled_chunk`.
      state: the :class:`FitState` to start from (batched when ``batched``).
      options: from :func:`check_run_options`.
      batched: whether the state has a leading batch axis.
      desc: the progress bar's label and the name in messages.
      failure: ``(what, hint)`` for the :class:`FitError` message: what the
        skipped steps had ("had a non-finite ...") and what to check.
      stopper: an optional host-side rule with ``next_check(step) -> step``,
        ``check(state) -> bool | FitState`` (True stops the run; a state
        replaces the run's, as :class:`~vijax.fitting._stopping.AdaptiveStop`
        does when it lowers the step), ``select(state) ->
        params`` (the parameters to return), and optionally
        ``recover(state) -> FitState | None``, asked before ``FitError`` is
        raised for ``max_nonfinite`` skipped steps (a state to run on from
        instead); chunks end at its checks. Only for unbatched runs
        (:class:`vijax.fitting._stopping.AutoStop`).
      args: extra arguments of every step (a data model's data).

    Raises:
      FitError: ``options.max_nonfinite`` consecutive skipped steps; the
        state and result up to there are saved (when checkpointing) and
        attached.
    """
    num_steps, chunk_size, max_nonfinite = (
        options.num_steps, options.chunk_size, options.max_nonfinite
    )
    tol, window, patience = options.tol, options.window, options.patience
    checkpoint_dir, checkpoint_every = options.checkpoint_dir, options.checkpoint_every
    step_axis = 1 if batched else 0
    nonfinite = jnp.zeros(state.step.shape, jnp.int32)
    start_step = int(np.max(np.asarray(state.step)))
    bar = make_bar(options.progress, num_steps, desc)
    parts: list[FitInfo] = []
    done = 0
    best, stalls = -np.inf, 0
    last_saved = start_step
    stopped_early = interrupted = False
    moved = False  # whether any step of this call was finite

    def result(st, **flags):
        params = st.params if stopper is None else stopper.select(st)
        trace = _concat(parts, step_axis)
        if trace is None:
            shape = (state.step.shape[0], 0) if batched else (0,)
            dtype = _tree.float_dtype(state.params)
            trace = FitInfo(
                np.zeros(shape, dtype), np.zeros(shape, dtype), np.zeros(shape, bool)
            )
        skipped = trace.skipped.sum(axis=-1)
        return FitResult(
            params=params,
            state=st,
            trace=trace,
            num_skipped=skipped if batched else int(skipped),
            **flags,
        )

    def save(st):
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)  # in case it went away mid-run
            save_checkpoint(os.path.join(checkpoint_dir, CHECKPOINT_NAME), st)

    def save_or_warn(st, after: str, which: str = ""):
        """``save``, where a disk error is not the news: it warns and the run goes on."""
        try:
            save(st)
        except OSError as err:
            warnings.warn(
                f"{desc} could not write its {which}checkpoint to {checkpoint_dir!r} "
                f"({type(err).__name__}: {err}); {after}",
                RuntimeWarning,
                stacklevel=_caller_level(),
            )

    # Chunks are dispatched one ahead: while chunk k+1 runs, the host reads
    # chunk k's trace, updates the bar, tests the rules and writes checkpoints.
    # The stopper's checks fall at c, next_check(c), next_check(next_check(c)),
    # ...: ``next_at`` is the first one not yet made. Chunks end at them, and
    # are cut to ``chunk_size`` between them (checks grow farther apart than
    # a chunk once the run is long).
    next_at = None if stopper is None else stopper.next_check(start_step)

    def upcoming(pos: int) -> int:
        """The first scheduled check strictly after ``pos``."""
        t = next_at
        while t <= pos:
            t = stopper.next_check(t)
        return t

    def size(done_before: int) -> int:
        """Steps in the chunk that starts after ``done_before`` steps of this call."""
        n = min(chunk_size, num_steps - done_before)
        if stopper is not None:
            here = start_step + done_before
            n = min(n, upcoming(here) - here)
        return n

    if checkpoint_dir is not None:
        _writable_dir("checkpoint_dir", checkpoint_dir)
    # One BLAS thread while the chunks run (vijax/_blas.py): OpenBLAS's own
    # threading collapses under load on the small LAPACK calls of a step.
    blas = _blas.limited()
    blas.__enter__()
    pending = compiled(state, nonfinite, size(0), *args)
    try:
        while True:
            new_state, new_nonfinite, infos = pending
            active = size(done)
            ahead = None
            if done + active < num_steps:
                ahead = compiled(new_state, new_nonfinite, size(done + active), *args)
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
            recovered = None
            # Lowering the step helps only once some step was finite: where every
            # step of this call was skipped, they were all taken at the starting
            # parameters, whatever the step size.
            moved = moved or not np.all(part.skipped)
            if np.any(nf >= max_nonfinite) and moved and hasattr(stopper, "recover"):
                recovered = stopper.recover(state)
            if recovered is not None:
                # The rule lowered the step (vijax.adaptive_lr) and restarts
                # from a finite point: run on from there instead of failing.
                state, new_nonfinite = recovered, jnp.zeros_like(new_nonfinite)
                next_at = stopper.next_check(start_step + done)
                ahead = None
                if done < num_steps:
                    ahead = compiled(state, new_nonfinite, size(done), *args)
            elif np.any(nf >= max_nonfinite):
                fail = int(np.max(steps_now)) - 1
                save_or_warn(state, "the FitError below says why the run stopped.")
                what, hint = failure
                if not moved:
                    hint = (f"Every step since the start (step {start_step}) was skipped, "
                            "so all of them were taken at the starting parameters and a "
                            "lower step cannot help: log_joint (or q's log density) is "
                            "not finite at q's draws there. Evaluate log_joint at "
                            "family.sample(key, params, 8) to see where.")
                raise FitError(
                    f"{desc} stopped at step {fail}: {max_nonfinite} consecutive steps "
                    f"(steps {fail - max_nonfinite + 1} to {fail}) {what}. The "
                    "parameters were left at their last finite values; `err.state` "
                    "holds that state (its optimizer state may include the rejected "
                    f"steps) and `err.result` the trace so far. {hint}",
                    state=state,
                    result=result(state),
                    step=fail,
                )
            if checkpoint_every is not None and (
                start_step + done - last_saved >= checkpoint_every
            ):
                save(state)
                last_saved = start_step + done
            if (
                stopper is not None
                and recovered is None
                and taken == active
                and start_step + done == next_at
            ):
                verdict = stopper.check(state)
                next_at = stopper.next_check(next_at)
                if isinstance(verdict, FitState):
                    # A new stage (vijax.adaptive_lr): the chunk dispatched
                    # ahead ran from the old state; run from the new one.
                    state = verdict
                    if done < num_steps:
                        ahead = compiled(state, new_nonfinite, size(done), *args)
                elif verdict:
                    # At the last step too: the rule found the fit converged there.
                    stopped_early = True
                    break
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
    except FitError:
        raise  # saved where it was raised
    except Exception:
        # Anything else (a host callback's error, a device error): keep the last
        # finished chunk on disk before the error goes on.
        if checkpoint_dir is not None:
            save_or_warn(state, "the error below says why the run stopped.")
        raise
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(
            f"{desc} interrupted; returning the state after step "
            f"{start_step + done} (the last completed chunk), with "
            "`result.interrupted = True`.",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )
    finally:
        blas.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    if checkpoint_dir is not None and start_step + done > last_saved:
        save_or_warn(state, "the result is returned, and `result.state` continues the run.",
                     which="final ")
    out = result(state, interrupted=interrupted, stopped_early=stopped_early)
    _warn_skipped(out, desc, failure)
    return out


#: ``run`` warns when at least this share of a run's steps were skipped.
SKIPPED_WARN_SHARE = 0.01


def _warn_skipped(result: FitResult, desc: str, failure) -> None:
    """A ``RuntimeWarning`` when every step, or ``SKIPPED_WARN_SHARE`` of them, were skipped.

    Skipped steps (a non-finite ELBO estimate, gradient or update) leave
    the parameters where they were; a run that skips many is fitting only
    the part of q's draws where the log joint is finite, and one that
    skipped every step returns its starting parameters.
    """
    taken = result.trace.skipped.shape[-1]
    skipped = int(np.max(result.num_skipped)) if taken else 0
    if skipped == 0:
        return
    if skipped == taken:
        what = (f"all {taken} steps were skipped, so the parameters returned are the "
                "starting ones")
    elif skipped >= SKIPPED_WARN_SHARE * taken:
        what = (f"{skipped} of {taken} steps ({100 * skipped / taken:.0f}%) were skipped "
                "(`result.trace.skipped` says which), each leaving the parameters where "
                "they were")
    else:
        return
    warnings.warn(
        f"{desc}: {what}. A skipped step {failure[0]}. {failure[1]}",
        RuntimeWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside vijax, for a warning raised in the caller."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root):
        frame, level = frame.f_back, level + 1
    return level
