"""Cheap whole-pytree reductions used on hot paths (every fit step, every averaged update)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of ``tree`` is finite, as one cheap reduction.

    A NaN or inf entry makes the sum non-finite. (A sum that overflows also
    reads as non-finite; that needs entries near the dtype's maximum, which
    no usable parameters hold.) On CPU a plain sum is several times cheaper
    than ``all(isfinite(.))``, and this runs every step.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.isfinite(functools.reduce(jnp.add, [jnp.sum(leaf) for leaf in leaves]))


def norm(tree: Any) -> jax.Array:
    """The global L2 norm; ``vdot`` per leaf is cheaper on CPU than a sum of squares."""
    leaves = jax.tree_util.tree_leaves(tree)
    sq = functools.reduce(jnp.add, [jnp.vdot(leaf, leaf) for leaf in leaves])
    return jnp.sqrt(sq)


def where(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """``jnp.where(pred, a, b)`` leaf by leaf over two pytrees of one structure."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def float_dtype(tree: Any):
    """The common dtype of the leaves of ``tree``."""
    return jnp.result_type(*jax.tree_util.tree_leaves(tree))
