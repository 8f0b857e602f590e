"""The benchmark runner runs end to end on a tiny suite and writes well-formed results.

Timing is not tested (it belongs in ``benchmarks/``): only that the runner
produces its JSON, markdown and PNG with the fields the README and notebook
04 read. NumPyro and Blackjax are used when installed and skipped otherwise;
the runner is forced onto the CPU.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS = [p for p in ("numpyro", "blackjax") if importlib.util.find_spec(p) is not None]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Runs ``python -m benchmarks --suite smoke`` once into a temporary folder."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--suite", "smoke", "--device", "cpu",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.mark.slow
def test_writes_json_markdown_and_png(smoke):
    out, _ = smoke
    names = sorted(p.name for p in out.iterdir())
    assert names == ["suite_smoke.json", "suite_smoke.md", "suite_smoke.png"]
    assert (out / "suite_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "suite_smoke.png").stat().st_size > 10_000


@pytest.mark.slow
def test_json_is_well_formed(smoke):
    out, _ = smoke
    from benchmarks.suite import SUITES

    data = json.loads((out / "suite_smoke.json").read_text())
    suite = SUITES["smoke"]
    assert data["suite"] == "smoke"
    for key in ("cpu", "cores", "jax", "backend", "device"):
        assert key in data["machine"], key
    assert data["machine"]["backend"] == "cpu"
    assert data["implementations"] == ["floor", "vijax.fit"] + PEERS
    assert [c["id"] for c in data["configs"]] == [c.id for c in suite.configs]
    for c in data["configs"]:
        estimator = c["config"]["estimator"]
        expected = {"floor", "vijax.fit"} | {
            p for p in PEERS if not (p == "numpyro" and estimator != "reparam")}
        assert set(c["impls"]) == expected, c["id"]
        for name, r in c["impls"].items():
            assert len(r["times_s_per_step"]) == suite.repeats
            assert r["steady_s_per_step"] > 0
            assert r["min_s_per_step"] <= r["steady_s_per_step"]
            # The cold fit ran fit_steps steps, so it took at least that long.
            assert r["end_to_end_s"] >= suite.fit_steps * r["min_s_per_step"]
            assert 0 < r["xla_compile_s"] <= r["compile_s"] <= r["end_to_end_s"]
            assert r["one_time_s"] >= 0
            assert math.isfinite(r["ratio_to_floor"])
            assert r["memory"] is not None and r["memory"]["peak_bytes"] > 0, name
            conv = r["convergence"]
            trace = conv["trace"]
            assert trace[0][0] == 0 and all(g is not None for _, g in trace)
            # The exact gap of the starting N(0, 0.1^2 I) is the same for all.
            assert trace[0][1] == pytest.approx(c["impls"]["floor"]["convergence"]["trace"][0][1])
            assert trace[0][1] > conv["tol"]
            if conv["reached"]:
                assert conv["evals"] == conv["steps"] * c["config"]["num_samples"]
                steps = [s for s, _ in trace]
                i = steps.index(conv["steps"])
                assert trace[i - 1][1] >= conv["tol"]
                assert all(g < conv["tol"] for _, g in trace[i:i + conv["confirm_checks"] + 1])
        assert c["impls"]["floor"]["ratio_to_floor"] == 1.0


@pytest.mark.slow
def test_markdown_has_a_row_per_configuration(smoke):
    out, _ = smoke
    from benchmarks import _report

    md = (out / "suite_smoke.md").read_text()
    data = json.loads((out / "suite_smoke.json").read_text())
    assert md.startswith("# vijax benchmark suite: smoke")
    assert md == _report.markdown(data)  # rendered from the JSON alone
    for c in data["configs"]:
        label = _report._short(c)
        rows = [line for line in md.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) == 4, label  # time, compile, memory, evaluations
        header = next(line for line in md.splitlines() if line.startswith("| configuration | K"))
        assert rows[0].count("|") == header.count("|")


@pytest.mark.slow
def test_render_redraws_from_json(smoke, tmp_path):
    out, _ = smoke
    from benchmarks import suite

    suite.main(["--render", str(out / "suite_smoke.json"), "--out", str(tmp_path)])
    assert (tmp_path / "suite_smoke.md").read_text() == (out / "suite_smoke.md").read_text()
    assert (tmp_path / "suite_smoke.png").stat().st_size > 10_000


def test_steps_per_call_divides_the_fit():
    from benchmarks.suite import SUITES, _steps_per_call

    quick = SUITES["quick"]
    for s_per_step in (1e-6, 1e-4, 1e-3, 1e-2, 1.0):
        k = _steps_per_call(s_per_step, quick)
        assert quick.fit_steps % k == 0 and 10 <= k <= quick.fit_steps
    assert _steps_per_call(1e-6, quick) == quick.fit_steps
    assert _steps_per_call(1e-3, quick) * 1e-3 <= quick.call_seconds


def test_compile_time_merges_nested_intervals():
    from benchmarks._timing import _covered

    assert _covered([]) == 0.0
    assert _covered([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert _covered([(0.0, 5.0), (1.0, 2.0)]) == 5.0  # a trace nested in another
