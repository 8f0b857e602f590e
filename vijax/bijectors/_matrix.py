"""Matrix bijectors: Cholesky factors of correlation and covariance matrices.

Both take a vector (the free entries, in the row-major order of
``jnp.tril_indices``) to a ``(d, d)`` lower-triangular matrix; ``d`` is read
from the vector's length in ``forward`` and from the matrix's shape in
``inverse``. Leading axes are independent copies (``(..., n) -> (..., d,
d)``) and ``forward_log_det_jacobian`` sums over them.

Saturation (see :mod:`vijax.bijectors._protocol`): far out, ``forward``
returns a diagonal entry that underflows to 0, the boundary of the support.
``inverse`` accepts a nonnegative diagonal and reads a zero diagonal entry as
the smallest normal float, so the result is finite, under ``jit`` too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vijax.bijectors._protocol import Bijector
from vijax.bijectors._protocol import as_leaf
from vijax.bijectors._protocol import checked_inverse
from vijax.bijectors._protocol import off_zero
from vijax.bijectors._protocol import vector_leaf
from vijax.bijectors._protocol import support_tolerance


def _dim_from_length(name: str, n: int, strict: bool) -> int:
    """``d`` with ``n = d(d-1)/2`` (``strict``) or ``n = d(d+1)/2``, else ``ValueError``."""
    # d(d -+ 1)/2 = n  <=>  d = (+-1 + sqrt(1 + 8n)) / 2
    d = (math.isqrt(1 + 8 * n) + (1 if strict else -1)) // 2
    if (d * (d - 1) if strict else d * (d + 1)) // 2 != n:
        formula = "d(d-1)/2" if strict else "d(d+1)/2"
        examples = "0, 1, 3, 6, 10, ..." if strict else "1, 3, 6, 10, 15, ..."
        raise ValueError(
            f"The {name!r} bijector's `forward` needs a last axis of length {formula} "
            f"for a (d, d) output ({examples}); got length {n}."
        )
    return d


def _matrix_leaf(name: str, y) -> jax.Array:
    y = as_leaf(y)
    if y.ndim < 2 or y.shape[-1] != y.shape[-2]:
        raise ValueError(
            f"The {name!r} bijector's `inverse` needs square matrices in the last two "
            f"axes, shape (..., d, d); got shape {tuple(y.shape)}."
        )
    return y


def _log1m_tanh_sq(x: jax.Array) -> jax.Array:
    """``log(1 - tanh(x)^2)`` without forming ``tanh(x)^2``, which rounds to 1."""
    # 1 - tanh^2 = 4 / (e^x + e^-x)^2 = 4 e^{-2|x|} / (1 + e^{-2|x|})^2
    a = jnp.abs(x)
    return 2.0 * (jnp.log(2.0).astype(x.dtype) - a - jax.nn.softplus(-2.0 * a))


def _lower_mask(y: np.ndarray, tol: float) -> np.ndarray:
    """Per entry: finite, and ``|entry| <= tol`` above the diagonal, ``>= 0`` on it.

    ``>= 0``: a zero diagonal entry is where ``forward`` underflows (saturation).
    """
    d = y.shape[-1]
    upper = np.triu(np.ones((d, d), bool), 1)
    diag = np.eye(d, dtype=bool)
    return (np.isfinite(y) & np.where(upper, np.abs(y) <= tol, True)
            & np.where(diag, y >= 0, True))


def _positive_diagonal(y) -> np.ndarray:
    """Per matrix: a diagonal of positive entries (a Bijector's ``interior``; 0 is the boundary)."""
    return np.all(np.diagonal(np.asarray(y), axis1=-2, axis2=-1) > 0, axis=-1)


# ---------------------------------------------------------------- corr_cholesky
def corr_cholesky() -> Bijector:
    """Returns the map of ``R^(d(d-1)/2)`` onto Cholesky factors of correlation matrices.

    The LKJ construction of Stan's ``cholesky_factor_corr`` and numpyro's
    ``CorrCholeskyTransform``: ``t = tanh(x)`` are canonical partial
    correlations, filled row by row into the strict lower triangle
    (row-major, the order of ``jnp.tril_indices(d, -1)``), and row ``i`` is
    ``L_ij = t_ij * sqrt(1 - sum_{k<j} L_ik^2)``, ``L_ii = sqrt(1 - sum_{k<i}
    L_ik^2)``. Every row has unit norm, so ``L @ L.T`` has a unit diagonal
    and is positive definite. ``d`` is read from the input's length
    (``n = d(d-1)/2``), shape ``(..., n) -> (..., d, d)``.

    ``forward_log_det_jacobian`` is the log-determinant of the Jacobian of the
    strict lower triangle (in the order above) with respect to ``x``; it is
    triangular, with diagonal ``(1 - t_ij^2) * sqrt(1 - sum_{k<j} L_ik^2)``.
    ``log(1 - t^2)`` is computed as ``2 (log 2 - |x| - softplus(-2|x|))`` and
    the remaining norms as sums of those logs, so the output and the
    log-determinant stay finite in float32 at ``|x| = 30`` (where ``tanh``
    rounds to 1). References: Lewandowski, Kurowicka and Joe (2009),
    "Generating random correlation matrices based on vines and extended onion
    method"; the Stan reference manual, "Cholesky factors of correlation
    matrices".

    ``inverse(L)`` reads ``x_ij = asinh(L_ij / sqrt(sum_{k>j} L_ik^2))`` (equal
    to ``atanh`` of the partial correlation for a unit-norm row, and accurate
    when it is near +-1; the tail norms are scaled sums, ``hypot``, so they do
    not underflow where their squares would); only the lower triangle is
    read. Far out (``x = 30 * ones(6)`` in float32) ``forward`` returns a
    diagonal entry that underflows to 0, on the boundary of the support:
    ``inverse`` reads it as the smallest normal float, so ``x`` stays finite
    (at most about ``+-88`` in float32, ``+-709`` in float64), under ``jit``
    too. On a concrete ``L`` it raises ``ValueError`` unless ``L`` is
    lower-triangular with a nonnegative diagonal and rows of unit norm,
    within ``sqrt(eps)`` of its dtype; inside ``jit`` it does not check: a
    row that is not unit-norm is read as if it were normalized.

    Returns:
      A :class:`Bijector` named ``"corr_cholesky"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from vijax import bijectors
      >>> L = bijectors.corr_cholesky().forward(jnp.array([0.5, 0.0, 0.0]))  # d = 3
      >>> print(jnp.round(L @ L.T, 3))
      [[1.    0.462 0.   ]
       [0.462 1.    0.   ]
       [0.    0.    1.   ]]
    """
    name = "corr_cholesky"

    def forward(x):
        x = vector_leaf(name, "forward", x)
        _dim_from_length(name, x.shape[-1], strict=True)  # the error, before tracing
        return _corr_forward(x)

    def log_det(x):
        x = vector_leaf(name, "forward_log_det_jacobian", x)
        _dim_from_length(name, x.shape[-1], strict=True)
        return _corr_log_det(x)

    def inverse(y):
        return _corr_inverse(_matrix_leaf(name, y))

    def in_support(y):
        y = np.asarray(_matrix_leaf(name, y))
        tol = support_tolerance(y.dtype)
        ok = _lower_mask(y, tol)
        if not ok.all():
            return ok  # element-wise: the message names the first bad entry
        # One flag per row: the message shows the whole array.
        return np.abs(np.sum(np.tril(y) ** 2, axis=-1) - 1) <= tol

    return Bijector(
        forward,
        checked_inverse(name, inverse, in_support,
                        "Cholesky factors of correlation matrices (lower-triangular, "
                        "nonnegative diagonal, unit-norm rows)"),
        log_det,
        name,
        _positive_diagonal,
    )


# ---------------------------------------------------------------- lower_cholesky
def lower_cholesky() -> Bijector:
    """Returns the map of ``R^(d(d+1)/2)`` onto Cholesky factors of covariance matrices.

    The input fills the lower triangle, diagonal included, row by row (the
    order of ``jnp.tril_indices(d)``); the diagonal entries go through
    ``exp`` so they are positive, the others are copied. ``L @ L.T`` is then
    any positive-definite matrix, once. Shape ``(..., d(d+1)/2) -> (..., d,
    d)``.

    The diagonal uses ``exp``, as Stan's ``cholesky_factor_cov`` and numpyro's
    ``LowerCholeskyTransform`` do, so log-densities agree with theirs and
    ``x = 0`` is the identity matrix. In float32 a diagonal entry overflows
    for ``x`` above about 88 (use a :func:`softplus`-style parametrization of
    your own if the optimizer can go there); ``|x| = 30`` is fine.

    ``forward_log_det_jacobian`` is the log-determinant of the Jacobian of the
    lower triangle (diagonal included, in the order above): the sum of the
    diagonal entries of ``x``.

    ``inverse(L)`` reads the lower triangle and takes ``log`` of the diagonal.
    A zero diagonal entry (where ``exp`` underflows, ``x`` below about -87 in
    float32) is read as the smallest normal float: ``log`` gives ``-87.3``
    in float32 and ``-708.4`` in float64, under ``jit`` too. On a concrete
    ``L`` it raises ``ValueError`` unless ``L`` is finite, lower-triangular
    (above-diagonal entries within ``sqrt(eps) * max(1, max|L|)`` of 0) and
    has a nonnegative diagonal; inside ``jit`` it does not check: the upper
    triangle is ignored and a negative diagonal entry gives NaN.

    Returns:
      A :class:`Bijector` named ``"lower_cholesky"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from vijax import bijectors
      >>> L = bijectors.lower_cholesky().forward(jnp.array([0.0, 0.5, 0.0]))  # d = 2
      >>> print(L)
      [[1.  0. ]
       [0.5 1. ]]
    """
    name = "lower_cholesky"

    def forward(x):
        x = vector_leaf(name, "forward", x)
        _dim_from_length(name, x.shape[-1], strict=False)  # the error, before tracing
        return _lower_forward(x)

    def log_det(x):
        x = vector_leaf(name, "forward_log_det_jacobian", x)
        d = _dim_from_length(name, x.shape[-1], strict=False)
        return jnp.sum(x[..., _diag_positions(d)])

    def inverse(y):
        return _lower_inverse(_matrix_leaf(name, y))

    def in_support(y):
        y = np.asarray(_matrix_leaf(name, y))
        scale = max(1.0, float(np.max(np.abs(y), initial=0.0, where=np.isfinite(y))))
        return _lower_mask(y, support_tolerance(y.dtype) * scale)

    return Bijector(
        forward,
        checked_inverse(name, inverse, in_support,
                        "lower-triangular matrices with a nonnegative diagonal"),
        log_det,
        name,
        _positive_diagonal,
    )


# ---------------------------------------------------------------- kernels
# One vector (matrix) each, vectorized over leading axes; jitted once per
# shape and dtype because run eagerly their dozens of small ops each dispatch
# (and compile) on their own. They compose with the caller's jit, vmap and
# grad. ``d`` comes from the static shape.
def _corr_parts(x):
    """``tanh(x)``, ``log(1 - tanh(x)^2)`` and the log remaining squared norms, as (d, d)."""
    d = _dim_from_length("corr_cholesky", x.shape[0], strict=True)
    rows, cols = np.tril_indices(d, -1)

    def fill(v):
        return jnp.zeros((d, d), x.dtype).at[rows, cols].set(v)

    log1m_t2 = fill(_log1m_tanh_sq(x))
    # log of the squared norm left before column j: sum_{k<j} log(1 - t_ik^2).
    log_rest = jnp.concatenate(
        [jnp.zeros((d, 1), x.dtype), jnp.cumsum(log1m_t2, axis=-1)[:, :-1]], axis=-1)
    return fill(jnp.tanh(x)), log1m_t2, log_rest


def _corr_forward_one(x):
    t, _, log_rest = _corr_parts(x)
    # Above the diagonal t = 0 and eye = 0, so L stays lower-triangular.
    return (t + jnp.eye(t.shape[0], dtype=x.dtype)) * jnp.exp(0.5 * log_rest)


def _corr_log_det_one(x):
    _, log1m_t2, log_rest = _corr_parts(x)
    rows, cols = np.tril_indices(log_rest.shape[0], -1)
    return jnp.sum(log1m_t2[rows, cols] + 0.5 * log_rest[rows, cols])


def _corr_inverse_one(y):
    d = y.shape[0]
    rows, cols = np.tril_indices(d, -1)
    on_diag = np.eye(d, dtype=bool)
    lower = jnp.tril(y)
    # A zero diagonal entry (saturation) read as the smallest normal float.
    lower = jnp.where(on_diag, off_zero(lower),
                      lower)
    # sqrt(sum_{k>j} L_ik^2) (it holds L_ii > 0 for j < i): a tail norm, not
    # 1 - sum_{k<=j}, which cancels when a partial correlation is near +-1;
    # taken by hypot, which scales, where the squares of a row far out
    # (L_ik ~ 1e-26 in float32) would underflow to 0 and the ratio be inf.
    norms = jax.lax.associative_scan(jnp.hypot, lower, reverse=True, axis=1)
    after = jnp.concatenate([norms[:, 1:], jnp.zeros((d, 1), y.dtype)], axis=-1)
    return jnp.arcsinh(lower[rows, cols] / after[rows, cols])


_corr_forward = jax.jit(jnp.vectorize(_corr_forward_one, signature="(n)->(d,d)"))
_corr_inverse = jax.jit(jnp.vectorize(_corr_inverse_one, signature="(d,d)->(n)"))


@jax.jit
def _corr_log_det(x):
    return jnp.sum(jnp.vectorize(_corr_log_det_one, signature="(n)->()")(x))


def _diag_positions(d: int) -> np.ndarray:
    # (i, i) is entry i(i+1)/2 + i of the row-major lower triangle.
    i = np.arange(d)
    return i * (i + 3) // 2


def _lower_forward_one(x):
    d = _dim_from_length("lower_cholesky", x.shape[0], strict=False)
    rows, cols = np.tril_indices(d)
    on_diag = _diag_positions(d)
    # exp only on the diagonal entries: an exp of an off-diagonal entry
    # discarded by a `where` could overflow and poison the gradient.
    v = x.at[on_diag].set(jnp.exp(x[on_diag]))
    return jnp.zeros((d, d), x.dtype).at[rows, cols].set(v)


def _lower_inverse_one(y):
    d = y.shape[0]
    rows, cols = np.tril_indices(d)
    on_diag = _diag_positions(d)
    v = y[rows, cols]
    # A zero diagonal entry (saturation) read as the smallest normal float.
    diag = off_zero(v[on_diag])
    return v.at[on_diag].set(jnp.log(diag))


_lower_forward = jax.jit(jnp.vectorize(_lower_forward_one, signature="(n)->(d,d)"))
_lower_inverse = jax.jit(jnp.vectorize(_lower_inverse_one, signature="(d,d)->(n)"))
