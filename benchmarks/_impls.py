"""The implementations the suite times on one problem: vijax, the floor, peers.

Every implementation is an :class:`Impl` built fresh (new closures, a new
optax transformation, so nothing is served from a compilation cache), from
the same configuration: the same problem, the same family (mean-field or
full-rank Gaussian), the same estimator, the same ``optax.adam`` learning
rate, the same number of Monte Carlo draws S per step, and the same starting
distribution ``N(0, 0.1^2 I)``.

* ``vijax.fit``: the library's driver, as a user calls it
  (``progress=False``, default ``chunk_size``), on the library model's
  ``log_joint``; a call continues from the previous call's ``FitState``.
* ``floor``: the loop one writes by hand for the same work: ``jax.jit`` of a
  ``lax.scan`` whose step draws the noise (from ``fold_in(key, step)``, which
  is cheaper than splitting a carried key), evaluates the same estimator's
  surrogate written directly with ``jax.numpy`` (the same parameterization
  as ``vijax.mean_field`` / ``vijax.full_rank``, no vijax code), takes
  ``jax.value_and_grad`` and applies the optax update. It records the loss per
  step and nothing else: no NaN guard, no per-step diagnostics.
* ``numpyro``: ``numpyro.infer.SVI`` with ``AutoNormal`` (mean-field) or
  ``AutoMultivariateNormal`` (full-rank), ``Trace_ELBO(num_particles=S,
  vectorize_particles=True)``, ``optax_to_numpyro(optax.adam(lr))``, its
  ``update`` scanned in a jitted ``lax.scan`` (the loop ``SVI.run`` runs).
  ``Trace_ELBO`` is the reparameterization gradient, so NumPyro runs only in
  the ``reparam`` configurations.
* ``blackjax``: ``blackjax.meanfield_vi`` / ``blackjax.fullrank_vi`` with the
  same optax optimizer and ``num_samples=S``, ``stl_estimator`` set from the
  configuration, its ``step`` scanned in a jitted ``lax.scan``. Its initial
  state is set to scale 0.1 (its own default is 0.135 or 1).

``Impl.run(state, k)`` advances k steps and returns the new state without
waiting for it; scan-based implementations compile one program per distinct
k (ahead of time, so that the compiled program's memory analysis is at hand).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vijax

_LOG_2PI = math.log(2.0 * math.pi)
_sg = jax.lax.stop_gradient

IMPLEMENTATIONS = ("floor", "vijax.fit", "numpyro", "blackjax")


class Impl(NamedTuple):
    """One implementation of one configuration.

    Attributes:
      name: one of :data:`IMPLEMENTATIONS`.
      init: ``init() -> state`` at step 0 (cheap; no compilation of the loop).
      run: ``run(state, k) -> state`` after k more steps (asynchronous).
      gaussian: ``gaussian(state) -> (mean, scale)`` as float64 NumPy: scale
        is the (d,) standard deviations (mean-field) or the (d, d) lower
        Cholesky factor (full-rank).
      memory: ``memory(state, k) -> dict | None``: XLA's memory analysis of
        the compiled k-step program (bytes).
    """

    name: str
    init: Callable[[], Any]
    run: Callable[[Any, int], Any]
    gaussian: Callable[[Any], tuple]
    memory: Callable[[Any, int], dict | None]


def available(name: str) -> bool:
    """Whether the peer ``name`` can be imported (the floor and vijax always can)."""
    if name == "numpyro":
        try:
            import numpyro  # noqa: F401
        except ImportError:
            return False
    if name == "blackjax":
        try:
            import blackjax  # noqa: F401
        except ImportError:
            return False
    return True


def applies(name: str, estimator: str) -> bool:
    """Whether implementation ``name`` offers ``estimator``."""
    return not (name == "numpyro" and estimator != "reparam")


def _softplus_inverse(y: float) -> float:
    return float(np.log(np.expm1(y)))


def _memory_stats(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    # Live at once at worst: inputs, outputs not aliased to inputs, temporaries.
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                         - out["alias_bytes"] + out["temp_bytes"])
    return out


def _aot_scan(step: Callable) -> tuple[Callable, Callable]:
    """``run(state, k)`` scanning ``step`` k times, compiled ahead of time per k."""
    compiled: dict[int, Any] = {}

    def program(k):
        def loop(state):
            return jax.lax.scan(lambda s, _: step(s), state, None, length=k)
        return jax.jit(loop)

    def get(state, k):
        if k not in compiled:
            compiled[k] = program(k).lower(state).compile()
        return compiled[k]

    def run(state, k):
        return get(state, k)(state)[0]

    def memory(state, k):
        return _memory_stats(get(state, k))

    return run, memory


# ------------------------------------------------------------------- the floor
def floor_neg_elbo(family: str, estimator: str, log_joint: Callable, num_samples: int):
    """Returns ``neg_elbo(params, key)``, written out with ``jax.numpy``.

    ``params`` is a dict ``loc`` (d,), ``raw`` (d,) and, full-rank, ``off``
    (d, d). Mean-field ``z = loc + softplus(raw) * eps``; full-rank ``z = loc
    + L eps`` with ``L = diag(softplus(raw)) (I + tril(off, -1))``. ``log q``
    is evaluated at the draws, with the parameters stopped for ``stl``
    (Roeder et al. 2017) and live for ``reparam``.
    """
    if estimator not in ("reparam", "stl"):
        raise ValueError(f"the floor implements 'reparam' and 'stl'; got {estimator!r}.")

    def neg_elbo(params, key):
        loc = params["loc"]
        d = loc.shape[0]
        eps = jax.random.normal(key, (num_samples, d), loc.dtype)
        sd = jax.nn.softplus(params["raw"])
        if family == "mean_field":
            z = loc[None, :] + eps * sd[None, :]

            def log_q(loc, sd):
                r = (z - loc[None, :]) / sd[None, :]
                return -0.5 * (d * _LOG_2PI + 2.0 * jnp.sum(jnp.log(sd))
                               + jnp.sum(jnp.square(r), axis=1))
            scale = sd
        else:
            scale = sd[:, None] * (jnp.tril(params["off"], -1) + jnp.eye(d, dtype=loc.dtype))
            z = loc[None, :] + eps @ scale.T

            def log_q(loc, tril):
                r = jax.scipy.linalg.solve_triangular(tril, (z - loc[None, :]).T, lower=True)
                return -0.5 * (d * _LOG_2PI + 2.0 * jnp.sum(jnp.log(jnp.diagonal(tril)))
                               + jnp.sum(jnp.square(r), axis=0))
        if estimator == "stl":
            lq = log_q(_sg(loc), _sg(scale))
        else:
            lq = log_q(loc, scale)
        return -jnp.mean(jax.vmap(log_joint)(z) - lq)

    return neg_elbo


def build_floor(problem, family: str, estimator: str, num_samples: int, lr: float,
                seed: int) -> Impl:
    """The hand-written jitted ``lax.scan`` + optax loop (see the module doc)."""
    optimizer = optax.adam(lr)
    loss_and_grad = jax.value_and_grad(
        floor_neg_elbo(family, estimator, problem.hand_log_joint, num_samples))
    d = problem.d

    def step(carry):
        params, opt_state, key, t = carry
        loss, grads = loss_and_grad(params, jax.random.fold_in(key, t))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key, t + 1), loss

    def init():
        params = {"loc": jnp.zeros((d,), jnp.float32),
                  "raw": jnp.full((d,), _softplus_inverse(0.1), jnp.float32)}
        if family == "full_rank":
            params["off"] = jnp.zeros((d, d), jnp.float32)
        return params, optimizer.init(params), jax.random.key(seed), jnp.zeros((), jnp.int32)

    def gaussian(state):
        p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), state[0])
        sd = np.logaddexp(0.0, p["raw"])
        if family == "mean_field":
            return p["loc"], sd
        return p["loc"], sd[:, None] * (np.tril(p["off"], -1) + np.eye(d))

    run, memory = _aot_scan(step)
    return Impl("floor", init, run, gaussian, memory)


# ------------------------------------------------------------------- vijax.fit
def build_vijax(problem, family: str, estimator: str, num_samples: int, lr: float,
                seed: int) -> Impl:
    """``vijax.fit`` with the library model's log joint (see the module doc)."""
    fam = vijax.mean_field() if family == "mean_field" else vijax.full_rank()
    optimizer = optax.adam(lr)
    log_joint = problem.library_model.log_joint
    kwargs = dict(optimizer=optimizer, num_samples=num_samples, estimator=estimator,
                  progress=False)

    def init():
        return fam.init(problem.library_model.latent)

    def run(state, k):
        if isinstance(state, vijax.FitState):
            return vijax.fit(None, fam, log_joint, state, num_steps=k, **kwargs).state
        return vijax.fit(jax.random.key(seed), fam, log_joint, state, num_steps=k,
                         **kwargs).state

    def gaussian(state):
        p = state.params if isinstance(state, vijax.FitState) else state
        p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
        sd = np.logaddexp(0.0, p.raw_scale)
        if family == "mean_field":
            return p.loc, sd
        return p.loc, sd[:, None] * (np.tril(p.off_diag, -1) + np.eye(problem.d))

    def memory(state, k):
        # fit compiles one chunk program (a loop of up to chunk_size steps);
        # vijax has no public handle on it, so lower it through the private
        # cache the way fit does. None if that internal changes.
        try:
            from vijax.fitting import _engine

            if not isinstance(state, vijax.FitState):
                state = vijax.init_fit_state(jax.random.key(seed), state, optimizer)
            chunk_size = 500
            step = vijax.make_step(fam, log_joint, optimizer, num_samples=num_samples,
                                   estimator=estimator)
            chunk = jax.jit(_engine.make_chunk(step, chunk_size, 20))
            nonfinite = jnp.zeros((), jnp.int32)
            compiled = chunk.lower(state, nonfinite, min(k, chunk_size)).compile()
        except Exception:
            return None
        return _memory_stats(compiled)

    return Impl("vijax.fit", init, run, gaussian, memory)


