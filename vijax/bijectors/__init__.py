"""Bijectors: differentiable maps from unconstrained arrays onto a support.

Each factory returns a :class:`Bijector`, a NamedTuple of pure functions
``forward(x)``, ``inverse(y)`` and ``forward_log_det_jacobian(x)`` (a scalar
summed over the leaf) plus a ``name``; see :mod:`vijax.bijectors._protocol`
for the conventions. They follow the input's dtype, work under ``jit``,
``vmap`` and ``grad``, and ``inverse`` raises ``ValueError`` on concrete input
outside the closure of the support (inside ``jit`` it cannot check). Far
out, ``forward`` rounds onto the boundary of its support (``interval`` for
``|x|`` above about 17 in float32); ``inverse`` reads a boundary value as the
nearest float inside, so ``inverse(forward(x))`` is finite wherever
``forward(x)`` is (see :mod:`vijax.bijectors._protocol`, "Saturation").

========================  =================================  ===============================================  =====================
factory                   ``forward(x)``                     support, shape                                   log det taken on
========================  =================================  ===============================================  =====================
``identity()``            ``x``                              reals, any shape                                 every entry
``exp()``                 ``exp(x)``                         ``(0, inf)``, any shape                          every entry
``softplus()``            ``log(1 + exp(x))``                ``(0, inf)``, any shape                          every entry
``lower_bounded(low)``    ``low + exp(x)``                   ``(low, inf)``, any shape                        every entry
``upper_bounded(high)``   ``high - exp(x)``                  ``(-inf, high)``, any shape                      every entry
``interval(low, high)``   ``low + (high - low) sigmoid(x)``  ``(low, high)``, any shape                       every entry
``affine(shift, scale)``  ``shift + scale * x``              reals, any shape                                 every entry
``ordered()``             ``x_0, x_0 + cumsum(exp(x[1:]))``  increasing, ``(K,) -> (K,)``                     every entry
``simplex()``             stick-breaking                     ``K``-simplex, ``(K-1,) -> (K,)``                first ``K-1`` entries
``corr_cholesky()``       tanh partial correlations (LKJ)    correlation Cholesky, ``(d(d-1)/2,) -> (d, d)``  strict lower triangle
``lower_cholesky()``      fill, ``exp`` on the diagonal      covariance Cholesky, ``(d(d+1)/2,) -> (d, d)``   lower triangle
========================  =================================  ===============================================  =====================

Triangles are in the row-major order of ``jnp.tril_indices``. Vector and
matrix bijectors act on the last axis (axes) and treat leading axes as
independent copies.

Example:
  >>> import jax.numpy as jnp
  >>> from vijax import bijectors
  >>> b = bijectors.simplex()
  >>> y = b.forward(jnp.zeros(2))   # the uniform simplex
  >>> print(jnp.round(y, 4))
  [0.3333 0.3333 0.3333]
  >>> print(b.inverse(y))
  [0. 0.]
"""

from vijax.bijectors._elementwise import affine
from vijax.bijectors._elementwise import exp
from vijax.bijectors._elementwise import identity
from vijax.bijectors._elementwise import interval
from vijax.bijectors._elementwise import lower_bounded
from vijax.bijectors._elementwise import softplus
from vijax.bijectors._elementwise import upper_bounded
from vijax.bijectors._matrix import corr_cholesky
from vijax.bijectors._matrix import lower_cholesky
from vijax.bijectors._protocol import Bijector
from vijax.bijectors._vector import ordered
from vijax.bijectors._vector import simplex

__all__ = [
    "Bijector",
    "affine",
    "corr_cholesky",
    "exp",
    "identity",
    "interval",
    "lower_bounded",
    "lower_cholesky",
    "ordered",
    "simplex",
    "softplus",
    "upper_bounded",
]
