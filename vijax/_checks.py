"""Argument checks shared by every module.

Static checks (shapes, dtypes, structures) always run; value checks (symmetry,
positivity, positive definiteness) run only when the value is concrete, so that
every public function still works under ``jit``, ``vmap`` and ``grad``.
Each error names the argument and gives the expected and the received value.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """Whether ``x`` holds a value we can inspect eagerly (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x: Any) -> jax.Array:
    """Converts ``x`` to a floating-point array or raises ``TypeError``.

    Python floats and ints become the default float dtype; integer or boolean
    *arrays* are rejected because silently casting data is a common bug source.
    """
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a floating-point array; got a bool.")
    if isinstance(x, (int, float)):
        return jnp.asarray(float(x))
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            x = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic input
            raise TypeError(
                    f"`{name}` must be a floating-point array; got {type(x).__name__}."
            ) from e
        dtype = x.dtype
        if dtype == object:
            raise TypeError(
                    f"`{name}` must be a floating-point array; got an object array "
                    f"from {type(x).__name__}."
            )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
                f"`{name}` must have a floating-point dtype (float32 or float64); "
                f"got dtype {dtype}. Convert it explicitly, e.g. "
                f"`{name}.astype(jnp.float32)`."
        )
    return jnp.asarray(x)


def check_ndim(name: str, x: jax.Array, ndim: int) -> None:
    if x.ndim != ndim:
        raise ValueError(
                f"`{name}` must have {ndim} dimension(s); got shape {tuple(x.shape)}."
        )


def check_shape(name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
                f"`{name}` must have shape {tuple(shape)}; got shape {tuple(x.shape)}."
        )


def check_same_dtype(arrays: dict[str, jax.Array], what: str = "the data arrays") -> None:
    """Raises ``TypeError`` unless the named arrays share one dtype.

    Mixed float32 and float64 inputs would silently promote the computations
    (and their gradients) to float64; the user picks one. ``what`` names the
    group in the message.
    """
    dtypes = {name: jnp.dtype(x.dtype) for name, x in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"`{name}` is {dtype}" for name, dtype in dtypes.items())
        first = next(iter(dtypes))
        raise TypeError(
            f"{what} must share one floating dtype; got {listed}. Cast them to "
            f"one, e.g. `.astype({first}.dtype)`."
        )


def check_square(name: str, x: jax.Array) -> None:
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(
                f"`{name}` must be a square (d, d) matrix; got shape {tuple(x.shape)}."
        )


def check_symmetric(name: str, x: jax.Array) -> None:
    if not is_concrete(x):
        return
    a = np.asarray(x, dtype=np.float64)
    scale = max(np.max(np.abs(a)), 1.0)
    tol = 1e-5 if x.dtype == jnp.float32 else 1e-10
    err = np.max(np.abs(a - a.T))
    if err > tol * scale:
        raise ValueError(
                f"`{name}` must be symmetric; got max |{name} - {name}.T| = {err:.3g} "
                f"(tolerance {tol * scale:.3g})."
        )


def check_positive_definite(name: str, x: jax.Array) -> None:
    if not is_concrete(x):
        return
    a = np.asarray(x, dtype=np.float64)
    try:
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        min_eig = float(np.min(np.linalg.eigvalsh(a)))
        raise ValueError(
                f"`{name}` must be positive definite; got a matrix whose smallest "
                f"eigenvalue is {min_eig:.3g}."
        ) from None


def check_covariance(name: str, x: jax.Array) -> None:
    """Square, symmetric and (when concrete) positive definite."""
    check_square(name, x)
    check_symmetric(name, x)
    check_positive_definite(name, x)


def check_positive(name: str, x: Any) -> None:
    """Every entry of ``x`` is > 0 (checked only when concrete)."""
    if not is_concrete(x):
        return
    a = np.asarray(x)
    if a.size and not np.all(a > 0):
        flat = a.ravel()
        bad = flat[~(flat > 0)][0].item()  # a Python number: no array repr
        raise ValueError(f"`{name}` must be positive; got {bad!r}.")


