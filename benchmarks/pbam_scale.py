"""Patched batch and match (pBaM) at d = 10^3 and 10^4 on the CPU (issue #19).

Issue #19 claims "patched low-rank + diagonal BaM with per-step cost linear in
d, fitting d = 10^4 on the CPU". This script measures
:func:`vijax.patched_batch_and_match` (the family :func:`vijax.low_rank`,
``Sigma = W W^T + diag(s^2)`` of rank ``K = 5``) against full-rank
:func:`vijax.batch_and_match` and against ADVI (:func:`vijax.fit` with Adam)
in the same low-rank family, in float64.

**Problems.**

* ``gaussian``: a Gaussian target whose covariance is exactly rank 5 plus
  diagonal, ``vijax.Gaussian.low_rank(m, W*, s*)`` with ``m ~ N(0, I)``,
  ``W*_ij ~ N(0, 100 / d)`` (five directions of variance about 100 whatever
  d) and ``s*_i ~ U(0.5, 2)`` (seed 0), at d = 1000 and 10000 (100 with
  ``--quick``); ``log_joint = target.log_prob`` (O(d k) per evaluation). The
  target is in the family, so the family's optimum has KL 0; the distance is
  ``vijax.gaussian_kl(q, target)`` (O(d k^2) for a low-rank q).
* ``blr``: Bayesian linear regression ``vijax.models.bayesian_linear_regression(
  X, y, noise_scale=0.5, prior_scale=1.0)`` with d = 1000, n = 2000 rows
  (d = 100, n = 200 with ``--quick``), ``X_ij ~ N(0, 1 / d)``, ``w ~ N(0, I)``,
  ``y = X w + 0.5 eps`` (seed 1): posterior precision eigenvalues spread over
  about 1.7 to 24, neither low rank nor diagonal. The distance is the exact
  ``vijax.exact_kl(params, family, model)``. The best rank-5 Gaussian is not
  the posterior: its KL (the "family optimum") is computed once by L-BFGS
  (``optax.lbfgs``, 2000 iterations in a jitted scan) on the exact KL, and
  reported so that every KL can be read as a gap to it.

**Methods**, all from the family's default start (``family.init(latent)``:
mean 0, standard deviation 0.1) with the run key ``jax.random.key(0)``:

* ``pBaM B=b, patch p``: ``vijax.patched_batch_and_match(key, log_joint,
  vijax.low_rank(rank=5).init(latent), num_steps=T, batch_size=b,
  patch_steps=p, progress=False)`` with the default learning rate
  (``100 B d / (t + 1)``, capped) and trust region. On every problem, B = 32
  with the library's default ``patch_steps`` (marked "default"; read from
  the signature) and with each other ``p`` in (3, 10, 30) rounds of the
  patch per step (cost against accuracy; (3, 10) only at d = 10^4); B = 8
  and 128 with the default on the Gaussian at the smallest d.
* ``BaM B=b`` (full rank): ``vijax.batch_and_match(key, log_joint,
  vijax.full_rank().init(latent), ..., batch_size=b)`` at the smallest d only,
  b = 32 (like pBaM; capped at 1e4 evaluations, a step costs O(d^3) and it
  converges slowly with B << d) and b = d (BaM's usual regime). At d = 10^4 it is not run: the
  report gives XLA's memory analysis of one compiled BaM step there (its
  parameters alone are a 10^4 x 10^4 float64 matrix, 0.8 GB, and so is its
  output) and the O(d^3) extrapolation of the measured d = 1000 step time.
* ``ADVI lr=a``: ``vijax.fit(key, vijax.low_rank(rank=5), log_joint, init,
  optimizer=optax.adam(a), num_steps=T, num_samples=8, estimator="stl",
  progress=False)`` for a in {1e-3, 1e-2, 1e-1}; the table shows the best
  (fewest evaluations to the tolerance, else the lowest KL), the JSON all.

**Gradient evaluations**: pBaM and BaM evaluate ``log_joint`` and its
gradient at B points per step, ADVI at S = 8 points per step; evaluations =
steps x (B or S). Every method gets the same evaluation budget per problem:
1e5 at d = 1000 and on the BLR, 5e4 at d = 10^4 (5000 with ``--quick``),
except full-rank BaM B=32, capped at 1e4 (2000). The counts are checked, not assumed: on a
small Gaussian each driver runs 3 steps with a ``log_joint`` that counts its
own forward evaluations (``jax.debug.callback``), reported as measured
evaluations per step.

**How measured.** Each run is a sequence of calls continuing from
``result.state`` (``vijax.patched_batch_and_match(None, log_joint, state,
...)``, the same for BaM and ``vijax.fit``), ending at checkpoints whose step
counts grow by 10% (every step at first) plus the steps at each reported
budget (1e3, 1e4, 5e4 and 1e5 evaluations); the compiled chunk is reused
(same ``log_joint`` object, same settings). After each call the exact KL
is evaluated (jitted; not timed). A one-step warm-up call with another key
compiles the chunk first (its compile time is reported). A run stops at
its evaluation budget, or early when the KL is below ``STOP_KL`` = 1e-3
("converged": KL at later budgets is then reported as "< 1e-3"), when it
exceeds 10 x its initial KL or is not finite ("diverged"), or on
:class:`vijax.FitError` (20 consecutive skipped steps).

* Evaluations to KL <= ``TOL`` (0.01 nats): at the first checkpoint at or
  below it (so up to 10% high); if never, the lowest KL seen and where.
* Wall time to KL <= TOL: a fresh single call of that many steps from the
  start (compiled already), which must end at the same KL; where that would
  take over ``RERUN_LIMIT_S`` the sum of the chunked calls' times instead
  (marked †: includes one call's overhead per checkpoint). Neither includes
  compilation nor the KL evaluations.
* ms/step: steady state, after the run, continuing from each method's last
  state: calls of K steps (K chosen for about 0.5 s a call), 5 rounds (2
  with ``--quick``) interleaved across the methods of a problem (order rotated each
  round); the median call time / K. The min-max over rounds is in the JSON,
  as is the per-call overhead (median of a 1-step call minus one step).
* Skipped steps: ``result.trace.skipped`` summed over the run's calls.
* Peak RSS: the process's ``VmHWM`` (``/proc/self/status``) after the run,
  with the peak reset (``/proc/self/clear_refs``) just before its warm-up
  call; "extra" is that peak minus the RSS at the reset (a lower bound on what
  the run needed: memory freed by earlier runs but kept by the allocator is
  reused).

Environment: ``OPENBLAS_NUM_THREADS=1`` (set by this script before JAX is
imported when run as a script; vijax also caps BLAS inside its loops),
``JAX_PLATFORMS=cpu``. Float64 is switched on in :func:`main` only (never at
import). The load average is recorded before and after: other processes may
share the machine's cores.

To measure a commit other than the checkout (say while vijax is being
edited), export it and run this script inside the export: ``git archive C |
tar -x -C DIR; cp benchmarks/pbam_scale.py DIR/benchmarks/; cd DIR; python -m
benchmarks.pbam_scale --vijax-commit C --out RESULTS``. The JSON records the
vijax folder, a hash of its sources and the commit.

Run ``python -m benchmarks.pbam_scale [--quick] [--out DIR]``. The full run
(about 20 minutes on 2 cores) writes
``benchmarks/results/cpu/pbam_scale.{json,md}``; ``--quick`` (d = 100, small
budgets, about 2 minutes) writes ``pbam_scale_quick.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from benchmarks._machine import proc_status, reset_peak

if __name__ == "__main__":  # before NumPy / JAX load BLAS
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vijax
from benchmarks import _machine
from benchmarks._timing import CompileTime

K = 5
TOL = 1e-2
STOP_KL = 1e-3
DIVERGE_FACTOR = 10.0
GROWTH = 1.1
BATCH = 32
BATCH_SWEEP = (8, 128)
PATCH_VARIANTS = (3, 10, 30)  # rows at B = 32 besides the default (smallest d, BLR)
PATCH_VARIANTS_LARGE = (3, 10)  # the same at the larger d (a step there costs 10x)
ADVI_LRS = (1e-3, 1e-2, 1e-1)
ADVI_SAMPLES = 8
RUN_KEY, WARM_KEY = 0, 1
RERUN_LIMIT_S = 90.0
TARGET_CALL_S = 0.5

FULL = dict(dims=(1000, 10000), blr_d=1000, blr_n=2000, budgets=(1000, 10_000, 50_000, 100_000),
            max_evals={1000: 100_000, 10000: 50_000}, blr_max_evals=100_000,
            bam32_max_evals=10_000, repeats=5, lbfgs_iters=2000)
QUICK = dict(dims=(100,), blr_d=100, blr_n=200, budgets=(1000, 5000), max_evals={100: 5000},
             blr_max_evals=5000, bam32_max_evals=2000, repeats=2, lbfgs_iters=500)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(_ROOT, "benchmarks", "results", "cpu")


# ------------------------------------------------------------------ problems
class LogJoint:
    """A log joint hashable by identity, so the drivers' compiled chunks are reused."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, z):
        return self.fn(z)


