"""Adapters from other probabilistic programming libraries to :class:`vijax.models.Model`.

Each adapter imports its peer library only when called, and says which extra
to install when it is missing:

=============================  ==========================================
function                       peer (extra)
=============================  ==========================================
:func:`from_numpyro`           NumPyro (``pip install "vijax[numpyro]"``)
:func:`from_tfp`               TFP on JAX (``pip install "vijax[tfp]"``)
:func:`to_arviz`               ArviZ (``pip install "vijax[arviz]"``); also ``vijax.to_arviz``
=============================  ==========================================

A Blackjax-style ``logdensity_fn(z)`` (the unnormalised log density of one
pytree of unconstrained parameters) needs no adapter: it already is a
``log_joint``. Pass it with an example latent to
``vijax.models.Model(log_joint=logdensity_fn, latent=z0)``.
"""

from vijax.interop._arviz import to_arviz
from vijax.interop._numpyro import from_numpyro
from vijax.interop._tfp import from_tfp

__all__ = [
    "from_numpyro",
    "from_tfp",
    "to_arviz",
]
