"""vijax.summary and vijax.to_arviz: q's draws on the natural space, one chain per member."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import vijax
from vijax.bijectors._protocol import Bijector

EXP = Bijector(forward=jnp.exp, inverse=jnp.log, forward_log_det_jacobian=jnp.sum, name="exp")


def _model():
    # A scale (through exp) and a 2-vector; the density does not matter here.
    def log_density(v):
        return -v["tau"] - 0.5 * jnp.sum(jnp.square(v["w"]))
    return vijax.models.constrained(
        log_density, {"tau": EXP, "w": None}, {"tau": 1.0, "w": jnp.zeros(2)},
        deterministic=lambda v: {"w_scaled": v["tau"] * v["w"]},
    )


def _params(family, model, loc, scale):
    # A mean-field q with known per-element mean and sd (flat order: tau, w[0], w[1]).
    flat = vijax.Gaussian(jnp.asarray(loc), vijax.DiagonalScale(jnp.asarray(scale)))
    return family.from_gaussian(flat, model.latent)


def test_summary_matches_the_lognormal_and_normal_marginals():
    model, family = _model(), vijax.mean_field()
    loc, scale = np.array([0.3, -1.0, 2.0]), np.array([0.5, 0.2, 1.5])
    params = _params(family, model, loc, scale)
    n = 4000
    s = vijax.summary(jax.random.key(1), params, family, model, num_samples=n)
    assert s.names == ("tau", "w[0]", "w[1]", "w_scaled[0]", "w_scaled[1]")
    assert (s.num_draws, s.num_chains) == (n, 1)
    # tau = exp(z), z ~ N(0.3, 0.5^2): a lognormal, computed independently.
    tau = scipy.stats.lognorm(s=scale[0], scale=np.exp(loc[0]))
    exact = {
        "tau": (tau.mean(), tau.std(), tau.ppf([0.05, 0.5, 0.95])),
        "w[0]": (loc[1], scale[1], scipy.stats.norm(loc[1], scale[1]).ppf([0.05, 0.5, 0.95])),
        "w[1]": (loc[2], scale[2], scipy.stats.norm(loc[2], scale[2]).ppf([0.05, 0.5, 0.95])),
    }
    for name, (mean, sd, qs) in exact.items():
        row = s.row(name)
        # Monte Carlo: the mean within 4 of its own standard errors (computed
        # by summary as sd / sqrt(n), checked against the exact sd here).
        assert row["mc_se"] == pytest.approx(sd / np.sqrt(n), rel=0.1)
        assert abs(row["mean"] - mean) < 4 * sd / np.sqrt(n)
        assert row["sd"] == pytest.approx(sd, rel=4 * np.sqrt(0.5 / n) * 2)
        for p, got, want in zip((0.05, 0.5, 0.95), (row["q5"], row["q50"], row["q95"]), qs):
            # The se of a sample p-quantile: sqrt(p (1 - p) / n) / density(quantile).
            dens = tau.pdf(want) if name == "tau" else scipy.stats.norm(mean, sd).pdf(want)
            assert abs(got - want) < 4 * np.sqrt(p * (1 - p) / n) / dens
    # The deterministic quantity is computed per draw, not from the means.
    assert s.row("w_scaled[1]")["mean"] == pytest.approx(tau.mean() * loc[2], rel=0.1)


def test_summary_prints_a_table_and_reads_a_fit_result():
    model, family = _model(), vijax.mean_field()
    params = family.init(model.latent)
    text = str(vijax.summary(jax.random.key(0), params, family, model, num_samples=50))
    lines = text.splitlines()
    assert lines[0].split() == ["mean", "sd", "mc_se", "5%", "50%", "95%"]
    assert lines[1].startswith("tau") and "50 draws from q" in lines[-1]
    with pytest.raises(KeyError, match="no row 'sigma'"):
        vijax.summary(jax.random.key(0), params, family, model, num_samples=50).row("sigma")


def test_batched_params_give_one_chain_per_member():
    model, family = _model(), vijax.mean_field()
    p0 = _params(family, model, np.zeros(3), np.full(3, 0.1))
    p1 = _params(family, model, np.full(3, 5.0), np.full(3, 0.1))
    batched = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), p0, p1)
    s = vijax.summary(jax.random.key(0), batched, family, model, num_samples=500)
    assert (s.num_chains, s.num_draws) == (2, 1000)
    # Pooled over the two members: the mean of w[0] is halfway, 2.5.
    assert s.row("w[0]")["mean"] == pytest.approx(2.5, abs=0.05)
    idata = vijax.to_arviz(jax.random.key(0), batched, family, model, num_samples=300)
    post = idata.posterior
    assert dict(post.sizes)["chain"] == 2 and dict(post.sizes)["draw"] == 300
    assert set(post.data_vars) == {"tau", "w", "w_scaled"}
    w = np.asarray(post["w"])
    assert w.shape == (2, 300, 2)
    np.testing.assert_allclose(w.mean(axis=1), [[0, 0], [5, 5]], atol=0.05)
    # Independent fits that disagree: arviz's R-hat across members says so.
    import arviz
    assert float(arviz.rhat(idata)["w"].max()) > 1.5


def test_to_arviz_of_an_unbatched_fit_is_one_chain():
    model, family = _model(), vijax.full_rank()
    params = family.init(model.latent)
    idata = vijax.to_arviz(jax.random.key(2), params, family, model, num_samples=100)
    assert np.asarray(idata.posterior["tau"]).shape == (1, 100)
    assert np.all(np.asarray(idata.posterior["tau"]) > 0)


def test_summary_errors():
    model, family = _model(), vijax.mean_field()
    params = family.init(model.latent)
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 2"):
        vijax.summary(jax.random.key(0), params, family, model, num_samples=1)
    with pytest.raises(TypeError, match="`model` must be a vijax.models.Model"):
        vijax.summary(jax.random.key(0), params, family, model.log_joint)
    with pytest.raises(ValueError, match="do not match the 'mean_field' family"):
        vijax.summary(jax.random.key(0), vijax.full_rank().init(model.latent), family, model)
    wrong = jax.tree_util.tree_map(lambda x: jnp.zeros((2, 2) + x.shape), params)
    with pytest.raises(ValueError, match="one\nleading member axis|one leading member axis"):
        vijax.summary(jax.random.key(0), wrong, family, model)


def test_to_arviz_without_arviz_names_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "arviz", None)
    model, family = _model(), vijax.mean_field()
    with pytest.raises(ImportError, match=r'vijax\[arviz\]'):
        vijax.to_arviz(jax.random.key(0), family.init(model.latent), family, model)
