"""Models on a constrained space: a log density on the natural space plus one bijector per leaf."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks
from vijax.bijectors import _protocol as _bij
from vijax.models._model import Model

ArrayTree = Any


def constrained(
    log_density: Callable[[ArrayTree], jax.Array],
    bijectors: ArrayTree,
    latent: ArrayTree,
    *,
    deterministic: Optional[Callable[[ArrayTree], dict]] = None,
    name: str = "constrained_model",
) -> Model:
    """Returns a :class:`Model` on the unconstrained space of a constrained log density.

    ``log_density(values)`` is the log joint ``log p(x, values)`` written on
    the natural space (a scale positive, a probability vector on the simplex,
    ...), as a function of one latent pytree; ``bijectors`` holds one
    :class:`vijax.bijectors.Bijector` per latent leaf (``None`` for a leaf that
    is already unconstrained). The model's

    * ``log_joint(z) = log_density(forward(z)) + sum of forward_log_det_jacobian(z)``
      is the density of the unconstrained ``z`` (change of variables), so
      every family, objective and fit works on it unchanged;
    * ``latent`` is ``inverse(latent)``: the unconstrained example (its shapes
      may differ from the natural ones, e.g. a K-simplex has K - 1 free
      coordinates);
    * ``model.constrain(z)`` maps one unconstrained latent or a batch of draws
      (leading axes) to the natural space, plus ``deterministic(values)``
      merged in when given.

    Use ``jax.scipy.stats`` (or the distribution library you already have) for
    the densities.

    Args:
      log_density: ``log_density(values) -> scalar``, pure and differentiable.
      bijectors: a pytree of bijectors (or ``None``) with the latent's structure.
      latent: an example latent on the natural space (valid values: a scale
        of 1.0, not 0.0), e.g. ``{"mu": 0.0, "tau": 1.0, "theta": jnp.zeros(8)}``.
      deterministic: optional; ``deterministic(values) -> dict`` of derived
        quantities (e.g. ``theta = mu + tau * eta``), added to what
        ``constrain`` returns. Needs a dict latent.
      name: a short name for tables.

    Returns:
      A :class:`Model` (not conjugate: no posterior or evidence).

    Raises:
      TypeError: ``log_density`` or ``deterministic`` is not callable, a
        bijector leaf is not a Bijector or None, or latent leaves are not
        floating point.
      ValueError: the bijector tree does not match the latent, or a latent
        value lies outside its bijector's support or on its boundary (the
        example is the fit's starting mean; see :class:`vijax.bijectors.Bijector`'s
        ``interior``).

    Example:
      Eight schools, non-centred, with a half-Cauchy scale:

      >>> import jax.numpy as jnp, jax.scipy.stats as st, vijax
      >>> y = jnp.array([28., 8., -3., 7., -1., 1., 18., 12.])
      >>> sigma = jnp.array([15., 10., 16., 11., 9., 11., 10., 18.])
      >>> def log_density(v):
      ...     theta = v["mu"] + v["tau"] * v["eta"]
      ...     return (st.norm.logpdf(v["mu"], 0., 5.) + st.cauchy.logpdf(v["tau"], 0., 5.)
      ...             + st.norm.logpdf(v["eta"]).sum() + st.norm.logpdf(y, theta, sigma).sum())
      >>> model = vijax.models.constrained(
      ...     log_density,
      ...     {"mu": None, "tau": vijax.bijectors.exp(), "eta": None},
      ...     {"mu": 0.0, "tau": 1.0, "eta": jnp.zeros(8)},
      ...     deterministic=lambda v: {"theta": v["mu"] + v["tau"] * v["eta"]})
    """
    if not callable(log_density):
        raise TypeError(f"`log_density` must be a callable; got {type(log_density).__name__}.")
    if deterministic is not None and not callable(deterministic):
        raise TypeError(
            f"`deterministic` must be None or a callable; got {type(deterministic).__name__}."
        )
    natural = _checks.check_latent("latent", latent)
    if deterministic is not None and not isinstance(natural, dict):
        raise TypeError(
            "`deterministic` needs a dict latent (its quantities are merged into it); "
            f"got a {type(natural).__name__} latent."
        )
    blist = _bij.check_tree(bijectors, natural)
    leaves, treedef = jax.tree_util.tree_flatten(natural)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(natural)[0]]
    free = []
    for b, y, path in zip(blist, leaves, paths):
        if b is None:
            free.append(y)
            continue
        try:
            x = b.inverse(y)
        except ValueError as e:
            raise ValueError(f"`latent{path}` lies outside its bijector's support: {e}") from e
        interior = getattr(b, "interior", None)
        if interior is not None and _checks.is_concrete(y) and not np.all(interior(y)):
            # inverse reads a boundary value as the nearest float inside: a start
            # far out in the unconstrained space (a scale of 0 -> log 0 ~ -87).
            raise ValueError(
                f"`latent{path}` lies on the boundary of its bijector's support "
                f"({b.name or 'bijector'}): the example latent is the fit's starting "
                "mean, so give a value inside it (a scale of 1.0, not 0.0)."
            )
        free.append(jnp.asarray(x, y.dtype))
    unconstrained = jax.tree_util.tree_unflatten(treedef, free)

    def forward(z):
        zl = jax.tree_util.tree_leaves(z)
        return treedef.unflatten(_bij.forward_tree(blist, zl)), zl

    def log_joint(z):
        values, zl = forward(z)
        return log_density(values) + _bij.log_det_tree(blist, zl)

    def constrain(z):
        values, _ = forward(z)
        if deterministic is None:
            return values
        extra = deterministic(values)
        if not isinstance(extra, dict):
            raise TypeError(f"`deterministic` must return a dict; got {type(extra).__name__}.")
        return {**values, **extra}

    return Model(log_joint=log_joint, latent=unconstrained, name=name, constrain=constrain)
