"""Whole fits with OpenBLAS's default threading against one BLAS thread (issue #19, item 7).

vijax caps the BLAS threads at one while its compiled fit loops run
(``vijax/_blas.py``; ``vijax.fitting._engine.run``). The cap is read from the
environment variable ``VIJAX_BLAS_THREADS`` at each fit call: ``0`` leaves
OpenBLAS's default threading alone (the behaviour **before** the change),
``1`` (the default) caps it at one thread (**after**). XLA's CPU backend
runs Cholesky, triangular solves, QR and eigh through LAPACK from SciPy's
OpenBLAS, so these are the kernels the cap touches; XLA's own thread pool
(matrix products, elementwise work) is not affected.

**Workloads** (float32; the library's defaults otherwise):

* ``fit stl d=100`` / ``d=400``: ``vijax.fit(key, vijax.full_rank(),
  model.log_joint, family.init(model.latent), optimizer=optax.adam(1e-2),
  num_steps=300, num_samples=8, estimator="stl")`` on
  ``vijax.models.bayesian_linear_regression(X, y, noise_scale=1.0,
  prior_scale=1.0)`` with ``n = 500`` rows (``X`` standard normal, ``y = X w
  + noise``, fixed seed). The stl path evaluates ``log q`` at the draws with
  a stopped-gradient factor: triangular solves on every step.
* ``batch_and_match d=100`` / ``d=400``: ``vijax.batch_and_match(key,
  model.log_joint, vijax.full_rank().init(model.latent), num_steps=50,
  batch_size=d // 2)`` on the same models (a QR and an eigh per step).
* ``natural_gradient d=100``: ``vijax.fit`` with ``vijax.natural_gradient(
  family, lambda t: 0.3 / (1 + t / 50), max_variance_growth=2)`` (the
  docstring's recommendation for Monte Carlo gradients with S much smaller
  than d), estimator "stl", S = 8, 300 steps (a Cholesky and a triangular
  solve per step, one more Cholesky per variance-growth check).

**How measured.** Each workload is compiled once (its first call, with the
timed number of steps). Every timed call then continues from that first
call's ``res.state`` (``fit(None, family, log_joint, state, ...)``,
``batch_and_match(None, log_joint, state, ...)``): the same compiled chunk
on the same inputs, so every call does identical work; JAX's compile events
are recorded around each timed call and must be zero. ``VIJAX_BLAS_THREADS``
is set in ``os.environ`` before each call (it is read per call), so both
settings run in the same process. Per workload and condition: one untimed
call per setting, then ``REPEATS`` repeats (fewer, but at least
``MIN_REPEATS``, once the workload has taken ``BUDGET_S`` seconds in this
condition), each timing one call per setting,
the order alternating (before-after, after-before, ...) so drifting load hits
both alike. **ms/step** = wall time of the call (``block_until_ready`` on the
state) / steps: it includes the per-call overhead (checks, threadpoolctl's
limit and restore), small against 50-300 steps.

**Conditions.**

* ``idle``: nothing else started by the benchmark (the load averages at its
  start and end are recorded: check them, this is a shared machine).
* ``busy``: a background subprocess multiplies two 1000 x 1000 float64
  matrices in a loop (``a @ a``, NumPy's own default OpenBLAS threading:
  ``OPENBLAS_NUM_THREADS`` and friends removed from its environment) for the
  whole condition, then is terminated; its matrix products per second are
  recorded (with and without the fits beside it is not compared).

Run ``python -m benchmarks.blas_threads [--quick] [--out DIR]`` with
``OPENBLAS_NUM_THREADS`` unset (with it set to 1, "before" is one thread
too; the run records each BLAS library's thread count under each setting).
The full run writes ``benchmarks/results/cpu/blas_threads.{json,md}`` (about
4 minutes on 2 cores, most of it the busy condition's "before" calls);
``--quick`` (d = 100 only, fewer steps, 2 repeats, under a minute) writes ``blas_threads_quick.{json,md}``, a smoke test only.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vijax
from vijax import _blas
from benchmarks import _machine
from benchmarks._timing import CompileTime

OUT = os.path.join(os.path.dirname(__file__), "results", "cpu")
ENV = _blas.ENV
BEFORE, AFTER = "0", "1"  # VIJAX_BLAS_THREADS: default threading / one thread
LABEL = {BEFORE: "before (VIJAX_BLAS_THREADS=0)", AFTER: "after (VIJAX_BLAS_THREADS=1)"}

N_ROWS = 500
NUM_SAMPLES = 8
FIT_STEPS = 300
BAM_STEPS = 50
REPEATS = 7  # at most; fewer (not under MIN_REPEATS) past BUDGET_S per workload and condition
MIN_REPEATS = 5
BUDGET_S = 90.0
COMPILE_TOL_S = 0.05  # JAX compile events inside a workload's timed calls, in all
DIMS = (100, 400)
NG_DIMS = (100,)
BUSY_N = 1000  # the background process's matrix size
BUSY_WARM_S = 2.0  # let the background process reach its steady state

QUICK = dict(dims=(100,), ng_dims=(100,), fit_steps=60, bam_steps=20, repeats=2)

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "GOTO_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")

BUSY_CODE = f"""
import json, signal, sys, time
import numpy as np
stop = False
def _stop(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, _stop)
try:
    import threadpoolctl
    info = [{{k: i.get(k) for k in ("internal_api", "num_threads", "filepath")}}
            for i in threadpoolctl.threadpool_info()]
