"""Multivariate Gaussians with structured scales, and their closed-form KL.

A :class:`Gaussian` is a flat mean of shape ``(d,)`` and a *scale*: one of

* :class:`DiagonalScale`   cov = diag(scale**2)                   O(d)
* :class:`CholeskyScale`   cov = L L^T, L lower triangular         O(d^2)
* :class:`LowRankScale`    cov = W W^T + diag(diag_scale**2)        O(d k)
* :class:`LowRankPrecisionScale`  precision = U U^T + diag(diag_scale**-2)  O(d k)
* :class:`PrecisionScale`  cov = (L L^T)^{-1}, L the Cholesky factor of the
  precision (what conjugate posteriors come as; no inverse is ever formed)

Every scale implements the same handful of operations (apply a base draw,
log-determinant, Mahalanobis norm, covariance diagonal, ``S^T A``, traces), and
:func:`gaussian_kl` is written once against them, so each pair of structures
gets the cheapest formula: diagonal against diagonal is O(d), low rank goes
through the Woodbury identity and the matrix determinant lemma, and nothing
ever calls a matrix inverse. The dense covariance is built only on request
(:attr:`Gaussian.cov`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from vijax import _checks

_LOG_2PI = math.log(2.0 * math.pi)


def _solve_lower(tril: jax.Array, b: jax.Array, *, transpose: bool = False):
    """Solves ``L x = b`` (or ``L^T x = b``) for a (d, m) right-hand side."""
    return solve_triangular(tril, b, lower=True, trans=1 if transpose else 0)


def _rows(v: jax.Array, like: jax.Array) -> jax.Array:
    """Reshapes a (d,) vector to broadcast against ``like`` of shape (..., d).

    Explicit, so the library works under ``jax_numpy_rank_promotion="raise"``.
    """
    return jnp.reshape(v, (1,) * (jnp.ndim(like) - 1) + v.shape)


def _batched_rows(fn, r: jax.Array) -> jax.Array:
    """Applies ``fn`` (a (k, N) matrix to a (k, N) matrix) to the rows of r, shape (..., k)."""
    batch = r.shape[:-1]
    flat = r.reshape((-1, r.shape[-1]))
    return fn(flat.T).T.reshape(r.shape) if batch else fn(r[:, None])[:, 0]


def _batched(fn, r: jax.Array) -> jax.Array:
    """Applies ``fn`` (which maps a (d, N) matrix to (N,)) to r of shape (..., d)."""
    batch = r.shape[:-1]
    flat = r.reshape((-1, r.shape[-1]))
    return fn(flat.T).reshape(batch)


class DiagonalScale(NamedTuple):
    """Diagonal scale: ``cov = diag(scale**2)``.

    Attributes:
      scale: positive standard deviations, shape ``(d,)``.
    """

    scale: jax.Array

    @property
    def dim(self) -> int:
        return self.scale.shape[-1]

    @property
    def base_dim(self) -> int:
        """Number of standard-normal draws one sample consumes."""
        return self.dim

    def apply(self, eps: jax.Array) -> jax.Array:
        """Maps base draws ``eps`` (..., base_dim) to ``S eps`` (..., d)."""
        return eps * _rows(self.scale, eps)

    def logdet(self) -> jax.Array:
        """log det cov."""
        return 2.0 * jnp.sum(jnp.log(jnp.abs(self.scale)))

    def mahalanobis(self, r: jax.Array) -> jax.Array:
        """``r^T cov^{-1} r`` for r of shape (..., d)."""
        return jnp.sum(jnp.square(r / _rows(self.scale, r)), axis=-1)

    def cov_diag(self) -> jax.Array:
        return jnp.square(self.scale)

    def cov(self) -> jax.Array:
        return jnp.diag(jnp.square(self.scale))

    def factor(self) -> jax.Array:
        """A dense (d, base_dim) factor S with cov = S S^T."""
        return jnp.diag(self.scale)

    def factor_t_matmul(self, a: jax.Array) -> jax.Array:
        """``S^T a`` for a of shape (d, k); returns (base_dim, k)."""
        return self.scale[:, None] * a

    def matmul_factor(self, a: jax.Array) -> jax.Array:
        """``a S`` for a of shape (n, d); returns (n, base_dim)."""
        return a * _rows(self.scale, a)

    def trace_inv_cov(self, other) -> jax.Array:
        """``tr(cov^{-1} other.cov)`` for another scale of the same dim."""
        return jnp.sum(other.cov_diag() / jnp.square(self.scale))

    def trace_cov(self, a: jax.Array) -> jax.Array:
        """``tr(a cov)`` for a dense (d, d) matrix a."""
        return jnp.sum(jnp.diagonal(a) * jnp.square(self.scale))


class CholeskyScale(NamedTuple):
    """Lower-triangular scale: ``cov = tril @ tril.T``.

    Attributes:
      tril: lower-triangular factor, shape ``(d, d)``, non-zero diagonal.
    """

    tril: jax.Array

    @property
    def dim(self) -> int:
        return self.tril.shape[-1]

    @property
    def base_dim(self) -> int:
        return self.dim

    def apply(self, eps):
        return eps @ self.tril.T

    def logdet(self):
        return 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(self.tril))))

    def mahalanobis(self, r):
        return _batched(
            lambda b: jnp.sum(jnp.square(_solve_lower(self.tril, b)), axis=0), r
        )

    def cov_diag(self):
        return jnp.sum(jnp.square(self.tril), axis=1)

    def cov(self):
        return self.tril @ self.tril.T

    def factor(self):
        return self.tril

    def factor_t_matmul(self, a):
        return self.tril.T @ a

    def matmul_factor(self, a):
        return a @ self.tril

    def trace_inv_cov(self, other):
        # ||L^{-1} S_other||_F^2; O(d^2 m), once per closed-form evaluation.
        return jnp.sum(jnp.square(_solve_lower(self.tril, other.factor())))

    def trace_cov(self, a):
        return jnp.sum((a @ self.tril) * self.tril)


def _top_rows(g: jax.Array):
    """``(top, mask)``: the indices of ``g``'s ``min(k, d)`` largest rows, and 0 there, 1 elsewhere."""
    d, rank = g.shape
    norms = jnp.sum(jnp.square(jax.lax.stop_gradient(g)), axis=1)
    top = jax.lax.top_k(norms, min(rank, d))[1]
    return top, jnp.ones_like(norms).at[top].set(0.0)


