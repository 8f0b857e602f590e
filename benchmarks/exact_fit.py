"""``vijax.fit_exact`` (L-BFGS on the exact ELBO) on BLR and logistic regression. Issue #19 item 4.

Where the model gives ``E_q[log p]`` without sampling (BLR in closed form;
logistic regression by one-dimensional quadrature per row,
``vijax.models._glm``), ``vijax.fit_exact(family, model, family.init(latent))``
maximizes the exact ELBO with ``optax.lbfgs``, nothing tuned, its defaults
(``tol = 1e-4`` nats over the last 10 steps, or a tenth of the steps taken
if that is more). This measures it on head_to_head's
BLR and logistic problems (``benchmarks/head_to_head.py``: same data, same
start, float32) at d = 100, 1000 and 10^4, on the same families as
``default_fit``.

**Accuracy**: head_to_head's yardstick on ``result.params``: the gap above the
family's own optimum (``Problem.family_gap``: exact KL for BLR, the float64
quadrature ELBO for logistic, low-rank rows against the rank-5 optimum), and
the means and sds against the optimum's (``Problem.family_moments``).

**Cost**: L-BFGS steps and evaluations of the exact ELBO with its gradient
(the line searches' included: ``result.num_evals``); each evaluation is one
pass over the data, O(n d) for mean-field, O(n d k) for rank k. Wall time
cold (the first call: compilation included) and warm (the median of
``REPEATS`` further calls, compiled once; interleaved with the hand loop).

**Hand loop** (mean-field rows): the same math written the way a user would,
without vijax's driver: a ``(mean, log_sd)`` pair, the ELBO written out with
``jax.numpy`` (logistic: the same ``expected_softplus``, whose accuracy at
d = 10^4 is the point), ``optax.lbfgs`` in one ``jax.lax.while_loop`` for
the same number of steps, jitted. Its ratio is fit_exact's overhead (the
Gaussian view, the best-point tracking, the chunks).

**Beside it**, the default ``vijax.fit`` row of the same problem, family and
seed 0 from ``benchmarks/results/cpu/default_fit.json`` (not re-run; its
commit is in the report): its steps, gradient evaluations (Monte Carlo
draws), wall time and gap. Different evaluations: a draw's gradient is one
``log p`` gradient at one point (O(n d)), as one exact evaluation is one pass
over the data, so the counts compare like for like in data passes.

Run: ``PYTHONPATH=. OPENBLAS_NUM_THREADS=1 python -m benchmarks.exact_fit``
(``--quick``: d = 100 only; ``--float64``: data, parameters and the hand loop in
float64, written to ``exact_fit_float64.*``; ``--render JSON``: rewrite a
report's table with the stored default_fit rows as they are now). Writes
``benchmarks/results/cpu/exact_fit.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vijax
from benchmarks import _machine, _problems, zoo_accuracy
from benchmarks import head_to_head as h2h
from vijax.models._glm import expected_softplus

OUT = os.path.join("benchmarks", "results", "cpu")
DEFAULT_FIT_JSON = os.path.join(OUT, "default_fit.json")
PROBLEMS = ("blr_d100", "logistic_d100", "blr_d1000", "logistic_d1000",
            "blr_d10000", "logistic_d10000")
QUICK_PROBLEMS = ("blr_d100", "logistic_d100")
REPEATS = 3
_LOG_2PI = math.log(2.0 * math.pi)


def library_model(problem, dtype=np.float32) -> vijax.models.Model:
    """The problem's data as vijax's own model (float32 unless ``dtype``), for ``fit_exact``."""
    x64, y64 = _problems._data(problem.kind, problem.info["n"], problem.d,
                               problem.info["seed"])
    x, y = np.asarray(x64, dtype), np.asarray(y64, dtype)
    if problem.kind == "blr":
        return vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)
    return vijax.models.logistic_regression(x, y)


def hand_neg_elbo(kind: str, x, y):
    """A user's mean-field ``-ELBO((mean, log_sd))``, written out with ``jax.numpy``."""
    d = x.shape[1]
    xsq = jnp.square(x)

    def neg_elbo(theta):
        mean, log_sd = theta
        sd = jnp.exp(log_sd)
        m, s = x @ mean, jnp.sqrt(xsq @ jnp.square(sd))
        if kind == "blr":
            lik = -0.5 * (x.shape[0] * _LOG_2PI + jnp.sum(jnp.square(y - m)) + jnp.sum(s * s))
        else:
            lik = jnp.sum(y * m - expected_softplus(m, s))
        prior = -0.5 * (d * _LOG_2PI + mean @ mean + jnp.sum(jnp.square(sd)))
        entropy = 0.5 * d * (1.0 + _LOG_2PI) + jnp.sum(log_sd)
        return -(lik + prior + entropy)

    return neg_elbo


