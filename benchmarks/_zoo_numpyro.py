"""NumPyro twins of the zoo (``vijax/models/_zoo.py``), written independently.

Each twin is a NumPyro model over the same data as the vijax model of the same
name, with sample sites named like the vijax latents (and deterministic sites
like its derived quantities), so that NumPyro's unconstrained potential can be
compared with ``model.log_joint`` point by point (``tests/test_zoo.py``) and
NUTS on the twin gives the zoo's references (``benchmarks/zoo_references.py``).

The code shares nothing with the vijax side but the data: the distributions
are ``numpyro.distributions``, the stochastic volatility recursion is
Stan's loop on ``h`` (vijax's runs on ``h - mu``), and the LGCP kernel is
built here in JAX (vijax builds it in NumPy).

``TWINS[name]`` is a :class:`Twin`: the NumPyro model, a function giving its
keyword arguments from the float64 NumPy data of ``vijax.models._zoo``, the
latent sites and the deterministic sites.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from vijax.models import _zoo


def eight_schools_centered(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", y.shape[0]):
        eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * eta)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def hierarchical_logistic(x, y, group, num_groups):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 1.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    alpha = numpyro.deterministic("alpha", mu_a + sigma_a * a)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=jnp.dot(x, w) + alpha[group]), obs=y)


def stochastic_volatility(returns):
    mu = numpyro.sample("mu", dist.Cauchy(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(5.0))
    h_std = numpyro.sample("h_std", dist.Normal(0.0, 1.0).expand([returns.shape[0]]).to_event(1))

    # Stan's loop: h[1] = mu + sigma h_std[1] / sqrt(1 - phi^2) (the stationary
    # law), then h[t] = mu + phi (h[t-1] - mu) + sigma h_std[t].
    def step(previous, innovation):
        current = mu + phi * (previous - mu) + sigma * innovation
        return current, current

    h1 = mu + sigma * h_std[0] / jnp.sqrt(1.0 - phi * phi)
    _, later = jax.lax.scan(step, h1, h_std[1:])
    h = numpyro.deterministic("h", jnp.concatenate([h1[None], later]))
    numpyro.sample("returns", dist.Normal(0.0, jnp.exp(h / 2.0)).to_event(1), obs=returns)


def neals_funnel(dim):
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2.0)).expand([dim - 1]).to_event(1))


def neals_funnel_noncentered(dim):
    """The same posterior over ``(v, x)`` with ``x = exp(v / 2) x_std``: NUTS mixes here."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    x_std = numpyro.sample("x_std", dist.Normal(0.0, 1.0).expand([dim - 1]).to_event(1))
    numpyro.deterministic("x", jnp.exp(v / 2.0) * x_std)


def poisson_glm(x, y):
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 1.0))
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(intercept + jnp.dot(x, w))), obs=y)


def item_response(y):
    num_students, num_items = y.shape
    sigma_d = numpyro.sample("sigma_d", dist.HalfCauchy(1.0))
    ability = numpyro.sample("ability", dist.Normal(0.0, 1.0).expand([num_students]).to_event(1))
    difficulty = numpyro.sample(
        "difficulty", dist.Normal(0.0, sigma_d).expand([num_items]).to_event(1))
    numpyro.sample(
        "y", dist.Bernoulli(logits=ability[:, None] - difficulty[None, :]).to_event(2), obs=y)


def _se_kernel_cholesky(grid, lengthscale, jitter, dtype):
    ticks = (jnp.arange(grid, dtype=dtype) + 0.5) / grid
    rows, cols = jnp.meshgrid(ticks, ticks, indexing="ij")
    points = jnp.stack([rows.ravel(), cols.ravel()], axis=1)
    dist2 = jnp.sum(jnp.square(points[:, None, :] - points[None, :, :]), axis=2)
    cov = jnp.exp(-dist2 / (2.0 * lengthscale**2)) + jitter * jnp.eye(grid * grid, dtype=dtype)
    return jnp.linalg.cholesky(cov)


def log_gaussian_cox(counts, lengthscale=0.2, jitter=1e-6):
    grid = counts.shape[0]
    chol = _se_kernel_cholesky(grid, lengthscale, jitter, counts.dtype)
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    u = numpyro.sample("u", dist.Normal(0.0, 1.0).expand([grid * grid]).to_event(1))
    f = numpyro.deterministic("f", (mu + sigma * chol @ u).reshape(grid, grid))
    numpyro.sample("counts", dist.Poisson(jnp.exp(f)).to_event(2), obs=counts)


class Twin(NamedTuple):
    """A NumPyro twin: ``model(**kwargs(data))`` with ``data`` the float64 NumPy data."""

    model: Callable
    kwargs: Callable[[dict], dict]
    latent: tuple
    deterministic: tuple = ()


def _arrays(*names):
    return lambda data: {n: jnp.asarray(data[n]) for n in names}


TWINS = {
    "eight_schools_centered": Twin(
        eight_schools_centered, _arrays("y", "sigma"), ("mu", "tau", "theta")),
    "eight_schools_noncentered": Twin(
        eight_schools_noncentered, _arrays("y", "sigma"), ("mu", "tau", "eta"), ("theta",)),
    "hierarchical_logistic": Twin(
        hierarchical_logistic,
        lambda d: {"x": jnp.asarray(d["x"]), "y": jnp.asarray(d["y"]),
                   "group": jnp.asarray(d["group"]), "num_groups": int(d["num_groups"])},
        ("w", "mu_a", "sigma_a", "a"), ("alpha",)),
    "stochastic_volatility": Twin(
        stochastic_volatility, _arrays("returns"), ("mu", "phi", "sigma", "h_std"), ("h",)),
    "neals_funnel": Twin(neals_funnel, lambda d: {"dim": int(d["dim"])}, ("v", "x")),
    "poisson_glm": Twin(poisson_glm, _arrays("x", "y"), ("intercept", "w")),
    "item_response": Twin(item_response, _arrays("y"), ("ability", "difficulty", "sigma_d")),
    "log_gaussian_cox": Twin(log_gaussian_cox, _arrays("counts"), ("mu", "sigma", "u"), ("f",)),
}

NEALS_FUNNEL_NONCENTERED = Twin(
    neals_funnel_noncentered, lambda d: {"dim": int(d["dim"])}, ("v", "x_std"), ("x",))


def default_data(name: str, seed: int = 0) -> dict:
    """The float64 NumPy data of the vijax model ``name`` with its defaults."""
    return _zoo.default_data(name, seed)


def potential_fn(name: str, data: dict) -> Callable:
    """``potential(params) -> -log p(x, z)`` on NumPyro's unconstrained space (Jacobians in)."""
    from numpyro.infer.util import potential_energy

    twin = TWINS[name]
    kwargs = twin.kwargs(data)
    return lambda params: potential_energy(twin.model, (), kwargs, params)


def unconstrain(name: str, data: dict, values: dict) -> dict:
    """Natural-space latent values -> NumPyro's unconstrained parameters."""
    from numpyro.infer.util import unconstrain_fn

    twin = TWINS[name]
    return unconstrain_fn(twin.model, (), twin.kwargs(data), values)


def constrain(name: str, data: dict, params: dict) -> dict:
    """NumPyro's unconstrained parameters -> natural values and deterministic sites."""
    from numpyro.infer.util import constrain_fn

    twin = TWINS[name]
    return constrain_fn(twin.model, (), twin.kwargs(data), params, return_deterministic=True)


__all__ = ["TWINS", "Twin", "default_data", "potential_fn", "unconstrain", "constrain",
           "NEALS_FUNNEL_NONCENTERED"]
