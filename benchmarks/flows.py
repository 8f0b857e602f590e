"""vijax's normalizing-flow families against FlowJAX, side by side: time per step and KL.

The target (the flows issue): "the same or a better ELBO at half FlowJAX's
time per step or less on CPU". Every problem has an exact log evidence, so
the KL(q || p) = log Z - ELBO of each fitted q is measured, not guessed.

**Problems** (one flat log density ``log_p(z)``, ``z`` a ``(d,)`` vector,
handed to both libraries; float32, JAX's default):

* ``banana`` (d = 2): ``z1 ~ N(0, 1)``, ``z2 | z1 ~ N(z1^2 - 1, 1)``; log Z = 0.
* ``funnel`` (d = 10): ``vijax.models.neals_funnel(dim=10)``'s log joint on
  the flattened latent (``v`` first); normalized, log Z = 0.
* ``bimodal`` (d = 2): ``0.5 N((-2, -2), I) + 0.5 N((2, 2), I)``, modes 5.7
  sds apart; log Z = 0 (a Gaussian q's best KL is about log 2).
* ``blr`` (d = 10): ``vijax.models.bayesian_linear_regression`` (n = 100,
  design rows equicorrelated at 0.5, noise and prior scale 1); log Z is the
  exact evidence, computed in float64 with NumPy (checked against the
  model's ``log_evidence``).

**Flows** (the same architecture in both libraries; hidden width ``WIDTH``,
one hidden layer, ReLU, a mean-field Gaussian base with a learned mean and
scale, initial scale 1):

* ``affine_coupling``: 8 RealNVP layers. vijax ``vijax.flows.affine_coupling(
  num_layers=8, hidden_width=32, hidden_layers=1, activation=jax.nn.relu,
  base=vijax.mean_field(init_scale=1.0))``; FlowJAX ``coupling_flow(key,
  base_dist=Normal(jnp.zeros(d)), flow_layers=8, nn_width=32, nn_depth=1,
  nn_activation=relu, invert=False)`` (affine transformer, its default).
* ``spline_coupling``: 4 coupling layers of rational-quadratic splines with
  8 bins on [-5, 5]: vijax ``spline_coupling(num_layers=4, bins=8,
  bound=5.0, ...)``; FlowJAX ``transformer=RationalQuadraticSpline(knots=7,
  interval=5)`` (FlowJAX's ``knots`` counts inner knots: 7 give 8 bins).
* ``autoregressive``: 4 affine IAF layers (vijax ``autoregressive(
  num_layers=4, transformer="affine", ...)``) against FlowJAX's
  ``masked_autoregressive_flow(..., flow_layers=4, invert=False)``.
* ``autoregressive_spline`` (``--flows``; not in the default run, to keep
  it short): the same with the spline transformer on both sides.

``invert=False`` makes FlowJAX's sampling direction the one-pass one, which
a reparameterized ELBO needs (its default, ``True``, suits density
estimation). Where the architectures still differ: FlowJAX's affine scale is
``softplus(.) + 0.01``, vijax's ``exp(4 tanh(. / 4))``; vijax's layers act on
the standardized coordinates before the base's affine map (``z = m + s T(eps)``),
FlowJAX's after it (``z = T(m + s eps)``), so the spline interval is in
units of the base's scale in vijax and of ``z`` in FlowJAX; vijax's
conditioners start with zero output layers (the flow starts as its base),
FlowJAX's with equinox's random initialization (near the identity, not at
it); FlowJAX's spline learns the slopes at the interval's ends too (vijax
pins them to 1, matching its identity tails); MADE degrees, permutations
and hidden-layer initializations are each library's own.

**Runners** (all with ``adam(NUM_STEPS)``, Adam with a cosine decay from ``LR``
(one object per problem and flow),
``S = NUM_SAMPLES`` draws per step, ``NUM_STEPS`` steps, so equal gradient
evaluations):

* ``vijax``: ``vijax.fit(key, flow, log_p, flow.init(jnp.zeros(d)),
  optimizer=opt, num_steps=N, num_samples=S, estimator="reparam",
  progress=False)``: the same estimator FlowJAX's ``ElboLoss`` uses.
* ``vijax adaptive_stl``: the same with vijax's default estimator, for the
  coupling flows (``STL_FLOWS``: an autoregressive flow's ``log_prob``, which
  the path estimators need, is sequential, d passes per layer).
* ``FlowJAX``: ``flowjax.train.fit_to_key_based_loss(key, flow, loss_fn=
  ElboLoss(log_p, num_samples=S), steps=N, optimizer=opt,
  show_progress=False)``, FlowJAX's own loop (one jitted step per Python
  iteration, reading the loss back every step).
* ``FlowJAX (scan)``: FlowJAX's ``ElboLoss`` and the same Adam in a jitted
  ``lax.scan`` of ``SCAN_CHUNK`` steps per call: the floor of FlowJAX's math
  without its loop, so the table shows how much of a speed-up is the loop's.
* ``vijax full_rank``: ``vijax.full_rank(init_scale=1.0)`` with the reparam
  estimator, same S, steps and learning rate: the Gaussian reference.

**How measured.** For each problem and flow, each runner is called once with
``WARM_STEPS`` steps (its first call: tracing and compiling, timed whole as
``first_call_s``; ``compile_s`` is the time JAX's compile events cover,
``benchmarks._timing.CompileTime``). Then ``REPEATS`` repeats, the runners
interleaved (rotating their order each repeat, so background load hits all
alike), each repeat a short run of ``SHORT_STEPS`` steps and a full run of
``NUM_STEPS`` steps with the repeat's key; time per step is ``(t_full -
t_short) / (NUM_STEPS - SHORT_STEPS)``, the steady state without fixed
per-call costs. The table gives the median over repeats. Each full run's
final q is scored on ``EVAL_DRAWS`` fresh draws from its own
``sample_and_log_prob`` (the same code for both libraries): log weights
``lw = log_p(z) - log q(z)``, KL = log Z - mean(lw) with standard error
sd(lw) / sqrt(draws), and the PSIS k-hat of ``lw`` (``vijax.psis``). The
median KL over repeats is reported with its repeat's standard error and the
range over repeats.

**Target.** Per problem and flow, a vijax row *meets* the target when its
median time per step is at most half FlowJAX's (``fit_to_key_based_loss``)
and its median KL is at most FlowJAX's plus ``max(KL_TOL, 2 x the combined
standard error)``; the table says which part is missed otherwise.

Run ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.flows [--quick] [--out DIR]``.
The full run writes ``benchmarks/results/cpu/flows.{json,md}`` (10-17
minutes on 2 cores, depending on what else runs; most of it compiling: each
runner's first call compiles for 3-30 s); ``--quick`` (the banana and the affine coupling flow,
vijax and FlowJAX only, 300 steps, one repeat; about 20 s) writes
``flows_quick.{json,md}``, a smoke test only. ``--problems`` and ``--flows``
pick a subset. Without FlowJAX installed (or with ``--no-flowjax``) only the
vijax rows are run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import vijax
from benchmarks import _machine
from benchmarks._timing import CompileTime

try:  # FlowJAX is optional: without it only the vijax rows run.
    import equinox as eqx
    import flowjax
    import paramax
    from flowjax import distributions as fj_distributions
    from flowjax import flows as fj_flows
    from flowjax.bijections import RationalQuadraticSpline
    from flowjax.train import fit_to_key_based_loss
    from flowjax.train.losses import ElboLoss
except ImportError:  # pragma: no cover - exercised where FlowJAX is missing
    flowjax = None

HAVE_FLOWJAX = flowjax is not None

OUT = os.path.join(os.path.dirname(__file__), "results", "cpu")

LR = 3e-3  # Adam's peak learning rate, every runner


def adam(num_steps: int) -> optax.GradientTransformation:
    """Adam with the step size decayed from LR to 0 over the run (cosine): each
    fit settles at its end, so the final KL is the q reached, not the noise of a
    constant step (with a constant step the flows' final KL varied 2-3x across
    seeds)."""
    return optax.adam(optax.cosine_decay_schedule(LR, num_steps))

NUM_SAMPLES = 16  # S, draws per step
NUM_STEPS = 2000  # N, steps of each timed (and scored) run
SHORT_STEPS = 50  # the short run subtracted from the full one
WARM_STEPS = 10  # the first (compiling) call
REPEATS = 3
EVAL_DRAWS = 8192  # fresh draws scoring each final q
WIDTH = 32  # hidden units, one hidden layer, ReLU
SCAN_CHUNK = 50  # FlowJAX (scan): steps per jitted call
KL_TOL = 0.02  # nats: "the same ELBO" allows this much (or 2 combined SEs)
BLR_N, BLR_D, BLR_RHO = 100, 10, 0.5

QUICK = dict(problems=("banana",), flows=("affine_coupling",), num_steps=300,
             short_steps=20, repeats=1, eval_draws=4096)

#: name -> (vijax factory kwargs, FlowJAX constructor, FlowJAX transformer, layers)
FLOWS = {
    "affine_coupling": ("affine_coupling", {}, "coupling", "affine", 8),
    "spline_coupling": ("spline_coupling", {"bins": 8, "bound": 5.0}, "coupling", "spline", 4),
    "autoregressive": ("autoregressive", {"transformer": "affine"}, "autoregressive",
                       "affine", 4),
    "autoregressive_spline": ("autoregressive", {"transformer": "spline", "bins": 8,
                                                 "bound": 5.0}, "autoregressive", "spline", 4),
}
#: The flows of the full run (``--flows`` picks others, e.g. autoregressive_spline).
DEFAULT_FLOWS = ("affine_coupling", "spline_coupling", "autoregressive")
#: Flows that also get the vijax adaptive_stl row. The path estimators need
#: ``log_prob`` at the draws, which an autoregressive flow computes
#: sequentially (d network passes per layer; vijax's docs recommend "reparam"
#: there), so those rows are left out to keep the run short.
STL_FLOWS = ("affine_coupling", "spline_coupling")
FULL_RANK = "full_rank (reference)"

VIJAX, VIJAX_STL, FLOWJAX, FLOWJAX_SCAN, GAUSSIAN = (
    "vijax", "vijax adaptive_stl", "FlowJAX", "FlowJAX (scan)", "vijax full_rank")


# ---------------------------------------------------------------- problems
class Problem(NamedTuple):
    name: str
    d: int
    log_p: Callable  # flat (d,) -> scalar
    log_z: float
    note: str


def _norm_logpdf(x, loc, scale):
    return -0.5 * jnp.square((x - loc) / scale) - jnp.log(scale) - 0.5 * math.log(2 * math.pi)


def banana_log_p(z):
    return _norm_logpdf(z[0], 0.0, 1.0) + _norm_logpdf(z[1], jnp.square(z[0]) - 1.0, 1.0)


BIMODAL_MEAN = 2.0


def bimodal_log_p(z):
    a = jnp.sum(_norm_logpdf(z, -BIMODAL_MEAN, 1.0))
    b = jnp.sum(_norm_logpdf(z, BIMODAL_MEAN, 1.0))
    return jnp.logaddexp(a, b) - math.log(2.0)


def funnel() -> Problem:
    model = vijax.models.neals_funnel(dim=10)
    _, unravel = ravel_pytree(model.latent)

    def log_p(z):
        return model.log_joint(unravel(z))

    return Problem("funnel", 10, log_p, 0.0, "Neal's funnel, vijax.models.neals_funnel(dim=10)")


def blr() -> Problem:
    r = np.random.default_rng(0)
    corr = BLR_RHO * np.ones((BLR_D, BLR_D)) + (1 - BLR_RHO) * np.eye(BLR_D)
    x = r.standard_normal((BLR_N, BLR_D)) @ np.linalg.cholesky(corr).T
    y = x @ r.standard_normal(BLR_D) + r.standard_normal(BLR_N)
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), noise_scale=1.0,
        prior_scale=1.0)
    # The exact evidence in float64: y ~ N(0, I + X X^T).
    cov = np.eye(BLR_N) + x @ x.T
    _, logdet = np.linalg.slogdet(cov)
    log_z = float(-0.5 * (y @ np.linalg.solve(cov, y) + logdet + BLR_N * math.log(2 * math.pi)))
    assert abs(log_z - float(model.log_evidence)) < 1e-3 * max(1.0, abs(log_z)), (
        log_z, float(model.log_evidence))
    sds = np.sqrt(np.diag(np.linalg.inv(np.eye(BLR_D) + x.T @ x)))
    return Problem("blr", BLR_D, model.log_joint, log_z,
                   f"Bayesian linear regression, n = {BLR_N}, rho = {BLR_RHO}; posterior sds "
                   f"{sds.min():.3f}-{sds.max():.3f}")


def make_problem(name: str) -> Problem:
    if name == "banana":
        return Problem("banana", 2, banana_log_p, 0.0, "z2 | z1 ~ N(z1^2 - 1, 1)")
    if name == "bimodal":
        return Problem("bimodal", 2, bimodal_log_p, 0.0,
                       f"0.5 N(-{BIMODAL_MEAN:g} 1, I) + 0.5 N({BIMODAL_MEAN:g} 1, I)")
    if name == "funnel":
        return funnel()
    if name == "blr":
        return blr()
    raise ValueError(name)


PROBLEMS = ("banana", "funnel", "bimodal", "blr")


# ---------------------------------------------------------------- runners
class Runner(NamedTuple):
    """``run(key, steps) -> (q, skipped, nonfinite)`` and ``log_weights(key, q, n)``."""

    name: str
    run: Callable
    log_weights: Callable


def _vijax_family(flow: str):
    base = vijax.mean_field(init_scale=1.0)
    factory, kwargs, _, _, layers = FLOWS[flow]
    return getattr(vijax.flows, factory)(
        num_layers=layers, hidden_width=WIDTH, hidden_layers=1, activation=jax.nn.relu,
        base=base, **kwargs)


def _vijax_log_weights(family, problem: Problem, draws: int):
    @jax.jit
    def log_weights(key, params):
        if family.sample_and_log_prob is not None:
            z, log_q = family.sample_and_log_prob(key, params, draws)
        else:
            z = family.sample(key, params, draws)
            log_q = jax.vmap(lambda zi: family.log_prob(params, zi))(z)
        return jax.vmap(problem.log_p)(z) - log_q

    return log_weights


def vijax_runner(name: str, family, problem: Problem, estimator: str, num_samples: int,
                 log_weights: Callable, num_steps: int) -> Runner:
    params0 = family.init(jnp.zeros(problem.d))
    opt = adam(num_steps)  # one object: fit's compiled chunk is cached on it

    def run(key, steps):
        result = vijax.fit(key, family, problem.log_p, params0, optimizer=opt, num_steps=steps,
                           num_samples=num_samples, estimator=estimator, progress=False)
        return result.params, int(result.num_skipped), 0

    return Runner(name, run, log_weights)


def _flowjax_flow(flow: str, d: int):
    _, _, kind, transformer, layers = FLOWS[flow]
    kwargs = dict(base_dist=fj_distributions.Normal(jnp.zeros(d)), flow_layers=layers,
                  nn_width=WIDTH, nn_depth=1, nn_activation=jax.nn.relu, invert=False)
    if transformer == "spline":
        kwargs["transformer"] = RationalQuadraticSpline(knots=7, interval=5.0)
    make = fj_flows.coupling_flow if kind == "coupling" else fj_flows.masked_autoregressive_flow
    return make(jax.random.key(0), **kwargs)


def _flowjax_log_weights(problem: Problem, draws: int):
    @eqx.filter_jit
    def log_weights(key, dist):
        z, log_q = dist.sample_and_log_prob(key, (draws,))
        return jax.vmap(problem.log_p)(z) - log_q

    return log_weights


def flowjax_runner(flow: str, problem: Problem, num_samples: int,
                   log_weights: Callable, num_steps: int) -> Runner:
    dist0 = _flowjax_flow(flow, problem.d)
    loss = ElboLoss(problem.log_p, num_samples=num_samples)
    opt = adam(num_steps)

    def run(key, steps):
        dist, losses = fit_to_key_based_loss(key, dist0, loss_fn=loss, steps=steps,
                                             optimizer=opt, show_progress=False)
        return dist, None, int(np.sum(~np.isfinite(np.asarray(losses))))

    return Runner(FLOWJAX, run, log_weights)


def flowjax_scan_runner(flow: str, problem: Problem, num_samples: int,
                        log_weights: Callable, num_steps: int) -> Runner:
    """FlowJAX's loss and the same Adam, ``SCAN_CHUNK`` steps per jitted ``lax.scan``."""
    dist0 = _flowjax_flow(flow, problem.d)
    loss = ElboLoss(problem.log_p, num_samples=num_samples)
    opt = adam(num_steps)
    params0, static = eqx.partition(
        dist0, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable))

    @jax.jit
    def chunk(params, opt_state, keys):
        def body(carry, key):
            p, s = carry
            value, grads = eqx.filter_value_and_grad(loss)(p, static, key)
            updates, s = opt.update(grads, s, params=p)
            return (eqx.apply_updates(p, updates), s), value

        return jax.lax.scan(body, (params, opt_state), keys)

    def run(key, steps):
        keys = jax.random.split(key, -(-steps // SCAN_CHUNK) * SCAN_CHUNK)
        params, state, values = params0, opt.init(params0), []
        for i in range(0, keys.shape[0], SCAN_CHUNK):
            (params, state), v = chunk(params, state, keys[i:i + SCAN_CHUNK])
            values.append(v)
        nonfinite = int(np.sum(~np.isfinite(np.concatenate([np.asarray(v) for v in values]))))
        return eqx.combine(params, static), None, nonfinite

    return Runner(FLOWJAX_SCAN, run, log_weights)


def make_runners(problem: Problem, flow: str, *, with_flowjax: bool, with_scan: bool,
                 with_stl: bool, num_samples: int, draws: int, num_steps: int) -> list:
    """The runners of one (problem, flow) case; those of a library share one scoring program."""
    if flow == FULL_RANK:
        family = vijax.full_rank(init_scale=1.0)
        return [vijax_runner(GAUSSIAN, family, problem, "reparam", num_samples,
                             _vijax_log_weights(family, problem, draws), num_steps)]
    family = _vijax_family(flow)
    vijax_lw = _vijax_log_weights(family, problem, draws)
    runners = [vijax_runner(VIJAX, family, problem, "reparam", num_samples, vijax_lw,
                            num_steps)]
    if with_flowjax:
        flowjax_lw = _flowjax_log_weights(problem, draws)
        runners.append(flowjax_runner(flow, problem, num_samples, flowjax_lw, num_steps))
        if with_scan:
            runners.append(flowjax_scan_runner(flow, problem, num_samples, flowjax_lw,
                                               num_steps))
    if with_stl and flow in STL_FLOWS:
        runners.append(vijax_runner(VIJAX_STL, family, problem, "adaptive_stl", num_samples,
                                    vijax_lw, num_steps))
    return runners


# ---------------------------------------------------------------- measuring
def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def score(runner: Runner, q, key, log_z: float) -> dict:
    """KL = log Z - ELBO (with its standard error) and PSIS k-hat of q, from fresh draws."""
    lw = np.asarray(runner.log_weights(key, q), np.float64)
    if not np.all(np.isfinite(lw)):
        return {"kl": None, "kl_se": None, "khat": None,
                "nonfinite_log_weights": int(np.sum(~np.isfinite(lw)))}
    _, khat = vijax.psis(jnp.asarray(lw, jnp.float32))
    return {"kl": float(log_z - lw.mean()), "kl_se": float(lw.std(ddof=1) / math.sqrt(lw.size)),
            "khat": float(khat), "nonfinite_log_weights": 0}


def run_case(problem: Problem, flow: str, runners: list, *, num_steps: int, short_steps: int,
             repeats: int, log=print) -> dict:
    """First calls, then ``repeats`` interleaved rounds of (short, full) runs per runner."""
    out = {r.name: {"first_call_s": None, "compile_s": None, "runs": []} for r in runners}
    for r in runners:
        with CompileTime() as ct:
            (q, _, _), first = _timed(r.run, jax.random.key(0), WARM_STEPS)
        out[r.name]["first_call_s"] = round(first, 3)
        out[r.name]["compile_s"] = round(ct.seconds, 3)
        # The scoring program compiles here too, outside the timed runs.
        jax.block_until_ready(r.log_weights(jax.random.key(0), q))
    for rep in range(repeats):
        k = rep % len(runners)
        order = runners[k:] + runners[:k]
        for r in order:
            key = jax.random.key(1000 + rep)
            _, t_short = _timed(r.run, key, short_steps)
            (q, skipped, nonfinite), t_full = _timed(r.run, key, num_steps)
            row = {"repeat": rep, "t_short_s": round(t_short, 4), "t_full_s": round(t_full, 4),
                   "s_per_step": (t_full - t_short) / (num_steps - short_steps),
                   "skipped": skipped, "nonfinite_losses": nonfinite}
            row.update(score(r, q, jax.random.key(5000 + rep), problem.log_z))
            out[r.name]["runs"].append(row)
            log(f"  {problem.name:8s} {flow:22s} {r.name:18s} rep {rep}: "
                f"{row['s_per_step'] * 1e3:7.3f} ms/step, KL {_f(row['kl'], 4)} "
                f"(se {_f(row['kl_se'], 4)}), k-hat {_f(row['khat'], 2)}"
                + (f", skipped {skipped}" if skipped else "")
                + (f", non-finite losses {nonfinite}" if nonfinite else ""))
    return out


def _median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def summarize(problem: Problem, flow: str, case: dict) -> list:
    """One row per runner: medians over repeats, ratios to FlowJAX, the target's verdict."""
    rows = []
    for name, m in case.items():
        runs = m["runs"]
        kls = [r["kl"] for r in runs]
        finite = [r for r in runs if r["kl"] is not None]
        mid = (sorted(finite, key=lambda r: r["kl"])[(len(finite) - 1) // 2] if finite else None)
        rows.append({
            "problem": problem.name, "d": problem.d, "log_z": problem.log_z, "flow": flow,
            "runner": name,
            "ms_per_step": 1e3 * _median([r["s_per_step"] for r in runs]),
            "ms_per_step_runs": [round(1e3 * r["s_per_step"], 4) for r in runs],
            "first_call_s": m["first_call_s"], "compile_s": m["compile_s"],
            "kl": _median(kls), "kl_se": None if mid is None else mid["kl_se"],
            "kl_min": min(r["kl"] for r in finite) if finite else None,
            "kl_max": max(r["kl"] for r in finite) if finite else None,
            "khat": _median([r["khat"] for r in runs]),
            "skipped": [r["skipped"] for r in runs],
            "nonfinite_losses": [r["nonfinite_losses"] for r in runs],
            "failed_scores": sum(r["kl"] is None for r in runs),
            "runs": runs,
        })
    by_name = {r["runner"]: r for r in rows}
    fj, fj_scan = by_name.get(FLOWJAX), by_name.get(FLOWJAX_SCAN)
    for row in rows:
        if row["runner"] in (VIJAX, VIJAX_STL) and fj is not None:
            row["ratio"] = row["ms_per_step"] / fj["ms_per_step"]
            row["ratio_scan"] = (row["ms_per_step"] / fj_scan["ms_per_step"]
                                 if fj_scan is not None else None)
            row["speed_ok"] = bool(row["ratio"] <= 0.5)
            if row["kl"] is None or fj["kl"] is None:
                row["elbo_ok"] = fj["kl"] is None and row["kl"] is not None
                row["kl_tol"] = None
            else:
                tol = max(KL_TOL, 2 * math.hypot(row["kl_se"], fj["kl_se"]))
                row["kl_tol"] = tol
                row["elbo_ok"] = bool(row["kl"] <= fj["kl"] + tol)
            # Do the repeats' KL ranges overlap (seed-to-seed spread, not the draws' SE)?
            row["kl_ranges_overlap"] = (
                None if row["kl_min"] is None or fj["kl_min"] is None
                else bool(row["kl_min"] <= fj["kl_max"] and fj["kl_min"] <= row["kl_max"]))
            row["meets_target"] = row["speed_ok"] and row["elbo_ok"]
    return rows


# ---------------------------------------------------------------- report
def _f(x, nd=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{nd}f}"


def _verdict(row) -> str:
    if "meets_target" not in row:
        return ""
    if row["meets_target"]:
        return "**meets**"
    missed = [w for w, ok in (("speed", row["speed_ok"]), ("ELBO", row["elbo_ok"])) if not ok]
    return "misses (" + " and ".join(missed) + ")"


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = results["rows"]
    have_fj = any(r["runner"] == FLOWJAX for r in rows)
    title = "vijax flows vs FlowJAX" + (" (quick smoke run)" if s["quick"] else "")
    lines = [
        f"# {title}",
        "",
        "Generated by `python -m benchmarks.flows" + (" --quick" if s["quick"] else "")
        + "`; see the module docstring for the full protocol.",
        "",
        f"Machine: {_machine.one_line(results['machine'])}. "
        f"Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + f". Environment: OPENBLAS_NUM_THREADS={s['openblas_num_threads']}, "
        f"XLA_FLAGS={s['xla_flags']!r}. Total run time {results['total_wall_s']:.0f} s.",
        "",
        "## How measured",
        "",
        f"Every runner uses Adam with a cosine decay from {s['lr']:g} to 0 over the run "
        f"(`optax.adam(optax.cosine_decay_schedule({s['lr']:g}, {s['num_steps']}))`), "
        f"S = {s['num_samples']} draws per step and "
        f"{s['num_steps']} steps (equal gradient evaluations), float32. After one compiling "
        f"call ({s['warm_steps']} steps; **first call s** is its wall time, **compile s** the "
        "part JAX's compile events cover), each runner does "
        f"{s['repeats']} repeat(s), interleaved with the other runners of the same problem and "
        f"flow (rotating order): a {s['short_steps']}-step run and a {s['num_steps']}-step run "
        f"with the same key; **ms/step** = (t_full - t_short) / "
        f"{s['num_steps'] - s['short_steps']}, the steady state without per-call costs (median over repeats; wall clock on a "
        "shared 2-core machine, so expect some noise). Each full run's final q is scored on "
        f"{s['eval_draws']} fresh draws of its own `sample_and_log_prob` (the same code for both "
        "libraries): **KL** = log Z - mean(log p - log q), exact log Z, median over repeats "
        "± that run's standard error [min, max over repeats], and the PSIS **k-hat** of the "
        "same log weights (`vijax.psis`; median). **skipped**: steps vijax's NaN guard skipped "
        "(per repeat); FlowJAX has no guard (non-finite losses, if any, are listed under Notes).",
        "",
        "Runners: **vijax** = `vijax.fit(..., estimator=\"reparam\")` (FlowJAX's `ElboLoss` "
        "estimator); **vijax adaptive_stl** = vijax's default estimator (coupling flows "
        "only: an autoregressive flow's `log_prob`, which it needs, is sequential); "
        "**FlowJAX** = "
        "`flowjax.train.fit_to_key_based_loss` with `ElboLoss`, FlowJAX's own loop (a jitted "
        "step per Python iteration, the loss read back each step); **FlowJAX (scan)** = the "
        f"same loss and Adam in a jitted `lax.scan` of {s['scan_chunk']} steps per call (not "
        "a FlowJAX API: the floor of its math without its loop); **vijax full_rank** = the "
        "full-rank Gaussian reference. **ratio** = vijax ms/step / FlowJAX ms/step; **ratio "
        "(scan)** the same against FlowJAX (scan).",
        "",
        "**Target** (the issue): the same or a better ELBO at half FlowJAX's time per step or "
        "less. A vijax row **meets** it when ratio <= 0.5 and its median KL <= FlowJAX's "
        f"+ max({s['kl_tol']:g}, 2 combined SEs); otherwise the missed part is named.",
        "",
        "Architectures (same layers, widths, depth, activation, bins, mean-field base with a "
        "learned mean and scale, initial scale 1, both libraries); where they differ: FlowJAX's "
        "affine scale is softplus + 0.01, vijax's exp of a tanh-bounded log-scale (|log s| < 4); "
        "vijax's layers act on the base's standardized coordinates before its affine map "
        "(z = m + s T(eps)), FlowJAX's after it (z = T(m + s eps)), so the spline interval "
        "[-5, 5] is in base-scale units in vijax and in z units in FlowJAX; vijax's "
        "conditioners start with zero output layers (the flow starts as its base), FlowJAX's "
        "with equinox's random init (near, not at, the identity); FlowJAX's spline also "
        "learns the end-knot slopes (vijax pins them to 1); FlowJAX's `knots=7` is vijax's "
        "`bins=8`; permutations, MADE degrees and hidden-layer inits are each library's own.",
        "",
        "## Results",
        "",
        "| problem | flow | runner | ms/step | ratio | ratio (scan) | first call s | compile s "
        "| KL ± SE [min, max] | k-hat | skipped | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        kl = ("non-finite" if r["kl"] is None else
              f"{r['kl']:.4f} ± {r['kl_se']:.4f} [{r['kl_min']:.3f}, {r['kl_max']:.3f}]")
        skipped = ", ".join(str(x) for x in r["skipped"] if x is not None) or "—"
        lines.append(
            f"| {r['problem']} (d={r['d']}) | {r['flow']} | {r['runner']} | "
            f"{_f(r['ms_per_step'])} | {_f(r.get('ratio'), 3)} | {_f(r.get('ratio_scan'), 2)} | "
            f"{_f(r['first_call_s'], 1)} | {_f(r['compile_s'], 1)} | {kl} | {_f(r['khat'], 2)} | "
            f"{skipped} | {_verdict(r)} |")
    lines += ["", "## Verdict", ""]
    judged = [r for r in rows if "meets_target" in r]
    if not have_fj:
        lines.append("FlowJAX was not run (not installed, or `--no-flowjax`): no comparison.")
    for runner in (VIJAX, VIJAX_STL):
        rs = [r for r in judged if r["runner"] == runner]
        if not rs:
            continue
        met = [r for r in rs if r["meets_target"]]
        ratios = [r["ratio"] for r in rs]
        scan = [r["ratio_scan"] for r in rs if r.get("ratio_scan") is not None]
        lines.append(
            f"- **{runner}**: meets the target in {len(met)} of {len(rs)} (problem, flow) "
            f"cases; time ratio to FlowJAX's loop {min(ratios):.3f}–{max(ratios):.3f} "
            f"(median {statistics.median(ratios):.3f})"
            + (f", to FlowJAX (scan) {min(scan):.2f}–{max(scan):.2f} "
               f"(median {statistics.median(scan):.2f})" if scan else "") + ".")
        for r in rs:
            if not r["meets_target"]:
                fj = _row(rows, r, FLOWJAX)
                overlap = {True: "; the repeats' KL ranges overlap",
                           False: "; the repeats' KL ranges do not overlap"}.get(
                               r.get("kl_ranges_overlap"), "")
                lines.append(
                    f"  - {_verdict(r)} on {r['problem']} / {r['flow']}: ratio "
                    f"{r['ratio']:.3f}, median KL {_f(r['kl'], 4)} "
                    f"[{_f(r['kl_min'])}, {_f(r['kl_max'])}] vs FlowJAX {_f(fj['kl'], 4)} "
                    f"[{_f(fj.get('kl_min'))}, {_f(fj.get('kl_max'))}] (tolerance "
                    f"{_f(r['kl_tol'], 3)}){overlap}.")
    scan_rows = [r for r in rows if r["runner"] == FLOWJAX_SCAN]
    if scan_rows:
        diffs = []
        for r in scan_rows:
            loop = _row(rows, r, FLOWJAX)
            for a, b in zip(r["runs"], loop.get("runs", [])):
                if a["kl"] is not None and b["kl"] is not None:
                    diffs.append(abs(a["kl"] - b["kl"]))
        loop_ms = [_row(rows, r, FLOWJAX)["ms_per_step"] / r["ms_per_step"] for r in scan_rows]
        same = ("the same as" if diffs and max(diffs) == 0.0 else
                f"within {max(diffs):.2g} nats of" if diffs else "not comparable to")
        lines.append(
            f"- **FlowJAX (scan)** runs FlowJAX's own loss and Adam on the same key schedule "
            f"as `fit_to_key_based_loss`: its final KLs are {same} the loop's, so the two "
            f"differ in time only. FlowJAX's loop takes {min(loop_ms):.1f}–{max(loop_ms):.1f}x "
            f"(median {statistics.median(loop_ms):.1f}x) the scanned time per step"
            + (": most of FlowJAX's time per step here is its loop's per-step overhead, not "
               "the flow's arithmetic." if min(loop_ms) > 2 else "."))
        for runner in (VIJAX, VIJAX_STL):
            rs = [r for r in judged if r["runner"] == runner and r.get("ratio_scan") is not None]
            if rs:
                fast = [r for r in rs if r["ratio_scan"] <= 0.5]
                lines.append(
                    f"- Against FlowJAX (scan), **{runner}** takes "
                    f"{min(r['ratio_scan'] for r in rs):.2f}–"
                    f"{max(r['ratio_scan'] for r in rs):.2f}x its time per step: half or less "
                    f"in {len(fast)} of {len(rs)} cases. Where the target is met on speed, it "
                    "is met against FlowJAX's loop" + (", not against its arithmetic." if
                                                      len(fast) < len(rs) else "."))
    notes = []
    for r in rows:
        bad = [x for x in r["nonfinite_losses"] if x]
        if bad:
            notes.append(f"{r['problem']} / {r['flow']} / {r['runner']}: non-finite losses in "
                         f"{len(bad)} repeat(s) ({', '.join(map(str, bad))} steps).")
        if r["failed_scores"]:
            notes.append(f"{r['problem']} / {r['flow']} / {r['runner']}: {r['failed_scores']} "
                         "final q(s) gave non-finite log weights (KL not computed).")
        if (r["runner"] == GAUSSIAN and r["problem"] == "blr" and r["kl"] is not None
                and r["kl"] > 0.1):
            notes.append(f"blr / {r['runner']}: the full-rank family contains the exact "
                         f"posterior, so its KL of {r['kl']:.2f} is optimization error: not "
                         f"converged in {results['settings']['num_steps']} steps at this "
                         "learning rate from an initial scale of 1 ("
                         + results["problems"]["blr"]["note"].split("; ")[-1] + ").")
        if any(x for x in r["skipped"] if x):
            notes.append(f"{r['problem']} / {r['flow']} / {r['runner']}: vijax skipped "
                         f"{', '.join(str(x) for x in r['skipped'])} steps per repeat.")
    lines += ["", "## Notes", "", *([f"- {n}" for n in notes] or ["- none."]), ""]
    return "\n".join(lines)


def _row(rows, like, runner):
    for r in rows:
        if r["problem"] == like["problem"] and r["flow"] == like["flow"] and r["runner"] == runner:
            return r
    return {"kl": None}


def _versions() -> dict:
    v = {"jax": jax.__version__, "vijax": vijax.__version__, "optax": optax.__version__,
         "numpy": np.__version__}
    if HAVE_FLOWJAX:
        from importlib.metadata import version

        v.update(flowjax=version("flowjax"), equinox=eqx.__version__)
    return v


def _clean(x):
    """NaN/inf to None, so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def main(argv=None) -> dict:
    """Runs the benchmark (see the module docstring); returns the results it writes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="banana, affine coupling, vijax and FlowJAX only, few steps, "
                             "one repeat (a smoke test)")
    parser.add_argument("--no-flowjax", action="store_true", help="run the vijax rows only")
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=None)
    parser.add_argument("--flows", nargs="+", choices=tuple(FLOWS), default=None)
    parser.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)

    q = args.quick
    problems = tuple(args.problems or (QUICK["problems"] if q else PROBLEMS))
    flows = tuple(args.flows or (QUICK["flows"] if q else DEFAULT_FLOWS))
    num_steps = QUICK["num_steps"] if q else NUM_STEPS
    short_steps = QUICK["short_steps"] if q else SHORT_STEPS
    repeats = QUICK["repeats"] if q else REPEATS
    draws = QUICK["eval_draws"] if q else EVAL_DRAWS
    with_flowjax = HAVE_FLOWJAX and not args.no_flowjax
    # The quick run keeps to the two runners compared (each first call compiles
    # for several seconds): no FlowJAX (scan), adaptive_stl or full-rank rows.
    with_scan = with_stl = with_reference = not q
    results = {
        "settings": {
            "quick": q, "lr": LR, "num_samples": NUM_SAMPLES, "num_steps": num_steps,
            "short_steps": short_steps, "warm_steps": WARM_STEPS, "repeats": repeats,
            "eval_draws": draws, "width": WIDTH, "hidden_layers": 1, "activation": "relu",
            "scan_chunk": SCAN_CHUNK, "kl_tol": KL_TOL, "problems": list(problems),
            "flows": {f: {"vijax": f"vijax.flows.{FLOWS[f][0]}", "kwargs": FLOWS[f][1],
                          "flowjax": FLOWS[f][2], "transformer": FLOWS[f][3],
                          "num_layers": FLOWS[f][4]} for f in flows},
            "flowjax": with_flowjax, "flowjax_scan": with_flowjax and with_scan,
            "adaptive_stl": [f for f in flows if with_stl and f in STL_FLOWS],
            "full_rank_reference": with_reference, "dtype": "float32",
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "xla_flags": os.environ.get("XLA_FLAGS"),
        },
        "machine": _machine.describe(),
        "versions": _versions(),
        "rows": [],
    }
    log = lambda s: print(s, flush=True)  # noqa: E731
    start = time.perf_counter()
    for pname in problems:
        problem = make_problem(pname)
        log(f"{pname} (d = {problem.d}, log Z = {problem.log_z:.4f})")
        results.setdefault("problems", {})[pname] = {"d": problem.d, "log_z": problem.log_z,
                                                     "note": problem.note}
        for flow in flows + ((FULL_RANK,) if with_reference else ()):
            runners = make_runners(problem, flow, with_flowjax=with_flowjax, with_scan=with_scan,
                                   with_stl=with_stl, num_samples=NUM_SAMPLES, draws=draws,
                                   num_steps=num_steps)
            case = run_case(problem, flow, runners, num_steps=num_steps,
                            short_steps=short_steps, repeats=repeats, log=log)
            results["rows"] += summarize(problem, flow, case)
            log(f"  ... {time.perf_counter() - start:.0f} s so far")
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    results = _clean(results)
    stem = "flows_quick" if q else "flows"
    _machine.write_results(args.out, stem, results, markdown(results))
    log(f"wrote {os.path.join(args.out, stem)}.{{json,md}} in {results['total_wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
