"""Normalizing-flow families: a base Gaussian and a stack of invertible layers.

``q`` is the law of ``z = m + L T(eps)``, ``eps ~ N(0, I_d)``, where ``T =
T_K o ... o T_1`` is the stack of flow layers and ``(m, L)`` the base
Gaussian family's mean and scale (:func:`vijax.mean_field` or
:func:`vijax.full_rank`; by default ``full_rank(init_scale=1.0)``). The
layers act on standardized coordinates (so a spline's interval is in units of
the base's scale), and their networks start with zero output layers: a new
flow *is* its base Gaussian, and a flow built with ``from_gaussian`` starts
exactly at a fitted Gaussian.

The default base starts wide (sd 1, not the Gaussian families' 0.1): a
spline only bends ``[-bound, bound]``, and from a narrow start it spreads its
draws to the interval's edges faster than the base scale grows, then stays
there (on a banana, KL 0.50 from sd 0.1 against 0.02 from sd 1).

By the change of variables, ``log q(z) = log N(eps; 0, I) - sum_k log |det
J_k| - log |det L|``. Sampling computes it on the way (one pass through the
layers): :func:`vijax.elbo` with ``estimator="reparam"``,
:func:`vijax.iwae_bound`, :func:`vijax.renyi_bound` and
:func:`vijax.diagnose` use the family's ``sample_and_log_prob`` capability.
``log_prob`` at a given ``z`` runs the layers backward: one pass for the
coupling flows, ``d`` network passes for :func:`autoregressive` (its inverse
is sequential), which the path estimators (``"stl"``, ``"adaptive_stl"``,
``"dreg"``) and ``"score"`` pay.

Layers are stacked (a leading axis of size ``num_layers`` on every network
parameter) and run with ``lax.scan``, so compile time does not grow with the
number of layers. Each layer conjugates its map by a fixed permutation of the
coordinates (``P^T T_k(P x)``; reversed on a 2-d latent, random from ``seed``
otherwise) so every coordinate is transformed and conditioned on.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from vijax import _checks
from vijax._gaussian import CholeskyScale, DiagonalScale
from vijax.families._gaussian import full_rank
from vijax.families._protocol import VariationalFamily, check_family
from vijax.flows import _nets, _transformers

ArrayTree = Any

_LOG_2PI = math.log(2.0 * math.pi)


class FlowParams(NamedTuple):
    """Parameters of a flow family.

    Attributes:
      base: the base Gaussian family's parameters (e.g.
        :class:`vijax.FullRankParams`; ``base.loc`` keeps the latent's shape).
        Put a fitted Gaussian here to start the flow from it:
        ``flow.init(latent)._replace(base=gaussian_result.params)`` (same base
        family), or use ``flow.from_gaussian``.
      layers: the layers' network weights, a dict of arrays with a leading
        axis of size ``num_layers``.
    """

    base: Any
    layers: dict


# ---------------------------------------------------------------- arguments
def _check_base(base: Any) -> VariationalFamily:
    base = check_family(base)
    if base.to_gaussian is None or base.from_gaussian is None:
        raise TypeError(
            "`base` must be a Gaussian family with a Gaussian view (vijax.mean_field() "
            f"or vijax.full_rank()); got {base.name or 'a family'} without "
            "`to_gaussian`/`from_gaussian`."
        )
    return base


def _check_activation(activation: Any) -> Callable:
    if not callable(activation):
        raise TypeError(
            f"`activation` must be a callable such as jax.nn.tanh; got "
            f"{type(activation).__name__}."
        )
    return activation


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"`seed` must be a non-negative int; got {seed!r}.")
    return int(seed)


def default_width(d: int) -> int:
    """The default hidden width: ``2 d``, clipped to ``[32, 512]``."""
    return int(min(max(32, 2 * d), 512))


# ---------------------------------------------------------------- the base affine map
def _affine_parts(gaussian, name: str):
    """``(apply, solve, log|det L|)`` for the base's square scale."""
    scale = gaussian.scale
    if isinstance(scale, DiagonalScale):
        s = scale.scale
        return (lambda u: u * s), (lambda r: r / s), jnp.sum(jnp.log(jnp.abs(s)))
    if isinstance(scale, CholeskyScale):
        tril = scale.tril

        def solve(r):
            return jax.scipy.linalg.solve_triangular(tril, r, lower=True)

        return (lambda u: tril @ u), solve, jnp.sum(jnp.log(jnp.abs(jnp.diagonal(tril))))
    raise TypeError(
        f"vijax.flows.{name}: the base family's Gaussian has a "
        f"{type(scale).__name__}; a flow needs a square, invertible scale "
        "(base=vijax.mean_field() or vijax.full_rank())."
    )


