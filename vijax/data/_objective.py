"""The ELBO of a data model on a minibatch: an unbiased estimate of the full-data ELBO.

For a batch ``b`` of ``B`` rows drawn with inclusion probability ``B / n``
(:mod:`vijax.data._batching`) and ``s = n / B``:

``ELBO_b = E_q[log_prior(z) + s sum_{i in b} (log_lik(z, x_i, z_i) - log q(z_i | x_i))] + H[q(z)]``

is unbiased for the full-data ELBO, and so is its gradient with every
estimator of :func:`vijax.elbo`. The pathwise estimators (``reparam``,
``stl``, ``adaptive_stl``, ``closed_entropy``) get it from :func:`vijax.elbo`
with one family over ``(z, z_b)`` whose log density is ``log q(z) + s sum_i
log q(z_i | x_i)`` and one log joint ``log_prior(z) + s sum_i log_lik(...)``:
the draws are reparameterized, so differentiating this integrand is unbiased,
and what STL leaves out, ``s grad log q(z_i | x_i)`` at fixed ``z_i``, has
expectation zero under the draws.

``score`` (``E[f grad log q_draw]``) must instead use the log density the
draws come from, ``log q_draw = log q(z) + sum_i log q(z_i | x_i)``,
unscaled: the scaled one weights the local scores by ``s`` and inflates the
encoder's gradient about ``s``-fold. So it is handed ``q_draw`` as its
family and the rest of the integrand, ``-(s - 1) sum_i log q(z_i | x_i)``
with the encoder's parameters stopped, inside its log joint. ``f = log p -
log q_draw`` is then the scaled integrand above, and the only gradient left
out is that of its ``log q`` terms at fixed draws, whose expectation under
the draws is zero (as :func:`vijax.elbo`'s ``score`` leaves out ``-grad log
q``): ``mean((f_s - b_s) grad log q_draw(z_s))``, unbiased.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks, _tree
from vijax._objectives import (
    ADAPTIVE_ESTIMATORS,
    DEFAULT_ESTIMATOR,
    ELBO_ESTIMATORS,
    check_estimator,
    elbo,
)
from vijax.data._batching import batch_indices, check_batch_size, check_batching
from vijax.families._amortized import AmortizedFamily, check_amortized
from vijax.families._protocol import VariationalFamily, check_family
from vijax.models._data import DataModel


class JointParams(NamedTuple):
    """What a fit on a :class:`vijax.models.DataModel` learns, as one pytree for optax.

    Attributes:
      q: the global family's parameters (``family.init(model.latent)``), or
        ``None`` when the model has no global latent.
      theta: the model parameters (start from ``model.theta``), or ``None``.
      encoder: the amortized family's encoder parameters ``phi``, or
        ``None`` without local latents.

    For a per-group optimizer, pass :func:`vijax.fit` a dict such as
    ``{"q": optax.adam(1e-2), "theta": optax.adam(1e-3), "encoder":
    optax.adam(1e-3)}`` (one entry per non-None field).
    """

    q: Any = None
    theta: Any = None
    encoder: Any = None


GROUPS = ("q", "theta", "encoder")


def as_joint(params: Any) -> JointParams:
    """``params`` as JointParams (plain family parameters are ``JointParams(q=params)``)."""
    return params if isinstance(params, JointParams) else JointParams(q=params)


def _local_log_prob(local: AmortizedFamily, batch: Any):
    """``(phi, z_b) -> sum_i log q(z_i | x_i)`` over the batch, for one draw ``z_b``."""
    def local_log_prob(phi, zl):
        lp = jax.vmap(local.encoder, in_axes=(None, 0))(phi, batch)
        return jnp.sum(jax.vmap(local.family.log_prob)(lp, zl))

    return local_log_prob


def _scaled_family(family: Optional[VariationalFamily], local: AmortizedFamily, batch: Any,
                   scale: Any) -> VariationalFamily:
    """The family over ``(z, z_b)`` with log density ``log q(z) + scale sum_i log q(z_i | x_i)``.

    Its parameters are ``(q_params, phi)``; ``z_b`` has the batch axis after
    the sample axis. With ``scale = 1`` it is the density of its draws.
    """
    enc, lf = local.encoder, local.family
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    local_log_prob = _local_log_prob(local, batch)

    def local_params(phi):
        return jax.vmap(enc, in_axes=(None, 0))(phi, batch)

    def sample(key, params, num_samples):
        kg, kl = jax.random.split(key)
        lp = local_params(params[1])
        zl = jax.vmap(lambda k, p: lf.sample(k, p, num_samples))(jax.random.split(kl, size), lp)
        zl = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), zl)
        zg = None if family is None else family.sample(kg, params[0], num_samples)
        return zg, zl

    def log_prob(params, z):
        zg, zl = z
        out = scale * local_log_prob(params[1], zl)
        if family is not None:
            out = out + family.log_prob(params[0], zg)
        return out

    local_h = lf.entropy or (lf.to_gaussian and (lambda p: lf.to_gaussian(p).entropy()))
    global_h = None if family is None else (
        family.entropy or (family.to_gaussian and (lambda p: family.to_gaussian(p).entropy())))

    def closed_entropy(params):
        out = scale * jnp.sum(jax.vmap(local_h)(local_params(params[1])))
        if family is not None:
            out = out + global_h(params[0])
        return out

    entropy = closed_entropy if local_h and (family is None or global_h) else None

    return VariationalFamily(
        init=lambda latent: None, sample=sample, log_prob=log_prob, entropy=entropy,
        name=f"{family.name if family is not None else 'none'} x {local.name}",
    )


def batch_elbo(key, params: JointParams, family, local_family, model: DataModel, batch,
               scale, *, num_samples: int, estimator: str) -> jax.Array:
    """The ELBO surrogate of one batch (rows ``batch``, weight ``scale``); arguments checked."""
    theta = params.theta
    scale = jnp.asarray(scale, _tree.float_dtype(params))
    if local_family is None:
        def log_joint(z):
            return model.batch_log_joint(z, theta, batch, None, scale)

        return elbo(key, params.q, family, log_joint, num_samples=num_samples,
                    estimator=estimator)

    def log_joint(z):
        zg, zl = z
        return model.batch_log_joint(zg, theta, batch, zl, scale)

    if estimator == "score":
        # The score term needs the density the draws come from (unscaled);
        # the rest of the scaled integrand moves into the log joint (module
        # docstring), with phi stopped: its own gradient has expectation 0.
        draws = _scaled_family(family, local_family, batch, 1.0)
        local_log_q = _local_log_prob(local_family, batch)
        phi = jax.lax.stop_gradient(params.encoder)

        def score_log_joint(z):
            return log_joint(z) - (scale - 1) * local_log_q(phi, z[1])

        return elbo(key, (params.q, params.encoder), draws, score_log_joint,
                    num_samples=num_samples, estimator=estimator)

    product = _scaled_family(family, local_family, batch, scale)
    return elbo(key, (params.q, params.encoder), product, log_joint,
                num_samples=num_samples, estimator=estimator)


def take(data: Any, idx: jax.Array) -> Any:
    """Rows ``idx`` of every leaf of ``data``."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data)


