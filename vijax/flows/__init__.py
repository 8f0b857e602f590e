"""Normalizing-flow variational families: beyond Gaussian ``q``.

Each factory returns a :class:`vijax.VariationalFamily` of the open protocol,
so every objective, estimator, :func:`vijax.fit`, :func:`vijax.compare_gradients`
and :func:`vijax.diagnose` take it as they take a Gaussian family.

=========================  ===================================================  ====================
factory                    layer                                                needs
=========================  ===================================================  ====================
``affine_coupling()``      RealNVP: affine map of half the coordinates          ``d >= 2``
``spline_coupling()``      rational-quadratic splines of half the coordinates   ``d >= 2``
``autoregressive()``       IAF: affine or spline map, each coordinate           ``d >= 1``
                           conditioned on those before it (MADE)
=========================  ===================================================  ====================

``q`` is the law of ``z = m + L T(eps)``: a base Gaussian
(``vijax.full_rank(init_scale=1.0)`` by default, or ``vijax.mean_field()``) after the flow's layers ``T``, which
start as the identity. ``family.from_gaussian(gaussian, latent)`` starts a
flow at a fitted Gaussian. Parameters are :class:`FlowParams`. See
:mod:`vijax.flows._family` for the construction and costs.

Example:
  >>> import jax, vijax
  >>> model = vijax.models.neals_funnel(dim=3)
  >>> flow = vijax.flows.spline_coupling()
  >>> result = vijax.fit(jax.random.key(0), flow, model.log_joint,
  ...                    flow.init(model.latent), num_steps=200, progress=False)
"""

from vijax.flows._factories import affine_coupling
from vijax.flows._factories import autoregressive
from vijax.flows._factories import spline_coupling
from vijax.flows._family import FlowParams

__all__ = ["FlowParams", "affine_coupling", "autoregressive", "spline_coupling"]
