"""How fast is ``vijax.fit``? Against a hand-written loop and NumPyro's SVI.

The problem is Bayesian linear regression with n = 1000, d = 100 and S = 8
Monte Carlo draws per step, fitted with ``optax.adam(1e-2)`` and the
sticking-the-landing ("stl") ELBO gradient, fit's default.

The *floor* is the loop one would write by hand for exactly the same work: a
jitted ``lax.scan`` whose step draws the noise, evaluates ``-ELBO`` (sampled
log joint minus sampled log q, the same parameterization as the vijax
families), takes ``jax.value_and_grad`` and applies the optax update. ``fit``
adds a NaN guard, a per-step trace (ELBO, gradient norm, skipped flag),
chunking and host work between chunks; this benchmark measures what that
costs.

Measured:

* steady state: seconds per step of an already compiled 2000-step run
  (median over interleaved repeats), for the mean-field and full-rank
  families, with fit given the same hand-written log joint as the floor and
  with ``vijax.models.bayesian_linear_regression(...).log_joint``;
* end to end: wall time of a fresh ``python`` process that imports, builds
  the data, compiles and runs 2000 steps, for fit, the floor and NumPyro's
  ``SVI.run`` (``AutoNormal``, ``Trace_ELBO(num_particles=8,
  vectorize_particles=True)``, the same optax optimizer), cold (every process
  compiles) and with JAX's persistent compilation cache warm (every contender
  alike), the cost of re-running a script.

Run ``python -m benchmarks.fit_speed`` (a few minutes on two cores); it writes
``benchmarks/results/cpu/fit_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vijax
from benchmarks import _machine

N, D, S = 1000, 100, 8
NUM_STEPS = 2000
LEARNING_RATE = 1e-2
_LOG_2PI = math.log(2.0 * math.pi)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(_ROOT, "benchmarks", "results", "cpu")


def make_data(n: int = N, d: int = D, seed: int = 0):
    """Returns a seeded regression data set ``(X, y)`` as float32 jax arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    y = (x @ w + rng.standard_normal(n).astype(np.float32)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def hand_log_joint(x: jax.Array, y: jax.Array, noise_scale=1.0, prior_scale=1.0):
    """Returns a hand-written BLR ``log_joint(w)`` (the same density as vijax's)."""
    n, d = x.shape
    s2, t2 = noise_scale**2, prior_scale**2

    def log_joint(w):
        lik = -0.5 * (n * (_LOG_2PI + math.log(s2)) + jnp.sum(jnp.square(y - x @ w)) / s2)
        pri = -0.5 * (d * (_LOG_2PI + math.log(t2)) + jnp.sum(jnp.square(w)) / t2)
        return lik + pri

    return log_joint


def floor_neg_elbo(family_name: str, log_joint, num_samples: int = S,
                   estimator: str = "stl"):
    """Returns ``neg_elbo(params, key)`` written by hand for a vijax family.

    Mean-field: ``z = loc + softplus(raw) * eps``. Full-rank: ``z = loc + L
    eps`` with ``L = diag(softplus(raw)) (I + tril(off_diag, -1))``. ``log q``
    is evaluated at the samples with the parameters (``"reparam"``) or with
    the parameters stopped (``"stl"``, fit's default).
    """
    if estimator not in ("reparam", "stl", "closed_entropy"):
        raise ValueError(
            f"the floor implements 'reparam', 'stl' and 'closed_entropy'; got {estimator!r}"
        )
    stop = jax.lax.stop_gradient if estimator == "stl" else (lambda x: x)

    def neg_elbo(params, key):
        loc = params.loc
        d = loc.shape[0]
        eps = jax.random.normal(key, (num_samples, d), loc.dtype)
        sd = jax.nn.softplus(params.raw_scale)
        if estimator == "closed_entropy":
            # Both families' factors have diagonal sd (the full-rank one is
            # unit triangular times sd), so H[q] = sum log sd + d/2 log(2 pi e).
            if family_name == "mean_field":
                z = loc[None, :] + eps * sd[None, :]
            else:
                unit = jnp.tril(params.off_diag, -1) + jnp.eye(d, dtype=loc.dtype)
                z = loc[None, :] + (eps @ unit.T) * sd[None, :]
            entropy = jnp.sum(jnp.log(sd)) + 0.5 * d * (_LOG_2PI + 1.0)
            return -(jnp.mean(jax.vmap(log_joint)(z)) + entropy)
        if family_name == "mean_field":
            z = loc[None, :] + eps * sd[None, :]
            q_loc, q_sd = stop(loc), stop(sd)
            maha = jnp.sum(jnp.square((z - q_loc[None, :]) / q_sd[None, :]), axis=1)
            logdet = 2.0 * jnp.sum(jnp.log(q_sd))
        else:
            tril = sd[:, None] * (jnp.tril(params.off_diag, -1) + jnp.eye(d, dtype=loc.dtype))
            z = loc[None, :] + eps @ tril.T
            q_loc, q_tril = stop(loc), stop(tril)
            r = jax.scipy.linalg.solve_triangular(q_tril, (z - q_loc[None, :]).T, lower=True)
            maha = jnp.sum(jnp.square(r), axis=0)
            logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(q_tril)))
        log_q = -0.5 * (d * _LOG_2PI + logdet + maha)
        log_p = jax.vmap(log_joint)(z)
        return -jnp.mean(log_p - log_q)

    return neg_elbo


