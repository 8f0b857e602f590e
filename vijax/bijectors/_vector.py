"""Vector bijectors: ordered vectors and the probability simplex.

Both act on the last axis of a leaf with at least one dimension; leading
axes are independent copies (a ``(n, K)`` leaf is ``n`` ordered vectors), and
``forward_log_det_jacobian`` sums over them.

Saturation (see :mod:`vijax.bijectors._protocol`): ``inverse`` accepts the
closure of the support, the boundary ``forward`` rounds onto far out, and
reads it as the nearest floats inside: equal neighbours of an ordered vector
as one float step apart, a zero entry of a simplex as the smallest normal
float. The result is finite, under ``jit`` too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vijax.bijectors._protocol import Bijector
from vijax.bijectors._protocol import checked_inverse
from vijax.bijectors._protocol import off_boundary
from vijax.bijectors._protocol import off_zero
from vijax.bijectors._protocol import step_inside
from vijax.bijectors._protocol import vector_leaf
from vijax.bijectors._protocol import support_tolerance


def _exclusive_cumsum(a: jax.Array) -> jax.Array:
    """``[0, a0, a0 + a1, ...]`` without the total: the sum over ``j < i``."""
    return jnp.concatenate([jnp.zeros((1,), a.dtype), jnp.cumsum(a[:-1])])


def _reverse_cumsum(a: jax.Array) -> jax.Array:
    """``s_i = sum_{j >= i} a_j``."""
    return jnp.cumsum(a[::-1])[::-1]


# ---------------------------------------------------------------- ordered
def ordered() -> Bijector:
    """Returns the map of ``R^K`` onto strictly increasing vectors.

    ``y_0 = x_0`` and ``y_i = y_{i-1} + exp(x_i)`` along the last axis (as
    Stan's ``ordered`` and numpyro's ``OrderedTransform``). The Jacobian is
    triangular with diagonal ``(1, exp(x_1), ...)``, so
    ``forward_log_det_jacobian(x) = sum(x[..., 1:])``. In float32 a gap
    ``exp(x_i)`` far below ``y``'s resolution rounds away and two entries come
    out equal (for ``x = -30 * ones`` in float32: ``exp(-30)`` is below half
    a float step at 30).

    ``inverse(y) = (y_0, log(y_1 - y_0), ...)``. Equal neighbours (the
    saturated case) are read as one float step apart: ``y_i = y_{i-1}``
    gives the finite ``x_i = log(nextafter(y_{i-1}) - y_{i-1})``, e.g.
    ``-13.2`` at ``y = -30`` in float32, under ``jit`` too. On a concrete
    ``y`` with a decreasing pair (or a non-finite entry) it raises
    ``ValueError``; inside ``jit`` a decreasing pair gives NaN there.

    Returns:
      A :class:`Bijector` named ``"ordered"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from vijax import bijectors
      >>> print(bijectors.ordered().forward(jnp.zeros(3)))
      [0. 1. 2.]
    """

    def forward(x):
        return _ordered_forward(vector_leaf("ordered", "forward", x))

    def inverse(y):
        return _ordered_inverse(vector_leaf("ordered", "inverse", y))

    def in_support(y):
        y = np.asarray(vector_leaf("ordered", "inverse", y))
        # One flag per entry (the first is free) so the message names the
        # first entry that is not above its predecessor.
        first = np.isfinite(y[..., :1])
        # `>= 0`: equal neighbours are where `forward` saturates.
        return np.concatenate([first, (np.diff(y, axis=-1) >= 0) & np.isfinite(y[..., 1:])],
                              axis=-1)

    def log_det(x):
        return jnp.sum(vector_leaf("ordered", "forward_log_det_jacobian", x)[..., 1:])

    return Bijector(
        forward,
        checked_inverse("ordered", inverse, in_support,
                        "non-decreasing vectors (along the last axis)"),
        log_det,
        "ordered",
        lambda y: np.all(np.diff(np.asarray(y), axis=-1) > 0, axis=-1),  # increasing
    )


# ---------------------------------------------------------------- simplex
def simplex() -> Bijector:
    """Returns the stick-breaking map of ``R^(K-1)`` onto the ``K``-simplex.

    As numpyro's ``StickBreakingTransform`` and Stan's simplex transform:
    ``z_i = sigmoid(x_i - log(K-1-i))`` is the fraction of the remaining stick
    taken by ``y_i = z_i * prod_{j<i} (1 - z_j)``, and ``y_{K-1}`` is what is
    left. The shift makes ``x = 0`` the uniform simplex ``(1/K, ..., 1/K)``.
    Shape ``(..., K-1) -> (..., K)``.

    The output has one coordinate more than the input (the last is one minus
    the others), so ``forward_log_det_jacobian`` is the log-determinant of the Jacobian of
    the first ``K-1`` output coordinates (triangular): ``sum_i log y_i +
    log(1 - z_i)``. Everything is evaluated in log space (``log_sigmoid``), so
    the output and the log-determinant stay finite in float32 for ``|x|`` in
    the hundreds, where ``1 - z`` would round to 0.

    ``inverse(y)`` reads ``x_i = log y_i - log(sum_{j>i} y_j) + log(K-1-i)``
    (tail sums, not ``1 - cumsum``, to keep small remainders accurate). On a
    concrete ``y`` it raises ``ValueError`` unless every entry is ``>= 0`` and
    each vector sums to 1 within ``sqrt(eps)`` of its dtype; inside ``jit``
    it does not check: a negative entry gives NaN, and a vector that does not
    sum to 1 is read as its normalization ``y / sum(y)``. A zero entry (on the
    boundary, where ``forward`` underflows: ``x = 30 * ones(3)`` in float32
    gives ``y_3 = 0``) is read as the smallest normal float, so ``x`` stays
    finite (about ``+-87`` at most in float32, ``+-708`` in float64), under
    ``jit`` too.

    Returns:
      A :class:`Bijector` named ``"simplex"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from vijax import bijectors
      >>> print(bijectors.simplex().forward(jnp.array([0.0, 0.0, 0.0])))
      [0.25 0.25 0.25 0.25]
    """

    def forward(x):
        return _simplex_forward(vector_leaf("simplex", "forward", x))

    def inverse(y):
        return _simplex_inverse(vector_leaf("simplex", "inverse", y))

    def log_det(x):
        return _simplex_log_det(vector_leaf("simplex", "forward_log_det_jacobian", x))

    def in_support(y):
        y = np.asarray(vector_leaf("simplex", "inverse", y))
        nonneg = (y >= 0) & np.isfinite(y)
        if not nonneg.all():
            return nonneg  # element-wise: the message names the first bad entry
        # One flag per vector: the message shows the whole array.
        return np.abs(y.sum(axis=-1) - 1) <= support_tolerance(y.dtype)

    return Bijector(
        forward,
        checked_inverse("simplex", inverse, in_support,
                        "the probability simplex (entries >= 0 summing to 1 along the last axis)"),
        log_det,
        "simplex",
        lambda y: np.all(np.asarray(y) > 0, axis=-1),  # no entry on the boundary, 0
    )


# ---------------------------------------------------------------- kernels
# One vector each, vectorized over leading axes; jitted once per shape and
# dtype because run eagerly their dozens of small ops each dispatch (and
# compile) on their own. They compose with the caller's jit, vmap and grad.
def _ordered_forward_one(x):
    return jnp.concatenate([x[:1], x[0] + jnp.cumsum(jnp.exp(x[1:]))])


def _ordered_inverse_one(y):
    # Equal neighbours (saturation) read as one float step apart.
    gap = off_boundary(jnp.diff(y), step_inside(y[:-1], jnp.inf))
    return jnp.concatenate([y[:1], jnp.log(gap)])


_ordered_forward = jax.jit(jnp.vectorize(_ordered_forward_one, signature="(k)->(k)"))
_ordered_inverse = jax.jit(jnp.vectorize(_ordered_inverse_one, signature="(k)->(k)"))


def _stick_offsets(n: int, dtype) -> jax.Array:
    return jnp.log(jnp.arange(n, 0, -1)).astype(dtype)  # log(K-1-i), i < K-1


def _stick_log_parts(x):
    """``log z`` and ``log(1 - z)`` with ``z = sigmoid(x - log(K-1-i))``."""
    u = x - _stick_offsets(x.shape[0], x.dtype)
    return jax.nn.log_sigmoid(u), jax.nn.log_sigmoid(-u)


def _simplex_forward_one(x):
    log_z, log_1mz = _stick_log_parts(x)
    # log of the stick left before piece i: sum_{j<i} log(1 - z_j), i = 0..K-1.
    log_rest = jnp.concatenate([jnp.zeros((1,), x.dtype), jnp.cumsum(log_1mz)])
    # The last piece takes all that is left (z_{K-1} = 1).
    return jnp.exp(jnp.concatenate([log_z, jnp.zeros((1,), x.dtype)]) + log_rest)


def _simplex_log_det_one(x):
    log_z, log_1mz = _stick_log_parts(x)
    # log y_i = log z_i + sum_{j<i} log(1 - z_j); dy_i/dx_i = y_i (1 - z_i).
    return jnp.sum(log_z + _exclusive_cumsum(log_1mz) + log_1mz)


def _simplex_inverse_one(y):
    # A zero entry (saturation) read as the smallest normal float.
    y = off_zero(y)
    tail = _reverse_cumsum(y)[1:]  # sum_{j>i} y_j, i < K-1
    return jnp.log(y[:-1]) - jnp.log(tail) + _stick_offsets(y.shape[0] - 1, y.dtype)


_simplex_forward = jax.jit(jnp.vectorize(_simplex_forward_one, signature="(n)->(k)"))
_simplex_inverse = jax.jit(jnp.vectorize(_simplex_inverse_one, signature="(k)->(n)"))


@jax.jit
def _simplex_log_det(x):
    return jnp.sum(jnp.vectorize(_simplex_log_det_one, signature="(n)->()")(x))