# --------------------------------------------------------------------- NumPyro
def build_numpyro(problem, family: str, estimator: str, num_samples: int, lr: float,
                  seed: int) -> Impl:
    """NumPyro ``SVI`` with an autoguide (see the module doc)."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
    from numpyro.infer.initialization import init_to_value

    if estimator != "reparam":
        raise ValueError(f"NumPyro's Trace_ELBO is the 'reparam' estimator; got {estimator!r}.")
    d, model_name = problem.d, problem.model

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        if model_name == "blr":
            numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)
        else:
            numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    guide_cls = AutoNormal if family == "mean_field" else AutoMultivariateNormal
    guide = guide_cls(model, init_loc_fn=init_to_value(values={"w": jnp.zeros((d,))}),
                      init_scale=0.1)
    svi = SVI(model, guide, numpyro.optim.optax_to_numpyro(optax.adam(lr)),
              Trace_ELBO(num_particles=num_samples, vectorize_particles=True))
    x, y = problem.x, problem.y

    def init():
        return svi.init(jax.random.key(seed), x, y)

    def step(state):
        return svi.update(state, x, y)

    def gaussian(state):
        p = {k: np.asarray(v, np.float64) for k, v in svi.get_params(state).items()}
        if family == "mean_field":
            return p["w_auto_loc"], p["w_auto_scale"]
        return p["auto_loc"], p["auto_scale_tril"]

    run, memory = _aot_scan(step)
    return Impl("numpyro", init, run, gaussian, memory)


# -------------------------------------------------------------------- Blackjax
def build_blackjax(problem, family: str, estimator: str, num_samples: int, lr: float,
                   seed: int) -> Impl:
    """Blackjax ``meanfield_vi`` / ``fullrank_vi`` (see the module doc)."""
    import blackjax

    if estimator not in ("reparam", "stl"):
        raise ValueError(f"Blackjax offers 'reparam' and 'stl'; got {estimator!r}.")
    d = problem.d
    factory = blackjax.meanfield_vi if family == "mean_field" else blackjax.fullrank_vi
    algo = factory(problem.hand_log_joint, optax.adam(lr), num_samples=num_samples,
                   stl_estimator=estimator == "stl")

    def init():
        state = algo.init(jnp.zeros((d,), jnp.float32))
        if family == "mean_field":
            state = state._replace(rho=jnp.full((d,), math.log(0.1), jnp.float32))
        else:
            chol = state.chol_params.at[:d].set(math.log(0.1))
            state = state._replace(chol_params=chol)
        return state, jax.random.key(seed), jnp.zeros((), jnp.int32)

    def step(carry):
        state, key, t = carry
        state, info = algo.step(jax.random.fold_in(key, t), state)
        return (state, key, t + 1), info.elbo

    def gaussian(carry):
        state = carry[0]
        mu = np.asarray(state.mu, np.float64)
        if family == "mean_field":
            return mu, np.exp(np.asarray(state.rho, np.float64))
        params = np.asarray(state.chol_params, np.float64)
        tril = np.zeros((d, d))
        tril[np.tril_indices(d, -1)] = params[d:]
        return mu, tril + np.diag(np.exp(params[:d]))

    run, memory = _aot_scan(step)
    return Impl("blackjax", init, run, gaussian, memory)


BUILDERS = {
    "floor": build_floor,
    "vijax.fit": build_vijax,
    "numpyro": build_numpyro,
    "blackjax": build_blackjax,
}