def make_floor(family_name: str, log_joint, optimizer, num_steps: int, num_samples: int = S,
               estimator: str = "stl"):
    """Returns the jitted hand-written loop ``run(params, key) -> (params, neg_elbos)``."""
    loss_and_grad = jax.value_and_grad(
        floor_neg_elbo(family_name, log_joint, num_samples, estimator)
    )

    # Step t's noise comes from fold_in(key, t): the leanest way to give each
    # step its own key (splitting a typed key carried through the scan costs
    # more on CPU than a whole d = 10 step), and the one fit uses.
    @jax.jit
    def run(params, key):
        def body(carry, t):
            params, opt_state = carry
            loss, grads = loss_and_grad(params, jax.random.fold_in(key, t))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(
            body, (params, optimizer.init(params)), jnp.arange(num_steps, dtype=jnp.int32)
        )
        return params, losses

    return run


def _family(name: str):
    return vijax.mean_field() if name == "mean_field" else vijax.full_rank()


def steady_state(
    family_name: str, *, num_steps: int = NUM_STEPS, repeats: int = 7,
    chunk_size: int = 500,
) -> dict:
    """Returns median/min seconds per step for the floor and for fit (two log joints).

    Every variant is compiled and run once first; the timed repeats are
    interleaved so background load hits all variants alike.
    """
    x, y = make_data()
    optimizer = optax.adam(LEARNING_RATE)
    family = _family(family_name)
    hand = hand_log_joint(x, y)
    library = vijax.models.bayesian_linear_regression(
        x, y, noise_scale=1.0, prior_scale=1.0
    ).log_joint
    params = family.init(jnp.zeros(D, jnp.float32))
    key = jax.random.key(0)
    floor = make_floor(family_name, hand, optimizer, num_steps)

    def run_floor():
        jax.block_until_ready(floor(params, key))

    def run_fit(log_joint):
        def run():
            res = vijax.fit(
                key, family, log_joint, params, optimizer=optimizer,
                num_steps=num_steps, num_samples=S, estimator="stl", progress=False,
                chunk_size=chunk_size,
            )
            jax.block_until_ready(res.params)
        return run

    variants = {
        "floor": run_floor,
        "fit_hand_log_joint": run_fit(hand),
        "fit_library_log_joint": run_fit(library),
    }
    times = {name: [] for name in variants}
    for run in variants.values():
        run()
    for _ in range(repeats):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / num_steps)
    out = {
        name: {"median_s_per_step": statistics.median(t), "min_s_per_step": min(t)}
        for name, t in times.items()
    }
    for name in ("fit_hand_log_joint", "fit_library_log_joint"):
        out[name]["ratio_median"] = (
            out[name]["median_s_per_step"] / out["floor"]["median_s_per_step"]
        )
        out[name]["ratio_min"] = out[name]["min_s_per_step"] / out["floor"]["min_s_per_step"]
    return out


