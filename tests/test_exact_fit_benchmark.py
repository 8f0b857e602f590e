"""``benchmarks/exact_fit.py`` compares like with like, and its quick run writes its table.

The hand loop's ELBO (written out with ``jax.numpy``) is the library's
``exact_elbo`` at the same mean-field q, so its time ratio compares the same
math; timing itself is not tested.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import vijax
from benchmarks import exact_fit


@pytest.mark.parametrize("kind", ["blr", "logistic"])
def test_hand_elbo_is_exact_elbo(x64, rng, kind):
    n, d = 40, 6
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + rng.normal(size=n)
    if kind == "logistic":
        y = (y > 0).astype(np.float64)
        model = vijax.models.logistic_regression(x, y)
    else:
        model = vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)
    mean, sd = rng.normal(size=d) * 0.3, rng.uniform(0.2, 3.0, size=d)  # spreads past the switch
    family = vijax.mean_field()
    params = family.from_gaussian(vijax.Gaussian.diagonal(jnp.asarray(mean), jnp.asarray(sd)),
                                  model.latent)
    hand = exact_fit.hand_neg_elbo(kind, jnp.asarray(x), jnp.asarray(y))
    got = -float(hand((jnp.asarray(mean), jnp.asarray(np.log(sd)))))
    want = float(vijax.exact_elbo(params, family, model))
    assert math.isfinite(want)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.slow
def test_a_run_writes_its_table(tmp_path):
    # One problem (the quick run's logistic half) keeps the suite short.
    results = exact_fit.main(["--quick", "--problems", "logistic_d100", "--out", str(tmp_path)])
    rows = [r for p in results["problems"] for r in p["rows"]]
    assert [p["name"] for p in results["problems"]] == ["logistic_d100"]
    assert {r["group"] for r in rows} == {"mean_field", "full_rank"}
    assert all(r["converged"] and r["family_gap"] < 0.01 for r in rows)
    assert all("hand_warm_s" in r for r in rows if r["group"] == "mean_field")
    text = (tmp_path / "exact_fit_quick.md").read_text()
    assert "| logistic_d100 | mean_field |" in text and "| logistic_d100 | full_rank |" in text
