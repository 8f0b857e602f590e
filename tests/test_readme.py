"""The README's quickstart and example stay true."""

import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [
        line for block in re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
        for line in block.strip().splitlines() if line.strip()
    ]
    assert len(commands) == 2, commands
    assert "python -m vijax" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, "CI must run the README's test command verbatim"


@pytest.mark.slow
def test_readme_examples_run_in_order_and_show_what_they_claim(capsys):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    namespace = {}
    previous = jax.config.jax_enable_x64  # the example turns x64 on globally
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md block {i}", "exec"), namespace)
    finally:
        jax.config.update("jax_enable_x64", previous)
    out = capsys.readouterr().out
    residual = float(re.search(r"ELBO \+ KL - log Z = (\S+)", out).group(1))
    assert abs(residual) < 1e-8
    max_diff = float(re.search(r"max \|grad ELBO \+ grad KL\| = (\S+)", out).group(1))
    assert max_diff < 1e-8
    kl_after_fit = float(re.search(r"KL after the fit: (\S+)", out).group(1))
    assert 0 <= kl_after_fit < 1e-2
    last, averaged = map(float, re.search(
        r"KL above the mean-field optimum: last iterate (\S+), averaged (\S+)", out).groups())
    assert -1e-9 < averaged < 0.2 * last
    # fit_exact on logistic regression converged, and reports exact_elbo.
    reported, recomputed = map(float, re.search(
        r"fit_exact: converged.*; ELBO (\S+) = exact_elbo (\S+)", out).groups())
    assert reported == pytest.approx(recomputed, abs=1e-8)
    bent = float(re.search(r"bent family: ELBO (\S+)", out).group(1))
    gaussian = float(re.search(r"full_rank family: ELBO (\S+)", out).group(1))
    assert bent > -0.05 and bent - gaussian > 0.1  # 20000 draws: s.e. about 0.01
    flow, flow_khat = map(float, re.search(
        r"autoregressive flow: ELBO (\S+) \(log Z = 0\), k-hat (\S+)", out).groups())
    assert flow > -0.1 and flow - gaussian > 0.1 and flow_khat < 0.7
    # Empirical Bayes on minibatches: the learned scales match the exact
    # type-II maximum likelihood (to the step's noise floor).
    got, want = (np.array(list(map(float, g.split()))) for g in re.search(
        r"learned \[(.*?)\] type-II ML \[(.*?)\]", out).groups())
    np.testing.assert_allclose(got, want, rtol=0.02)
    # Eight schools: the hand-written constrained model and the NumPyro one
    # are one density; the fit lands near the long-NUTS posterior means
    # (mu 4.4, tau 3.6, each with a posterior sd above 3).
    gap = float(re.search(r"log joints differ by at most (\S+)", out).group(1))
    assert gap < 1e-8
    mu, tau = map(float, re.search(r"schools: mu (\S+), tau (\S+)", out).groups())
    assert abs(mu - 4.4) < 1.0 and 1.5 < tau < 5.0
    # Diagnostics: the rule stopped the schools fit well before the ceiling,
    # and the diagnosis printed a finite k-hat and a verdict.
    stop = int(re.search(r"auto_stop: stopped at step (\d+) of at most 20000", out).group(1))
    assert 50 <= stop < 20000
    khat = float(re.search(r"diagnosis: k-hat (\S+)", out).group(1))
    assert 0 < khat < 1.0
    assert "verdict: " in out