def _stacked_qr(g: jax.Array):
    """``(top, mask, q, r)``: the QR of ``[G_top; G * mask; I]`` (see ``LowRankScale``).

    ``r`` is upper triangular with ``r^T r = C = I + G^T G``, from the QR of
    ``[G; I]`` rather than the Cholesky of ``C``: forming ``C`` squares the
    condition number, and where some diagonal sds head to 0 (a boundary
    optimum, ``W`` carrying those coordinates) ``C``'s small eigenvalues are
    lost below ``eps * |C|`` (garbage log-determinants, line searches that
    fail). ``r``'s diagonal may be negative; solves with it and ``log|r_ii|``
    do not mind. The k largest rows of ``G`` (indices ``top``) come first and
    are zeroed below (R does not depend on the rows' order): Householder QR
    is then accurate row by row, not only relative to the largest row. At
    most k rows can be that large near an optimum (more collapsed
    coordinates than k would make cov singular); a full sort cost 4x the
    whole log-determinant at d = 10^4. Where only ``r`` is used, XLA drops
    ``q``.
    """
    top, mask = _top_rows(g)
    stacked = jnp.concatenate([g[top], g * mask[:, None], jnp.eye(g.shape[1], dtype=g.dtype)],
                              axis=0)
    q, r = jnp.linalg.qr(stacked, mode="reduced")
    return top, mask, q, r


def _least_norm_parts(u: jax.Array, g: jax.Array):
    """``(e, u - G e)`` at ``e = argmin |e|^2 + |u - G e|^2 = R^{-1} Q_G^T u``, for u of shape (..., d)."""
    top, mask, q, r = _stacked_qr(g)
    k, d = top.shape[0], g.shape[0]
    # Q_G: the rows of q that hold G's, back in coordinate order (the zeroed
    # rows of G * mask give way to the top rows; their q rows are rounding).
    q_g = (q[k:k + d] * mask[:, None]).at[top].add(q[:k])
    e = _batched_rows(lambda b: solve_triangular(r, b, lower=False), u @ q_g)
    # G e as k broadcast products, not a dot: XLA fuses them with the subtraction
    # (and the square-sum that follows) instead of writing G e out.
    ge = sum(e[..., j, None] * _rows(g[:, j], u) for j in range(g.shape[1]))
    return e, u - ge, q_g, r