def hand_loop(kind: str, x, y, steps: int):
    """A user's L-BFGS on :func:`hand_neg_elbo` for ``steps`` steps: ``run() -> (mean, sd, elbo)``."""
    d = x.shape[1]
    neg_elbo = hand_neg_elbo(kind, x, y)
    solver = optax.lbfgs()
    vg = optax.value_and_grad_from_state(neg_elbo)

    @jax.jit
    def run(theta):
        def body(carry):
            i, theta, state = carry
            value, grad = vg(theta, state=state)
            updates, state = solver.update(grad, state, theta, value=value, grad=grad,
                                           value_fn=neg_elbo)
            return i + 1, optax.apply_updates(theta, updates), state

        _, theta, _ = jax.lax.while_loop(lambda c: c[0] < steps, body,
                                         (0, theta, solver.init(theta)))
        return theta[0], jnp.exp(theta[1]), -neg_elbo(theta)

    # The start of family.init: mean 0, sd 0.1.
    theta0 = (jnp.zeros(d, x.dtype), jnp.full(d, math.log(0.1), x.dtype))
    return lambda: run(theta0)


def default_rows(path: str) -> dict:
    """``{(problem, group): seed-0 row}`` of the stored default_fit report, with its commit."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        stored = json.load(f)
    out = {"_commit": stored.get("vijax_commit")}
    for p in stored.get("problems", []):
        for row in p.get("rows", []):
            if row.get("seed") == 0:
                out[(p["name"], row["group"])] = row
    return out


def default_summary(d_row: dict) -> dict:
    """What the report shows of a stored default_fit row."""
    return {k: d_row.get(k) for k in ("stopped_by", "steps", "grad_evals", "rule_evals",
                                      "total_evals", "wall_s", "family_gap", "rerun_at")}


def timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def run_problem(name: str, defaults: dict, log=print, dtype=np.float32) -> dict:
    problem = h2h.build_problem(name, quick=False)
    model = library_model(problem, dtype)
    x, y = (jnp.asarray(a, dtype) for a in
            _problems._data(problem.kind, problem.info["n"], problem.d, problem.info["seed"]))
    rows = []
    for group in problem.groups:
        family = h2h._family(group)
        init = family.init(model.latent)

        def call():
            return vijax.fit_exact(family, model, init)

        t0 = time.perf_counter()
        res = call()
        jax.block_until_ready(res.params)
        cold = time.perf_counter() - t0
        hand = hand_loop(problem.kind, x, y, res.num_steps) if group == "mean_field" else None
        if hand is not None:
            hand_cold = timed(hand)
        warm, hand_warm = [], []
        for _ in range(REPEATS):  # interleaved
            warm.append(timed(lambda: call().params))
            if hand is not None:
                hand_warm.append(timed(hand))
        q = h2h.q_from_vijax(family, res.params)
        row = dict(group=group, steps=res.num_steps, evals=res.num_evals,
                   converged=res.converged, message=res.message, elbo=res.elbo,
                   grad_norm=res.grad_norm, cold_s=round(cold, 3),
                   warm_s=round(statistics.median(warm), 4), warm_all_s=[round(w, 4) for w in warm],
                   family_gap=problem.family_gap(q, group),
                   moments=problem.family_moments(q, group))
        if hand is not None:
            mean, sd, elbo = hand()
            hq = h2h.q_diag(np.asarray(mean, np.float64), np.asarray(sd, np.float64))
            row.update(hand_cold_s=round(hand_cold, 3),
                       hand_warm_s=round(statistics.median(hand_warm), 4),
                       hand_warm_all_s=[round(w, 4) for w in hand_warm],
                       hand_gap=problem.family_gap(hq, group),
                       ratio=round(statistics.median(warm) / statistics.median(hand_warm), 2))
        d_row = defaults.get((name, group))
        if d_row is not None:
            row["default_fit"] = default_summary(d_row)
        rows.append(row)
        log(f"  {name:16s} {group:10s} steps {res.num_steps:5d} evals {res.num_evals:5d} "
            f"cold {cold:6.2f} s warm {row['warm_s']:7.3f} s gap {h2h._g(row['family_gap'])}"
            + (f" hand {row['hand_warm_s']:.3f} s (x{row['ratio']})" if hand else "")
            + f"  {res.message}")
    return dict(name=name, kind=problem.kind, d=problem.d, n=problem.info["n"], rows=rows)


def _cell_default(r: dict) -> str:
    dflt = r.get("default_fit")
    if not dflt:
        return "-"
    return (f"{dflt['stopped_by']}, {dflt['steps']:,} steps, {dflt['grad_evals']:,} grads "
            f"(+{dflt['rule_evals']:,} rule), {dflt['wall_s']:.1f} s, gap "
            f"{h2h._g(dflt['family_gap'])}"
            + (f" (at `{dflt['rerun_at']}`)" if dflt.get("rerun_at") else ""))


def markdown(results: dict) -> str:
    lines = [
        "# vijax.fit_exact: L-BFGS on the exact ELBO (BLR, logistic regression)", "",
        "> Generated by `python -m benchmarks.exact_fit` (see its docstring for the protocol). "
        f"vijax commit `{results['vijax_commit']}`; default_fit rows from "
        f"`{DEFAULT_FIT_JSON}` at vijax commit `{results['default_fit_commit']}` (not re-run; "
        "a row rerun later names its commit). "
        f"{results.get('dtype', 'float32')}, one call per row, nothing tuned: "
        "`vijax.fit_exact(family, model, family.init(model.latent))`. Gap: nats above the family's own optimum (float64 "
        "yardstick). Evaluations: exact ELBO and gradient, line searches included (one "
        "data pass each). Warm: median of "
        f"{REPEATS} further calls, interleaved with the hand loop.", "",
        "| problem | family | steps | evaluations | gap (nats) | means / sds | cold s | warm s "
        "| hand loop warm s (ratio) | default `fit` (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["problems"]:
        for r in p["rows"]:
            m = r["moments"]
            mom = (f"{h2h._g(m['max_mean_err'])} / "
                   + (f"{h2h._g(m['sd_ratio_min'])}-{h2h._g(m['sd_ratio_max'])}"
                      if m.get("sd_ratio_min") is not None else "n/a"))
            hand = (f"{r['hand_warm_s']:.3f} (x{r['ratio']})" if "hand_warm_s" in r else "-")
            conv = "" if r["converged"] else " (not converged)"
            lines.append(
                f"| {p['name']} | {r['group']} | {r['steps']}{conv} | {r['evals']} | "
                f"{h2h._g(r['family_gap'])} | {mom} | {r['cold_s']:.2f} | {r['warm_s']:.3f} | "
                f"{hand} | {_cell_default(r)} |")
    lines += ["", "Means: the largest error of q's means, in the optimum's sds (logistic: the "
              "mean-field optimum's); sds: the range of sd_q / sd_optimum (n/a for low rank, "
              "not identified).",
              "", f"Machine: {_machine.one_line(results['machine'])}; versions "
              f"{results['versions']}; load average at start {results['load_average_start']}; "
              f"total {results['total_wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def render(path: str) -> dict:
    """Rewrites ``path``'s .md with the stored default_fit rows as they are now."""
    with open(path) as f:
        results = json.load(f)
    defaults = default_rows(DEFAULT_FIT_JSON)
    results["default_fit_commit"] = defaults.get("_commit")
    for p in results["problems"]:
        for r in p["rows"]:
            d_row = defaults.get((p["name"], r["group"]))
            if d_row is not None:
                r["default_fit"] = default_summary(d_row)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown(results))
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", default=None, help="comma-separated problems")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--float64", action="store_true",
                        help="data and parameters in float64 (exact_fit_float64.*)")
    parser.add_argument("--render", default=None,
                        help="only rewrite the .md of this .json, its default_fit column "
                             "reloaded from default_fit.json")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render)
    if jax.config.jax_enable_x64 and not args.float64:
        raise RuntimeError("exact_fit runs in float32: unset JAX_ENABLE_X64 (or pass --float64).")
    dtype = np.float64 if args.float64 else np.float32
    if args.float64:
        jax.config.update("jax_enable_x64", True)
    names = (args.problems.split(",") if args.problems
             else list(QUICK_PROBLEMS if args.quick else PROBLEMS))
    defaults = default_rows(DEFAULT_FIT_JSON)
    results = dict(machine=_machine.describe(), versions=zoo_accuracy._versions(),
                   vijax_commit=h2h._commit(), default_fit_commit=defaults.get("_commit"),
                   load_average_start=[round(v, 2) for v in os.getloadavg()],
                   env={k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "JAX_PLATFORMS")},
                   dtype=np.dtype(dtype).name, problems=[])
    start = time.perf_counter()
    for name in names:
        results["problems"].append(run_problem(name, defaults, dtype=dtype,
                                               log=lambda s: print(s, flush=True)))
    results["total_wall_s"] = time.perf_counter() - start
    stem = ("exact_fit_quick" if args.quick else "exact_fit") + (
        "_float64" if args.float64 else "")
    _machine.write_results(args.out, stem, h2h._clean(results), markdown(results))
    return results


if __name__ == "__main__":
    main()
