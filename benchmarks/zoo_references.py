"""Long-NUTS posterior references for the model zoo (``vijax.models`` zoo, issue #15).

For each zoo model, NUTS (NumPyro, float64, 4 chains, fixed seeds) on its
independent NumPyro twin (``benchmarks/_zoo_numpyro.py``) with the vijax
model's default data. Writes ``<out>/<name>.json`` per model: for
every latent element on the natural (constrained) space and every derived
quantity, the mean, sd, 5/50/95% quantiles, the Monte Carlo standard error of
the mean, the bulk ESS and the rank-normalised split R-hat (ArviZ; Vehtari et
al. 2021), plus the settings, seed, divergences, wall time, library versions
and the machine; then ``<out>/README.md``, a table over every JSON file there.

Two models are not sampled as written:

* ``eight_schools_centered`` is sampled through the non-centred twin: the
  same posterior over ``(mu, tau, theta)``, without the funnel that gives the
  centred form divergences (and biased draws).
* ``neals_funnel`` stores the exact moments (``v ~ N(0, 9)``; ``x_i`` has mean
  0, sd ``exp(9/4)`` and quantiles from a 1-d quadrature), since NUTS on the
  centred funnel is itself biased; a non-centred NUTS run is stored beside
  them as a check.

Run: ``python -m benchmarks.zoo_references [--models NAME ...] [--quick] [--out DIR]``
(the full run took 17 minutes on 2 busy cores, item_response 8 of them;
``--quick`` is a short run into a temporary folder, for sizing and smoke tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np
import numpyro

from benchmarks import _machine
from benchmarks import _zoo_numpyro as twins
from vijax.models import _zoo

OUT = os.path.join(os.path.dirname(__file__), "results", "references")
NUM_CHAINS = 4
QUANTILES = (0.05, 0.5, 0.95)
STATS = ("mean", "sd", "q05", "q50", "q95", "mcse_mean", "ess_bulk", "r_hat")

# name -> the twin sampled, warmup and draws per chain, target acceptance,
# max tree depth, seed (and the chain method, vectorized unless said). Draw
# counts were sized with --quick so the whole run fits in about half an hour
# on 2 shared cores. item_response (d = 501, 40 000 answers) is the costly one:
# its gradient dominates, so its chains run one after the other (each at its
# own tree depth) rather than in lockstep at the deepest chain's.
SETTINGS = {
    "eight_schools_centered": dict(
        sampled="eight_schools_noncentered", num_warmup=2000, num_samples=10000,
        target_accept_prob=0.95, max_tree_depth=10, seed=102),
    "eight_schools_noncentered": dict(
        sampled="eight_schools_noncentered", num_warmup=2000, num_samples=10000,
        target_accept_prob=0.95, max_tree_depth=10, seed=102),
    "hierarchical_logistic": dict(
        sampled="hierarchical_logistic", num_warmup=2000, num_samples=5000,
        target_accept_prob=0.95, max_tree_depth=10, seed=103),
    "stochastic_volatility": dict(  # 17 divergences in 20 000 draws at 0.95
        sampled="stochastic_volatility", num_warmup=2000, num_samples=5000,
        target_accept_prob=0.99, max_tree_depth=10, seed=104),
    "neals_funnel": dict(
        sampled="neals_funnel_noncentered", num_warmup=2000, num_samples=10000,
        target_accept_prob=0.9, max_tree_depth=10, seed=105),
    "poisson_glm": dict(
        sampled="poisson_glm", num_warmup=2000, num_samples=10000,
        target_accept_prob=0.9, max_tree_depth=10, seed=106),
    "item_response": dict(
        sampled="item_response", num_warmup=1500, num_samples=2500,
        target_accept_prob=0.9, max_tree_depth=10, seed=107, chain_method="sequential"),
    "log_gaussian_cox": dict(
        sampled="log_gaussian_cox", num_warmup=2000, num_samples=5000,
        target_accept_prob=0.95, max_tree_depth=10, seed=108),
}
QUICK = dict(num_warmup=300, num_samples=300)

NOTES = {
    "eight_schools_centered": (
        "Sampled through the non-centred twin: the same posterior over (mu, tau, "
        "theta), in the same run as eight_schools_noncentered; NUTS on the centred form "
        "diverges in the funnel between tau and theta."),
    "stochastic_volatility": (
        "At target_accept_prob 0.95 there were 17 divergences in 20 000 draws, at 0.99 "
        "there are 7 (0.035%), all at phi > 0.92 with mu far out: as phi -> 1 the "
        "stationary scale sigma / sqrt(1 - phi^2) of h_1 makes a funnel between phi and "
        "mu. Between the two runs the means of mu, phi and sigma moved by at most 2 "
        "combined MCSE, but the sd of mu (tail-sensitive) by 8% (0.280 -> 0.304): treat "
        "the far tails of mu and phi as approximate."),
    "neals_funnel": (
        "Exact: v ~ N(0, 9); x_i has mean 0 and sd exp(9/4) (Var = E[exp(v)] = exp(9/2)); "
        "the quantiles of x_i solve P(x_i <= q) = E[Phi(q exp(-v/2))] by quadrature. "
        "`check` is NUTS on the non-centred twin (x = exp(v/2) x_std)."),
}


def _twin(sampled: str) -> twins.Twin:
    if sampled == "neals_funnel_noncentered":
        return twins.NEALS_FUNNEL_NONCENTERED
    return twins.TWINS[sampled]


def _tolist(x: np.ndarray):
    x = np.asarray(x, dtype=np.float64)
    return x.item() if x.ndim == 0 else x.tolist()


def _site_stats(draws: np.ndarray) -> dict:
    """``draws`` (chains, draws, *shape) -> the statistics, each with the site's shape."""
    import arviz as az

    chains, n = draws.shape[:2]
    pooled = draws.reshape((chains * n,) + draws.shape[2:])
    q = np.quantile(pooled, QUANTILES, axis=0)
    ds = az.convert_to_dataset({"s": draws})
    return {
        "mean": _tolist(pooled.mean(axis=0)),
        "sd": _tolist(pooled.std(axis=0, ddof=1)),
        "q05": _tolist(q[0]),
        "q50": _tolist(q[1]),
        "q95": _tolist(q[2]),
        "mcse_mean": _tolist(az.mcse(ds, method="mean")["s"].to_numpy()),
        "ess_bulk": _tolist(az.ess(ds, method="bulk")["s"].to_numpy()),
        "r_hat": _tolist(az.rhat(ds, method="rank")["s"].to_numpy()),
    }


