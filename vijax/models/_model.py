"""The :class:`Model` record every vijax model returns."""

from __future__ import annotations

from typing import Any, Callable, Optional

import math

import jax
import jax.numpy as jnp

from vijax._gaussian import Gaussian

ArrayTree = Any

_PENDING = object()  # a posterior or log evidence that `Model._exact` computes on first access


def _batch_shape(z: ArrayTree, latent: ArrayTree) -> tuple:
    """The leading axes of ``z`` in front of the latent's leaf shapes (checked)."""
    z_leaves, z_def = jax.tree_util.tree_flatten(z)
    l_leaves, l_def = jax.tree_util.tree_flatten(latent)
    if z_def != l_def:
        raise ValueError(
            f"`z` must have the model's latent structure {l_def}; got {z_def}."
        )
    batch = None
    for path, zl, ll in zip(
        (p for p, _ in jax.tree_util.tree_flatten_with_path(latent)[0]), z_leaves, l_leaves
    ):
        zs, ls = tuple(jnp.shape(zl)), tuple(jnp.shape(ll))
        lead = len(zs) - len(ls)
        if lead < 0 or zs[lead:] != ls or (batch is not None and zs[:lead] != batch):
            raise ValueError(
                f"`z{jax.tree_util.keystr(path)}` must have shape (*batch, *{ls}) with "
                f"the same batch axes on every leaf"
                + (f" ({batch})" if batch is not None else "")
                + f"; got shape {zs}."
            )
        batch = zs[:lead]
    return batch


