"""Does ``vijax.fit``'s step cost more than the loop you would write by hand?

Every configuration that issue 14 measured: Bayesian linear regression with
n = 1000, S = 8, ``optax.adam(1e-2)``, float32, at d = 10 (mean-field and
full-rank, ``closed_entropy`` and ``stl``) and d = 100 (both families, both
estimators). The *floor* is ``benchmarks.fit_speed.make_floor``: a jitted
``lax.scan`` whose step draws the noise, evaluates ``-ELBO`` for the chosen
estimator the way a user would write it (the closed-form entropy of the
vijax parameterization, ``sum log sd``, for ``closed_entropy``), takes
``jax.value_and_grad`` and applies the optax update. ``fit`` adds its NaN
guard, the per-step trace and the chunking.

Measured: seconds per step of an already compiled 2000-step run, fit with one
2000-step chunk, over interleaved repeats (the floor and fit alternate, so
background load hits both alike); the ratio fit / floor of the medians and of
the minima. Run ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.step_overhead``
(a few minutes on two cores); it writes
``benchmarks/results/cpu/step_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import vijax
from benchmarks import _machine, fit_speed
from benchmarks.fit_speed import RESULTS_DIR, hand_log_joint, make_data, make_floor

N, S, NUM_STEPS, LEARNING_RATE = 1000, 8, 2000, 1e-2
CONFIGS = [
    (10, "mean_field", "closed_entropy"), (10, "full_rank", "closed_entropy"),
    (10, "mean_field", "stl"), (10, "full_rank", "stl"),
    (100, "mean_field", "closed_entropy"), (100, "full_rank", "closed_entropy"),
    (100, "mean_field", "stl"), (100, "full_rank", "stl"),
]
TARGET = 1.05


def measure(d: int, family_name: str, estimator: str, *, num_steps: int = NUM_STEPS,
            repeats: int = 7) -> dict:
    """Median and min microseconds per step of the floor and fit, and their ratios."""
    x, y = make_data(N, d)
    log_joint = hand_log_joint(x, y)
    optimizer = optax.adam(LEARNING_RATE)
    family = vijax.mean_field() if family_name == "mean_field" else vijax.full_rank()
    params = family.init(jnp.zeros(d, jnp.float32))
    key = jax.random.key(0)
    floor = make_floor(family_name, log_joint, optimizer, num_steps, S, estimator)

    def run_floor():
        jax.block_until_ready(floor(params, key))

    def run_fit():
        res = vijax.fit(key, family, log_joint, params, optimizer=optimizer,
                        num_steps=num_steps, num_samples=S, estimator=estimator,
                        chunk_size=num_steps, progress=False)
        jax.block_until_ready(res.params)

    runs = {"floor": run_floor, "fit": run_fit}
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # compile
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(1e6 * (time.perf_counter() - t0) / num_steps)
    out = {name: {"median_us": statistics.median(t), "min_us": min(t)}
           for name, t in times.items()}
    out["ratio_median"] = out["fit"]["median_us"] / out["floor"]["median_us"]
    out["ratio_min"] = out["fit"]["min_us"] / out["floor"]["min_us"]
    return out


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# fit's step against the hand-written loop",
        "",
        f"Bayesian linear regression, n = {N}, S = {S}, adam({LEARNING_RATE}), "
        f"{results['config']['num_steps']} steps, float32, "
        f"{results['config']['repeats']} interleaved repeats.",
        f"Machine: {_machine.one_line(m)}; load average at start "
        f"{m['load_average_1_5_15_min'][0]:.1f}; OPENBLAS_NUM_THREADS="
        f"{m.get('openblas_num_threads')}.",
        "",
        "| d | family | estimator | floor, us/step (median / min) | fit, us/step "
        "(median / min) | fit / floor (median / min) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['d']} | {r['family']} | {r['estimator']} "
            f"| {r['floor']['median_us']:.1f} / {r['floor']['min_us']:.1f} "
            f"| {r['fit']['median_us']:.1f} / {r['fit']['min_us']:.1f} "
            f"| {r['ratio_median']:.3f} / {r['ratio_min']:.3f} |"
        )
    ratios = [r["ratio_median"] for r in results["rows"]]
    lines += [
        "",
        f"Largest median ratio {max(ratios):.3f} (target: at most {TARGET}).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=NUM_STEPS)
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    machine = fit_speed.machine()
    machine["openblas_num_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
    rows = []
    for d, family, estimator in CONFIGS:
        r = measure(d, family, estimator, num_steps=args.steps, repeats=args.repeats)
        rows.append({"d": d, "family": family, "estimator": estimator, **r})
        print(f"d={d} {family} {estimator}: {r['ratio_median']:.3f} / {r['ratio_min']:.3f}",
              flush=True)
    results = {"machine": machine,
               "config": {"n": N, "num_samples": S, "num_steps": args.steps,
                          "repeats": args.repeats, "optimizer": f"adam({LEARNING_RATE})"},
               "rows": rows}
    md = to_markdown(results)
    print(md)
    if not args.no_write:
        _machine.write_results(args.out, "step_overhead", results, md)
    return results


if __name__ == "__main__":
    main()
