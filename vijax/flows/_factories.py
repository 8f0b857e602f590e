"""The flow factories: RealNVP, rational-quadratic spline coupling, IAF.

Each returns a :class:`vijax.VariationalFamily` (see :mod:`vijax.flows._family`
for the construction) usable with no arguments.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

from vijax import _checks
from vijax.families._protocol import VariationalFamily
from vijax.flows import _family


def _common(num_layers, hidden_width, hidden_layers, activation, base, seed):
    num_layers = _checks.check_positive_int("num_layers", num_layers)
    if hidden_width is not None:
        hidden_width = _checks.check_positive_int("hidden_width", hidden_width)
    hidden_layers = _checks.check_positive_int("hidden_layers", hidden_layers)
    activation = _family._check_activation(activation)
    base = None if base is None else _family._check_base(base)
    seed = _family._check_seed(seed)
    return num_layers, hidden_width, hidden_layers, activation, base, seed


def _spline_args(bins, bound):
    bins = _checks.check_positive_int("bins", bins)
    if bins < 2:
        raise ValueError(f"`bins` must be an int >= 2; got {bins}.")
    bound = _checks.check_positive_float("bound", bound)
    return bins, bound


def affine_coupling(
    *,
    num_layers: int = 8,
    hidden_width: Optional[int] = None,
    hidden_layers: int = 2,
    activation: Callable = jax.nn.tanh,
    base: Optional[VariationalFamily] = None,
    seed: int = 0,
) -> VariationalFamily:
    """Returns a RealNVP flow family: affine coupling layers (Dinh et al. 2017).

    Each layer keeps half the coordinates (``x_a``, the first ``d // 2``
    after the layer's permutation) and maps the rest elementwise,
    ``y_b = shift(x_a) + exp(log_scale(x_a)) x_b``, with ``shift`` and
    ``log_scale`` from a perceptron of ``x_a``; ``|log_scale| < 4`` (a soft
    tanh bound, for float32 stability). One pass samples and one pass
    inverts. Needs ``d >= 2``.

    The flow starts as its base Gaussian (the networks' output layers are
    zero); ``family.from_gaussian(gaussian, latent)`` starts it at a fitted
    Gaussian, e.g. ``vijax.full_rank().to_gaussian(result.params)``.

    Args:
      num_layers: coupling layers (>= 1).
      hidden_width: units per hidden layer; default ``2 d`` clipped to
        ``[32, 512]``.
      hidden_layers: hidden layers per conditioner (>= 1).
      activation: the hidden activation (default ``jax.nn.tanh``).
      base: the base Gaussian family, ``vijax.full_rank(init_scale=1.0)``
        (the default) or another ``full_rank``/``mean_field``; its mean and
        scale are learned with the layers.
      seed: seeds the networks' initial weights and the layers' permutations.

    Returns:
      A :class:`vijax.VariationalFamily` named ``"affine_coupling"`` whose
      params are :class:`vijax.flows.FlowParams`, with ``sample_and_log_prob``
      and ``from_gaussian``.

    Example:
      >>> import jax, jax.numpy as jnp, vijax
      >>> flow = vijax.flows.affine_coupling()
      >>> params = flow.init(jnp.zeros(4))
      >>> z, log_q = flow.sample_and_log_prob(jax.random.key(0), params, 3)
      >>> z.shape, log_q.shape
      ((3, 4), (3,))
    """
    num_layers, hidden_width, hidden_layers, activation, base, seed = _common(
        num_layers, hidden_width, hidden_layers, activation, base, seed
    )
    build = _family.layer_builder(
        "coupling", _family.transformer_for("affine", 0, 0.0), hidden_layers, activation
    )
    return _family.make_flow(
        "affine_coupling", build, num_layers=num_layers, hidden_width=hidden_width,
        min_dim=2, base=base, seed=seed,
    )


def spline_coupling(
    *,
    num_layers: int = 4,
    bins: int = 8,
    bound: float = 5.0,
    hidden_width: Optional[int] = None,
    hidden_layers: int = 2,
    activation: Callable = jax.nn.tanh,
    base: Optional[VariationalFamily] = None,
    seed: int = 0,
) -> VariationalFamily:
    """Returns a rational-quadratic spline coupling flow (Durkan et al. 2019).

    As :func:`affine_coupling`, but the transformed half passes through
    monotone rational-quadratic splines with ``bins`` bins on ``[-bound,
    bound]`` (the identity outside, with matching slopes), whose knots come
    from the conditioner. Splines bend a density in ways an affine layer
    cannot (multimodal marginals, skew, funnels) at the same cost order. The
    layers act on the base's standardized coordinates, so ``bound`` is in
    units of the base's scale. Needs ``d >= 2``.

    Args:
      num_layers: coupling layers (>= 1).
      bins: spline bins per coordinate (>= 2); ``3 bins - 1`` conditioner
        outputs per transformed coordinate.
      bound: the spline's half-interval (> 0).
      hidden_width: units per hidden layer; default ``2 d`` clipped to
        ``[32, 512]``.
      hidden_layers: hidden layers per conditioner (>= 1).
      activation: the hidden activation (default ``jax.nn.tanh``).
      base: ``vijax.full_rank(init_scale=1.0)`` (default), or another
        ``full_rank``/``mean_field``.
      seed: seeds the initial weights and the permutations.

    Returns:
      A :class:`vijax.VariationalFamily` named ``"spline_coupling"``.

    References:
      C. Durkan, A. Bekasov, I. Murray and G. Papamakarios, Neural spline
      flows, NeurIPS 2019.
    """
    num_layers, hidden_width, hidden_layers, activation, base, seed = _common(
        num_layers, hidden_width, hidden_layers, activation, base, seed
    )
    bins, bound = _spline_args(bins, bound)
    build = _family.layer_builder(
        "coupling", _family.transformer_for("spline", bins, bound), hidden_layers, activation
    )
    return _family.make_flow(
        "spline_coupling", build, num_layers=num_layers, hidden_width=hidden_width,
        min_dim=2, base=base, seed=seed,
    )


def autoregressive(
    *,
    num_layers: int = 4,
    transformer: str = "affine",
    bins: int = 8,
    bound: float = 5.0,
    hidden_width: Optional[int] = None,
    hidden_layers: int = 2,
    activation: Callable = jax.nn.tanh,
    base: Optional[VariationalFamily] = None,
    seed: int = 0,
) -> VariationalFamily:
    """Returns an inverse autoregressive flow (IAF; Kingma et al. 2016).

    Each layer maps ``y_j = f(x_j; c_j(x_<j))`` with ``f`` affine or a
    rational-quadratic spline and ``c`` a masked autoencoder (MADE; Germain et
    al. 2015): every coordinate may depend on all those before it (after the
    layer's permutation), richer than a coupling layer's split. Sampling, and
    ``sample_and_log_prob``, are one pass; ``log_prob`` at a given point
    inverts sequentially (``d`` network passes per layer), which the path
    estimators ``"stl"``/``"adaptive_stl"``/``"dreg"`` and ``"score"`` pay:
    prefer ``estimator="reparam"`` for large ``d``. Works for ``d = 1`` (each
    layer is then one elementwise map with learned constants: with
    ``transformer="spline"``, a flexible 1-d flow).

    Args:
      num_layers: autoregressive layers (>= 1).
      transformer: ``"affine"`` (the default) or ``"spline"``.
      bins, bound: the spline's bins and half-interval (spline only).
      hidden_width: units per hidden layer; default ``2 d`` clipped to
        ``[32, 512]`` (a MADE needs at least ``d - 1`` to let the last
        coordinate see all the others).
      hidden_layers: hidden layers per MADE (>= 1).
      activation: the hidden activation (default ``jax.nn.tanh``).
      base: ``vijax.full_rank(init_scale=1.0)`` (default), or another
        ``full_rank``/``mean_field``.
      seed: seeds the initial weights and the permutations.

    Returns:
      A :class:`vijax.VariationalFamily` named ``"autoregressive"``.

    References:
      D. P. Kingma et al., Improved variational inference with inverse
      autoregressive flow, NeurIPS 2016. M. Germain et al., MADE: masked
      autoencoder for distribution estimation, ICML 2015.
    """
    num_layers, hidden_width, hidden_layers, activation, base, seed = _common(
        num_layers, hidden_width, hidden_layers, activation, base, seed
    )
    if transformer not in ("affine", "spline"):
        raise ValueError(
            f"`transformer` must be 'affine' or 'spline'; got {transformer!r}."
        )
    bins, bound = _spline_args(bins, bound)
    build = _family.layer_builder(
        "autoregressive", _family.transformer_for(transformer, bins, bound),
        hidden_layers, activation,
    )
    return _family.make_flow(
        "autoregressive", build, num_layers=num_layers, hidden_width=hidden_width,
        min_dim=1, base=base, seed=seed,
    )
