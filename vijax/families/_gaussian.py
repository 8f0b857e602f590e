"""Gaussian variational families over pytree latents.

Each is a :class:`vijax.VariationalFamily` with every capability: ``entropy``
and the Gaussian view (``to_gaussian``, ``from_gaussian``). Its parameters are
a NamedTuple of arrays that optax updates directly. The location ``loc`` keeps the shape of the
user's latent pytree (so the parameters carry the latent structure with them);
the scale parameters act on the flat vector of size d that
``jax.flatten_util.ravel_pytree`` gives, flattened once at the edge.

Every real parameter value is valid: scales pass through softplus.

Per-sample cost: mean-field O(d), full-rank O(d^2), low-rank O(d k); the only
super-linear work (the k x k capacitance Cholesky of the low-rank family) does
not depend on the sample and is computed once per call even under ``vmap``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from vijax import _checks, _host
from vijax._gaussian import (
    CholeskyScale,
    DiagonalScale,
    Gaussian,
    LowRankPrecisionScale,
    LowRankScale,
)
from vijax.families._protocol import VariationalFamily

ArrayTree = Any


class MeanFieldParams(NamedTuple):
    """Parameters of :func:`mean_field`.

    Attributes:
      loc: the mean, a pytree shaped like the latent.
      raw_scale: (d,) unconstrained; the standard deviations are
        ``softplus(raw_scale)``.
    """

    loc: ArrayTree
    raw_scale: jax.Array


class FullRankParams(NamedTuple):
    """Parameters of :func:`full_rank`.

    The covariance factor is ``L = diag(softplus(raw_scale)) @ (I + tril(
    off_diag, -1))``: a unit lower-triangular matrix whose rows are scaled by
    positive standard deviations. The strict lower triangle is dimensionless
    (it holds regression-like coefficients), which keeps Adam's per-coordinate
    steps well scaled; see ``benchmarks/parameterization.py``.

    Attributes:
      loc: the mean, a pytree shaped like the latent.
      raw_scale: (d,) unconstrained row scales.
      off_diag: (d, d); only the strict lower triangle is used.
    """

    loc: ArrayTree
    raw_scale: jax.Array
    off_diag: jax.Array


class LowRankParams(NamedTuple):
    """Parameters of :func:`low_rank`: ``cov = W W^T + diag(softplus(raw)^2)``.

    Attributes:
      loc: the mean, a pytree shaped like the latent.
      raw_scale: (d,) unconstrained diagonal standard deviations.
      cov_factor: W, shape (d, rank).
    """

    loc: ArrayTree
    raw_scale: jax.Array
    cov_factor: jax.Array


class LowRankPrecisionParams(NamedTuple):
    """Parameters of :func:`low_rank_precision`: ``cov^{-1} = U U^T + diag(softplus(raw)^-2)``.

    Attributes:
      loc: the mean, a pytree shaped like the latent.
      raw_scale: (d,) unconstrained; ``softplus(raw_scale)**-2`` is the
        diagonal part of the precision (with ``U = 0``, the standard
        deviations are ``softplus(raw_scale)``, as in :func:`mean_field`).
      prec_factor: U, shape (d, rank).
    """

    loc: ArrayTree
    raw_scale: jax.Array
    prec_factor: jax.Array


def _softplus_inverse(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


def _softplus_inverse_host(y):
    """softplus^{-1}(y) in NumPy float64, for a float or an array of y > 0."""
    y = np.asarray(y, np.float64)
    return y + np.log(-np.expm1(-y))


def _flat_loc(latent: ArrayTree) -> tuple[jax.Array, Callable]:
    latent = _checks.check_latent("latent", latent)
    return ravel_pytree(latent)


def _init_loc(latent: ArrayTree) -> tuple[ArrayTree, int, Any]:
    """A copy of the checked latent (the initial mean), its flat dimension d and dtype.

    The parameters never share a buffer with the caller's latent: donating
    the parameters to a jitted step must not delete ``model.latent``.
    """
    latent = _checks.check_latent("latent", latent)
    leaves = jax.tree_util.tree_leaves(latent)
    return _host.fresh_copy(latent), sum(leaf.size for leaf in leaves), leaves[0].dtype


# Inverses of the parameterizations, shared with the natural-gradient and
# batch-and-match updates (which move (mean, factor) and map back).
def mean_field_params_from_scale(loc: ArrayTree, scale: jax.Array) -> MeanFieldParams:
    """Mean-field params for a ``loc`` pytree and (d,) positive standard deviations."""
    return MeanFieldParams(loc=loc, raw_scale=_softplus_inverse(scale))


def full_rank_params_from_tril(loc: ArrayTree, tril: jax.Array) -> FullRankParams:
    """Full-rank params for a ``loc`` pytree and a lower-triangular factor.

    ``tril`` must have a positive diagonal; only its lower triangle is read.
    """
    scale = jnp.diagonal(tril)
    return FullRankParams(
        loc=loc,
        raw_scale=_softplus_inverse(scale),
        off_diag=jnp.tril(tril, -1) / scale[:, None],
    )


def _gaussian_and_unravel(gaussian, latent, name):
    if not isinstance(gaussian, Gaussian):
        raise TypeError(f"`gaussian` must be a vijax.Gaussian; got {type(gaussian).__name__}.")
    flat, unravel = _flat_loc(latent)
    if gaussian.dim != flat.shape[0]:
        raise ValueError(
            f"`gaussian` must have the latent's dimension {flat.shape[0]}; got {gaussian.dim}."
        )
    return unravel(gaussian.mean.astype(flat.dtype)), flat.dtype


def _wrong_structure(name, gaussian, accepted):
    return ValueError(
        f"vijax.{name}().from_gaussian needs a Gaussian with a {accepted} scale; got "
        f"{type(gaussian.scale).__name__}. Build one with the structure you want "
        "(e.g. vijax.Gaussian.diagonal(mean, jnp.sqrt(g.variance)))."
    )


def _diagonal_entropy(params) -> jax.Array:
    """H[q] of a factor whose diagonal is ``softplus(raw_scale)``, in O(d).

    Both mean-field and full-rank factors qualify (the full-rank one is unit
    triangular with scaled rows), so ``log det L = sum log softplus(raw)``:
    no d x d factor is built, forward or backward.
    """
    sd = jax.nn.softplus(params.raw_scale)
    d = sd.shape[0]
    return jnp.sum(jnp.log(sd)) + 0.5 * d * (1.0 + math.log(2.0 * math.pi))


def _variance_forward(params):
    """``params`` with ``raw_scale`` replaced by the variances ``softplus(raw_scale)**2``."""
    return params._replace(raw_scale=jnp.square(jax.nn.softplus(params.raw_scale)))


def _variance_inverse(averaged):
    """The inverse of :func:`_variance_forward` (variances floored at the dtype's tiny)."""
    var = averaged.raw_scale
    var = jnp.maximum(var, jnp.finfo(var.dtype).tiny)
    return averaged._replace(raw_scale=_softplus_inverse(jnp.sqrt(var)))


#: ``family.average_space`` of the families whose covariance adds a diagonal
#: ``softplus(raw_scale)**2``: average the variances. Near a Gaussian target
#: the ELBO's expected gradient in ``raw_scale`` is about ``1 - P_ii sd_i**2``
#: (exactly that for ``sd`` small, where softplus is exp): linear in the
#: variance, so the mean variance of a constant step's jittering iterates
#: solves the optimum's equation, while the mean ``raw_scale`` is biased
#: low by about the jitter's variance. ``benchmarks/results/cpu/default_fit.md``
#: measures what it changes.
VARIANCE_SPACE = (_variance_forward, _variance_inverse)


def _check_param_shapes(name: str, params, shapes: Callable[[int], dict]) -> None:
    """Raises ``ValueError`` unless the scale fields have the shapes ``shapes(d)`` gives.

    ``d`` is the size of ``params.loc``. Static shapes only (safe under jit,
    vmap and grad). Parameters stacked by :func:`vijax.fit_batched` (one
    leading axis of size B on every leaf) would otherwise look like one
    member of dimension B d and fail deep inside with a broadcasting error,
    or, in ``to_gaussian``, build a Gaussian whose mean and scale disagree.
    """
    leaves = jax.tree_util.tree_leaves(params)
    d = sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params.loc))
    expected = shapes(d)
    got = {field: tuple(jnp.shape(getattr(params, field))) for field in expected}
    if got == expected:
        return
    leads = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(leads) == 1 and None not in leads:
        (b,) = leads
        if d % b == 0 and got == {f: (b,) + s for f, s in shapes(d // b).items()}:
            field = next(iter(got))
            raise ValueError(
                f"`params` carry a leading batch axis of size {b} (`params.{field}` has "
                f"shape {got[field]}; vijax.{name} expects {_expected_text(shapes, field)} "
                "for one member), as vijax.fit_batched returns. Pass one member, "
                "`jax.tree_util.tree_map(lambda a: a[i], params)`, or jax.vmap over them."
            )
    for field, shape in got.items():
        if shape != expected[field]:
            raise ValueError(
                f"`params.{field}` has shape {shape}; expected {expected[field]} "
                f"({_expected_text(shapes, field)} with d = {d}, the size of `params.loc`). "
                f"Build params with vijax.{name}(...).init(latent)."
            )


def _expected_text(shapes: Callable[[int], dict], field: str) -> str:
    """``"(d,)"``, ``"(d, d)"``, ``"(d, 2)"``: a field's shape in terms of d."""
    one, two = shapes(1)[field], shapes(2)[field]  # d's entries are those that change
    dims = ["d" if a != b else str(a) for a, b in zip(one, two)]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def _make_family(
    name: str, params_type, init, to_gaussian, from_gaussian, entropy=None,
    average_space=None, *, shapes: Callable[[int], dict],
) -> VariationalFamily:
    """Builds the shared sample/log_prob/entropy around a family's Gaussian.

    ``entropy(params)``, when given, replaces the Gaussian view's (a cheaper
    closed form for the same value); ``average_space`` is passed on.
    ``shapes(d)`` gives ``{field: shape}`` of the scale parameters for a
    latent of size d; every entry point checks the params against it.
    """

    def check_params(params):
        if not isinstance(params, params_type):
            raise TypeError(
                f"`params` must be {params_type.__name__} (from "
                f"vijax.{name}().init); got {type(params).__name__}."
            )
        _check_param_shapes(name, params, shapes)

    def to_gaussian_checked(params):
        check_params(params)
        return to_gaussian(params)

    def sample(key, params, num_samples):
        num_samples = _checks.check_positive_int("num_samples", num_samples)
        q = to_gaussian_checked(params)
        z = q.sample(key, (num_samples,))
        _, unravel = ravel_pytree(params.loc)
        return jax.vmap(unravel)(z)

    def log_prob(params, z):
        q = to_gaussian_checked(params)
        loc_def = jax.tree_util.tree_structure(params.loc)
        z_def = jax.tree_util.tree_structure(z)
        if z_def != loc_def:
            raise ValueError(
                f"`z` must have the latent's structure {loc_def}; got {z_def}."
            )
        flat, _ = ravel_pytree(z)
        if flat.shape != q.mean.shape:
            raise ValueError(
                f"`z` must flatten to shape {q.mean.shape} (one latent, no "
                f"sample axis); got {flat.shape}. vmap over samples."
            )
        return q.log_prob(flat)

    def gaussian_entropy(params):
        return to_gaussian_checked(params).entropy()

    def checked_entropy(params):
        check_params(params)
        return entropy(params)

    return VariationalFamily(
        init=init,
        sample=sample,
        log_prob=log_prob,
        entropy=gaussian_entropy if entropy is None else checked_entropy,
        to_gaussian=to_gaussian_checked,
        name=name,
        from_gaussian=from_gaussian,
        average_space=average_space,
    )


def mean_field(*, init_scale: float = 0.1) -> VariationalFamily:
    """Returns the mean-field (diagonal) Gaussian family.

    ``q(z) = N(loc, diag(softplus(raw_scale)**2))``. Per-sample cost O(d).

    Args:
      init_scale: the initial standard deviation of every coordinate (finite, > 0).

    Returns:
      A :class:`VariationalFamily` whose params are :class:`MeanFieldParams`.

    Example:
      >>> import jax, jax.numpy as jnp, vijax
      >>> family = vijax.mean_field()
      >>> params = family.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
      >>> z = family.sample(jax.random.key(0), params, 5)
      >>> z["w"].shape, z["b"].shape
      ((5, 3), (5,))
    """
    init_scale = _checks.check_positive_float("init_scale", init_scale)

    def init(latent):
        loc, d, dtype = _init_loc(latent)
        raw = _host.constant(_softplus_inverse_host(init_scale), (d,), dtype)
        return MeanFieldParams(loc=loc, raw_scale=raw)

    def to_gaussian(params):
        loc, _ = ravel_pytree(params.loc)
        return Gaussian(loc, DiagonalScale(jax.nn.softplus(params.raw_scale)))

    def from_gaussian(gaussian, latent):
        loc, dtype = _gaussian_and_unravel(gaussian, latent, "mean_field")
        if not isinstance(gaussian.scale, DiagonalScale):
            raise _wrong_structure("mean_field", gaussian, "DiagonalScale")
        return mean_field_params_from_scale(loc, jnp.abs(gaussian.scale.scale).astype(dtype))

    return _make_family(
        "mean_field", MeanFieldParams, init, to_gaussian, from_gaussian, _diagonal_entropy,
        average_space=VARIANCE_SPACE, shapes=lambda d: {"raw_scale": (d,)},
    )


def full_rank(*, init_scale: float = 0.1) -> VariationalFamily:
    """Returns the full-rank Gaussian family.

    ``q(z) = N(loc, L L^T)`` with ``L = diag(softplus(raw_scale)) (I + N)``,
    ``N`` the strict lower triangle of ``off_diag``. Per-sample cost O(d^2).

    The parameterization matters for how plain Adam converges: a Cholesky
    factor with a softplus diagonal leaves off-diagonal entries in the units
    of the posterior scale, and Adam's unit-sized steps then overshoot them by
    orders of magnitude on concentrated posteriors. Scaling a unit triangular
    factor keeps those entries dimensionless. ``benchmarks/parameterization.py``
    measures the difference.

    Args:
      init_scale: the initial standard deviation of every coordinate (finite, > 0);
        the initial correlation is zero.

    Returns:
      A :class:`VariationalFamily` whose params are :class:`FullRankParams`.
    """
    init_scale = _checks.check_positive_float("init_scale", init_scale)

    def init(latent):
        loc, d, dtype = _init_loc(latent)
        raw = _host.constant(_softplus_inverse_host(init_scale), (d,), dtype)
        return FullRankParams(
            loc=loc, raw_scale=raw, off_diag=_host.constant(0.0, (d, d), dtype)
        )

    def to_gaussian(params):
        loc, _ = ravel_pytree(params.loc)
        d = loc.shape[0]
        unit = jnp.tril(params.off_diag, -1) + jnp.eye(d, dtype=loc.dtype)
        tril = jax.nn.softplus(params.raw_scale)[:, None] * unit
        return Gaussian(loc, CholeskyScale(tril))

    def from_gaussian(gaussian, latent):
        loc, dtype = _gaussian_and_unravel(gaussian, latent, "full_rank")
        if isinstance(gaussian.scale, CholeskyScale):
            # A Cholesky factor is unique up to column signs: make the diagonal positive.
            tril = jnp.tril(gaussian.scale.tril)
            tril = tril * jnp.sign(jnp.diagonal(tril))[None, :]
        else:
            tril = jnp.linalg.cholesky(gaussian.cov)  # O(d^3), once
        return full_rank_params_from_tril(loc, tril.astype(dtype))

    return _make_family(
        "full_rank", FullRankParams, init, to_gaussian, from_gaussian, _diagonal_entropy,
        shapes=lambda d: {"raw_scale": (d,), "off_diag": (d, d)},
    )


#: The seed of the low-rank family's initial sign pattern (a constant: ``init`` is deterministic).
_FACTOR_SEED = 20261205


def _sign_pattern(d: int, rank: int) -> np.ndarray:
    """A fixed pseudo-random ``(d, rank)`` matrix of +-1 with ``rank`` independent columns.

    The first draw from ``_FACTOR_SEED`` on whose columns are independent
    (a +-1 matrix can be singular: at d = rank = 2, half of them are). A
    factor with dependent columns would stay so: the ELBO depends on ``W``
    through ``W W^T``, whose gradient ``2 G W`` keeps ``W``'s null space.
    """
    for seed in itertools.count(_FACTOR_SEED):
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(d, rank))
        if np.linalg.matrix_rank(signs) == rank:
            return signs


def low_rank(*, rank: int, init_scale: float = 0.1) -> VariationalFamily:
    """Returns the low-rank-plus-diagonal Gaussian family.

    ``q(z) = N(loc, W W^T + diag(softplus(raw_scale)**2))`` with ``W`` of
    shape (d, rank). Sampling costs O(d rank); log densities use the Woodbury
    identity and matrix determinant lemma.

    ``W`` starts small and spread over every coordinate: entries
    ``+-0.1 init_scale / sqrt(rank)`` in a fixed pseudo-random sign pattern
    (not at zero, where its gradient vanishes exactly, and not on
    coordinate axes: where the optimum puts some coordinates' whole variance
    in ``W``, a factor started on the first ``rank`` axes leads a
    deterministic optimizer to the local optimum that picks those
    coordinates, as measured in the README's "No tuning" and
    ``benchmarks/results/cpu/low_rank_spread_init/``), with independent
    columns. The diagonal is set so that every initial marginal sd is
    ``init_scale``; the initial correlations are at most ``0.01`` in size.

    Args:
      rank: the number of columns of ``W``; 1 <= rank <= d (checked in
        ``init``, where d is known).
      init_scale: the initial standard deviation of every coordinate (finite, > 0).

    Returns:
      A :class:`VariationalFamily` whose params are :class:`LowRankParams`.
    """
    init_scale = _checks.check_positive_float("init_scale", init_scale)

    def initial(d):
        w = (0.1 * init_scale / math.sqrt(rank)) * _sign_pattern(d, rank)
        return w, np.sqrt(init_scale**2 - np.sum(np.square(w), axis=1))

    return _factor_plus_diagonal("low_rank", rank, LowRankParams, LowRankScale, initial,
                                 average_space=VARIANCE_SPACE)


def low_rank_precision(*, rank: int, init_scale: float = 0.1) -> VariationalFamily:
    """Returns the Gaussian family whose *precision* is low rank plus diagonal.

    ``q(z) = N(loc, (U U^T + diag(softplus(raw_scale)**-2))^{-1})`` with ``U``
    of shape (d, rank): the family of SLANG (Mishkin et al. 2018) and of
    :func:`vijax.slang`. Where :func:`low_rank` adds k directions of extra
    *variance* to a diagonal, this one adds k directions of extra
    *precision*: the k best-determined combinations of the latent (a
    regression with fewer observations than weights has exactly this
    posterior). Sampling costs O(d rank) per draw, log densities O(d rank)
    plus an O(d rank^2) capacitance factorization once per call.

    ``U`` starts at ``0.1 / init_scale`` times the first ``rank`` columns of
    the identity (not at zero, where its gradient vanishes exactly), and
    the diagonal is set so that the initial covariance is ``init_scale**2 *
    I``.

    Args:
      rank: the number of columns of ``U``; 1 <= rank <= d (checked in
        ``init``, where d is known).
      init_scale: the initial standard deviation of every coordinate (finite, > 0).

    Returns:
      A :class:`VariationalFamily` whose params are :class:`LowRankPrecisionParams`.

    References:
      A. Mishkin, F. Kunstner, D. Nielsen, M. Schmidt and M. E. Khan. SLANG:
      fast structured covariance approximations for Bayesian deep learning
      with natural gradient. NeurIPS 2018.
    """
    init_scale = _checks.check_positive_float("init_scale", init_scale)

    def initial(d):
        u = (0.1 / init_scale) * np.eye(d, rank)
        # diag(s^-2) + U U^T = I / init_scale^2 (U's columns are coordinate axes).
        return u, 1.0 / np.sqrt(1.0 / init_scale**2 - np.sum(np.square(u), axis=1))

    return _factor_plus_diagonal(
        "low_rank_precision", rank, LowRankPrecisionParams, LowRankPrecisionScale, initial,
        average_space=None)


def _factor_plus_diagonal(name, rank, params_type, scale_type, initial,
                          average_space) -> VariationalFamily:
    """A family whose scale is ``scale_type(factor, softplus(raw_scale))``, factor (d, rank).

    ``params_type`` is ``(loc, raw_scale, <factor>)``; ``initial(d)`` gives
    the initial factor and diagonal (NumPy) for dimension d. Shared by
    :func:`low_rank` (covariance) and :func:`low_rank_precision`.
    """
    rank = _checks.check_positive_int("rank", rank)
    field = params_type._fields[2]

    def init(latent):
        loc, d, dtype = _init_loc(latent)
        if rank > d:
            raise ValueError(
                f"`rank` must be between 1 and the latent dimension d = {d}; "
                f"got rank = {rank}."
            )
        factor, diag = initial(d)
        return params_type(
            loc, _host.constant(_softplus_inverse_host(diag), (d,), dtype),
            _host.constant(factor, (d, rank), dtype))

    def to_gaussian(params):
        loc, _ = ravel_pytree(params.loc)
        return Gaussian(loc, scale_type(params[2], jax.nn.softplus(params.raw_scale)))

    def from_gaussian(gaussian, latent):
        loc, dtype = _gaussian_and_unravel(gaussian, latent, name)
        if not isinstance(gaussian.scale, scale_type) or gaussian.scale.rank != rank:
            raise _wrong_structure(name, gaussian, f"{scale_type.__name__} of rank {rank}")
        return params_type(
            loc, _softplus_inverse(jnp.abs(gaussian.scale.diag_scale)).astype(dtype),
            getattr(gaussian.scale, field).astype(dtype))

    return _make_family(name, params_type, init, to_gaussian, from_gaussian,
                        average_space=average_space,
                        shapes=lambda d: {"raw_scale": (d,), field: (d, rank)})
