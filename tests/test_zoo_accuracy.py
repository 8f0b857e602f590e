"""``benchmarks/zoo_accuracy.py``: its scoring is right and a quick run writes the table.

Accuracy itself is measured by the benchmark, not tested: these tests check that
the error columns mean what they say (an exact q scores 0 and ratio 1, element
names line up with the references and with ``vijax.summary``) and that the
quick run produces every model x method row.
"""

import json
import math

import jax
import numpy as np
import pytest

import vijax
from benchmarks import zoo_accuracy


def _record(stats: dict, latent, deterministic=()):
    return {"latent": list(latent), "deterministic": list(deterministic),
            "statistics": stats}


def test_reference_moments_flatten_row_major_with_summary_names():
    record = _record(
        {"tau": {"shape": [], "mean": 2.0, "sd": 0.5},
         "f": {"shape": [2, 2], "mean": [[1.0, 2.0], [3.0, 4.0]],
               "sd": [[1.0, 1.0], [2.0, 2.0]]}},
        latent=("tau",), deterministic=("f",))
    names, mean, sd = zoo_accuracy.reference_moments(record)
    assert names == ("tau", "f[0,0]", "f[0,1]", "f[1,0]", "f[1,1]")
    np.testing.assert_array_equal(mean, [2.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(sd, [0.5, 1.0, 1.0, 2.0, 2.0])


def test_score_is_zero_error_and_unit_ratio_for_the_reference_itself():
    ref = (("a", "b[0]", "b[1]"), np.array([0.0, 1.0, -1.0]), np.array([1.0, 2.0, 0.5]))
    # q's elements in another order, plus one the reference lacks.
    fitted = zoo_accuracy.Fitted(("b[1]", "extra", "a", "b[0]"),
                                 np.array([-1.0, 7.0, 0.0, 1.0]),
                                 np.array([0.5, 1.0, 1.0, 2.0]), 1, 8, 0.1, "ok")
    s = zoo_accuracy.score(fitted, ref)
    assert s["num_elements"] == 3
    assert s["max_mean_err"] == 0.0 and s["median_mean_err"] == 0.0
    assert s["sd_ratio_min"] == s["sd_ratio_median"] == s["sd_ratio_max"] == 1.0


def test_score_in_reference_sds():
    ref = (("a", "b"), np.array([0.0, 0.0]), np.array([2.0, 4.0]))
    fitted = zoo_accuracy.Fitted(("a", "b"), np.array([1.0, -1.0]), np.array([1.0, 8.0]),
                                 1, 8, 0.1, "ok")
    s = zoo_accuracy.score(fitted, ref)
    assert s["max_mean_err"] == pytest.approx(0.5) and s["worst_element"] == "a"
    assert s["median_mean_err"] == pytest.approx(0.375)
    assert (s["sd_ratio_min"], s["sd_ratio_max"]) == (pytest.approx(0.5), pytest.approx(2.0))


def test_score_refuses_a_q_missing_a_reference_element():
    ref = (("a", "theta[0]"), np.zeros(2), np.ones(2))
    fitted = zoo_accuracy.Fitted(("a",), np.zeros(1), np.ones(1), 1, 8, 0.1, "ok")
    with pytest.raises(KeyError, match="theta"):
        zoo_accuracy.score(fitted, ref)


def test_peer_moments_use_the_names_and_values_of_vijax_summary():
    # The peers' moments (moments_of_draws on constrained draws) and vijax's
    # (vijax.summary) must line up element by element, derived quantities
    # included: the same draws give the same rows.
    model = zoo_accuracy.build_model("eight_schools_noncentered")
    family = vijax.mean_field()
    params = family.init(model.latent)
    key = jax.random.key(0)
    s = vijax.summary(key, params, family, model, num_samples=50)
    draws = model.constrain(family.sample(key, params, 50))
    names, mean, sd = zoo_accuracy.moments_of_draws(draws)
    assert names == s.names
    np.testing.assert_allclose(mean, s.stats["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd, s.stats["sd"], rtol=1e-5, atol=1e-6)


def _run(seed, status="ok", max_err=0.2, ratio_max=1.1):
    row = {"seed": seed, "steps": 10, "evals": 80, "wall_s": 1.0, "status": status}
    if status == "ok":
        row.update(max_mean_err=max_err, median_mean_err=max_err / 2, worst_element="tau",
                   sd_ratio_min=0.5, sd_ratio_median=0.9, sd_ratio_max=ratio_max)
    return row


def test_aggregate_takes_the_worst_seed_and_counts_failures():
    agg = zoo_accuracy.aggregate([_run(0, max_err=0.2), _run(1, max_err=0.4, ratio_max=1.3)])
    assert agg["max_mean_err"] == 0.4 and agg["sd_ratio_max"] == 1.3
    assert agg["failed"] == agg["far_off"] == 0
    agg = zoo_accuracy.aggregate([_run(0), _run(1, status="failed (FitError at step 3)"),
                                  _run(2, max_err=50.0)])
    assert (agg["seeds"], agg["failed"], agg["far_off"]) == (3, 1, 1)


def test_verdicts_compare_like_with_like_and_leave_out_failures():
    def model(**worst):
        methods = {m: {"runs": [_run(0, max_err=v)] if v is not None
                       else [_run(0, status="failed (x)")]}
                   for m, v in worst.items()}
        for m in methods.values():
            m["worst"] = zoo_accuracy.aggregate(m["runs"])
        return {"d": 3, "methods": methods}

    # In METHODS order: vijax MF, FR, natgrad, BaM (failed), AutoNormal,
    # AutoMVN, meanfield_vi, fullrank_vi (failed).
    values = dict(zip(zoo_accuracy.METHODS, [1.0, 0.1, 0.5, None, 0.2, 0.12, 0.3, None]))
    results = {"models": {"m": model(**values)}}
    losses, wins, ties = zoo_accuracy.verdicts(results)
    # Mean-field: vijax 1.0 against the better peer, AutoNormal 0.2: a loss.
    # Full-rank: vijax 0.1 against AutoMVN 0.12 (fullrank_vi failed): a tie;
    # best of each: vijax FR 0.1 against AutoMVN 0.12: a tie. Failures are
    # listed, not compared.
    assert losses == ["**m**, mean-field Adam: vijax MF Adam 1.00 sd against "
                      "NumPyro AutoNormal 0.20 sd"]
    assert wins == [] and ties == ["m (full-rank Adam)", "m (best of each)"]
    assert zoo_accuracy.failures(results) == ["- vijax BaM: m seed 0: failed (x).",
                                              "- Blackjax fullrank_vi: m seed 0: failed (x)."]


@pytest.mark.slow
def test_quick_run_writes_every_model_and_method(tmp_path):
    # NumPyro and Blackjax are not written for strict rank promotion.
    with jax.numpy_rank_promotion("allow"):
        results = zoo_accuracy.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "zoo_accuracy_quick.json") as f:
        stored = json.load(f)
    md = (tmp_path / "zoo_accuracy_quick.md").read_text()
    assert stored["settings"]["budget"] == zoo_accuracy.QUICK_BUDGET
    assert stored["settings"]["quick"] is True
    assert stored["settings"]["seeds"] == list(zoo_accuracy.QUICK_SEEDS)
    assert "cpu" in stored["machine"] and stored["total_wall_s"] > 0
    assert set(stored["models"]) == set(zoo_accuracy.QUICK_MODELS)
    assert stored == json.loads(json.dumps(results))
    assert "## vijax against the peers" in md and "## Every fit" in md
    for name, model in stored["models"].items():
        # The peers run when installed (Blackjax is in the compare extra, not dev).
        assert list(model["methods"]) == zoo_accuracy.installed_methods()
        assert all(m in model["methods"] for m in zoo_accuracy.METHODS if m.startswith("vijax"))
        has_ref = model["reference"] is not None
        if has_ref:
            assert model["reference"]["matches_data"], name
        for method, entry in model["methods"].items():
            assert [r["seed"] for r in entry["runs"]] == list(zoo_accuracy.QUICK_SEEDS)
            for row in entry["runs"]:
                assert row["status"] == "ok" or row["status"].startswith("failed ("), row
                assert 0 < row["evals"] <= zoo_accuracy.QUICK_BUDGET
                assert row["wall_s"] > 0
                if row["status"] == "ok" and has_ref:
                    for k in zoo_accuracy.METRICS:
                        assert math.isfinite(row[k]), (name, method, k)
                    assert row["median_mean_err"] <= row["max_mean_err"]
                    assert row["sd_ratio_min"] <= row["sd_ratio_median"] <= row["sd_ratio_max"]
            assert f"| {name} | {model['d']} | {method} |" in md
