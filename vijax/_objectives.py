"""Monte Carlo objectives whose ``jax.grad`` is a chosen gradient estimator.

Each objective returns an unbiased (or, for multi-sample bounds, the usual)
Monte Carlo estimate of a bound, built as a *surrogate*: ``stop_gradient``
places the derivative where the estimator wants it while the returned value
stays the estimate itself. So ``value, grad = jax.value_and_grad(elbo, 1)(...)``
gives the ELBO estimate and the estimator's gradient in one pass.

All samples are drawn at once (``family.sample``) and ``log_joint`` is
evaluated once, batched with ``vmap``. Two calls with the same key draw the
same base noise, whatever the estimator, so differences between estimators
computed with one key are not sampling noise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vijax import _checks
from vijax._families import VariationalFamily

ArrayTree = Any

ELBO_ESTIMATORS = ("reparam", "closed_entropy", "stl", "score")


def _check_common(family, log_joint, num_samples) -> int:
    if not isinstance(family, VariationalFamily):
        raise TypeError(
            "`family` must be a vijax.VariationalFamily (e.g. vijax.mean_field()); "
            f"got {type(family).__name__}."
        )
    if not callable(log_joint):
        raise TypeError(f"`log_joint` must be callable; got {type(log_joint).__name__}.")
    return _checks.check_positive_int("num_samples", num_samples)


def _check_estimator(estimator: str, valid: tuple[str, ...]) -> str:
    if estimator not in valid:
        raise ValueError(
            f"`estimator` must be one of {', '.join(repr(v) for v in valid)}; "
            f"got {estimator!r}."
        )
    return estimator


def batched_log_joint(log_joint: Callable, z: ArrayTree, num_samples: int) -> jax.Array:
    """``vmap(log_joint)(z)`` with a check that each call returns a scalar."""
    out = jax.vmap(log_joint)(z)
    if out.shape != (num_samples,):
        raise ValueError(
            "`log_joint` must return a scalar for one latent; got output shape "
            f"{tuple(out.shape[1:])} per sample."
        )
    return out


def batched_log_prob(family: VariationalFamily, params, z: ArrayTree) -> jax.Array:
    return jax.vmap(functools.partial(family.log_prob, params))(z)


def elbo(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    num_samples: int,
    estimator: str = "reparam",
) -> jax.Array:
    """Returns an unbiased Monte Carlo ELBO estimate whose gradient is ``estimator``.

    ``ELBO = E_q[log p(x, z) - log q(z)]`` estimated from ``num_samples``
    draws of ``q``; ``jax.grad`` with respect to ``params`` gives:

    * ``"reparam"``: the pathwise gradient of ``mean(log p(z_s) - log q(z_s))``
      with a Monte Carlo entropy (ADVI; Kucukelbir et al. 2017).
    * ``"closed_entropy"``: the pathwise gradient of ``mean(log p(z_s))`` plus
      the gradient of the family's closed-form entropy.
    * ``"stl"``: sticking the landing (Roeder, Wu and Duvenaud 2017): the
      pathwise gradient with the parameters stopped inside ``log q``; its
      variance vanishes when ``q`` equals the posterior.
    * ``"score"``: the score-function (REINFORCE) gradient
      ``mean((f_s - b_s) grad log q(z_s))`` with ``f = log p - log q`` and a
      leave-one-out baseline ``b_s`` (mean of the other samples' ``f``) when
      ``num_samples >= 2``. It never differentiates ``log_joint``, so it works
      for non-differentiable log joints.

    Every estimator is unbiased for the exact ELBO gradient, ``-grad KL(q ||
    p(z | x))``, and the returned value is unbiased for the ELBO.

    Args:
      key: a PRNG key (typed ``jax.random.key`` or legacy uint32).
      params: the family's parameters.
      family: a :class:`vijax.VariationalFamily`.
      log_joint: ``log_joint(z) -> scalar``, the unnormalised log p(x, z) of
        one latent pytree.
      num_samples: the number of draws S (>= 1).
      estimator: one of ``"reparam"``, ``"closed_entropy"``, ``"stl"``,
        ``"score"``.

    Returns:
      A scalar ELBO estimate (a bound: larger is better).

    Raises:
      ValueError: unknown ``estimator`` or ``num_samples < 1``, or
        ``log_joint`` does not return a scalar.

    Example:
      >>> import jax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.mean_field()
      >>> params = family.init(model.latent)
      >>> grads = jax.grad(vijax.elbo, argnums=1)(
      ...     jax.random.key(0), params, family, model.log_joint,
      ...     num_samples=8, estimator="stl")
    """
    num_samples = _check_common(family, log_joint, num_samples)
    _check_estimator(estimator, ELBO_ESTIMATORS)

    if estimator == "score":
        z = jax.lax.stop_gradient(family.sample(key, params, num_samples))
        log_p = jax.lax.stop_gradient(batched_log_joint(log_joint, z, num_samples))
        log_q = batched_log_prob(family, params, z)
        f = log_p - jax.lax.stop_gradient(log_q)
        if num_samples >= 2:
            baseline = (jnp.sum(f) - f) / (num_samples - 1)
        else:
            baseline = jnp.zeros_like(f)
        score_term = jnp.mean((f - baseline) * (log_q - jax.lax.stop_gradient(log_q)))
        return jnp.mean(f) + score_term

    z = family.sample(key, params, num_samples)
    log_p = batched_log_joint(log_joint, z, num_samples)
    if estimator == "closed_entropy":
        return jnp.mean(log_p) + family.entropy(params)
    q_params = jax.lax.stop_gradient(params) if estimator == "stl" else params
    return jnp.mean(log_p - batched_log_prob(family, q_params, z))