@jax.custom_jvp
def _least_norm_sq(u: jax.Array, g: jax.Array) -> jax.Array:
    """``min_e |e|^2 + |u - G e|^2 = u^T (I + G G^T)^{-1} u`` as a sum of two squares.

    ``LowRankScale.mahalanobis`` with ``u = D^{-1/2} r`` and ``G = D^{-1/2}
    W``: the least-norm ``(e, e2)`` with ``W e + D^{1/2} e2 = r``. Woodbury's
    ``|u|^2 - |L^{-1} G^T u|^2`` is the same number as a difference: at a
    boundary optimum ``u`` is ~1/sd large along G's columns, and in float32
    log q at q's own draws was off by 0.7 nats at sds 1e-2 times W's rows
    and by 40 at 1e-3 (its gradient, STL's, by 3x). Through R's normal
    equations alone (``C^{-1} G^T u``) ``e`` loses ``cond(C) eps`` and the
    error comes back; through Q it does not. The derivative is the envelope
    one, ``2 (u - G e) . (du - dG e)`` (``e`` minimizes, so its own change
    does not count), with the residual refined once (see the JVP): as exact
    as differentiating through the solves, and itself differentiable
    (second derivatives are right).
    """
    e, resid, _, _ = _least_norm_parts(u, g)
    return _sum_of_squares(e, resid)


def _sum_of_squares(e: jax.Array, resid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(e), axis=-1) + jnp.sum(jnp.square(resid), axis=-1)


@_least_norm_sq.defjvp
def _least_norm_sq_jvp(primals, tangents):
    u, g = primals
    du, dg = tangents
    e, resid, q_g, r = _least_norm_parts(u, g)
    out = _sum_of_squares(e, resid)
    # The residual (I + G G^T)^{-1} u is accurate to eps |u| only, which is not
    # enough where it is divided by a tiny sd (the gradient in r or W); one
    # step of refinement, resid + Q_G R^{-T} (e - G^T resid), makes it exact
    # (as differentiating through e does, at the cost of more passes over u).
    fix = _batched_rows(lambda b: solve_triangular(r, b, lower=False, trans=1),
                        e - resid @ g)
    resid = resid + fix @ q_g.T
    return out, 2.0 * jnp.sum(resid * (du - e @ dg.T), axis=-1)


def _low_rank_inv_cov_diag(w: jax.Array, sd: jax.Array) -> jax.Array:
    """The diagonal of ``(W W^T + diag(sd^2))^{-1}``, exact where some sds head to 0.

    Woodbury's ``1 / sd_i^2 - |L^{-1} W^T|_i^2 / sd_i^4`` is a difference of
    two numbers ~1/sd_i^2 where ``W`` carries coordinate i and its sd heads to
    0 (a low-rank fit's boundary optimum). Here each of the k rows of ``G =
    D^{-1/2} W`` that are largest (``top``, as in :func:`_stacked_qr`) gets the
    Schur complement of its coordinate, ``1 / (sd_i^2 + w_i^T M_i^{-1} w_i)``
    with ``M_i = I + G^T G - g_i g_i^T``, from the R of ``[G_top with row i
    zeroed; R_rest]`` (``R_rest``: the R of the other rows stacked on ``I``):
    a sum of positive terms, finite even at sd_i = 0. The other rows, which
    ``W`` does not dominate, keep ``(1 - |R^{-T} g_i|^2) / sd_i^2``. O(d k^2).
    """
    g = w / sd[:, None]
    top, mask = _top_rows(g)
    k = top.shape[0]
    r_rest = jnp.linalg.qr(jnp.concatenate([g * mask[:, None], jnp.eye(g.shape[1], dtype=g.dtype)]),
                           mode="reduced")[1]
    g_top = g[top]
    r_all = jnp.linalg.qr(jnp.concatenate([g_top, r_rest]), mode="reduced")[1]
    lever = jnp.sum(jnp.square(solve_triangular(r_all, g.T, lower=False, trans=1)), axis=0)
    inv = (1.0 - lever) / jnp.square(sd)

    def left_out(j):
        others = g_top * (jnp.arange(k) != j)[:, None].astype(g.dtype)
        r_j = jnp.linalg.qr(jnp.concatenate([others, r_rest]), mode="reduced")[1]
        x = solve_triangular(r_j, w[top[j]], lower=False, trans=1)
        return 1.0 / (jnp.square(sd[top[j]]) + jnp.sum(jnp.square(x)))

    return inv.at[top].set(jax.vmap(left_out)(jnp.arange(k)))