def _has_tracer(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


class _Lazy:
    """``fn(*args)``, computed on the first call and cached when concrete.

    With concrete ``args`` but a first call inside a trace, the call is redone
    under ``jax.ensure_compile_time_eval``, so a model built eagerly but first
    queried inside a ``jit`` trace gets, and keeps, concrete arrays. A result
    holding tracers (the model was built from traced arguments) is returned
    but never cached, so it cannot leak out of its trace. An argument may
    itself be a ``_Lazy``: ``fn`` gets its value. Not thread-safe: two threads
    may both compute the value; either result is correct.
    """

    __slots__ = ("_fn", "_args", "_value")

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._fn, self._args, self._value = fn, args, _PENDING

    @property
    def done(self) -> bool:
        return self._value is not _PENDING

    def __call__(self) -> Any:
        if self.done:
            return self._value
        args = [a() if isinstance(a, _Lazy) else a for a in self._args]
        value = self._fn(*args)
        if _has_tracer(value) and not _has_tracer(args):
            # Concrete inputs, traced result: the first access is inside a
            # trace (a jit, say). Evaluate at trace time instead, so that the
            # value kept is concrete; this compiles op by op (slower), so it is
            # only the fallback.
            with jax.ensure_compile_time_eval():
                value = self._fn(*args)
        if not _has_tracer(value):
            self._value = value
            self._fn = self._args = None  # the inputs are no longer needed
        return value


def _describe(value: Any) -> str:
    """A short repr: functions by name, arrays by dtype and shape."""
    if value is _PENDING:
        return "<computed on first access>"
    if callable(value):
        return f"<function {getattr(value, '__qualname__', type(value).__name__)}>"
    return repr(jax.tree_util.tree_map(
        lambda x: _Text(f"{x.dtype}{list(x.shape)}") if hasattr(x, "dtype") else x, value))


class _Text(str):
    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


class Model:
    """A probabilistic model as pure functions and, when conjugate, its exact answers.

    Close over a model (or build it inside the function you transform) rather
    than passing it as a ``jit`` argument: it holds functions. A model is
    immutable; ``model._replace(name=...)`` returns a changed copy, as for a
    ``NamedTuple``.

    The library's conjugate models compute ``posterior`` and ``log_evidence``
    on first access (of either) and cache both, so building a model and
    fitting with ``log_joint`` alone never pays for the closed form. Accessed
    inside a ``jit`` trace, a model built from concrete arrays still computes
    and caches concrete values; a model built from traced arguments (to
    differentiate the evidence in a scale, say) recomputes on each access and
    caches nothing. The cache is not thread-safe: concurrent first accesses
    may compute twice, harmlessly.

    Attributes:
      log_joint: ``log_joint(z) -> scalar``, the unnormalised ``log p(x, z)``
        as a pure, differentiable, vmappable function of one latent pytree.
      latent: an example latent pytree (pass it to a family's ``init``).
      posterior: the exact posterior ``p(z | x)`` as a :class:`vijax.Gaussian`
        over the flat latent (``ravel_pytree(latent)`` order), or ``None``.
      log_evidence: the exact ``log p(x)``, or ``None``.
      expected_log_joint: ``expected_log_joint(q) -> scalar``,
        ``E_q[log p(x, z)]`` for a :class:`vijax.Gaussian` ``q`` with no
        sampling, or ``None``. The conjugate models compute it in closed
        form from the log joint's quadratic form, not from the posterior, so
        ``exact_elbo + exact_kl == log_evidence`` is a real check;
        :func:`vijax.models.logistic_regression` by one-dimensional
        quadrature over each linear predictor, to near machine precision;
        :func:`vijax.models.poisson_glm` in closed form.
      name: a short name for tables.
      constrain: ``model.constrain(z)`` maps latent draws (one latent, or
        any number of leading batch axes) to the model's natural space: the
        identity for an unconstrained model; for a constrained model
        (:func:`vijax.models.constrained`, the zoo, the NumPyro and TFP
        adapters) each leaf through its bijector, plus any derived
        (deterministic) quantities the model defines. Built from a function
        of one latent given as ``constrain=`` (``None``: the identity).
    """

    __slots__ = (
        "log_joint", "latent", "_posterior", "_log_evidence", "expected_log_joint", "name",
        "_exact", "_constrain",
    )

    def __init__(
        self,
        log_joint: Callable[[ArrayTree], jax.Array],
        latent: ArrayTree,
        posterior: Optional[Gaussian] = None,
        log_evidence: Optional[jax.Array] = None,
        expected_log_joint: Optional[Callable[[Gaussian], jax.Array]] = None,
        name: str = "model",
        constrain: Optional[Callable[[ArrayTree], ArrayTree]] = None,
    ):
        if constrain is not None and not callable(constrain):
            raise TypeError(f"`constrain` must be None or a callable; got {type(constrain).__name__}.")
        for slot, value in (
            ("log_joint", log_joint), ("latent", latent), ("_posterior", posterior),
            ("_log_evidence", log_evidence), ("expected_log_joint", expected_log_joint),
            ("name", name), ("_exact", None), ("_constrain", constrain),
        ):
            object.__setattr__(self, slot, value)

    @classmethod
    def _deferred(cls, exact: _Lazy, **fields: Any) -> "Model":
        """A model whose ``exact()`` gives ``(posterior, log_evidence)`` on first access."""
        model = cls(posterior=_PENDING, log_evidence=_PENDING, **fields)
        object.__setattr__(model, "_exact", exact)
        return model

    @property
    def posterior(self) -> Optional[Gaussian]:
        """The exact posterior, or ``None`` (see the class docstring)."""
        return self._exact()[0] if self._posterior is _PENDING else self._posterior

    @property
    def log_evidence(self) -> Optional[jax.Array]:
        """The exact log evidence, or ``None`` (see the class docstring)."""
        return self._exact()[1] if self._log_evidence is _PENDING else self._log_evidence

    @property
    def is_conjugate(self) -> bool:
        """Whether the exact posterior, evidence and expected log joint exist."""
        return (
            self._posterior is not None
            and self._log_evidence is not None
            and self.expected_log_joint is not None
        )

    def _fields(self) -> dict[str, Any]:
        # As stored: a pending posterior or log evidence stays pending.
        return {
            "log_joint": self.log_joint, "latent": self.latent,
            "posterior": self._posterior, "log_evidence": self._log_evidence,
            "expected_log_joint": self.expected_log_joint, "name": self.name,
            "constrain": self._constrain,
        }

    @property
    def is_constrained(self) -> bool:
        """Whether ``constrain`` is more than the identity."""
        return self._constrain is not None

    def constrain(self, z: ArrayTree) -> ArrayTree:
        """``z`` (one latent, or draws with leading batch axes) on the natural space.

        Every leaf of ``z`` must have the latent leaf's shape after the same
        number of leading axes; the result has those axes in front of every
        leaf. The identity (``z`` itself) when the model has no ``constrain``.
        """
        if self._constrain is None:
            return z
        batch = _batch_shape(z, self.latent)
        if not batch:
            return self._constrain(z)
        size = math.prod(batch)
        flat = jax.tree_util.tree_map(lambda x: x.reshape((size,) + x.shape[len(batch):]), z)
        out = jax.vmap(self._constrain)(flat)
        return jax.tree_util.tree_map(lambda x: x.reshape(batch + x.shape[1:]), out)

    def _replace(self, **changes: Any) -> "Model":
        """Returns a copy with ``changes`` (field names as in ``__init__``) applied."""
        model = Model(**{**self._fields(), **changes})
        object.__setattr__(model, "_exact", self._exact)  # shares the cache
        return model

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Model is immutable; use `model._replace({name}=...)`.")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Model is immutable.")

    def __copy__(self) -> "Model":
        return self  # immutable: a copy may be the model itself

    def __deepcopy__(self, memo: dict) -> "Model":
        return self

    def __repr__(self) -> str:
        cached = self._exact is not None and self._exact.done
        parts = []
        for key, value in self._fields().items():
            if value is _PENDING and cached:
                value = getattr(self, key)
            parts.append(f"{key}={value!r}" if key == "name" else f"{key}={_describe(value)}")
        return f"Model({', '.join(parts)})"
