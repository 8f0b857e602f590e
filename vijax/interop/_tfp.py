"""A TFP-on-JAX joint distribution as a :class:`vijax.models.Model` (TFP imported when called).

The adapter uses TFP's own pieces: ``experimental_pin`` for the data,
``experimental_default_event_space_bijector`` for the map from the
unconstrained space onto each part's support, and ``unnormalized_log_prob``
for the density.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.models._model import Model

_INSTALL = 'pip install "vijax[tfp]"'


def _import_tfp():
    """TFP's JAX substrate, or an ImportError that names the extra to install."""
    try:
        import tensorflow_probability.substrates.jax as tfp
    except (ImportError, AttributeError) as err:
        # AttributeError: releases of TFP older than the jax in use fail at import.
        raise ImportError(
            "`vijax.interop.from_tfp` needs TensorFlow Probability on JAX "
            f"(`tensorflow_probability.substrates.jax`), which could not be imported "
            f"({type(err).__name__}: {err}): {_INSTALL}."
        ) from err
    return tfp


def _allow_rank_promotion():
    """TFP broadcasts ranks implicitly inside its distributions and bijectors: let it,
    whatever the caller's ``jax_numpy_rank_promotion``."""
    return jax.numpy_rank_promotion("allow")


def _is_shape(x: Any) -> bool:
    return hasattr(x, "as_list")  # a TensorShape (iterable, so not a leaf by default)


