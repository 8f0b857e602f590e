"""The Taylor control variate: ``log p``'s second-order expansion, whose expectation is exact.

The pathwise ELBO gradient's noise comes from ``log p``: its expansion
around a point ``m0``,

    Q(z) = g0 . (z - m0) + 1/2 (z - m0)^T H0 (z - m0),

(``g0``, ``H0`` the gradient and Hessian of ``log p`` at ``m0``) has an
expectation under a Gaussian ``q = N(m, C)`` in closed form,

    E_q[Q] = g0 . (m - m0) + 1/2 (m - m0)^T H0 (m - m0) + 1/2 tr(H0 C),

so ``mean_s [log p(z_s) - Q(z_s)] + E_q[Q]`` is an unbiased ELBO estimate
whose pathwise gradient leaves only the part of ``log p`` that is not
quadratic to Monte Carlo (Miller et al. 2017 linearize the gradient the same
way). For a Gaussian posterior, with the closed-form entropy, the gradient
is exact: no noise at any ``q``, whatever ``m0``.

What it costs: ``H0 (z_s - m0)`` for every draw, a Hessian-vector product
(forward over reverse mode, through ``jax.linearize``; about one more
gradient per draw on a GLM), and ``tr(H0 C)``: ``H0``'s diagonal for the
diagonal part of ``C`` (computed once per reference point, ``d``
Hessian-vector products; :func:`taylor_reference`) and one product per
column of a low-rank factor. So it is for the mean-field and low-rank
families, and for a ``log_joint`` that forward-mode differentiates.

Where the expansion is poor (a point far from q, or ``log p`` far from
quadratic over q's spread) the correction can add noise instead; a fit with
``control_variate="auto"`` measures what it would leave
(:func:`probe_ratio`) and uses it only where the variance falls by more than
4 (:data:`AUTO_MAX_RATIO`); where what it leaves is negligible even on one
draw (:data:`ONE_DRAW_MAX_NOISE`), its steps take one draw.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from vijax import _checks
from vijax._gaussian import DiagonalScale, LowRankScale

ArrayTree = Any

CONTROL_VARIATES = ("taylor", "auto")
"""The names ``fit``'s and ``make_step``'s ``control_variate`` accepts: ``"taylor"``
always, ``"auto"`` where it pays (:data:`AUTO_MAX_RATIO`)."""

#: ``"auto"`` uses the control variate while the gradient's variation over
#: q's draws that the expansion leaves (``TaylorReference.ratio``) is below
#: this share: a Hessian-vector product costs about a gradient, so the
#: variance must fall by more than 2 to pay; 4 leaves a margin for the
#: probe's own noise and for the steps until the next probe.
AUTO_MAX_RATIO = 0.25

#: ``"auto"`` steps on one draw while the control variate's gradient noise
#: on it, ``ratio * S``, is at most this share of the plain estimator's on
#: ``S`` independent draws (the probe's; antithetic draws can be less noisy
#: than that): the gradient is then as good as exact (on a Gaussian
#: posterior it is exact), and more draws would buy nothing.
ONE_DRAW_MAX_NOISE = 0.01

#: ``"auto"`` probes its reference point every this many steps (2 S more
#: gradient and Hessian-vector evaluations each time).
PROBE_STEPS = 50

#: A fit refreshes its reference point every ``REFRESH_COST_RATIO`` times the
#: steps that computing it costs (``d / num_samples``): about 10% more
#: Hessian-vector products than the draws' own.
REFRESH_COST_RATIO = 10

#: ... and at least this often (small d).
MIN_REFRESH_STEPS = 50

_sg = jax.lax.stop_gradient


class TaylorReference(NamedTuple):
    """The expansion point of the Taylor control variate (:func:`taylor_reference`).

    Attributes:
      loc: ``(d,)`` the flat point ``m0`` (``ravel_pytree`` of the latent).
      hess_diag: ``(d,)`` the diagonal of ``log p``'s Hessian at ``loc``.
      step: the fit step it was taken at (int32; -1 for a placeholder that
        a fit's first step replaces).
      ratio: the share of ``grad log p``'s variation over q's draws that the
        expansion leaves, as a fit last measured it (:func:`probe_ratio`;
        ``"auto"`` uses the control variate while it is below
        :data:`AUTO_MAX_RATIO`); NaN where none was measured.
    """

    loc: jax.Array
    hess_diag: jax.Array
    step: jax.Array
    ratio: Any = float("nan")


def _flat(log_joint: Callable, like: ArrayTree) -> tuple[Callable, Callable]:
    _, unravel = ravel_pytree(like)
    return (lambda z: log_joint(unravel(z))), unravel


def _hessian_diagonal(flat_log_joint: Callable, loc: jax.Array, block: int) -> jax.Array:
    """``diag H(loc)`` from ``d`` Hessian-vector products, ``block`` at a time."""
    d = loc.shape[0]
    _, hvp = jax.linearize(jax.grad(flat_log_joint), loc)
    num_blocks = -(-d // block)
    rows = jnp.arange(num_blocks * block).reshape(num_blocks, block)

    def one(block_rows):
        basis = jax.nn.one_hot(block_rows, d, dtype=loc.dtype)  # rows >= d are all zero
        return jnp.sum(jax.vmap(hvp)(basis) * basis, axis=1)

    return jax.lax.map(one, rows).reshape(-1)[:d]


def reference_at(log_joint: Callable, loc: ArrayTree, step: Any, block: int,
                 ratio: Any = float("nan")) -> TaylorReference:
    """:func:`taylor_reference` without its checks (inside a fit's step)."""
    flat_loc, _ = ravel_pytree(loc)
    flat_loc = _sg(flat_loc)
    f, _ = _flat(log_joint, loc)
    diag = _hessian_diagonal(f, flat_loc, block)
    return TaylorReference(flat_loc, diag, jnp.asarray(step, jnp.int32),
                           jnp.asarray(ratio, flat_loc.dtype))


def placeholder(loc: ArrayTree) -> TaylorReference:
    """A reference a fit's first step replaces (``step = -1``)."""
    flat, _ = ravel_pytree(loc)
    zeros = jnp.zeros_like(flat)
    return TaylorReference(zeros, zeros, jnp.asarray(-1, jnp.int32),
                           jnp.asarray(jnp.nan, flat.dtype))


def probe_ratio(flat_log_joint: Callable, m0: jax.Array, z: jax.Array, u: jax.Array,
                grads: jax.Array) -> jax.Array:
    """The share of the draws' gradient variation that the expansion at ``m0`` leaves.

    ``z`` (S, d) are draws of q, ``grads`` ``grad log p`` at them and ``u``
    (S, d) their standardized offsets ``(z - mean) / sd``. With ``r_s`` the
    residual ``grad log p(z_s) - grad Q(z_s)``: ``(V(r) + V(r u)) / (V(g) +
    V(g u))``, ``V`` the summed squared deviation from the draws' mean. The
    ``g`` terms are the per-draw parts of the mean's gradient, the ``g u``
    ones of the scales'. 0 for a quadratic ``log p``.
    """
    g0, hvp = jax.linearize(jax.grad(flat_log_joint), m0)
    r = grads - g0[None, :] - jax.vmap(hvp)(z - m0[None, :])

    def spread(a):
        return jnp.sum(jnp.square(a - jnp.mean(a, axis=0, keepdims=True)))

    num = spread(r) + spread(r * u)
    den = spread(grads) + spread(grads * u)
    return jnp.where(den > 0, num / den, jnp.zeros_like(num))


def probe_draws(key, params, family, log_joint, num_samples: int):
    """``(f, mean, z, u, grads)`` for :func:`probe_ratio`: draws of q and ``grad log p`` there."""
    q = family.to_gaussian(_sg(params))
    f, _ = _flat(log_joint, params.loc)
    eps = jax.random.normal(key, (num_samples, q.scale.base_dim), q.mean.dtype)
    offsets = q.scale.apply(eps)
    z = q.mean[None, :] + offsets
    u = offsets / jnp.sqrt(q.scale.cov_diag())[None, :]
    grads = jax.vmap(jax.grad(f))(z)
    return f, q.mean, z, u, grads


def taylor_reference(
    log_joint: Callable[[ArrayTree], jax.Array], loc: ArrayTree, *, block_size: int = 64
) -> TaylorReference:
    """Returns the expansion point ``loc`` of the Taylor control variate, with its Hessian diagonal.

    Pass it to :func:`vijax.elbo` as ``control=`` (``fit(...,
    control_variate="taylor")`` computes and refreshes one for you). The
    diagonal costs ``d`` Hessian-vector products of ``log_joint`` (forward
    over reverse mode), ``block_size`` at a time; any ``loc`` gives an
    unbiased estimator, and the nearer q's mean, the smaller its noise when
    ``log p`` is not quadratic.

    Args:
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree; it must be
        differentiable twice, in forward mode over reverse mode.
      loc: the expansion point, a latent pytree (e.g. ``params.loc``).
      block_size: Hessian-vector products computed at once (>= 1).

    Returns:
      A :class:`TaylorReference` (``step = 0``).

    Raises:
      TypeError: ``log_joint`` is not callable.
      ValueError: ``loc`` has no floating-point leaves or ``block_size < 1``.

    Example:
      >>> import jax.numpy as jnp, vijax
      >>> ref = vijax.taylor_reference(lambda z: -0.5 * jnp.sum(z**2 * jnp.arange(1.0, 4.0)),
      ...                              jnp.zeros(3))
      >>> ref.hess_diag
      Array([-1., -2., -3.], dtype=float32)
    """
    _checks.check_log_joint(log_joint)
    loc = _checks.check_latent("loc", loc)
    block = _checks.check_positive_int("block_size", block_size)
    return jax.jit(reference_at, static_argnums=(0, 3))(log_joint, loc, 0, block)


def check_control(control: Any, family, params: Any, estimator: str,
                  name: str = "control") -> None:
    """Raises unless ``control`` fits ``family``'s params (called by :func:`vijax.elbo`,
    and by ``fit`` for a resumed state's, as ``name``)."""
    if control is None:
        return
    if not isinstance(control, TaylorReference):
        raise TypeError(
            f"`{name}` must be a vijax.TaylorReference (from vijax.taylor_reference) or "
            f"None; got {type(control).__name__}."
        )
    check_pathwise(estimator, name)
    check_family_supports(family, params)
    d = ravel_pytree(params.loc)[0].shape[0]
    for field in ("loc", "hess_diag"):
        shape = tuple(jnp.shape(getattr(control, field)))
        if shape != (d,):
            raise ValueError(
                f"`{name}.{field}` must have shape ({d},) (the flat latent); got {shape}."
            )


def check_pathwise(estimator: str, name: str) -> None:
    """Raises for the score estimator: the Taylor control variate works through the draws."""
    if estimator == "score":
        raise ValueError(
            f"`{name}` needs a pathwise estimator (the Taylor control variate works "
            "through the draws); got estimator='score'."
        )


def check_family_supports(family, params: Any) -> None:
    """Raises unless ``family``'s Gaussian view has a diagonal or low-rank-plus-diagonal scale."""
    to_gaussian = getattr(family, "to_gaussian", None)
    scale = None
    if to_gaussian is not None:
        scale = jax.eval_shape(to_gaussian, params).scale
    if not isinstance(scale, (DiagonalScale, LowRankScale)):
        what = "no Gaussian view" if scale is None else f"a {type(scale).__name__}"
        raise ValueError(
            "The Taylor control variate needs a family whose covariance is diagonal or "
            "low-rank plus diagonal (vijax.mean_field, vijax.low_rank): its expectation "
            f"needs tr(H C), d Hessian-vector products per step for a dense factor; "
            f"family {getattr(family, 'name', '?')!r} has {what}."
        )


def refresh_steps(d: int, num_samples: int) -> int:
    """A fit's steps between reference points: ``max(50, 10 ceil(d / S))``."""
    return max(MIN_REFRESH_STEPS, REFRESH_COST_RATIO * math.ceil(d / max(num_samples, 1)))


def near_exact(ratio: jax.Array, num_samples: int) -> jax.Array:
    """Whether one draw with the control variate is as good as exact (:data:`ONE_DRAW_MAX_NOISE`)."""
    return ratio * num_samples <= ONE_DRAW_MAX_NOISE


def auto_branch(ratio: jax.Array, num_samples: int) -> jax.Array:
    """``"auto"``'s choice of estimator for a step (int32): 0 the plain one, 1 the
    control variate on the fit's ``num_samples`` draws, 2 on one draw (only
    where ``num_samples > 1``: :func:`near_exact`)."""
    ratio = jnp.asarray(ratio)
    on = ratio < AUTO_MAX_RATIO
    if num_samples == 1:
        return on.astype(jnp.int32)
    return jnp.where(on, jnp.where(near_exact(ratio, num_samples), 2, 1), 0).astype(jnp.int32)


def reflected(layout) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """For draws in reflected groups: which offsets need a product, and where each draw's comes from.

    ``layout`` is :func:`vijax._objectives.antithetic_layout`'s ``(groups,
    signs)``. A draw whose noise signs are the negation of an earlier draw's
    in its group has the negated offset from q's mean, so its
    Hessian-vector product is the negated one. Returns ``(computed, source)``:
    the draws whose products are computed, and per draw ``(row in computed,
    sign)``.
    """
    groups, signs = layout
    computed, source, seen = [], [], {}
    for s, (g, sign) in enumerate(zip(groups, signs)):
        flipped = (g, (-sign[0], -sign[1]))
        if flipped in seen:
            source.append((seen[flipped], -1))
        else:
            seen[(g, tuple(sign))] = len(computed)
            source.append((len(computed), 1))
            computed.append(s)
    return tuple(computed), tuple(source)


def control_terms(control: TaylorReference, log_joint: Callable, params: Any, family,
                  z: ArrayTree, layout=None) -> tuple[jax.Array, jax.Array]:
    """``(Q_s, E_q[Q])`` as surrogates: values ``Q(z_s)`` and ``E_q[Q]``, gradients exact.

    ``Q_s``'s gradient with respect to ``params`` is ``grad Q(z_s) dz_s /
    dparams`` (through the draws, as ``log p``'s), ``E_q[Q]``'s that of the
    closed form; ``m0``, ``g0`` and ``H0`` are constants. With ``layout``
    (antithetic draws, :func:`reflected`) a reflected draw's product is its
    partner's negated, so half the products are computed.
    """
    q = family.to_gaussian(params)
    m0 = _sg(control.loc.astype(q.mean.dtype))
    hess_diag = _sg(control.hess_diag.astype(q.mean.dtype))
    f, _ = _flat(log_joint, params.loc)
    g0, hvp = jax.linearize(jax.grad(f), m0)
    zf = jax.vmap(lambda t: ravel_pytree(t)[0])(z)  # (S, d), differentiable
    r = _sg(zf) - m0[None, :]
    delta = q.mean - m0
    # H0 r_s = H0 delta + H0 o_s, o_s = z_s - mean the draw's offset from q's mean.
    offsets = _sg(zf - q.mean[None, :])
    computed, source = reflected(layout) if layout is not None else (
        tuple(range(r.shape[0])), tuple((i, 1) for i in range(r.shape[0])))
    tangents = [offsets[jnp.asarray(computed)], _sg(delta)[None]]
    factor = q.scale.cov_factor if isinstance(q.scale, LowRankScale) else None
    if factor is not None:
        tangents.append(_sg(factor).T)
    h = jax.vmap(hvp)(jnp.concatenate(tangents, axis=0))
    c = len(computed)
    h_delta = h[c]
    rows = jnp.asarray([i for i, _ in source])
    signs = jnp.asarray([sign for _, sign in source], h.dtype)
    h_r = h_delta[None, :] + h[:c][rows] * signs[:, None]
    grad_q = g0[None, :] + h_r  # grad Q at each draw
    q_values = r @ g0 + 0.5 * jnp.sum(r * h_r, axis=1)
    q_s = q_values + jnp.sum(grad_q * (zf - _sg(zf)), axis=1)

    if isinstance(q.scale, LowRankScale):
        diag_var = jnp.square(q.scale.diag_scale)
    else:
        diag_var = jnp.square(q.scale.scale)
    mean_part = _sg(delta) @ (g0 + 0.5 * h_delta)
    expected = (mean_part + 0.5 * jnp.sum(hess_diag * _sg(diag_var))
                + (g0 + h_delta) @ (q.mean - _sg(q.mean))
                + 0.5 * jnp.sum(hess_diag * (diag_var - _sg(diag_var))))
    if factor is not None:
        h_w = h[c + 1:].T  # (d, k) = H0 W
        expected = (expected + 0.5 * jnp.sum(_sg(factor) * h_w)
                    + jnp.sum(h_w * (factor - _sg(factor))))
    return q_s, expected