@dataclass
class Problem:
    name: str
    d: int
    log_joint: LogJoint
    latent: jax.Array
    low_rank: object  # the vijax.low_rank(rank=K) family object every low-rank method uses
    kl_low_rank: Callable
    kl_full_rank: Callable
    family_optimum_kl: float
    info: dict


def gaussian_problem(d: int, k: int = K, seed: int = 0) -> Problem:
    """The rank-k-plus-diagonal Gaussian target of the module docstring."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(d)
    w = rng.standard_normal((d, k)) * (10.0 / math.sqrt(d))
    s = rng.uniform(0.5, 2.0, d)
    target = vijax.Gaussian.low_rank(jnp.asarray(mean), jnp.asarray(w), jnp.asarray(s))
    fam, fr = vijax.low_rank(rank=k), vijax.full_rank()
    kl_lr = jax.jit(lambda p: vijax.gaussian_kl(fam.to_gaussian(p), target))
    kl_fr = jax.jit(lambda p: vijax.gaussian_kl(fr.to_gaussian(p), target))
    return Problem(
        name="gaussian", d=d, log_joint=LogJoint(target.log_prob), latent=jnp.zeros(d),
        low_rank=fam, kl_low_rank=lambda p: float(kl_lr(p)),
        kl_full_rank=lambda p: float(kl_fr(p)), family_optimum_kl=0.0,
        info=dict(seed=seed, k=k, w_scale="N(0, 100/d)", diag_scale="U(0.5, 2)"))


def blr_problem(d: int, n: int, seed: int = 1, lbfgs_iters: int = 2000) -> Problem:
    """Bayesian linear regression with X ~ N(0, 1/d); the rank-K family optimum by L-BFGS."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / math.sqrt(d)
    w = rng.standard_normal(d)
    y = x @ w + 0.5 * rng.standard_normal(n)
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(y), noise_scale=0.5, prior_scale=1.0)
    fam, fr = vijax.low_rank(rank=K), vijax.full_rank()
    kl_lr = jax.jit(lambda p: vijax.exact_kl(p, fam, model))
    kl_fr = jax.jit(lambda p: vijax.exact_kl(p, fr, model))
    t0 = time.perf_counter()
    opt_kl, last_change = family_optimum(model, fam, lbfgs_iters)
    prec = (x.T @ x) / 0.25 + np.eye(d)
    ev = np.linalg.eigvalsh(prec)
    return Problem(
        name="blr", d=d, log_joint=LogJoint(model.log_joint), latent=model.latent,
        low_rank=fam, kl_low_rank=lambda p: float(kl_lr(p)),
        kl_full_rank=lambda p: float(kl_fr(p)), family_optimum_kl=opt_kl,
        info=dict(seed=seed, n=n, noise_scale=0.5, prior_scale=1.0,
                  precision_eigenvalue_range=[float(ev[0]), float(ev[-1])],
                  family_optimum_lbfgs_iters=lbfgs_iters,
                  family_optimum_last_change=last_change,
                  family_optimum_s=round(time.perf_counter() - t0, 1)))


