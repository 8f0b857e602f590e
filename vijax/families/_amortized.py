"""Amortized families: ``q(z_i | x_i)`` whose parameters come from ``encoder(phi, x_i)``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from vijax.families._protocol import VariationalFamily, check_family

ArrayTree = Any


class AmortizedFamily(NamedTuple):
    """``q(z_i | x_i) = family(encoder(phi, x_i))`` for the local latents of a data model.

    Attributes:
      encoder: ``encoder(phi, x_i) -> params``, a pure function from the
        encoder's parameters ``phi`` (any pytree of floats) and one datum
        (one row of every leaf of the model's data) to ``family``'s
        parameters for that datum's local latent.
      family: the :class:`vijax.VariationalFamily` of one local latent
        (:func:`vijax.mean_field`, :func:`vijax.full_rank`, a flow, ...).
      name: a label for messages.
    """

    encoder: Callable[[Any, Any], Any]
    family: VariationalFamily
    name: Optional[str] = None


def amortized(
    encoder: Callable[[Any, Any], Any],
    family: VariationalFamily,
    *,
    name: Optional[str] = None,
) -> AmortizedFamily:
    """Returns the amortized family ``q(z_i | x_i) = family(encoder(phi, x_i))``.

    Pass it to :func:`vijax.fit` as ``local_family=`` with a data model that
    has local latents (:func:`vijax.models.data_model` with
    ``local_latent=``); the encoder's parameters ``phi`` go in
    :attr:`vijax.data.JointParams.encoder` and are learned with the rest. A
    VAE is an amortized family (the encoder) plus a data model whose ``theta``
    is the decoder. For per-datum (non-amortized) local factors, make the
    datum's index part of the data and let the encoder look its parameters
    up in a table: ``encoder(phi, x_i) = phi[x_i["index"]]``.

    Args:
      encoder: ``encoder(phi, x_i) -> params`` of ``family`` for one local
        latent: ``family.init(local_latent)``'s structure and shapes.
      family: the family of one local latent.
      name: an optional label.

    Raises:
      TypeError: ``encoder`` is not callable or ``family`` is not a family.

    Example:
      >>> import jax.numpy as jnp, vijax
      >>> def encoder(phi, x):  # a linear encoder to a diagonal Gaussian
      ...     return vijax.MeanFieldParams(loc=phi["A"] @ x, raw_scale=phi["s"])
      >>> local = vijax.families.amortized(encoder, vijax.mean_field())
    """
    if not callable(encoder):
        raise TypeError(f"`encoder` must be callable; got {type(encoder).__name__}.")
    family = check_family(family)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be None or a str; got {name!r}.")
    return AmortizedFamily(encoder, family, name or f"amortized_{family.name or 'family'}")


def check_amortized(local_family: Any) -> AmortizedFamily:
    if not isinstance(local_family, AmortizedFamily):
        raise TypeError(
            "`local_family` must be an amortized family "
            "(vijax.families.amortized(encoder, family)); got "
            f"{type(local_family).__name__}."
        )
    return local_family
