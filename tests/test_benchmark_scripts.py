"""The stand-alone benchmark scripts compare like with like and run end to end.

Timing is not tested (it belongs in ``benchmarks/``). What is tested: the
hand-written floor of ``benchmarks/fit_speed.py`` computes exactly what
``vijax.fit`` computes per step (so the speed ratio compares the same work),
``benchmarks/fast_vi.py``'s runners and report work on a tiny problem, and
``benchmarks/stopping.py --quick`` writes its table.
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vijax
from benchmarks import fast_vi, fit_speed, stopping
from references import perturb


@pytest.mark.slow
def test_importing_the_scripts_leaves_x64_off():
    # These run in float64 but must not switch it on for whoever imports them.
    code = (
        "import jax; import benchmarks.fast_vi, benchmarks.fit_speed, "
        "benchmarks.pbam_scale, benchmarks.bam_trust_region, benchmarks.slang_scale, "
        "benchmarks.head_to_head, benchmarks.default_fit; "
        "assert not jax.config.jax_enable_x64, 'x64 was switched on'"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family_name", ["mean_field", "full_rank"])
@pytest.mark.parametrize("estimator", ["stl", "reparam", "closed_entropy"])
def test_fit_speed_floor_computes_what_fit_computes(x64, family_name, estimator):
    x, y = fit_speed.make_data(n=50, d=6)
    x, y = x.astype(jnp.float64), y.astype(jnp.float64)
    hand = fit_speed.hand_log_joint(x, y)
    model = vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)
    family = vijax.mean_field() if family_name == "mean_field" else vijax.full_rank()
    rng = np.random.default_rng(0)
    params = perturb(family.init(jnp.zeros(6)), rng, scale=0.3)
    key = jax.random.key(3)

    # The same log joint as the library's model, to rounding.
    for z in rng.standard_normal((3, 6)):
        np.testing.assert_allclose(float(hand(z)), float(model.log_joint(z)), rtol=1e-12)

    floor = fit_speed.floor_neg_elbo(family_name, hand, 8, estimator)
    value, grads = jax.value_and_grad(floor)(params, key)

    def neg_elbo(p):
        return -vijax.elbo(key, p, family, hand, num_samples=8, estimator=estimator)

    ref_value, ref_grads = jax.value_and_grad(neg_elbo)(params)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-10, atol=1e-12)


def test_fit_speed_floor_rejects_other_estimators():
    with pytest.raises(ValueError, match="'score'"):
        fit_speed.floor_neg_elbo("mean_field", lambda z: z.sum(), 8, "score")


@pytest.mark.slow
def test_fit_speed_steady_state_runs():
    out = fit_speed.steady_state("mean_field", num_steps=10, repeats=1, chunk_size=5)
    assert set(out) == {"floor", "fit_hand_log_joint", "fit_library_log_joint"}
    for name, r in out.items():
        assert r["median_s_per_step"] > 0 and r["min_s_per_step"] > 0
    for name in ("fit_hand_log_joint", "fit_library_log_joint"):
        assert math.isfinite(out[name]["ratio_median"]) and out[name]["ratio_median"] > 0


@pytest.mark.slow
def test_fast_vi_runs_and_reports_on_a_small_problem(x64, monkeypatch):
    # One setting per method keeps this to a few compiles.
    monkeypatch.setattr(fast_vi, "ADAM_LRS", (0.1,))
    monkeypatch.setattr(fast_vi, "NG_RHOS", (0.3,))
    monkeypatch.setattr(fast_vi, "NG_GROWTH_RHOS", ())
    d, tol = 4, 1e-2
    model = fast_vi.blr(d, n=100)
    log_joint = fast_vi._LogJoint(model.log_joint, model.latent)
    family = vijax.full_rank()

    def dist(p):
        return vijax.exact_kl(p, family, model)

    budgets = dict(adam=200, natural=20, natural_few=20, bam=20)
    methods = fast_vi.run_problem(
        "BLR d=4", log_joint, dist, family_name="full_rank", d=d, tol=tol,
        budgets=budgets, estimators=("stl",),
    )
    assert set(methods) == {"Adam ADVI", "natural gradient", "batch and match"}
    runs, setting, best = methods["batch and match"]
    assert set(runs) == {"B=4", "B=8"}
    # Batch and match lands on a 4-d Gaussian posterior in a few steps.
    assert best["evals"] is not None and best["evals"] <= 20 * 8
    assert best["last_kl"] < tol and best["wall_s"] > 0
    # A run that is reported as reached did reach the target; the others
    # report the KL they ended at.
    for runs, _, _ in methods.values():
        for r in runs.values():
            if r["evals"] is not None:
                assert r["last_kl"] < tol
            else:
                assert r["last_kl"] >= tol and r["wall_s"] is None

    results = {"BLR d=4, full_rank": dict(problem="BLR d=4", family="full_rank",
                                          methods=methods)}
    md = fast_vi.render(results, fast_vi._machine.describe(), argparse.Namespace(tol=tol, quick=True))
    row = [line for line in md.splitlines() if line.startswith("| BLR d=4 |")]
    assert len(row) == 1 and row[0].count("|") == 9
    assert "not run (stl noise vanishes here)" in row[0]
    assert "Every setting tried" in md


@pytest.mark.slow
def test_fast_vi_averaged_runs_measure_the_averaged_parameters(x64, monkeypatch):
    monkeypatch.setattr(fast_vi, "ADAM_LRS", (0.1,))
    monkeypatch.setattr(fast_vi, "NG_RHOS", ())
    monkeypatch.setattr(fast_vi, "NG_GROWTH_RHOS", ())
    monkeypatch.setattr(fast_vi, "NG_DECAY", ("0.1", 0.1))
    monkeypatch.setattr(fast_vi, "AVERAGE_STARTS", (5,))
    monkeypatch.setattr(fast_vi, "SPREAD_SEEDS", (1,))
    d, tol = 3, 1e-3
    model = fast_vi.blr(d, n=20)
    log_joint = fast_vi._LogJoint(model.log_joint, model.latent)
    family = vijax.mean_field()
    best_kl = fast_vi.mean_field_optimum_kl(model)

    def dist(p):
        return vijax.exact_kl(p, family, model) - best_kl

    budgets = dict(adam=400, natural=50, natural_few=50, bam=1)
    methods = fast_vi.run_problem(
        "BLR d=3", log_joint, dist, family_name="mean_field", d=d, tol=tol,
        budgets=budgets, estimators=("stl",), with_bam=False, averaging=True,
    )
    assert set(methods) == {"Adam ADVI", "Adam + averaging", "natural gradient"}
    assert set(methods["Adam + averaging"][0]) == {"lr=0.1, average from 5, stl"}
    key = "rho=0.1, S=8, growth=2, average from 5, stl"
    assert key in methods["natural gradient"][0]
    # The reported distance is that of the averaged parameters: recompute it.
    opt = vijax.iterate_average(
        vijax.natural_gradient(family, 0.1, max_variance_growth=2.0), start=5)
    step = vijax.make_step(family, log_joint, opt, num_samples=8, estimator="stl")
    state = vijax.init_fit_state(jax.random.key(0), family.init(jnp.zeros(d)), opt)
    run = methods["natural gradient"][0][key]
    for _ in range(run["steps"] or budgets["natural_few"]):
        state, _ = step(state)
    np.testing.assert_allclose(
        float(dist(vijax.averaged_params(state))), run["last_kl"], rtol=1e-9)
    # The best natural-gradient setting is rerun on the spread seeds.
    _, _, best = methods["natural gradient"]
    assert set(best["other_seeds"]) == {"1"}
    results = {"BLR d=3, mean_field": dict(problem="BLR d=3", family="mean_field",
                                           methods=methods)}
    md = fast_vi.render(results, fast_vi._machine.describe(), argparse.Namespace(tol=tol, quick=True))
    assert "on other seeds" in md and "key 1:" in md


def test_fast_vi_ratios_round_lower_bounds_down():
    assert fast_vi._ratio({"evals": None, "max_evals": 800000}, [36592]) == "> 21x"
    assert fast_vi._ratio({"evals": None, "max_evals": 40000}, [1500]) == "> 26x"
    assert fast_vi._ratio({"evals": 128000}, [36592, 10**6]) == "3.5x"
    assert fast_vi._ratio({"evals": 18800}, [300]) == "63x"
    assert fast_vi._ratio({"evals": 18800}, []) == "—"


@pytest.mark.slow
def test_stopping_quick_run_writes_its_table(tmp_path):
    # One small BLR case, one key, no zoo: about 10 s, into tmp_path (the
    # recorded results stay as they are).
    results = stopping.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "stopping_quick.json") as f:
        stored = json.load(f)
    md = (tmp_path / "stopping_quick.md").read_text()
    assert stored == json.loads(json.dumps(results))
    assert stored["settings"]["quick"] is True and stored["zoo"] == {}
    assert "cpu" in stored["machine"] and stored["total_wall_s"] > 0
    (label,) = stored["blr"]
    (run,) = stored["blr"][label]["runs"]
    assert run["key"] == stopping.QUICK_KEYS[0] and run["stopped_early"]
    assert 0 < run["stop"] < stopping.MAX_STEPS
    # The rule's cost was read off a run identical to fit's.
    assert run["counted_matches_fit"] and run["rule_evals"] > 0
    assert run["step_evals"] == run["stop"] * stopping.NUM_SAMPLES
    # The gaps are consistent: what fit returned is a candidate of one of the
    # rule's checks (the best of them), all at or before the stop, so its gap
    # is at least the best the replay scored up to there.
    assert run["gap"] >= run["best_gap_to_stop"] - 1e-9
    assert run["best_gap_to_stop"] <= run["best_gap_at_stop"]
    if run["needed"] is not None:
        assert run["ratio"] == round(run["stop"] / run["needed"], 3)
    summary = stored["blr"][label]["summary"]
    assert summary["runs"] == 1 and summary["stops"] == [run["stop"]]
    assert "## Summary" in md and "## Failures" in md and "## Every BLR run" in md
    assert f"| {label} | 1 | {run['stop']} |" in md


@pytest.mark.slow
def test_bam_batch_size_quick_writes_its_table(tmp_path):
    """``benchmarks/bam_batch_size.py --quick``: B = d and larger batches on BLR at d = 100."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
    env.pop("JAX_ENABLE_X64", None)
    cmd = [sys.executable, "-m", "benchmarks.bam_batch_size", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((tmp_path / "bam_batch_size_quick.json").read_text())
    (problem,) = stored["problems"]
    runs = {r["multiple"]: r for r in problem["runs"]}
    assert sorted(runs) == [1.0, 1.5, 2.0, 3.0] and problem["d"] == 100
    for mult, r in runs.items():
        assert r["batch"] == round(mult * 100) and len(r["gaps"]) == stored["steps"]
        assert all(g >= -1e-6 for g in r["gaps"])  # an exact KL above the optimum
    # What the docstring of batch_and_match says: a batch of 1.5 d settles on
    # this Gaussian posterior, one of d does not.
    assert runs[1.5]["steps_to_target"] is not None and runs[1.5]["final_gap"] < 1e-3
    assert runs[1.0]["steps_to_target"] is None
    md = (tmp_path / "bam_batch_size_quick.md").read_text()
    assert "| blr_d100 | 150 (1.5 d) |" in md
