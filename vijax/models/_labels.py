"""Labels and counts: integer and bool arrays accepted, cast to the data's floating dtype.

Covariates must arrive as floating point (a silent cast of an integer design
matrix hides bugs), but labels and counts are integers by nature: the models
take them as integer, bool or floating arrays and compute in the floating
dtype of the rest of the data. A 0/1 label and a count below ``2^24``
(float32) or ``2^53`` (float64) are exact in that dtype, so the cast loses
nothing; a larger integer count is rejected rather than rounded.

The value checks (0 or 1; whole numbers >= 0) run on concrete data only, on
the values as given, so an error shows the user's own number; traced labels
(a model built under ``jit``) are cast without them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks

BINARY = "binary"
COUNTS = "counts"


def _dtype_of(y: Any) -> np.dtype | None:
    """The dtype ``y`` would convert with, or None when it does not convert."""
    dtype = getattr(y, "dtype", None)
    if dtype is not None:
        return np.dtype(dtype)
    if isinstance(y, (bool, int, float, complex)):
        return None  # a Python scalar: left to the floating path (shape checks reject it)
    try:
        return np.asarray(y).dtype
    except Exception:  # pragma: no cover - exotic input; the floating path names it
        return None


def is_whole(y: Any) -> bool:
    """Whether ``y`` is an integer or bool array (concrete or traced), not floating point."""
    dtype = _dtype_of(y)
    return dtype is not None and (dtype == np.bool_ or np.issubdtype(dtype, np.integer))


def _check_values(name: str, y: Any, kind: str) -> None:
    if kind == BINARY:
        _checks.check_binary(name, y)
    elif _checks.is_concrete(y):  # counts
        a = np.asarray(y)
        ok = (a >= 0) & (a == np.round(a))
        if not np.all(ok):
            bad = a[~ok].ravel()[0].item()
            raise ValueError(f"`{name}` must hold counts (whole numbers >= 0); got {bad!r}.")


def as_labels(name: str, y: Any, *, kind: str, dtype: Any) -> jax.Array:
    """Returns labels or counts ``y`` as a floating array, checked.

    Args:
      name: the argument's name, for error messages.
      y: the labels (``kind="binary"``: 0 or 1) or counts (``kind="counts"``:
        whole numbers >= 0), as a floating, integer or bool array.
      kind: ``"binary"`` or ``"counts"``.
      dtype: the floating dtype integer and bool ``y`` are cast to (the
        covariates' dtype). Floating ``y`` keeps its own dtype: the caller
        checks that it matches the rest of the data.

    Returns:
      ``y`` as a ``jax.Array``: floating ``y`` in its dtype (finite), integer
      and bool ``y`` in ``dtype``.

    Raises:
      TypeError: ``y`` is not real and numeric (complex, strings, objects).
      ValueError: non-finite floating ``y``; concrete values that are not 0 or
        1 (binary) or not whole numbers >= 0 (counts); an integer count too
        large for ``dtype`` to hold exactly.
    """
    if kind not in (BINARY, COUNTS):  # pragma: no cover - internal misuse
        raise ValueError(f"`kind` must be {BINARY!r} or {COUNTS!r}; got {kind!r}.")
    if not is_whole(y):
        source = _dtype_of(y)
        if source is not None and not jnp.issubdtype(source, jnp.floating):
            what = "0 or 1" if kind == BINARY else "whole numbers >= 0"
            raise TypeError(
                f"`{name}` must be a real array of {what}: floating point, integer or bool; "
                f"got dtype {source}."
            )
        y = _checks.as_data(name, y)
        _check_values(name, y, kind)
        return y
    _check_values(name, y, kind)
    dtype = jnp.dtype(dtype)
    if kind == COUNTS and _checks.is_concrete(y):
        a = np.asarray(y)
        exact = 2 ** (jnp.finfo(dtype).nmant + 1)  # every integer up to this is a float
        if a.size and a.max() > exact:
            raise ValueError(
                f"`{name}` must hold counts of at most 2^{jnp.finfo(dtype).nmant + 1} = "
                f"{exact} to be exact in {dtype}; got {a.max().item()}. Compute in "
                "float64 (with jax_enable_x64)."
            )
    return jnp.asarray(y, dtype)
