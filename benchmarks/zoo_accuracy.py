"""Posterior accuracy on the model zoo at equal gradient evaluations: vijax against NumPyro and Blackjax.

Issue #15's accuracy table. For every zoo model (``vijax/models/_zoo.py``)
with a reference in ``benchmarks/results/references/<name>.json`` (long NUTS
on the NumPyro twin; exact moments for Neal's funnel), each method fits a
Gaussian q on the unconstrained space with the same budget of gradient
evaluations of log p, and q's moments on the natural space are compared with
the reference's, element by element (every latent element and every derived
quantity the reference stores, e.g. ``theta`` of the non-centred eight
schools, ``h`` of the stochastic volatility model, ``f`` of the LGCP):

* mean error: ``|E_q[x] - ref mean| / ref sd``, the max and the median over
  the elements (with the element where the max falls);
* sd ratio: ``sd_q[x] / ref sd``, its min, median and max.

Methods (``METHODS``):

* ``vijax MF Adam``, ``vijax FR Adam``: ``vijax.fit`` with
  ``vijax.mean_field()`` / ``vijax.full_rank()``, ``optax.adam(LR)``,
  S = ``NUM_SAMPLES`` draws per step, the default estimator
  (``adaptive_stl``).
* ``vijax FR natgrad``: ``vijax.fit`` with ``vijax.full_rank()`` and
  ``vijax.natural_gradient(family, 0.3 / (1 + t / 50),
  max_variance_growth=2)``, the ``stl`` estimator, S = ``NUM_SAMPLES``
  (the settings its docstring recommends for S much smaller than d).
* ``vijax BaM``: ``vijax.batch_and_match`` with batch B = max(d,
  ``MIN_BATCH``) and its default learning rate; B evaluations per step, so
  it runs ``budget // B`` steps. A :class:`vijax.FitError` is reported as a
  failure with its step, not hidden.
* ``NumPyro AutoNormal``, ``NumPyro AutoMVN``: ``numpyro.infer.SVI`` on the
  NumPyro twin (``benchmarks/_zoo_numpyro.py``) with ``AutoNormal`` /
  ``AutoMultivariateNormal``, ``optax_to_numpyro(optax.adam(LR))``,
  ``Trace_ELBO(num_particles=S, vectorize_particles=True)`` (the
  reparameterization gradient, NumPyro's only one), ``svi.init`` and
  ``svi.update`` in one jitted ``lax.scan`` (``SVI.run``'s loop); moments
  from ``Predictive(model, guide=guide, params=...)`` draws of the latent
  and deterministic sites.
* ``Blackjax meanfield_vi``, ``Blackjax fullrank_vi``: Blackjax 1.x on
  vijax's ``model.log_joint`` of the flattened latent (``ravel_pytree``),
  ``optax.adam(LR)``, ``num_samples=S``, its default ``stl_estimator=True``,
  the step scanned in one jitted ``lax.scan``; draws from its ``sample``
  mapped through ``model.constrain``.

Common protocol: float32 throughout (the zoo's default data dtype; x64 is not
enabled); every method starts from the same q: mean = the unconstrained
``model.latent`` (zeros for every zoo model: the natural values 0 and 1),
scale 0.1 on every coordinate, no correlation (vijax's default ``init``;
NumPyro's guides get ``init_to_value`` at the natural latent and
``init_scale=0.1``; Blackjax's initial log scale is set to log 0.1). One
learning rate ``LR`` for every Adam method (no sweep), one S. A budget of
``BUDGET`` gradient evaluations of log p: Adam and natural-gradient methods
run ``BUDGET // S`` steps, BaM ``BUDGET // B``. Every fit runs once per
seed in ``SEEDS`` (vijax: ``jax.random.key(seed)``; NumPyro:
``PRNGKey(seed)``; Blackjax: ``jax.random.split(key(seed), steps)``), since
the last iterate of a stochastic optimizer moves from seed to seed; moments
from ``NUM_DRAWS`` draws of q with the key ``DRAW_SEED`` (vijax through
``vijax.summary``). A method whose parameters end non-finite (NumPyro and
Blackjax have no NaN guard) is reported as failed with its first
non-finite step; a finite q more than ``FAR_OFF`` reference sds off (or
with an sd ratio above it) is flagged "far off". Wall time (secondary) is
one call of the fit, compilation included, on a shared machine; it
excludes drawing the moments.

The report (``.md``) opens with the comparisons: for mean-field Adam
(vijax against ``AutoNormal`` and ``meanfield_vi``), full-rank Adam (against
``AutoMVN`` and ``fullrank_vi``) and the best of each side (vijax's four
methods against the four peers), the worst max mean error over the seeds,
a fit that failed or ended far off on any seed left out; a difference within
a factor ``TIE`` is a tie. Then the failures, a table of those worst values
and the table of every fit (one value per seed in each cell).

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.zoo_accuracy [--models a,b] [--seeds 0,1]
[--quick] [--out DIR] [--refs DIR]``. Models without a reference file are
skipped and listed as missing (``--quick`` fits them anyway, without error
columns). The full run writes ``benchmarks/results/cpu/zoo_accuracy.{md,json}``
(about 20 minutes on 2 shared cores, two seeds); ``--quick`` (a 1,600-evaluation budget,
the Poisson GLM only) writes
``zoo_accuracy_quick.{md,json}``, a smoke test only (one seed; about a
minute on an idle 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import vijax
from benchmarks import _machine
from vijax.models import _zoo

OUT = os.path.join(os.path.dirname(__file__), "results", "cpu")
REFS = os.path.join(os.path.dirname(__file__), "results", "references")

BUDGET = 20_000  # gradient evaluations of log p per fit
NUM_SAMPLES = 8  # S: draws per step of every ELBO method
LR = 1e-2  # Adam, every Adam method
MIN_BATCH = 16  # BaM batch B = max(d, MIN_BATCH)
NUM_DRAWS = 4000  # draws of q behind its moments
SEEDS = (0, 1)  # fit seeds; every model x method runs once per seed
DRAW_SEED = 1000  # the draws of q behind its moments
NG_GROWTH = 2.0
NG_SCHEDULE = ("0.3/(1+t/50)", lambda t: 0.3 / (1.0 + t / 50.0))

QUICK_BUDGET = 1_600
QUICK_MODELS = ("poisson_glm",)  # one model: the smoke test compiles every method once
QUICK_SEEDS = (0,)
FAR_OFF = 10.0  # a finite q with a max mean err or sd ratio above this is flagged
TIE = 1.5  # max mean errors within this factor of each other count as a tie

METHODS = (
    "vijax MF Adam",
    "vijax FR Adam",
    "vijax FR natgrad",
    "vijax BaM",
    "NumPyro AutoNormal",
    "NumPyro AutoMVN",
    "Blackjax meanfield_vi",
    "Blackjax fullrank_vi",
)


def installed_methods() -> list:
    """``METHODS`` whose peer library is importable (NumPyro and Blackjax are extras)."""
    import importlib.util

    def has(lib: str) -> bool:
        return importlib.util.find_spec(lib) is not None

    return [m for m in METHODS
            if not (m.startswith("NumPyro") and not has("numpyro"))
            and not (m.startswith("Blackjax") and not has("blackjax"))]


class Fitted(NamedTuple):
    """What one method returns: element names with q's mean and sd, and how the fit went."""

    names: tuple
    mean: np.ndarray
    sd: np.ndarray
    steps: int
    evals: int
    wall_s: float
    status: str  # "ok" or "failed (...)"


