"""The benchmark suite: is vijax fast enough, on your CPU or GPU?

Run ``python -m benchmarks --suite quick|full [--device cpu|gpu] [--out DIR]``.

For each configuration (a problem, a family, an estimator, a number of
draws S per step) the suite builds the same fit four ways (see
``benchmarks/_impls.py``): ``vijax.fit``, the *floor* (a hand-written jitted
``lax.scan`` + optax loop doing the same work), and, when installed, NumPyro's
``SVI`` and Blackjax's ``meanfield_vi`` / ``fullrank_vi``, all with
``optax.adam(1e-2)`` from ``N(0, 0.1^2 I)`` in float32. It measures:

* **steady-state time per step**: the median over ``repeats`` timed calls of
  K steps each (K chosen per configuration so that a call lasts about
  ``call_seconds``), after a warm-up; the implementations' repeats are
  interleaved so that background load hits them alike; every call ends with
  ``block_until_ready``. Ratios to the floor come from the same run.
* **end to end**: the wall time of a fixed-length fit (``fit_steps`` steps)
  in this process from fresh objects (nothing cached): building the
  implementation, compiling and running. ``vijax.fit`` is called once with
  ``num_steps=fit_steps``; the scanned loops are called in chunks of K steps.
  This cold run is also the warm-up: it is excluded from the steady state.
* **compile time**: the seconds JAX spent tracing, lowering and
  XLA-compiling during that cold fit, from JAX's own monitoring events
  (``benchmarks/_timing.py``), with the three stages reported apart. The
  JSON also holds ``one_time_s``, the end-to-end time minus ``fit_steps``
  steady-state steps (compilation plus every other one-time cost, noisier).
* **peak memory**: XLA's compiled memory analysis of the K-step program
  (arguments + outputs - aliased + temporaries), the device memory the
  program needs at its peak. (Per-program, so comparable across
  implementations on any backend; process-wide counters are not.)
* **gradient evaluations to tolerance**: the number of log-density gradient
  evaluations (steps x S) until the exact ``KL(q || p) - min_family KL``
  falls below ``tol``, checked every ``check_every`` steps up to
  ``max_steps`` (see ``benchmarks/_problems.py`` for the exact yardsticks).

Results go to ``<out>/suite_<name>.json`` (everything, with the machine
description), ``suite_<name>.md`` (tables with ratios to the floor) and
``suite_<name>.png``; the default ``<out>`` is ``benchmarks/results/<backend>``
(``cpu`` or ``gpu``). ``--render FILE.json`` redraws the markdown and plot from
a stored JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARNING_RATE = 1e-2


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: a problem, a family, an estimator, S draws per step."""

    model: str
    n: int
    d: int
    num_samples: int
    family: str
    estimator: str
    converge: bool = True

    @property
    def id(self) -> str:
        return (f"{self.model} n={self.n} d={self.d} S={self.num_samples} "
                f"{self.family} {self.estimator}")


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named list of configurations and how hard to measure them."""

    name: str
    configs: tuple
    fit_steps: int  # the fixed length of the end-to-end fit
    repeats: int  # timed calls per implementation (median reported)
    call_seconds: float | None  # target duration of one timed call (None: K = fit_steps)
    tol: float  # nats, for gradient evaluations to tolerance
    check_every: int
    max_steps: int
    description: str = ""


def _grid(models, ns, ds, ss, families, estimators, converge=lambda c: True):
    out = []
    for model in models:
        for n in ns:
            for d in ds:
                for s in ss:
                    for fam in families:
                        for est in estimators:
                            c = Config(model, n, d, s, fam, est)
                            out.append(dataclasses.replace(c, converge=converge(c)))
    return out


def _unique(configs):
    seen, out = set(), []
    for c in configs:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return tuple(out)


FAMILIES = ("mean_field", "full_rank")
ESTIMATORS = ("reparam", "stl")

SUITES = {
    "quick": Suite(
        name="quick",
        configs=_unique(
            _grid(["blr"], [1000], [10, 100], [8], FAMILIES, ESTIMATORS)
            + _grid(["blr"], [1000], [100], [1, 64], FAMILIES, ["reparam"],
                    lambda c: False)
            + _grid(["logistic"], [1000], [20], [8], FAMILIES, ESTIMATORS)
        ),
        fit_steps=1000, repeats=5, call_seconds=0.1, tol=0.1, check_every=50,
        max_steps=3000,
        description="Bayesian linear regression (BLR) with n = 1000 at d = 10 and 100 "
                    "(S = 8), and at S = 1 and 64 (d = 100, timing only); logistic "
                    "regression with n = 1000, d = 20. A few minutes on 2 CPU cores.",
    ),
    "full": Suite(
        name="full",
        configs=_unique(
            _grid(["blr"], [1000], [10, 100, 500, 2000], [8], FAMILIES, ESTIMATORS,
                  lambda c: c.d <= 100)
            + _grid(["blr"], [1000], [100], [1, 8, 64, 512, 4096], FAMILIES, ESTIMATORS,
                    lambda c: c.num_samples <= 512)
            + _grid(["blr"], [100, 1000, 10000], [100], [8], FAMILIES, ESTIMATORS)
            + _grid(["blr"], [1000], [500, 2000], [512, 4096], FAMILIES, ["stl"],
                    lambda c: False)
            + _grid(["logistic"], [1000], [20, 100], [8, 64], FAMILIES, ESTIMATORS)
        ),
        fit_steps=1000, repeats=5, call_seconds=0.2, tol=0.1, check_every=50,
        max_steps=10000,
        description="Sweeps over d (10 to 2000), S (1 to 4096) and n (100 to 10000) on "
                    "BLR, and logistic regression at d = 20, 100. Meant for a GPU: on a "
                    "CPU the d = 2000, S = 4096 configurations take hours.",
    ),
    "smoke": Suite(
        name="smoke",
        configs=(
            Config("blr", 50, 3, 2, "mean_field", "reparam"),
            Config("logistic", 50, 3, 2, "full_rank", "stl"),
        ),
        fit_steps=20, repeats=2, call_seconds=None, tol=0.5, check_every=20,
        max_steps=100,
        description="A tiny run that checks the runner works (used by the tests).",
    ),
}


# ----------------------------------------------------------------- measuring
def _steps_per_call(probe_s_per_step: float, suite: Suite) -> int:
    """The largest divisor of fit_steps whose call lasts about call_seconds."""
    divisors = [k for k in range(1, suite.fit_steps + 1) if suite.fit_steps % k == 0]
    fits = [k for k in divisors if k * probe_s_per_step <= suite.call_seconds]
    floor_k = min(10, suite.fit_steps)
    return max(fits + [min(k for k in divisors if k >= floor_k)])


def _probe(problem, cfg: Config, suite: Suite, seed: int):
    """Returns a floor compiled for ``check_every`` steps and its seconds per step.

    The time sizes the timed calls; the floor is reused for the floor's
    convergence run (it is not the floor that is timed: that one is built
    cold).
    """
    from benchmarks import _impls, _timing

    impl = _impls.build_floor(problem, cfg.family, cfg.estimator, cfg.num_samples,
                              LEARNING_RATE, seed)
    k = suite.check_every
    state, _ = _timing.timed(impl.run, impl.init(), k)
    times = []
    for _ in range(3):
        state, dt = _timing.timed(impl.run, state, k)
        times.append(dt / k)
    return impl, min(times)


def _convergence(impl, problem, cfg: Config, suite: Suite, confirm: int = 2) -> dict:
    """Steps until the exact gap < tol, checked every check_every steps.

    At a plateau the gap fluctuates around the estimator's noise floor, so a
    single lucky check is not convergence: the gap must also stay below
    ``tol`` at the ``confirm`` following checks; the steps reported are those
    of the first of these checks.
    """
    import jax

    state = impl.init()
    trace = [[0, problem.gap(cfg.family, *impl.gaussian(state))]]
    steps, below, first = 0, 0, None
    while steps < suite.max_steps or (first is not None and below <= confirm):
        state = jax.block_until_ready(impl.run(state, suite.check_every))
        steps += suite.check_every
        gap = problem.gap(cfg.family, *impl.gaussian(state))
        trace.append([steps, gap])
        if not math.isfinite(gap):
            first = None
            break
        if gap < suite.tol:
            below += 1
            first = steps if first is None else first
            if below > confirm:
                break
        else:
            below, first = 0, None
    reached = first is not None and below > confirm
    return {
        "tol": suite.tol,
        "confirm_checks": confirm,
        "reached": reached,
        "steps": first if reached else None,
        "evals": first * cfg.num_samples if reached else None,
        "final_gap": trace[-1][1],
        "max_steps": suite.max_steps,
        "check_every": suite.check_every,
        "trace": trace,
    }


def measure(cfg: Config, suite: Suite, impl_names, *, seed: int = 0, log=print) -> dict:
    """Measures one configuration for every implementation in ``impl_names``."""
    import jax

    from benchmarks import _impls, _problems, _timing

    started = time.perf_counter()
    problem = _problems.make_problem(cfg.model, cfg.n, cfg.d)
    reference = problem.family_reference(cfg.family)  # logistic only; cached
    phases = {"problem": time.perf_counter() - started}
    probe_floor, probe = _probe(problem, cfg, suite, seed)
    phases["probe"] = time.perf_counter() - started - sum(phases.values())
    k = _steps_per_call(probe, suite) if suite.call_seconds else suite.fit_steps
    calls = suite.fit_steps // k
    record = {"id": cfg.id, "config": dataclasses.asdict(cfg), "steps_per_call": k,
              "fit_steps": suite.fit_steps, "repeats": suite.repeats,
              "probe_s_per_step": probe, "optimum_kl": problem.optimum_kl.get(cfg.family),
              "impls": {}, "skipped": {}}
    if reference is not None:  # the optimum's scalars (not its mean and sd arrays)
        record["reference"] = {k: v for k, v in reference.items() if k not in ("mean", "sd")}
    impls, states = {}, {}
    for name in impl_names:
        if not _impls.applies(name, cfg.estimator):
            record["skipped"][name] = f"has no {cfg.estimator!r} estimator"
            continue
        builder = _impls.BUILDERS[name]
        with _timing.CompileTime() as compiling:
            t0 = time.perf_counter()
            impl = builder(problem, cfg.family, cfg.estimator, cfg.num_samples,
                           LEARNING_RATE, seed)
            state = impl.init()
            if name == "vijax.fit":  # one call for the whole fit, as a user would
                state = impl.run(state, suite.fit_steps)
            else:  # the scanned loops, in chunks of K steps
                for _ in range(calls):
                    state = impl.run(state, k)
            state = jax.block_until_ready(state)
            end_to_end = time.perf_counter() - t0
        impls[name], states[name] = impl, state
        record["impls"][name] = {
            "end_to_end_s": end_to_end,
            "compile_s": compiling.seconds,
            **compiling.stages,
            "times_s_per_step": [],
        }
    phases["cold"] = time.perf_counter() - started - sum(phases.values())
    for _ in range(suite.repeats):
        for name, impl in impls.items():
            states[name], dt = _timing.timed(impl.run, states[name], k)
            record["impls"][name]["times_s_per_step"].append(dt / k)
    phases["timed"] = time.perf_counter() - started - sum(phases.values())
    for name, impl in impls.items():
        r = record["impls"][name]
        r["steady_s_per_step"] = _timing.median(r["times_s_per_step"])
        r["min_s_per_step"] = min(r["times_s_per_step"])
        # Everything a cold fit costs beyond its steps (compiling, building,
        # host work); derived, so noisier than compile_s.
        r["one_time_s"] = max(0.0, r["end_to_end_s"] - suite.fit_steps * r["steady_s_per_step"])
        r["memory"] = impl.memory(states[name], k)
    phases["memory"] = time.perf_counter() - started - sum(phases.values())
    floor = record["impls"].get("floor")
    for name, r in record["impls"].items():
        if floor:
            r["ratio_to_floor"] = r["steady_s_per_step"] / floor["steady_s_per_step"]
            r["min_ratio_to_floor"] = r["min_s_per_step"] / floor["min_s_per_step"]
    if cfg.converge:
        for name, impl in impls.items():
            if name == "floor":
                impl = probe_floor  # already compiled for check_every steps
            conv = _convergence(impl, problem, cfg, suite)
            if conv["reached"]:
                conv["time_to_tol_s"] = conv["steps"] * record["impls"][name]["steady_s_per_step"]
            record["impls"][name]["convergence"] = conv
    phases["convergence"] = time.perf_counter() - started - sum(phases.values())
    record["measure_s"] = time.perf_counter() - started
    record["phases_s"] = phases
    line = "  ".join(
        f"{name} {1e6 * r['steady_s_per_step']:.0f}us"
        + (f" x{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else "")
        for name, r in record["impls"].items()
    )
    log(f"{cfg.id}: K={k}  {line}  ({record['measure_s']:.0f} s)")
    return record


# ------------------------------------------------------------------ the run
def _versions() -> dict:
    import jax
    import optax

    import vijax

    out = {"vijax": vijax.__version__, "jax": jax.__version__, "optax": optax.__version__}
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    for name in ("numpyro", "blackjax"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def _select_device(device: str | None) -> None:
    """Points JAX at ``device`` ("cpu" or "gpu"); fails clearly if it is not there."""
    import jax

    if device is None:
        return
    platform = {"cpu": "cpu", "gpu": "cuda"}[device]
    try:
        jax.config.update("jax_platforms", platform)
        backend = jax.default_backend()
    except Exception as e:  # RuntimeError, or a bare assertion in some JAX versions
        raise SystemExit(
            f"--device {device}: JAX cannot initialize the {platform!r} platform "
            f"({type(e).__name__}: {e}). For a GPU, install JAX with CUDA "
            "(pip install -U 'jax[cuda12]')."
        ) from e
    if backend != device:
        raise SystemExit(
            f"--device {device}: JAX's backend is {backend!r} (JAX was initialized "
            "before the runner could choose; run it as `python -m benchmarks`)."
        )


def run_suite(suite: Suite, *, impl_names, config_filter=None, log=print) -> dict:
    """Runs ``suite`` and returns the results dict written to JSON."""
    import jax

    from benchmarks import _machine

    configs = [c for c in suite.configs
               if config_filter is None or re.search(config_filter, c.id)]
    if not configs:
        raise SystemExit(f"no configuration of suite {suite.name!r} matches "
                         f"--filter {config_filter!r}.")
    started = time.perf_counter()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = _machine.describe()
    try:
        machine["load_average_1_5_15_min"] = list(os.getloadavg())
    except OSError:
        pass
    log(f"suite {suite.name}: {len(configs)} configurations on {_machine.one_line(machine)}; "
        f"implementations: {', '.join(impl_names)}")
    records = [measure(c, suite, impl_names, log=log) for c in configs]
    device_stats = jax.devices()[0].memory_stats()
    return {
        "suite": suite.name,
        "description": suite.description,
        "filter": config_filter,
        "started_utc": when,
        "runtime_s": time.perf_counter() - started,
        "machine": machine,
        "versions": _versions(),
        "device_memory_stats": (
            {k: int(v) for k, v in device_stats.items() if "peak" in k or "limit" in k}
            if device_stats else None
        ),
        "settings": {
            "optimizer": f"optax.adam({LEARNING_RATE})",
            "dtype": "float32",
            "init": "N(0, 0.1^2 I)",
            "fit_steps": suite.fit_steps,
            "repeats": suite.repeats,
            "call_seconds": suite.call_seconds,
            "tol": suite.tol,
            "check_every": suite.check_every,
            "max_steps": suite.max_steps,
        },
        "implementations": list(impl_names),
        "configs": records,
    }


def _strict(obj):
    """``obj`` with non-finite floats as None, so that the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # NumPy scalars
        return _strict(obj.item())
    return obj


