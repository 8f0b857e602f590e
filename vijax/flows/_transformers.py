"""Elementwise transformers: the maps a flow layer applies to each coordinate.

A transformer maps ``x`` (shape ``(m,)``) to ``y`` with per-coordinate raw
parameters ``raw`` (shape ``(m, P)``) that a conditioner network emits. Each
is a :class:`Transformer` of pure functions; ``raw = 0`` is the identity map,
so a flow whose networks output zeros starts as its base Gaussian.

* :func:`affine`: ``y = shift + exp(log_scale) x`` with the log-scale softly
  bounded, ``log_scale = B tanh(raw / B)``, so that one layer can never scale
  by more than ``exp(B)`` (float32 stays finite over long fits; B = 4).
* :func:`rational_quadratic`: the monotone rational-quadratic spline of
  Durkan et al. (2019) on ``[-bound, bound]`` with ``bins`` bins, the identity
  outside (linear tails with slope 1, so the density is smooth at the
  boundary). Bin widths and heights pass through a softmax with a floor,
  interior knot slopes through a shifted softplus with a floor.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

MAX_LOG_SCALE = 4.0
"""The soft bound B on an affine layer's log-scale: ``|log_scale| < B``."""

MIN_BIN = 1e-3
"""The smallest bin width and height of a spline, as a fraction of the interval."""

MIN_SLOPE = 1e-3
"""The smallest slope of a spline at an interior knot."""


class Transformer(NamedTuple):
    """An elementwise monotone map with ``num_params`` raw parameters per coordinate.

    Attributes:
      num_params: P, the raw parameters per coordinate.
      forward: ``forward(x, raw) -> (y, log_det)``, ``x`` of shape ``(m,)``,
        ``raw`` of shape ``(m, P)``; ``log_det`` is ``sum log |dy/dx|``.
      inverse: ``inverse(y, raw) -> (x, log_det)`` with ``log_det`` the log
        determinant of the inverse (minus the forward's).
      name: ``"affine"`` or ``"spline"``.
    """

    num_params: int
    forward: Callable
    inverse: Callable
    name: str


# ---------------------------------------------------------------- affine
def _log_scale(raw):
    return MAX_LOG_SCALE * jnp.tanh(raw / MAX_LOG_SCALE)


def affine() -> Transformer:
    """``y = shift + exp(log_scale) x``; raw ``(shift, pre-log-scale)``."""

    def forward(x, raw):
        log_scale = _log_scale(raw[:, 1])
        return raw[:, 0] + jnp.exp(log_scale) * x, jnp.sum(log_scale)

    def inverse(y, raw):
        log_scale = _log_scale(raw[:, 1])
        return (y - raw[:, 0]) * jnp.exp(-log_scale), -jnp.sum(log_scale)

    return Transformer(2, forward, inverse, "affine")


# ---------------------------------------------------------------- spline
def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def rational_quadratic(bins: int, bound: float) -> Transformer:
    """The rational-quadratic spline on ``[-bound, bound]``, identity outside.

    ``3 bins - 1`` raw parameters per coordinate: ``bins`` widths, ``bins``
    heights and ``bins - 1`` interior slopes (the slopes at the two ends are
    1, matching the identity tails). Zero raw parameters give equal bins and
    unit slopes: the identity.
    """
    slope_shift = _softplus_inverse(1.0 - MIN_SLOPE)

    def knots(raw):
        dtype = raw.dtype
        w = MIN_BIN + (1.0 - MIN_BIN * bins) * jax.nn.softmax(raw[:, :bins], axis=-1)
        h = MIN_BIN + (1.0 - MIN_BIN * bins) * jax.nn.softmax(raw[:, bins:2 * bins], axis=-1)
        edge = jnp.full(raw.shape[:1] + (1,), -bound, dtype)
        # Knot positions; the last is pinned at +bound (the cumsum rounds).
        xk = jnp.concatenate([edge, -bound + 2.0 * bound * jnp.cumsum(w, axis=-1)], axis=-1)
        yk = jnp.concatenate([edge, -bound + 2.0 * bound * jnp.cumsum(h, axis=-1)], axis=-1)
        xk = xk.at[:, -1].set(bound)
        yk = yk.at[:, -1].set(bound)
        one = jnp.ones(raw.shape[:1] + (1,), dtype)
        slopes = MIN_SLOPE + jax.nn.softplus(raw[:, 2 * bins:] + slope_shift)
        return xk, yk, jnp.concatenate([one, slopes, one], axis=-1)

    def gather(table, k):
        return jnp.take_along_axis(table, k[:, None], axis=-1)[:, 0]

    def bin_of(v, edges):
        # The bin index: how many interior knots lie at or below v.
        return jnp.sum(v[:, None] >= edges[:, 1:-1], axis=-1)

    def pieces(k, xk, yk, d):
        x0, y0 = gather(xk, k), gather(yk, k)
        w = gather(xk, k + 1) - x0
        h = gather(yk, k + 1) - y0
        return x0, y0, w, h, gather(d, k), gather(d, k + 1)

    def log_slope(xi, s, d0, d1):
        t = xi * (1.0 - xi)
        den = s + (d1 + d0 - 2.0 * s) * t
        num = jnp.square(s) * (d1 * jnp.square(xi) + 2.0 * s * t + d0 * jnp.square(1.0 - xi))
        return jnp.log(num) - 2.0 * jnp.log(den)

    def forward(x, raw):
        xk, yk, d = knots(raw)
        inside = jnp.abs(x) < bound
        xc = jnp.clip(x, -bound, bound)
        x0, y0, w, h, d0, d1 = pieces(bin_of(xc, xk), xk, yk, d)
        s = h / w
        xi = jnp.clip((xc - x0) / w, 0.0, 1.0)
        t = xi * (1.0 - xi)
        y = y0 + h * (s * jnp.square(xi) + d0 * t) / (s + (d1 + d0 - 2.0 * s) * t)
        ld = log_slope(xi, s, d0, d1)
        return jnp.where(inside, y, x), jnp.sum(jnp.where(inside, ld, 0.0))

    def inverse(y, raw):
        xk, yk, d = knots(raw)
        inside = jnp.abs(y) < bound
        yc = jnp.clip(y, -bound, bound)
        x0, y0, w, h, d0, d1 = pieces(bin_of(yc, yk), xk, yk, d)
        s = h / w
        dy = yc - y0
        c2 = d1 + d0 - 2.0 * s
        a = h * (s - d0) + dy * c2
        b = h * d0 - dy * c2
        c = -s * dy
        disc = jnp.maximum(jnp.square(b) - 4.0 * a * c, 0.0)
        # The root in [0, 1], in the form that does not cancel (Durkan et al., eq. 29).
        xi = jnp.clip(2.0 * c / (-b - jnp.sqrt(disc)), 0.0, 1.0)
        x = x0 + xi * w
        ld = -log_slope(xi, s, d0, d1)
        return jnp.where(inside, x, y), jnp.sum(jnp.where(inside, ld, 0.0))

    return Transformer(3 * bins - 1, forward, inverse, "spline")
