"""The types every fitting algorithm shares: state and info in the blackjax pairing.

:class:`FitState` is carried from step to step (and is all a run needs to
continue); :class:`FitInfo` is per step and stacked by the engine into
:attr:`FitResult.trace`. An algorithm is an ``(init, step)`` pair over these
types (:class:`vijax.fitting.Algorithm`); the engine runs any of them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


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
        ended the fit before ``num_steps``.
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