def write(results: dict, out: str) -> dict:
    """Writes ``suite_<name>.json``, ``.md`` and ``.png`` under ``out``; returns the paths.

    Non-finite numbers (a diverged fit's gap) are written as ``null``.
    """
    from benchmarks import _report

    results = _strict(results)
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"suite_{results['suite']}")
    paths = {"json": base + ".json", "md": base + ".md", "png": base + ".png"}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    with open(paths["md"], "w") as f:
        f.write(_report.markdown(results))
    _report.plot(results, paths["png"])
    return paths


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="vijax benchmark suite: time per step, compile time, end-to-end "
                    "time, peak memory and gradient evaluations to tolerance, against a "
                    "hand-written floor and (if installed) NumPyro and Blackjax.",
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick",
                        help="quick: < 5 min on 2 CPU cores; full: the sweeps, for a GPU; "
                             "smoke: a seconds-long check of the runner")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None,
                        help="the JAX backend (default: JAX's default)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: benchmarks/results/<backend>)")
    parser.add_argument("--filter", default=None, metavar="REGEX",
                        help="run only configurations whose id matches, e.g. 'd=100 '")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip NumPyro and Blackjax even when installed")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="redraw the markdown and plot from a stored results file")
    args = parser.parse_args(argv)

    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        paths = write(results, args.out or os.path.dirname(os.path.abspath(args.render)))
        print("wrote " + ", ".join(paths.values()))
        return results

    _select_device(args.device)
    import jax

    from benchmarks import _impls

    names = ["floor", "vijax.fit"]
    for peer in ("numpyro", "blackjax"):
        if args.no_peers:
            continue
        if _impls.available(peer):
            names.append(peer)
        else:
            print(f"{peer} is not installed: skipped (pip install -e '.[compare]')",
                  file=sys.stderr)
    results = run_suite(SUITES[args.suite], impl_names=names, config_filter=args.filter)
    out = args.out or os.path.join(_ROOT, "benchmarks", "results", jax.default_backend())
    paths = write(results, out)
    print(f"suite {args.suite}: {results['runtime_s']:.0f} s; wrote "
          + ", ".join(paths.values()))
    return results