class LowRankScale(NamedTuple):
    """Low rank plus diagonal: ``cov = W W^T + diag(diag_scale**2)``.

    Sampling draws ``k + d`` standard normals (``z = W e1 + diag_scale * e2``), so
    one sample costs O(d k). Solves and determinants use the Woodbury identity
    and the matrix determinant lemma through the (k, k) capacitance matrix
    ``C = I + W^T diag_scale^{-2} W``, factored by a QR of
    ``[diag_scale^{-1} W; I]`` (O(d k^2)) rather than a Cholesky of ``C``, so
    that the log-determinant stays exact where some diagonal sds head to 0
    with ``W`` carrying their coordinates (a low-rank fit's boundary optimum).

    Attributes:
      cov_factor: W, shape ``(d, k)``.
      diag_scale: positive diagonal standard deviations, shape ``(d,)``.
    """

    cov_factor: jax.Array
    diag_scale: jax.Array

    @property
    def dim(self) -> int:
        return self.diag_scale.shape[-1]

    @property
    def rank(self) -> int:
        return self.cov_factor.shape[-1]

    @property
    def base_dim(self) -> int:
        return self.rank + self.dim

    def _capacitance_tril(self):
        """``(D^{-1} W, L)``: L lower triangular with ``L L^T = C`` (:func:`_stacked_qr`)."""
        r = _stacked_qr(self.cov_factor / self.diag_scale[:, None])[-1]
        return self.cov_factor / jnp.square(self.diag_scale)[:, None], r.T

    def apply(self, eps):
        k = self.rank
        return eps[..., :k] @ self.cov_factor.T + eps[..., k:] * _rows(
            self.diag_scale, eps
        )

    def logdet(self):
        _, lc = self._capacitance_tril()
        return 2.0 * (
            jnp.sum(jnp.log(jnp.abs(self.diag_scale)))
            + jnp.sum(jnp.log(jnp.abs(jnp.diagonal(lc))))
        )

    def mahalanobis(self, r):
        return _least_norm_sq(r / _rows(self.diag_scale, r),
                              self.cov_factor / self.diag_scale[:, None])

    def cov_diag(self):
        return jnp.sum(jnp.square(self.cov_factor), axis=1) + jnp.square(self.diag_scale)

    def cov(self):
        return self.cov_factor @ self.cov_factor.T + jnp.diag(jnp.square(self.diag_scale))

    def factor(self):
        return jnp.concatenate([self.cov_factor, jnp.diag(self.diag_scale)], axis=1)

    def factor_t_matmul(self, a):
        return jnp.concatenate([self.cov_factor.T @ a, self.diag_scale[:, None] * a], 0)

    def matmul_factor(self, a):
        return jnp.concatenate(
            [a @ self.cov_factor, a * _rows(self.diag_scale, a)], axis=1
        )

    def trace_inv_cov(self, other):
        # Where other's covariance is a diagonal plus (or minus) k columns,
        # tr(cov^{-1} other) = sum_i other_ii (cov^{-1})_ii +- sum_j c_j^T cov^{-1} c_j,
        # each from a form that stays exact where some of our sds head to 0
        # (_low_rank_inv_cov_diag, mahalanobis). Woodbury's D^{-1} - A C^{-1} A^T
        # is a difference of numbers ~1/sd^2 there (in float64, at sds 1e-6
        # times W's rows, a trace of 7.5 came out as -8e5). A dense `other`
        # contributes its factor's columns.
        if isinstance(other, (DiagonalScale, LowRankScale, LowRankPrecisionScale)):
            diag = other.scale if isinstance(other, DiagonalScale) else other.diag_scale
            first = jnp.sum(jnp.square(diag)
                            * _low_rank_inv_cov_diag(self.cov_factor, self.diag_scale))
            if isinstance(other, DiagonalScale):
                return first
            if isinstance(other, LowRankScale):
                return first + jnp.sum(self.mahalanobis(other.cov_factor.T))
            return first - jnp.sum(self.mahalanobis(other._downdate()))
        if isinstance(other, CholeskyScale):
            return jnp.sum(self.mahalanobis(other.tril.T))
        # PrecisionScale: its factor is a dense solve; Woodbury through S_other^T A.
        a, lc = self._capacitance_tril()
        first = jnp.sum(other.cov_diag() / jnp.square(self.diag_scale))
        b = other.factor_t_matmul(a)  # (m, k) = S_other^T A, A = D^{-1} W
        return first - jnp.sum(jnp.square(_solve_lower(lc, b.T)))

    def trace_cov(self, a):
        return jnp.sum((a @ self.cov_factor) * self.cov_factor) + jnp.sum(
            jnp.diagonal(a) * jnp.square(self.diag_scale)
        )