# Scripts for the fresh-process end-to-end runs. Each builds the data with the
# same seed, compiles and runs NUM_STEPS steps, and blocks on the result.
_PRELUDE = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np, optax
from benchmarks.fit_speed import make_data, hand_log_joint, make_floor
x, y = make_data()
"""

E2E_SCRIPTS = {
    "fit": _PRELUDE + """
import vijax
family = vijax.mean_field()
res = vijax.fit(jax.random.key(0), family, hand_log_joint(x, y),
                family.init(jnp.zeros(x.shape[1], x.dtype)), optimizer=optax.adam({lr}),
                num_steps={steps}, num_samples=8, estimator="stl", progress=False)
jax.block_until_ready(res.params)
print(time.perf_counter() - t0)
""",
    "fit_library_model": _PRELUDE + """
import vijax
family = vijax.mean_field()
model = vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)
res = vijax.fit(jax.random.key(0), family, model.log_joint, family.init(model.latent),
                optimizer=optax.adam({lr}), num_steps={steps}, num_samples=8,
                estimator="stl", progress=False)
jax.block_until_ready(res.params)
print(time.perf_counter() - t0)
""",
    "floor": _PRELUDE + """
import vijax
family = vijax.mean_field()
params = family.init(jnp.zeros(x.shape[1], x.dtype))
run = make_floor("mean_field", hand_log_joint(x, y), optax.adam({lr}), {steps})
jax.block_until_ready(run(params, jax.random.key(0)))
print(time.perf_counter() - t0)
""",
    "numpyro": _PRELUDE + """
import numpyro, numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

def model(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

svi = SVI(model, AutoNormal(model), numpyro.optim.optax_to_numpyro(optax.adam({lr})),
          Trace_ELBO(num_particles=8, vectorize_particles=True))
res = svi.run(jax.random.key(0), {steps}, x, y, progress_bar=False)
jax.block_until_ready(res.params)
print(time.perf_counter() - t0)
""",
}


def end_to_end(
    *, repeats: int = 3, num_steps: int = NUM_STEPS, cache_dir: str | None = None
) -> dict:
    """Returns wall seconds (process start to result) of fresh-process runs.

    Each variant runs ``repeats`` times, interleaved; the wall time is measured
    around the whole ``python`` process (interpreter start included), and the
    in-process time from the first line is reported too.

    With ``cache_dir``, every process (each contender alike) uses JAX's
    persistent compilation cache in that directory, with no minimum compile
    time, and each script runs once untimed first to fill it: the cost of
    re-running a script, where compilation is read back from disk.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cache_dir is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
    walls = {name: [] for name in E2E_SCRIPTS}
    inner = {name: [] for name in E2E_SCRIPTS}

    def run(code):
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env,
            check=True,
        )

    codes = {
        name: script.format(root=_ROOT, lr=LEARNING_RATE, steps=num_steps)
        for name, script in E2E_SCRIPTS.items()
    }
    if cache_dir is not None:
        for code in codes.values():
            run(code)
    for _ in range(repeats):
        for name, code in codes.items():
            t0 = time.perf_counter()
            out = run(code)
            walls[name].append(time.perf_counter() - t0)
            inner[name].append(float(out.stdout.strip().splitlines()[-1]))
    res = {
        name: {
            "median_wall_s": statistics.median(walls[name]),
            "min_wall_s": min(walls[name]),
            "median_in_process_s": statistics.median(inner[name]),
        }
        for name in E2E_SCRIPTS
    }
    res["fit_over_floor"] = res["fit"]["median_wall_s"] / res["floor"]["median_wall_s"]
    res["fit_library_model_over_floor"] = (
        res["fit_library_model"]["median_wall_s"] / res["floor"]["median_wall_s"]
    )
    res["numpyro_over_fit"] = res["numpyro"]["median_wall_s"] / res["fit"]["median_wall_s"]
    return res


