"""Gradient evaluations to a target accuracy: vijax against best-tuned Adam, NumPyro and Blackjax.

Issue #19 item 5. Every method fits a Gaussian q (on the unconstrained space)
and is checkpointed at geometrically spaced evaluation counts; the table gives
the first checkpoint that meets the problem's target, its evaluations of
log p (and its gradient) and the wall time to it, or "not reached" with the
best accuracy seen within the caps, and the PSIS k-hat of the q reported.

**Problems** (``PROBLEMS``; float32 throughout, x64 is never switched on):

* the zoo (``vijax/models/_zoo.py``): every model with a reference in
  ``benchmarks/results/references/`` (long NUTS; exact for Neal's funnel).
  Target: every mean within ``ZOO_MEAN_TOL`` = 0.05 reference sds and every sd
  within ``ZOO_SD_TOL`` = 10% of the reference's, over every element the
  reference stores (latents and derived quantities, on the natural space;
  ``benchmarks/zoo_accuracy.score``). q's moments come from ``ZOO_DRAWS``
  draws with one fixed set of standard normals (common random numbers across
  checkpoints and methods). "Not reached" rows give the best checkpoint by
  ``max(max mean err / 0.05, max |sd ratio - 1| / 0.1)`` (the *target
  ratio*; <= 1 is the target).
* Bayesian linear regression (``blr``) and logistic regression
  (``logistic``) with ``w ~ N(0, I)``, the data of ``benchmarks/_problems``
  (``_problems._data``: X standard normal; BLR weights N(0, 1), unit noise;
  logistic weights N(0, 1/d)) at d = 100 (n = 1000), d = 1000 (n = 2000) and
  d = 10^4 (n = 1000: X alone is 40 MB in float32; the posterior is then the
  prior in 9000 directions). Every method fits ``_problems.hand_log_joint``.
  Target: 1e-2 nats above the family's optimum (``KL_TOL``). BLR: the exact
  ``KL(q || p)`` in float64 from q's mean and covariance factors, through the
  n x n Woodbury form where n < d (no d x d matrix at d = 10^4); full-rank
  optimum 0, mean-field optimum ``0.5 (sum log P_ii - log det P)``.
  Logistic: the quadrature ELBO gap ``ELBO* - ELBO(q)`` of
  ``benchmarks/_problems`` (``expected_softplus``: 64-point Gauss-Hermite
  where the logit spread is at most 2, else softplus split into a closed-form
  part and a Gauss-Laguerre part), ELBO* the float64 L-BFGS optimum of
  ``_problems._logistic_reference``. Low-rank rows and Pathfinder are
  measured against the rank-``RANK`` family's own optimum
  (``_problems.low_rank_optimum``, computed on first use, outside the
  timed steps: 4 to 160 s), the gap above the mean-field optimum recorded
  beside it (``vs_mean_field``). Pathfinder's q (diagonal plus rank up to
  twice its L-BFGS history) is a larger family, so its target is "as good
  as the best rank-``RANK`` q". (Rows run before vijax commit 03f9d46
  measured both against the mean-field optimum, which any fair rank-k q
  beats.)
  ``Problem.family_gap`` is the same gap, which ``benchmarks.default_fit``
  judges its rows by; ``Problem.family_moments`` compares q's
  means with the family optimum's (in posterior sds for BLR, in the
  mean-field optimum's for logistic) and its marginal sds with the
  optimum's where those are identified (``moments_against``: the zoo's
  0.05 sds and 10% test). At logistic d = 1000
  the full-rank optimum (500,500 parameters, each quadrature ELBO a
  2 x 10^9-flop product) is not computed, so full-rank methods are not run
  there; at d = 10^4 no full-rank method is run (O(d^2) = 400 MB per
  factor in float32, O(d^3) per step on 2 cores).

**Methods**, all from the same start (mean = the unconstrained latent, zeros;
every scale 0.1; no correlation), S = ``NUM_SAMPLES`` draws per ELBO step:

* ``vijax Adam MF/FR/LR lr=a``: ``vijax.fit`` with ``mean_field()``,
  ``full_rank()`` or ``low_rank(rank=RANK)`` (low rank on BLR / logistic at
  d >= 1000; the zoo's largest d is 501),
  ``optax.adam(a)``, the default estimator (``adaptive_stl``), for every a in
  the problem's sweep (``LRS``; shorter at d >= 1000, see ``sweep``). The
  best lr per family is the row "best-tuned Adam"; every lr's row is in the
  JSON and the full table, and the sweep's total evaluations are reported.
* ``vijax NG FR``: ``vijax.natural_gradient(full_rank(), 0.3 / (1 + t / 50),
  max_variance_growth=2)``, the ``stl`` estimator (its docstring's
  recommendation for S << d); ``vijax NG MF avg`` (BLR and logistic):
  ``iterate_average(natural_gradient(mean_field(), 0.1,
  max_variance_growth=2), start=500)``, read with ``averaged_params`` (the
  README's mean-field recipe).
* ``vijax BaM``, ``vijax GSM``: ``batch_and_match`` / ``gaussian_score_matching``
  with B = max(ceil(1.5 d), ``MIN_BATCH``) for BaM (its docstring: B larger
  than d; at B = d it crawled on the regressions,
  ``results/cpu/bam_batch_size.md``) and max(d + 1, ``MIN_BATCH``) for GSM
  (its docstring: d + 1 draws pin a Gaussian down, and B = d is measured to
  stall), default learning rate and trust region; full rank, so d <= 1000.
* ``vijax pBaM``: ``patched_batch_and_match`` with ``low_rank(rank=RANK)``,
  B = ``PBAM_BATCH``, defaults otherwise (d >= 100).
* ``NumPyro AutoNormal / AutoMVN / AutoLowRankMVN``: ``SVI`` with
  ``Trace_ELBO(num_particles=S, vectorize_particles=True)`` and
  ``optax_to_numpyro(optax.adam(a))`` at **the best lr of vijax's Adam in the
  same family** (not swept again: the sweep is vijax's); AutoLowRankMVN with
  ``rank=RANK``; ``init_to_value`` at the common start, ``init_scale=0.1``.
  Zoo models use the NumPyro twins (``benchmarks/_zoo_numpyro``), whose
  unconstrained space is vijax's (``tests/test_zoo.py``).
* ``Blackjax meanfield_vi / fullrank_vi``: Blackjax 1.x, ``num_samples=S``,
  STL (its default), Adam at the best vijax lr of the family, scales set to
  0.1. ``Blackjax pathfinder``: ``blackjax.vi.pathfinder.approximate`` with
  its defaults (30 L-BFGS iterations, 200 draws per ELBO); one shot, so one
  checkpoint.

**Evaluations** of log p: ELBO methods S per step, BaM/GSM/pBaM B per step;
Pathfinder: its L-BFGS run (line search included) repeated alone with a
``jax.debug.callback`` in the objective that counts every forward
evaluation, plus the (30 + 1) x 200 draws (log p without gradient) that pick
the best point on the path.
``count_evaluations`` checks the per-step counts of every vijax driver and
the Blackjax steps the same way. From vijax 65d47ed on, the score-based
drivers (BaM, GSM, pBaM) judge their last step on one more batch per call
(``extra_per_call``): the trajectory is unchanged (continuing equals one
longer run), so a single call reaching a reported step count costs one more
batch, B evaluations, than the table's steps x B; the recorded results
(commit in the report) predate it. Checkpoints at step counts growing by
``GROWTH`` = 1.3 (1, 2, 3, 4, 6, 8, ...; 1.5 at d >= 1000, where each check
costs O(n d r) on the host) up to the budget, so a count to target is up to
30% (50%) high; a fit stops at the first
checkpoint meeting its target, at its evaluation budget (``BUDGETS``), at
its wall-time cap (``WALL_CAP_S``, summed fit time), on a FitError or on
non-finite parameters; the table says which.

**Wall time** to target: the summed time of the fit calls up to that
checkpoint (``jax.block_until_ready``), compilation excluded (a one-step
warm-up call compiles first; its time is in the JSON), accuracy checks
excluded, one call overhead per checkpoint included; secondary on a shared
2-core machine.

**k-hat**: vijax fits: ``vijax.diagnose(key, params, family, model,
num_samples=KHAT_DRAWS).khat`` on the q reported; peers: ``vijax.psis`` of
``log p(z) - log q(z)`` for draws of their fitted Gaussian (converted to a
``vijax.Gaussian`` in vijax's flat space; Pathfinder: its own ``sample`` and
``log q``).

One seed (0) for every fit (``SEEDS``): the full run must fit in about
45 minutes on 2 shared cores. Run: ``OPENBLAS_NUM_THREADS=1 python -m
benchmarks.head_to_head [--quick] [--out DIR] [--problems a,b]
[--methods substr,...]``; writes ``benchmarks/results/cpu/head_to_head.{md,json}``
(``--quick``: ``head_to_head_quick.*``: the Poisson GLM and BLR d = 20 with a
2,000-evaluation budget and one learning rate, 0.1: a smoke test, about a
minute). Budgets (evaluations per fit): the zoo 20,000; BLR / logistic 20,000
at d = 100 and 1000, 10,000 at d = 10^4. Wall caps per fit (fit calls only):
15 s on the zoo, 20 s at d = 100, 30 s at d = 1000 and 10^4. Blackjax and
NumPyro are the ``compare`` extra; a missing peer's rows say "not installed".
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before NumPy / JAX load BLAS
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import functools
import importlib.util
import json
import math
import subprocess
import threading
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import vijax
from benchmarks import _machine, _problems, zoo_accuracy

NUM_SAMPLES = 8
RANK = 5
MIN_BATCH = 16
BAM_BATCH = 1.5  # BaM's B = 1.5 d: at B = d it crawls (results/cpu/bam_batch_size.md)
PBAM_BATCH = 32
GROWTH = 1.3
ZOO_MEAN_TOL, ZOO_SD_TOL = 0.05, 0.10
KL_TOL = 1e-2
ZOO_DRAWS = 4000
KHAT_DRAWS = 2000
LRS = (3e-3, 1e-2, 3e-2, 0.1, 0.3)
LRS_LARGE = (1e-2, 3e-2, 0.1)  # d >= 1000: the sweep's ends never won at d <= 500
SEEDS = (0,)
NG_SCHEDULE = ("0.3/(1+t/50)", lambda t: 0.3 / (1.0 + t / 50.0))
NG_MF = dict(rho=0.1, growth=2.0, start=500)
ZOO_BUDGET = 20_000
BUDGETS = {100: 20_000, 1000: 20_000, 10_000: 10_000}
WALL_CAP_S = {"zoo": 15.0, 100: 20.0, 1000: 30.0, 10_000: 30.0}
GROWTH_LARGE = 1.5  # d >= 1000: fewer checkpoints (each costs O(n d r) on the host)
QUICK = dict(budget=2_000, lrs=(0.1,), wall_cap=10.0)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")
REFS = zoo_accuracy.REFS
GLM_N = {100: 1000, 1000: 2000, 10_000: 1000}


def _has(lib: str) -> bool:
    return importlib.util.find_spec(lib) is not None


# ============================================================ q on the host
class Q(NamedTuple):
    """A Gaussian in float64 on vijax's flat space: ``cov = diag(diag) + F M F^T``.

    ``middle`` None means the identity; ``logdet`` is ``log det cov``.
    """

    mean: np.ndarray
    diag: np.ndarray
    factor: np.ndarray
    middle: Optional[np.ndarray]
    logdet: float

    def cov(self) -> np.ndarray:
        fm = self.factor if self.middle is None else self.factor @ self.middle
        return np.diag(self.diag) + fm @ self.factor.T

    def finite(self) -> bool:
        return bool(np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.diag))
                    and np.all(np.isfinite(self.factor)) and math.isfinite(self.logdet))


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def q_diag(mean, sd) -> Q:
    mean, sd = _f64(mean), _f64(sd)
    return Q(mean, sd**2, np.zeros((mean.shape[0], 0)), None, float(2 * np.sum(np.log(sd))))


def q_dense(mean, factor, logdet) -> Q:
    mean = _f64(mean)
    return Q(mean, np.zeros_like(mean), _f64(factor), None, float(logdet))


def q_low_rank(mean, factor, sd, middle=None, logdet=None) -> Q:
    mean, factor, sd = _f64(mean), _f64(factor), _f64(sd)
    if logdet is None and middle is None:
        logdet = float(_problems.low_rank_logdet(sd, factor))
    elif logdet is None:
        a = factor / (sd**2)[:, None]
        cap = np.eye(factor.shape[1]) + middle @ (factor.T @ a)
        logdet = float(2 * np.sum(np.log(sd)) + np.linalg.slogdet(cap)[1])
    return Q(mean, sd**2, factor, None if middle is None else _f64(middle), float(logdet))


def q_from_vijax(family, params) -> Q:
    """The host ``Q`` of a vijax family's parameters (diagonal, Cholesky or low-rank scale)."""
    g = family.to_gaussian(params)
    s = g.scale
    if isinstance(s, vijax.DiagonalScale):
        return q_diag(g.mean, s.scale)
    if isinstance(s, vijax.CholeskyScale):
        tril = _f64(s.tril)
        return q_dense(g.mean, tril, 2 * np.sum(np.log(np.abs(np.diagonal(tril)))))
    if isinstance(s, vijax.LowRankScale):
        return q_low_rank(g.mean, s.cov_factor, s.diag_scale)
    raise TypeError(f"unexpected scale {type(s).__name__}")


