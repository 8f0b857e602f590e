"""Timing helpers: wall clock around blocked calls, XLA compile time from JAX's events."""

from __future__ import annotations

import statistics
import threading
import time

import jax

# JAX reports each stage of turning a traced function into an executable as a
# monitoring event: tracing to a jaxpr, lowering to StableHLO, XLA compilation.
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_compile_s",
}
_lock = threading.Lock()
_collectors: list[list] = []


def _listener(event: str, duration: float, **_) -> None:
    stage = COMPILE_EVENTS.get(event)
    if stage is not None:
        end = time.perf_counter()  # events are reported as they finish
        with _lock:
            for c in _collectors:
                c.append((stage, end - duration, end))


jax.monitoring.register_event_duration_secs_listener(_listener)


def _covered(intervals) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class CompileTime:
    """Context manager timing what JAX spends compiling inside its block.

    ``stages`` holds ``trace_s``, ``lower_s`` and ``xla_compile_s``;
    ``seconds`` is the wall time covered by any of them: the time spent
    turning Python functions into executables (every jit compilation inside
    the block, small helper computations included). Intervals are merged, so
    a trace nested inside another (a library that jits inside a traced
    function) is not counted twice.
    """

    def __enter__(self):
        self.events: list = []
        with _lock:
            _collectors.append(self.events)
        return self

    def __exit__(self, *exc):
        with _lock:
            _collectors.remove(self.events)
        return False

    @property
    def stages(self) -> dict:
        return {stage: _covered([(a, b) for s, a, b in self.events if s == stage])
                for stage in COMPILE_EVENTS.values()}

    @property
    def seconds(self) -> float:
        return _covered([(a, b) for _, a, b in self.events])


def timed(fn, *args):
    """Returns ``(result, seconds)`` of ``fn(*args)``, waiting for the result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def median(xs) -> float:
    return float(statistics.median(xs))