# ---------------------------------------------------------------- models
def build_model(name: str):
    """The zoo model ``name`` (``model.name``) with its default data."""
    if name == "eight_schools_centered":
        return _zoo.eight_schools(centered=True)
    if name == "eight_schools_noncentered":
        return _zoo.eight_schools(centered=False)
    return getattr(_zoo, name)()


def dimension(model) -> int:
    return int(ravel_pytree(model.latent)[0].shape[0])


def element_names(name: str, shape: tuple) -> list:
    """Row labels as ``vijax.summary`` writes them: ``tau``, ``theta[3]``, ``f[1,2]``."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i) for i in idx)}]" for idx in np.ndindex(*shape)]


def moments_of_draws(draws: dict) -> tuple:
    """``{site: (n, *shape)}`` -> (names, mean, sd) per element (sd with ddof=1)."""
    names, means, sds = [], [], []
    for site, x in draws.items():
        x = np.asarray(x, np.float64)
        names += element_names(site, x.shape[1:])
        flat = x.reshape(x.shape[0], -1)
        means.append(flat.mean(axis=0))
        sds.append(flat.std(axis=0, ddof=1))
    return tuple(names), np.concatenate(means), np.concatenate(sds)


def first_nonfinite(values) -> Optional[int]:
    bad = np.flatnonzero(~np.isfinite(np.asarray(values)))
    return int(bad[0]) if bad.size else None


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------- vijax
def _vijax_moments(params, family, model) -> tuple:
    s = vijax.summary(jax.random.key(DRAW_SEED), params, family, model, num_samples=NUM_DRAWS)
    return s.names, np.asarray(s.stats["mean"]), np.asarray(s.stats["sd"])


def _fit_vijax(model, family, optimizer, *, steps, seed, estimator=None) -> Fitted:
    kwargs = dict(optimizer=optimizer, num_steps=steps, num_samples=NUM_SAMPLES, progress=False)
    if estimator is not None:
        kwargs["estimator"] = estimator
    t0 = time.perf_counter()
    try:
        result = vijax.fit(jax.random.key(seed), family, model.log_joint,
                           family.init(model.latent), **kwargs)
        jax.block_until_ready(result.params)
    except vijax.FitError as e:
        return _failed(f"failed (FitError at step {e.step})", steps, NUM_SAMPLES,
                       time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return Fitted(*_vijax_moments(result.params, family, model), steps, steps * NUM_SAMPLES,
                  wall, "ok")


def _failed(status, steps, per_step, wall) -> Fitted:
    return Fitted((), np.zeros(0), np.zeros(0), steps, steps * per_step, wall, status)


def vijax_mean_field(model, budget, seed) -> Fitted:
    return _fit_vijax(model, vijax.mean_field(), optax.adam(LR), steps=budget // NUM_SAMPLES,
                      seed=seed)


def vijax_full_rank(model, budget, seed) -> Fitted:
    return _fit_vijax(model, vijax.full_rank(), optax.adam(LR), steps=budget // NUM_SAMPLES,
                      seed=seed)


def vijax_natural_gradient(model, budget, seed) -> Fitted:
    family = vijax.full_rank()
    opt = vijax.natural_gradient(family, NG_SCHEDULE[1], max_variance_growth=NG_GROWTH)
    return _fit_vijax(model, family, opt, steps=budget // NUM_SAMPLES, seed=seed,
                      estimator="stl")


def bam_batch(d: int) -> int:
    return max(d, MIN_BATCH)


def vijax_bam(model, budget, seed) -> Fitted:
    family = vijax.full_rank()
    batch = bam_batch(dimension(model))
    steps = max(budget // batch, 1)
    # A fresh closure, so that every seed's wall time includes compiling, as
    # for the other methods (batch_and_match caches its compiled loop per
    # log_joint object).
    def log_joint(z):
        return model.log_joint(z)

    t0 = time.perf_counter()
    try:
        result = vijax.batch_and_match(jax.random.key(seed), log_joint,
                                       family.init(model.latent), num_steps=steps,
                                       batch_size=batch, progress=False)
        jax.block_until_ready(result.params)
    except vijax.FitError as e:
        return _failed(f"failed (FitError at step {e.step})", steps, batch,
                       time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return Fitted(*_vijax_moments(result.params, family, model), steps, steps * batch, wall, "ok")


# ---------------------------------------------------------------- NumPyro
def _numpyro(model, budget, seed, full_rank: bool) -> Fitted:
    import numpyro
    from numpyro.infer import SVI, Predictive, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
    from numpyro.infer.initialization import init_to_value

    from benchmarks import _zoo_numpyro as twins

    twin = twins.TWINS[model.name]
    kwargs = twin.kwargs(twins.default_data(model.name))
    natural = model.constrain(model.latent)
    init = {site: natural[site] for site in twin.latent}
    guide_cls = AutoMultivariateNormal if full_rank else AutoNormal
    guide = guide_cls(twin.model, init_loc_fn=init_to_value(values=init), init_scale=0.1)
    svi = SVI(twin.model, guide, numpyro.optim.optax_to_numpyro(optax.adam(LR)),
              Trace_ELBO(num_particles=NUM_SAMPLES, vectorize_particles=True))
    steps = budget // NUM_SAMPLES

    # SVI.run's loop with its init inside the same jit: run eagerly, init
    # dispatches the model's ops one by one, which costs more than the fit on
    # the small models. A fresh closure per call, so the trace (which sets
    # svi's transforms) runs for this svi.
    def run(key):
        state = svi.init(key, **kwargs)
        return jax.lax.scan(lambda s, _: svi.update(s, **kwargs), state, None, length=steps)

    t0 = time.perf_counter()
    state, losses = jax.jit(run)(jax.random.PRNGKey(seed))
    params = svi.get_params(state)
    jax.block_until_ready(params)
    wall = time.perf_counter() - t0
    bad = first_nonfinite(losses)
    if bad is not None or not _all_finite(params):
        return _failed(f"failed (non-finite loss at step {bad})", steps, NUM_SAMPLES, wall)
    sites = list(twin.latent) + list(twin.deterministic)
    draws = Predictive(twin.model, guide=guide, params=params, num_samples=NUM_DRAWS,
                       return_sites=sites)(jax.random.PRNGKey(DRAW_SEED), **kwargs)
    return Fitted(*moments_of_draws({s: draws[s] for s in sites}), steps,
                  steps * NUM_SAMPLES, wall, "ok")


def numpyro_auto_normal(model, budget, seed) -> Fitted:
    return _numpyro(model, budget, seed, full_rank=False)


def numpyro_auto_mvn(model, budget, seed) -> Fitted:
    return _numpyro(model, budget, seed, full_rank=True)


# ---------------------------------------------------------------- Blackjax
def _blackjax(model, budget, seed, full_rank: bool) -> Fitted:
    import blackjax

    flat0, unravel = ravel_pytree(model.latent)
    d = flat0.shape[0]

    def logdensity(x):
        return model.log_joint(unravel(x))

    factory = blackjax.fullrank_vi if full_rank else blackjax.meanfield_vi
    algo = factory(logdensity, optax.adam(LR), num_samples=NUM_SAMPLES)
    state = algo.init(flat0)
    # The common start: mean = the unconstrained latent, every scale 0.1.
    if full_rank:
        state = state._replace(mu=flat0,
                               chol_params=state.chol_params.at[:d].set(math.log(0.1)))
    else:
        state = state._replace(mu=flat0, rho=jnp.full((d,), math.log(0.1), flat0.dtype))
    steps = budget // NUM_SAMPLES

    @jax.jit
    def run(state, key):
        def step(s, k):
            s, info = algo.step(k, s)
            return s, info.elbo
        return jax.lax.scan(step, state, jax.random.split(key, steps))

    t0 = time.perf_counter()
    state, elbos = run(state, jax.random.key(seed))
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    bad = first_nonfinite(elbos)
    if bad is not None or not _all_finite((state.mu,)):
        return _failed(f"failed (non-finite ELBO at step {bad})", steps, NUM_SAMPLES, wall)
    flat = algo.sample(jax.random.key(DRAW_SEED), state, NUM_DRAWS)
    draws = jax.vmap(lambda x: model.constrain(unravel(x)))(flat)
    return Fitted(*moments_of_draws(draws), steps, steps * NUM_SAMPLES, wall, "ok")


def blackjax_meanfield(model, budget, seed) -> Fitted:
    return _blackjax(model, budget, seed, full_rank=False)


def blackjax_fullrank(model, budget, seed) -> Fitted:
    return _blackjax(model, budget, seed, full_rank=True)


RUNNERS: dict = {
    "vijax MF Adam": vijax_mean_field,
    "vijax FR Adam": vijax_full_rank,
    "vijax FR natgrad": vijax_natural_gradient,
    "vijax BaM": vijax_bam,
    "NumPyro AutoNormal": numpyro_auto_normal,
    "NumPyro AutoMVN": numpyro_auto_mvn,
    "Blackjax meanfield_vi": blackjax_meanfield,
    "Blackjax fullrank_vi": blackjax_fullrank,
}


# ---------------------------------------------------------------- scoring
def load_reference(refs: str, name: str) -> Optional[dict]:
    path = os.path.join(refs, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def reference_moments(record: dict) -> tuple:
    """(names, mean, sd) per element of the reference, latent then deterministic sites."""
    names, means, sds = [], [], []
    sites = list(record.get("latent", [])) + list(record.get("deterministic", []))
    sites += [s for s in record["statistics"] if s not in sites]
    for site in sites:
        st = record["statistics"][site]
        shape = tuple(st["shape"])
        names += element_names(site, shape)
        means.append(np.asarray(st["mean"], np.float64).reshape(-1))
        sds.append(np.asarray(st["sd"], np.float64).reshape(-1))
    return tuple(names), np.concatenate(means), np.concatenate(sds)


def score(fitted: Fitted, reference: tuple) -> dict:
    """Mean error in reference sds and the sd ratio, over the reference's elements."""
    ref_names, ref_mean, ref_sd = reference
    index = {n: i for i, n in enumerate(fitted.names)}
    missing = [n for n in ref_names if n not in index]
    if missing:
        raise KeyError(f"q has no element {missing[0]!r} of the reference "
                       f"(q has {list(fitted.names)[:5]}...)")
    take = np.array([index[n] for n in ref_names])
    err = np.abs(fitted.mean[take] - ref_mean) / ref_sd
    ratio = fitted.sd[take] / ref_sd
    worst = int(np.argmax(err))
    return {
        "num_elements": len(ref_names),
        "max_mean_err": float(err[worst]),
        "median_mean_err": float(np.median(err)),
        "worst_element": ref_names[worst],
        "sd_ratio_min": float(np.min(ratio)),
        "sd_ratio_median": float(np.median(ratio)),
        "sd_ratio_max": float(np.max(ratio)),
    }


