"""A NumPyro model as a :class:`vijax.models.Model` (NumPyro is imported only when called).

The adapter asks NumPyro for everything it knows (the potential energy with
its Jacobians, the bijections onto each support, the replay that recovers
``numpyro.deterministic`` sites) instead of re-deriving it, so a model fitted
here has the same unconstrained density NumPyro's HMC/NUTS samples from.

Models written as a plain log density need no adapter: a Blackjax-style
``logdensity_fn(z)`` (an unnormalised log density of one pytree of
unconstrained parameters) already is a ``log_joint``; pass it with an example
latent to ``vijax.models.Model(log_joint=logdensity_fn, latent=z0)``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from vijax.models._model import Model

_INSTALL = 'pip install "vijax[numpyro]"'


def _require_numpyro() -> None:
    """Imports NumPyro, or raises an ImportError that names the extra to install."""
    try:
        importlib.import_module("numpyro")
    except ImportError as err:
        raise ImportError(
            f"`vijax.interop.from_numpyro` needs NumPyro, which is not installed: {_INSTALL}."
        ) from err


def _model_name(model: Callable[..., Any]) -> str:
    while isinstance(model, functools.partial):
        model = model.func
    return getattr(model, "__name__", type(model).__name__)


class _Site(NamedTuple):
    """What the adapter needs of one site of the prototype trace (no arrays)."""

    type: str
    is_latent: bool  # an unobserved sample site
    is_discrete: bool
    is_delta: bool
    shape: tuple  # the unconstrained shape of a continuous latent site
    plate: tuple  # (size, subsample_size) of a plate


def _prototype(model: Callable[..., Any], args: tuple, kwargs: dict, name: str) -> dict:
    """The sites of one seeded trace of ``model``, by name (checked).

    The trace runs under ``jax.eval_shape``: only shapes and supports are
    read, and tracing costs nothing next to running the model op by op
    (which compiles every primitive it meets). The model must then be
    traceable with its data closed over, as ``jit`` of the log joint needs.
    """
    from numpyro import handlers
    from numpyro.distributions.transforms import biject_to
    from numpyro.infer.util import helpful_support_errors

    sites = {}

    def run():
        trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*args, **kwargs)
        for site_name, site in trace.items():
            latent = site["type"] == "sample" and not site["is_observed"]
            discrete = latent and site["fn"].support.is_discrete
            shape = ()
            if latent and not discrete:
                with helpful_support_errors(site):
                    transform = biject_to(site["fn"].support)
                shape = tuple(transform.inverse_shape(jnp.shape(site["value"])))
            sites[site_name] = _Site(
                type=site["type"],
                is_latent=latent,
                is_discrete=bool(discrete),
                is_delta=latent and type(site["fn"]).__name__ == "Delta",
                shape=shape,
                plate=tuple(site["args"][:2]) if site["type"] == "plate" else (),
            )

    jax.eval_shape(run)
    discrete = [n for n, site in sites.items() if site.is_discrete]
    if discrete:
        raise ValueError(
            f"NumPyro model {name!r} has discrete latent sample site(s) "
            f"{', '.join(map(repr, discrete))}; vijax's variational families are "
            "continuous. Marginalize them out of the model first: enumerate their "
            "values and add the summed-out log likelihood with `numpyro.factor` "
            "(e.g. `jax.nn.logsumexp` over the values), or observe them."
        )
    for site_name, site in sites.items():
        if site.is_delta:
            raise ValueError(
                f"Sample site {site_name!r} of NumPyro model {name!r} has a Delta "
                "distribution; use `numpyro.deterministic` for a derived value."
            )
        if site.plate and site.plate[1] is not None and site.plate[1] != site.plate[0]:
            raise ValueError(
                f"Plate {site_name!r} of NumPyro model {name!r} subsamples its data "
                f"(subsample_size={site.plate[1]} of size={site.plate[0]}); "
                "`from_numpyro` needs the full log joint: drop `subsample_size`."
            )
    if not any(site.is_latent for site in sites.values()):
        raise ValueError(
            f"NumPyro model {name!r} has no latent sample sites (every "
            "`numpyro.sample` is observed): there is nothing to infer."
        )
    return sites


def from_numpyro(model: Callable[..., Any], *args: Any, **kwargs: Any) -> Model:
    """Returns a :class:`vijax.models.Model` for a NumPyro model and its data.

    ``args`` and ``kwargs`` are the model's arguments (its data), closed over.
    The model is traced once, abstractly (``jax.eval_shape`` of a
    ``numpyro.handlers.seed(model, 0)`` trace: no op runs), to find its latent
    sample sites and their supports; the returned functions then replay it
    with the latents substituted. The model must therefore be traceable with
    its data closed over, as ``jit`` of the log joint needs anyway; the data
    may themselves be traced (build the model inside a ``jit`` or ``vmap``).

    * ``log_joint(z)`` is the log joint on the unconstrained space, each site
      mapped by ``biject_to(site.support)`` with its log-Jacobian added:
      ``-numpyro.infer.util.potential_energy``, the density NumPyro's NUTS
      samples. Pure; works under ``jit``, ``vmap`` and ``grad``.
    * ``latent`` is a dict keyed by latent sample-site name holding **zeros**
      of each site's unconstrained shape (a simplex of ``K`` entries has
      ``K - 1``), in jax's default float dtype (float32, or float64 with
      ``jax_enable_x64``) at the time of the call. Zero is the middle of each
      support (a scale of 1, a uniform simplex); a family's ``init`` starts
      its mean there. For another start, pass your own pytree of the same
      structure to ``family.init``.
    * ``model.constrain(z)`` (one latent, or draws with leading batch axes)
      gives every latent site on its support plus every
      ``numpyro.deterministic`` site (``constrain_fn(...,
      return_deterministic=True)``), keyed by site name.
    * ``name`` is the model function's name.

    Observed sites (``obs=...``) are data, not latents. ``numpyro.param``
    sites are held at their initial values (from one concrete trace). The
    adapter does not evaluate the log joint at ``latent``: a model whose log
    joint is not finite there is only caught by the fit.

    Args:
      model: a NumPyro model: a callable with ``numpyro.sample`` statements.
      *args: positional arguments of ``model`` (its data).
      **kwargs: keyword arguments of ``model`` (its data, e.g. ``y=...``).

    Returns:
      A :class:`vijax.models.Model` on the unconstrained space, with
      ``constrain``.

    Raises:
      ImportError: NumPyro is not installed (``pip install "vijax[numpyro]"``).
      TypeError: ``model`` is not callable.
      ValueError: the model has discrete latent sites (marginalize them
        first), a latent ``Delta`` site, a subsampled plate, or no latent
        sites at all.

    Example:
      >>> import jax, numpyro, numpyro.distributions as dist, optax, vijax
      >>> def coin(flips):
      ...     p = numpyro.sample("p", dist.Beta(1.0, 1.0))
      ...     numpyro.sample("flips", dist.Bernoulli(p), obs=flips)
      >>> model = vijax.interop.from_numpyro(coin, jax.numpy.array([1.0, 1.0, 0.0, 1.0]))
      >>> model.latent
      {'p': Array(0., dtype=float32)}
      >>> family = vijax.mean_field()
      >>> result = vijax.fit(jax.random.key(0), family, model.log_joint,
      ...     family.init(model.latent), optimizer=optax.adam(1e-2),
      ...     num_steps=1000, progress=False)
      >>> draws = family.sample(jax.random.key(1), result.params, 100)
      >>> model.constrain(draws)["p"].shape
      (100,)
    """
    if not callable(model):
        raise TypeError(
            "`model` must be a NumPyro model (a callable with `numpyro.sample` "
            f"statements); got {type(model).__name__}."
        )
    _require_numpyro()
    from numpyro import handlers
    from numpyro.infer.util import constrain_fn, potential_energy

    name = _model_name(model)
    sites = _prototype(model, args, kwargs, name)

    replayed = model
    if any(site.type in ("param", "mutable") for site in sites.values()):
        # As in numpyro.infer.util.initialize_model: parameters (and mutable
        # state) keep their initial values, so the log joint is a function of
        # the latent sample sites alone. They need a concrete trace.
        trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*args, **kwargs)
        fixed = {k: s["value"] for k, s in trace.items() if s["type"] in ("param", "mutable")}
        replayed = handlers.substitute(model, data=fixed)

    latent = {n: jnp.zeros(site.shape) for n, site in sites.items() if site.is_latent}
    names = set(latent)

    def check(z):
        if not hasattr(z, "keys") or set(z.keys()) != names:
            got = sorted(z.keys()) if hasattr(z, "keys") else type(z).__name__
            raise ValueError(
                f"`z` must be a dict with the latent sites of {name!r} "
                f"({sorted(names)}); got {got}."
            )

    def log_joint(z):
        check(z)
        return -potential_energy(replayed, args, kwargs, dict(z))

    def constrain(z):
        check(z)
        return constrain_fn(replayed, args, kwargs, dict(z), return_deterministic=True)

    return Model(log_joint=log_joint, latent=latent, name=name, constrain=constrain)