class LowRankPrecisionScale(NamedTuple):
    """Low-rank plus diagonal *precision*: ``cov^{-1} = U U^T + diag(diag_scale**-2)``.

    The form of SLANG (Mishkin et al. 2018) and of a Bayesian linear model
    with fewer observations than weights: ``U`` holds the k best-determined
    directions, ``diag_scale`` the conditional standard deviations that
    remain. Everything goes through the (k, k) capacitance matrix ``C = I +
    U^T diag(diag_scale**2) U`` and its Cholesky factor (Woodbury, the matrix
    determinant lemma); no d x d matrix is formed and nothing is inverted.

    Sampling draws ``k + d`` standard normals ``(e1, e2)``: ``w = diag_scale**-1
    e2 + U e1`` has covariance ``cov^{-1}``, so ``cov w`` has covariance
    ``cov``; written out, ``z = diag_scale * e2 + A C^{-1} (e1 - U^T
    (diag_scale * e2))`` with ``A = diag(diag_scale**2) U``. O(d k) per draw
    after O(d k^2) once.

    Where ``U`` dominates the diagonal by a factor ``r = |u_i|^2
    diag_scale_i^2``, the variances along ``U`` are a difference of two terms
    and lose about ``eps * r`` in relative accuracy (as for any Woodbury
    form): keep ``r`` well below ``1 / eps`` (about 1e7 in float32).

    Attributes:
      prec_factor: U, shape ``(d, k)``.
      diag_scale: positive, shape ``(d,)``: the diagonal of the precision is
        ``diag_scale**-2`` plus that of ``U U^T``.
    """

    prec_factor: jax.Array
    diag_scale: jax.Array

    @property
    def dim(self) -> int:
        return self.diag_scale.shape[-1]

    @property
    def rank(self) -> int:
        return self.prec_factor.shape[-1]

    @property
    def base_dim(self) -> int:
        return self.rank + self.dim

    def _capacitance(self):
        """``(A, chol(C))``: ``A = diag(s^2) U`` and the Cholesky factor of ``C = I + U^T A``."""
        a = jnp.square(self.diag_scale)[:, None] * self.prec_factor
        cap = jnp.eye(self.rank, dtype=a.dtype) + self.prec_factor.T @ a
        return a, jnp.linalg.cholesky(cap)

    def cov_matmul(self, b):
        """``cov @ b`` for b of shape (d, m), by the Woodbury identity (O(d k m))."""
        a, lc = self._capacitance()
        return jnp.square(self.diag_scale)[:, None] * b - a @ cho_solve((lc, True), a.T @ b)

    def apply(self, eps):
        k = self.rank
        a, lc = self._capacitance()
        e1, e2 = eps[..., :k], eps[..., k:]
        se2 = e2 * _rows(self.diag_scale, e2)
        r = e1 - se2 @ self.prec_factor  # (..., k)
        t = _batched_rows(lambda m: cho_solve((lc, True), m), r)
        return se2 + t @ a.T

    def logdet(self):
        _, lc = self._capacitance()
        return 2.0 * (
            jnp.sum(jnp.log(jnp.abs(self.diag_scale)))
            - jnp.sum(jnp.log(jnp.diagonal(lc)))
        )

    def mahalanobis(self, r):
        return jnp.sum(jnp.square(r / _rows(self.diag_scale, r)), axis=-1) + jnp.sum(
            jnp.square(r @ self.prec_factor), axis=-1
        )

    def _downdate(self):
        """``B`` (k, d) with ``cov = diag(s^2) - B^T B``: ``L^{-1} A^T``."""
        a, lc = self._capacitance()
        return _solve_lower(lc, a.T)

    def cov_diag(self):
        return jnp.square(self.diag_scale) - jnp.sum(jnp.square(self._downdate()), axis=0)

    def cov(self):
        b = self._downdate()
        return jnp.diag(jnp.square(self.diag_scale)) - b.T @ b

    def _a_cinv(self):
        a, lc = self._capacitance()
        return cho_solve((lc, True), a.T).T  # A C^{-1}, (d, k)

    def factor(self):
        # z = F [e1; e2] with F = [A C^{-1}, diag(s) - A C^{-1} U^T diag(s)].
        ac = self._a_cinv()
        s = self.diag_scale
        return jnp.concatenate(
            [ac, jnp.diag(s) - (ac @ self.prec_factor.T) * s[None, :]], axis=1
        )

    def factor_t_matmul(self, a):
        ac = self._a_cinv()
        t = ac.T @ a  # (k, m)
        return jnp.concatenate([t, self.diag_scale[:, None] * (a - self.prec_factor @ t)], 0)

    def matmul_factor(self, a):
        ac = self._a_cinv()
        t = a @ ac  # (..., k)
        return jnp.concatenate(
            [t, (a - t @ self.prec_factor.T) * _rows(self.diag_scale, a)], axis=1
        )

    def trace_inv_cov(self, other):
        # tr((U U^T + diag(s^-2)) cov_other) = sum(diag_other / s^2) + ||S_other^T U||_F^2.
        first = jnp.sum(other.cov_diag() / jnp.square(self.diag_scale))
        return first + jnp.sum(jnp.square(other.factor_t_matmul(self.prec_factor)))

    def trace_cov(self, a):
        # tr(a cov) = sum(diag(a) s^2) - tr(a A C^{-1} A^T).
        big_a, _ = self._capacitance()
        return jnp.sum(jnp.diagonal(a) * jnp.square(self.diag_scale)) - jnp.sum(
            (a @ big_a) * self._a_cinv()
        )