def q_to_gaussian(q: Q) -> vijax.Gaussian:
    """A float32 ``vijax.Gaussian`` with the same law (for draws and log q)."""
    mean = jnp.asarray(q.mean, jnp.float32)
    if q.factor.shape[1] == 0:
        return vijax.Gaussian.diagonal(mean, jnp.asarray(np.sqrt(q.diag), jnp.float32))
    if q.middle is None and np.all(q.diag > 0) and q.factor.shape[1] < q.mean.shape[0]:
        return vijax.Gaussian.low_rank(mean, jnp.asarray(q.factor, jnp.float32),
                                       jnp.asarray(np.sqrt(q.diag), jnp.float32))
    return vijax.Gaussian.from_cholesky(mean, jnp.asarray(_chol(q.cov()), jnp.float32))


def _chol(cov: np.ndarray) -> np.ndarray:
    cov = 0.5 * (cov + cov.T)
    jitter = 0.0
    for _ in range(8):
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(cov.shape[0]))
        except np.linalg.LinAlgError:
            jitter = max(jitter * 10, 1e-10 * float(np.mean(np.diagonal(cov))))
    raise np.linalg.LinAlgError("covariance not positive definite")


# ============================================================ problems
class Problem(NamedTuple):
    """A problem: its log joint on a latent pytree, the target, and a measure of q."""

    name: str
    kind: str  # "zoo", "blr" or "logistic"
    d: int
    latent: object  # the latent pytree (zeros)
    log_joint: Callable  # log p(z) on the latent pytree
    model: object  # vijax model (zoo) or None
    measure: Callable  # (Q, group) -> dict with "value", "reached"
    budget: int
    wall_cap: float
    groups: tuple  # the families run: subset of ("mean_field", "full_rank", "low_rank")
    info: dict
    numpyro: Optional[tuple]  # (numpyro model fn, kwargs, site shapes)
    #: (Q, group) -> nats above the family's own optimum (BLR / logistic: the
    #: low-rank family against its rank-RANK optimum, ``low_rank_optimum``),
    #: computed on first use; None where not known (the zoo).
    family_gap: Optional[Callable] = None
    #: (Q, group) -> q's means and marginal sds against the family optimum's
    #: (:func:`moments_against`); None where not known (the zoo).
    family_moments: Optional[Callable] = None


