"""``benchmarks/slang_scale.py``: its structured KL is the KL, and its quick run writes the table."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import vijax
from benchmarks import slang_scale


def test_structured_kl_matches_vijax_and_the_posterior_is_the_models(x64, rng):
    d, k = 30, 4
    q = (rng.normal(size=d), rng.normal(size=(d, k)), np.exp(0.3 * rng.normal(size=d)))
    model, p = slang_scale.problem(d, n=3, seed=1)
    post = vijax.Gaussian.low_rank_precision(*(jnp.asarray(a) for a in p))
    dense = vijax.Gaussian.from_cov(post.mean, post.cov)  # an independent route: dense Cholesky
    ref = vijax.gaussian_kl(vijax.Gaussian.low_rank_precision(*(jnp.asarray(a) for a in q)), dense)
    assert slang_scale.kl_low_rank_precision(q, p) == pytest.approx(float(ref), rel=1e-9)
    # The benchmark's posterior (mean by Woodbury, precision X^T X + I) is the
    # model's, which was built from the float32 data the fits see.
    assert float(vijax.gaussian_kl(post, model.posterior)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_quick_run_writes_its_table(tmp_path, monkeypatch):
    monkeypatch.setattr(slang_scale, "QUICK_CHECKPOINTS", (64, 128))
    monkeypatch.setattr(slang_scale, "LRS", (0.03,))
    monkeypatch.setattr(slang_scale, "BATCHES", (16,))
    slang_scale.main(["--quick", "--out", str(tmp_path), "--dims", "20"])
    table = (tmp_path / "slang_scale_quick.md").read_text()
    assert "| slang B=16 |" in table and "| adam lr=0.03 |" in table
    data = json.loads((tmp_path / "slang_scale_quick.json").read_text())
    runs = data["problems"]["20"]
    assert [len(r["kl"]) for r in runs] == [2, 2]
    assert all(np.isfinite(r["kl"]).all() for r in runs)