def machine() -> dict:
    """Returns the shared machine description plus optax/numpyro versions and load."""
    m = _machine.describe()
    m["optax"] = optax.__version__
    try:
        import numpyro

        m["numpyro"] = numpyro.__version__
    except ImportError:
        pass
    m["load_average_1_5_15_min"] = list(os.getloadavg())
    return m


def to_markdown(results: dict) -> str:
    """Returns the results as the markdown shown in the README."""
    m = results["machine"]
    lines = [
        "# vijax.fit speed",
        "",
        f"Bayesian linear regression, n = {N}, d = {D}, S = {S}, adam(1e-2), "
        f"{NUM_STEPS} steps, float32.",
        f"Machine: {_machine.one_line(m)}, optax {m['optax']}" + (f", numpyro {m['numpyro']}" if "numpyro" in m else "")
        + f"; load average at start {m['load_average_1_5_15_min'][0]:.1f} (other "
        "processes share the cores, so the minimum is the cleaner estimate).",
        "",
        "Steady state, us per step of a compiled 2000-step run (median / min over "
        "interleaved repeats); ratios are fit / floor:",
        "",
        "| family | floor | fit, hand log joint | ratio | fit, library log joint | ratio |",
        "|---|---|---|---|---|---|",
    ]

    def cell(r):
        return f"{1e6 * r['median_s_per_step']:.1f} / {1e6 * r['min_s_per_step']:.1f}"

    def ratio(r):
        return f"{r['ratio_median']:.3f} / {r['ratio_min']:.3f}"

    for fam, r in results["steady_state"].items():
        hand, lib = r["fit_hand_log_joint"], r["fit_library_log_joint"]
        lines.append(
            f"| {fam} | {cell(r['floor'])} | {cell(hand)} | {ratio(hand)} "
            f"| {cell(lib)} | {ratio(lib)} |"
        )
    lines += [
        "",
        f"End to end, fresh process, {NUM_STEPS} steps, mean-field (median wall seconds "
        "including interpreter start, import, build, compile, run). *Cold*: nothing "
        "cached, every process compiles. *Warm cache*: every contender alike runs with "
        "JAX's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`, "
        "`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`) filled by an earlier run, as "
        "when re-running a script:",
        "",
        "| compilation | floor | vijax.fit | fit, library model | NumPyro SVI.run "
        "| fit / floor | fit, library model / floor | NumPyro / fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, key in (("cold", "end_to_end"), ("warm cache", "end_to_end_warm_cache")):
        e = results.get(key)
        if e is None:
            continue
        lines.append(
            f"| {label} | {e['floor']['median_wall_s']:.2f} | {e['fit']['median_wall_s']:.2f} "
            f"| {e['fit_library_model']['median_wall_s']:.2f} "
            f"| {e['numpyro']['median_wall_s']:.2f} | {e['fit_over_floor']:.3f} "
            f"| {e['fit_library_model_over_floor']:.3f} | {e['numpyro_over_fit']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Runs the benchmark, prints the markdown table and writes the results files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    results = {
        "machine": machine(),
        "config": {"n": N, "d": D, "num_samples": S, "num_steps": NUM_STEPS,
                   "optimizer": f"adam({LEARNING_RATE})", "dtype": "float32"},
        "steady_state": {
            fam: steady_state(fam, repeats=args.repeats)
            for fam in ("mean_field", "full_rank")
        },
        "end_to_end": end_to_end(repeats=args.e2e_repeats),
    }
    with tempfile.TemporaryDirectory() as cache_dir:
        results["end_to_end_warm_cache"] = end_to_end(
            repeats=args.e2e_repeats, cache_dir=cache_dir
        )
    md = to_markdown(results)
    print(md)
    if not args.no_write:
        _machine.write_results(args.out, "fit_speed", results, md)
    return results


if __name__ == "__main__":
    main()
