"""The types every fitting algorithm shares: state and info in the blackjax pairing.

:class:`FitState` is carried from step to step (and is all a run needs to
continue); :class:`FitInfo` is per step and stacked by the engine into
:attr:`FitResult.trace`. An algorithm is an ``(init, step)`` pair over these
types (:class:`vijax.fitting.Algorithm`); the engine runs any of them.

``print(result)`` and ``print(state)`` show one line of facts (steps, the
recent ELBO, skipped steps, the flags, each array as ``dtype[shape]``), never
the arrays' values: an optimizer state alone runs for pages.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

#: The ELBO a printed :class:`FitResult` shows is the mean of this many last estimates.
_REPR_WINDOW = 100
#: Characters a printed parameter pytree may take before the rest is elided.
_REPR_BUDGET = 240
#: Members of a batched result listed one by one before the list is elided.
_REPR_MEMBERS = 6


class FitState(NamedTuple):
    """Everything needed to continue a fit: the carry of the compiled loop.

    Attributes:
      params: the family's parameters after ``step`` steps.
      opt_state: the algorithm's own state: the optax optimizer state for
        :func:`vijax.fit`, ``()`` for :func:`vijax.batch_and_match`. The
        engine never looks inside it, so an algorithm may keep anything there
        (a minibatch cursor, model parameters' optimizer state, ...).
      step: the number of steps taken so far (int32 scalar array).
      key: the run's base PRNG key (typed); step ``t`` uses
        ``jax.random.fold_in(key, t)``, so results depend only on the state,
        never on how the run was cut into chunks or resumed.
      control: the Taylor control variate's reference point
        (:class:`vijax.TaylorReference`) of a fit with
        ``control_variate="taylor"``; None otherwise.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    control: Any = None

    def __repr__(self) -> str:
        # The optimizer state (Adam's moments of every parameter, ...) is
        # summarized by its type and size: printed in full it runs for pages.
        return _safe_repr(self, _fit_state_fields)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / Jupyter
        p.text(repr(self))


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
      params: the fitted parameters, never non-finite: ``state.params``, or
        with ``fit(..., auto_stop=True)`` the better of the last iterate and
        the iterate average kept in the optimizer state.
      state: the final :class:`FitState`; pass it as ``init_state=`` to
        continue the run.
      trace: a :class:`FitInfo` whose fields have a leading axis over the
        steps run by this call.
      num_skipped: the number of skipped steps in ``trace`` (an int).
      interrupted: True when a ``KeyboardInterrupt`` stopped the fit; the
        result then holds the last completed chunk.
      stopped_early: True when a stopping rule (``tol`` or ``auto_stop``)
        ended the fit: it said stop before ``num_steps`` ran out, or at the
        last of them.
    """

    params: Any
    state: FitState
    trace: FitInfo
    num_skipped: int = 0
    interrupted: bool = False
    stopped_early: bool = False

    def __repr__(self) -> str:
        """``FitResult(steps=..., elbo=..., skipped=..., ..., params=...)`` in one line.

        Arrays show as ``dtype[shape]``, never their values; the ELBO is the
        mean of the last steps' finite estimates (a :func:`vijax.fit_batched`
        result lists one per member). The fields hold everything.
        """
        return _safe_repr(self, _fit_result_fields)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / Jupyter
        p.text(repr(self))


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


# ---------------------------------------------------------------- printing
# What ``print(result)`` shows: a line of the facts a user looks for first,
# read from small host arrays only (a step counter, the ELBO trace); arrays
# of parameters and optimizer state appear as ``dtype[shape]``. A repr must
# never raise, so anything unreadable (a tracer, a deleted buffer, a field
# holding something unexpected) degrades to a placeholder.


def _safe_repr(record: tuple, fields) -> str:
    name = type(record).__name__
    try:
        return f"{name}({', '.join(fields(record))})"
    except Exception:  # noqa: BLE001  (a repr must not fail)
        return f"{name}(<{len(record)} fields>)"


def _host(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when its value can be read (not a tracer), else None."""
    if x is None:
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001  (tracers, deleted buffers, odd objects)
        return None


def _number(x: float) -> str:
    return f"{x:.5g}"


def _listed(values: np.ndarray, fmt) -> str:
    """One value, or a (possibly elided) list of one per member."""
    values = np.ravel(values)
    if values.size == 1:
        return fmt(values[0])
    if values.size <= _REPR_MEMBERS:
        shown = [fmt(v) for v in values]
    else:
        shown = [fmt(v) for v in values[:3]] + ["..."] + [fmt(v) for v in values[-2:]]
    return "[" + ", ".join(shown) + "]"


def _same_or_listed(values: np.ndarray, fmt) -> str:
    values = np.ravel(values)
    if values.size and np.all(values == values[0]):
        return fmt(values[0])
    return _listed(values, fmt)


def _leaf_text(x: Any) -> str:
    dtype = getattr(x.dtype, "name", None) or str(x.dtype)
    return f"{dtype}[{','.join(str(n) for n in x.shape)}]"


