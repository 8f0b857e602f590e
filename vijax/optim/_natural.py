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
   ``J_phi^{-T} = J_psi^T``. The inverse map is the family's own
   ``from_gaussian``, so this module knows no family's parameterization:
   any family with a Gaussian view whose scale is a ``DiagonalScale`` or a
   ``CholeskyScale`` works, and the step is chosen by the scale's type.
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

The improved Bayesian learning rule (``rule="iblr"``, Lin, Schmidt and Khan
2020) adds the second-order term ``rho^2 G Sigma G / 2`` to the precision
step; whitened, ``K = (I + (I + rho E)^2) / 2 >= I / 2``, so the new
precision is positive definite for every step size and gradient and no
variance more than doubles in one step, with one more matrix product and no
backtracking.

References:
  M. E. Khan and W. Lin. Conjugate-computation variational inference:
  converting variational inference in non-conjugate models to inferences in
  conjugate models. AISTATS 2017.

  M. E. Khan, D. Nielsen, V. Tangkaratt, W. Lin, Y. Gal and A. Srivastava.
  Fast and scalable Bayesian deep learning by weight-perturbation in Adam.
  ICML 2018.

  I. Murray. Differentiation of the Cholesky decomposition. arXiv:1602.07527,
  2016.

  W. Lin, M. Schmidt and M. E. Khan. Handling the positive-definite
  constraint in the Bayesian learning rule. ICML 2020.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import solve_triangular

from vijax import _checks
from vijax._gaussian import CholeskyScale, DiagonalScale, Gaussian
from vijax.families._protocol import VariationalFamily, check_family, describe, require

ArrayTree = Any
Schedule = Callable[[jax.Array], jax.Array]


# ------------------------------------------------- steps, per scale structure
def _upper_cholesky(k: jax.Array) -> jax.Array:
    """Upper-triangular U with ``k = U U^T`` (Cholesky of the reversed matrix)."""
    return jnp.linalg.cholesky(k[::-1, ::-1])[::-1, ::-1]


def cholesky_step(mu, tril, g_mu, g_tril, rho, min_eig, improved=False):
    """One natural-gradient step of size rho for ``N(mu, tril tril^T)``; returns (mu, tril, ok).

    ``ok`` is False unless the whitened new precision ``K`` is positive
    definite and, when ``min_eig`` is not None, ``K - min_eig I`` is too.
    With ``improved`` the step is the improved Bayesian learning rule of
    Lin, Schmidt and Khan (2020): ``P_new = P + rho G + rho^2 G Sigma G / 2``
    (``G = -2 dELBO/dSigma``), whitened ``K = (I + (I + rho E)^2) / 2``,
    whose eigenvalues are at least 1/2 for every rho and gradient.
    """
    d = mu.shape[0]
    q = jnp.tril(tril.T @ g_tril)
    q = q - 0.5 * jnp.diag(jnp.diagonal(q))
    e = q + q.T  # whitened gradient: L^T (2 dF/dSigma) L
    eye = jnp.eye(d, dtype=mu.dtype)
    k = eye + rho * e
    if improved:
        # K = (I + M M^T) / 2 with M = I + rho E: its factor from a QR
        # factorization of [I; M^T] / sqrt(2), never forming M M^T (which
        # would square M's condition number), in the index-reversed
        # coordinates so that the factor comes out upper triangular.
        m = k[::-1, ::-1]
        r = jnp.linalg.qr(jnp.concatenate([eye, m.T]) / jnp.sqrt(2.0).astype(mu.dtype), mode="r")
        # K_rev = R^T R; its lower factor R^T, with signs making the diagonal positive.
        r = r * jnp.sign(jnp.where(jnp.diagonal(r) == 0, 1.0, jnp.diagonal(r)))[:, None]
        u = r.T[::-1, ::-1]
        k = 0.5 * (eye + k @ k.T)  # only for the growth check below
    else:
        k = 0.5 * (k + k.T)
        u = _upper_cholesky(k)
    # Sigma_new = L K^{-1} L^T = (L U^{-T}) (L U^{-T})^T, L U^{-T} lower triangular.
    new_tril = solve_triangular(u, tril.T, lower=False).T
    new_tril = jnp.tril(new_tril)
    ok = jnp.all(jnp.isfinite(new_tril)) & jnp.all(jnp.diagonal(u) > 0)
    if min_eig is not None:
        # K >= min_eig I  <=>  Sigma_new <= Sigma / min_eig: one more Cholesky.
        margin = jnp.linalg.cholesky(k - min_eig * eye)
        ok = ok & jnp.all(jnp.isfinite(margin)) & jnp.all(jnp.diagonal(margin) > 0)
    new_mu = mu - rho * (new_tril @ (new_tril.T @ g_mu))
    return new_mu, new_tril, ok


