"""ArviZ export: q's draws as an ``arviz.InferenceData`` (optional extra ``arviz``)."""

from __future__ import annotations

from typing import Any, Optional

import jax

from vijax.diagnostics._draws import as_numpy, constrained_draws


def _import_arviz():
    try:
        import arviz
    except ImportError as e:
        raise ImportError(
            "vijax.to_arviz needs ArviZ, an optional extra: `pip install \"vijax[arviz]\"` "
            "(or `pip install arviz`)."
        ) from e
    return arviz


def to_arviz(
    key: jax.Array,
    params: Any,
    family,
    model,
    *,
    num_samples: int = 1000,
    batched: Optional[bool] = None,
):
    """Returns q's draws on the natural space as an ``arviz.InferenceData``.

    The ``posterior`` group holds one variable per leaf of
    ``model.constrain``'s output (a dict latent's keys, deterministic
    quantities included; ``"z"`` for a lone array latent), with dimensions
    ``(chain, draw, ...)``: one chain for :func:`vijax.fit` parameters, one
    chain per member for :func:`vijax.fit_batched` parameters (so
    ``arviz.rhat`` across members tells whether independent fits agree).
    q's draws are independent, so within a chain ESS is the number of draws.

    Args:
      key: a PRNG key for the draws.
      params: the fitted parameters, or the :class:`vijax.FitResult` /
        :class:`vijax.FitState` holding them.
      family: the :class:`vijax.VariationalFamily` they belong to.
      model: the :class:`vijax.models.Model` fitted.
      num_samples: draws per chain.
      batched: whether ``params`` carry a leading member axis; ``None`` (the
        default) tells from the shapes.

    Returns:
      ``arviz.InferenceData`` with a ``posterior`` group.

    Raises:
      ImportError: ArviZ is not installed (the message names the extra).

    Example:
      >>> idata = vijax.to_arviz(key, result, family, model)  # doctest: +SKIP
      >>> arviz.summary(idata)  # doctest: +SKIP
    """
    arviz = _import_arviz()
    draws = as_numpy(constrained_draws(key, params, family, model, num_samples, batched))
    return arviz.from_dict(
        posterior=draws,
        attrs={"inference_library": "vijax", "family": family.name or "custom",
               "model": getattr(model, "name", "model")},
    )
