"""``benchmarks/pbam_scale.py`` runs end to end on a tiny problem and reports what it ran.

Timing is not tested. What is tested: the checkpoint grid, that a run's
record is consistent (a reported "reached" is a KL at or below the
tolerance, evaluations are steps x per-step draws, the KL at a budget is the
one at that checkpoint), and that the report renders a row per method group
(``tests/test_benchmark_scripts.py`` checks that importing it leaves float64
off).
"""

import math

import pytest

from benchmarks import _machine, pbam_scale


def test_checkpoint_steps_cover_every_step_early_and_the_budgets():
    steps = pbam_scale.checkpoint_steps(100, extra=[37, 250])
    assert steps[:10] == list(range(1, 11))
    assert steps[-1] == 100 and 37 in steps and 250 not in steps
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert all(b <= max(a + 1, math.ceil(1.1 * a)) for a, b in zip(steps, steps[1:]) if b != 37)


@pytest.mark.slow
def test_runners_and_report_on_a_tiny_gaussian(x64):
    problem = pbam_scale.gaussian_problem(12, k=2)  # family vijax.low_rank(rank=2)
    methods = [pbam_scale.Method("pBaM B=8", "pbam", 8),
               pbam_scale.Method("ADVI lr=0.1", "advi", 8, lr=0.1, group="ADVI")]
    budgets = (80, 240)
    records = [pbam_scale.run_method(m, problem, max_evals=400, budgets=budgets,
                                     log=lambda s: None) for m in methods]
    pbam_scale.time_steady(records, repeats=1, log=lambda s: None)
    for r in records:
        per = r["method"]["per_step"]
        assert r["evals_run"] == r["steps_run"] * per
        assert r["skipped"] == 0 and r["status"] in ("budget", "converged")
        assert r["ms_per_step"] is not None and r["ms_per_step"] > 0
        for c in r["curve"]:
            assert c["evals"] == c["steps"] * per
        if r["evals_to_tol"] is not None:
            hit = next(c for c in r["curve"] if c["evals"] == r["evals_to_tol"])
            assert hit["kl"] <= pbam_scale.TOL
            # The fresh single call lands where the chunked run did.
            assert r["rerun_kl"] == pytest.approx(hit["kl"], rel=1e-6, abs=1e-12)
        for e in budgets:
            cell = r["kl_at_evals"][str(e)]
            if cell["kl"] is not None:
                hit = next(c for c in r["curve"] if c["steps"] == e // per)
                assert cell["kl"] == hit["kl"]
            else:
                assert cell["why"] == "converged"
    # pBaM lands on a 12-d Gaussian in its own family within the budget.
    assert records[0]["evals_to_tol"] is not None

    results = {
        "settings": dict(quick=True, k=2, tol=pbam_scale.TOL, advi_samples=8, budgets=budgets,
                         bam32_max_evals=100, env={"OPENBLAS_NUM_THREADS": "1"},
                         command="test"),
        "machine": _machine.describe(),
        "load_average_before": [0.0, 0.0, 0.0], "load_average_after": [0.0, 0.0, 0.0],
        "total_wall_s": 1.0,
        "problems": [dict(problem="gaussian", d=12, info=problem.info, family_optimum_kl=0.0,
                          max_evals=400, runs=[pbam_scale._strip(r) for r in records])],
        "evaluation_counts": {"pBaM B=32": dict(expected_per_step=32, measured_per_step=32.0)},
    }
    results["notes"] = pbam_scale.notes(results)
    md = pbam_scale.markdown(pbam_scale._clean(results))
    prefix = "| Gaussian (rank 2 + diag) | 12 |"
    rows = [line for line in md.splitlines() if line.startswith(prefix)]
    assert len(rows) == 2 and "pBaM B=8" in rows[0] and "ADVI lr=0.1" in rows[1]
    assert all(row.count("|") == 11 + len(budgets) for row in rows)
    assert "32 measured, 32 assumed (matches)" in md