def check_setup(family, model, local_family, params, name="init_params"):
    """Checks that family, local family and params fit the model; returns them (params as given)."""
    if not isinstance(model, DataModel):
        raise TypeError(f"`model` must be a vijax.models.DataModel; got {type(model).__name__}.")
    if model.latent is None:
        if family is not None:
            raise ValueError(
                "The model has no global latent (`latent=None`), so `family` must be None; "
                f"got {getattr(family, 'name', None) or type(family).__name__}."
            )
    else:
        family = check_family(family)
    if model.local_latent is None:
        if local_family is not None:
            raise ValueError(
                "`local_family` is for local latents, and the model has none "
                "(`local_latent=None`); pass local_family=None."
            )
    else:
        if local_family is None:
            raise ValueError(
                "The model has local latents (`local_latent`), so `local_family` must be an "
                "amortized family (vijax.families.amortized(encoder, family)); got None."
            )
        local_family = check_amortized(local_family)
    joint = isinstance(params, JointParams)
    if not joint and (model.theta is not None or model.local_latent is not None):
        raise TypeError(
            f"`{name}` must be vijax.data.JointParams(q=..., theta=..., encoder=...) for a "
            "model with parameters or local latents (theta from `model.theta`); got "
            f"{type(params).__name__}."
        )
    p = as_joint(params)
    for field, want in (("q", model.latent is not None), ("theta", model.theta is not None),
                        ("encoder", model.local_latent is not None)):
        value = getattr(p, field)
        if want and value is None:
            raise ValueError(f"`{name}.{field}` must be set for this model; got None.")
        if not want and value is not None:
            raise ValueError(
                f"`{name}.{field}` must be None: the model has no "
                f"{ {'q': 'global latent', 'theta': 'parameters', 'encoder': 'local latents'}[field] }."
            )
    _check_floats(p, name if joint else None)
    if model.theta is not None:
        want = jax.tree_util.tree_structure(model.theta)
        got = jax.tree_util.tree_structure(p.theta)
        shapes = [jnp.shape(a) for a in jax.tree_util.tree_leaves(p.theta)]
        wshapes = [jnp.shape(a) for a in jax.tree_util.tree_leaves(model.theta)]
        if want != got or shapes != wshapes:
            raise ValueError(
                f"`{name}.theta` must match `model.theta` (structure {want}, shapes "
                f"{wshapes}); got {got}, shapes {shapes}."
            )
    if local_family is not None:
        _check_encoder(local_family, model, p.encoder, name)
    return family, local_family