def family_optimum(model, fam, iters: int) -> tuple[float, float]:
    """min over the rank-K family of the exact KL, by L-BFGS; ``(KL, change over the last 10%)``."""
    f = lambda p: vijax.exact_kl(p, fam, model)  # noqa: E731
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, st = carry
            v, g = value_and_grad(p, state=st)
            u, st = solver.update(g, st, p, value=v, grad=g, value_fn=f)
            return (optax.apply_updates(p, u), st), v

        (p, _), vs = jax.lax.scan(body, (params, solver.init(params)), None, length=iters)
        return f(p), vs

    final, vs = run(fam.init(model.latent))
    vs = np.asarray(vs)
    return float(final), float(vs[int(0.9 * iters)] - float(final))


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "pbam", "bam" or "advi"
    per_step: int  # evaluations per step: B or S
    patch_steps: int = 3
    lr: Optional[float] = None
    max_evals: Optional[int] = None  # a cap below the problem's budget
    group: str = ""  # methods of one group: the table shows the best (ADVI's lr sweep)


class Driver:
    """Starts and continues one method's run through vijax's public drivers."""

    def __init__(self, method: Method, problem: Problem):
        self.m, self.p = method, problem
        lj = problem.log_joint
        if method.kind == "pbam":
            self.family = problem.low_rank
            kw = dict(batch_size=method.per_step, patch_steps=method.patch_steps, progress=False)
            self._call = lambda k, init, n: vijax.patched_batch_and_match(
                k, lj, init, num_steps=n, **kw)
            self.kl = problem.kl_low_rank
        elif method.kind == "bam":
            self.family = vijax.full_rank()
            self._call = lambda k, init, n: vijax.batch_and_match(
                k, lj, init, num_steps=n, batch_size=method.per_step, progress=False)
            self.kl = problem.kl_full_rank
        elif method.kind == "advi":
            self.family = problem.low_rank
            opt = optax.adam(method.lr)  # one object: the compiled chunk is cached on it
            self._call = lambda k, init, n: vijax.fit(
                k, self.family, lj, init, optimizer=opt, num_steps=n,
                num_samples=method.per_step, estimator="stl", progress=False)
            self.kl = problem.kl_low_rank
        else:
            raise ValueError(method.kind)
        self.init = self.family.init(problem.latent)

    def start(self, key: int, num_steps: int):
        return self._call(jax.random.key(key), self.init, num_steps)

    def more(self, state, num_steps: int):
        return self._call(None, state, num_steps)


def default_patch_steps() -> int:
    """``patch_steps``'s default in the vijax under test."""
    import inspect

    return inspect.signature(vijax.patched_batch_and_match).parameters["patch_steps"].default


def _pbam(b: int, p: int) -> Method:
    tag = " (default)" if p == default_patch_steps() else ""
    return Method(f"pBaM B={b}, patch {p}{tag}", "pbam", b, patch_steps=p)


def methods_for(problem: Problem, *, smallest_d: bool, bam32_max_evals: int) -> list[Method]:
    """The methods run on a problem (see the module docstring)."""
    main = default_patch_steps()
    ms = [_pbam(BATCH, main)]
    if problem.name == "gaussian" and smallest_d:
        ms += [_pbam(b, main) for b in BATCH_SWEEP]
    ms += [_pbam(BATCH, p) for p in (PATCH_VARIANTS if smallest_d else PATCH_VARIANTS_LARGE)
           if p != main]
    if smallest_d:
        ms.append(Method(f"BaM B={BATCH} (full rank)", "bam", BATCH, max_evals=bam32_max_evals))
        ms.append(Method(f"BaM B={problem.d} (full rank)", "bam", problem.d))
    ms += [Method(f"ADVI lr={lr:g}", "advi", ADVI_SAMPLES, lr=lr, group="ADVI")
           for lr in ADVI_LRS]
    return ms


# ------------------------------------------------------------------ memory
def step_memory(kind: str, problem: Problem, batch_size: int) -> dict:
    """XLA's memory analysis of one compiled BaM or pBaM step (compiled, never run)."""
    d = problem.d
    f64 = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, f64)  # noqa: E731
    if kind == "bam":
        step = vijax.make_bam_step(problem.log_joint, batch_size=batch_size)
        params = vijax.FullRankParams(loc=sds(d), raw_scale=sds(d), off_diag=sds(d, d))
    else:
        step = vijax.make_pbam_step(problem.log_joint, batch_size=batch_size)
        params = vijax.LowRankParams(loc=sds(d), raw_scale=sds(d), cov_factor=sds(d, K))
    state = vijax.FitState(params, (), jax.ShapeDtypeStruct((), jnp.int32),
                           jax.eval_shape(lambda: jax.random.key(0)))
    t0 = time.perf_counter()
    ma = jax.jit(step).lower(state).compile().memory_analysis()
    out = dict(kind=kind, d=d, batch_size=batch_size,
               compile_s=round(time.perf_counter() - t0, 2))
    if ma is None:
        return out
    for name in ("argument", "output", "alias", "temp"):
        out[f"{name}_bytes"] = int(getattr(ma, f"{name}_size_in_bytes", 0))
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"])
    return out


