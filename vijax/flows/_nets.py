"""Small pure-JAX networks: the conditioners of flow layers.

A network's parameters are a dict of arrays; ``apply(params, x)`` maps one
input vector to one output vector (``vmap`` for a batch). Initialization is
on the host from a NumPy generator (the family's ``seed``): hidden layers
Glorot-uniform, biases zero, and the *output layer zero*, so that a new
network outputs zeros and its flow layer is the identity.

* :func:`mlp`: a multilayer perceptron (the coupling layers' conditioner).
* :func:`made`: a masked autoencoder (Germain et al. 2015): output block
  ``j`` depends only on inputs ``< j``, the autoregressive layers'
  conditioner. Masks are constants of the trace; the weights they zero get
  zero gradients and never matter.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np


class Network(NamedTuple):
    """A conditioner: host-side ``init(rng, dtype) -> params`` and ``apply(params, x)``."""

    init: Callable
    apply: Callable


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, (fan_in, fan_out))


def _init_dense(rng, sizes) -> dict:
    """Weights for ``sizes = (in, hidden, ..., hidden, out)``; the last layer zero."""
    n_in, width, n_out = sizes[0], sizes[1], sizes[-1]
    depth = len(sizes) - 2
    params = {
        "w_in": _glorot(rng, n_in, width),
        "b_in": np.zeros(width),
        "w_out": np.zeros((width, n_out)),
        "b_out": np.zeros(n_out),
    }
    if depth > 1:
        params["w_hidden"] = np.stack([_glorot(rng, width, width) for _ in range(depth - 1)])
        params["b_hidden"] = np.zeros((depth - 1, width))
    return params


def _apply_dense(params, x, activation, masks=None):
    m_in, m_hidden, m_out = masks if masks is not None else (1.0, 1.0, 1.0)
    h = activation(x @ (params["w_in"] * m_in) + params["b_in"])
    if "w_hidden" in params:
        for i in range(params["w_hidden"].shape[0]):
            h = activation(h @ (params["w_hidden"][i] * m_hidden) + params["b_hidden"][i])
    return h @ (params["w_out"] * m_out) + params["b_out"]


def mlp(n_in: int, n_out: int, width: int, depth: int, activation: Callable) -> Network:
    """A perceptron ``n_in -> width (x depth) -> n_out``."""
    sizes = (n_in,) + (width,) * depth + (n_out,)

    def init(rng, dtype):
        return {k: v.astype(dtype) for k, v in _init_dense(rng, sizes).items()}

    def apply(params, x):
        return _apply_dense(params, x, activation)

    return Network(init, apply)


def made_masks(dim: int, width: int, depth: int, per_output: int):
    """The masks of a MADE: ``(input, hidden, output)`` as 0/1 NumPy arrays.

    Input ``i`` has degree ``i + 1``; hidden units cycle through degrees
    ``1 .. max(dim - 1, 1)``; output block ``j`` (``per_output`` units for
    coordinate ``j``) has degree ``j + 1`` and sees hidden units of strictly
    lower degree, so it depends on inputs ``< j`` only (coordinate 0 on none:
    its outputs are the biases).
    """
    deg_in = np.arange(1, dim + 1)
    deg_h = np.arange(width) % max(dim - 1, 1) + 1
    deg_out = np.repeat(np.arange(1, dim + 1), per_output)
    m_in = (deg_h[None, :] >= deg_in[:, None]).astype(np.float64)
    m_hidden = (deg_h[None, :] >= deg_h[:, None]).astype(np.float64)
    m_out = (deg_out[None, :] > deg_h[:, None]).astype(np.float64)
    return m_in, m_hidden, m_out


def made(dim: int, per_output: int, width: int, depth: int, activation: Callable) -> Network:
    """A masked autoencoder ``dim -> width (x depth) -> dim * per_output``.

    The output, reshaped to ``(dim, per_output)``, has row ``j`` a function
    of inputs ``0 .. j-1`` only.
    """
    sizes = (dim,) + (width,) * depth + (dim * per_output,)
    masks_host = made_masks(dim, width, depth, per_output)

    def init(rng, dtype):
        return {k: v.astype(dtype) for k, v in _init_dense(rng, sizes).items()}

    def apply(params, x):
        masks = tuple(jnp.asarray(m, x.dtype) for m in masks_host)
        return _apply_dense(params, x, activation, masks)

    return Network(init, apply)
