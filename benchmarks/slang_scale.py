"""SLANG at large d against Adam ADVI on the same family (issue #19, item 1).

Problem: Bayesian linear regression with fewer observations than weights,
``y = X w + noise``, ``X`` (n, d) standard normal, ``w ~ N(0, I)``, unit
noise. The posterior precision ``I + X^T X`` is exactly rank n plus
diagonal, so :func:`vijax.low_rank_precision` of rank k = n holds it and the
exact KL to it can reach 0. The KL is computed on the host in float64 NumPy
with the structured formulas (Woodbury, the determinant lemma: nothing d x d),
so d = 10^4 costs no more than the fits.

Methods, each from ``vijax.low_rank_precision(rank=n).init`` (mean 0, sd 0.1),
trained in float32:

* ``slang B=…``: :func:`vijax.slang` with its defaults (step ``0.5 / (1 +
  t / 5)``, trust region ``max_kl=1``), B score evaluations per step;
* ``adam lr=…``: :func:`vijax.fit` with ``optax.adam(lr)`` on the same
  family, S = 8 draws per step, the default estimator; the learning rates
  of ``LRS`` are each reported (the best is the "best-tuned Adam").

Each run is checkpointed (continued from its ``FitState``) at the
evaluation counts of ``CHECKPOINTS``; a cell is the exact KL there. "evals
to 0.1 / 0.01" are the first checkpoints below those KLs. ms/step is the
last segment's wall time over its steps (compiled, on a shared 2-core
machine: secondary).

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.slang_scale [--quick] [--out DIR]``;
the full run writes ``benchmarks/results/cpu/slang_scale.{md,json}``, ``--quick``
(d = 200 only, small budgets) ``slang_scale_quick.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vijax
from benchmarks import _machine

N_OBS = 10
LRS = (0.01, 0.03, 0.1)
BATCHES = (16, 32)
ADAM_SAMPLES = 8
CHECKPOINTS = (1_000, 3_000, 10_000, 30_000, 100_000)
QUICK_CHECKPOINTS = (500, 2_000)


def problem(d: int, n: int = N_OBS, seed: int = 0):
    """The model (float32) and the posterior ``(mean, U, s)`` in float64 (precision ``U U^T + diag(s^-2)``)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + rng.normal(size=n)
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), noise_scale=1.0,
        prior_scale=1.0)
    u, s = x.T, np.ones(d)
    # Posterior mean (I + X^T X)^{-1} X^T y by Woodbury: X^T (I + X X^T)^{-1} y.
    mean = x.T @ np.linalg.solve(np.eye(n) + x @ x.T, y)
    return model, (mean, u, s)


def _cov_parts(u, s):
    """``(B, logdet)``: ``cov = diag(s^2) - B^T B`` and ``log det cov``, for precision ``U U^T + diag(s^-2)``."""
    a = np.square(s)[:, None] * u
    lc = np.linalg.cholesky(np.eye(u.shape[1]) + u.T @ a)
    b = np.linalg.solve(lc, a.T)
    return b, 2.0 * (np.sum(np.log(s)) - np.sum(np.log(np.diag(lc))))


def kl_low_rank_precision(q, p) -> float:
    """``KL(q || p)`` for two Gaussians ``(mean, U, s)`` of low-rank-plus-diagonal precision, float64."""
    mq, uq, sq = (np.asarray(v, np.float64) for v in q)
    mp, up, sp = (np.asarray(v, np.float64) for v in p)
    bq, logdet_q = _cov_parts(uq, sq)
    _, logdet_p = _cov_parts(up, sp)
    diag_q = np.square(sq) - np.sum(np.square(bq), axis=0)
    # tr(P_p cov_q) = sum(diag_q / sp^2) + tr(U_p^T cov_q U_p).
    trace = (np.sum(diag_q / np.square(sp)) + np.sum(np.square(sq)[:, None] * np.square(up))
             - np.sum(np.square(bq @ up)))
    delta = mq - mp
    maha = np.sum(np.square(delta / sp)) + np.sum(np.square(up.T @ delta))
    return float(0.5 * (trace + maha - mq.shape[0] + logdet_p - logdet_q))


def _q_of(params):
    return (np.asarray(params.loc, np.float64), np.asarray(params.prec_factor, np.float64),
            np.asarray(jax.nn.softplus(params.raw_scale), np.float64))