# ------------------------------------------------------------------ runs
def checkpoint_steps(max_steps: int, growth: float = GROWTH, extra=()) -> list[int]:
    """1, 2, 3, ... growing by ``growth`` up to ``max_steps`` (included), plus ``extra``."""
    out, s = [], 1
    while s < max_steps:
        out.append(s)
        s = max(s + 1, int(math.ceil(s * growth)))
    out.append(max_steps)
    return sorted({x for x in list(out) + list(extra) if 1 <= x <= max_steps})


def run_method(method: Method, problem: Problem, *, max_evals: int, budgets=(),
               tol: float = TOL, stop_kl: float = STOP_KL, log=print) -> dict:
    """One method's run with KL checkpoints (see the module docstring); returns its record."""
    drv = Driver(method, problem)
    per = method.per_step
    if method.max_evals is not None:
        max_evals = min(max_evals, method.max_evals)
    max_steps = max(1, max_evals // per)
    budget_steps = {int(e): int(e) // per for e in budgets if int(e) // per >= 1}
    grid = checkpoint_steps(max_steps, extra=[s for s in budget_steps.values() if s <= max_steps])
    rss0 = proc_status().get("VmRSS")
    peak_reset = reset_peak()
    t_all = time.perf_counter()
    with CompileTime() as ct:
        jax.block_until_ready(drv.start(WARM_KEY, 1).params)
    compile_s = ct.seconds
    kl0 = drv.kl(drv.init)
    curve = [dict(steps=0, evals=0, kl=kl0, wall_s=0.0)]
    state, done, wall, skipped, status, error = None, 0, 0.0, 0, "budget", None
    for s in grid:
        t0 = time.perf_counter()
        try:
            res = drv.start(RUN_KEY, s) if state is None else drv.more(state, s - done)
            jax.block_until_ready(res.params)
        except vijax.FitError as err:
            wall += time.perf_counter() - t0
            status, error = "FitError", str(err).split(". ")[0]
            if getattr(err, "result", None) is not None:
                skipped += int(np.sum(err.result.trace.skipped))
            if err.state is not None:
                state, done = err.state, int(err.state.step)
                curve.append(dict(steps=done, evals=done * per, kl=drv.kl(err.state.params),
                                  wall_s=wall))
            break
        wall += time.perf_counter() - t0
        state, done = res.state, s
        skipped += int(np.sum(res.trace.skipped))
        # The run's own iterate: the driver's verified ``params`` cost one more
        # batch per call, which ``evals`` does not count.
        kl = drv.kl(res.state.params)
        curve.append(dict(steps=s, evals=s * per, kl=kl, wall_s=wall))
        if not math.isfinite(kl) or kl > DIVERGE_FACTOR * kl0:
            status = "diverged"
            break
        if kl <= stop_kl:
            status = "converged"
            break
    peak = proc_status().get("VmHWM")
    run_s = time.perf_counter() - t_all

    reached = next((c for c in curve[1:] if c["kl"] <= tol), None)
    best = min(curve, key=lambda c: c["kl"] if math.isfinite(c["kl"]) else math.inf)
    rec = dict(method=asdict(method), max_evals=max_evals, max_steps=max_steps, status=status,
               error=error, steps_run=done, evals_run=done * per, skipped=skipped,
               initial_kl=kl0, last_kl=curve[-1]["kl"], best_kl=best["kl"],
               best_at_evals=best["evals"], compile_s=round(compile_s, 2),
               chunked_wall_s=wall, run_s=round(run_s, 1), curve=curve,
               peak_rss_mib=peak / 2**20 if peak else None,
               extra_rss_mib=(peak - rss0) / 2**20 if (peak and rss0 and peak_reset) else None)
    rec["evals_to_tol"] = reached["evals"] if reached else None
    rec["steps_to_tol"] = reached["steps"] if reached else None
    rec["wall_to_tol_s"], rec["wall_to_tol_kind"], rec["rerun_kl"] = None, None, None
    if reached:
        if reached["wall_s"] <= RERUN_LIMIT_S:
            t0 = time.perf_counter()
            res = drv.start(RUN_KEY, reached["steps"])
            jax.block_until_ready(res.params)
            rec["wall_to_tol_s"] = time.perf_counter() - t0
            rec["wall_to_tol_kind"] = "single call"
            rec["rerun_kl"] = drv.kl(res.params)
        else:
            rec["wall_to_tol_s"], rec["wall_to_tol_kind"] = reached["wall_s"], "chunked"
    kl_at = {}
    for e, s in budget_steps.items():
        hit = next((c for c in curve if c["steps"] == s), None)
        if hit is not None:
            kl_at[str(e)] = dict(kl=hit["kl"])
        elif s > max_steps:
            kl_at[str(e)] = dict(kl=None, why="over budget")
        else:
            kl_at[str(e)] = dict(kl=None, why=status)
    rec["kl_at_evals"] = kl_at
    rec["_state"] = state
    rec["_driver"] = drv
    log(f"  {method.label:28s} {status:9s} steps {done:6d} KL {curve[-1]['kl']:.4g} "
        f"(best {best['kl']:.4g} at {best['evals']} evals) to tol "
        f"{rec['evals_to_tol']} evals; skipped {skipped}; compile {compile_s:.1f} s, "
        f"run {run_s:.0f} s")
    return rec


def time_steady(records: list[dict], repeats: int, log=print) -> None:
    """Adds ``ms_per_step`` etc. to each record: interleaved calls continuing its last state."""
    live = [r for r in records if r.get("_state") is not None]
    for r in live:
        per_step_s = r["chunked_wall_s"] / max(1, r["steps_run"])
        r["timing_steps_per_call"] = int(min(500, max(2, round(TARGET_CALL_S / max(per_step_s,
                                                                                   1e-6)))))
        r["_times"], r["_one"] = [], []
        r["timing_error"] = None
    for rep in range(repeats):
        shift = rep % max(1, len(live))
        for r in live[shift:] + live[:shift]:
            if r["timing_error"] is not None:
                continue
            drv, n = r["_driver"], r["timing_steps_per_call"]
            try:
                t0 = time.perf_counter()
                res = drv.more(r["_state"], n)
                jax.block_until_ready(res.params)
                r["_times"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                res = drv.more(res.state, 1)
                jax.block_until_ready(res.params)
                r["_one"].append(time.perf_counter() - t0)
                r["_state"] = res.state
            except vijax.FitError as err:
                r["timing_error"] = str(err).split(". ")[0]
    for r in records:
        times, one = r.pop("_times", []), r.pop("_one", [])
        if not times:
            r["ms_per_step"] = None
            continue
        n = r["timing_steps_per_call"]
        r["ms_per_step"] = 1e3 * statistics.median(times) / n
        r["ms_per_step_min_max"] = [1e3 * min(times) / n, 1e3 * max(times) / n]
        r["call_overhead_ms"] = 1e3 * statistics.median(one) - r["ms_per_step"]
        r["timing_calls"] = len(times)
    log("  ms/step: " + ", ".join(f"{r['method']['label']} {r['ms_per_step']:.3g}"
                                  for r in records if r.get("ms_per_step")))


def count_evaluations(d: int = 8, steps: int = 3) -> dict:
    """Forward evaluations of log_joint per step, counted inside each driver's compiled loop."""
    count = [0]
    lock = threading.Lock()

    def bump(z):
        # Callbacks of one batch may run on several host threads at once.
        with lock:
            count[0] += z.shape[0] if z.ndim > 1 else 1

    def lj(z):
        jax.debug.callback(bump, z)
        return -0.5 * jnp.sum(jnp.square(z - 1.0))

    log_joint = LogJoint(lj)
    fam = vijax.low_rank(rank=2)
    opt = optax.adam(1e-2)
    runs = {
        f"pBaM B={BATCH}": (BATCH, lambda n: vijax.patched_batch_and_match(
            jax.random.key(0), log_joint, fam.init(jnp.zeros(d)), num_steps=n,
            batch_size=BATCH, progress=False)),
        f"BaM B={BATCH}": (BATCH, lambda n: vijax.batch_and_match(
            jax.random.key(0), log_joint, vijax.full_rank().init(jnp.zeros(d)), num_steps=n,
            batch_size=BATCH, progress=False)),
        f"ADVI S={ADVI_SAMPLES} stl": (ADVI_SAMPLES, lambda n: vijax.fit(
            jax.random.key(0), fam, log_joint, fam.init(jnp.zeros(d)), optimizer=opt,
            num_steps=n, num_samples=ADVI_SAMPLES, estimator="stl", progress=False)),
    }
    out = {}
    for name, (expected, fn) in runs.items():
        jax.block_until_ready(fn(1).params)  # compile (and count nothing below from it)
        jax.block_until_ready(fn(steps + 1).params)
        counted = []
        for n in (1, steps + 1):
            jax.effects_barrier()
            count[0] = 0
            jax.block_until_ready(fn(n).params)
            jax.effects_barrier()
            counted.append(count[0])
        # Per step from the difference of two calls; what a call costs beyond
        # its steps (the score-based drivers verify their last step on one more
        # batch) reported apart.
        per_step = (counted[1] - counted[0]) / steps
        out[name] = dict(expected_per_step=expected, measured_per_step=per_step,
                         extra_per_call=counted[0] - per_step)
    return out


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def best_of(records: list[dict]) -> dict:
    reached = [r for r in records if r["evals_to_tol"] is not None]
    if reached:
        return min(reached, key=lambda r: r["evals_to_tol"])
    return min(records, key=lambda r: r["best_kl"] if math.isfinite(r["best_kl"]) else math.inf)


def run_problem(problem: Problem, *, smallest_d: bool, max_evals: int, budgets, repeats: int,
                bam32_max_evals: int, log=print, methods=None) -> dict:
    log(f"{problem.name} d={problem.d}: family optimum KL {problem.family_optimum_kl:.4g}")
    methods = methods or methods_for(problem, smallest_d=smallest_d,
                                     bam32_max_evals=bam32_max_evals)
    records = [run_method(m, problem, max_evals=max_evals, budgets=budgets, log=log)
               for m in methods]
    time_steady(records, repeats, log=log)
    return dict(problem=problem.name, d=problem.d, info=problem.info,
                family_optimum_kl=problem.family_optimum_kl, max_evals=max_evals,
                runs=[_strip(r) for r in records])


# ------------------------------------------------------------------ report
def _g(x, digits=3) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _evals(e) -> str:
    return "—" if e is None else f"{e:,}".replace(",", " ")


def _ms(rec) -> str:
    """Median ms/step, with the fastest round in brackets (less sensitive to load)."""
    ms, mm = rec.get("ms_per_step"), rec.get("ms_per_step_min_max")
    if ms is None:
        return "—"
    return f"{_g(ms)} ({_g(mm[0])})" if mm else _g(ms)


def _kl_cell(rec, e) -> str:
    v = rec["kl_at_evals"].get(str(e))
    if v is None:
        return "—"
    if v["kl"] is not None:
        return _g(v["kl"])
    return {"converged": f"< {STOP_KL:g}", "over budget": "—", "diverged": "diverged",
            "FitError": "FitError"}.get(v["why"], v["why"])


def _machine_line(results) -> str:
    m = results["machine"]
    return _machine.one_line(m)


def markdown(results: dict) -> str:
    s = results["settings"]
    budgets = s["budgets"]
    la0, la1 = results["load_average_before"], results["load_average_after"]
    lines = [
        "# Patched batch and match (pBaM) against d" + (" (quick)" if s["quick"] else ""),
        "",
        f"Low-rank-plus-diagonal Gaussian VI (rank {s['k']}) with "
        "`vijax.patched_batch_and_match`, full-rank `vijax.batch_and_match` and ADVI "
        f"(`vijax.fit`, Adam, S = {s['advi_samples']}, stl) in float64, all from "
        "`family.init(latent)` with key 0. Evaluations: log-density gradient evaluations "
        "(steps x B for pBaM/BaM, steps x S for ADVI). See the module docstring of "
        "`benchmarks/pbam_scale.py` for the protocol.",
        "",
        f"Machine: {_machine_line(results)}. Environment: "
        + ", ".join(f"`{k}={v}`" for k, v in s["env"].items())
        + f". Load average (1, 5, 15 min) before {la0[0]:.2f}, {la0[1]:.2f}, {la0[2]:.2f}; "
        f"after {la1[0]:.2f}, {la1[1]:.2f}, {la1[2]:.2f}: other processes (test runs) shared "
        "the cores during the run, so the times are indicative (ms/step min-max over rounds "
        f"in the JSON). Runtime {results['total_wall_s']:.0f} s"
        + _source_text(results.get("vijax_source") or {})
        + (". Reproduce (inside a `git archive` export of that commit, with this script "
           "copied into its `benchmarks/`; see the module docstring): "
           if (results.get("vijax_source") or {}).get("exported") else ". Reproduce: ")
        + f"`{s['command']}`.",
        "",
        "## Results",
        "",
        f"Tolerance {s['tol']:g} nats; runs stop early below {STOP_KL:g} (\"< {STOP_KL:g}\" at "
        "later budgets) or above 10x their initial KL (diverged). *to tol*: evaluations "
        "(checked at steps growing by 10%) and wall time (s; † = sum of the chunked calls, "
        "else one fresh call) to KL <= tol. *best KL*: the lowest KL seen (at evaluations). "
        "ms/step: steady state, median of interleaved calls (the fastest in brackets). "
        "Skipped: steps rejected by the guards. Extra RSS: peak RSS during the run "
        "(compile included) minus the RSS before it (MiB).",
        "",
        "| problem | d | method | to tol: evals | to tol: wall (s) | "
        + " | ".join(f"KL @ {_evals(e)}" for e in budgets)
        + " | best KL (evals) | end | ms/step | skipped | extra RSS |",
        "|---|---:|---|---:|---:|" + "---:|" * len(budgets) + "---:|---|---:|---:|---:|",
    ]
    for prob in results["problems"]:
        runs = prob["runs"]
        groups: dict = {}
        for r in runs:
            g = r["method"]["group"] or r["method"]["label"]
            groups.setdefault(g, []).append(r)
        pname = (f"Gaussian (rank {prob['info'].get('k', K)} + diag)"
                 if prob["problem"] == "gaussian" else "BLR")
        for g, rs in groups.items():
            r = best_of(rs) if len(rs) > 1 else rs[0]
            label = r["method"]["label"] + (" (best lr)" if len(rs) > 1 else "")
            wall = r["wall_to_tol_s"]
            wall_s = "—" if wall is None else (f"{wall:.2f}" + ("†" if r["wall_to_tol_kind"]
                                                                == "chunked" else ""))
            to_tol = (_evals(r["evals_to_tol"]) if r["evals_to_tol"] is not None
                      else f"not in {_evals(r['evals_run'])}")
            end = r["status"] + (f" @ {_evals(r['evals_run'])}" if r["status"] != "budget" else "")
            lines.append(
                f"| {pname} | {prob['d']} | {label} | {to_tol} | {wall_s} | "
                + " | ".join(_kl_cell(r, e) for e in budgets)
                + f" | {_g(r['best_kl'])} ({_evals(r['best_at_evals'])}) | {end} | "
                f"{_ms(r)} | {r['skipped']} | {_g(r['extra_rss_mib'])} |")
        if prob["problem"] == "gaussian" and "bam_not_run" in prob:
            nr = prob["bam_not_run"]
            mem = next((m for m in results.get("step_memory") or []
                        if m["kind"] == "bam" and m["d"] == prob["d"] and "total_bytes" in m),
                       None)
            why = nr["why"] + (f", {mem['total_bytes'] / 2**30:.1f} GiB per step (XLA)"
                               if mem else "")
            lines.append(
                f"| {pname} | {prob['d']} | BaM B={BATCH} (full rank) | not run | | "
                + " | ".join("" for _ in budgets)
                + f" | | {why} | ~{_g(nr.get('extrapolated_ms_per_step'))} (O(d^3) "
                "extrapolated) | | |")
    lines.append("")
    lines += ["## Family optima and settings", ""]
    for prob in results["problems"]:
        extra = ""
        if prob["problem"] == "blr":
            i = prob["info"]
            extra = (f" (L-BFGS on the exact KL, {i['family_optimum_lbfgs_iters']} iterations, "
                     f"change over the last 10%: {i['family_optimum_last_change']:.2g}); "
                     f"n = {i['n']}, posterior precision eigenvalues "
                     f"{i['precision_eigenvalue_range'][0]:.3g} to "
                     f"{i['precision_eigenvalue_range'][1]:.3g}")
        lines.append(f"- {prob['problem']} d = {prob['d']}: rank-{s['k']} family optimum KL "
                     f"{prob['family_optimum_kl']:.4g}{extra}; evaluation budget "
                     f"{_evals(prob['max_evals'])} (BaM B={BATCH}: "
                     f"{_evals(s['bam32_max_evals'])}).")
    lines.append("")
    mem = results.get("step_memory") or []
    if mem:
        lines += ["## Memory of one compiled step (XLA memory analysis, compiled, not run)", "",
                  "| step | d | B | arguments (MiB) | outputs (MiB) | temporaries (MiB) "
                  "| total (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m in mem:
            if "total_bytes" not in m:
                continue
            mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
            lines.append(f"| {'full-rank BaM' if m['kind'] == 'bam' else 'pBaM'} | {m['d']} | "
                         f"{m['batch_size']} | {mib(m['argument_bytes'])} | "
                         f"{mib(m['output_bytes'])} | {mib(m['temp_bytes'])} | "
                         f"{mib(m['total_bytes'])} |")
        lines.append("")
    counts = results.get("evaluation_counts")
    if counts:
        lines += ["## Gradient evaluations per step, counted", "",
                  "Forward evaluations of `log_joint` per step counted inside each compiled "
                  "loop (`jax.debug.callback`, d = 8, 3 steps):", ""]
        for name, c in counts.items():
            ok = "matches" if abs(c["measured_per_step"] - c["expected_per_step"]) < 1e-9 \
                else "**differs**"
            extra = c.get("extra_per_call")
            lines.append(f"- {name}: {c['measured_per_step']:g} measured, "
                         f"{c['expected_per_step']} assumed ({ok})"
                         + (f"; {extra:g} more per call (the verification batch)"
                            if extra else ""))
        lines.append("")
    lines += ["## Every run", ""]
    for prob in results["problems"]:
        for r in prob["runs"]:
            lines.append(
                f"- {prob['problem']} d={prob['d']}, {r['method']['label']}: {r['status']} after "
                f"{_evals(r['evals_run'])} evals ({r['steps_run']} steps); initial KL "
                f"{_g(r['initial_kl'], 5)}, last {_g(r['last_kl'], 4)}, best {_g(r['best_kl'], 4)} "
                f"at {_evals(r['best_at_evals'])}; to tol: {_evals(r['evals_to_tol'])}; "
                f"skipped {r['skipped']}; compile {r['compile_s']:.1f} s; ms/step "
                f"{_g(r.get('ms_per_step'))}"
                + (f" ({_g(r['ms_per_step_min_max'][0])}-{_g(r['ms_per_step_min_max'][1])})"
                   if r.get("ms_per_step_min_max") else "")
                + (f", call overhead {r['call_overhead_ms']:.1f} ms"
                   if r.get("call_overhead_ms") is not None else "")
                + f"; peak RSS {_g(r['peak_rss_mib'], 4)} MiB"
                + (f"; error: {r['error']}" if r.get("error") else "")
                + (f"; timing: {r['timing_error']}" if r.get("timing_error") else ""))
    lines.append("")
    notes = results.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _vijax_source() -> dict:
    """Where the vijax under test comes from: its folder, a hash of its sources, its commit."""
    import hashlib

    root = os.path.dirname(os.path.abspath(vijax.__file__))
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    out = dict(path=root, sources_sha256=h.hexdigest()[:16], commit=None, dirty=None)
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True,  # noqa: E731
                                        text=True, timeout=10)
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode == 0 and head.stdout.strip():
            out["commit"] = head.stdout.strip()
            out["dirty"] = bool(git("status", "--porcelain", "--", ".").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _source_text(src: dict) -> str:
    if src.get("commit"):
        return (f"; vijax at commit {src['commit']}"
                + (" with uncommitted changes" if src.get("dirty") else "")
                + f" (sources sha256 {src['sources_sha256']})")
    return f"; vijax sources sha256 {src.get('sources_sha256')}"


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="d = 100, small budgets, two timing rounds (a smoke test)")
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help="Gaussian dimensions (default 1000 10000; --quick: 100)")
    parser.add_argument("--problems", nargs="+", choices=("gaussian", "blr"),
                        default=["gaussian", "blr"])
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory analysis of the compiled steps")
    parser.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--vijax-commit", default=None,
                        help="record this commit for the vijax under test (when it is a "
                        "`git archive` export, not a checkout)")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only rewrite the Markdown table next to an existing results JSON")
    args = parser.parse_args(argv)
    if args.render:
        import json

        with open(args.render) as f:
            results = json.load(f)
        results["notes"] = notes(results)
        md = markdown(results)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(md)
        print(md)
        return results
    # float64 throughout; set here, not at import, so that importing this
    # module changes no global setting.
    jax.config.update("jax_enable_x64", True)
    cfg = dict(QUICK if args.quick else FULL)
    dims = tuple(args.dims or cfg["dims"])
    log = lambda m: print(m, flush=True)  # noqa: E731
    command = "python -m benchmarks.pbam_scale" + (" --quick" if args.quick else "")
    if args.dims:
        command += " --dims " + " ".join(map(str, args.dims))
    if args.problems != ["gaussian", "blr"]:
        command += " --problems " + " ".join(args.problems)
    results = {
        "settings": dict(quick=args.quick, k=K, tol=TOL, stop_kl=STOP_KL, batch=BATCH,
                         batch_sweep=list(BATCH_SWEEP),
                         default_patch_steps=default_patch_steps(),
                         patch_variants=list(PATCH_VARIANTS),
                         patch_variants_large=list(PATCH_VARIANTS_LARGE), advi_lrs=list(ADVI_LRS),
                         advi_samples=ADVI_SAMPLES, growth=GROWTH, dims=list(dims),
                         budgets=list(cfg["budgets"]), repeats=cfg["repeats"],
                         bam32_max_evals=cfg["bam32_max_evals"],
                         env={k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS",
                                                             "JAX_PLATFORMS")},
                         command=command),
        "machine": _machine.describe(),
        "load_average_before": list(os.getloadavg()),
        "vijax_source": _vijax_source(),
        "problems": [],
        "step_memory": [],
    }
    if args.vijax_commit:
        results["vijax_source"].update(commit=args.vijax_commit, dirty=False, exported=True)
        results["settings"]["command"] += f" --vijax-commit {args.vijax_commit}"
    log(f"vijax under test: {results['vijax_source']}")
    start = time.perf_counter()
    log("counting evaluations per step")
    results["evaluation_counts"] = count_evaluations()
    smallest = min(dims)
    bam_ms = None
    if "gaussian" in args.problems:
        for d in dims:
            prob = gaussian_problem(d)
            max_evals = cfg["max_evals"].get(d, max(cfg["max_evals"].values()))
            out = run_problem(prob, smallest_d=(d == smallest), max_evals=max_evals,
                              budgets=cfg["budgets"], repeats=cfg["repeats"],
                              bam32_max_evals=cfg["bam32_max_evals"], log=log)
            if d == smallest:
                bam_ms = next((r.get("ms_per_step") for r in out["runs"]
                               if r["method"]["label"].startswith(f"BaM B={BATCH} ")), None)
            else:
                out["bam_not_run"] = dict(
                    why="not run: a d x d step",
                    extrapolated_ms_per_step=(bam_ms * (d / smallest) ** 3 if bam_ms else None))
            if not args.no_memory:
                for kind in ("pbam", "bam"):
                    log(f"  memory analysis of one {kind} step at d={d}")
                    results["step_memory"].append(step_memory(kind, prob, BATCH))
            results["problems"].append(out)
    if "blr" in args.problems:
        log(f"blr d={cfg['blr_d']}: family optimum by L-BFGS")
        prob = blr_problem(cfg["blr_d"], cfg["blr_n"], lbfgs_iters=cfg["lbfgs_iters"])
        results["problems"].append(run_problem(
            prob, smallest_d=True, max_evals=cfg["blr_max_evals"], budgets=cfg["budgets"],
            repeats=cfg["repeats"], bam32_max_evals=cfg["bam32_max_evals"], log=log))
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    results["load_average_after"] = list(os.getloadavg())
    results["notes"] = notes(results)
    results = _clean(results)
    stem = "pbam_scale_quick" if args.quick else "pbam_scale"
    md = markdown(results)
    _machine.write_results(args.out, stem, results, md)
    print(md)
    log(f"wrote {os.path.join(args.out, stem)}.{{json,md}} in {results['total_wall_s']:.0f} s")
    return results