def _check_floats(p: JointParams, name: Optional[str]) -> None:
    leaves = [(f"{name}.{field}" if name else "init_params", leaf)
              for field in GROUPS for leaf in jax.tree_util.tree_leaves(getattr(p, field))]
    if not leaves:
        raise ValueError("`init_params` must hold at least one array.")
    dtypes = set()
    for where, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`{where}` must hold floating-point arrays; got dtype {dtype}.")
        dtypes.add(dtype)
        if _checks.is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"`{where}` must be finite; got non-finite entries.")
    if len(dtypes) != 1:
        raise TypeError(
            f"`init_params` must be floating-point arrays of one dtype; got "
            f"{sorted(map(str, dtypes))}."
        )


def _check_encoder(local: AmortizedFamily, model: DataModel, phi: Any, name: str) -> None:
    """The encoder's output for one datum must be parameters of the local family."""
    row = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), model.data)
    try:
        out = jax.eval_shape(local.encoder, phi, row)
    except Exception as e:
        raise TypeError(
            f"`local_family.encoder(phi, x_i)` failed on `{name}.encoder` and one datum: {e}"
        ) from e
    want = jax.eval_shape(local.family.init, model.local_latent)
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(want) or [
        a.shape for a in jax.tree_util.tree_leaves(out)
    ] != [a.shape for a in jax.tree_util.tree_leaves(want)]:
        raise ValueError(
            "`local_family.encoder(phi, x_i)` must return the local family's parameters for "
            f"one datum, shaped like `family.init(model.local_latent)` = {want}; got {out}."
        )


def data_elbo(
    key: jax.Array,
    params: Any,
    family: Optional[VariationalFamily],
    model: DataModel,
    *,
    num_samples: int,
    estimator: str = DEFAULT_ESTIMATOR,
    batch_size: Optional[int] = None,
    batching: str = "epoch",
    local_family: Optional[AmortizedFamily] = None,
    step: Any = 0,
) -> jax.Array:
    """Returns an unbiased estimate of a data model's full-data ELBO, on a minibatch or all data.

    ``jax.grad`` with respect to ``params`` gives ``estimator``'s gradient
    (as in :func:`vijax.elbo`) for every part of ``params``: ``q``, the
    model's ``theta`` and the amortized encoder's ``phi``. With
    ``batch_size = B`` the batch is the one :func:`vijax.fit` draws at step
    ``step`` from ``key`` (``batching`` as in ``fit``), and the likelihood
    and local terms are scaled by ``n / B``; the estimate and its gradient
    stay unbiased (the randomness is then both the draws of ``q`` and the
    batch).

    Args:
      key: a PRNG key.
      params: the family's parameters, or :class:`JointParams` (required
        when the model has ``theta`` or local latents).
      family: the global latent's family, or ``None`` without one.
      model: a :class:`vijax.models.DataModel`.
      num_samples: draws of ``q`` (>= 1).
      estimator: an ELBO estimator of :func:`vijax.elbo`.
      batch_size: ``None`` for all data, else the minibatch size ``B``.
      batching: ``"epoch"`` or ``"with_replacement"``.
      local_family: the amortized family of the local latents, if any.
      step: the step whose batch to draw (an int or int32 array).

    Returns:
      A scalar estimate of the full-data ELBO (larger is better).
    """
    family, local_family = check_setup(family, model, local_family, params, "params")
    num_samples = _checks.check_positive_int("num_samples", num_samples)
    check_estimator(estimator, ELBO_ESTIMATORS + ADAPTIVE_ESTIMATORS)
    batch_size = check_batch_size(batch_size, model.num_data)
    batching = check_batching(batching, batch_size)
    key = _checks.typed_key("key", key)
    mc_key, batch_key = step_keys(key, step)
    batch, scale = select(batch_key, step, model, batch_size, batching)
    return batch_elbo(mc_key, as_joint(params), family, local_family, model, batch, scale,
                      num_samples=num_samples, estimator=estimator)


# The batch stream's key: fold_in of the base key with a step no fit reaches.
_BATCH_STREAM = 2**31 - 1


def step_keys(key: jax.Array, step: Any) -> tuple[jax.Array, jax.Array]:
    """``(fold_in(key, step), batch stream key)``: step ``step``'s draws of q, and the
    key every step's batch is derived from (one permutation per epoch)."""
    return jax.random.fold_in(key, step), jax.random.fold_in(key, _BATCH_STREAM)


def select(batch_key, step, model: DataModel, batch_size, batching, data=None):
    """``(batch, scale)`` for step ``step``: all data and 1, or a minibatch and n / B."""
    data = model.data if data is None else data
    if batch_size is None:
        return data, 1.0
    idx = batch_indices(batch_key, step, model.num_data, batch_size, batching)
    return take(data, idx), model.num_data / batch_size