# ---------------------------------------------------------------- aggregate
METRICS = ("max_mean_err", "median_mean_err", "sd_ratio_min", "sd_ratio_median",
           "sd_ratio_max")


def far_off(run: dict) -> bool:
    """A finite fit whose q is more than ``FAR_OFF`` reference sds (or sd ratios) off."""
    return run.get("max_mean_err") is not None and (
        run["max_mean_err"] > FAR_OFF or run["sd_ratio_max"] > FAR_OFF)


def aggregate(runs: list) -> dict:
    """Over the seeds: each metric's worst value (largest error, ratio farthest from 1).

    ``failed`` counts the seeds whose fit failed, ``far_off`` those that ended
    finite but far off; the worst values are over the other seeds.
    """
    good = [r for r in runs if r["status"] == "ok" and r.get("max_mean_err") is not None]
    out = {"seeds": len(runs), "failed": sum(r["status"] != "ok" for r in runs),
           "far_off": sum(far_off(r) for r in runs)}
    if good:
        out["max_mean_err"] = max(r["max_mean_err"] for r in good)
        out["median_mean_err"] = max(r["median_mean_err"] for r in good)
        out["sd_ratio_min"] = min(r["sd_ratio_min"] for r in good)
        out["sd_ratio_max"] = max(r["sd_ratio_max"] for r in good)
    return out