class PrecisionScale(NamedTuple):
    """Precision-Cholesky scale: ``cov = (tril @ tril.T)^{-1}``.

    The natural form of a conjugate posterior, whose precision is what the
    algebra produces. Sampling solves ``L^T x = eps`` (O(d^2) per draw);
    Mahalanobis norms are ``||L^T r||^2``. No inverse is formed.

    Attributes:
      tril: lower-triangular Cholesky factor of the precision, shape (d, d).
    """

    tril: jax.Array

    @property
    def dim(self) -> int:
        return self.tril.shape[-1]

    @property
    def base_dim(self) -> int:
        return self.dim

    def apply(self, eps):
        flat = eps.reshape((-1, self.dim))
        return _solve_lower(self.tril, flat.T, transpose=True).T.reshape(eps.shape)

    def logdet(self):
        return -2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(self.tril))))

    def mahalanobis(self, r):
        return jnp.sum(jnp.square(r @ self.tril), axis=-1)

    def factor(self):
        # L^{-T}: a valid (upper-triangular) factor of the covariance.
        eye = jnp.eye(self.dim, dtype=self.tril.dtype)
        return _solve_lower(self.tril, eye, transpose=True)

    def cov_diag(self):
        return jnp.sum(jnp.square(self.factor()), axis=1)

    def cov(self):
        f = self.factor()
        return f @ f.T

    def factor_t_matmul(self, a):
        return _solve_lower(self.tril, a)  # L^{-1} a

    def matmul_factor(self, a):
        return _solve_lower(self.tril, a.T).T  # a L^{-T}

    def trace_inv_cov(self, other):
        # tr(L L^T cov_other) = ||S_other^T L||_F^2.
        return jnp.sum(jnp.square(other.factor_t_matmul(self.tril)))

    def trace_cov(self, a):
        b = _solve_lower(self.tril, a)
        return jnp.trace(_solve_lower(self.tril, b.T))


Scale = Union[DiagonalScale, CholeskyScale, LowRankScale, LowRankPrecisionScale, PrecisionScale]


