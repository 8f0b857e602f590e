"""Batch-and-match's batch size on head_to_head's regressions: B = d against B > d (#19 item 2).

head_to_head runs ``vijax.batch_and_match`` with B = d (the order of d its
docstring asks for), and at d = 1000 BLR it ended about 1e6 nats from the
posterior. This measures why: the gap of q to the family's optimum after
each step, for B = d, 1.5 d, 2 d and 3 d, on head_to_head's problems
(``head_to_head.build_problem``: float32, its data, its start
``full_rank().init(latent)`` and its measure: the exact KL for BLR, the
quadrature ELBO gap for logistic regression), with BaM's defaults (its
learning rate, damped by its trust region, ``max_kl=1``), fit keys 0, 1 and
2, ``STEPS`` steps. Reported: the steps until the gap is <= 0.01 nats and
stays there (head_to_head's target; evaluations = steps x B), and the gap
after the last step.

The mechanism the numbers point at: with B <= d the batch covariances of the
draws and of the scores are singular or nearly so (the smallest eigenvalue
of a d x d sample covariance of B draws is of the order of
``(1 - sqrt(d / B))**2``), so the batch match leaves some directions to the
proximal term alone; the trust region then undoes most steps instead of
letting q blow up, and the fit crawls.

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.bam_batch_size [--quick]
[--out DIR]``; writes ``benchmarks/results/cpu/bam_batch_size.{md,json}``
(about 4 minutes on 2 cores; ``--quick``: d = 100 only, key 0).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before NumPy / JAX load BLAS
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import math
import time

import jax

import vijax
from benchmarks import _machine
from benchmarks import head_to_head as h2h
from benchmarks.stopping import first_within

PROBLEMS = ("blr_d100", "logistic_d100", "blr_d1000")
QUICK_PROBLEMS = ("blr_d100",)
MULTIPLES = (1.0, 1.5, 2.0, 3.0)
KEYS = (0, 1, 2)
STEPS = 20
TARGET = h2h.KL_TOL  # 0.01 nats


def run_one(problem, batch: int, key: int, steps: int) -> dict:
    """BaM with its defaults, one step per call; the gap after every step."""
    family = vijax.full_rank()
    state = family.init(problem.latent)
    gaps = []
    start = time.perf_counter()
    for t in range(steps):
        result = vijax.batch_and_match(jax.random.key(key) if t == 0 else None,
                                       problem.log_joint, state, num_steps=1,
                                       batch_size=batch, progress=False)
        state = result.state
        gaps.append(float(problem.measure(h2h.q_from_vijax(family, result.params),
                                          "full_rank")["value"]))
    reached = first_within(gaps, TARGET)
    return dict(batch=batch, key=key, gaps=gaps, steps_to_target=reached,
                evals_to_target=None if reached is None else reached * batch,
                final_gap=gaps[-1], wall_s=round(time.perf_counter() - start, 2))


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.2g}"


def markdown(results: dict) -> str:
    lines = [
        "# Batch-and-match's batch size: B = d against B > d",
        "",
        "Written by `python -m benchmarks.bam_batch_size` (issue #19 item 2); the protocol is "
        f"its module docstring. vijax commit `{results['vijax_commit']}`. Float32; BaM's "
        f"defaults; head_to_head's problems, start and measure; {results['steps']} steps; "
        f"target {TARGET:g} nats (evaluations = steps x B).",
        "",
        "| problem | B | fit keys | steps to the target (each key) | evaluations | gap after the last step (each key) |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["problems"]:
        for mult in results["multiples"]:
            rows = [r for r in p["runs"] if r["multiple"] == mult]
            steps = ", ".join(str(r["steps_to_target"] or "not reached") for r in rows)
            evals = ", ".join(f"{r['evals_to_target']:,}" if r["evals_to_target"] else "-"
                              for r in rows)
            gaps = ", ".join(_fmt(r["final_gap"]) for r in rows)
            lines.append(f"| {p['name']} | {rows[0]['batch']} ({mult:g} d) | "
                         f"{', '.join(str(r['key']) for r in rows)} | {steps} | {evals} | {gaps} |")
    m = results["machine"]
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('cores')} cores; total "
              f"{results['total_wall_s']} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=h2h.OUT)
    args = parser.parse_args(argv)
    names = QUICK_PROBLEMS if args.quick else PROBLEMS
    keys = KEYS[:1] if args.quick else KEYS
    steps = 10 if args.quick else STEPS
    start = time.perf_counter()
    results = dict(vijax_commit=h2h._commit(), machine=_machine.describe(), steps=steps,
                   multiples=list(MULTIPLES), keys=list(keys), problems=[])
    for name in names:
        problem = h2h.build_problem(name, quick=False)
        runs = []
        for mult in MULTIPLES:
            batch = int(round(mult * problem.d))
            for key in keys:
                r = run_one(problem, batch, key, steps)
                r["multiple"] = mult
                runs.append(r)
                print(f"{name} B={batch} key {key}: steps to target {r['steps_to_target']}, "
                      f"final gap {_fmt(r['final_gap'])} ({r['wall_s']} s)", flush=True)
        results["problems"].append(dict(name=name, d=problem.d, runs=runs))
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    stem = "bam_batch_size_quick" if args.quick else "bam_batch_size"
    _machine.write_results(args.out, stem, h2h._clean(results), markdown(results))
    print(f"wrote {args.out}/{stem}.{{json,md}}")
    return results


if __name__ == "__main__":
    main()
