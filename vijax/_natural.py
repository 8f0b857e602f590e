"""Natural-gradient variational inference for Gaussian families, as an optax transformation.

:func:`natural_gradient` turns a Euclidean gradient of ``-ELBO`` with respect
to a family's parameters into the natural-gradient step of Khan and Lin (2017)
and Khan et al. (2018): a step of size ``rho`` along the natural gradient of a
Gaussian ``q = N(mu, Sigma)`` is, in its natural parameters,

    P_new  = P - 2 rho dELBO/dSigma,        (P = Sigma^{-1})
    mu_new = mu + rho Sigma_new dELBO/dmu.

No Fisher matrix is formed. The gradients with respect to ``(mu, Sigma)`` are
recovered from the parameter gradient in closed form:

1. ``dF/dL`` (``L`` the Cholesky factor, or the diagonal standard deviations)
   is the vector-Jacobian product of the *inverse* map ``(mu, L) -> params``
   with the parameter gradient: if ``phi(psi(L)) = L`` then
   ``J_phi^{-T} = J_psi^T``. So the only place that knows a family's
   parameterization is :func:`params_from_factor`, the inverse of
   ``family.to_gaussian``.
2. ``dF/dSigma = 0.5 L^{-T} (Q + Q^T) L^{-1}`` with ``Q = Phi(L^T dF/dL)``
   (``Phi`` takes the lower triangle and halves the diagonal): the Cholesky
   back-propagation identity of Murray (2016).

In the whitened coordinates of the current factor the precision update is
``L^T P_new L = I + rho (Q + Q^T) =: K``, so ``Sigma_new = L K^{-1} L^T`` and
its Cholesky factor is ``L U^{-T}`` with ``K = U U^T``, ``U`` *upper*
triangular (a Cholesky factor of the index-reversed ``K``): one Cholesky
factorization and one triangular solve, O(d^3) time and O(d^2) memory for the
full-rank family, O(d) for mean-field. Nothing is inverted explicitly.
A full-rank step with the one-step property cannot avoid that work: from
exact gradients a step of size 1 returns the Cholesky factor of the
posterior covariance, and the gradient is a dense d x d matrix in general,
so the step does the work of a dense Cholesky factorization of an arbitrary
positive-definite matrix. What the closed form saves is the Fisher matrix:
it has O(d^4) entries for this family and solving with it densely would
cost O(d^6). ``K`` is also what bounds a step: ``Sigma_new <= c Sigma`` exactly when
``K >= I / c``, which one more Cholesky factorization (of ``K - I / c``)
checks; ``max_variance_growth=c`` halves steps until it holds.

References:
  M. E. Khan and W. Lin. Conjugate-computation variational inference:
  converting variational inference in non-conjugate models to inferences in
  conjugate models. AISTATS 2017.

  M. E. Khan, D. Nielsen, V. Tangkaratt, W. Lin, Y. Gal and A. Srivastava.
  Fast and scalable Bayesian deep learning by weight-perturbation in Adam.
  ICML 2018.

  I. Murray. Differentiation of the Cholesky decomposition. arXiv:1602.07527,
  2016.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import solve_triangular

from vijax import _checks
from vijax._families import (
    FullRankParams,
    MeanFieldParams,
    VariationalFamily,
    full_rank_params_from_tril,
    mean_field_params_from_scale,
)

ArrayTree = Any
Schedule = Callable[[jax.Array], jax.Array]

SUPPORTED_FAMILIES = ("mean_field", "full_rank")


# ----------------------------------------------------------------- inverses
def params_from_factor(family_name: str, loc: jax.Array, factor: jax.Array, unravel):
    """Returns the family's params for a flat mean and a scale factor.

    The inverse of ``family.to_gaussian``: ``factor`` is the (d,) vector of
    standard deviations for ``"mean_field"`` and the (d, d) lower-triangular
    Cholesky factor (positive diagonal; only the lower triangle is read) for
    ``"full_rank"``. Differentiable; used both to map natural-gradient steps
    back to parameters and, through its vector-Jacobian product, to turn a
    parameter gradient into a factor gradient.
    """
    if family_name == "mean_field":
        return mean_field_params_from_scale(unravel(loc), factor)
    if family_name == "full_rank":
        return full_rank_params_from_tril(unravel(loc), factor)
    raise _unsupported(family_name)


def factor_of(family_name: str, gaussian) -> jax.Array:
    """Returns the scale factor :func:`params_from_factor` takes, from a Gaussian."""
    if family_name == "mean_field":
        return gaussian.scale.scale
    return jnp.tril(gaussian.scale.tril)


def _unsupported(name) -> ValueError:
    return ValueError(
        "`family` must be vijax.mean_field() or vijax.full_rank() (closed-form "
        f"natural gradients exist for these); got a family named {name!r}."
    )


def check_family(family: Any, supported: tuple[str, ...] = SUPPORTED_FAMILIES) -> str:
    """Raises unless ``family`` is a VariationalFamily with a supported name."""
    if not isinstance(family, VariationalFamily):
        raise TypeError(
            "`family` must be a vijax.VariationalFamily (vijax.mean_field() or "
            f"vijax.full_rank()); got {type(family).__name__}."
        )
    if family.name not in supported:
        if supported == ("full_rank",):
            raise ValueError(
                "`family` must be vijax.full_rank(); got a family named "
                f"{family.name!r}."
            )
        raise _unsupported(family.name)
    return family.name


def _check_learning_rate(learning_rate) -> Union[float, Schedule]:
    if callable(learning_rate):
        return learning_rate
    return _checks.check_positive_float(
        "learning_rate", learning_rate, also=" or a schedule (a callable of the step count)"
    )


# ------------------------------------------------------------------- steps
def _upper_cholesky(k: jax.Array) -> jax.Array:
    """Upper-triangular U with ``k = U U^T`` (Cholesky of the reversed matrix)."""
    return jnp.linalg.cholesky(k[::-1, ::-1])[::-1, ::-1]


def _full_rank_step(mu, tril, g_mu, g_tril, rho, min_eig):
    """One natural-gradient step of size rho; returns (mu, tril, ok).

    ``ok`` is False unless the whitened new precision ``K`` is positive
    definite and, when ``min_eig`` is not None, ``K - min_eig I`` is too.
    """
    d = mu.shape[0]
    q = jnp.tril(tril.T @ g_tril)
    q = q - 0.5 * jnp.diag(jnp.diagonal(q))
    e = q + q.T  # whitened gradient: L^T (2 dF/dSigma) L
    eye = jnp.eye(d, dtype=mu.dtype)
    k = eye + rho * e
    k = 0.5 * (k + k.T)
    u = _upper_cholesky(k)
    # Sigma_new = L K^{-1} L^T = (L U^{-T}) (L U^{-T})^T, L U^{-T} lower triangular.
    new_tril = solve_triangular(u, tril.T, lower=False).T
    new_tril = jnp.tril(new_tril)
    ok = jnp.all(jnp.isfinite(new_tril)) & jnp.all(jnp.diagonal(u) > 0)
    if min_eig is not None:
        # K >= min_eig I  <=>  Sigma_new <= Sigma / min_eig: one more Cholesky.
        margin = jnp.linalg.cholesky((1.0 - min_eig) * eye + rho * e)
        ok = ok & jnp.all(jnp.isfinite(margin)) & jnp.all(jnp.diagonal(margin) > 0)
    new_mu = mu - rho * (new_tril @ (new_tril.T @ g_mu))
    return new_mu, new_tril, ok


def _mean_field_step(mu, scale, g_mu, g_scale, rho, min_eig):
    """Mean-field analogue: K is diagonal, ``k_i = 1 + rho sigma_i dF/dsigma_i``."""
    k = 1.0 + rho * scale * g_scale
    ok = jnp.all(k > (0.0 if min_eig is None else min_eig))
    new_scale = scale / jnp.sqrt(jnp.where(k > 0, k, 1.0))
    new_mu = mu - rho * jnp.square(new_scale) * g_mu
    return new_mu, new_scale, ok & jnp.all(jnp.isfinite(new_scale))


class NaturalGradientState(NamedTuple):
    """State of :func:`natural_gradient`.

    Attributes:
      count: the number of updates so far (int32), the schedule's argument.
      step_size: the step size rho the last update used, after backtracking
        (0 when no positive-definite step was found and the update was zero).
      num_backtracks: the total number of step halvings so far (int32). Each
        halving means ``P - 2 rho dELBO/dSigma`` was not positive definite at
        the scheduled rho.
    """

    count: jax.Array
    step_size: jax.Array
    num_backtracks: jax.Array


def natural_gradient(
    family: VariationalFamily,
    learning_rate: Union[float, Schedule],
    *,
    max_backtracks: int = 30,
    max_variance_growth: Optional[float] = None,
) -> optax.GradientTransformation:
    """Returns an optax transformation taking natural-gradient steps for a Gaussian family.

    Its ``update(grads, state, params)`` receives the Euclidean gradient of the
    loss ``-ELBO`` with respect to the family's parameters (what ``jax.grad``
    of a negated :func:`vijax.elbo` estimate, or of ``-exact_elbo``, gives; any
    estimator works) and returns ``updates`` such that
    ``optax.apply_updates(params, updates)`` is the natural-gradient step
    (Khan and Lin 2017)::

        P_new  = P - 2 rho dELBO/dSigma
        mu_new = mu + rho Sigma_new dELBO/dmu

    computed in closed form with no Fisher matrix (see the module docstring):
    O(d) per step for :func:`vijax.mean_field`, one Cholesky factorization
    and one triangular solve (O(d^3) time, O(d^2) memory) for
    :func:`vijax.full_rank`.

    On a Gaussian target with exact gradients, a full-rank step of size 1
    lands on the exact posterior from any starting point; a mean-field step of
    size 1 sets each variance to its optimum ``1 / P_ii`` and moves the mean by
    one Jacobi sweep.

    With Monte Carlo gradients, the covariance part of the gradient carries
    noise proportional to the gradient at the mean, and a full-rank step
    estimates a d x d matrix from S draws. So while the mean is far from the
    optimum (many posterior standard deviations), or when S is much smaller
    than d, a noisy step can make the new precision nearly singular in some
    direction and blow the covariance up there. For Monte Carlo gradients use
    the ``"stl"`` estimator (its noise vanishes at a Gaussian posterior) and
    a decaying step such as ``lambda t: 0.3 / (1 + t / 50)``; for the
    full-rank family with S much smaller than d, also
    ``max_variance_growth=2`` (no step may more than double a variance).
    With S of the order of d the bound only slows convergence.
    ``benchmarks/fast_vi.py`` records what each choice costs: with these
    settings and S = 8 the full-rank family reaches the posterior of a
    100-dimensional Bayesian linear regression in about 6 times fewer
    gradient evaluations than the best Adam (without the growth bound it
    diverges at S = 8), and a 50-dimensional logistic regression's optimum in
    about 13 times fewer. At d = 500 with S = 8 it does not converge within
    the benchmark's budget; batch-and-match (:func:`vijax.batch_and_match`)
    is the method that does.

    For the mean-field family the stl noise does not vanish at the family's
    optimum (unless the posterior is itself diagonal), so with a constant
    step the iterates settle into a jitter around it whose KL grows with the
    step and with d, and a decaying step slow enough to remove it converges
    slowly on a correlated target. Wrap the transformation in
    :func:`vijax.iterate_average` and read :func:`vijax.averaged_params`:
    the mean of the iterates after a burn-in removes most of the jitter. On a
    500-dimensional Bayesian linear regression, rho = 0.1, S = 8,
    ``max_variance_growth=2`` and averaging from step 1000 come within 1e-2
    of the mean-field optimum in 36592 to 41880 gradient evaluations over
    five seeds; Adam at any learning rate does not in 800000
    (``benchmarks/fast_vi.py``).

    If ``P_new`` is not positive definite at the scheduled ``rho`` (a large
    step on a noisy gradient), or with ``max_variance_growth`` set it would
    grow the variance in some direction by more than that factor (``P_new``
    is not above ``P / max_variance_growth``), ``rho`` is halved until it
    is, at most ``max_backtracks`` times; the halvings are counted in the
    state, and if none succeeds the update is zero (``state.step_size ==
    0``). A
    non-finite gradient gives non-finite updates, as in optax's own
    transformations: :func:`vijax.fit` skips such steps; in a hand-written loop
    wrap the transformation in ``optax.apply_if_finite``.

    Args:
      family: :func:`vijax.mean_field` or :func:`vijax.full_rank`.
      learning_rate: the step size rho > 0 (1 is the full step), or an optax
        schedule ``count -> rho``.
      max_backtracks: the largest number of step halvings per update (>= 0).
      max_variance_growth: ``None`` (default) or a float > 1: the largest
        factor by which one step may multiply the variance of q along any
        direction (``Sigma_new <= max_variance_growth * Sigma``); larger
        steps are halved. For the full-rank family the check costs one more
        Cholesky factorization per attempt. ``None`` (or ``inf``) only
        requires ``P_new`` to be positive definite, which keeps the one-step
        property above from any starting point; set it (2 works well) for
        Monte Carlo gradients with few samples per step (S much smaller
        than d).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires
      ``params``; its state is a :class:`NaturalGradientState`.

    Raises:
      TypeError: ``family`` is not a VariationalFamily, ``learning_rate``
        is neither a number nor a callable, or ``max_variance_growth`` is
        neither None nor a number.
      ValueError: the family has no closed-form natural gradient here
        (``low_rank``), ``learning_rate`` not a finite number > 0,
        ``max_backtracks < 0`` or ``max_variance_growth <= 1``; and,
        from ``update``, missing ``params`` or gradients whose structure differs
        from ``params``.

    References:
      M. E. Khan and W. Lin. Conjugate-computation variational inference:
      converting variational inference in non-conjugate models to inferences
      in conjugate models. AISTATS 2017.

      M. E. Khan, D. Nielsen, V. Tangkaratt, W. Lin, Y. Gal and
      A. Srivastava. Fast and scalable Bayesian deep learning by
      weight-perturbation in Adam. ICML 2018.

    Example:
      >>> import jax, optax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.full_rank()
      >>> params = family.init(model.latent)
      >>> opt = vijax.natural_gradient(family, 1.0)
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: -vijax.exact_elbo(p, family, model))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> float(vijax.exact_kl(params, family, model)) < 1e-5
      True
    """
    name = check_family(family)
    learning_rate = _check_learning_rate(learning_rate)
    max_backtracks = _checks.check_positive_int(
        "max_backtracks", max_backtracks, minimum=0
    )
    min_eig = None
    if max_variance_growth is not None:
        expected = (
            "`max_variance_growth` must be None or a float > 1 (the largest factor "
            f"one step may multiply a variance by); got {max_variance_growth!r}."
        )
        if isinstance(max_variance_growth, bool) or not isinstance(
            max_variance_growth, (int, float, np.integer, np.floating)
        ):
            raise TypeError(expected)
        if not max_variance_growth > 1.0:
            raise ValueError(expected)
        if math.isfinite(max_variance_growth):  # inf is no bound: skip the check
            min_eig = 1.0 / float(max_variance_growth)
    params_type = FullRankParams if name == "full_rank" else MeanFieldParams
    step_fn = _full_rank_step if name == "full_rank" else _mean_field_step

    def init(params):
        _check_params(params, params_type, name)
        dtype = ravel_pytree(params.loc)[0].dtype
        return NaturalGradientState(
            count=jnp.zeros((), jnp.int32),
            step_size=jnp.zeros((), dtype),
            num_backtracks=jnp.zeros((), jnp.int32),
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "`params` must be passed to the natural-gradient update "
                "(`opt.update(grads, state, params)`): the step depends on the "
                "current Gaussian."
            )
        _check_params(params, params_type, name)
        grads = _check_grads(updates, params)
        q = family.to_gaussian(params)
        mu = q.mean
        factor = factor_of(name, q)
        unravel = ravel_pytree(params.loc)[1]
        dtype = mu.dtype

        inverse = lambda m, f: params_from_factor(name, m, f, unravel)  # noqa: E731
        _, vjp = jax.vjp(inverse, mu, factor)
        g_mu, g_factor = vjp(grads)

        if callable(learning_rate):
            rho = jnp.asarray(learning_rate(state.count), dtype)
        else:
            rho = jnp.asarray(learning_rate, dtype)
        finite = jnp.all(jnp.isfinite(g_mu)) & jnp.all(jnp.isfinite(g_factor))

        def attempt(r):
            return step_fn(mu, factor, g_mu, g_factor, r, min_eig)

        new_mu, new_factor, ok = attempt(rho)

        def cond(carry):
            _, _, _, ok, n = carry
            return finite & ~ok & (n < max_backtracks)

        def body(carry):
            r, _, _, _, n = carry
            r = 0.5 * r
            m, f, ok = attempt(r)
            return r, m, f, ok, n + 1

        rho_used, new_mu, new_factor, ok, n = jax.lax.while_loop(
            cond, body, (rho, new_mu, new_factor, ok, jnp.zeros((), jnp.int32))
        )
        # No positive-definite step: keep the current Gaussian (a zero update),
        # reported as step_size 0. A non-finite gradient stays non-finite.
        keep = finite & ~ok
        new_mu = jnp.where(keep, mu, new_mu)
        new_factor = jnp.where(keep, factor, new_factor)
        rho_used = jnp.where(keep, jnp.zeros_like(rho_used), rho_used)
        nan = jnp.asarray(jnp.nan, dtype)
        new_mu = jnp.where(finite, new_mu, nan)
        new_factor = jnp.where(finite, new_factor, nan)

        new_params = inverse(new_mu, new_factor)
        out = jax.tree_util.tree_map(lambda a, b: a - b, new_params, params)
        if name == "full_rank":
            # Only the strict lower triangle of off_diag is used; leave the rest.
            d = mu.shape[0]
            mask = jnp.tril(jnp.ones((d, d), bool), -1)
            out = out._replace(
                off_diag=jnp.where(mask | ~finite, out.off_diag, 0.0).astype(dtype)
            )
        out = jax.tree_util.tree_map(lambda u: jnp.where(keep, jnp.zeros_like(u), u), out)
        new_state = NaturalGradientState(
            count=optax.safe_int32_increment(state.count),
            step_size=rho_used,
            num_backtracks=state.num_backtracks + n,
        )
        return out, new_state

    return optax.GradientTransformation(init, update)


def _check_params(params, params_type, name) -> None:
    if not isinstance(params, params_type):
        raise TypeError(
            f"`params` must be {params_type.__name__} (from vijax.{name}().init); "
            f"got {type(params).__name__}."
        )


def _check_grads(grads, params):
    g_def = jax.tree_util.tree_structure(grads)
    p_def = jax.tree_util.tree_structure(params)
    if g_def != p_def:
        raise ValueError(
            f"the gradient must have the structure of `params` {p_def}; got {g_def}."
        )
    return jax.tree_util.tree_map(lambda g, p: jnp.asarray(g, p.dtype), grads, params)