# ---------------------------------------------------------------- report
def _f(x, digits=2) -> str:
    if x is None:
        return "—"
    if not np.isfinite(x):
        return str(x)
    if abs(x) >= 100:
        return f"{x:.3g}" if abs(x) < 1e3 else f"{x:.1e}"
    return f"{x:.{digits}f}"


def _seeds(runs: list, key: str, digits=2) -> str:
    return " / ".join(_f(r.get(key), digits) for r in runs)


def _status(runs: list) -> str:
    each = []
    for r in runs:
        st = r["status"]
        if st == "ok" and far_off(r):
            st = f"ok but far off (> {FAR_OFF:g})"
        each.append(st)
    if len(set(each)) == 1:
        return each[0]
    return "; ".join(f"seed {r['seed']}: {st}" for r, st in zip(runs, each))


def _score_of(agg: dict) -> Optional[float]:
    """The number a comparison uses: the worst max mean err, None if any seed failed or is far off."""
    if agg["failed"] or agg["far_off"] or "max_mean_err" not in agg:
        return None
    return agg["max_mean_err"]


def _cell(agg: dict) -> str:
    if agg["failed"]:
        return f"failed ({agg['failed']}/{agg['seeds']} seeds)"
    if agg["far_off"]:
        return f"far off ({agg['far_off']}/{agg['seeds']} seeds)"
    return _f(agg.get("max_mean_err"))