def describe_tree(tree: Any, budget: int = _REPR_BUDGET) -> str:
    """A pytree's structure with every array as ``dtype[shape]``, never its values.

    ``MeanFieldParams(loc: float32[5], raw_scale: float32[5])``; dicts show as
    ``{w: float32[3], ...}``. Past about ``budget`` characters the remaining
    entries are elided (``...``).
    """
    remaining = [budget]

    def text(x: Any, depth: int) -> str:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            out = _leaf_text(x)
        elif x is None or isinstance(x, (bool, int, float, complex)):
            out = repr(x)
        elif isinstance(x, str):
            out = repr(x) if len(x) <= 20 else repr(x[:17]) + "..."
        elif depth >= 8:
            out = "..."
        elif isinstance(x, tuple) and hasattr(x, "_fields"):
            return container(type(x).__name__ + "(", ")",
                             [(f"{f}: ", v) for f, v in zip(x._fields, x)], depth)
        elif isinstance(x, dict):
            return container("{", "}", [(f"{k}: ", v) for k, v in x.items()], depth)
        elif isinstance(x, (list, tuple)):
            brackets = ("[", "]") if isinstance(x, list) else ("(", ")")
            return container(*brackets, [("", v) for v in x], depth)
        else:
            out = type(x).__name__
        remaining[0] -= len(out)
        return out

    def container(open_: str, close: str, items: list, depth: int) -> str:
        remaining[0] -= len(open_) + len(close)
        parts = []
        for label, value in items:
            if remaining[0] <= 0:
                parts.append("...")
                break
            remaining[0] -= len(label) + 2
            parts.append(label + text(value, depth + 1))
        return open_ + ", ".join(parts) + close

    return text(tree, 0)


def _state_summary(opt_state: Any) -> str:
    """``()`` or ``<ScaleByAdamState ...: 3 arrays>``: the optimizer state's type and size."""
    if isinstance(opt_state, tuple) and not opt_state:
        return "()"
    leaves = jax.tree_util.tree_leaves(opt_state)
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        kinds = ", ".join(type(s).__name__ for s in opt_state[:3])
        kind = f"({kinds}{', ...' if len(opt_state) > 3 else ''})"
    else:
        kind = type(opt_state).__name__
    return f"<{kind}: {len(leaves)} array{'' if len(leaves) == 1 else 's'}>"


def _fit_state_fields(state: FitState) -> list[str]:
    step = _host(state.step)
    if step is not None and step.size and np.issubdtype(step.dtype, np.integer):
        step_text = _same_or_listed(step, lambda v: str(int(v)))
    else:
        step_text = describe_tree(state.step)
    control = "None" if state.control is None else type(state.control).__name__
    return [
        f"step={step_text}",
        f"params={describe_tree(state.params)}",
        f"opt_state={_state_summary(state.opt_state)}",
        f"key={describe_tree(state.key)}",
        f"control={control}",
    ]


def _recent_elbo(elbo: np.ndarray) -> tuple[np.ndarray, int]:
    """The mean of each run's last (up to) ``_REPR_WINDOW`` finite estimates, and the window."""
    tail = np.asarray(elbo[..., -_REPR_WINDOW:], np.float64)
    finite = np.isfinite(tail)
    count = finite.sum(-1)
    total = np.where(finite, tail, 0.0).sum(-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan), tail.shape[-1]


def _fit_result_fields(result: FitResult) -> list[str]:
    trace = result.trace if isinstance(result.trace, FitInfo) else None
    elbo = _host(trace.elbo) if trace is not None else None
    if elbo is not None and elbo.ndim not in (1, 2):
        elbo = None
    skipped = _host(result.num_skipped)
    # fit_batched stacks runs on a leading member axis: a (members, steps)
    # trace and one skipped count per member.
    members = None
    if elbo is not None and elbo.ndim == 2:
        members = elbo.shape[0]
    elif skipped is not None and skipped.ndim == 1:
        members = skipped.shape[0]
    fields = [] if members is None else [f"members={members}"]

    state = result.state if isinstance(result.state, FitState) else None
    step = _host(state.step) if state is not None else None
    run = None if elbo is None else elbo.shape[-1]  # steps run by this call
    if step is not None and step.size and np.issubdtype(step.dtype, np.integer):
        text = _same_or_listed(step, lambda v: str(int(v)))
        if run is not None and np.any(step != run):
            text += f" ({run} in this call)"
        fields.append(f"steps={text}")
    elif run is not None:
        fields.append(f"steps={run}")

    if elbo is not None and run:
        means, window = _recent_elbo(elbo)
        fields.append(f"elbo={_listed(means, _number)} (mean of the last {window} "
                      f"step{'' if window == 1 else 's'}' estimates"
                      f"{', per member' if members else ''})")
    if skipped is not None and skipped.size and np.issubdtype(skipped.dtype, np.integer):
        fields.append(f"skipped={_listed(skipped, lambda v: str(int(v)))}")
    else:
        fields.append(f"skipped={describe_tree(result.num_skipped, 40)}")
    for name in ("stopped_early", "interrupted"):
        flag = _host(getattr(result, name))
        if flag is not None and flag.size and flag.dtype == np.bool_:
            fields.append(f"{name}={_listed(flag, lambda v: str(bool(v)))}")
        else:
            fields.append(f"{name}={describe_tree(getattr(result, name), 40)}")
    fields.append(f"params={describe_tree(result.params)}")
    return fields
