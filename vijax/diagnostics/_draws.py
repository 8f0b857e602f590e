"""Draws from a fitted q on the model's natural space, with a chain axis.

Shared by :func:`vijax.summary` and :func:`vijax.to_arviz`: ``q``'s draws go
through ``model.constrain`` (bijectors and deterministic quantities), and
parameters from :func:`vijax.fit_batched` (a leading member axis on every
leaf) give one chain per member.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks
from vijax._cache import LRU
from vijax.families import _protocol as _family
from vijax.data._objective import JointParams
from vijax.fitting._types import FitResult, FitState
from vijax.models._data import DataModel
from vijax.models._model import Model

ArrayTree = Any


def _unwrap(params: Any) -> Any:
    if isinstance(params, (FitResult, FitState)):
        return params.params
    return params


def as_model(model: Any, params: Any, name: str = "model") -> tuple[Any, Any]:
    """``(params, model)``, with a :class:`vijax.models.DataModel` seen as a ``Model``.

    A data model with a global latent and no local latents has a full-data
    log joint over that latent, ``model.log_joint`` (one pass over all the
    data per draw; minibatches would make the weights noisy); its ``theta`` is
    ``params.theta`` for :class:`vijax.data.JointParams` (what a fit learning
    theta returns) and ``model.theta`` otherwise. A ``FitResult`` or
    ``FitState`` gives its params; anything else passes through unchanged.
    """
    params = _unwrap(params)
    if not isinstance(model, DataModel):
        return params, model
    if model.latent is None or model.local_latent is not None:
        raise ValueError(
            f"`{name}` is a vijax.models.DataModel with local latents (one per datum); "
            "only one without them (a global `latent` alone) has a q over a fixed latent "
            "to read. Got latent="
            f"{'None' if model.latent is None else 'given'}, local_latent="
            f"{'None' if model.local_latent is None else 'given'}."
        )
    theta = model.theta
    if isinstance(params, JointParams):
        params, theta = params.q, model.theta if params.theta is None else params.theta
    log_joint = model.log_joint
    if theta is not model.theta:
        log_joint = _with_theta(model.log_joint, theta)
    return params, Model(log_joint=log_joint, latent=model.latent, name=model.name)


_thetas = LRU(8)


def _with_theta(log_joint, theta):
    """``partial(log_joint, theta=theta)``, the same object for the same ``theta`` object.

    The diagnostics' compiled programs are cached per log joint: a new partial
    per call (``diagnose(key, result, ...)`` twice on one result) compiled
    again each time. Keyed on ``theta``'s identity; the entry holds ``theta``,
    so its id cannot be another object's while the entry lives.
    """
    return _thetas.get((log_joint, id(theta)),
                       lambda: (theta, functools.partial(log_joint, theta=theta)))[1]


def is_batched(params: Any, family, model) -> bool:
    """Whether ``params`` carry one leading member axis over ``family.init(model.latent)``."""
    single = jax.eval_shape(family.init, model.latent)
    s_leaves, s_def = jax.tree_util.tree_flatten(single)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    if s_def != p_def:
        raise ValueError(
            f"`params` do not match {_family.describe(family)} on the model's latent: "
            f"expected the structure of family.init(model.latent), {s_def}; got {p_def}."
        )
    shapes = [(tuple(s.shape), tuple(np.shape(p))) for s, p in zip(s_leaves, p_leaves)]
    if all(s == p for s, p in shapes):
        return False
    if all(len(p) == len(s) + 1 and p[1:] == s for s, p in shapes) and len(
        {p[0] for _, p in shapes}
    ) == 1:
        return True
    raise ValueError(
        "`params` must have the shapes of family.init(model.latent), or those with one "
        f"leading member axis (from vijax.fit_batched); got leaf shapes "
        f"{[p for _, p in shapes]} for {[s for s, _ in shapes]}."
    )


def constrained_draws(
    key: jax.Array, params: Any, family, model, num_samples: int,
    batched: Optional[bool] = None,
) -> dict:
    """``{name: array (chains, num_samples, *shape)}`` of q's draws on the natural space.

    ``name`` is the leaf's path in the constrained pytree (a dict key for dict
    latents, ``"z"`` for a single-array latent).
    """
    key = _checks.typed_key("key", key)
    params, model = as_model(model, params)  # before the family: see diagnose
    family = _family.check_family(family)
    if not isinstance(model, Model):
        raise TypeError(
            "`model` must be a vijax.models.Model or DataModel (for a bare log joint: "
            f"vijax.models.Model(log_joint=..., latent=...)); got {type(model).__name__}."
        )
    num_samples = _checks.check_positive_int("num_samples", num_samples)
    if batched is None:
        batched = is_batched(params, family, model)
    elif not isinstance(batched, bool):
        raise TypeError(f"`batched` must be None, True or False; got {batched!r}.")

    def one(k, p):
        return model.constrain(family.sample(k, p, num_samples))

    if batched:
        members = jax.tree_util.tree_leaves(params)[0].shape[0]
        draws = jax.jit(jax.vmap(one))(jax.random.split(key, members), params)
    else:
        draws = jax.tree_util.tree_map(lambda x: x[None], jax.jit(one)(key, params))
    return named_leaves(draws)


def named_leaves(tree: ArrayTree) -> dict:
    """``{readable path: leaf}``: ``"tau"``, ``"a.b"``, ``"z"`` for a lone array."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return {"z": leaves[0][1]}
    out = {}
    for path, leaf in leaves:
        out[".".join(_key_name(k) for k in path)] = leaf
    return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def as_numpy(draws: dict) -> dict:
    return {name: np.asarray(jnp.asarray(v)) for name, v in draws.items()}