class LogJoint:
    """A log joint hashable by identity, so the drivers reuse their compiled chunks."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, z):
        return self.fn(z)


def zoo_problem(name: str, *, budget: int, wall_cap: float, refs: str = REFS) -> Problem:
    model = zoo_accuracy.build_model(name)
    record = zoo_accuracy.load_reference(refs, name)
    if record is None:
        raise FileNotFoundError(f"no reference for {name} in {refs}")
    reference = zoo_accuracy.reference_moments(record)
    flat0, unravel = ravel_pytree(model.latent)
    d = int(flat0.shape[0])
    eps = np.random.default_rng(12345).standard_normal((ZOO_DRAWS, d))
    constrain = jax.jit(jax.vmap(lambda z: model.constrain(unravel(z))))

    def measure(q: Q, group: str) -> dict:
        if not q.finite():
            return dict(value=math.inf, reached=False, note="non-finite q")
        try:
            chol = _chol(q.cov())
        except np.linalg.LinAlgError:
            return dict(value=math.inf, reached=False, note="covariance not PD")
        z = q.mean[None, :] + eps @ chol.T
        draws = constrain(jnp.asarray(z, jnp.float32))
        names, mean, sd = zoo_accuracy.moments_of_draws(draws)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(sd))):
            return dict(value=math.inf, reached=False, note="non-finite moments")
        s = zoo_accuracy.score(zoo_accuracy.Fitted(names, mean, sd, 0, 0, 0.0, "ok"), reference)
        sd_dev = max(abs(s["sd_ratio_min"] - 1), abs(s["sd_ratio_max"] - 1))
        value = max(s["max_mean_err"] / ZOO_MEAN_TOL, sd_dev / ZOO_SD_TOL)
        return dict(value=value, reached=value <= 1.0, max_mean_err=s["max_mean_err"],
                    sd_ratio_min=s["sd_ratio_min"], sd_ratio_max=s["sd_ratio_max"],
                    worst_element=s["worst_element"])

    np_spec = None
    if _has("numpyro"):
        from benchmarks import _zoo_numpyro as twins

        twin = twins.TWINS[name]
        np_spec = (twin.model, twin.kwargs(twins.default_data(name)), twin.latent)
    groups = ("mean_field", "full_rank")
    return Problem(name, "zoo", d, model.latent, LogJoint(model.log_joint), model, measure,
                   budget, wall_cap, groups,
                   dict(reference_kind=record.get("kind"), elements=len(reference[0])),
                   np_spec)


def _woodbury_parts(x: np.ndarray):
    """``(log det P, P^{-1} applied to a vector)`` for ``P = I + X^T X`` with the smaller side."""
    n, d = x.shape
    if d <= n:
        prec = np.eye(d) + x.T @ x
        chol = np.linalg.cholesky(prec)
        logdet = 2 * np.sum(np.log(np.diagonal(chol)))

        def solve(v):
            import scipy.linalg

            return scipy.linalg.cho_solve((chol, True), v)
    else:
        k = np.eye(n) + x @ x.T
        chol = np.linalg.cholesky(k)
        logdet = 2 * np.sum(np.log(np.diagonal(chol)))

        def solve(v):
            import scipy.linalg

            # (I + X^T X)^{-1} = I - X^T (I + X X^T)^{-1} X
            return v - x.T @ scipy.linalg.cho_solve((chol, True), x @ v)
    return logdet, solve


def marginal_sd(q: Q) -> np.ndarray:
    """q's marginal standard deviations, ``sqrt(diag(cov))``, without forming ``cov``."""
    fm = q.factor if q.middle is None else q.factor @ q.middle
    return np.sqrt(q.diag + np.sum(fm * q.factor, axis=1))


def moments_against(q: Q, mean: np.ndarray, unit: np.ndarray,
                    sd: Optional[np.ndarray] = None) -> dict:
    """q's means and marginal sds against a reference's (issue #19's yardstick).

    ``max_mean_err``: the largest ``|mean_i - ref_i| / unit_i`` (``unit``:
    the posterior's sds where known, as the zoo's test reads means);
    ``sd_ratio_min`` / ``sd_ratio_max``: the extremes of ``sd_q / sd``;
    ``reached``: means within ``ZOO_MEAN_TOL`` units and every sd within
    ``ZOO_SD_TOL`` of ``sd``. Without ``sd`` (a family whose optimal
    marginals are not identified) the ratios and ``reached`` are None.
    """
    if not q.finite():
        return dict(max_mean_err=math.inf, sd_ratio_min=None, sd_ratio_max=None,
                    reached=False if sd is not None else None)
    err = float(np.max(np.abs(q.mean - mean) / unit))
    if sd is None:
        return dict(max_mean_err=err, sd_ratio_min=None, sd_ratio_max=None, reached=None)
    ratio = marginal_sd(q) / sd
    lo, hi = float(np.min(ratio)), float(np.max(ratio))
    return dict(max_mean_err=err, sd_ratio_min=lo, sd_ratio_max=hi,
                reached=bool(err <= ZOO_MEAN_TOL and max(abs(lo - 1), abs(hi - 1)) <= ZOO_SD_TOL))


def _blr_posterior_sd(x: np.ndarray) -> np.ndarray:
    """``sqrt(diag((I + X^T X)^{-1}))`` by a Cholesky factor of the smaller side."""
    import scipy.linalg

    n, d = x.shape
    if d <= n:
        chol = np.linalg.cholesky(np.eye(d) + x.T @ x)
        inv_chol = scipy.linalg.solve_triangular(chol, np.eye(d), lower=True)
        return np.sqrt(np.sum(np.square(inv_chol), axis=0))
    # diag((I + X^T X)^{-1}) = 1 - colsum(X * (I + X X^T)^{-1} X)
    chol = np.linalg.cholesky(np.eye(n) + x @ x.T)
    half = scipy.linalg.solve_triangular(chol, x, lower=True)
    return np.sqrt(1.0 - np.sum(np.square(half), axis=0))


def _quad_form_terms(q: Q, x: np.ndarray, colsq: np.ndarray):
    """``(tr cov, tr X cov X^T, per-row x_i^T cov x_i)`` in O(n d r)."""
    xf = x @ q.factor
    xfm = xf if q.middle is None else xf @ q.middle
    ff = q.factor if q.middle is None else q.factor @ q.middle
    rows = np.square(x) @ q.diag + np.sum(xfm * xf, axis=1)
    tr = float(np.sum(q.diag) + np.sum(ff * q.factor))
    return tr, float(np.sum(rows)), rows


