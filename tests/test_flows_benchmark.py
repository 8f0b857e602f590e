"""``benchmarks/flows.py --quick`` runs end to end and writes finite, consistent rows.

Timing is not tested (it belongs in ``benchmarks/``). The quick run (the
banana, the affine coupling flow, vijax against FlowJAX, one repeat) writes
into a temporary folder, so the recorded results stay as they are. Where
FlowJAX is not installed the benchmark runs its vijax rows only, and so does
this test.
"""

import json
import math

import pytest

from benchmarks import flows


@pytest.mark.slow
def test_flows_quick_run_writes_its_table(tmp_path):
    results = flows.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "flows_quick.json") as f:
        stored = json.load(f)
    md = (tmp_path / "flows_quick.md").read_text()
    assert stored == json.loads(json.dumps(results))
    s = stored["settings"]
    assert s["quick"] is True and s["flowjax"] is flows.HAVE_FLOWJAX
    assert "cpu" in stored["machine"] and stored["total_wall_s"] > 0

    rows = stored["rows"]
    want = [flows.VIJAX] + ([flows.FLOWJAX] if flows.HAVE_FLOWJAX else [])
    assert [r["runner"] for r in rows] == want
    for r in rows:
        assert (r["problem"], r["flow"], r["d"]) == ("banana", "affine_coupling", 2)
        assert len(r["runs"]) == s["repeats"] == 1
        # Finite, positive timings and a finite KL (>= 0 up to a few SEs).
        for key in ("ms_per_step", "first_call_s", "compile_s", "kl", "kl_se", "khat"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["runner"], key)
        assert r["ms_per_step"] > 0 and r["first_call_s"] > 0 and r["kl_se"] > 0
        assert r["kl"] > -5 * r["kl_se"]
        assert r["failed_scores"] == 0
    (v,) = [r for r in rows if r["runner"] == flows.VIJAX]
    assert v["skipped"] == [0]
    # A flow fitted for a few hundred steps is already better than q's start.
    assert v["kl"] < 1.0

    header = "| problem | flow | runner | ms/step |"
    assert header in md and "## How measured" in md and "## Verdict" in md
    table = [line for line in md.splitlines() if line.startswith("| banana (d=2) |")]
    assert len(table) == len(rows)
    if flows.HAVE_FLOWJAX:
        assert isinstance(v["ratio"], float) and v["ratio"] > 0
        assert v["speed_ok"] == (v["ratio"] <= 0.5)
        assert v["meets_target"] == (v["speed_ok"] and v["elbo_ok"])
        assert ("**meets**" in table[0]) == v["meets_target"]
    else:
        assert "ratio" not in v
        assert "FlowJAX was not run" in md