class Gaussian(NamedTuple):
    """A multivariate Gaussian ``N(mean, cov)`` with a structured scale.

    A pytree (a NamedTuple of arrays), so it passes through ``jit``, ``vmap``
    and ``grad``. Build one with the constructors below rather than by hand.

    Attributes:
      mean: the flat mean, shape ``(d,)``.
      scale: one of :class:`DiagonalScale`, :class:`CholeskyScale`,
        :class:`LowRankScale`, :class:`LowRankPrecisionScale`,
        :class:`PrecisionScale`.

    Example:
      >>> import jax.numpy as jnp, vijax
      >>> q = vijax.Gaussian.diagonal(jnp.zeros(3), jnp.ones(3))
      >>> p = vijax.Gaussian.from_cov(jnp.zeros(3), 2.0 * jnp.eye(3))
      >>> float(vijax.gaussian_kl(q, p))  # doctest: +ELLIPSIS
      0.28...
    """

    mean: jax.Array
    scale: Scale

    # ----------------------------------------------------------- constructors
    @classmethod
    def diagonal(cls, mean, scale) -> "Gaussian":
        """``N(mean, diag(scale**2))``; ``scale`` is (d,) standard deviations."""
        mean, scale = _mean_and("scale", mean, scale)
        _checks.check_shape("scale", scale, mean.shape)
        _checks.check_positive("scale", scale)
        return cls(mean, DiagonalScale(scale))

    @classmethod
    def from_cholesky(cls, mean, tril) -> "Gaussian":
        """``N(mean, tril @ tril.T)`` for a lower-triangular ``tril`` (d, d).

        Only the lower triangle of ``tril`` is used.
        """
        mean, tril = _mean_and("tril", mean, tril)
        _checks.check_shape("tril", tril, mean.shape * 2)
        _check_nonsingular_tril("tril", tril)
        return cls(mean, CholeskyScale(jnp.tril(tril)))

    @classmethod
    def from_cov(cls, mean, cov) -> "Gaussian":
        """``N(mean, cov)`` for a dense covariance, stored by its Cholesky factor.

        Raises:
          ValueError: ``cov`` is not square, not symmetric, or (when its value
            is known eagerly) not positive definite.
        """
        mean, cov = _mean_and("cov", mean, cov)
        _checks.check_covariance("cov", cov)
        _checks.check_shape("cov", cov, mean.shape * 2)
        return cls(mean, CholeskyScale(jnp.linalg.cholesky(cov)))

    @classmethod
    def low_rank(cls, mean, cov_factor, diag_scale) -> "Gaussian":
        """``N(mean, cov_factor @ cov_factor.T + diag(diag_scale**2))``.

        ``cov_factor`` is (d, k); ``diag_scale`` is (d,) and positive.
        """
        mean, cov_factor, diag_scale = _factor_and_diagonal(
            mean, "cov_factor", cov_factor, diag_scale)
        return cls(mean, LowRankScale(cov_factor, diag_scale))

    @classmethod
    def low_rank_precision(cls, mean, prec_factor, diag_scale) -> "Gaussian":
        """``N(mean, (prec_factor @ prec_factor.T + diag(diag_scale**-2))^{-1})``.

        ``prec_factor`` is (d, k); ``diag_scale`` is (d,) and positive.
        """
        mean, prec_factor, diag_scale = _factor_and_diagonal(
            mean, "prec_factor", prec_factor, diag_scale)
        return cls(mean, LowRankPrecisionScale(prec_factor, diag_scale))

    @classmethod
    def from_precision_cholesky(cls, mean, tril) -> "Gaussian":
        """``N(mean, (tril @ tril.T)^{-1})``: a Gaussian given by the Cholesky
        factor of its precision matrix (only the lower triangle is used)."""
        mean, tril = _mean_and("tril", mean, tril)
        _checks.check_shape("tril", tril, mean.shape * 2)
        _check_nonsingular_tril("tril", tril)
        return cls(mean, PrecisionScale(jnp.tril(tril)))

    @classmethod
    def from_precision(cls, mean, precision) -> "Gaussian":
        """``N(mean, precision^{-1})``, stored by the precision's Cholesky factor."""
        mean, precision = _mean_and("precision", mean, precision)
        _checks.check_covariance("precision", precision)
        _checks.check_shape("precision", precision, mean.shape * 2)
        return cls(mean, PrecisionScale(jnp.linalg.cholesky(precision)))

    # ------------------------------------------------------------- queries
    @property
    def dim(self) -> int:
        """The dimension d."""
        return self.mean.shape[-1]

    @property
    def cov(self) -> jax.Array:
        """The dense (d, d) covariance, built on request (O(d^2) memory)."""
        return self.scale.cov()

    @property
    def variance(self) -> jax.Array:
        """The (d,) marginal variances, without forming the covariance."""
        return self.scale.cov_diag()

    def log_prob(self, x: jax.Array) -> jax.Array:
        """Log density at ``x`` of shape (..., d); returns shape (...)."""
        x = jnp.asarray(x)
        r = x - _rows(self.mean, x)
        return -0.5 * (
            self.dim * _LOG_2PI + self.scale.logdet() + self.scale.mahalanobis(r)
        )

    def entropy(self) -> jax.Array:
        """Differential entropy ``0.5 * (d (1 + log 2 pi) + log det cov)``."""
        return 0.5 * (self.dim * (1.0 + _LOG_2PI) + self.scale.logdet())

    def sample(self, key: jax.Array, sample_shape=()) -> jax.Array:
        """Draws samples of shape ``(*sample_shape, d)`` (reparameterized).

        ``sample_shape`` is a tuple of ints or one int.
        """
        if isinstance(sample_shape, int):
            sample_shape = (sample_shape,)
        shape = tuple(sample_shape) + (self.scale.base_dim,)
        eps = jax.random.normal(key, shape, dtype=self.mean.dtype)
        z = self.scale.apply(eps)
        return _rows(self.mean, z) + z


