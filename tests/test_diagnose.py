"""vijax.diagnose: k-hat, ESS, log evidence and corrected moments, against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp

import vijax
from references import correlated_blr


def _blr(d, rho, seed=0, n=100):
    model, x, y, mean, prec = correlated_blr(d, rho, seed=seed, n=n)
    cov = np.linalg.inv(prec)
    # The exact log evidence, by NumPy: y ~ N(0, X X^T + I).
    marg = x @ x.T + np.eye(n)
    log_z = -0.5 * (n * np.log(2 * np.pi) + np.linalg.slogdet(marg)[1]
                    + y @ np.linalg.solve(marg, y))
    return model, mean, cov, prec, log_z


def _q(family, mean, cov, latent):
    return family.from_gaussian(vijax.Gaussian.from_cov(jnp.asarray(mean), jnp.asarray(cov)),
                                latent)


def _linear_gaussian(seed=1, d=3, m=6):
    r = np.random.default_rng(seed)
    m0, a = r.standard_normal(d), r.standard_normal((m, d))
    s0 = np.eye(d) + 0.3 * np.ones((d, d))
    noise = 0.5 * np.eye(m)
    y = a @ (m0 + r.standard_normal(d)) + r.standard_normal(m)
    model = vijax.models.linear_gaussian(
        prior_mean=jnp.asarray(m0), prior_cov=jnp.asarray(s0), design=jnp.asarray(a),
        observations=jnp.asarray(y), noise_cov=jnp.asarray(noise))
    prec = np.linalg.inv(s0) + a.T @ np.linalg.solve(noise, a)
    cov = np.linalg.inv(prec)
    mean = cov @ (np.linalg.solve(s0, m0) + a.T @ np.linalg.solve(noise, y))
    marg = a @ s0 @ a.T + noise
    r0 = y - a @ m0
    log_z = -0.5 * (m * np.log(2 * np.pi) + np.linalg.slogdet(marg)[1]
                    + r0 @ np.linalg.solve(marg, r0))
    return model, mean, cov, prec, log_z


@pytest.mark.parametrize("make", [lambda: _blr(4, 0.5), _linear_gaussian],
                         ids=["linear_regression", "linear_gaussian"])
def test_log_evidence_is_within_three_standard_errors_of_the_exact_value(x64, make):
    # q: the posterior with its covariance inflated by 1.3 (light-tailed
    # weights). Over 16 keys the z-scores (estimate - exact) / se must look
    # standard normal: none beyond 4, their mean within 3 standard errors of
    # 0, their spread between 0.5 and 1.6.
    model, mean, cov, _, log_z = make()
    family = vijax.full_rank()
    params = _q(family, mean, 1.3 * cov, model.latent)
    z = []
    for k in range(16):
        d = vijax.diagnose(jax.random.key(k), params, family, model, num_samples=2000)
        assert d.reliable and d.khat < 0.5
        z.append((d.log_evidence - log_z) / d.log_evidence_se)
    z = np.array(z)
    assert np.all(np.abs(z) < 4), z
    assert abs(z.mean()) < 3 / np.sqrt(len(z)), z
    assert 0.5 < z.std(ddof=1) < 1.6, z
    # The exact log evidence vijax knows agrees with the NumPy one.
    np.testing.assert_allclose(float(model.log_evidence), log_z, rtol=1e-10)


def test_a_mean_field_fit_of_a_correlated_posterior_is_flagged_and_full_rank_is_not(x64):
    model, mean, cov, prec, _ = _blr(8, 0.9)
    mf, fr = vijax.mean_field(), vijax.full_rank()
    # The mean-field optimum: the posterior mean, variances 1 / P_ii.
    best = vijax.Gaussian.diagonal(jnp.asarray(mean), jnp.asarray(1 / np.sqrt(np.diag(prec))))
    bad = vijax.diagnose(jax.random.key(0), mf.from_gaussian(best, model.latent), mf, model)
    good = vijax.diagnose(jax.random.key(0), _q(fr, mean, cov, model.latent), fr, model)
    assert not bad.reliable and bad.khat > bad.khat_threshold
    assert bad.verdict.startswith("unreliable")
    assert bad.ess < 0.1 * bad.num_samples
    assert good.reliable and good.khat < 0.5 and good.verdict.startswith("good")
    assert good.ess > 0.99 * good.num_samples  # q is the posterior: equal weights
    np.testing.assert_allclose(good.log_evidence, float(model.log_evidence), atol=1e-10)
    np.testing.assert_allclose(good.elbo, float(model.log_evidence), atol=1e-10)
    assert "k-hat" in str(bad) and "verdict: unreliable" in str(bad)


def test_every_number_matches_an_arviz_reweighting_of_the_same_draws(x64):
    arviz = pytest.importorskip("arviz")
    from vijax.models._zoo import eight_schools_data

    data = eight_schools_data()
    model = vijax.models.eight_schools(y=jnp.asarray(data["y"], jnp.float64),
                                       sigma=jnp.asarray(data["sigma"], jnp.float64))
    assert model.latent["mu"].dtype == jnp.float64
    family = vijax.mean_field()
    params = family.init(model.latent)
    params = jax.tree_util.tree_map(lambda x: x + 0.3, params)
    key, num = jax.random.key(5), 1000
    d = vijax.diagnose(key, params, family, model, num_samples=num)

    z = family.sample(key, params, num)
    lw = np.asarray(jax.vmap(model.log_joint)(z) - jax.vmap(lambda v: family.log_prob(params, v))(z),
                    np.float64)
    w_log, khat = arviz.psislw(lw.copy())
    w = np.exp(w_log)
    np.testing.assert_allclose(d.khat, khat, rtol=1e-6)
    np.testing.assert_allclose(d.ess, 1 / np.sum(w**2), rtol=1e-6)
    # The log evidence: the log mean of arviz's unnormalized smoothed weights.
    unnormalized = arviz.psislw(lw.copy(), normalize=False)[0]  # on the input scale
    np.testing.assert_allclose(d.log_evidence, logsumexp(unnormalized) - np.log(num), rtol=1e-6)
    np.testing.assert_allclose(d.elbo, lw.mean(), rtol=1e-6)
    np.testing.assert_allclose(d.elbo_se, lw.std(ddof=1) / np.sqrt(num), rtol=1e-6)
    theta = model.constrain(z)
    for name in ("mu", "tau", "theta"):
        x = np.asarray(theta[name], np.float64).reshape(num, -1)
        m = w @ x
        np.testing.assert_allclose(np.ravel(d.mean[name]), m, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.ravel(d.sd[name]), np.sqrt(w @ (x - m) ** 2),
                                   rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.ravel(d.q_mean[name]), x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.ravel(d.q_sd[name]), x.std(0, ddof=1), rtol=1e-6)
    assert np.all(np.asarray(d.mean["tau"]) > 0)  # the natural space


def test_a_bare_log_joint_float32_and_a_fit_result_work():
    family = vijax.mean_field()

    def log_joint(z):
        return -0.5 * jnp.sum((z["a"] - 1.0) ** 2) - 0.5 * jnp.sum(z["b"] ** 2)

    latent = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    wide = vijax.Gaussian.diagonal(jnp.full(4, 0.5, jnp.float32), jnp.full(4, 1.2, jnp.float32))
    params = family.from_gaussian(wide, latent)
    d = vijax.diagnose(jax.random.key(0), params, family, log_joint, num_samples=500)
    assert set(d.mean) == {"a", "b"} and np.shape(d.mean["a"]) == (3,)
    assert d.reliable and np.isfinite(d.log_evidence)
    assert np.asarray(d.mean["a"]).dtype == np.float64  # host statistics in float64
    # p is N((1, 1, 1, 0), I) unnormalized: Z = (2 pi)^2.
    assert abs(d.log_evidence - 2 * np.log(2 * np.pi)) < 4 * d.log_evidence_se + 1e-3
    result = vijax.FitResult(params=params, state=None, trace=None)
    again = vijax.diagnose(jax.random.key(0), result, family, log_joint, num_samples=500)
    assert again.khat == d.khat


def test_minus_inf_log_joint_is_a_zero_weight():
    family = vijax.mean_field()

    def log_joint(z):  # a half-normal on z[0] > 0, written as -inf outside
        return jnp.where(z[0] > 0, -0.5 * jnp.sum(z**2), -jnp.inf)

    wide = vijax.Gaussian.diagonal(jnp.zeros(2), jnp.full(2, 1.3))
    d = vijax.diagnose(jax.random.key(1), family.from_gaussian(wide, jnp.zeros(2)), family,
                       log_joint, num_samples=2000)
    assert np.isfinite(d.log_evidence) and d.elbo == -np.inf
    assert np.asarray(d.mean)[0] > 0.6  # only z[0] > 0 weighs: sqrt(2 / pi) = 0.80
    # Z = pi (half of 2 pi) against q = N(0, I): log Z = log(pi).
    assert abs(d.log_evidence - np.log(np.pi)) < 4 * d.log_evidence_se


def test_bad_input_is_refused_before_work():
    family = vijax.mean_field()
    model = vijax.models.eight_schools()
    params = family.init(model.latent)
    with pytest.raises(ValueError, match=r"`num_samples` must be an int >= 21; got 20"):
        vijax.diagnose(jax.random.key(0), params, family, model, num_samples=20)
    with pytest.raises(TypeError, match="`log_joint` must be a vijax.models.Model or a callable"):
        vijax.diagnose(jax.random.key(0), params, family, "model")
    batched = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), params)
    with pytest.raises(ValueError, match="leading member axis"):
        vijax.diagnose(jax.random.key(0), batched, family, model)

    def nan_sometimes(z):
        return jnp.where(z[0] > 0.0, jnp.nan, -0.5 * jnp.sum(z**2))

    with pytest.raises(ValueError, match=r"NaN or \+inf at \d+ of 100 draws"):
        vijax.diagnose(jax.random.key(0), family.init(jnp.zeros(2)), family, nan_sometimes,
                       num_samples=100)
    with pytest.raises(ValueError, match="-inf at all 100 draws"):
        vijax.diagnose(jax.random.key(0), family.init(jnp.zeros(2)), family,
                       lambda z: -jnp.inf * jnp.sum(z**2 + 1), num_samples=100)


def test_the_printout_shows_every_row_up_to_twenty_then_elides():
    family = vijax.mean_field()
    model = vijax.models.eight_schools()  # 18 rows
    text = str(vijax.diagnose(jax.random.key(0), family.init(model.latent), family, model,
                              num_samples=200))
    assert "PSIS mean" in text and "q sd" in text and "theta[7]" in text
    assert "more rows" not in text
    d = vijax.diagnose(jax.random.key(0), family.init(jnp.zeros(30)), family,
                       lambda z: -0.5 * jnp.sum(z**2), num_samples=200)
    text = str(d)
    assert "z[19]" in text and "z[20]" not in text
    assert "(10 more rows; the fields hold them all)" in text


def _advice_of(family, params, model, **kw):
    d = vijax.diagnose(jax.random.key(0), params, family, model, num_samples=1000, **kw)
    assert d.verdict.startswith("unreliable"), d.verdict
    return d.verdict


def test_the_advice_for_a_high_khat_never_names_the_family_in_use_or_a_lesser_one(x64):
    model, mean, cov, prec, _ = _blr(8, 0.9)
    fr = vijax.full_rank()
    # A full-rank q far too narrow: k-hat is high, and only a flow or the
    # model can do better than a full-rank Gaussian.
    text = _advice_of(fr, _q(fr, mean, 0.2 * cov, model.latent), model)
    assert "vijax.flows" in text and "reparametrization" in text and "non-centred" in text
    assert "full_rank" not in text and "low_rank" not in text and "mean_field" not in text
    # Mean-field: the richer Gaussians, with correlations, are the first step.
    mf = vijax.mean_field()
    best = vijax.Gaussian.diagonal(jnp.asarray(mean), jnp.asarray(1 / np.sqrt(np.diag(prec))))
    text = _advice_of(mf, mf.from_gaussian(best, model.latent), model)
    assert "vijax.low_rank" in text and "vijax.full_rank" in text and "mean_field" not in text
    # Low-rank: full rank or a higher rank, never mean-field.
    lr = vijax.low_rank(rank=2)
    text = _advice_of(lr, lr.init(model.latent), model)
    assert "vijax.full_rank" in text and "rank above 2" in text and "mean_field" not in text
    # A flow: more layers or another flow, never the Gaussians nor itself.
    flow = vijax.flows.affine_coupling(num_layers=2)
    text = _advice_of(flow, flow.init(model.latent), model)
    assert "more layers than its 2" in text and "vijax.flows.spline_coupling" in text
    assert "affine_coupling" not in text and "full_rank" not in text


def test_the_advice_reads_whether_the_fit_given_converged(x64):
    model, mean, cov, prec, _ = _blr(8, 0.9)
    mf = vijax.mean_field()
    best = vijax.Gaussian.diagonal(jnp.asarray(mean), jnp.asarray(1 / np.sqrt(np.diag(prec))))
    params = mf.from_gaussian(best, model.latent)
    # Under auto_stop (an adaptive_lr in the optimizer state, as the default
    # fit has) with the steps used up: continue the fit first.
    opt_state = vijax.adaptive_lr(optax.adam(1e-2)).init(params)
    state = vijax.FitState(params, opt_state, jnp.asarray(300, jnp.int32), jax.random.key(0))
    unconverged = vijax.FitResult(params, state, None, stopped_early=False)
    text = _advice_of(mf, unconverged, model)
    assert "result.stopped_early is False): continue it first" in text
    assert "If k-hat stays high, try a richer family (vijax.low_rank" in text
    # Stopped by its rule: a longer fit is no remedy.
    text = _advice_of(mf, unconverged._replace(stopped_early=True), model)
    assert "continue it" not in text and "a longer fit" not in text
    assert "Try a richer family (vijax.low_rank" in text
    # Nothing known of the fit (bare params, or no stopping rule seen): as before.
    for given in (params, unconverged._replace(state=state._replace(opt_state=()))):
        text = _advice_of(mf, given, model)
        assert "a longer fit" in text and "continue it" not in text


@pytest.mark.parametrize("name", ["diagnose", "summary", "to_arviz"])
def test_a_data_model_with_local_latents_is_named_before_the_missing_family(name):
    """Its fit takes family=None; the message was about the family, not the model."""
    from jax.scipy.stats import norm

    model = vijax.models.data_model(
        lambda row, zi: norm.logpdf(zi) + norm.logpdf(row["x"], zi, 1.0),
        {"x": np.zeros(8, np.float32)}, local_latent=jnp.zeros(()))
    params = vijax.JointParams(encoder={"a": jnp.zeros(())})
    with pytest.raises(ValueError, match="DataModel with local latents"):
        getattr(vijax, name)(jax.random.key(0), params, None, model)


def test_diagnosing_one_joint_fit_twice_compiles_once():
    """A data model's learned theta was wrapped in a new partial per call, so the
    diagnostics' compiled program was never found in its cache."""
    from jax.scipy.stats import norm

    rng = np.random.default_rng(0)
    model = vijax.models.data_model(
        lambda w, th, r: norm.logpdf(r["y"], w[0], jnp.exp(th["ln"])),
        {"y": rng.normal(size=20).astype(np.float32)}, latent=jnp.zeros(1),
        theta={"ln": jnp.asarray(0.0)})
    family = vijax.mean_field()
    params = vijax.JointParams(q=family.init(model.latent), theta={"ln": jnp.asarray(-0.1)})
    from vijax.diagnostics import _diagnose

    first = vijax.diagnose(jax.random.key(0), params, family, model)
    programs = dict(_diagnose._programs._items)
    second = vijax.diagnose(jax.random.key(0), params, family, model)
    # The second call found its compiled program: no new entry in the cache.
    assert dict(_diagnose._programs._items).keys() == programs.keys()
    assert second.elbo == first.elbo