def diagonal_step(mu, scale, g_mu, g_scale, rho, min_eig, improved=False):
    """The diagonal analogue: K is diagonal, ``k_i = 1 + rho sigma_i dF/dsigma_i``.

    With ``improved``, ``k_i = (1 + (1 + rho e_i)^2) / 2`` with
    ``e_i = sigma_i dF/dsigma_i`` (the improved rule, ``k_i >= 1/2``).
    """
    k = 1.0 + rho * scale * g_scale
    if improved:
        k = 0.5 * (1.0 + jnp.square(k))
    ok = jnp.all(k > (0.0 if min_eig is None else min_eig))
    new_scale = scale / jnp.sqrt(jnp.where(k > 0, k, 1.0))
    new_mu = mu - rho * jnp.square(new_scale) * g_mu
    return new_mu, new_scale, ok & jnp.all(jnp.isfinite(new_scale))


class _Structure(NamedTuple):
    """How a scale type takes a step: its factor, the scale rebuilt from one, the step."""

    factor: Callable[[Any], jax.Array]
    rebuild: Callable[[jax.Array], Any]
    step: Callable


_STRUCTURES = {
    DiagonalScale: _Structure(lambda s: s.scale, DiagonalScale, diagonal_step),
    CholeskyScale: _Structure(lambda s: jnp.tril(s.tril), CholeskyScale, cholesky_step),
}


def _structure(family: VariationalFamily, q: Gaussian) -> _Structure:
    kind = type(q.scale)
    if kind not in _STRUCTURES:
        raise ValueError(
            "natural_gradient needs a family whose Gaussian view has a DiagonalScale "
            "or a CholeskyScale (vijax.mean_field(), vijax.full_rank()): closed-form "
            f"natural gradients exist for these; {describe(family)} gives a "
            f"{kind.__name__}. For a low-rank-plus-diagonal precision "
            "(vijax.low_rank_precision) use vijax.slang."
        )
    return _STRUCTURES[kind]


# ----------------------------------------------------------- named pieces
def factor_gradients(family: VariationalFamily, params: Any, grads: Any):
    """Returns ``(q, structure, g_mu, g_factor, inverse)`` for a parameter gradient.

    ``g_mu`` and ``g_factor`` are the gradient with respect to the mean and
    the scale factor (standard deviations or Cholesky factor): the
    vector-Jacobian product of the family's inverse map ``inverse(mu,
    factor) -> params`` (built on ``family.from_gaussian``) with ``grads``.
    """
    q = family.to_gaussian(params)
    structure = _structure(family, q)
    # The latent's structure, from the family's own draws (no values used).
    draws = jax.eval_shape(lambda p: family.sample(jax.random.key(0), p, 1), params)
    latent = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape[1:], s.dtype), draws)

    def inverse(mu, factor):
        return family.from_gaussian(Gaussian(mu, structure.rebuild(factor)), latent)

    _, vjp = jax.vjp(inverse, q.mean, structure.factor(q.scale))
    g_mu, g_factor = vjp(grads)
    return q, structure, g_mu, g_factor, inverse


def guarded_step(step, mu, factor, g_mu, g_factor, rho, *, min_eig, max_backtracks):
    """Takes ``step`` at ``rho``, halving it until the new Gaussian is valid.

    Returns ``(mu, factor, rho_used, num_halvings)``. With a non-finite
    gradient the new mean and factor are NaN (as optax's own transformations
    pass NaN on); when no valid step is found within ``max_backtracks``
    halvings the current Gaussian is kept and ``rho_used`` is 0.
    """
    finite = jnp.all(jnp.isfinite(g_mu)) & jnp.all(jnp.isfinite(g_factor))
    new_mu, new_factor, ok = step(mu, factor, g_mu, g_factor, rho, min_eig)
    if max_backtracks == 0:  # no loop to compile
        keep = finite & ~ok
        rho_used = jnp.where(keep, jnp.zeros_like(rho), rho)
        nan = jnp.asarray(jnp.nan, mu.dtype)
        new_mu = jnp.where(finite, jnp.where(keep, mu, new_mu), nan)
        new_factor = jnp.where(finite, jnp.where(keep, factor, new_factor), nan)
        return new_mu, new_factor, rho_used, jnp.zeros((), jnp.int32)

    def cond(carry):
        _, _, _, ok, n = carry
        return finite & ~ok & (n < max_backtracks)

    def body(carry):
        r, _, _, _, n = carry
        r = 0.5 * r
        m, f, ok = step(mu, factor, g_mu, g_factor, r, min_eig)
        return r, m, f, ok, n + 1

    rho_used, new_mu, new_factor, ok, n = jax.lax.while_loop(
        cond, body, (rho, new_mu, new_factor, ok, jnp.zeros((), jnp.int32))
    )
    keep = finite & ~ok
    new_mu = jnp.where(keep, mu, new_mu)
    new_factor = jnp.where(keep, factor, new_factor)
    rho_used = jnp.where(keep, jnp.zeros_like(rho_used), rho_used)
    nan = jnp.asarray(jnp.nan, mu.dtype)
    new_mu = jnp.where(finite, new_mu, nan)
    new_factor = jnp.where(finite, new_factor, nan)
    return new_mu, new_factor, rho_used, n