def _check_nonsingular_tril(name, tril) -> None:
    """A zero on the diagonal makes the factor singular (log det = -inf)."""
    if not _checks.is_concrete(tril):
        return
    diag = np.abs(np.diagonal(np.asarray(tril)))
    if not np.all(diag > 0):
        i = int(np.argmin(diag))
        raise ValueError(
            f"`{name}` must have a non-zero diagonal (a non-singular factor); got "
            f"{name}[{i}, {i}] = {np.asarray(tril)[i, i].item()!r}."
        )


def _factor_and_diagonal(mean, name, factor, diag_scale):
    """Checked ``(mean, factor, diag_scale)``: factor (d, k), diag_scale (d,) positive."""
    mean, factor = _mean_and(name, mean, factor)
    diag_scale = _checks.as_float_array("diag_scale", diag_scale)
    _checks.check_ndim(name, factor, 2)
    if factor.shape[0] != mean.shape[0]:
        raise ValueError(
            f"`{name}` must have shape ({mean.shape[0]}, k); got shape "
            f"{tuple(factor.shape)}."
        )
    _checks.check_shape("diag_scale", diag_scale, mean.shape)
    _checks.check_positive("diag_scale", diag_scale)
    return mean, factor, diag_scale


def _mean_and(name, mean, other):
    mean = _checks.as_float_array("mean", mean)
    _checks.check_ndim("mean", mean, 1)
    other = _checks.as_float_array(name, other)
    return mean, other


def _check_pair(q, p) -> None:
    if not isinstance(q, Gaussian) or not isinstance(p, Gaussian):
        raise TypeError(
            "`q` and `p` must be vijax.Gaussian; got "
            f"{type(q).__name__} and {type(p).__name__}."
        )
    if q.dim != p.dim:
        raise ValueError(
            f"`q` and `p` must have the same dimension; got {q.dim} and {p.dim}."
        )


def _trace_and_mahalanobis(q: Gaussian, p: Gaussian):
    """``tr(P^{-1} Q)`` and ``(m_q - m_p)^T P^{-1} (m_q - m_p)``."""
    return p.scale.trace_inv_cov(q.scale), p.scale.mahalanobis(q.mean - p.mean)


def gaussian_kl(q: Gaussian, p: Gaussian) -> jax.Array:
    """Returns KL(q || p) between two Gaussians of any scale structure.

    ``KL = 0.5 * [tr(P^{-1} Q) + (m_p - m_q)^T P^{-1} (m_p - m_q) - d
    + log det P - log det Q]``, evaluated with the structure of each side:
    O(d) for diagonal against diagonal, O(d k^2) when either side is low rank
    plus diagonal (Woodbury identity, matrix determinant lemma), and at most
    one O(d^3) triangular solve for dense Cholesky or precision factors.

    Args:
      q: the first Gaussian.
      p: the second Gaussian, of the same dimension.

    Returns:
      A scalar, >= 0 up to rounding.

    Raises:
      TypeError: either argument is not a :class:`Gaussian`.
      ValueError: the dimensions differ.
    """
    _check_pair(q, p)
    trace, maha = _trace_and_mahalanobis(q, p)
    return 0.5 * (trace + maha - q.dim + p.scale.logdet() - q.scale.logdet())


def expected_log_prob(p: Gaussian, q: Gaussian) -> jax.Array:
    """Returns ``E_{z ~ q}[log p(z)]`` (minus the cross-entropy) in closed form."""
    _check_pair(q, p)
    trace, maha = _trace_and_mahalanobis(q, p)
    return -0.5 * (p.dim * _LOG_2PI + p.scale.logdet() + trace + maha)