# (label, the vijax method, the peers it is compared with)
COMPARISONS = (
    ("mean-field Adam", ("vijax MF Adam",), ("NumPyro AutoNormal", "Blackjax meanfield_vi")),
    ("full-rank Adam", ("vijax FR Adam",), ("NumPyro AutoMVN", "Blackjax fullrank_vi")),
    ("best of each", tuple(m for m in METHODS if m.startswith("vijax")),
     tuple(m for m in METHODS if not m.startswith("vijax"))),
)


def _best(methods: dict, names) -> tuple:
    scored = [(_score_of(methods[m]["worst"]), m) for m in names if m in methods]
    scored = [(v, m) for v, m in scored if v is not None]
    return min(scored) if scored else (None, None)


def verdicts(results: dict) -> tuple:
    """(losses, wins, ties): lines comparing vijax with its peers, model by model."""
    losses, wins, ties = [], [], []
    for model, rows in results["models"].items():
        methods = rows["methods"]
        if not any("max_mean_err" in r["worst"] for r in methods.values()):
            continue
        for label, ours, theirs in COMPARISONS:
            if not all(m in methods for m in ours + theirs):
                continue
            v, vm = _best(methods, ours)
            p, pm = _best(methods, theirs)
            if v is None and p is None:
                continue
            if v is None:
                losses.append(f"**{model}**, {label}: {', '.join(ours)} failed or far off; "
                              f"{pm} {_f(p)} sd")
            elif p is None:
                wins.append(f"**{model}**, {label}: {vm} {_f(v)} sd; "
                            f"{', '.join(theirs)} failed or far off")
            elif v > TIE * p:
                losses.append(f"**{model}**, {label}: {vm} {_f(v)} sd against {pm} {_f(p)} sd")
            elif p > TIE * v:
                wins.append(f"**{model}**, {label}: {vm} {_f(v)} sd against {pm} {_f(p)} sd")
            else:
                ties.append(f"{model} ({label})")
    return losses, wins, ties