def glm_problem(kind: str, d: int, n: int, *, budget: int, wall_cap: float,
                seed: int = 0) -> Problem:
    """BLR or logistic regression on ``benchmarks/_problems``' data (see the module doc)."""
    t0 = time.perf_counter()
    x64, y64 = _problems._data(kind, n, d, seed)
    x, y = jnp.asarray(x64, jnp.float32), jnp.asarray(y64, jnp.float32)
    lj = LogJoint(_problems.hand_log_joint(kind, x, y))
    colsq = np.sum(np.square(x64), axis=0)
    info = dict(n=n, seed=seed)
    full_rank_ok = d <= 1000 and not (kind == "logistic" and d > 100)

    @functools.lru_cache(maxsize=None)
    def low_rank_ref() -> dict:
        ref = _problems.low_rank_optimum(kind, x64, y64, RANK)
        info["low_rank_optimum"] = {k: v for k, v in ref.items() if k not in ("mean", "sd")}
        return ref
    if kind == "blr":
        logdet_p, solve = _woodbury_parts(x64)
        post_mean = solve(x64.T @ y64)
        optimum = {"mean_field": 0.5 * (float(np.sum(np.log1p(colsq))) - logdet_p),
                   "full_rank": 0.0}

        def kl(q: Q) -> float:
            tr, trx, _ = _quad_form_terms(q, x64, colsq)
            delta = q.mean - post_mean
            maha = float(delta @ delta + np.sum(np.square(x64 @ delta)))
            return 0.5 * (tr + trx + maha - d - q.logdet - logdet_p)

        def gap(q: Q, group: str) -> float:
            return kl(q) - optimum["full_rank" if group == "full_rank" else "mean_field"]

        def own_gap(q: Q, group: str) -> float:
            if group != "low_rank":
                return gap(q, group)
            return kl(q) - low_rank_ref()["kl"]

        @functools.lru_cache(maxsize=None)
        def posterior_sd() -> np.ndarray:
            return _blr_posterior_sd(x64)

        def optimum_moments(group: str) -> tuple:
            # Every Gaussian family's optimal mean is the posterior mean; the
            # means are read in posterior sds. The sds: mean-field's optimum
            # has sd_i = P_ii^(-1/2), full-rank's is the posterior; the rank-k
            # optimum's marginals are not identified where the posterior's
            # largest variances tie (n < d: X's null space, all variance 1).
            sd = {"mean_field": 1.0 / np.sqrt(1.0 + colsq),
                  "full_rank": posterior_sd()}.get(group)
            return post_mean, posterior_sd(), sd

        # Each variance's gradient noise from one antithetic pair at the
        # mean-field optimum (_problems.blr_variance_noise): a gap floor
        # sum(r) / (2 E) nats after E gradient evaluations.
        info.update(optimum_kl=optimum,
                    variance_noise_sum=float(np.sum(_problems.blr_variance_noise(x64))))
    else:
        problem = _problems.make_problem("logistic", n, d, seed)
        refs = {"mean_field": problem.family_reference("mean_field")}
        if full_rank_ok:
            refs["full_rank"] = problem.family_reference("full_rank")

        def elbo(q: Q) -> float:
            tr, _, rows = _quad_form_terms(q, x64, colsq)
            lik = _problems.expected_log_lik(y64, x64 @ q.mean, np.sqrt(rows))
            prior = -0.5 * (d * math.log(2 * math.pi) + q.mean @ q.mean + tr)
            entropy = 0.5 * d * (1.0 + math.log(2 * math.pi)) + 0.5 * q.logdet
            return float(lik + prior + entropy)

        def gap(q: Q, group: str) -> float:
            ref = refs["full_rank" if group == "full_rank" else "mean_field"]
            return ref["elbo"] - elbo(q)

        def own_gap(q: Q, group: str) -> float:
            if group != "low_rank":
                return gap(q, group)
            return low_rank_ref()["elbo"] - elbo(q)

        def optimum_moments(group: str) -> tuple:
            # No exact posterior: means against the family optimum's, read in
            # the mean-field optimum's sds (below the posterior's on a
            # Gaussian target, so a strict unit); sds against the optimum's
            # where it is identified (not for the rank-k family, see BLR).
            if group == "low_rank":
                return low_rank_ref()["mean"], refs["mean_field"]["sd"], None
            return refs[group]["mean"], refs["mean_field"]["sd"], refs[group]["sd"]

        info.update(reference={k: dict(elbo=v["elbo"], grad_norm=v["grad_norm"],
                                       iterations=v["iterations"]) for k, v in refs.items()})

    def measure(q: Q, group: str) -> dict:
        # Low-rank rows (and Pathfinder's) against the rank-RANK family's own
        # optimum, with the gap above the mean-field optimum beside it.
        if not q.finite():
            return dict(value=math.inf, reached=False, note="non-finite q")
        g = own_gap(q, group)
        if not math.isfinite(g):
            return dict(value=math.inf, reached=False, note="non-finite gap")
        out = dict(value=g, reached=g <= KL_TOL)
        if group == "low_rank":
            out["vs_mean_field"] = gap(q, group)
        return out

    def family_gap(q: Q, group: str) -> float:
        g = own_gap(q, group) if q.finite() else math.inf
        return g if math.isfinite(g) else math.inf

    def family_moments(q: Q, group: str) -> dict:
        return moments_against(q, *optimum_moments(group))

    info["setup_s"] = round(time.perf_counter() - t0, 1)
    groups = (("full_rank",) if full_rank_ok else ()) + ("mean_field",)
    groups += ("low_rank",) if d >= 1000 else ()
    np_spec = None
    if _has("numpyro"):
        np_spec = (_numpyro_glm(kind), dict(x=x, y=y), ("w",))
    return Problem(f"{kind}_d{d}", kind, d, jnp.zeros((d,), jnp.float32), lj, None, measure,
                   budget, wall_cap, groups, info, np_spec, family_gap, family_moments)


def _numpyro_glm(kind: str):
    import numpyro
    import numpyro.distributions as dist

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        if kind == "blr":
            numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)
        else:
            numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    return model


# ============================================================ runners
class Runner:
    """One fit that can be continued: ``warmup()``, ``advance(n)``, ``q()``, ``khat(key)``."""

    label: str
    method: str  # the method name without the lr
    group: str  # the family whose target it is measured against
    per_step: int
    lr: Optional[float] = None
    one_shot: bool = False

    def warmup(self) -> None: ...

    def advance(self, n: int) -> None: ...

    def q(self) -> Q: ...

    def khat(self, key) -> Optional[float]: ...


def _family(group: str):
    return {"mean_field": vijax.mean_field, "full_rank": vijax.full_rank,
            "low_rank": lambda: vijax.low_rank(rank=RANK)}[group]()


class VijaxRunner(Runner):
    """``vijax.fit`` (Adam or natural gradient) or one of vijax's algorithm drivers."""

    def __init__(self, problem: Problem, label: str, method: str, group: str, *, seed: int,
                 optimizer=None, estimator=None, algorithm=None, batch=None, averaged=False,
                 lr=None):
        self.p, self.label, self.method, self.group, self.lr = problem, label, method, group, lr
        self.family = _family("low_rank" if algorithm == "pbam" else group)
        self.seed, self.averaged = seed, averaged
        self.init = self.family.init(problem.latent)
        lj = problem.log_joint
        if algorithm is None:
            self.per_step = NUM_SAMPLES
            kw = dict(optimizer=optimizer, num_samples=NUM_SAMPLES, progress=False)
            if estimator is not None:
                kw["estimator"] = estimator
            self._call = lambda key, init, n: vijax.fit(key, self.family, lj, init,
                                                        num_steps=n, **kw)
        else:
            self.per_step = batch
            fn = {"bam": vijax.batch_and_match, "gsm": vijax.gaussian_score_matching,
                  "pbam": vijax.patched_batch_and_match}[algorithm]
            self._call = lambda key, init, n: fn(key, lj, init, num_steps=n, batch_size=batch,
                                                 progress=False)
        self.state, self.params = None, self.init

    def warmup(self):
        jax.block_until_ready(self._call(jax.random.key(self.seed + 1000), self.init, 1).params)

    def advance(self, n):
        if self.state is None:
            res = self._call(jax.random.key(self.seed), self.init, n)
        else:
            res = self._call(None, self.state, n)
        jax.block_until_ready(res.params)
        self.state = res.state
        self.params = vijax.averaged_params(res) if self.averaged else res.params

    def take_error(self, err: vijax.FitError):
        if err.state is not None:
            self.state = err.state
            self.params = (vijax.averaged_params(err.state) if self.averaged
                           else err.state.params)

    def q(self):
        return q_from_vijax(self.family, self.params)

    def khat(self, key):
        target = self.p.model if self.p.model is not None else self.p.log_joint
        return float(vijax.diagnose(key, self.params, self.family, target,
                                    num_samples=KHAT_DRAWS).khat)


def _peer_khat(problem: Problem, q: Q, key) -> Optional[float]:
    """PSIS k-hat of ``log p - log q`` at draws of q (q as a float32 vijax.Gaussian)."""
    try:
        g = q_to_gaussian(q)
    except (np.linalg.LinAlgError, ValueError):
        return None
    _, unravel = ravel_pytree(problem.latent)
    z = g.sample(key, (KHAT_DRAWS,))
    lw = jax.vmap(lambda v: problem.log_joint(unravel(v)))(z) - g.log_prob(z)
    if not bool(jnp.all(jnp.isfinite(lw) | (lw == -jnp.inf))):
        return None
    return float(vijax.psis(lw)[1])