def run_nuts(sampled: str, data: dict, sites: tuple, *, num_warmup: int, num_samples: int,
             target_accept_prob: float, max_tree_depth: int, seed: int,
             chain_method: str = "vectorized") -> dict:
    """NUTS on a twin: the statistics of ``sites``, its settings and diagnostics."""
    from numpyro.infer import MCMC, NUTS

    twin = _twin(sampled)
    kernel = NUTS(twin.model, target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth)
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=NUM_CHAINS,
                chain_method=chain_method, progress_bar=False)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), **twin.kwargs(data),
             extra_fields=("diverging", "num_steps"))
    samples = jax.tree_util.tree_map(np.asarray, mcmc.get_samples(group_by_chain=True))
    wall = time.perf_counter() - start
    extra = mcmc.get_extra_fields(group_by_chain=True)
    stats = {site: {"shape": list(samples[site].shape[2:]), **_site_stats(samples[site])}
             for site in sites}
    return {
        "statistics": stats,
        "diagnostics": {
            "divergences": int(np.sum(extra["diverging"])),
            "divergences_per_chain": np.sum(extra["diverging"], axis=1).astype(int).tolist(),
            "mean_leapfrog_steps": float(np.mean(extra["num_steps"])),
            "wall_time_s": round(wall, 1),
        },
        "settings": {
            "sampled_model": sampled, "sampler": "numpyro.infer.NUTS (diagonal mass matrix)",
            "num_chains": NUM_CHAINS, "chain_method": chain_method, "num_warmup": num_warmup,
            "num_samples": num_samples, "target_accept_prob": target_accept_prob,
            "max_tree_depth": max_tree_depth, "seed": seed,
            "rng_key": f"jax.random.PRNGKey({seed})", "dtype": "float64",
        },
    }


