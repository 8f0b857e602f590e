"""Exact KL(q || p(z | x)) and exact ELBO, with no sampling.

For the Gaussian-conjugate models both are closed forms of the family's
Gaussian and the model's quadratic log joint, so they are deterministic,
differentiable with ``jax.grad`` and satisfy
``exact_elbo + exact_kl == model.log_evidence`` for every parameter value (and
so ``grad exact_elbo == -grad exact_kl``). ``exact_elbo`` also takes any model
with an ``expected_log_joint`` (logistic regression, by one-dimensional
quadrature; the Poisson GLM, in closed form), where no posterior exists for
``exact_kl``.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.flatten_util import ravel_pytree

from vijax.families._protocol import VariationalFamily, check_family, require
from vijax._gaussian import Gaussian, gaussian_kl
from vijax.models._model import Model


def _family_gaussian(
    params: Any, family: VariationalFamily, model: Model, what: str, needed_by: str,
    *, needs_posterior: bool = True,
) -> Gaussian:
    check_family(family)
    if not isinstance(model, Model):
        raise TypeError(f"`model` must be a vijax.models.Model; got {type(model).__name__}.")
    if needs_posterior and not model.is_conjugate:
        raise ValueError(
            f"`model` ({model.name}) has no closed form for {what}: it needs an "
            "exact posterior, log evidence and expected log joint (the Gaussian-"
            "conjugate models in vijax.models have them)."
        )
    if model.expected_log_joint is None:
        raise ValueError(
            f"`model` ({model.name}) has no exact form for {what}: it needs "
            "`model.expected_log_joint` (the Gaussian-conjugate models, "
            "vijax.models.logistic_regression and poisson_glm have it); got None."
        )
    to_gaussian = require(family, "to_gaussian", needed_by)
    q = to_gaussian(params)
    # Families whose params carry the latent as `loc` (the Gaussian ones) are
    # checked against its structure; any other Gaussian view by dimension.
    loc = getattr(params, "loc", model.latent)
    loc_def = jax.tree_util.tree_structure(loc)
    latent_def = jax.tree_util.tree_structure(model.latent)
    d_model = ravel_pytree(model.latent)[0].shape[0]
    if loc_def != latent_def or q.dim != d_model:
        raise ValueError(
            f"`params` do not match `model.latent`: expected structure {latent_def} "
            f"of dimension {d_model}; got {loc_def} of dimension {q.dim}. Build params "
            "with family.init(model.latent)."
        )
    return q


def exact_kl(params: Any, family: VariationalFamily, model: Model) -> jax.Array:
    """Returns KL(q_params || p(z | x)) in closed form.

    Args:
      params: the family's parameters (from ``family.init(model.latent)``).
      family: a :class:`vijax.VariationalFamily`.
      model: a Gaussian-conjugate :class:`vijax.models.Model`.

    Returns:
      A scalar >= 0 (up to rounding). Differentiable in ``params`` (and in the
      model's data, when the model is built inside the differentiated function).

    Raises:
      ValueError: the model has no exact posterior, or ``params`` do not match
        its latent.
    """
    q = _family_gaussian(params, family, model, "KL(q || p(z | x))", "exact_kl")
    return gaussian_kl(q, model.posterior)


def exact_elbo(params: Any, family: VariationalFamily, model: Model) -> jax.Array:
    """Returns the ELBO ``E_q[log p(x, z)] + H[q]`` with no sampling.

    ``E_q[log p(x, z)]`` is ``model.expected_log_joint``. For the conjugate
    models it is a closed form of the quadratic log joint, not of the
    posterior, so ``exact_elbo + exact_kl == log_evidence`` checks two
    independent computations; for logistic regression it is one-dimensional
    quadrature over each logit, exact to near machine precision.

    Args:
      params: the family's parameters.
      family: a :class:`vijax.VariationalFamily` with a Gaussian view
        (``to_gaussian``).
      model: a :class:`vijax.models.Model` with an ``expected_log_joint``.

    Returns:
      A scalar <= ``log p(x)`` (a bound: larger is better).

    Raises:
      ValueError: the model has no ``expected_log_joint``, or ``params`` do
        not match it.
    """
    q = _family_gaussian(params, family, model, "the ELBO", "exact_elbo",
                         needs_posterior=False)
    return model.expected_log_joint(q) + q.entropy()