def check_positive_float(name: str, x: Any, *, also: str = "") -> float:
    """A positive, finite real number, returned as a Python float.

    Accepted: Python and NumPy ints and floats (``np.float32(0.1)`` too) and
    concrete 0-d real arrays (``jnp.float32(0.1)``). Rejected with a
    ``TypeError``: bools, strings, complex numbers, time deltas, arrays with
    more than one element and traced values. ``also`` names the other forms a
    caller accepts (``None``, a schedule) before calling.
    """
    expected = f"a positive float{also}"
    if isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 0 and is_concrete(x):
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise TypeError(f"`{name}` must be {expected}; got a 0-d array of dtype {x.dtype}.")
        x = x.item()
    if (
        isinstance(x, (bool, np.bool_, np.timedelta64))
        or not isinstance(x, (int, float, np.integer, np.floating))
    ):
        raise TypeError(f"`{name}` must be {expected}; got {x!r}.")
    if not x > 0:
        raise ValueError(f"`{name}` must be positive; got {x!r}.")
    try:
        value = float(x)
    except OverflowError:
        raise ValueError(
            f"`{name}` must be a finite float; got an int of {len(str(x))} digits, "
            "too large for a float."
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; got {x!r}.")
    return value


def check_finite(name: str, x: Any) -> None:
    """Raises ``ValueError`` naming ``name`` when concrete ``x`` holds NaN or inf."""
    if not is_concrete(x):
        return
    a = np.asarray(x)
    finite = np.isfinite(a)
    if not np.all(finite):
        first = np.argwhere(~finite)[0]
        where = f" (the first at index {tuple(int(i) for i in first)})" if a.ndim else ""
        raise ValueError(
            f"`{name}` must be finite; got {int(np.isnan(a).sum())} NaN and "
            f"{int(np.isinf(a).sum())} infinite entries{where}. Remove or impute them "
            "before building the model."
        )


def check_binary(name: str, y: Any) -> None:
    """Raises ``ValueError`` naming the first entry of concrete ``y`` that is not 0 or 1."""
    if not is_concrete(y):
        return
    a = np.asarray(y)
    ok = (a == 0) | (a == 1)
    if not np.all(ok):
        raise ValueError(f"`{name}` must hold 0.0 or 1.0; got {a[~ok].ravel()[0].item()!r}.")


def as_data(name: str, x: Any) -> jax.Array:
    """A floating-point, finite data array (:func:`as_float_array` + :func:`check_finite`)."""
    x = as_float_array(name, x)
    check_finite(name, x)
    return x


def check_positive_int(name: str, x: Any, *, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int >= {minimum}; got {x!r}.")
    if x < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {x}.")
    return int(x)


def check_latent(name: str, latent: Any) -> Any:
    """Validates a latent pytree: non-empty, every leaf a float array, one dtype.

    Returns the latent with leaves converted to ``jax.Array``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(latent)
    if not leaves:
        raise ValueError(
                f"`{name}` must be a pytree with at least one array leaf; got "
                f"{latent!r}."
        )
    named = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(latent)[0]:
        where = f"{name}{jax.tree_util.keystr(path)}"
        named[where] = as_float_array(where, leaf)
    check_same_dtype(named, what=f"All leaves of `{name}`")
    converted = list(named.values())
    if sum(leaf.size for leaf in converted) == 0:
        raise ValueError(f"`{name}` must have at least one element; got size 0.")
    return jax.tree_util.tree_unflatten(treedef, converted)


def typed_key(name: str, key: Any, batch_ndim: int = 0) -> jax.Array:
    """Returns ``key`` as a typed key array of ``batch_ndim`` dimensions.

    Accepts typed keys (``jax.random.key``) and legacy uint32 keys of shape
    ``(..., 2)``; anything else raises ``TypeError`` naming the argument.
    """
    if key is None:
        raise TypeError(
            f"`{name}` must be a PRNG key (jax.random.key(0), or a legacy uint32 key of "
            "shape (..., 2)); got None. None is a key only where a run continues from a "
            "vijax.FitState passed as `init_params` (e.g. result.state), whose own key "
            "it keeps."
        )
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


def check_log_joint(log_joint: Any) -> None:
    """Raises unless ``log_joint`` is callable; for a vijax model, says what to pass instead."""
    if callable(log_joint):
        return
    hint = ""
    if callable(getattr(log_joint, "log_joint", None)):  # a vijax.models.Model
        hint = " For a vijax model, pass `model.log_joint`"
        if getattr(log_joint, "expected_log_joint", None) is not None:
            hint += (" (this model gives E_q[log p] exactly: vijax.fit_exact(family, model, "
                     "params) maximizes its ELBO without Monte Carlo noise)")
        hint += "."
    raise TypeError(f"`log_joint` must be callable; got {type(log_joint).__name__}.{hint}")


def check_optimizer(optimizer: Any, name: str = "optimizer"):
    """An ``optax.GradientTransformation``, or a ``TypeError`` with a hint."""
    import optax

    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    hint = ""
    if callable(optimizer) and not hasattr(optimizer, "update"):
        fn = getattr(optimizer, "__name__", "the factory")
        hint = f" Did you mean to call it, e.g. `{fn}(learning_rate)`?"
    raise TypeError(
        f"`{name}` must be an optax.GradientTransformation (e.g. "
        f"optax.adam(1e-2)); got {type(optimizer).__name__}.{hint}"
    )


def check_space(name: str, space: Any) -> tuple:
    """``space`` if it is None or a pair of callables ``(forward, inverse)``; else TypeError."""
    if space is None:
        return space
    if not (isinstance(space, tuple) and len(space) == 2 and all(map(callable, space))):
        length = f" of length {len(space)}" if isinstance(space, (tuple, list)) else ""
        raise TypeError(
            f"`{name}` must be None or a pair of callables (forward, inverse); got "
            f"{type(space).__name__}{length}."
        )
    return space