def funnel_exact(dim: int) -> dict:
    """The exact posterior statistics of Neal's funnel: ``v ~ N(0, 9)``, ``x_i | v ~ N(0, e^v)``."""
    from scipy import integrate, optimize, special, stats

    def cdf_x(q):
        # P(x <= q) = E_s[Phi(q exp(-3 s / 2))], s ~ N(0, 1).
        # |s| > 12 carries less than 1e-32 of the mass.
        def f(s):
            return special.ndtr(q * np.exp(-1.5 * s)) * stats.norm.pdf(s)
        return integrate.quad(f, -12.0, 12.0, epsabs=1e-14, epsrel=1e-13, limit=500)[0]

    q95 = optimize.brentq(lambda q: cdf_x(q) - 0.95, 0.0, 1e3, xtol=1e-12)
    v = {"mean": 0.0, "sd": 3.0, "q05": 3.0 * stats.norm.ppf(0.05), "q50": 0.0,
         "q95": 3.0 * stats.norm.ppf(0.95)}
    x = {"mean": 0.0, "sd": math.exp(9.0 / 4.0), "q05": -q95, "q50": 0.0, "q95": q95}
    exact = {"mcse_mean": 0.0, "ess_bulk": None, "r_hat": None}
    n = dim - 1
    return {
        "v": {"shape": [], **v, **exact},
        "x": {"shape": [n], **{k: [val] * n for k, val in x.items()},
              **{k: [val] * n for k, val in exact.items()}},
    }


def _versions() -> dict:
    import arviz
    import jaxlib
    import scipy

    return {"numpyro": numpyro.__version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "arviz": arviz.__version__,
            "python": sys.version.split()[0]}


def reference(name: str, *, quick: bool = False, runs: dict | None = None) -> dict:
    """The reference record of the zoo model ``name``.

    ``runs`` caches NUTS runs by twin and settings: two models with the same
    posterior and settings (the eight schools pair) share one run.
    """
    settings = dict(SETTINGS[name])
    if quick:
        settings.update(QUICK)
    sampled = settings.pop("sampled")
    data = twins.default_data(name)
    twin = twins.TWINS[name]
    sites = twin.latent + twin.deterministic
    record = {
        "model": name,
        "kind": "exact" if name == "neals_funnel" else "nuts",
        "note": NOTES.get(name, ""),
        "latent": list(twin.latent),
        "deterministic": list(twin.deterministic),
        "data": {"source": "vijax.models._zoo defaults (seed 0)",
                 "sha256": _zoo.data_sha256(data)},
    }
    key = (sampled, tuple(sorted(settings.items())))
    runs = {} if runs is None else runs
    if key not in runs:
        every = twins.TWINS.get(sampled, twins.NEALS_FUNNEL_NONCENTERED)
        runs[key] = run_nuts(sampled, data, every.latent + every.deterministic, **settings)
    run = runs[key]
    stats = {site: run["statistics"][site] for site in sites}
    r_hats = np.concatenate([np.ravel(s["r_hat"]) for s in stats.values()])
    esss = np.concatenate([np.ravel(s["ess_bulk"]) for s in stats.values()])
    summary = {"max_r_hat": float(np.max(r_hats)), "min_ess_bulk": float(np.min(esss)),
               **run["diagnostics"]}
    if name == "neals_funnel":
        exact = funnel_exact(int(data["dim"]))
        record["statistics"] = exact
        record["check"] = {
            "statistics": stats,
            "max_abs_mean_error_in_mcse": {
                k: float(np.max(np.abs(np.asarray(v["mean"]) / np.asarray(v["mcse_mean"]))))
                for k, v in stats.items()},
            "sd_ratio_nuts_over_exact": {
                k: _tolist(np.asarray(stats[k]["sd"]) / np.asarray(exact[k]["sd"]))
                for k in stats},
        }
    else:
        record["statistics"] = stats
    record["summary"] = summary
    record["settings"] = run["settings"]
    record["quick"] = quick
    record["versions"] = _versions()
    record["machine"] = _machine.describe()
    return record