class NumPyroRunner(Runner):
    """NumPyro SVI with an autoguide; the update loop is one jitted ``fori_loop``."""

    def __init__(self, problem: Problem, guide: str, lr: float, *, seed: int):
        import numpyro
        from numpyro.infer import SVI, Trace_ELBO
        from numpyro.infer.autoguide import (AutoLowRankMultivariateNormal,
                                             AutoMultivariateNormal, AutoNormal)
        from numpyro.infer.initialization import init_to_value

        model_fn, kwargs, sites = problem.numpyro
        self.p, self.lr, self.seed, self.kind = problem, lr, seed, guide
        self.method = f"NumPyro {guide}"
        self.label = f"{self.method} lr={lr:g}"
        self.group = {"AutoNormal": "mean_field", "AutoMVN": "full_rank",
                      "AutoLowRankMVN": "low_rank"}[guide]
        self.per_step = NUM_SAMPLES
        if problem.model is not None:
            natural = problem.model.constrain(problem.latent)
            init = {s: natural[s] for s in sites}
        else:
            init = {"w": problem.latent}
        kw = dict(init_loc_fn=init_to_value(values=init), init_scale=0.1)
        if guide == "AutoNormal":
            self.guide = AutoNormal(model_fn, **kw)
        elif guide == "AutoMVN":
            self.guide = AutoMultivariateNormal(model_fn, **kw)
        else:
            self.guide = AutoLowRankMultivariateNormal(model_fn, rank=RANK, **kw)
        self.sites = sites
        self.svi = SVI(model_fn, self.guide, numpyro.optim.optax_to_numpyro(optax.adam(lr)),
                       Trace_ELBO(num_particles=NUM_SAMPLES, vectorize_particles=True))
        svi = self.svi
        self._init = jax.jit(lambda key: svi.init(key, **kwargs))
        self._adv = jax.jit(lambda s, n: jax.lax.fori_loop(
            0, n, lambda i, st: svi.update(st, **kwargs)[0], s))
        self.state = None

    def warmup(self):
        self.state = self._init(jax.random.PRNGKey(self.seed))
        jax.block_until_ready(self._adv(self.state, 1))

    def advance(self, n):
        self.state = self._adv(self.state, n)
        jax.block_until_ready(self.state)

    def _perm(self, d):
        flat = self.guide._unpack_latent(jnp.arange(d, dtype=jnp.float32))
        order = ravel_pytree({s: flat[s] for s in self.sites})[0]
        return np.asarray(order).astype(int)

    def q(self):
        params = {k: _f64(v) for k, v in self.svi.get_params(self.state).items()}
        d = self.p.d
        if self.kind == "AutoNormal":
            loc = ravel_pytree({s: params[f"{s}_auto_loc"] for s in self.sites})[0]
            sd = ravel_pytree({s: params[f"{s}_auto_scale"] for s in self.sites})[0]
            return q_diag(loc, sd)
        perm = self._perm(d)
        loc = params["auto_loc"][perm]
        if self.kind == "AutoMVN":
            tril = params["auto_scale_tril"]
            return q_dense(loc, tril[perm], 2 * np.sum(np.log(np.abs(np.diagonal(tril)))))
        scale = params["auto_scale"]
        factor = params["auto_cov_factor"] * scale[:, None]
        return q_low_rank(loc, factor[perm], scale[perm])

    def khat(self, key):
        return _peer_khat(self.p, self.q(), key)


class BlackjaxRunner(Runner):
    """Blackjax ``meanfield_vi`` / ``fullrank_vi`` on vijax's flat log joint."""

    def __init__(self, problem: Problem, full_rank: bool, lr: float, *, seed: int):
        import blackjax

        flat0, unravel = ravel_pytree(problem.latent)
        d = flat0.shape[0]
        self.p, self.lr, self.seed, self.full = problem, lr, seed, full_rank
        self.method = "Blackjax fullrank_vi" if full_rank else "Blackjax meanfield_vi"
        self.label = f"{self.method} lr={lr:g}"
        self.group = "full_rank" if full_rank else "mean_field"
        self.per_step = NUM_SAMPLES
        lj = problem.log_joint
        factory = blackjax.fullrank_vi if full_rank else blackjax.meanfield_vi
        algo = factory(lambda x: lj(unravel(x)), optax.adam(lr), num_samples=NUM_SAMPLES)
        state = algo.init(flat0)
        if full_rank:
            state = state._replace(mu=flat0,
                                   chol_params=state.chol_params.at[:d].set(math.log(0.1)))
        else:
            state = state._replace(mu=flat0, rho=jnp.full((d,), math.log(0.1), flat0.dtype))
        self.d = d
        self.state0 = (state, jax.random.key(seed), jnp.zeros((), jnp.int32))

        def body(i, carry):
            st, key, t = carry
            st, _ = algo.step(jax.random.fold_in(key, t), st)
            return st, key, t + 1

        self._adv = jax.jit(lambda c, n: jax.lax.fori_loop(0, n, body, c))
        self.state = self.state0

    def warmup(self):
        jax.block_until_ready(self._adv(self.state0, 1)[0].mu)

    def advance(self, n):
        self.state = self._adv(self.state, n)
        jax.block_until_ready(self.state[0].mu)

    def q(self):
        st = self.state[0]
        mu = _f64(st.mu)
        if not self.full:
            return q_diag(mu, np.exp(_f64(st.rho)))
        p = _f64(st.chol_params)
        d = self.d
        tril = np.zeros((d, d))
        tril[np.tril_indices(d, -1)] = p[d:]
        tril += np.diag(np.exp(p[:d]))
        return q_dense(mu, tril, 2 * np.sum(p[:d]))

    def khat(self, key):
        return _peer_khat(self.p, self.q(), key)


class PathfinderRunner(Runner):
    """Blackjax Pathfinder at its defaults; its L-BFGS evaluations counted by a host callback."""

    one_shot = True
    MAXITER, MAXCOR, GTOL, FTOL, MAXLS, DRAWS = 30, 10, 1e-8, 1e-5, 1000, 200  # its defaults

    def __init__(self, problem: Problem, *, seed: int):
        import blackjax
        from blackjax.vi import pathfinder as pf_module

        self.p, self.seed = problem, seed
        self.method = self.label = "Blackjax pathfinder"
        self.group = "low_rank"
        self.per_step = 0
        flat0, unravel = ravel_pytree(problem.latent)
        self.flat0, self.unravel = flat0, unravel
        lj = problem.log_joint
        self.count = [0]

        def bump(z):
            self.count[0] += 1

        def counted_objective(x):
            jax.debug.callback(bump, x)
            return -lj(unravel(x))

        self.pf = blackjax.vi.pathfinder
        self._run = jax.jit(lambda key: self.pf.approximate(key, lambda x: lj(unravel(x)), flat0))
        # The same L-BFGS run pathfinder makes, alone, with a counting objective (a
        # callback inside pathfinder's vmapped draws compiles for minutes). Its draws
        # add (maxiter + 1) x num_samples evaluations of log p (no gradient) on top.
        self._lbfgs = jax.jit(lambda x0: pf_module._minimize_lbfgs(
            counted_objective, x0, self.MAXITER, self.MAXCOR, self.GTOL, self.FTOL,
            self.MAXLS))
        self.state = None

    def warmup(self):
        jax.block_until_ready(self._run(jax.random.key(self.seed + 1000))[0].elbo)

    def advance(self, n):
        self.state = self._run(jax.random.key(self.seed))[0]
        jax.block_until_ready(self.state.elbo)

    def evaluations(self) -> int:
        self.count[0] = 0
        jax.block_until_ready(self._lbfgs(self.flat0)[1].x)
        jax.effects_barrier()
        self.lbfgs_evals = int(self.count[0])
        return self.lbfgs_evals + (self.MAXITER + 1) * self.DRAWS

    def q(self):
        st = self.state
        alpha, beta, gamma = _f64(st.alpha), _f64(st.beta), _f64(st.gamma)
        pos, grad = _f64(st.position), _f64(st.grad_position)
        mean = pos + alpha * grad + beta @ (gamma @ (beta.T @ grad))
        # log det as in blackjax's bfgs_sample: via the thin QR of beta / sqrt(alpha).
        qm, r = np.linalg.qr(beta / np.sqrt(alpha)[:, None])
        try:
            chol = np.linalg.cholesky(np.eye(r.shape[0]) + r @ gamma @ r.T)
            logdet = float(np.sum(np.log(alpha)) + 2 * np.sum(np.log(np.diagonal(chol))))
        except np.linalg.LinAlgError:
            logdet = float("nan")
        return q_low_rank(mean, beta, np.sqrt(alpha), middle=gamma, logdet=logdet)

    def khat(self, key):
        lj, unravel = self.p.log_joint, self.unravel
        phi, logq = self.pf.sample(key, self.state, KHAT_DRAWS)
        lw = jax.vmap(lambda v: lj(unravel(v)))(phi) - logq
        if not bool(jnp.all(jnp.isfinite(lw) | (lw == -jnp.inf))):
            return None
        return float(vijax.psis(lw)[1])


# ============================================================ runs
def checkpoint_steps(max_steps: int, growth: float = GROWTH) -> list:
    """1, 2, 3, 4, 6, 8, ... growing by ``growth``, ending at ``max_steps``."""
    out, s = [], 1
    while s < max_steps:
        out.append(s)
        s = max(s + 1, int(math.ceil(s * growth)))
    out.append(max_steps)
    return out