except Exception as e:  # threadpoolctl is a vijax dependency; be robust anyway
    info = repr(e)
a = np.random.default_rng(0).standard_normal(({BUSY_N}, {BUSY_N}))
print(json.dumps({{"blas": info}}), flush=True)
n, t0 = 0, time.perf_counter()
while not stop:
    a @ a
    n += 1
print(json.dumps({{"products": n, "seconds": time.perf_counter() - t0}}), flush=True)
"""


# ---------------------------------------------------------------- workloads
class Workload(NamedTuple):
    name: str
    d: int
    steps: int
    first: Callable  # () -> result (compiles)
    again: Callable  # (state) -> result: the timed call


def blr_model(d: int):
    r = np.random.default_rng(d)
    x = r.standard_normal((N_ROWS, d))
    y = x @ (r.standard_normal(d) / np.sqrt(d)) + r.standard_normal(N_ROWS)
    return vijax.models.bayesian_linear_regression(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), noise_scale=1.0,
        prior_scale=1.0)


def fit_workload(name: str, d: int, steps: int, natural: bool) -> Workload:
    model = blr_model(d)
    family = vijax.full_rank()
    params0 = family.init(model.latent)
    if natural:
        opt = vijax.natural_gradient(family, lambda t: 0.3 / (1 + t / 50),
                                     max_variance_growth=2.0)
    else:
        opt = optax.adam(1e-2)
    # The same family, log joint and optimizer objects every call: fit's cached chunk.
    kw = dict(optimizer=opt, num_steps=steps, num_samples=NUM_SAMPLES, estimator="stl",
              progress=False)

    def first():
        return vijax.fit(jax.random.key(0), family, model.log_joint, params0, **kw)

    def again(state):
        return vijax.fit(None, family, model.log_joint, state, **kw)

    return Workload(name, d, steps, first, again)


def bam_workload(d: int, steps: int) -> Workload:
    model = blr_model(d)
    params0 = vijax.full_rank().init(model.latent)
    kw = dict(num_steps=steps, batch_size=d // 2, progress=False)

    def first():
        return vijax.batch_and_match(jax.random.key(0), model.log_joint, params0, **kw)

    def again(state):
        return vijax.batch_and_match(None, model.log_joint, state, **kw)

    return Workload(f"batch_and_match d={d}", d, steps, first, again)


def make_workloads(dims, ng_dims, fit_steps, bam_steps) -> list:
    w = [fit_workload(f"fit stl d={d}", d, fit_steps, natural=False) for d in dims]
    w += [bam_workload(d, bam_steps) for d in dims]
    w += [fit_workload(f"natural_gradient d={d}", d, fit_steps, natural=True) for d in ng_dims]
    return w


# ---------------------------------------------------------------- measuring
def _set(setting: str) -> None:
    os.environ[ENV] = setting


def timed_call(w: Workload, state, setting: str):
    """Seconds of one continued call under ``setting``; checks nothing compiled."""
    _set(setting)
    with CompileTime() as ct:
        t0 = time.perf_counter()
        res = w.again(state)
        jax.block_until_ready(res.state)
        sec = time.perf_counter() - t0
    return sec, ct.seconds, int(np.sum(res.num_skipped))


def blas_info() -> dict:
    """Each BLAS library's thread count, with the cap off (0) and on (1)."""
    import scipy.linalg.cython_lapack  # noqa: F401  (what jaxlib loads)
    from threadpoolctl import threadpool_info

    def libs():
        return [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
                for i in threadpool_info() if i.get("user_api") == "blas"]

    out = {}
    for setting in (BEFORE, AFTER):
        _set(setting)
        with _blas.limited():
            out[setting] = libs()
    return out