def _num_latent(record: dict) -> int:
    if record["model"] == "neals_funnel":
        return 1 + record["statistics"]["x"]["shape"][0]
    # Natural and unconstrained sizes agree for every zoo model.
    return sum(math.prod(record["statistics"][k]["shape"]) for k in record["latent"])


def readme(out: str) -> str:
    rows, notes = [], []
    for fname in sorted(os.listdir(out)):
        if not fname.endswith(".json"):
            continue
        with open(os.path.join(out, fname)) as f:
            r = json.load(f)
        s, st = r["summary"], r["settings"]
        if r.get("note"):
            notes.append(f"- `{r['model']}`: {r['note']}")
        if r["kind"] == "exact":
            ref = f"exact; diagnostics of a NUTS check on {st['sampled_model']}"
        else:
            ref = "NUTS"
            if st["sampled_model"] != r["model"]:
                ref += f" on {st['sampled_model']}"
        rows.append(
            f"| {r['model']} | {_num_latent(r)} | {ref} | {st['num_chains']} x "
            f"{st['num_samples']} ({st['num_warmup']}) | {st['target_accept_prob']} | "
            f"{s['max_r_hat']:.4f} | {s['min_ess_bulk']:.0f} | {s['divergences']} | "
            f"{s['mean_leapfrog_steps']:.1f} | {s['wall_time_s']:.0f} |")
    machine = None
    for fname in sorted(os.listdir(out)):
        if fname.endswith(".json"):
            with open(os.path.join(out, fname)) as f:
                machine = _machine.one_line(json.load(f)["machine"])
            break
    return "\n".join([
        "# Zoo references",
        "",
        "Posterior references for the zoo models in `vijax/models/_zoo.py`, written by",
        "`python -m benchmarks.zoo_references` (do not edit by hand). NUTS runs on the",
        "independent NumPyro twins in `benchmarks/_zoo_numpyro.py`, float64, with the vijax",
        "models' default data; each `<model>.json` holds, for every latent element on the",
        "natural space and every derived quantity, the mean, sd, 5/50/95% quantiles, MCSE of",
        "the mean, bulk ESS and rank-normalised split R-hat (ArviZ), plus the settings,",
        "seed, versions and machine. R-hat and ESS below are the worst over all elements,",
        "derived quantities included. `neals_funnel` is exact; its row reports the",
        "non-centred NUTS run stored beside the exact moments as a check.",
        "`eight_schools_centered` is sampled through the non-centred twin (the same",
        "posterior over mu, tau, theta), in the same run as `eight_schools_noncentered`.",
        "",
        f"Machine: {machine}.",
        "",
        "| model | d | reference | chains x draws (warmup) | target accept | max R-hat | "
        "min bulk ESS | divergences | mean leapfrog steps | wall time (s) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "## Notes",
        "",
        *notes,
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['num_warmup']} warmup + {QUICK['num_samples']} draws per "
                             "chain, into a temporary folder unless --out is given")
    parser.add_argument("--out", default=None, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    numpyro.enable_x64()  # here, not at import: importing this module changes nothing
    out = args.out or (os.path.join(tempfile.gettempdir(), "vijax_zoo_references_quick")
                       if args.quick else OUT)
    os.makedirs(out, exist_ok=True)
    runs = {}
    for name in args.models:
        record = reference(name, quick=args.quick, runs=runs)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(record, f, indent=1)
        s = record["summary"]
        print(f"{name}: max R-hat {s['max_r_hat']:.4f}, min bulk ESS {s['min_ess_bulk']:.0f}, "
              f"{s['divergences']} divergences, {s['wall_time_s']:.0f} s", flush=True)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(readme(out))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
