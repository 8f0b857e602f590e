"""``benchmarks/big_data.py --quick`` runs end to end and writes the keys its report needs.

Timing is not tested (it belongs in ``benchmarks/``). The run uses tiny sizes
(one n, a few steps, one repeat, 1 and 2 forced CPU devices) and writes into
a temporary folder, so the recorded results stay as they are. Every runner
runs in its own child process, as in the real benchmark.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

N = 2048


@pytest.mark.slow
def test_big_data_quick_run_writes_its_table(tmp_path):
    pytest.importorskip("numpyro")
    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.big_data", "--quick", "--ns", str(N),
           "--steps", "20", "--repeats", "1", "--device-n", str(N),
           "--device-counts", "1", "2", "--runners", "vijax", "numpyro_scan", "lean",
           "--out", str(tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(tmp_path / "big_data_quick.json") as f:
        stored = json.load(f)
    md = (tmp_path / "big_data_quick.md").read_text()
    assert {"settings", "machine", "versions", "load_average_before", "load_average_after",
            "sizes", "devices", "verdict", "total_wall_s", "notes"} <= set(stored)
    s = stored["settings"]
    assert s["quick"] is True and s["ns"] == [N] and s["steps"] == 20 and s["repeats"] == 1
    assert s["env"]["JAX_PLATFORMS"] == "cpu" and "cpu" in stored["machine"]

    row = stored["sizes"][str(N)]
    assert set(row) == {"vijax", "numpyro_scan", "lean"}
    for name, r in row.items():
        assert not r.get("failed"), (name, r)
        for key in ("median_steps_per_s", "rss_after_data_mib", "peak_minus_data_mib",
                    "extra_over_data_ready_mib", "peak_run_mib", "warm_call_s", "last_elbo"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key)
        assert r["median_steps_per_s"] > 0 and r["steps"] == 20
        assert len(r["loc_round0"]) == 100 and len(r["runs"]) == 1
        assert r["runs"][0]["peak_reset"] in (True, False)

    dev = stored["devices"]
    assert set(dev) == {"vijax", "lean"}
    for per_k in dev.values():
        assert set(per_k) == {"1", "2"}
        assert [per_k[k]["runs"][0]["devices_seen"] for k in ("1", "2")] == [1, 2]
        assert all(math.isfinite(d["median_steps_per_s"]) for d in per_k.values())
        # Sharding the rows changes where the work runs, not what is computed.
        one, two = per_k["1"]["loc_round0"], per_k["2"]["loc_round0"]
        assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4

    v = stored["verdict"]["per_n"][str(N)]
    assert v["numpyro_best"] == "numpyro_scan"
    assert v["speed_ok"] == (v["ratio_vijax_over_numpyro"] >= 2.0)
    # Both fit the same model from the same start for the same number of steps.
    assert v["same_steps_as_numpyro_scan"] and v["max_abs_mean_diff_vs_numpyro_scan"] < 1.0
    assert stored["verdict"]["accuracy_n"] == N

    assert "## Steps per second and memory against n" in md and "## Verdict" in md
    assert "device count" in md and "python -m benchmarks.big_data --quick" in md
