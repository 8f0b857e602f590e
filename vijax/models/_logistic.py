"""Non-conjugate models: no closed-form posterior, evidence or expected log joint."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vijax import _checks
from vijax._gaussian import Gaussian
from vijax.models import _labels
from vijax.models._glm import expected_softplus
from vijax.models._glm import predictor_moments
from vijax.models._model import Model, _Lazy

_LOG_2PI = math.log(2.0 * math.pi)


def logistic_regression(X, y, *, prior_scale=1.0) -> Model:
    """Returns Bayesian logistic regression, a non-conjugate model.

    ``w ~ N(0, prior_scale^2 I)``, ``y_i | w ~ Bernoulli(sigmoid(x_i^T w))``.
    The latent is a (d,) array; ``log_joint`` costs O(n d). The model has no
    closed-form posterior (``posterior`` and ``log_evidence`` are ``None``).
    Its ``expected_log_joint(q)`` for a Gaussian ``q`` is a sum of
    one-dimensional integrals over the logits ``x_i^T w``, computed by
    quadrature to near machine precision
    (:func:`vijax.models._glm.expected_softplus`) in O(n d) for a diagonal
    ``q``: :func:`vijax.exact_elbo` and :func:`vijax.fit_exact` use it.

    Args:
      X: (n, d) design matrix, floating point.
      y: (n,) labels in {0, 1}: integer or bool (cast to ``X``'s dtype), or
        floating point of ``X``'s dtype.
      prior_scale: the prior standard deviation of each weight (> 0).

    Returns:
      A :class:`Model`.

    Raises:
      TypeError: ``X`` is not floating point, ``y`` is not a real number
        array (complex, strings), or a floating ``y``'s dtype is not ``X``'s.
      ValueError: shapes disagree, a label is not 0 or 1, or ``prior_scale``
        is not positive.
    """
    x = _checks.as_data("X", X)
    y = _labels.as_labels("y", y, kind=_labels.BINARY, dtype=x.dtype)
    _checks.check_same_dtype({"X": x, "y": y})
    _checks.check_ndim("X", x, 2)
    _checks.check_shape("y", y, (x.shape[0],))
    tau = _checks.as_float_array("prior_scale", prior_scale)
    if tau.ndim != 0:
        raise ValueError(f"`prior_scale` must be a scalar; got shape {tuple(tau.shape)}.")
    _checks.check_positive("prior_scale", tau)
    tau = tau.astype(x.dtype)  # a float64 scale must not promote float32 data
    d = x.shape[1]
    t2 = jnp.square(tau)

    def log_joint(w):
        w = jnp.asarray(w)
        logits = x @ w
        lik = jnp.sum(y * logits - jax.nn.softplus(logits))
        pri = -0.5 * (d * (_LOG_2PI + jnp.log(t2)) + jnp.sum(jnp.square(w)) / t2)
        return lik + pri

    x_sq = _Lazy(jnp.square, x)  # only expected_log_joint uses it

    def expected_log_joint(q: Gaussian):
        m, s = predictor_moments(q, x, x_sq())
        lik = jnp.sum(y * m - expected_softplus(m, s))
        pri = -0.5 * (
            d * (_LOG_2PI + jnp.log(t2))
            + (jnp.sum(jnp.square(q.mean)) + jnp.sum(q.variance)) / t2
        )
        return lik + pri

    return Model(
        log_joint=log_joint,
        latent=jnp.zeros((d,), x.dtype),
        expected_log_joint=expected_log_joint,
        name="logistic_regression",
    )
