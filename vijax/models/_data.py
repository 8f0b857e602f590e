"""Data-aware models: a prior plus a sum of per-datum log likelihoods over a pytree of data.

``log p(x, z | theta) = log_prior(z[, theta]) + sum_i log_lik(z[, theta], x_i[, z_i])``

The per-datum form is what lets :func:`vijax.fit` draw minibatches, learn
model parameters ``theta`` beside ``q``, amortize ``q(z_i | x_i)`` over local
latents and let XLA partition the sum over devices (:mod:`vijax.data`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks

ArrayTree = Any


def _leaf_paths(tree: Any, name: str) -> list[tuple[str, Any]]:
    return [
        (f"{name}{jax.tree_util.keystr(path)}", leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def check_data(data: Any, name: str = "data") -> tuple[Any, int]:
    """Returns ``(data, n)``: every leaf an array with the same leading size ``n``.

    NumPy leaves become ``jax.Array``; JAX arrays (sharded ones included) are
    kept as they are. The error for mismatched sizes names both leaves.
    """
    leaves = _leaf_paths(data, name)
    if not leaves:
        raise ValueError(f"`{name}` must be a pytree with at least one array leaf; got {data!r}.")
    first = None
    out = []
    for where, leaf in leaves:
        if not isinstance(leaf, jax.Array):
            arr = np.asarray(leaf)
            if arr.dtype == object:
                raise TypeError(f"`{where}` must be an array; got {type(leaf).__name__}.")
            leaf = jnp.asarray(arr)
        if leaf.ndim < 1:
            raise ValueError(
                f"`{where}` must have a leading axis over the data (shape (n, ...)); "
                f"got a scalar."
            )
        if first is None:
            first = (where, leaf.shape[0])
        elif leaf.shape[0] != first[1]:
            raise ValueError(
                f"Every leaf of `{name}` must have the same leading size n (one row per "
                f"datum): `{first[0]}` has {first[1]} rows, `{where}` has {leaf.shape[0]}."
            )
        out.append(leaf)
    if first[1] < 1:
        raise ValueError(f"`{name}` must hold at least one datum; got n = 0.")
    treedef = jax.tree_util.tree_structure(data)
    return jax.tree_util.tree_unflatten(treedef, out), first[1]


def check_theta(theta: Any, name: str = "theta") -> Any:
    """Model parameters: a pytree of floating-point arrays (what optax updates)."""
    leaves = _leaf_paths(theta, name)
    if not leaves:
        raise ValueError(f"`{name}` must be None or a pytree with at least one array leaf; got {theta!r}.")
    out = []
    for where, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None and isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            leaf = jnp.asarray(float(leaf))
        elif dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            got = dtype if dtype is not None else type(leaf).__name__
            raise TypeError(
                f"`{where}` must be a floating-point array (model parameters are learned "
                f"by gradient); got {got}. Keep integer or boolean settings out of "
                f"`{name}` (close over them in log_lik), or cast them to float."
            )
        out.append(jnp.asarray(leaf))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(theta), out)


class DataModel:
    """A model whose log joint is a prior plus a sum over data.

    ``log p(x, z | theta) = log_prior(z[, theta]) + sum_i log_lik(z[, theta], x_i[, z_i])``

    Arguments in brackets are passed only when the model has them: ``theta``
    when the model has parameters, ``z`` (the global latent) when ``latent``
    is not None, ``z_i`` (datum ``i``'s local latent) when ``local_latent`` is
    not None. So ``log_lik(z, x_i)`` for Bayesian regression,
    ``log_lik(z, theta, x_i)`` for empirical Bayes, and ``log_lik(theta,
    x_i, z_i)`` for a VAE decoder. With local latents, ``log_lik`` is the
    whole per-datum term ``log p(x_i, z_i | z, theta)`` (the local prior
    included).

    Like :class:`vijax.models.Model`, a data model holds functions and data:
    close over it rather than passing it as a ``jit`` argument;
    :func:`vijax.fit` passes ``model.data`` to its compiled loop as an
    argument (never as a constant), so one compilation serves any data of the
    same shapes, and sharded data stays sharded.

    Attributes:
      log_lik: the per-datum log likelihood (see above).
      log_prior: the log prior of the global latent, or ``None`` (flat).
      data: the pytree of per-datum arrays, each with leading size ``n``.
      num_data: ``n``.
      latent: an example global latent (for a family's ``init``), or ``None``.
      theta: the model parameters' initial values (a pytree of floats), or ``None``.
      local_latent: an example local latent of one datum, or ``None``.
      name: a short name for tables.
    """

    __slots__ = ("log_lik", "log_prior", "data", "num_data", "latent", "theta",
                 "local_latent", "name")

    def __init__(self, log_lik, log_prior, data, num_data, latent, theta, local_latent, name):
        for slot, value in (
            ("log_lik", log_lik), ("log_prior", log_prior), ("data", data),
            ("num_data", num_data), ("latent", latent), ("theta", theta),
            ("local_latent", local_latent), ("name", name),
        ):
            object.__setattr__(self, slot, value)

    def __setattr__(self, name, value):
        raise AttributeError("A DataModel is immutable; use `model._replace(...)`.")

    def _replace(self, **changes: Any) -> "DataModel":
        fields = {s: getattr(self, s) for s in self.__slots__}
        fields.update(changes)
        if "data" in changes:
            fields["data"], fields["num_data"] = check_data(fields["data"])
        return DataModel(**fields)

    def __repr__(self) -> str:
        return (
            f"DataModel(name={self.name!r}, num_data={self.num_data}, "
            f"global latent={'yes' if self.latent is not None else 'no'}, "
            f"local latents={'yes' if self.local_latent is not None else 'no'}, "
            f"theta={'yes' if self.theta is not None else 'no'})"
        )

    # The calling convention, in one place.
    def _lik_args(self, z, theta, x, z_local):
        args = []
        if self.latent is not None:
            args.append(z)
        if self.theta is not None:
            args.append(theta)
        args.append(x)
        if self.local_latent is not None:
            args.append(z_local)
        return args

    def prior_term(self, z: ArrayTree, theta: Any = None) -> jax.Array:
        """``log_prior(z[, theta])``; 0 without a global latent or prior."""
        if self.latent is None or self.log_prior is None:
            return jnp.zeros((), _dtype_of(z, theta, self))
        args = [z] + ([theta] if self.theta is not None else [])
        return jnp.asarray(self.log_prior(*args))

    def lik_terms(self, z: ArrayTree, theta: Any, batch: Any, z_local: Any = None) -> jax.Array:
        """The per-datum terms ``log_lik(z[, theta], x_i[, z_i])`` of a batch, shape (B,).

        ``batch`` holds rows of the data (leading axis B); ``z_local`` the
        local latents of those rows (leading axis B) when the model has them.
        """

        def one(x, zl):
            return self.log_lik(*self._lik_args(z, theta, x, zl))

        out = jnp.asarray(jax.vmap(one)(batch, z_local))
        b = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if out.shape != (b,):
            raise ValueError(
                f"`log_lik` must return a scalar for one datum; got shape {tuple(out.shape[1:])} "
                "per datum."
            )
        return out

    def batch_log_joint(self, z, theta, batch, z_local=None, scale=1.0) -> jax.Array:
        """``log_prior(z[, theta]) + scale * sum_{i in batch} log_lik(...)``.

        With ``scale = n / B`` and a uniformly drawn batch this is an unbiased
        estimate of :meth:`log_joint`.
        """
        lik = jnp.sum(self.lik_terms(z, theta, batch, z_local))
        return self.prior_term(z, theta) + jnp.asarray(scale, lik.dtype) * lik

    def log_joint(self, z: ArrayTree = None, theta: Any = None, z_local: Any = None) -> jax.Array:
        """The full-data ``log p(x, z[, z_1..n] | theta)`` (theta defaults to ``model.theta``)."""
        if theta is None:
            theta = self.theta
        return self.batch_log_joint(z, theta, self.data, z_local)


def _dtype_of(z, theta, model):
    leaves = jax.tree_util.tree_leaves((z, theta, model.latent, model.local_latent))
    return jnp.result_type(*leaves) if leaves else jnp.float32


def data_model(
    log_lik: Callable[..., jax.Array],
    data: Any,
    *,
    latent: Optional[ArrayTree] = None,
    log_prior: Optional[Callable[..., jax.Array]] = None,
    theta: Optional[Any] = None,
    local_latent: Optional[ArrayTree] = None,
    name: str = "data_model",
) -> DataModel:
    """Returns a :class:`DataModel`: ``log_prior(z[, theta]) + sum_i log_lik(z[, theta], x_i[, z_i])``.

    Fit it with :func:`vijax.fit` like any model, adding ``batch_size=`` for
    minibatches (an unbiased ``n / B`` scaling), learning ``theta`` beside
    ``q`` (pass :class:`vijax.data.JointParams`), and ``local_family=`` (an
    amortized family, :func:`vijax.families.amortized`) for local latents.

    Args:
      log_lik: the log likelihood of one datum; its arguments, in order, are
        the global latent ``z`` (when ``latent`` is given), ``theta`` (when
        given), the datum ``x_i`` (one row of every leaf of ``data``) and its
        local latent ``z_i`` (when ``local_latent`` is given; ``log_lik`` then
        includes the local prior ``log p(z_i | z, theta)``).
      data: a pytree of arrays with one row per datum (the same leading size
        ``n`` on every leaf; integer leaves such as labels are fine).
        NumPy arrays are moved to the default device; JAX arrays, sharded
        ones included (:func:`vijax.data.shard`), are kept as they are.
      latent: an example global latent pytree (float arrays), or ``None``
        when every latent is local.
      log_prior: ``log_prior(z[, theta]) -> scalar``, or ``None`` for a flat
        prior (only with ``latent``).
      theta: the model parameters' initial values, a pytree of float arrays,
        or ``None``.
      local_latent: an example local latent of one datum (no data axis), or
        ``None``.
      name: a short name.

    Raises:
      TypeError: a non-callable ``log_lik``/``log_prior``, non-float ``theta``
        or latent leaves.
      ValueError: data leaves with different leading sizes (both named),
        neither ``latent`` nor ``local_latent``, ``log_prior`` without
        ``latent``, or ``log_lik``/``log_prior`` not returning a scalar.

    Example:
      >>> import jax, jax.numpy as jnp, vijax
      >>> from jax.scipy.stats import norm
      >>> x = jax.random.normal(jax.random.key(0), (1000, 3))
      >>> y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.1 * jax.random.normal(jax.random.key(1), (1000,))
      >>> model = vijax.models.data_model(
      ...     lambda w, d: norm.logpdf(d["y"], d["x"] @ w, 0.1),
      ...     {"x": x, "y": y}, latent=jnp.zeros(3),
      ...     log_prior=lambda w: norm.logpdf(w).sum())
      >>> model.num_data
      1000
    """
    if not callable(log_lik):
        raise TypeError(f"`log_lik` must be callable; got {type(log_lik).__name__}.")
    if log_prior is not None and not callable(log_prior):
        raise TypeError(f"`log_prior` must be None or callable; got {type(log_prior).__name__}.")
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str; got {name!r}.")
    data, n = check_data(data)
    if latent is None and local_latent is None:
        raise ValueError(
            "A data model needs a latent to infer: pass `latent` (a global latent), "
            "`local_latent` (one per datum), or both; got neither."
        )
    if latent is not None:
        latent = _checks.check_latent("latent", latent)
    elif log_prior is not None:
        raise ValueError(
            "`log_prior` is the prior of the global latent, but `latent` is None; put "
            "the local prior log p(z_i | theta) inside `log_lik`."
        )
    if local_latent is not None:
        local_latent = _checks.check_latent("local_latent", local_latent)
    if theta is not None:
        theta = check_theta(theta)
    model = DataModel(log_lik, log_prior, data, n, latent, theta, local_latent, name)
    _check_signatures(model)
    return model


def _check_scalar(fn: Callable, args: list, signature: str, what: str) -> None:
    """Traces ``fn(*args)`` (abstract values, nothing runs); raises unless it gives a scalar."""
    name = signature.split("(")[0]
    try:
        out = jax.eval_shape(lambda *a: fn(*a), *args)
    except TypeError as e:
        raise TypeError(
            f"`{name}` is called as {signature} for this model (arguments in brackets of "
            f"the docstring are passed only when the model has them); calling it failed: {e}"
        ) from e
    if getattr(out, "shape", None) != ():
        raise ValueError(
            f"`{name}` must return a scalar{what} ({signature}); got "
            f"{getattr(out, 'shape', type(out).__name__)}."
        )


def _check_signatures(model: DataModel) -> None:
    """Traces ``log_lik`` on one datum (and ``log_prior``) to check they return scalars."""
    row = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), model.data)
    spec = lambda t: None if t is None else jax.tree_util.tree_map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), t)
    z, theta, zl = spec(model.latent), spec(model.theta), spec(model.local_latent)
    names = (["z"] if model.latent is not None else []) + (
        ["theta"] if model.theta is not None else []) + ["x_i"] + (
        ["z_i"] if model.local_latent is not None else [])
    _check_scalar(model.log_lik, model._lik_args(z, theta, row, zl),
                  f"log_lik({', '.join(names)})", " for one datum")
    if model.log_prior is not None:
        args = [z] + ([theta] if model.theta is not None else [])
        _check_scalar(model.log_prior, args,
                      "log_prior(z, theta)" if model.theta is not None else "log_prior(z)", "")