def notes(results: dict) -> list[str]:
    """Observations generated from the numbers (failures, skipped steps, count mismatches)."""
    out = []
    for prob in results["problems"]:
        for r in prob["runs"]:
            label = f"{prob['problem']} d={prob['d']}, {r['method']['label']}"
            if r["status"] in ("diverged", "FitError"):
                out.append(f"{label}: {r['status']} after {r['evals_run']} evaluations "
                           f"(best KL {r['best_kl']:.4g} at {r['best_at_evals']}; last "
                           f"{r['last_kl']:.4g}).")
            if r["skipped"]:
                out.append(f"{label}: {r['skipped']} skipped steps.")
            if r.get("rerun_kl") is not None and r["steps_to_tol"]:
                hit = next(c for c in r["curve"] if c["steps"] == r["steps_to_tol"])
                if abs(r["rerun_kl"] - hit["kl"]) > 1e-6 * max(1.0, abs(hit["kl"])):
                    out.append(f"{label}: a fresh run of {r['steps_to_tol']} steps ended at KL "
                               f"{r['rerun_kl']:.6g}, the chunked one at {hit['kl']:.6g} "
                               "(continuing from the state is not bitwise the same run).")
    gauss = [p for p in results["problems"] if p["problem"] == "gaussian"]
    if len(gauss) >= 2:
        lo, hi = gauss[0], gauss[-1]
        for r_hi in hi["runs"]:
            r_lo = next((r for r in lo["runs"] if r["method"]["label"] == r_hi["method"]["label"]),
                        None)
            if not (r_lo and r_lo.get("ms_per_step") and r_hi.get("ms_per_step")):
                continue
            fast = (r_hi["ms_per_step_min_max"][0] / r_lo["ms_per_step_min_max"][0]
                    if r_lo.get("ms_per_step_min_max") and r_hi.get("ms_per_step_min_max")
                    else float("nan"))
            out.append(
                f"Step cost from d = {lo['d']} to {hi['d']} ({hi['d'] / lo['d']:g}x), "
                f"{r_hi['method']['label']}: {r_hi['ms_per_step'] / r_lo['ms_per_step']:.1f}x "
                f"(medians), {fast:.1f}x (fastest rounds).")
    for prob in results["problems"]:
        opt = prob.get("family_optimum_kl")
        if prob["problem"] != "blr" or opt is None:
            continue
        out.append(
            f"BLR d={prob['d']}: KL above the rank-{results['settings']['k']} family optimum "
            f"({opt:.4g}) at the end of each run: " + "; ".join(
                f"{r['method']['label']} {r['last_kl'] - opt:+.3g} (lowest seen "
                f"{r['best_kl'] - opt:+.3g} at {r['best_at_evals']} evals)"
                for r in prob["runs"] if r["method"]["kind"] != "bam")
            + ". pBaM minimises a score-based divergence, whose optimum in the family is not "
            "the KL optimum (the docstring of `vijax.patched_batch_and_match` says so).")
    for name, c in (results.get("evaluation_counts") or {}).items():
        if abs(c["measured_per_step"] - c["expected_per_step"]) > 1e-9:
            out.append(f"{name}: {c['measured_per_step']:g} log_joint evaluations per step "
                       f"counted, {c['expected_per_step']} assumed.")
    return out


if __name__ == "__main__":
    main()
