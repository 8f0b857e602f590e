"""Element-wise bijectors: each output entry depends on one input entry.

They act on a leaf of any shape (a scalar too), and their
``forward_log_det_jacobian`` is the sum of the element-wise terms over the
leaf. Parameters (``low``, ``high``, ``shift``, ``scale``) are cast to the
input's dtype when applied, so a Python-float parameter never promotes a
float32 leaf to float64; an array parameter must broadcast to the leaf's
shape (the output keeps the leaf's shape).

Saturation (see :mod:`vijax.bijectors._protocol`): ``inverse`` accepts the
closed support (``[0, inf)``, ``[low, inf)``, ``(-inf, high]``, ``[low,
high]``) and reads a bound as the nearest float inside it, so a bound that
``forward`` rounded onto maps back to the finite ``x`` where saturation
starts, e.g. ``log(1.19e-7) = -15.9`` for ``lower_bounded(-1.5)`` at ``-1.5``
in float32 (``-36.0`` in float64), ``log(tiny) = -87.3`` for ``exp`` at 0
(``-708.4``). A value beyond a bound still raises on concrete input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks
from vijax.bijectors._protocol import Bijector
from vijax.bijectors._protocol import as_leaf
from vijax.bijectors._protocol import checked_inverse
from vijax.bijectors._protocol import off_boundary
from vijax.bijectors._protocol import off_zero
from vijax.bijectors._protocol import step_inside


# ---------------------------------------------------------------- parameters
def _param(bijector: str, name: str, value: Any):
    """A bijector parameter, checked when concrete: real, finite.

    Returns a NumPy float array (concrete) or the traced value as is, so a
    factory called inside ``jit``/``vmap`` with traced parameters still works
    (unchecked).
    """
    if not _checks.is_concrete(value):
        return value
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise TypeError(
            f"`{name}` of the {bijector!r} bijector must be a real number or array; "
            f"got {value!r}."
        )
    try:
        a = np.asarray(value)
    except Exception as e:  # pragma: no cover - exotic input
        raise TypeError(
            f"`{name}` of the {bijector!r} bijector must be a real number or array; "
            f"got {type(value).__name__}."
        ) from e
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(
            f"`{name}` of the {bijector!r} bijector must be a real number or array; "
            f"got dtype {a.dtype}."
        )
    a = a.astype(np.result_type(a.dtype, np.float32))
    if not np.all(np.isfinite(a)):
        bad = a.ravel()[~np.isfinite(a.ravel())][0].item()
        raise ValueError(
            f"`{name}` of the {bijector!r} bijector must be finite; got {bad!r}"
            + (f" in an array of shape {a.shape}" if a.ndim else "") + "."
        )
    return a


def _apply(bijector: str, name: str, value, x: jax.Array) -> jax.Array:
    """``value`` in ``x``'s dtype, broadcast to ``x``'s shape.

    The broadcast is explicit so it works under
    ``jax_numpy_rank_promotion="raise"``; a parameter that would change the
    leaf's shape is an error (the map must stay a bijection of the leaf).
    """
    v = jnp.asarray(value, dtype=x.dtype)
    if v.ndim == 0:
        return v
    _check_broadcast(bijector, name, v.shape, x.shape)
    return jnp.broadcast_to(v, x.shape)


def _check_broadcast(bijector: str, name: str, shape: tuple, leaf_shape: tuple) -> None:
    try:
        ok = np.broadcast_shapes(shape, leaf_shape) == tuple(leaf_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"`{name}` of the {bijector!r} bijector has shape {tuple(shape)}, which "
            f"does not broadcast to the leaf's shape {tuple(leaf_shape)}."
        )


def _fmt(name: str, a) -> str:
    """A parameter for a support message: its value if a concrete scalar, else its name."""
    if isinstance(a, np.ndarray) and a.ndim == 0:
        return repr(a.item())
    return f"`{name}`"


# ---------------------------------------------------------------- supports
# In NumPy: `checked_inverse` calls these on concrete values only, and NumPy
# answers at once where each eager jnp comparison would compile first.
def _finite(y) -> np.ndarray:
    return np.isfinite(np.asarray(y))


def _nonnegative(y) -> np.ndarray:
    # The closure of (0, inf): 0 is where `forward` underflows (saturation).
    y = np.asarray(y)
    return (y >= 0) & (y < np.inf)


def _positive(y) -> np.ndarray:
    # The support itself, (0, inf): a Bijector's `interior`.
    y = np.asarray(y)
    return (y > 0) & (y < np.inf)


def _between(bijector: str, y, low=None, high=None, strict: bool = False) -> np.ndarray:
    """``low <= y <= high`` element-wise; ``low``/``high`` are ``(name, value)`` or ``None``.

    The closure of the support: a bound is where ``forward`` saturates, and
    ``inverse`` reads it as the nearest float inside (see the module docstring).
    ``strict``: ``low < y < high``, the support itself (a Bijector's ``interior``).

    A traced bound (a factory called inside a trace) cannot be compared:
    then only finiteness is checked.
    """
    y = np.asarray(y)
    ok = np.isfinite(y)
    for bound, above in ((low, True), (high, False)):
        if bound is None:
            continue
        name, value = bound
        if not _checks.is_concrete(value):
            continue
        # In y's float dtype, as the inverse will compute.
        value = np.asarray(value, y.dtype if np.issubdtype(y.dtype, np.floating) else None)
        _check_broadcast(bijector, name, value.shape, y.shape)
        if strict:
            ok &= (y > value) if above else (y < value)
        else:
            ok &= (y >= value) if above else (y <= value)
    return ok


# ---------------------------------------------------------------- factories
def identity() -> Bijector:
    """Returns the identity bijector, ``y = x`` on any shape.

    ``forward_log_det_jacobian`` is 0 in the input's dtype. ``inverse`` on a
    concrete value rejects NaN and infinities with a ``ValueError``; inside
    ``jit`` it passes them through.

    Returns:
      A :class:`Bijector` named ``"identity"``.
    """

    def forward(x):
        return as_leaf(x)

    def inverse(y):
        return as_leaf(y)

    def log_det(x):
        x = as_leaf(x)
        return jnp.zeros((), x.dtype)

    return Bijector(
        forward,
        checked_inverse("identity", inverse, _finite, "the finite reals"),
        log_det,
        "identity",
    )


def exp() -> Bijector:
    """Returns ``y = exp(x)``, onto the positive reals ``(0, inf)``.

    ``forward_log_det_jacobian(x) = sum(x)``. In float32, ``x`` above about 88
    overflows to ``inf`` and ``x`` below about -103 underflows to 0; prefer
    :func:`softplus` when the optimizer may push the latent far out.

    ``inverse(y) = log(y)``. ``y = 0`` (where ``forward`` underflows) is read
    as the smallest normal float: ``inverse(0) = -87.3`` in float32 and
    ``-708.4`` in float64, under ``jit`` too. On a concrete ``y`` outside
    ``[0, inf)`` it raises ``ValueError``; inside ``jit`` a negative ``y``
    gives NaN.

    Returns:
      A :class:`Bijector` named ``"exp"``.

    Example:
      >>> from vijax import bijectors
      >>> b = bijectors.exp()
      >>> float(b.forward(0.0)), float(b.inverse(1.0))
      (1.0, 0.0)
    """

    def forward(x):
        return jnp.exp(as_leaf(x))

    def inverse(y):
        return _exp_inverse(as_leaf(y))

    def log_det(x):
        return jnp.sum(as_leaf(x))

    return Bijector(
        forward,
        checked_inverse("exp", inverse, _nonnegative, "[0, inf)"),
        log_det,
        "exp",
        _positive,
    )


def softplus() -> Bijector:
    """Returns ``y = softplus(x) = log(1 + exp(x))``, onto ``(0, inf)``.

    Linear for large ``x`` (no overflow, gradients of order one), ``exp(x)``
    for very negative ``x``. ``forward_log_det_jacobian(x) =
    sum(log_sigmoid(x))``, finite for any finite ``x``.

    ``inverse(y) = y + log(-expm1(-y))``, accurate for tiny and huge ``y``.
    ``y = 0`` (where ``forward`` underflows, ``x`` below about -87 in
    float32) is read as the smallest normal float, as for :func:`exp`. On a
    concrete ``y`` outside ``[0, inf)`` it raises ``ValueError``; inside
    ``jit`` a negative ``y`` gives NaN.

    Returns:
      A :class:`Bijector` named ``"softplus"``.
    """

    def forward(x):
        return jax.nn.softplus(as_leaf(x))

    def inverse(y):
        return _softplus_inverse(as_leaf(y))

    def log_det(x):
        return jnp.sum(jax.nn.log_sigmoid(as_leaf(x)))

    return Bijector(
        forward,
        checked_inverse("softplus", inverse, _nonnegative, "[0, inf)"),
        log_det,
        "softplus",
        _positive,
    )


def lower_bounded(low) -> Bijector:
    """Returns ``y = low + exp(x)``, onto ``(low, inf)``.

    ``forward_log_det_jacobian(x) = sum(x)``. ``forward`` rounds onto ``low``
    once ``exp(x)`` is below half a float step at ``low`` (for ``low = -1.5``:
    ``x`` below about -17 in float32, -37 in float64); the log-determinant
    stays exact.

    Args:
      low: the lower bound, a finite number or an array that broadcasts to
        the leaf's shape.

    Returns:
      A :class:`Bijector` named ``"lower_bounded"``. Its ``inverse(y) =
      log(y - low)`` reads ``y = low`` as the next float above ``low`` (a
      finite ``x``, where ``forward`` starts to saturate), under ``jit`` too;
      it raises ``ValueError`` on a concrete ``y < low``; inside ``jit`` such
      a ``y`` gives NaN.

    Raises:
      ValueError: ``low`` is not finite.
      TypeError: ``low`` is not a real number or array.
    """
    low = _param("lower_bounded", "low", low)

    def forward(x):
        x = as_leaf(x)
        return _apply("lower_bounded", "low", low, x) + jnp.exp(x)

    def inverse(y):
        y = as_leaf(y)
        return _lower_inverse(y, _apply("lower_bounded", "low", low, y))

    def in_support(y):
        return _between("lower_bounded", y, low=("low", low))

    def log_det(x):
        return jnp.sum(as_leaf(x))

    return Bijector(
        forward,
        checked_inverse("lower_bounded", inverse, in_support, f"[{_fmt('low', low)}, inf)"),
        log_det,
        "lower_bounded",
        lambda y: _between("lower_bounded", y, low=("low", low), strict=True),
    )


def upper_bounded(high) -> Bijector:
    """Returns ``y = high - exp(x)``, onto ``(-inf, high)``.

    ``forward_log_det_jacobian(x) = sum(x)``. ``forward`` rounds onto
    ``high`` once ``exp(x)`` is below half a float step at ``high``; the
    log-determinant stays exact.

    Args:
      high: the upper bound, a finite number or an array that broadcasts to
        the leaf's shape.

    Returns:
      A :class:`Bijector` named ``"upper_bounded"``. Its ``inverse(y) =
      log(high - y)`` reads ``y = high`` as the next float below ``high`` (a
      finite ``x``, where ``forward`` starts to saturate), under ``jit`` too;
      it raises ``ValueError`` on a concrete ``y > high``; inside ``jit`` such
      a ``y`` gives NaN.

    Raises:
      ValueError: ``high`` is not finite.
      TypeError: ``high`` is not a real number or array.
    """
    high = _param("upper_bounded", "high", high)

    def forward(x):
        x = as_leaf(x)
        return _apply("upper_bounded", "high", high, x) - jnp.exp(x)

    def inverse(y):
        y = as_leaf(y)
        return _upper_inverse(y, _apply("upper_bounded", "high", high, y))

    def in_support(y):
        return _between("upper_bounded", y, high=("high", high))

    def log_det(x):
        return jnp.sum(as_leaf(x))

    return Bijector(
        forward,
        checked_inverse("upper_bounded", inverse, in_support, f"(-inf, {_fmt('high', high)}]"),
        log_det,
        "upper_bounded",
        lambda y: _between("upper_bounded", y, high=("high", high), strict=True),
    )


def interval(low, high) -> Bijector:
    """Returns ``y = low + (high - low) * sigmoid(x)``, onto ``(low, high)``.

    The forward map is evaluated from the nearer bound (``high - (high - low)
    * sigmoid(-x)`` for ``x > 0``), so values near either end keep their
    relative precision; still, a bound away from 0 is reached once
    ``(high - low) * sigmoid(-|x|)`` is below half a float step there (for
    ``interval(-1, 3)``: ``|x|`` above about 17 in float32, 37 in float64).
    ``forward_log_det_jacobian(x) = sum(log(high - low) + log_sigmoid(x) +
    log_sigmoid(-x))``, finite for any finite ``x``.

    Args:
      low: the lower bound, finite, a number or an array that broadcasts to
        the leaf's shape.
      high: the upper bound, finite, ``> low`` element-wise.

    Returns:
      A :class:`Bijector` named ``"interval"``. Its ``inverse(y) = log(y -
      low) - log(high - y)`` reads a bound as the nearest float inside (a
      finite ``x``, where ``forward`` starts to saturate: ``inverse(3.0) =
      16.6`` for ``interval(-1, 3)`` in float32), under ``jit`` too; it
      raises ``ValueError`` on a concrete ``y`` outside ``[low, high]``;
      inside ``jit`` such a ``y`` gives NaN.

    Raises:
      ValueError: a bound is not finite, or ``low >= high`` somewhere.
      TypeError: a bound is not a real number or array.

    Example:
      >>> from vijax import bijectors
      >>> b = bijectors.interval(0.0, 1.0)   # the logistic map
      >>> float(b.forward(0.0))
      0.5
    """
    low = _param("interval", "low", low)
    high = _param("interval", "high", high)
    if isinstance(low, np.ndarray) and isinstance(high, np.ndarray):
        try:
            lo, hi = np.broadcast_arrays(low, high)
        except ValueError:
            raise ValueError(
                f"`low` and `high` of the 'interval' bijector must broadcast together; "
                f"got shapes {low.shape} and {high.shape}."
            ) from None
        if not np.all(lo < hi):
            i = np.argwhere(~(lo < hi))[0] if lo.ndim else ()
            raise ValueError(
                "The 'interval' bijector needs `low` < `high`; got "
                + (f"low={lo.item()!r} and high={hi.item()!r}." if lo.ndim == 0 else
                   f"low={lo[tuple(i)].item()!r} >= high={hi[tuple(i)].item()!r} at "
                   f"index {tuple(int(k) for k in i)}.")
            )

    def bounds(x):
        return _apply("interval", "low", low, x), _apply("interval", "high", high, x)

    def forward(x):
        x = as_leaf(x)
        return _interval_forward(x, *bounds(x))

    def inverse(y):
        y = as_leaf(y)
        return _interval_inverse(y, *bounds(y))

    def in_support(y):
        return _between("interval", y, low=("low", low), high=("high", high))

    def log_det(x):
        x = as_leaf(x)
        return _interval_log_det(x, *bounds(x))

    support = f"[{_fmt('low', low)}, {_fmt('high', high)}]"
    return Bijector(forward, checked_inverse("interval", inverse, in_support, support), log_det,
                    "interval",
                    lambda y: _between("interval", y, low=("low", low), high=("high", high),
                                       strict=True))


def affine(shift=0.0, scale=1.0) -> Bijector:
    """Returns ``y = shift + scale * x``, a bijection of the reals.

    ``forward_log_det_jacobian(x) = sum(log|scale|)`` over the leaf (a
    scalar ``scale`` counts once per element).

    Args:
      shift: a finite number or an array that broadcasts to the leaf's shape.
      scale: a finite, nonzero number or array (negative flips the axis) that
        broadcasts to the leaf's shape.

    Returns:
      A :class:`Bijector` named ``"affine"``. Its ``inverse(y) = (y - shift) /
      scale`` rejects a concrete non-finite ``y`` with ``ValueError``; inside
      ``jit`` it passes it through.

    Raises:
      ValueError: ``shift`` or ``scale`` is not finite, or ``scale`` has a zero.
      TypeError: ``shift`` or ``scale`` is not a real number or array.

    Example:
      >>> import jax.numpy as jnp
      >>> from vijax import bijectors
      >>> b = bijectors.affine(shift=1.0, scale=jnp.array([1.0, 2.0]))
      >>> print(b.forward(jnp.ones(2)))
      [2. 3.]
    """
    shift = _param("affine", "shift", shift)
    scale = _param("affine", "scale", scale)
    if isinstance(scale, np.ndarray) and np.any(scale == 0):
        raise ValueError(
            "`scale` of the 'affine' bijector must be nonzero (else the map is not "
            "invertible); got "
            + (f"{scale.item()!r}." if scale.ndim == 0 else
               f"a zero at index {tuple(int(k) for k in np.argwhere(scale == 0)[0])}.")
        )

    def forward(x):
        x = as_leaf(x)
        return _apply("affine", "shift", shift, x) + _apply("affine", "scale", scale, x) * x

    def inverse(y):
        y = as_leaf(y)
        return (y - _apply("affine", "shift", shift, y)) / _apply("affine", "scale", scale, y)

    def log_det(x):
        x = as_leaf(x)
        s = jnp.broadcast_to(_apply("affine", "scale", scale, x), x.shape)
        return jnp.sum(jnp.log(jnp.abs(s)))

    return Bijector(forward, checked_inverse("affine", inverse, _finite, "the finite reals"),
                    log_det, "affine")


# ---------------------------------------------------------------- kernels
# Jitted once per shape and dtype: run eagerly, each small op would dispatch
# (and compile) on its own. They compose with the caller's jit, vmap and grad.
@jax.jit
def _exp_inverse(y):
    return jnp.log(off_zero(y))


@jax.jit
def _softplus_inverse(y):
    y = off_zero(y)
    # log(exp(y) - 1) rewritten so exp(y) never overflows and y -> 0 keeps its
    # precision.
    return y + jnp.log(-jnp.expm1(-y))


@jax.jit
def _lower_inverse(y, lo):
    return jnp.log(off_boundary(y - lo, step_inside(lo, jnp.inf)))


@jax.jit
def _upper_inverse(y, hi):
    return jnp.log(off_boundary(hi - y, step_inside(hi, -jnp.inf)))


@jax.jit
def _interval_forward(x, lo, hi):
    width = hi - lo
    # From the nearer bound, so y keeps its digits next to either end.
    return jnp.where(x < 0, lo + width * jax.nn.sigmoid(x), hi - width * jax.nn.sigmoid(-x))


@jax.jit
def _interval_inverse(y, lo, hi):
    # logit((y - low) / (high - low)) without forming the ratio, which would
    # lose the digits of y near either bound; a bound is read as the float
    # next to it inside (saturation, see the module docstring).
    return (jnp.log(off_boundary(y - lo, step_inside(lo, jnp.inf)))
            - jnp.log(off_boundary(hi - y, step_inside(hi, -jnp.inf))))


@jax.jit
def _interval_log_det(x, lo, hi):
    # log(sigmoid'(x)) = log_sigmoid(x) + log_sigmoid(-x): no 0 * inf at |x| large.
    return jnp.sum(jnp.log(hi - lo) + jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x))