def start_busy():
    env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV}
    proc = subprocess.Popen([sys.executable, "-c", BUSY_CODE], stdout=subprocess.PIPE,
                            text=True, env=env)
    import json

    head = json.loads(proc.stdout.readline())
    time.sleep(BUSY_WARM_S)
    return proc, head


def stop_busy(proc) -> dict:
    import json

    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        out, _ = proc.communicate()
        return {"products": None, "seconds": None}
    return json.loads(out.strip().splitlines()[-1])


def run_condition(condition: str, workloads, states, repeats: int, min_repeats: int,
                  log) -> dict:
    busy = None
    info: dict = {"load_start": list(os.getloadavg())}
    if condition == "busy":
        busy, head = start_busy()
        info["busy_blas"] = head["blas"]
    t_start = time.perf_counter()
    rows = []
    try:
        for w in workloads:
            st = states[w.name]
            for setting in (BEFORE, AFTER):  # untimed: threads started, caches warm
                timed_call(w, st, setting)
            times = {BEFORE: [], AFTER: []}
            compile_s = skipped = 0
            t_w = time.perf_counter()
            for r in range(repeats):
                if r >= min_repeats and time.perf_counter() - t_w > BUDGET_S:
                    break
                order = (BEFORE, AFTER) if r % 2 == 0 else (AFTER, BEFORE)
                for setting in order:
                    sec, c, sk = timed_call(w, st, setting)
                    times[setting].append(1e3 * sec / w.steps)
                    compile_s += c
                    skipped += sk
            row = {"workload": w.name, "d": w.d, "steps_per_call": w.steps,
                   "condition": condition, "repeats": len(times[BEFORE]), "compile_s_in_timed_calls": round(compile_s, 3),
                   "skipped_steps_in_timed_calls": skipped, "load_after": list(os.getloadavg())}
            for setting, key in ((BEFORE, "before"), (AFTER, "after")):
                ms = times[setting]
                row[key] = {"ms_per_step": [round(m, 4) for m in ms],
                            "median": statistics.median(ms), "min": min(ms), "max": max(ms)}
            row["ratio"] = row["before"]["median"] / row["after"]["median"]
            rows.append(row)
            log(f"  {condition:4s} {w.name:24s} before {row['before']['median']:8.3f} "
                f"[{row['before']['min']:.3f}, {row['before']['max']:.3f}]  after "
                f"{row['after']['median']:8.3f} [{row['after']['min']:.3f}, "
                f"{row['after']['max']:.3f}] ms/step  ratio {row['ratio']:.2f}")
    finally:
        _set(AFTER)
        if busy is not None:
            done = stop_busy(busy)
            info["busy_products"] = done["products"]
            info["busy_seconds"] = done["seconds"]
            if done["products"] and done["seconds"]:
                info["busy_products_per_s"] = done["products"] / done["seconds"]
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    info["load_end"] = list(os.getloadavg())
    return {"info": info, "rows": rows}


# ---------------------------------------------------------------- report
def _fmt(x: dict) -> str:
    return f"{x['median']:.3f} [{x['min']:.3f}, {x['max']:.3f}]"


def _load(l) -> str:
    return ", ".join(f"{v:.2f}" for v in l)