def _part_names(tree: Any) -> list[str]:
    """Readable names for the leaves of a JD structure: ``mu`` (Named, Coroutine), ``[1]``."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path[-1] if path else None
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(jax.tree_util.keystr(path))
    return names


def from_tfp(joint_distribution: Any, **observed: Any) -> Model:
    """Returns a :class:`vijax.models.Model` for a TFP-on-JAX joint distribution.

    ``observed`` names parts of the joint distribution and their values (the
    data); they are pinned with ``joint_distribution.experimental_pin(**observed)``.
    The remaining parts are the latents. With ``bij`` the pinned
    distribution's ``experimental_default_event_space_bijector()``:

    * ``log_joint(z) = unnormalized_log_prob(bij.forward(z)) +
      bij.forward_log_det_jacobian(z)``, the log-Jacobian over each part's
      whole (unconstrained) event. Pure; works under ``jit``, ``vmap`` and
      ``grad``.
    * ``latent`` has the structure of the distribution's latent parts (a dict
      for ``JointDistributionNamed``, a list for ``JointDistributionSequential``,
      a ``StructTuple`` for ``JointDistributionCoroutine``) and holds
      **zeros** of each part's unconstrained event shape (a simplex of ``K``
      entries has ``K - 1``), in the part's own dtype: TFP fixes a
      distribution's dtype from its parameters (Python floats give float32
      even with ``jax_enable_x64``; build it from float64 arrays for float64).
    * ``model.constrain(z)`` is ``bij.forward(z)`` (for one latent or draws
      with leading batch axes).
    * ``name`` is the distribution's name.

    Each latent part must have a scalar batch shape, so that the log prob of
    one latent is a scalar: make per-element parts one event with
    ``tfd.Independent``/``tfd.Sample``, or use the ``AutoBatched`` variants.

    Args:
      joint_distribution: a ``tfp.distributions.JointDistribution`` (Named,
        Sequential, Coroutine or their AutoBatched variants) from
        ``tensorflow_probability.substrates.jax``, or an already pinned one.
      **observed: values of the observed parts, by part name.

    Returns:
      A :class:`vijax.models.Model` on the unconstrained space, with
      ``constrain``.

    Raises:
      ImportError: TFP on JAX is not installed (``pip install "vijax[tfp]"``).
      TypeError: ``joint_distribution`` is not a TFP joint distribution.
      ValueError: an ``observed`` name that is not a part, discrete (integer
        or boolean) latent parts, no latent parts, or a non-scalar log prob.

    Example:
      >>> import jax.numpy as jnp, vijax
      >>> from tensorflow_probability.substrates import jax as tfp
      >>> tfd = tfp.distributions
      >>> jd = tfd.JointDistributionNamed(dict(
      ...     scale=tfd.HalfNormal(1.0),
      ...     y=lambda scale: tfd.Sample(tfd.Normal(0.0, scale), 3)))
      >>> model = vijax.interop.from_tfp(jd, y=jnp.array([0.5, -1.0, 2.0]))
      >>> model.latent
      {'scale': Array(0., dtype=float32)}
      >>> model.constrain({"scale": jnp.zeros(4)})["scale"]  # softplus(0), 4 draws
      Array([0.6931472, 0.6931472, 0.6931472, 0.6931472], dtype=float32)
    """
    tfp = _import_tfp()
    pinned_type = tfp.experimental.distributions.JointDistributionPinned
    if not isinstance(joint_distribution, (tfp.distributions.JointDistribution, pinned_type)):
        hint = (
            " Wrap it in a joint distribution, e.g. "
            "`tfd.JointDistributionNamed(dict(x=dist))`."
            if isinstance(joint_distribution, tfp.distributions.Distribution) else ""
        )
        raise TypeError(
            "`joint_distribution` must be a TFP-on-JAX JointDistribution "
            "(tensorflow_probability.substrates.jax.distributions.JointDistribution*); "
            f"got {type(joint_distribution).__name__}.{hint}"
        )
    name = getattr(joint_distribution, "name", None) or type(joint_distribution).__name__
    with _allow_rank_promotion():
        # TFP's own error names the parts when an `observed` name is not one.
        jd = joint_distribution.experimental_pin(**observed) if observed else joint_distribution
        dtypes = jd.dtype
        names = _part_names(dtypes)
        if not names:
            raise ValueError(f"{name!r} has no latent parts (every part is observed).")
        discrete = {
            n: np.dtype(dt).name
            for n, dt in zip(names, jax.tree_util.tree_leaves(dtypes))
            if not np.issubdtype(dt, np.floating)
        }
        if discrete:
            raise ValueError(
                f"{name!r} has discrete latent part(s) "
                f"{', '.join(f'{n!r} ({dt})' for n, dt in discrete.items())}; vijax's "
                "variational families are continuous. Marginalize them out of the "
                "joint distribution first (sum over their values), or pin them as observed."
            )

    def prototype():
        # Building the bijector samples the distribution to resolve its parts;
        # traced (here and in `log_joint`) those draws cost nothing, eager they
        # compile op by op.
        with _allow_rank_promotion():
            bij = jd.experimental_default_event_space_bijector()
            shapes = bij.inverse_event_shape(jd.event_shape)
            return jax.tree_util.tree_map(
                lambda shape, dt: jnp.zeros(tuple(shape.as_list()), dt), shapes, dtypes,
                is_leaf=_is_shape,
            )

    latent = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(prototype)
    )
    # Latents carry no batch axes: each part's log-Jacobian sums its whole event.
    event_ndims = jax.tree_util.tree_map(jnp.ndim, latent)

    def log_joint(z):
        with _allow_rank_promotion():
            bij = jd.experimental_default_event_space_bijector()
            return jd.unnormalized_log_prob(bij.forward(z)) + bij.forward_log_det_jacobian(
                z, event_ndims=event_ndims
            )

    def constrain(z):
        with _allow_rank_promotion():
            return jd.experimental_default_event_space_bijector().forward(z)

    out = jax.eval_shape(log_joint, latent)
    if out.shape != ():
        raise ValueError(
            f"The log prob of one latent of {name!r} has shape {out.shape}, not (): its "
            f"parts have batch shapes {jd.batch_shape}. Make each part's batch one "
            "event (`tfd.Independent` or `tfd.Sample`) or use the AutoBatched joint "
            "distribution."
        )
    return Model(log_joint=log_joint, latent=latent, name=name, constrain=constrain)