def failures(results: dict) -> list:
    lines = []
    for method in METHODS:
        bad = []
        for model, rows in results["models"].items():
            runs = rows["methods"].get(method, {}).get("runs", [])
            for r in runs:
                if r["status"] != "ok":
                    bad.append(f"{model} seed {r['seed']}: {r['status']}")
                elif far_off(r):
                    bad.append(f"{model} seed {r['seed']}: far off (max mean err "
                               f"{_f(r['max_mean_err'])}, sd ratio up to {_f(r['sd_ratio_max'])})")
        if bad:
            lines.append(f"- {method}: " + "; ".join(bad) + ".")
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    seeds = ", ".join(str(x) for x in s["seeds"])
    losses, wins, ties = verdicts(results)
    lines = [
        "# Zoo accuracy at equal gradient evaluations" + (" (quick smoke run)" if s["quick"] else ""),
        "",
        "Written by `python -m benchmarks.zoo_accuracy` (issue #15); the protocol is the",
        "module docstring of `benchmarks/zoo_accuracy.py`. Each method fits a Gaussian q on",
        "the unconstrained space of a zoo model with the same budget of "
        f"**{s['budget']:,} gradient evaluations",
        f"of log p** (steps x S, S = {s['num_samples']} for the ELBO methods; "
        f"batch-and-match uses B = max(d, {s['min_batch']})",
        "per step), from the same start (mean = the unconstrained `model.latent`, scale 0.1,",
        "no correlation), in float32, once per fit seed "
        f"({seeds}). Every Adam method uses `optax.adam({s['lr']:g})`",
        "(one learning rate, no sweep). Estimators: each library's default (vijax",
        "`adaptive_stl`; NumPyro `Trace_ELBO`, the reparameterization gradient; Blackjax STL);",
        f"the natural gradient uses `stl`, the step {s['ng_schedule']} and "
        f"`max_variance_growth={s['ng_growth']:g}`.",
        f"q's natural-space moments come from {s['num_draws']} draws (derived quantities "
        "included) and are",
        "compared with the long-NUTS references in `benchmarks/results/references/` (exact",
        "moments for Neal's funnel), over every element the reference stores:",
        "",
        "- **mean err**: |E_q x - ref mean| / ref sd; the max (and where it falls) and the",
        "  median over the elements;",
        "- **sd ratio**: sd_q / ref sd; min, median and max (1 is right; below 1 q is too",
        "  narrow).",
        "",
        "Each fit is the last iterate (no averaging), so the numbers move from seed to seed:",
        "compare the seeds' spread before reading a difference. Wall time is one fit call,",
        "compilation included, on a shared machine (secondary). "
        f"Machine: {_machine.one_line(results['machine'])}.",
        f"Total run time {results['total_wall_s']:.0f} s.",
    ]
    if results.get("missing_references"):
        lines += ["", "No reference yet (not run): "
                  + ", ".join(f"`{m}`" for m in results["missing_references"]) + "."]
    lines += [
        "",
        "## vijax against the peers",
        "",
        f"The worst max mean err over the seeds (in reference sds); differences within {TIE:g}x",
        "count as ties. *Best of each* is vijax's best method (any of its four) against",
        "the best peer.",
        "",
        "Where vijax loses:",
        "",
        *([f"- {x}." for x in losses] or ["- nowhere by more than the tie factor."]),
        "",
        "Where vijax wins:",
        "",
        *([f"- {x}." for x in wins] or ["- nowhere by more than the tie factor."]),
        "",
        "Ties: " + (", ".join(ties) if ties else "none") + ".",
        "",
        "Failures (a FitError, a non-finite ELBO, or a finite q more than "
        f"{FAR_OFF:g} sds off):",
        "",
        *(failures(results) or ["- none."]),
        "",
        "Mean-field q cannot represent the posterior correlations, and no Gaussian q",
        "represents Neal's funnel (every method's sds there are a small fraction of the",
        "truth); batch-and-match minimises a score-based divergence, not KL(q || p), so",
        "it aims elsewhere than the ELBO methods even when it converges.",
        "",
        "| model | MF Adam: vijax | NumPyro AutoNormal | Blackjax meanfield_vi | "
        "FR Adam: vijax | NumPyro AutoMVN | Blackjax fullrank_vi | vijax FR natgrad | "
        "vijax BaM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = ("vijax MF Adam", "NumPyro AutoNormal", "Blackjax meanfield_vi", "vijax FR Adam",
             "NumPyro AutoMVN", "Blackjax fullrank_vi", "vijax FR natgrad", "vijax BaM")
    for model, rows in results["models"].items():
        cells = [_cell(rows["methods"][m]["worst"]) if m in rows["methods"] else "not run"
                 for m in order]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every fit",
        "",
        f"Each cell gives the seeds' values in order ({seeds}); the worst element is the",
        "first seed's.",
        "",
        "| model | d | method | evals | max mean err | median mean err | worst element | "
        "sd ratio min | sd ratio median | sd ratio max | wall s | status |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for model, rows in results["models"].items():
        for method, m in rows["methods"].items():
            runs = m["runs"]
            evals = " / ".join(sorted({f"{r['evals']:,}" for r in runs}))
            lines.append(
                f"| {model} | {rows['d']} | {method} | {evals} | "
                f"{_seeds(runs, 'max_mean_err')} | {_seeds(runs, 'median_mean_err')} | "
                f"{runs[0].get('worst_element') or '—'} | {_seeds(runs, 'sd_ratio_min')} | "
                f"{_seeds(runs, 'sd_ratio_median')} | {_seeds(runs, 'sd_ratio_max')} | "
                f"{_seeds(runs, 'wall_s', 1)} | {_status(runs)} |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver
def run_model(name: str, budget: int, methods, seeds, reference: Optional[tuple],
              log=print) -> dict:
    """Every method on the model ``name``, once per seed, scored against ``reference``."""
    model = build_model(name)
    d = dimension(model)
    out = {"d": d, "bam_batch": bam_batch(d), "methods": {}}
    for method in methods:
        runs = []
        for seed in seeds:
            fitted = RUNNERS[method](model, budget, seed)
            row = {"seed": seed, "steps": fitted.steps, "evals": fitted.evals,
                   "wall_s": round(fitted.wall_s, 2), "status": fitted.status}
            if fitted.status == "ok" and reference is not None:
                row.update(score(fitted, reference))
            runs.append(row)
            log(f"{name:26s} {method:22s} seed {seed}  evals {fitted.evals:6d}  "
                f"max err {_f(row.get('max_mean_err'))}  sd ratio "
                f"{_f(row.get('sd_ratio_min'))}/{_f(row.get('sd_ratio_median'))}/"
                f"{_f(row.get('sd_ratio_max'))}  {fitted.wall_s:6.1f} s  {fitted.status}")
        out["methods"][method] = {"runs": runs, "worst": aggregate(runs)}
    return out


def _versions() -> dict:
    out = {"jax": jax.__version__, "vijax": vijax.__version__}
    for name in ("numpyro", "blackjax", "optax"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _csv(text: Optional[str], cast=str) -> Optional[list]:
    return None if text is None else [cast(x.strip()) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    """Runs the benchmark (see the module docstring); returns the results it writes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated zoo model names (default: all; --quick: "
                             + ", ".join(QUICK_MODELS) + ")")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: all of " + ", ".join(METHODS) + ")")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated fit seeds (default "
                             + ",".join(map(str, SEEDS)) + "; --quick: "
                             + ",".join(map(str, QUICK_SEEDS)) + ")")
    parser.add_argument("--quick", action="store_true",
                        help=f"a {QUICK_BUDGET:,}-evaluation budget on two small models, "
                             "one seed (a smoke test)")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"gradient evaluations per fit (default {BUDGET:,})")
    parser.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--refs", default=REFS, help=f"reference folder (default {REFS})")
    args = parser.parse_args(argv)
    if jax.config.jax_enable_x64:
        raise RuntimeError("zoo_accuracy runs in float32: unset JAX_ENABLE_X64.")

    models = _csv(args.models) or list(QUICK_MODELS if args.quick else _zoo.ZOO)
    unknown = [m for m in models if m not in _zoo.ZOO]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(_zoo.ZOO)}")
    methods = _csv(args.methods) or installed_methods()
    unknown = [m for m in methods if m not in RUNNERS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    missing = [m for m in METHODS if m not in methods and not args.methods]
    if missing:
        print(f"skipped (peer not installed; pip install -e '.[compare]'): {', '.join(missing)}")
    seeds = _csv(args.seeds, int) or list(QUICK_SEEDS if args.quick else SEEDS)
    budget = args.budget or (QUICK_BUDGET if args.quick else BUDGET)

    results = {
        "settings": {
            "budget": budget, "num_samples": NUM_SAMPLES, "lr": LR, "min_batch": MIN_BATCH,
            "num_draws": NUM_DRAWS, "seeds": seeds, "draw_seed": DRAW_SEED,
            "ng_schedule": NG_SCHEDULE[0], "ng_growth": NG_GROWTH, "dtype": "float32",
            "estimators": {"vijax Adam": "adaptive_stl (default)", "vijax natgrad": "stl",
                           "NumPyro": "Trace_ELBO (reparam)", "Blackjax": "stl (default)"},
            "init": "mean = unconstrained model.latent (zeros), scale 0.1, no correlation",
            "far_off": FAR_OFF, "tie": TIE, "quick": args.quick,
            "refs": os.path.relpath(args.refs),
        },
        "machine": _machine.describe(),
        "versions": _versions(),
        "models": {},
        "missing_references": [],
    }
    start = time.perf_counter()
    for name in models:
        record = load_reference(args.refs, name)
        if record is None:
            results["missing_references"].append(name)
            if not args.quick:
                print(f"{name}: no reference in {args.refs}; skipped", flush=True)
                continue
        reference = reference_moments(record) if record is not None else None
        results["models"][name] = run_model(
            name, budget, methods, seeds, reference, log=lambda s: print(s, flush=True))
        info = None
        if record is not None:
            sha = record.get("data", {}).get("sha256")
            matches = sha == _zoo.data_sha256(_zoo.default_data(name))
            if not matches:
                print(f"{name}: WARNING the reference was computed on other data "
                      f"(sha256 {sha})", flush=True)
            info = {"kind": record.get("kind"), "sha256": sha, "matches_data": matches,
                    "quick": record.get("quick"),
                    "max_r_hat": record.get("summary", {}).get("max_r_hat"),
                    "divergences": record.get("summary", {}).get("divergences")}
        results["models"][name]["reference"] = info
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    stem = "zoo_accuracy_quick" if args.quick else "zoo_accuracy"
    _machine.write_results(args.out, stem, results, markdown(results))
    print(f"wrote {os.path.join(args.out, stem)}.{{json,md}} in {results['total_wall_s']:.0f} s",
          flush=True)
    return results


if __name__ == "__main__":
    main()