def notes(results: dict) -> list:
    out = []
    rows = results["rows"]
    for cond in ("idle", "busy"):
        rs = [r for r in rows if r["condition"] == cond]
        if not rs:
            continue
        ratios = [r["ratio"] for r in rs]
        out.append(f"**{cond}**: before/after ratio {min(ratios):.2f}-{max(ratios):.2f} "
                   f"over the {len(rs)} workloads (above 1: the cap is faster).")
        for r in rs:
            if r["ratio"] < 0.95:
                out.append(f"{cond} / {r['workload']}: capping at one thread is "
                           f"{100 * (1 / r['ratio'] - 1):.0f}% slower per step "
                           f"({_fmt(r['after'])} ms against {_fmt(r['before'])}).")
            overlap = not (r["before"]["max"] < r["after"]["min"]
                           or r["after"]["max"] < r["before"]["min"])
            if overlap and abs(r["ratio"] - 1) > 0.05:
                b, a = r["before"]["ms_per_step"], r["after"]
                above = sum(x > a["max"] for x in b)
                below = sum(x < a["min"] for x in b)
                out.append(f"{cond} / {r['workload']}: the before and after ranges over "
                           f"repeats overlap ({above} of {len(b)} before calls slower than the "
                           f"slowest after call, {below} faster than the fastest).")
    bad = [r for r in rows if r["compile_s_in_timed_calls"] > COMPILE_TOL_S]
    if bad:
        out.append("Compilation happened inside timed calls (should not): "
                   + ", ".join(f"{r['condition']} / {r['workload']} "
                               f"({r['compile_s_in_timed_calls']} s)" for r in bad))
    sk = [r for r in rows if r["skipped_steps_in_timed_calls"]]
    if sk:
        out.append("Steps skipped (non-finite) in timed calls: "
                   + ", ".join(f"{r['condition']} / {r['workload']}: "
                               f"{r['skipped_steps_in_timed_calls']}" for r in sk)
                   + " (a skipped step costs the same work).")
    s = results["settings"]
    if s["openblas_num_threads"] not in (None, ""):
        out.append(f"OPENBLAS_NUM_THREADS={s['openblas_num_threads']} was set: 'before' is not "
                   "OpenBLAS's default threading (see the thread counts above).")
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    q = s["quick"]
    cmd = "python -m benchmarks.blas_threads" + (" --quick" if q else "")
    lines = [
        "# BLAS threads during fits: OpenBLAS's default threading (before) vs one thread (after)"
        + (" (quick smoke run)" if q else ""),
        "",
        f"Reproduce: `{cmd}` (OPENBLAS_NUM_THREADS unset); see the module docstring of "
        "`benchmarks/blas_threads.py` for the protocol.",
        "",
        f"Machine: {_machine.one_line(results['machine'])}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + f". Environment: OPENBLAS_NUM_THREADS={s['openblas_num_threads']}, "
        + "".join(f"{k}={v}, " for k, v in s.get("openblas_env", {}).items()
                  if k != "OPENBLAS_NUM_THREADS")
        + f"XLA_FLAGS={s['xla_flags']!r}. Total run time {results['total_wall_s']:.0f} s.",
        "",
        "BLAS libraries in the process (threadpoolctl) and their thread counts under each "
        "setting:",
        "",
    ]
    for setting, libs in results["blas"].items():
        lines.append(f"- `{ENV}={setting}`: " + "; ".join(
            f"{lib['internal_api']} {lib['version']} ({os.path.basename(lib['filepath'])}): "
            f"{lib['num_threads']} thread(s)" for lib in libs))
    lines += [
        "",
        "## How measured",
        "",
        f"float32; fits of `vijax.full_rank()` on Bayesian linear regression (n = {N_ROWS}). "
        f"`fit stl`: `optax.adam(1e-2)`, estimator \"stl\", S = {NUM_SAMPLES}, "
        f"{s['fit_steps']} steps per call. `batch_and_match`: batch_size = d // 2, "
        f"{s['bam_steps']} steps per call. `natural_gradient`: "
        "`vijax.natural_gradient(family, lambda t: 0.3 / (1 + t / 50), "
        f"max_variance_growth=2)`, \"stl\", S = {NUM_SAMPLES}, {s['fit_steps']} steps. "
        "Each workload compiles once; every timed call continues from the first call's "
        "`res.state` (identical work, no compilation: checked). "
        f"`{ENV}` is set in `os.environ` before each call. Per workload and condition: one "
        f"untimed call per setting, then {s['repeats']} repeats of one call per setting "
        f"(fewer, not under {s['min_repeats']}, once a workload has taken {s['budget_s']:.0f} s; "
        "the **n** column), the order alternating. **ms/step** = call wall time / steps: median "
        "[min, max] over the repeats. **ratio** = median before / median after "
        "(above 1: one thread is faster).",
        "",
        "Conditions: **idle**: nothing else started by the benchmark (a shared machine: "
        "see the load averages); **busy**: a background process multiplying "
        f"{BUSY_N} x {BUSY_N} float64 matrices in a loop with NumPy's default OpenBLAS "
        "threading, for the whole condition.",
        "",
    ]
    for cond, c in results["conditions"].items():
        i = c["info"]
        line = (f"- **{cond}**: load averages (1, 5, 15 min) {_load(i['load_start'])} at its "
                f"start, {_load(i['load_end'])} at its end; {i['wall_s']:.0f} s.")
        if cond == "busy" and i.get("busy_products_per_s"):
            line += (f" The background process did {i['busy_products_per_s']:.1f} products/s "
                     f"({i['busy_products']} in {i['busy_seconds']:.0f} s); its BLAS: "
                     + "; ".join(f"{b['internal_api']} {b['num_threads']} thread(s)"
                                 for b in i["busy_blas"]) + ".")
        lines.append(line)
    if results.get("uptime_before_idle"):
        lines.append(f"- `uptime` before the idle condition: `{results['uptime_before_idle']}`")
    lines += [
        "",
        "## Results",
        "",
        "| workload | condition | before ms/step [min, max] | after ms/step [min, max] "
        "| ratio before/after | n |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['workload']} | {r['condition']} | {_fmt(r['before'])} | "
                     f"{_fmt(r['after'])} | {r['ratio']:.2f} | {r['repeats']} |")
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in notes(results)]
    lines += [f"- {n}" for n in results.get("extra_notes", [])]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    import scipy
    import threadpoolctl

    return {"jax": jax.__version__, "vijax": vijax.__version__, "optax": optax.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__,
            "threadpoolctl": threadpoolctl.__version__}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="d = 100 only, fewer steps, 2 repeats: a smoke test")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--conditions", nargs="+", choices=("idle", "busy"),
                        default=("idle", "busy"))
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite the .md from the existing .json (its extra_notes too)")
    args = parser.parse_args(argv)

    q = args.quick
    stem = "blas_threads_quick" if q else "blas_threads"
    if args.markdown_only:
        import json

        with open(os.path.join(args.out, f"{stem}.json")) as f:
            results = json.load(f)
        _machine.write_results(args.out, stem, results, markdown(results))
        return results
    dims = QUICK["dims"] if q else DIMS
    ng_dims = QUICK["ng_dims"] if q else NG_DIMS
    fit_steps = QUICK["fit_steps"] if q else FIT_STEPS
    bam_steps = QUICK["bam_steps"] if q else BAM_STEPS
    repeats = args.repeats or (QUICK["repeats"] if q else REPEATS)
    min_repeats = QUICK["repeats"] if q else MIN_REPEATS
    log = lambda s: print(s, flush=True)  # noqa: E731
    env_before = os.environ.get(ENV)
    results = {
        "settings": {
            "quick": q, "dims": list(dims), "natural_gradient_dims": list(ng_dims),
            "n_rows": N_ROWS, "num_samples": NUM_SAMPLES, "fit_steps": fit_steps,
            "bam_steps": bam_steps, "repeats": repeats,
            "min_repeats": min_repeats, "budget_s": BUDGET_S, "dtype": "float32",
            "busy_matrix": BUSY_N, "conditions": list(args.conditions),
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "openblas_env": {k: v for k, v in sorted(os.environ.items())
                             if k.startswith("OPENBLAS_")},
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "xla_flags": os.environ.get("XLA_FLAGS"),
        },
        "machine": _machine.describe(),
        "versions": _versions(),
        "rows": [],
        "conditions": {},
    }
    start = time.perf_counter()
    try:
        workloads = make_workloads(dims, ng_dims, fit_steps, bam_steps)
        states, first = {}, {}
        for w in workloads:
            _set(AFTER)
            with CompileTime() as ct:
                t0 = time.perf_counter()
                res = w.first()
                jax.block_until_ready(res.state)
                first[w.name] = {"first_call_s": round(time.perf_counter() - t0, 2),
                                 "compile_s": round(ct.seconds, 2),
                                 "skipped": int(np.sum(res.num_skipped))}
            states[w.name] = res.state
            log(f"compiled {w.name}: {first[w.name]}")
        results["first_calls"] = first
        results["blas"] = blas_info()
        for cond in args.conditions:
            if cond == "idle":
                try:
                    results["uptime_before_idle"] = subprocess.run(
                        ["uptime"], capture_output=True, text=True).stdout.strip()
                except OSError:
                    pass
            log(f"{cond} (load averages {_load(os.getloadavg())})")
            c = run_condition(cond, workloads, states, repeats, min(min_repeats, repeats), log)
            results["conditions"][cond] = c
            results["rows"] += c["rows"]
    finally:
        if env_before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = env_before
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    _machine.write_results(args.out, stem, results, markdown(results))
    log(f"wrote {os.path.join(args.out, stem)}.{{json,md}} in {results['total_wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
