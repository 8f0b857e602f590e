"""The bijector protocol: ``forward``, ``inverse``, ``forward_log_det_jacobian``.

A :class:`Bijector` maps the real line (an unconstrained array) onto a
constrained support, one latent leaf at a time. Models on a constrained space
(:func:`vijax.models.constrained`) carry a pytree of bijectors, one per latent
leaf; families keep working on the unconstrained space.

Conventions:

* ``forward(x)`` takes an unconstrained leaf to the constrained space,
  ``inverse(y)`` back. Both act on one leaf, with no batch axis; use
  ``jax.vmap`` for a batch.
* ``forward_log_det_jacobian(x)`` is ``log |det d forward / dx|``, a scalar
  summed over the leaf's elements. Where the map changes the dimension (a
  simplex, a correlation factor), the determinant is taken on the free
  coordinates of the output (documented by each bijector).
* ``inverse`` checks the support of concrete input and raises a
  ``ValueError`` naming the bijector and the first offending value; inside a
  ``jit`` trace it cannot look, and out-of-support input gives NaN or an
  out-of-range result (never an error).

Saturation. In floating point ``forward`` rounds onto the boundary of its
support once ``x`` is far enough out: ``lower_bounded(-1.5)`` returns exactly
``-1.5`` for ``x`` below about -17 in float32 (``exp(x)`` is below half a
float step at 1.5), ``interval(-1, 3)`` returns a bound for ``|x|`` above
about 17, ``ordered`` repeats an entry (``x = -30 * ones``), and ``simplex``
and ``corr_cholesky`` return an entry (a diagonal entry) that underflows to
0 (``x = 30 * ones``). Every ``inverse`` therefore accepts the *closure* of
its support and reads a value on the boundary as the nearest float inside it
(one float step from the bound, and at least the smallest normal float, as
XLA flushes subnormal numbers to zero). The result is the finite,
large-magnitude ``x`` where ``forward`` starts to saturate, the same under
``jit`` as outside it, and ``forward(inverse(y))`` gives back ``y`` or the
float next to it inside. So ``inverse(forward(x))`` neither raises nor
returns an infinity where ``forward(x)`` is finite, and draws mapped by
``forward`` (a model's ``constrain``) can always be mapped back. A boundary
value given by hand (a scale of exactly 0) is read the same way by
``inverse``; ``Bijector.interior`` tells it from an inner one, and
:func:`vijax.models.constrained` refuses one as its example latent. Values
strictly outside the closure (a negative value for ``exp``, a decreasing
pair for ``ordered``) and non-finite values still raise the ``ValueError``
on concrete input. An overflow of ``forward`` to ``+-inf`` (``exp(x)`` for
``x`` above about 88 in float32) is not a point of the support, and
``inverse`` rejects it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks

ArrayTree = Any


class Bijector(NamedTuple):
    """A differentiable bijection from unconstrained arrays onto a support.

    A NamedTuple of pure functions (jit-, vmap- and grad-able), built by the
    factories in :mod:`vijax.bijectors`; a bijector of your own is
    ``Bijector(forward=..., inverse=..., forward_log_det_jacobian=...)``.

    Attributes:
      forward: ``forward(x) -> y``, unconstrained leaf to constrained leaf.
      inverse: ``inverse(y) -> x``.
      forward_log_det_jacobian: ``forward_log_det_jacobian(x) -> scalar``,
        ``log |det J|`` of ``forward`` at ``x``, summed over the leaf.
      name: optional; a label for messages and tables.
      interior: optional; ``interior(y) -> booleans`` on concrete values:
        whether ``y`` is strictly inside the support, not on its boundary
        (which ``inverse`` reads as the nearest float inside: see
        "Saturation"). :func:`vijax.models.constrained` uses it to refuse an
        example latent on the boundary (a scale of exactly 0), whose
        unconstrained value would be a start far out.
    """

    forward: Callable[[jax.Array], jax.Array]
    inverse: Callable[[jax.Array], jax.Array]
    forward_log_det_jacobian: Callable[[jax.Array], jax.Array]
    name: Optional[str] = None
    interior: Optional[Callable[[Any], Any]] = None


def checked_inverse(name: str, inverse: Callable, in_support: Callable, support: str) -> Callable:
    """``inverse`` that raises on concrete input outside the support's closure.

    The closure, not the support: a boundary value is where ``forward``
    saturates, and ``inverse`` reads it as the nearest float inside (see
    "Saturation" in the module docstring); ``in_support`` decides.

    ``in_support(y)`` runs on concrete values only (NumPy is fine, and fast)
    and returns booleans: one per element of ``y`` (the message names the
    first offending element) or of any other shape, e.g. one per vector (the
    message shows ``y``). ``support`` describes the support in words.
    """

    def checked(y):
        y = jnp.asarray(y)
        if _checks.is_concrete(y):
            ok = np.asarray(in_support(y))
            if not ok.all():
                bad = np.asarray(y)
                if ok.shape == bad.shape:
                    # A Python number, so the message shows `-1.0`, not an array repr.
                    got = repr(bad[~ok].ravel()[0].item())
                    where = f" among an array of shape {tuple(y.shape)}" if y.ndim else ""
                else:  # one flag per vector or row: show the values
                    got = np.array2string(bad, threshold=50)
                    where = f" (shape {tuple(y.shape)})"
                raise ValueError(
                    f"The {name!r} bijector's `inverse` needs a value in {support}; "
                    f"got {got}{where}."
                )
        return inverse(y)

    return checked


def step_inside(bound, toward) -> jax.Array:
    """The distance from ``bound`` to the nearest float on its ``toward`` side.

    At least the smallest normal float of ``bound``'s dtype: XLA flushes
    subnormal numbers to zero on CPU and GPU, so a subnormal distance would
    read as 0 again (and its ``log`` as ``-inf``). A constant for autodiff
    (``nextafter`` has no derivative, and the step is piecewise constant).
    """
    bound = jax.lax.stop_gradient(jnp.asarray(bound))
    step = jnp.abs(jnp.nextafter(bound, jnp.asarray(toward, bound.dtype)) - bound)
    return jnp.maximum(step, jnp.finfo(bound.dtype).tiny)


def off_zero(y: jax.Array) -> jax.Array:
    """``y >= 0`` with 0 read as the smallest normal float: :func:`off_boundary` at a bound of 0.

    The distance from 0 to the nearest float above it, as XLA reads it
    (subnormals flushed), is ``finfo(dtype).tiny``: :func:`step_inside` of 0.
    """
    return off_boundary(y, jnp.finfo(y.dtype).tiny)


def off_boundary(distance: jax.Array, step) -> jax.Array:
    """``distance`` from a bound of the support, a value on the bound read as ``step`` inside.

    The saturation rule of every ``inverse`` (see the module docstring):
    ``distance`` in ``[0, step)`` (0 is a value on the bound, where
    ``forward`` saturates; less than ``step`` can only be a flushed subnormal)
    becomes ``step``, from :func:`step_inside`. A negative distance (a value
    outside the support) and NaN are left as they are, so inside ``jit`` they
    still give NaN, as documented. The gradient there is 0 (a clip).
    """
    return jnp.where((distance >= 0) & (distance < step), step, distance)


def as_leaf(x: Any) -> jax.Array:
    """``x`` as a floating-point array, keeping a float input's dtype.

    Bijectors follow their input's dtype (float32 stays float32); integer
    and boolean input becomes the default float dtype, as ``jnp.exp`` would.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.asarray(0.0).dtype)
    return x