def updates_to(new_params: Any, params: Any) -> Any:
    """The optax updates that move ``params`` to ``new_params``."""
    return jax.tree_util.tree_map(lambda a, b: (a - b).astype(b.dtype), new_params, params)


def _check_learning_rate(learning_rate) -> Union[float, Schedule]:
    if callable(learning_rate):
        return learning_rate
    return _checks.check_positive_float(
        "learning_rate", learning_rate, also=" or a schedule (a callable of the step count)"
    )


def _check_rule(rule) -> bool:
    """True for the improved rule."""
    if not isinstance(rule, str) or rule not in ("blr", "iblr"):
        raise ValueError(
            f'`rule` must be "blr" or "iblr"; got {rule!r}.'
        )
    return rule == "iblr"


def _check_max_variance_growth(max_variance_growth) -> Optional[float]:
    """The smallest eigenvalue K may have (1 / growth), or None for no bound."""
    if max_variance_growth is None:
        return None
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
        return 1.0 / float(max_variance_growth)
    return None


def _probe(family: VariationalFamily) -> None:
    """Raises now if the family's Gaussian view has an unsupported scale.

    Abstract evaluation on a small latent; a family that cannot be built on
    it (say ``low_rank`` of a larger rank) is checked at ``init`` instead.
    """
    try:
        q = jax.eval_shape(
            lambda: family.to_gaussian(family.init(jnp.zeros(8, jnp.float32)))
        )
    except Exception:
        return
    if isinstance(q, Gaussian):
        _structure(family, q)


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
    rule: str = "blr",
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
    How many gradient evaluations each choice costs against Adam, and where
    it does not converge (the full-rank family far from the posterior at
    d = 500 with S = 8, where :func:`vijax.batch_and_match` does), is
    recorded by ``python -m benchmarks.fast_vi`` in
    ``benchmarks/results/cpu/fast_vi.md`` and summarised in the README.

    For the mean-field family the stl noise does not vanish at the family's
    optimum (unless the posterior is itself diagonal), so with a constant
    step the iterates settle into a jitter around it whose KL grows with the
    step and with d, and a decaying step slow enough to remove it converges
    slowly on a correlated target. Wrap the transformation in
    :func:`vijax.iterate_average` and read :func:`vijax.averaged_params`:
    the mean of the iterates after a burn-in removes most of the jitter
    (measured in ``benchmarks/results/cpu/fast_vi.md``).

    ``rule="iblr"`` takes the improved Bayesian learning rule of Lin,
    Schmidt and Khan (2020) instead, which stays positive definite by
    construction: with ``G = -2 dELBO/dSigma``,

        P_new  = P + rho G + (rho^2 / 2) G Sigma G
               = (P + (P + rho G) Sigma (P + rho G)) / 2,
        mu_new = mu + rho Sigma_new dELBO/dmu,

    so ``P_new >= P / 2``: no step, however large or noisy, more than
    doubles a variance, and no step is ever halved (there is no backtracking
    loop unless ``max_variance_growth`` is set below 2). The extra term is
    of second order in ``rho``, so the rule has the same fixed points and,
    for small steps, the same path as ``"blr"``; it costs one more d x d
    matrix product per full-rank step. It gives up the one-step property
    (a step of size 1 from exact gradients on a Gaussian target no longer
    lands on the posterior, though repeated steps converge to it), and it
    converges only for ``rho < 2``, as ``"blr"`` does.

    Positive definite is not the same as robust to noise. The extra term is
    quadratic in the gradient, so its Monte Carlo estimate is biased
    upwards by the gradient's variance: with noisy covariance gradients
    (few draws, a mean many posterior standard deviations away, where the
    ``"stl"`` noise is largest) the precision overshoots, the variances
    collapse, the mean's step ``rho Sigma_new dELBO/dmu`` shrinks with them
    and the fit stalls. Measured on Bayesian linear regression from the
    default start (``N(0, I)``, KL 2300 at d = 10): with S = 16 draws per
    step ``"iblr"`` was at KL 300-800 after 300 steps at ``rho = 0.3``,
    where ``"blr"`` at ``rho = 0.1`` reached 1e-4; at d = 30 with S = 4 it
    stalled near KL 7000 for every step size tried, where ``"blr"`` with
    ``max_variance_growth=2`` converges. At d = 4 with S = 8 both converge
    alike. So for Monte Carlo gradients with few draws keep ``"blr"`` with
    ``max_variance_growth=2``; ``"iblr"`` is for exact or low-noise
    gradients (or curvature estimates with S well above d) where a step
    must never fail.

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
      family: a family with a Gaussian view (``to_gaussian`` and
        ``from_gaussian``) whose scale is a ``DiagonalScale`` or a
        ``CholeskyScale``: :func:`vijax.mean_field` or :func:`vijax.full_rank`.
      learning_rate: the step size rho > 0 (1 is the full step), or an optax
        schedule ``count -> rho``.
      rule: ``"blr"`` (default) for the natural-gradient step above, or
        ``"iblr"`` for the improved Bayesian learning rule (positive definite
        by construction, variance growth at most 2 per step; see above for
        where its Monte Carlo form stalls).
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
      ValueError: ``rule`` is not ``"blr"`` or ``"iblr"``; the family has no Gaussian view, or one with no
        closed-form natural gradient here (``low_rank``), ``learning_rate`` not a finite number > 0,
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

      W. Lin, M. Schmidt and M. E. Khan. Handling the positive-definite
      constraint in the Bayesian learning rule. ICML 2020.

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
    family = check_family(family)
    require(family, "to_gaussian", "natural_gradient")
    require(family, "from_gaussian", "natural_gradient")
    _probe(family)
    learning_rate = _check_learning_rate(learning_rate)
    max_backtracks = _checks.check_positive_int(
        "max_backtracks", max_backtracks, minimum=0
    )
    min_eig = _check_max_variance_growth(max_variance_growth)
    improved = _check_rule(rule)
    if improved and (min_eig is None or min_eig <= 0.5):
        max_backtracks = 0  # K >= I / 2 always: nothing to halve for

    def init(params):
        from vijax.data._objective import JointParams

        if isinstance(params, JointParams):
            raise TypeError(
                "vijax.natural_gradient updates q's parameters alone; got JointParams "
                "(q with model parameters or an encoder). Give one optimizer per group: "
                "optimizer={'q': vijax.natural_gradient(family, ...), 'theta': "
                "optax.adam(...)}."
            )
        q = family.to_gaussian(params)
        _structure(family, q)
        return NaturalGradientState(
            count=jnp.zeros((), jnp.int32),
            step_size=jnp.zeros((), q.mean.dtype),
            num_backtracks=jnp.zeros((), jnp.int32),
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "`params` must be passed to the natural-gradient update "
                "(`opt.update(grads, state, params)`): the step depends on the "
                "current Gaussian."
            )
        grads = _check_grads(updates, params)
        q, structure, g_mu, g_factor, inverse = factor_gradients(family, params, grads)
        dtype = q.mean.dtype
        count = learning_rate(state.count) if callable(learning_rate) else learning_rate
        rho = jnp.asarray(count, dtype)
        new_mu, new_factor, rho_used, n = guarded_step(
            functools.partial(structure.step, improved=improved), q.mean, structure.factor(q.scale), g_mu, g_factor, rho,
            min_eig=min_eig, max_backtracks=max_backtracks,
        )
        out = updates_to(inverse(new_mu, new_factor), params)
        # No valid step: an exact zero update (not new - old, which rounds).
        kept = rho_used == 0
        out = jax.tree_util.tree_map(lambda u: jnp.where(kept, jnp.zeros_like(u), u), out)
        new_state = NaturalGradientState(
            count=optax.safe_int32_increment(state.count),
            step_size=rho_used,
            num_backtracks=state.num_backtracks + n,
        )
        return out, new_state

    return optax.GradientTransformation(init, update)


def _check_grads(grads, params):
    g_def = jax.tree_util.tree_structure(grads)
    p_def = jax.tree_util.tree_structure(params)
    if g_def != p_def:
        raise ValueError(
            f"the gradient must have the structure of `params` {p_def}; got {g_def}."
        )
    return jax.tree_util.tree_map(lambda g, p: jnp.asarray(g, p.dtype), grads, params)
