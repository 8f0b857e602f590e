"""Arrays built on the host and fresh buffers: helpers that compile nothing.

Eager ``jnp`` ops (and ``jnp.asarray`` of a NumPy array) compile one small
XLA program each, about 0.1 s in all when a fresh process builds a model and
its initial parameters; NumPy and ``jax.device_put`` compile nothing. Used by
the families' ``init``, the conjugate models' builders and
:func:`vijax.iterate_average`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks


def constant(value, shape, dtype) -> jax.Array:
    """``value`` (a float or NumPy array) broadcast to ``shape``, built on the host.

    The NumPy array is private, so the asynchronous transfer cannot see it
    change.
    """
    host = np.broadcast_to(np.asarray(value, np.float64), shape).astype(dtype)
    return jax.device_put(host)


def fresh_copy(tree: Any) -> Any:
    """A copy of every leaf of ``tree`` that shares no buffer with the original.

    So that a jitted step may donate one of the two (donating a buffer that
    another live array or another leaf of the same argument holds deletes it
    or fails). Concrete leaves are copied with ``device_put`` (no compile);
    traced ones (under ``vmap`` or ``jit``) get a copy op, which ``jit``
    elides where it is not needed.
    """
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, may_alias=False) if _checks.is_concrete(a) else jnp.copy(a),
        tree,
    )