def vector_leaf(name: str, method: str, x) -> jax.Array:
    """``x`` as a leaf with at least one axis (the vector and matrix bijectors act on the last)."""
    x = as_leaf(x)
    if x.ndim < 1:
        raise ValueError(
            f"The {name!r} bijector's `{method}` acts on the last axis and needs an "
            f"array with at least 1 dimension; got shape {tuple(x.shape)}."
        )
    return x


def support_tolerance(dtype) -> float:
    """Slack for the equality constraints of a support (sums, norms) in ``dtype``.

    ``sqrt(eps)`` (about 3e-4 in float32, 1.5e-8 in float64): loose enough for
    values rounded in the user's own arithmetic, tight enough to catch a
    value that is not on the support at all.
    """
    return float(np.sqrt(np.finfo(dtype).eps))


# ---------------------------------------------------------------- trees
def _is_leaf(b: Any) -> bool:
    return isinstance(b, Bijector) or b is None


def check_tree(bijectors: ArrayTree, latent: ArrayTree, name: str = "bijectors") -> list:
    """Returns the bijectors as a list in the latent's leaf order, ``None`` for identity.

    Raises ``ValueError`` naming both structures when the bijector tree does
    not match the latent's, and ``TypeError`` for a leaf that is not a
    :class:`Bijector` (or ``None``, the identity).
    """
    leaves, treedef = jax.tree_util.tree_flatten(bijectors, is_leaf=_is_leaf)
    for path, b in jax.tree_util.tree_flatten_with_path(bijectors, is_leaf=_is_leaf)[0]:
        if not _is_leaf(b):
            raise TypeError(
                f"`{name}{jax.tree_util.keystr(path)}` must be a vijax.bijectors.Bijector "
                f"(e.g. vijax.bijectors.exp()) or None for the identity; got "
                f"{type(b).__name__}."
            )
    latent_def = jax.tree_util.tree_structure(latent)
    if treedef != latent_def:
        raise ValueError(
            f"`{name}` must have the latent's structure, one bijector (or None) per "
            f"latent leaf; the latent is {latent_def}, the bijectors are {treedef}."
        )
    return leaves


def forward_tree(bijectors: list, leaves: list) -> list:
    """Each leaf through its bijector (``None``: unchanged), in leaf order."""
    return [x if b is None else b.forward(x) for b, x in zip(bijectors, leaves)]


def log_det_tree(bijectors: list, leaves: list):
    """The sum of the bijectors' log-determinants at the (unconstrained) leaves."""
    terms = [b.forward_log_det_jacobian(x) for b, x in zip(bijectors, leaves) if b is not None]
    if not terms:
        return jnp.zeros((), leaves[0].dtype)
    return sum(terms[1:], terms[0])