def run(method: str, arg, model, posterior, rank: int, checkpoints, log=print) -> dict:
    """KL at each checkpoint for one method; ``arg`` is B for slang, the lr for adam."""
    family = vijax.low_rank_precision(rank=rank)
    per_step = arg if method == "slang" else ADAM_SAMPLES
    state, done, kls, ms = None, 0, [], None
    t_total = time.perf_counter()
    for evals in checkpoints:
        steps = max(evals // per_step - done, 1)
        start = family.init(model.latent) if state is None else state
        key = jax.random.key(0) if state is None else None
        t0 = time.perf_counter()
        if method == "slang":
            result = vijax.slang(key, model.log_joint, start, num_steps=steps, batch_size=arg,
                                 progress=False, chunk_size=min(steps, 500))
        else:
            result = vijax.fit(key, family, model.log_joint, start, optimizer=optax.adam(arg),
                               num_steps=steps, num_samples=ADAM_SAMPLES, progress=False,
                               chunk_size=min(steps, 500))
        jax.block_until_ready(result.params)
        ms = 1e3 * (time.perf_counter() - t0) / steps
        state, done = result.state, done + steps
        # The run's own iterate (``result.params`` are verified by one more
        # batch per call, which the evaluation count does not include).
        kl = kl_low_rank_precision(_q_of(result.state.params), posterior)
        kls.append(kl)
        log(f"  {method} {arg}: {done * per_step} evals, KL {kl:.4g}")
    first = lambda tol: next((e for e, k in zip(checkpoints, kls) if k < tol), None)  # noqa: E731
    return {"method": method, "arg": arg, "kl": kls, "evals_to_0.1": first(0.1),
            "evals_to_0.01": first(0.01), "ms_per_step": ms,
            "wall_s": time.perf_counter() - t_total}


def _g(x) -> str:
    return "—" if x is None else (f"{x:,}" if isinstance(x, int) else f"{x:.3g}")


def render(results: dict) -> str:
    cps = results["checkpoints"]
    lines = [
        "# SLANG at large d against Adam on the same family",
        "",
        f"Written by `python -m benchmarks.slang_scale{' --quick' if results['quick'] else ''}`; "
        "protocol in the module docstring. Bayesian linear regression with n = "
        f"{results['n']} observations of d weights: the posterior precision is exactly rank n "
        "plus diagonal, so `low_rank_precision(rank=n)` can reach KL 0. Cells: exact KL "
        "(float64, structured) after that many gradient evaluations of log p; float32 fits.",
        "",
        f"Machine: {results['machine']}. Total {results['total_s']:.0f} s.",
        "",
    ]
    for d, runs in results["problems"].items():
        lines += [f"## d = {d}", "",
                  "| method | " + " | ".join(f"{c:,}" for c in cps)
                  + " | evals to 0.1 | evals to 0.01 | ms/step |",
                  "|---|" + "---:|" * (len(cps) + 3)]
        for r in runs:
            name = f"slang B={r['arg']}" if r["method"] == "slang" else f"adam lr={r['arg']}"
            lines.append(f"| {name} | " + " | ".join(_g(k) for k in r["kl"])
                         + f" | {_g(r['evals_to_0.1'])} | {_g(r['evals_to_0.01'])} | "
                         f"{r['ms_per_step']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    parser.add_argument("--dims", default=None, help="comma-separated d (default 1000,10000)")
    args = parser.parse_args(argv)
    dims = [int(v) for v in args.dims.split(",")] if args.dims else (
        [200] if args.quick else [1000, 10000])
    checkpoints = QUICK_CHECKPOINTS if args.quick else CHECKPOINTS
    t0 = time.perf_counter()
    results = {"quick": args.quick, "n": N_OBS, "checkpoints": list(checkpoints),
               "machine": _machine.one_line(_machine.describe()), "problems": {}}
    for d in dims:
        print(f"d = {d}", flush=True)
        model, posterior = problem(d)
        runs = [run("slang", b, model, posterior, N_OBS, checkpoints) for b in BATCHES]
        runs += [run("adam", lr, model, posterior, N_OBS, checkpoints) for lr in LRS]
        results["problems"][str(d)] = runs
    results["total_s"] = time.perf_counter() - t0
    stem = "slang_scale_quick" if args.quick else "slang_scale"
    _machine.write_results(args.out, stem, results, render(results))
    print(json.dumps({d: [(r["method"], r["arg"], r["kl"][-1]) for r in runs]
                      for d, runs in results["problems"].items()}))
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