def run_fit(runner: Runner, problem: Problem, *, log=print) -> dict:
    """Checkpoints one fit until its target, budget, wall cap or failure (module doc)."""
    rec = dict(label=runner.label, method=runner.method, group=runner.group, lr=runner.lr,
               per_step=runner.per_step)
    t0 = time.perf_counter()
    try:
        runner.warmup()
    except Exception as err:  # noqa: BLE001: a peer that cannot run at all is reported
        rec.update(status=f"failed to start ({type(err).__name__}: {str(err)[:120]})",
                   evals_to_target=None, curve=[], compile_s=None)
        log(f"  {runner.label:34s} {rec['status']}")
        return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    curve, wall, done, status = [], 0.0, 0, "budget"
    if runner.one_shot:
        t0 = time.perf_counter()
        runner.advance(1)
        wall = time.perf_counter() - t0
        evals = runner.evaluations()
        m = problem.measure(runner.q(), runner.group)
        curve.append(dict(steps=1, evals=evals, wall_s=wall, **m))
        rec["lbfgs_evals"] = getattr(runner, "lbfgs_evals", None)
        status = "one shot"
    else:
        max_steps = max(1, problem.budget // runner.per_step)
        growth = GROWTH if problem.d < 1000 else GROWTH_LARGE
        for s in checkpoint_steps(max_steps, growth):
            t0 = time.perf_counter()
            try:
                runner.advance(s - done)
            except vijax.FitError as err:
                wall += time.perf_counter() - t0
                status = f"FitError at step {err.step}"
                runner.take_error(err)
                break
            wall += time.perf_counter() - t0
            done = s
            m = problem.measure(runner.q(), runner.group)
            curve.append(dict(steps=s, evals=s * runner.per_step, wall_s=wall, **m))
            if m["reached"]:
                status = "reached"
                break
            if not math.isfinite(m["value"]):
                status = "non-finite q"
                break
            if wall > problem.wall_cap:
                status = f"wall cap ({problem.wall_cap:g} s)"
                break
    rec["status"], rec["curve"] = status, curve
    rec["steps_run"] = curve[-1]["steps"] if curve else 0
    rec["evals_run"] = curve[-1]["evals"] if curve else 0
    hit = next((c for c in curve if c["reached"]), None)
    finite = [c for c in curve if math.isfinite(c["value"])]
    best = min(finite, key=lambda c: c["value"]) if finite else None
    rec["evals_to_target"] = hit["evals"] if hit else None
    rec["wall_to_target_s"] = hit["wall_s"] if hit else None
    rec["best"] = best
    rec["wall_s"] = wall
    try:
        rec["khat"] = runner.khat(jax.random.key(77))
    except Exception as err:  # noqa: BLE001: k-hat is a report column, not a gate
        rec["khat"], rec["khat_error"] = None, f"{type(err).__name__}: {str(err)[:100]}"
    log(f"  {runner.label:34s} {status:22s} evals {rec['evals_run']:7d} to target "
        f"{rec['evals_to_target']}  best {_g(best['value']) if best else '—'}  "
        f"k-hat {_g(rec['khat'])}  fit {wall:5.1f} s compile {rec['compile_s']:.1f} s")
    return rec


def sweep(problem: Problem, quick: bool) -> tuple:
    if quick:
        return QUICK["lrs"]
    return LRS if problem.d < 1000 else LRS_LARGE


def method_list(problem: Problem, quick: bool) -> list:
    """``(name, factory(lr_of_group) -> Runner or reason string)`` in run order.

    Adam first (its best lr per family feeds the peers).
    """
    p, seed = problem, SEEDS[0]
    out = []
    abbrev = {"mean_field": "MF", "full_rank": "FR", "low_rank": "LR"}
    for g in ("mean_field", "full_rank", "low_rank"):
        if g not in p.groups:
            continue
        for lr in sweep(p, quick):
            out.append((f"vijax Adam {abbrev[g]}", lambda best, g=g, lr=lr: VijaxRunner(
                p, f"vijax Adam {abbrev[g]} lr={lr:g}", f"vijax Adam {abbrev[g]}", g,
                seed=seed, optimizer=optax.adam(lr), lr=lr)))
    b = max(math.ceil(BAM_BATCH * p.d), MIN_BATCH)
    if "full_rank" in p.groups:
        fr = vijax.full_rank()
        out.append(("vijax NG FR", lambda best: VijaxRunner(
            p, "vijax NG FR", "vijax NG FR", "full_rank", seed=seed, estimator="stl",
            optimizer=vijax.natural_gradient(fr, NG_SCHEDULE[1], max_variance_growth=2.0))))
        out.append(("vijax BaM", lambda best: VijaxRunner(
            p, f"vijax BaM B={b}", "vijax BaM", "full_rank", seed=seed, algorithm="bam",
            batch=b)))
        b1 = max(p.d + 1, MIN_BATCH)  # GSM: d + 1 draws pin a Gaussian down (its docstring)
        out.append(("vijax GSM", lambda best: VijaxRunner(
            p, f"vijax GSM B={b1}", "vijax GSM", "full_rank", seed=seed, algorithm="gsm",
            batch=b1)))
    if p.kind != "zoo":
        mf = vijax.mean_field()
        out.append(("vijax NG MF avg", lambda best: VijaxRunner(
            p, "vijax NG MF avg", "vijax NG MF avg", "mean_field", seed=seed, estimator="stl",
            averaged=True, optimizer=vijax.iterate_average(
                vijax.natural_gradient(mf, NG_MF["rho"], max_variance_growth=NG_MF["growth"]),
                start=NG_MF["start"]))))
    if p.d >= 100:
        out.append(("vijax pBaM", lambda best: VijaxRunner(
            p, f"vijax pBaM B={PBAM_BATCH}", "vijax pBaM", "low_rank", seed=seed,
            algorithm="pbam", batch=PBAM_BATCH)))
    guides = {"mean_field": "AutoNormal", "full_rank": "AutoMVN", "low_rank": "AutoLowRankMVN"}
    for g, guide in guides.items():
        if g not in p.groups:
            continue
        out.append((f"NumPyro {guide}", (lambda best, g=g, guide=guide: NumPyroRunner(
            p, guide, best[g], seed=seed)) if p.numpyro is not None else
            "not installed (pip install -e '.[compare]')"))
    for g, full in (("mean_field", False), ("full_rank", True)):
        if g not in p.groups:
            continue
        name = "Blackjax fullrank_vi" if full else "Blackjax meanfield_vi"
        out.append((name, (lambda best, g=g, full=full: BlackjaxRunner(
            p, full, best[g], seed=seed)) if _has("blackjax") else
            "not installed (pip install -e '.[compare]')"))
    out.append(("Blackjax pathfinder", (lambda best: PathfinderRunner(p, seed=seed))
                if _has("blackjax") else "not installed (pip install -e '.[compare]')"))
    return out


def _best_adam(records: list, group: str) -> Optional[dict]:
    rows = [r for r in records if r["method"].startswith("vijax Adam") and r["group"] == group]
    return _best_row(rows)


def _best_row(rows: list) -> Optional[dict]:
    reached = [r for r in rows if r.get("evals_to_target") is not None]
    if reached:
        return min(reached, key=lambda r: r["evals_to_target"])
    scored = [r for r in rows if r.get("best")]
    return min(scored, key=lambda r: r["best"]["value"]) if scored else None


def run_problem(problem: Problem, *, quick: bool, methods=None, log=print) -> dict:
    t0 = time.perf_counter()
    log(f"{problem.name} (d = {problem.d}, budget {problem.budget:,} evals, wall cap "
        f"{problem.wall_cap:g} s, families {', '.join(problem.groups)})")
    records, not_run = [], []
    for name, factory in method_list(problem, quick):
        if methods and not any(m in name for m in methods):
            continue
        if isinstance(factory, str):
            not_run.append(dict(method=name, reason=factory))
            continue
        best = {g: (lambda r: r["lr"] if r else 1e-2)(_best_adam(records, g))
                for g in problem.groups}
        runner = factory(best)
        records.append(run_fit(runner, problem, log=log))
    not_run += skipped_methods(problem)
    return dict(name=problem.name, kind=problem.kind, d=problem.d, budget=problem.budget,
                wall_cap_s=problem.wall_cap, groups=list(problem.groups), info=problem.info,
                runs=records, not_run=not_run, wall_s=round(time.perf_counter() - t0, 1))


def skipped_methods(problem: Problem) -> list:
    """Methods the protocol does not run on this problem, with the reason."""
    out = []
    if "full_rank" not in problem.groups:
        why = ("d = 10^4: full-rank q needs O(d^2) memory (400 MB per factor in float32) and "
               "O(d^3) per step; infeasible on this 2-core CPU" if problem.d >= 10_000 else
               "no full-rank optimum computed at this d (see the module docstring)")
        for m in ("vijax Adam FR", "vijax NG FR", "vijax BaM", "vijax GSM", "NumPyro AutoMVN",
                  "Blackjax fullrank_vi"):
            out.append(dict(method=m, reason=why))
    return out


def count_evaluations(d: int = 6, steps: int = 3) -> dict:
    """Forward evaluations of log p per step, counted by a host callback inside each loop."""
    count = [0]
    lock = threading.Lock()

    def bump(z):
        # XLA may run the callbacks of one batch on several host threads at
        # once; without the lock, read-modify-write races lost counts.
        with lock:
            count[0] += int(np.asarray(z).size // d)

    def lj(z):
        jax.debug.callback(bump, z)
        return -0.5 * jnp.sum(jnp.square(z - 1.0))

    problem = Problem("count", "count", d, jnp.zeros((d,), jnp.float32), LogJoint(lj), None,
                      lambda q, g: dict(value=0.0, reached=False), 0, 0.0,
                      ("mean_field", "full_rank"), {}, None)
    runners = {
        "vijax Adam FR": VijaxRunner(problem, "a", "a", "full_rank", seed=0,
                                     optimizer=optax.adam(1e-2)),
        "vijax NG FR": VijaxRunner(problem, "n", "n", "full_rank", seed=0, estimator="stl",
                                   optimizer=vijax.natural_gradient(
                                       vijax.full_rank(), 0.1, max_variance_growth=2.0)),
        "vijax BaM": VijaxRunner(problem, "b", "b", "full_rank", seed=0, algorithm="bam",
                                 batch=MIN_BATCH),
        "vijax GSM": VijaxRunner(problem, "g", "g", "full_rank", seed=0, algorithm="gsm",
                                 batch=MIN_BATCH),
        "vijax pBaM": VijaxRunner(problem, "p", "p", "low_rank", seed=0, algorithm="pbam",
                                  batch=PBAM_BATCH),
    }
    if _has("blackjax"):
        runners["Blackjax meanfield_vi"] = BlackjaxRunner(problem, False, 1e-2, seed=0)
    out = {}
    for name, r in runners.items():
        r.warmup()
        r.advance(1)
        jax.effects_barrier()
        count[0] = 0
        r.advance(steps)
        jax.effects_barrier()
        # Score-based drivers that verify their last step (vijax after 65d47ed) draw
        # one more batch per call: reported as extra_per_call, not hidden.
        out[name] = dict(assumed_per_step=r.per_step, measured_per_step=count[0] / steps,
                         extra_per_call=count[0] - steps * r.per_step)
    return out


# ============================================================ report
def _g(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _acc(prob: dict, c: Optional[dict]) -> str:
    """The accuracy at a checkpoint, in the problem's terms."""
    if not c:
        return "—"
    if not math.isfinite(c["value"]):
        return c.get("note", "non-finite")
    if prob["kind"] == "zoo":
        return (f"mean err {c['max_mean_err']:.3f} sd, sd ratio {c['sd_ratio_min']:.2f}-"
                f"{c['sd_ratio_max']:.2f} (ratio {c['value']:.2g})")
    return f"gap {c['value']:.3g} nats"


def _cell(prob: dict, r: dict) -> str:
    if r.get("evals_to_target") is not None:
        return f"**{r['evals_to_target']:,}** ({r['wall_to_target_s']:.2f} s)"
    return f"not reached in {r.get('evals_run', 0):,}"


def _ratio(a: Optional[dict], b: Optional[dict]) -> str:
    """How many times more evaluations ``a`` took than ``b`` (">" when ``a`` never got there)."""
    if b is None or b.get("evals_to_target") is None:
        return "—"
    if a is None:
        return "—"
    if a.get("evals_to_target") is not None:
        return f"{a['evals_to_target'] / b['evals_to_target']:.2g}x"
    return f"> {a['evals_run'] / b['evals_to_target']:.2g}x"


GROUP_NAMES = {"zoo": "any Gaussian", "mean_field": "mean-field",
               "full_rank": "full-rank", "low_rank": f"low-rank / Pathfinder (vs the rank-{RANK} optimum)"}


def verdict_groups(prob: dict) -> list:
    """(group label, rows) for the verdicts: the zoo as one group, GLMs per family run."""
    runs = prob["runs"]
    if prob["kind"] == "zoo":
        return [("zoo", runs)]
    groups = [g for g in ("full_rank", "mean_field", "low_rank")
              if any(r["group"] == g for r in runs)]
    return [(g, [r for r in runs if r["group"] == g]) for g in groups]


def _compare(other: Optional[dict], fast: dict, who: str) -> str:
    """``other``'s evaluations over vijax's, and whether that shows the issue's 10x."""
    if other is None:
        return f"no {who} run"
    if other.get("evals_to_target") is not None:
        x = other["evals_to_target"] / fast["evals_to_target"]
        return f"{who} / vijax = {x:.2g}x" + (" (10x met)" if x >= 10 else " (**10x not met**)")
    x = other.get("evals_run", 0) / fast["evals_to_target"]
    if x >= 10:
        return f"{who} / vijax > {x:.2g}x ({who} never reached it; 10x met)"
    return (f"{who} / vijax > {x:.2g}x ({who} never reached it within its budget, so 10x is "
            "neither shown nor ruled out)")


def verdicts(prob: dict) -> list:
    lines = []
    for g, rows in verdict_groups(prob):
        if not rows:
            continue
        adam = _best_row([r for r in rows if r["method"].startswith("vijax Adam")])
        fast = _best_row([r for r in rows if r["method"].startswith("vijax")
                          and not r["method"].startswith("vijax Adam")])
        peer = _best_row([r for r in rows if not r["method"].startswith("vijax")])
        name = f"**{prob['name']}** ({GROUP_NAMES[g]})"

        def say(r):
            if r is None:
                return "none run"
            if r.get("evals_to_target") is not None:
                return (f"{r['label']}: {r['evals_to_target']:,} evals, "
                        f"k-hat {_g(r.get('khat'), 2)}")
            return (f"{r['label']}: not reached in {r.get('evals_run', 0):,} (best "
                    f"{_acc(prob, r.get('best'))}, k-hat {_g(r.get('khat'), 2)})")

        if fast and fast.get("evals_to_target") is not None:
            lines.append(f"- {name}: {say(fast)}; best-tuned Adam {say(adam)}: "
                         f"{_compare(adam, fast, 'Adam')}; best peer {say(peer)}: "
                         f"{_compare(peer, fast, 'peer')}.")
        else:
            lost = []
            if adam and adam.get("evals_to_target") is not None:
                lost.append("Adam reached it")
            if peer and peer.get("evals_to_target") is not None:
                lost.append("a peer reached it")
            tail = ("; **vijax's fast methods lose: " + " and ".join(lost) + "**"
                    if lost else "; nothing reached the target")
            lines.append(f"- {name}: no vijax fast method reached the target ({say(fast)}); "
                         f"best-tuned Adam {say(adam)}; best peer {say(peer)}{tail}.")
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    partial = results.get("partial")
    lines = [
        "# Head to head: gradient evaluations to a target accuracy"
        + (" (quick smoke run)" if s["quick"] else "")
        + (" — PARTIAL (run incomplete)" if partial else ""),
        "",
        "Written by `python -m benchmarks.head_to_head` (issue #19 item 5); the protocol is "
        "the module docstring of `benchmarks/head_to_head.py`. Float32 throughout. "
        f"vijax commit `{results.get('vijax_commit')}`.",
        *([f"\n> Rows rerun later: {results['reruns']}"] if results.get("reruns") else []),
        "",
        f"Targets: zoo, every mean within {ZOO_MEAN_TOL} reference sds and every sd within "
        f"{ZOO_SD_TOL:.0%}; BLR / logistic, {KL_TOL:g} nats above the family's optimum "
        "(exact KL for BLR, the quadrature ELBO gap for logistic; low-rank and "
        f"Pathfinder rows against the rank-{s['rank']} family's optimum, "
        "`_problems.low_rank_optimum`). Evaluations of log p: S = "
        f"{s['num_samples']} per ELBO step, B per BaM / GSM / pBaM step, counted for "
        "Pathfinder. Adam is the best of the learning-rate sweep "
        f"({', '.join(f'{x:g}' for x in s['lrs'])}; at d >= 1000 "
        f"{', '.join(f'{x:g}' for x in s['lrs_large'])}); NumPyro and Blackjax's "
        "ELBO methods run Adam at the best vijax lr of the same family. "
        f"Seed{'s' if len(s['seeds']) > 1 else ''} {', '.join(map(str, s['seeds']))}.",
        "",
        "## Verdicts",
        "",
        "Per problem (and family, for BLR / logistic): vijax's fastest non-Adam method "
        "against the best-tuned Adam (ratio of evaluations to target, Adam / vijax; the "
        "issue's target is 10x) and against the best peer.",
        "",
    ]
    for prob in results["problems"]:
        lines += verdicts(prob)
    lines += ["", "## Not run", ""]
    any_skip = False
    for prob in results["problems"]:
        for nr in prob["not_run"]:
            any_skip = True
            lines.append(f"- {prob['name']}: {nr['method']}: {nr['reason']}.")
    if results.get("problems_not_run"):
        for name, why in results["problems_not_run"].items():
            any_skip = True
            lines.append(f"- {name}: the whole problem: {why}.")
    if not any_skip:
        lines.append("- nothing.")
    lines += [
        "",
        "## Every fit",
        "",
        "Evaluations to target (wall time to it, compilation excluded), or the evaluations "
        "run when it was not reached; the best accuracy within the caps; what stopped the "
        "fit; the k-hat of the q reported. The sweep's cost: the sum of evaluations over "
        "all of a family's Adam learning rates, is listed after the table.",
        "",
        "| problem | d | method | group | evals to target (wall) | best accuracy | stopped by "
        "| k-hat | compile s |",
        "|---|---:|---|---|---|---|---|---:|---:|",
    ]
    for prob in results["problems"]:
        for r in prob["runs"]:
            lines.append(
                f"| {prob['name']} | {prob['d']} | {r['label']} | {r['group']} | "
                f"{_cell(prob, r)} | {_acc(prob, r.get('best'))} | {r['status']} | "
                f"{_g(r.get('khat'), 2)} | {_g(r.get('compile_s'), 2)} |")
    lines += ["", "Adam sweep cost (evaluations over every learning rate, per family):", ""]
    for prob in results["problems"]:
        costs = {}
        for r in prob["runs"]:
            if r["method"].startswith("vijax Adam"):
                costs[r["method"]] = costs.get(r["method"], 0) + r.get("evals_run", 0)
        if costs:
            lines.append(f"- {prob['name']}: " + "; ".join(f"{k} {v:,}" for k, v in costs.items())
                         + f" (problem wall time {prob['wall_s']:.0f} s).")
    ec = results.get("evaluation_counts") or {}
    if ec:
        lines += ["", "Evaluations per step, counted by a host callback in log p against what "
                  "the table assumes: "
                  + "; ".join(f"{k} {v['measured_per_step']:g} measured, "
                              f"{v['assumed_per_step']} assumed"
                              for k, v in ec.items()) + "."]
    lines += ["", f"Machine: {_machine.one_line(results['machine'])}; "
              f"versions {', '.join(f'{k} {v}' for k, v in results['versions'].items())}. "
              f"Load average at start {results.get('load_average_start')}. "
              f"Total run time {results.get('total_wall_s', 0):.0f} s.", ""]
    return "\n".join(lines)


# ============================================================ driver
FULL_PROBLEMS = tuple(zoo_accuracy._zoo.ZOO) + (
    "blr_d100", "logistic_d100", "blr_d1000", "logistic_d1000", "blr_d10000",
    "logistic_d10000")
QUICK_PROBLEMS = ("poisson_glm", "blr_d20")


def build_problem(name: str, quick: bool) -> Problem:
    if name in zoo_accuracy._zoo.ZOO:
        budget = QUICK["budget"] if quick else ZOO_BUDGET
        cap = QUICK["wall_cap"] if quick else WALL_CAP_S["zoo"]
        return zoo_problem(name, budget=budget, wall_cap=cap)
    kind, d = name.rsplit("_d", 1)
    d = int(d)
    n = GLM_N.get(d, max(10 * d, 100))
    budget = QUICK["budget"] if quick else BUDGETS.get(d, 20_000)
    cap = QUICK["wall_cap"] if quick else WALL_CAP_S.get(d, 30.0)
    return glm_problem(kind, d, n, budget=budget, wall_cap=cap)


def _commit() -> Optional[str]:
    env = os.environ.get("VIJAX_COMMIT")
    if env:
        return env
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(vijax.__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--problems", default=None,
                        help="comma-separated problems (default: every zoo model with a "
                             "reference, then blr/logistic at d = 100, 1000, 10000)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated substrings of method names to run (default all)")
    parser.add_argument("--no-count", action="store_true", help="skip count_evaluations")
    parser.add_argument("--render", default=None,
                        help="only rewrite the .md beside this stored .json (no fits)")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            stored = _unclean(json.load(f))
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(markdown(stored))
        return stored
    if jax.config.jax_enable_x64:
        raise RuntimeError("head_to_head runs in float32: unset JAX_ENABLE_X64.")
    names = (args.problems.split(",") if args.problems
             else list(QUICK_PROBLEMS if args.quick else FULL_PROBLEMS))
    methods = args.methods.split(",") if args.methods else None
    stem = "head_to_head_quick" if args.quick else "head_to_head"
    results = {
        "settings": dict(quick=args.quick, num_samples=NUM_SAMPLES, rank=RANK, lrs=list(
            QUICK["lrs"] if args.quick else LRS), lrs_large=list(
            QUICK["lrs"] if args.quick else LRS_LARGE), seeds=list(SEEDS),
            zoo_mean_tol=ZOO_MEAN_TOL, zoo_sd_tol=ZOO_SD_TOL, kl_tol=KL_TOL,
            zoo_draws=ZOO_DRAWS, khat_draws=KHAT_DRAWS, growth=GROWTH,
            budgets={"zoo": QUICK["budget"] if args.quick else ZOO_BUDGET,
                     **{str(k): (QUICK["budget"] if args.quick else v)
                        for k, v in BUDGETS.items()}},
            wall_caps={str(k): (QUICK["wall_cap"] if args.quick else v)
                       for k, v in WALL_CAP_S.items()},
            ng_fr=dict(schedule=NG_SCHEDULE[0], growth=2.0, estimator="stl"),
            ng_mf=NG_MF, pbam_batch=PBAM_BATCH, min_batch=MIN_BATCH, bam_batch=BAM_BATCH,
            problems=names, methods=methods,
            env={k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "JAX_PLATFORMS")}),
        "machine": _machine.describe(),
        "versions": zoo_accuracy._versions(),
        "vijax_commit": _commit(),
        "vijax_path": os.path.dirname(os.path.abspath(vijax.__file__)),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "problems": [],
        "problems_not_run": {},
        "partial": True,
    }
    start = time.perf_counter()
    if not args.no_count:
        results["evaluation_counts"] = count_evaluations()
        print("evaluation counts:", results["evaluation_counts"], flush=True)
    for name in names:
        try:
            problem = build_problem(name, args.quick)
        except FileNotFoundError as err:
            results["problems_not_run"][name] = str(err)
            continue
        results["problems"].append(run_problem(problem, quick=args.quick, methods=methods,
                                               log=lambda s: print(s, flush=True)))
        results["total_wall_s"] = round(time.perf_counter() - start, 1)
        _machine.write_results(args.out, stem, _clean(results), markdown(results))
    results["partial"] = False
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    _machine.write_results(args.out, stem, _clean(results), markdown(results))
    print(f"wrote {os.path.join(args.out, stem)}.{{json,md}} in {results['total_wall_s']:.0f} s",
          flush=True)
    return results


def _unclean(x):
    """Inverse of :func:`_clean` for the strings it writes ("inf", "-inf", "nan")."""
    if isinstance(x, dict):
        return {k: _unclean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unclean(v) for v in x]
    if x in ("inf", "-inf", "nan"):
        return float(x)
    return x


def _clean(x):
    """JSON-safe: infinities and NaN as strings, NumPy scalars as Python numbers."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


if __name__ == "__main__":
    main()