# ---------------------------------------------------------------- permutations
@functools.lru_cache(maxsize=64)
def _permutations(d: int, num_layers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer permutations ``(perm, inverse)``, each ``(num_layers, d)`` int32."""
    if d == 1:
        perms = np.zeros((num_layers, 1), np.int64)
    elif d == 2:
        perms = np.array([[0, 1] if k % 2 == 0 else [1, 0] for k in range(num_layers)])
    else:
        rng = np.random.default_rng([seed, 1])
        perms = np.stack([rng.permutation(d) for _ in range(num_layers)])
    inverse = np.argsort(perms, axis=1)
    return perms.astype(np.int32), inverse.astype(np.int32)


# ---------------------------------------------------------------- layers
class _Layer(NamedTuple):
    """One flow layer on the flat vector: ``forward(net_params, x) -> (y, log_det)``."""

    network: Callable  # d, width -> _nets.Network
    forward: Callable
    inverse: Callable


def _coupling_layer(transformer, depth, activation) -> Callable:
    def build(d, width):
        a = d // 2
        b = d - a
        p = transformer.num_params
        net = _nets.mlp(a, b * p, width, depth, activation)

        def forward(w, x):
            raw = net.apply(w, x[:a]).reshape(b, p)
            yb, ld = transformer.forward(x[a:], raw)
            return jnp.concatenate([x[:a], yb]), ld

        def inverse(w, y):
            raw = net.apply(w, y[:a]).reshape(b, p)
            xb, ld = transformer.inverse(y[a:], raw)
            return jnp.concatenate([y[:a], xb]), ld

        return _Layer(net, forward, inverse)

    return build


def _autoregressive_layer(transformer, depth, activation) -> Callable:
    def build(d, width):
        p = transformer.num_params
        net = _nets.made(d, p, width, depth, activation)

        def forward(w, x):  # one pass: every output row sees the inputs before it
            return transformer.forward(x, net.apply(w, x).reshape(d, p))

        def inverse(w, y):
            # Coordinate j of x needs x_<j: after k passes the first k are
            # exact, so d - 1 passes and a last one that returns the log-det.
            def one_pass(_, x):
                return transformer.inverse(y, net.apply(w, x).reshape(d, p))[0]

            x = jax.lax.fori_loop(0, d - 1, one_pass, jnp.zeros_like(y))
            return transformer.inverse(y, net.apply(w, x).reshape(d, p))

        return _Layer(net, forward, inverse)

    return build


# ---------------------------------------------------------------- the family
def make_flow(
    name: str,
    build_layer: Callable,
    *,
    num_layers: int,
    hidden_width: Optional[int],
    min_dim: int,
    base: Optional[VariationalFamily],
    seed: int,
) -> VariationalFamily:
    """Builds the :class:`VariationalFamily` of a stack of ``build_layer`` layers.

    ``build_layer(d, width) -> _Layer``. Arguments are assumed checked.
    """
    base = full_rank(init_scale=1.0) if base is None else base

    @functools.lru_cache(maxsize=16)
    def sizes(d: int) -> tuple[int, Any, dict]:
        """The width, the layer and its networks' parameter shapes for dimension d."""
        width = default_width(d) if hidden_width is None else hidden_width
        layer = build_layer(d, width)
        shapes = {k: v.shape for k, v in layer.network.init(np.random.default_rng(0), np.float32).items()}
        return width, layer, shapes

    def check_dim(d: int) -> None:
        if d < min_dim:
            raise ValueError(
                f"vijax.flows.{name}() needs a latent of dimension >= {min_dim} (a "
                f"coupling layer splits the coordinates in two); got d = {d}. For a "
                "1-d latent use vijax.flows.autoregressive(transformer='spline'), "
                "an elementwise spline flow there, or a Gaussian family."
            )

    def fresh_layers(latent, dtype) -> dict:
        flat, _ = ravel_pytree(_checks.check_latent("latent", latent))
        d = flat.shape[0]
        check_dim(d)
        width, layer, _ = sizes(d)
        rng = np.random.default_rng([seed, 0])
        nets = [layer.network.init(rng, np.dtype(dtype)) for _ in range(num_layers)]
        return {k: jnp.asarray(np.stack([n[k] for n in nets])) for k in nets[0]}

    def gaussian_parts(base_params):
        return _affine_parts(base.to_gaussian(base_params), name)

    def init(latent):
        base_params = base.init(latent)
        loc = jax.tree_util.tree_leaves(base_params.loc)
        params = FlowParams(base=base_params, layers=fresh_layers(latent, loc[0].dtype))
        jax.eval_shape(lambda b: gaussian_parts(b)[2], base_params)  # square scale, or an error
        return params

    def from_gaussian(gaussian, latent):
        base_params = base.from_gaussian(gaussian, latent)
        loc = jax.tree_util.tree_leaves(base_params.loc)
        return FlowParams(base=base_params, layers=fresh_layers(latent, loc[0].dtype))

    def unpack(params):
        if not isinstance(params, FlowParams):
            raise TypeError(
                f"`params` must be vijax.flows.FlowParams (from vijax.flows.{name}()"
                f".init); got {type(params).__name__}."
            )
        g = base.to_gaussian(params.base)
        d = g.dim
        check_dim(d)
        width, layer, shapes = sizes(d)
        for key, shape in shapes.items():
            got = params.layers.get(key) if isinstance(params.layers, dict) else None
            want = (num_layers,) + tuple(shape)
            if got is None or tuple(jnp.shape(got)) != want:
                raise ValueError(
                    f"`params.layers[{key!r}]` must have shape {want} for a latent of "
                    f"dimension d = {d} (the base's) with {num_layers} layers of "
                    f"width {width}; got "
                    f"{None if got is None else tuple(jnp.shape(got))}. Build params "
                    f"with vijax.flows.{name}(...).init(latent)."
                )
        perms, inverse = _permutations(d, num_layers, seed)
        return g, layer, jnp.asarray(perms), jnp.asarray(inverse)

    def push(layer, layers, perms, inverse, eps):
        """``T(eps)`` and ``sum log |det J|`` for one flat draw."""

        def body(x, xs):
            w, perm, inv = xs
            y, ld = layer.forward(w, x[perm])
            return y[inv], ld

        u, lds = jax.lax.scan(body, eps, (layers, perms, inverse))
        return u, jnp.sum(lds)

    def pull(layer, layers, perms, inverse, u):
        """``T^{-1}(u)`` and ``log |det J_{T^{-1}}|`` for one flat point."""

        def body(y, xs):
            w, perm, inv = xs
            x, ld = layer.inverse(w, y[perm])
            return x[inv], ld

        eps, lds = jax.lax.scan(body, u, (layers, perms, inverse), reverse=True)
        return eps, jnp.sum(lds)

    def sample_and_log_prob(key, params, num_samples):
        num_samples = _checks.check_positive_int("num_samples", num_samples)
        g, layer, perms, inverse = unpack(params)
        apply, _, log_det_l = _affine_parts(g, name)  # the view unpack built
        dtype = g.mean.dtype
        eps = jax.random.normal(key, (num_samples, g.dim), dtype=dtype)
        u, ld = jax.vmap(lambda e: push(layer, params.layers, perms, inverse, e))(eps)
        z = g.mean[None, :] + jax.vmap(apply)(u)
        log_base = -0.5 * (jnp.sum(jnp.square(eps), axis=-1) + g.dim * _LOG_2PI)
        _, unravel = ravel_pytree(params.base.loc)
        return jax.vmap(unravel)(z), (log_base - ld - log_det_l).astype(dtype)

    def sample(key, params, num_samples):
        return sample_and_log_prob(key, params, num_samples)[0]

    def log_prob(params, z):
        g, layer, perms, inverse = unpack(params)
        loc_def = jax.tree_util.tree_structure(params.base.loc)
        z_def = jax.tree_util.tree_structure(z)
        if z_def != loc_def:
            raise ValueError(f"`z` must have the latent's structure {loc_def}; got {z_def}.")
        flat, _ = ravel_pytree(z)
        if flat.shape != g.mean.shape:
            raise ValueError(
                f"`z` must flatten to shape {g.mean.shape} (one latent, no sample "
                f"axis); got {flat.shape}. vmap over samples."
            )
        _, solve, log_det_l = _affine_parts(g, name)
        eps, ld = pull(layer, params.layers, perms, inverse, solve(flat - g.mean))
        log_base = -0.5 * (jnp.sum(jnp.square(eps)) + g.dim * _LOG_2PI)
        return log_base + ld - log_det_l

    return VariationalFamily(
        init=init,
        sample=sample,
        log_prob=log_prob,
        name=name,
        from_gaussian=from_gaussian,
        sample_and_log_prob=sample_and_log_prob,
    )


def transformer_for(name: str, bins: int, bound: float) -> _transformers.Transformer:
    if name == "affine":
        return _transformers.affine()
    return _transformers.rational_quadratic(bins, bound)


def layer_builder(kind: str, transformer, hidden_layers: int, activation) -> Callable:
    if kind == "coupling":
        return _coupling_layer(transformer, hidden_layers, activation)
    return _autoregressive_layer(transformer, hidden_layers, activation)
