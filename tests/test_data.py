"""Data models: minibatch SVI, theta learned with q, amortized local latents, sharded data.

References are computed here independently: the exact full-data ELBO of a
Gaussian q in closed form (NumPy-style formulas written out below), the exact
type-II maximum likelihood with SciPy, the exact pPCA evidence with SciPy.
Monte Carlo claims are tested against standard errors computed in the test.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.stats import norm
from scipy import optimize, stats

import vijax
from vijax.data._batching import batch_indices, permute

ESTIMATORS = ("reparam", "closed_entropy", "stl", "adaptive_stl", "score")


# ------------------------------------------------------------------ problems
def blr_data(rng, n=60, d=3):
    x = rng.normal(size=(n, d))
    y = x @ (0.7 * rng.normal(size=d)) + 0.6 * rng.normal(size=n)
    return x, y


def blr_theta_model(x, y):
    """BLR with learned log noise and log prior scales (theta)."""
    return vijax.models.data_model(
        lambda w, th, r: norm.logpdf(r["y"], r["x"] @ w, jnp.exp(th["log_noise"])),
        {"x": x, "y": y},
        latent=jnp.zeros(x.shape[1]),
        log_prior=lambda w, th: norm.logpdf(w, 0.0, jnp.exp(th["log_prior"])).sum(),
        theta={"log_noise": jnp.asarray(-0.3), "log_prior": jnp.asarray(0.2)},
        name="blr_theta",
    )


def exact_blr_elbo(params, x, y):
    """The full-data ELBO of mean-field q = N(m, diag(s^2)) under blr_theta_model, in closed form."""
    m, s = params.q.loc, jax.nn.softplus(params.q.raw_scale)
    sn, sp = jnp.exp(params.theta["log_noise"]), jnp.exp(params.theta["log_prior"])
    n, d = x.shape
    resid = y - x @ m
    lik = (-0.5 * n * jnp.log(2 * jnp.pi * sn**2)
           - 0.5 * (jnp.sum(resid**2) + jnp.sum((x**2) @ (s**2))) / sn**2)
    prior = -0.5 * d * jnp.log(2 * jnp.pi * sp**2) - 0.5 * jnp.sum(m**2 + s**2) / sp**2
    entropy = jnp.sum(0.5 * jnp.log(2 * jnp.pi * jnp.e * s**2))
    return lik + prior + entropy


def ppca_problem(rng, n=40, dim=4, k=2):
    w = rng.normal(size=(dim, k))
    mu = rng.normal(size=dim)
    s = 0.5
    x = rng.normal(size=(n, k)) @ w.T + mu + s * rng.normal(size=(n, dim))
    return x, w, mu, s


def ppca_model(x, k, s, w0, mu0):
    """pPCA with theta = (W, mu) learned and local latents z_i ~ N(0, I)."""
    return vijax.models.data_model(
        lambda th, xi, zi: norm.logpdf(zi).sum() + norm.logpdf(xi, th["w"] @ zi + th["mu"], s).sum(),
        x, theta={"w": jnp.asarray(w0), "mu": jnp.asarray(mu0)}, local_latent=jnp.zeros(k),
    )


def linear_encoder(phi, xi):
    return vijax.MeanFieldParams(loc=phi["a"] @ xi + phi["b"], raw_scale=phi["raw"])


def exact_ppca_elbo(params, x, s):
    """Full-data ELBO of the amortized mean-field q under ppca_model, in closed form."""
    th, phi = params.theta, params.encoder
    m = x @ phi["a"].T + phi["b"][None, :]  # (n, k)
    v = jax.nn.softplus(phi["raw"]) ** 2  # (k,)
    n, dim = x.shape
    k = m.shape[1]
    prior = -0.5 * n * k * jnp.log(2 * jnp.pi) - 0.5 * (jnp.sum(m**2) + n * jnp.sum(v))
    resid = x - m @ th["w"].T - th["mu"][None, :]
    lik = (-0.5 * n * dim * jnp.log(2 * jnp.pi * s**2)
           - 0.5 * (jnp.sum(resid**2) + n * jnp.sum(v * jnp.sum(th["w"] ** 2, axis=0))) / s**2)
    entropy = n * jnp.sum(0.5 * jnp.log(2 * jnp.pi * jnp.e * v))
    return prior + lik + entropy


# ------------------------------------------------------------------ batching
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 1025])
def test_permute_is_a_bijection_of_range_n(n):
    out = np.asarray(permute(jax.random.key(3), jnp.arange(n), n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:  # and not the identity or a shift
        assert np.mean(out == np.arange(n)) < 0.2


def test_epoch_batches_do_not_repeat_within_an_epoch_and_change_between_epochs():
    n, b = 103, 10
    key = jax.random.key(0)
    per_epoch = n // b
    first = np.concatenate([np.asarray(batch_indices(key, t, n, b, "epoch"))
                            for t in range(per_epoch)])
    assert len(set(first.tolist())) == per_epoch * b
    second = np.concatenate([np.asarray(batch_indices(key, t, n, b, "epoch"))
                             for t in range(per_epoch, 2 * per_epoch)])
    assert len(set(second.tolist())) == per_epoch * b
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("batching", ["epoch", "with_replacement"])
def test_every_row_is_drawn_with_probability_b_over_n(batching):
    n, b, steps = 50, 8, 3000
    idx = jax.vmap(lambda t: batch_indices(jax.random.key(1), t, n, b, batching))(
        jnp.arange(steps))
    counts = np.bincount(np.asarray(idx).ravel(), minlength=n)
    p = b / n
    expected = steps * p
    # Binomial standard deviation (an upper bound for the epoch scheme, whose
    # counts are more even).
    se = np.sqrt(steps * p * (1 - p))
    assert np.all(np.abs(counts - expected) < 5 * se), counts


# ------------------------------------------------------------------ unbiasedness
# Every estimator with the epoch scheme, and one with sampling with
# replacement: which rows a batch holds does not depend on the estimator
# (the n / B scaling is applied before it), and each scheme's row
# probabilities are tested above.
@pytest.mark.parametrize("estimator, batching",
                         [(e, "epoch") for e in ESTIMATORS] + [("stl", "with_replacement")])
def test_minibatch_gradient_is_unbiased_for_the_full_data_gradient(x64, rng, estimator, batching):
    """The mean over many keys of minibatch gradients (q and theta) lies within 4 standard
    errors of the exact full-data ELBO gradient; so does the ELBO value itself."""
    x, y = blr_data(rng)
    model = blr_theta_model(x, y)
    family = vijax.mean_field()
    params = vijax.JointParams(
        q=vijax.MeanFieldParams(loc=jnp.asarray([0.3, -0.2, 0.5]),
                                raw_scale=jnp.asarray([-1.0, -0.5, -1.5])),
        theta=model.theta,
    )
    exact_value, exact_grad = jax.value_and_grad(exact_blr_elbo)(params, x, y)

    def one(key, step):
        return jax.value_and_grad(vijax.data.data_elbo, argnums=1)(
            key, params, family, model, num_samples=2, estimator=estimator,
            batch_size=7, batching=batching, step=step)

    num = 4000
    keys = jax.random.split(jax.random.key(11), num)
    values, grads = jax.jit(jax.vmap(one))(keys, jnp.arange(num) % 5)
    for what, samples, exact in [("value", values, exact_value)] + [
        (str(path), leaf, ref)
        for (path, leaf), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                     jax.tree_util.tree_leaves(exact_grad))
    ]:
        if what == "value" and estimator == "closed_entropy":
            pass  # same expectation: checked like the others
        samples = np.asarray(samples).reshape(num, -1)
        mean, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(num)
        z = np.abs(mean - np.ravel(exact)) / se
        assert np.all(z < 4.0), (what, mean, np.ravel(exact), se)


def test_amortized_minibatch_gradient_is_unbiased(x64, rng):
    """pPCA with local latents: encoder and theta gradients on minibatches, against the closed form."""
    x, w, mu, s = ppca_problem(rng)
    model = ppca_model(x, 2, s, w + 0.3, mu - 0.2)
    local = vijax.families.amortized(linear_encoder, vijax.mean_field())
    params = vijax.JointParams(theta=model.theta, encoder={
        "a": jnp.asarray(0.1 * rng.normal(size=(2, 4))), "b": jnp.asarray([0.1, -0.1]),
        "raw": jnp.asarray([-0.5, -1.0])})
    exact_grad = jax.grad(exact_ppca_elbo)(params, x, s)

    def one(key):
        return jax.grad(vijax.data.data_elbo, argnums=1)(
            key, params, None, model, num_samples=1, batch_size=5, local_family=local,
            estimator="stl")

    num = 3000
    grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(2), num))
    for leaf, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(exact_grad)):
        leaf = np.asarray(leaf).reshape(num, -1)
        mean, se = leaf.mean(0), leaf.std(0, ddof=1) / np.sqrt(num)
        assert np.all(np.abs(mean - np.ravel(ref)) < 4 * se + 1e-9)


def hierarchical_model(x, with_global):
    """x_i ~ N(z_i, exp(log_noise)^2), z_i ~ N(mu, 1) (global mu ~ N(0, 1)) or N(0, 1) (no mu)."""
    def lik(row, zi, mu, th):
        return norm.logpdf(zi, mu, 1.0) + norm.logpdf(row["x"], zi, jnp.exp(th["log_noise"]))

    theta = {"log_noise": jnp.asarray(0.1)}
    if not with_global:
        return vijax.models.data_model(lambda th, row, zi: lik(row, zi, 0.0, th), {"x": x},
                                       theta=theta, local_latent=jnp.zeros(()))
    return vijax.models.data_model(lambda mu, th, row, zi: lik(row, zi, mu, th), {"x": x},
                                   latent=jnp.zeros(()), log_prior=lambda mu, th: norm.logpdf(mu),
                                   theta=theta, local_latent=jnp.zeros(()))


def scalar_encoder(phi, row):
    return vijax.MeanFieldParams(loc=phi["a"] * row["x"] + phi["b"], raw_scale=phi["raw"])


def exact_hierarchical_elbo(params, x):
    """The full-data ELBO of q(mu) = N(m, s^2), q(z_i | x_i) = N(a x_i + b, v) under
    hierarchical_model, in closed form (no global latent: m = s = 0 and no mu terms)."""
    phi, sn = params.encoder, jnp.exp(params.theta["log_noise"])
    loc, v = phi["a"] * x + phi["b"], jax.nn.softplus(phi["raw"][0]) ** 2
    m = s2 = 0.0
    out = 0.0
    if params.q is not None:
        m, s2 = params.q.loc, jax.nn.softplus(params.q.raw_scale[0]) ** 2
        out = (-0.5 * jnp.log(2 * jnp.pi) - 0.5 * (m**2 + s2)
               + 0.5 * jnp.log(2 * jnp.pi * jnp.e * s2))
    local_prior = -0.5 * jnp.log(2 * jnp.pi) - 0.5 * ((loc - m) ** 2 + v + s2)
    lik = -0.5 * jnp.log(2 * jnp.pi * sn**2) - 0.5 * ((x - loc) ** 2 + v) / sn**2
    return out + jnp.sum(local_prior + lik + 0.5 * jnp.log(2 * jnp.pi * jnp.e * v))


@pytest.mark.parametrize("estimator, with_global",
                         [("score", True), ("score", False)]
                         + [(e, True) for e in ESTIMATORS if e != "score"])
def test_minibatch_gradient_with_local_latents_is_unbiased_for_every_estimator(
        x64, rng, estimator, with_global):
    """Local (and global) latents on minibatches of B = n / 4: the mean over many keys of the
    ELBO estimate and of its gradient in q, theta and the encoder lies within 4 standard
    errors of the closed-form full-data ELBO and its gradient. The score estimator must use
    the density of its draws, not the n / B-scaled one (that is ~4x the encoder gradient)."""
    x = jnp.asarray(np.sqrt(2.0) * rng.normal(size=40))
    model = hierarchical_model(x, with_global)
    local = vijax.families.amortized(scalar_encoder, vijax.mean_field())
    family = vijax.mean_field() if with_global else None
    params = vijax.JointParams(
        q=vijax.MeanFieldParams(loc=jnp.asarray(0.4), raw_scale=jnp.asarray([-0.5]))
        if with_global else None,
        theta=model.theta,
        encoder={"a": jnp.asarray(0.2), "b": jnp.asarray(0.3), "raw": jnp.asarray([0.1])})
    exact_value, exact_grad = jax.value_and_grad(exact_hierarchical_elbo)(params, x)

    def one(key, step):
        return jax.value_and_grad(vijax.data.data_elbo, argnums=1)(
            key, params, family, model, num_samples=2, estimator=estimator, batch_size=10,
            local_family=local, step=step)

    num = 4000
    values, grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(5), num),
                                           jnp.arange(num))
    for what, samples, exact in [("value", values, exact_value)] + [
        (jax.tree_util.keystr(path), leaf, ref)
        for (path, leaf), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                     jax.tree_util.tree_leaves(exact_grad))
    ]:
        samples = np.asarray(samples).reshape(num, -1)
        mean, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(num)
        z = np.abs(mean - np.ravel(exact)) / se
        assert np.all(z < 4.0), (what, mean, np.ravel(exact), se)


# ------------------------------------------------------------------ fits
def test_empirical_bayes_reaches_the_exact_type_ii_maximum_likelihood(x64, rng):
    """(q, theta) learned jointly on minibatches: the scales converge to the maximizer of the
    exact log evidence, found here with SciPy."""
    n, d = 200, 3
    x = rng.normal(size=(n, d))
    y = x @ (0.7 * rng.normal(size=d)) + 0.6 * rng.normal(size=n)

    def neg_log_evidence(t):
        sn, sp = np.exp(t)
        cov = sp**2 * x @ x.T + sn**2 * np.eye(n)
        return -stats.multivariate_normal(np.zeros(n), cov).logpdf(y)

    best = optimize.minimize(neg_log_evidence, np.zeros(2), method="Nelder-Mead",
                             options=dict(xatol=1e-9, fatol=1e-12, maxiter=4000))
    want = np.exp(best.x)
    model = blr_theta_model(x, y)
    family = vijax.full_rank()
    steps = 4000
    result = vijax.fit(
        jax.random.key(0), family, model,
        vijax.JointParams(q=family.init(model.latent), theta=model.theta),
        optimizer=optax.adam(optax.cosine_decay_schedule(3e-2, steps)),
        num_steps=steps, batch_size=50, num_samples=8, progress=False)
    got = np.exp([result.params.theta["log_noise"], result.params.theta["log_prior"]])
    np.testing.assert_allclose(got, want, rtol=0.01)
    # q is then the exact posterior under those scales.
    sn, sp = got
    prec = x.T @ x / sn**2 + np.eye(d) / sp**2
    mean = np.linalg.solve(prec, x.T @ y / sn**2)
    np.testing.assert_allclose(result.params.q.loc, mean, atol=0.02)


def test_amortized_linear_encoder_reaches_the_exact_ppca_evidence(x64, rng):
    """Decoder fixed at the truth (theta frozen), linear encoder to a full-rank local q:
    the amortized family holds the exact posterior, so the ELBO reaches log p(x)."""
    x, w, mu, s = ppca_problem(rng, n=60)
    k = 2
    model = ppca_model(x, k, s, w, mu)
    family = vijax.full_rank()
    p0 = family.init(jnp.zeros(k))

    def encoder(phi, xi):
        return vijax.FullRankParams(phi["a"] @ xi + phi["b"], phi["raw"], phi["off"])

    local = vijax.families.amortized(encoder, family)
    phi = {"a": jnp.zeros((k, 4)), "b": jnp.zeros(k), "raw": p0.raw_scale, "off": p0.off_diag}
    steps = 3000
    result = vijax.fit(
        jax.random.key(0), None, model, vijax.JointParams(theta=model.theta, encoder=phi),
        local_family=local,
        optimizer={"theta": optax.set_to_zero(),
                   "encoder": optax.adam(optax.cosine_decay_schedule(2e-2, steps))},
        num_steps=steps, batch_size=20, num_samples=4, progress=False)
    np.testing.assert_array_equal(result.params.theta["w"], w)  # frozen exactly
    log_evidence = stats.multivariate_normal(mu, w @ w.T + s**2 * np.eye(4)).logpdf(x).sum()
    values = np.array([float(vijax.data.data_elbo(
        jax.random.key(i), result.params, None, model, num_samples=32, local_family=local))
        for i in range(8)])
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert values.mean() <= log_evidence + 4 * se + 1e-6
    assert log_evidence - values.mean() < 1e-3 * abs(log_evidence)


def test_vae_shaped_model_learns_theta_and_encoder_in_float32(rng):
    """float32, no global latent, theta and encoder learned: the full-data ELBO rises and
    ends near the exact evidence of the learned pPCA model (a lower bound on it)."""
    x, w, mu, s = ppca_problem(rng, n=80)
    x = x.astype(np.float32)
    model = ppca_model(x, 2, s, 0.5 * rng.normal(size=(4, 2)).astype(np.float32),
                       np.zeros(4, np.float32))
    local = vijax.families.amortized(linear_encoder, vijax.mean_field())
    phi = {"a": jnp.zeros((2, 4)), "b": jnp.zeros(2), "raw": jnp.full((2,), -1.0)}
    result = vijax.fit(
        jax.random.key(1), None, model, vijax.JointParams(theta=model.theta, encoder=phi),
        local_family=local, optimizer=optax.adam(1e-2), num_steps=2000, batch_size=16,
        num_samples=1, progress=False)
    assert result.params.theta["w"].dtype == jnp.float32
    assert result.trace.elbo.dtype == np.float32
    start, end = result.trace.elbo[:50].mean(), result.trace.elbo[-200:].mean()
    assert end > start + 50
    th = result.params.theta
    cov = np.asarray(th["w"] @ th["w"].T, np.float64) + s**2 * np.eye(4)
    evidence = stats.multivariate_normal(np.asarray(th["mu"], np.float64), cov).logpdf(x).sum()
    values = [float(vijax.data.data_elbo(jax.random.key(i), result.params, None, model,
                                         num_samples=16, local_family=local)) for i in range(4)]
    assert np.mean(values) <= evidence + 1.0
    assert evidence - np.mean(values) < 0.05 * abs(evidence)


def test_data_fit_resumes_bitwise_and_full_batch_is_deterministic(rng):
    x, y = blr_data(rng)
    model = blr_theta_model(x.astype(np.float32), y.astype(np.float32))
    family = vijax.mean_field()
    init = vijax.JointParams(q=family.init(model.latent), theta=model.theta)
    opt = optax.adam(1e-2)
    kw = dict(optimizer=opt, batch_size=9, num_samples=2, progress=False, chunk_size=30)
    whole = vijax.fit(jax.random.key(4), family, model, init, num_steps=100, **kw)
    part = vijax.fit(jax.random.key(4), family, model, init, num_steps=45, **kw)
    rest = vijax.fit(None, family, model, part.state, num_steps=55, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(rest.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.trace.elbo[45:], rest.trace.elbo)


def test_fit_batched_on_a_data_model_matches_separate_fits(rng):
    x, y = blr_data(rng)
    model = blr_theta_model(x.astype(np.float32), y.astype(np.float32))
    family = vijax.mean_field()
    init = vijax.JointParams(q=family.init(model.latent), theta=model.theta)
    keys = jax.random.split(jax.random.key(5), 3)
    kw = dict(optimizer=optax.adam(1e-2), num_steps=60, batch_size=8, num_samples=2,
              progress=False)
    batch = vijax.fit_batched(keys, family, model, init, **kw)
    assert batch.trace.elbo.shape == (3, 60)
    for b in range(3):
        one = vijax.fit(keys[b], family, model, init, **kw)
        for a, c in zip(jax.tree_util.tree_leaves(one.params),
                        jax.tree_util.tree_leaves(batch.params)):
            np.testing.assert_allclose(a, c[b], rtol=1e-4, atol=1e-5)
    more = vijax.fit_batched(None, family, model, batch.state, **{**kw, "num_steps": 5})
    assert more.trace.elbo.shape == (3, 5)


@pytest.mark.parametrize("family_name", ["mean_field", "full_rank", "low_rank", "affine_flow"])
def test_every_family_fits_a_minibatch_data_model(rng, family_name):
    """Each family through the minibatch path: the posterior mean is found (float32)."""
    family = {
        "mean_field": vijax.mean_field, "full_rank": vijax.full_rank,
        "low_rank": lambda: vijax.low_rank(rank=1),
        "affine_flow": lambda: vijax.flows.affine_coupling(num_layers=2, hidden_width=8),
    }[family_name]()
    x, y = blr_data(rng, n=200)
    x, y = x.astype(np.float32), y.astype(np.float32)
    model = vijax.models.data_model(
        lambda w, r: norm.logpdf(r["y"], r["x"] @ w, 0.6), {"x": x, "y": y},
        latent=jnp.zeros(3, jnp.float32), log_prior=lambda w: norm.logpdf(w).sum())
    steps = 1500
    result = vijax.fit(jax.random.key(0), family, model, family.init(model.latent),
                       optimizer=optax.adam(optax.cosine_decay_schedule(2e-2, steps)),
                       num_steps=steps, batch_size=20, num_samples=4, progress=False)
    assert result.num_skipped == 0
    draws = family.sample(jax.random.key(1), result.params, 4000)
    reference = vijax.models.bayesian_linear_regression(
        x, y, noise_scale=0.6, prior_scale=1.0).posterior
    np.testing.assert_allclose(draws.mean(0), reference.mean, atol=0.03)


def test_plain_family_params_and_minibatch_fit_find_the_posterior(x64, rng):
    """No theta, no local latents: init_params are the family's own; minibatch ADVI with a
    decaying step lands on the exact conjugate posterior."""
    x, y = blr_data(rng, n=300)
    model = vijax.models.data_model(
        lambda w, r: norm.logpdf(r["y"], r["x"] @ w, 0.6), {"x": x, "y": y},
        latent=jnp.zeros(3), log_prior=lambda w: norm.logpdf(w).sum())
    family = vijax.full_rank()
    steps = 3000
    result = vijax.fit(jax.random.key(0), family, model, family.init(model.latent),
                       optimizer=optax.adam(optax.cosine_decay_schedule(2e-2, steps)),
                       num_steps=steps, batch_size=30, num_samples=4, progress=False)
    assert isinstance(result.params, vijax.FullRankParams)
    reference = vijax.models.bayesian_linear_regression(
        x, y, noise_scale=0.6, prior_scale=1.0).posterior
    np.testing.assert_allclose(result.params.loc, reference.mean, atol=0.01)


# ------------------------------------------------------------------ bad input
def _blr(rng):
    x, y = blr_data(rng)
    return x, y, blr_theta_model(x, y)


def test_data_leaves_with_different_leading_sizes_name_both(rng):
    x, y = blr_data(rng)
    with pytest.raises(ValueError, match=r"`data\['x'\]` has 60 rows, `data\['y'\]` has 59"):
        vijax.models.data_model(lambda w, r: 0.0 * w.sum(), {"x": x, "y": y[:-1]},
                                latent=jnp.zeros(3))
    with pytest.raises(ValueError, match="leading axis"):
        vijax.models.data_model(lambda w, r: 0.0 * w.sum(), {"x": x, "c": np.float32(1.0)},
                                latent=jnp.zeros(3))


def test_non_float_theta_is_named(rng):
    x, y = blr_data(rng)
    with pytest.raises(TypeError, match=r"`theta\['k'\]` must be a floating-point"):
        vijax.models.data_model(lambda w, th, r: 0.0 * w.sum(), {"x": x},
                                latent=jnp.zeros(3), theta={"k": jnp.arange(3)})


def test_model_construction_errors(rng):
    x, y = blr_data(rng)
    with pytest.raises(ValueError, match="needs a latent"):
        vijax.models.data_model(lambda r: 0.0, x)
    with pytest.raises(ValueError, match="`latent` is None"):
        vijax.models.data_model(lambda r, z: 0.0, x, local_latent=jnp.zeros(2),
                                log_prior=lambda z: 0.0)
    with pytest.raises(TypeError, match=r"called as log_lik\(z, x_i\)"):
        vijax.models.data_model(lambda w, th, r: 0.0, x, latent=jnp.zeros(3))
    with pytest.raises(ValueError, match="scalar for one datum"):
        vijax.models.data_model(lambda w, r: r, x, latent=jnp.zeros(3))
    with pytest.raises(TypeError, match="`log_lik` must be callable"):
        vijax.models.data_model(None, x, latent=jnp.zeros(3))


@pytest.mark.parametrize("bad, err, match", [
    (0, ValueError, "between 1 and the number of data n = 60; got 0"),
    (61, ValueError, "between 1 and the number of data n = 60; got 61"),
    (2.5, TypeError, "`batch_size` must be None or an int"),
])
def test_bad_batch_size(rng, bad, err, match):
    x, y, model = _blr(rng)
    family = vijax.mean_field()
    init = vijax.JointParams(q=family.init(model.latent), theta=model.theta)
    with pytest.raises(err, match=match):
        vijax.fit(jax.random.key(0), family, model, init, optimizer=optax.adam(1e-2),
                  num_steps=1, batch_size=bad, progress=False)


def test_fit_argument_errors(rng):
    x, y, model = _blr(rng)
    family = vijax.mean_field()
    init = vijax.JointParams(q=family.init(model.latent), theta=model.theta)
    kw = dict(optimizer=optax.adam(1e-2), num_steps=1, progress=False)
    with pytest.raises(TypeError, match="must be vijax.data.JointParams"):
        vijax.fit(jax.random.key(0), family, model, family.init(model.latent), **kw)
    with pytest.raises(ValueError, match=r"`init_params.theta` must be set"):
        vijax.fit(jax.random.key(0), family, model, init._replace(theta=None), **kw)
    with pytest.raises(ValueError, match="`batching` must be one of"):
        vijax.fit(jax.random.key(0), family, model, init, batching="shuffle", **kw)
    with pytest.raises(ValueError, match="`local_family` is for local latents"):
        vijax.fit(jax.random.key(0), family, model, init,
                  local_family=vijax.families.amortized(linear_encoder, family), **kw)
    with pytest.raises(ValueError, match="auto_stop"):
        vijax.fit(jax.random.key(0), family, model, init, auto_stop=True, **kw)
    with pytest.raises(ValueError, match="`batch_size` is for data models"):
        vijax.fit(jax.random.key(0), family, lambda z: -jnp.sum(z**2), family.init(jnp.zeros(2)),
                  batch_size=4, **kw)
    with pytest.raises(ValueError, match="leading batch axis of size 2"):
        vijax.fit_batched(jax.random.split(jax.random.key(0), 2), family, model,
                          jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), init),
                          params_batched=True, **kw)
    with pytest.raises(ValueError, match=r"one entry per group.*\['q', 'theta'\]"):
        vijax.fit(jax.random.key(0), family, model, init,
                  **{**kw, "optimizer": {"q": optax.adam(1e-2)}})
    with pytest.raises(ValueError, match=r"`init_params.theta` must match `model.theta`"):
        vijax.fit(jax.random.key(0), family, model,
                  init._replace(theta={"log_noise": jnp.zeros(2), "log_prior": jnp.zeros(())}),
                  **kw)


def test_vae_setup_errors(rng):
    x, w, mu, s = ppca_problem(rng)
    model = ppca_model(x, 2, s, w, mu)
    local = vijax.families.amortized(linear_encoder, vijax.mean_field())
    phi = {"a": jnp.zeros((2, 4)), "b": jnp.zeros(2), "raw": jnp.zeros(2)}
    kw = dict(optimizer=optax.adam(1e-2), num_steps=1, progress=False)
    init = vijax.JointParams(theta=model.theta, encoder=phi)
    with pytest.raises(ValueError, match="`family` must be None"):
        vijax.fit(jax.random.key(0), vijax.mean_field(), model, init, local_family=local, **kw)
    with pytest.raises(ValueError, match="`local_family` must be an"):
        vijax.fit(jax.random.key(0), None, model, init, **kw)
    with pytest.raises(ValueError, match="encoder.*must return the local family's parameters"):
        vijax.fit(jax.random.key(0), None, model,
                  init._replace(encoder={**phi, "raw": jnp.zeros(3)}), local_family=local, **kw)
    with pytest.raises(TypeError, match="`encoder` must be callable"):
        vijax.families.amortized(None, vijax.mean_field())


# ------------------------------------------------------------------ sharding
SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax, vijax
    from jax.scipy.stats import norm
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    n, d = 4096, 5
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)).astype(np.float32)

    def build(data):
        return vijax.models.data_model(
            lambda w, th, r: norm.logpdf(r["y"], r["x"] @ w, jnp.exp(th)), data,
            latent=jnp.zeros(d, jnp.float32), log_prior=lambda w, th: norm.logpdf(w).sum(),
            theta=jnp.zeros((), jnp.float32))

    mesh = jax.make_mesh((8,), ("data",))
    family = vijax.mean_field()
    results = {}
    for batch_size in (None, 512):
        out = []
        explicit = jax.device_put(  # jax.make_mesh's Explicit axes, placed by hand
            {"x": x, "y": y}, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        for data in ({"x": x, "y": y}, vijax.data.shard({"x": x, "y": y}, mesh, "data"), explicit):
            model = build(data)
            res = vijax.fit(jax.random.key(0), family, model,
                            vijax.JointParams(q=family.init(model.latent), theta=model.theta),
                            optimizer=optax.adam(1e-2), num_steps=200, batch_size=batch_size,
                            num_samples=4, progress=False, chunk_size=64)
            out.append(res)
        one = out[0]
        assert len(one.params.q.loc.sharding.device_set) == 1
        for eight in out[1:]:
            assert len(eight.params.q.loc.sharding.device_set) == 8  # replicated on the mesh
            for a, b in zip(jax.tree_util.tree_leaves(one.params),
                            jax.tree_util.tree_leaves(eight.params)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        assert not np.array_equal(one.trace.elbo[:1], np.full(1, np.nan))
    try:
        vijax.data.shard({"x": x[:4095]}, mesh, "data")
    except ValueError as e:
        assert "does not divide the number of data n = 4095" in str(e), e
    else:
        raise AssertionError("no error for a mesh axis that does not divide n")
    print("OK")
    """
)


def test_eight_device_sharded_fit_equals_one_device_fit():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_checkpoint_of_a_data_fit_with_per_group_optimizers_resumes_bitwise(rng, tmp_path):
    x, y = blr_data(rng)
    model = blr_theta_model(x.astype(np.float32), y.astype(np.float32))
    family = vijax.mean_field()
    init = vijax.JointParams(q=family.init(model.latent), theta=model.theta)
    kw = dict(optimizer={"q": optax.adam(1e-2), "theta": optax.sgd(1e-3)}, batch_size=10,
              progress=False)
    first = vijax.fit(jax.random.key(0), family, model, init, num_steps=40,
                      checkpoint_dir=tmp_path, **kw)
    loaded = vijax.load_checkpoint(tmp_path / "fit_state.npz")
    assert isinstance(loaded.params, vijax.JointParams)
    a = vijax.fit(None, family, model, loaded, num_steps=10, **kw)
    b = vijax.fit(None, family, model, first.state, num_steps=10, **kw)
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(u, v)


def test_data_elbo_under_jit_with_params_closed_over_or_passed(rng):
    x, w, mu, s = ppca_problem(rng)
    model = ppca_model(x.astype(np.float32), 2, s, w.astype(np.float32), mu.astype(np.float32))
    local = vijax.families.amortized(linear_encoder, vijax.mean_field())
    params = vijax.JointParams(theta=model.theta, encoder={
        "a": jnp.zeros((2, 4)), "b": jnp.zeros(2), "raw": jnp.zeros(2)})
    key = jax.random.key(0)
    closed = jax.jit(lambda k: vijax.data.data_elbo(k, params, None, model, num_samples=2,
                                                    local_family=local, batch_size=8))(key)
    passed = jax.jit(lambda k, p: vijax.data.data_elbo(k, p, None, model, num_samples=2,
                                                       local_family=local, batch_size=8))(key, params)
    np.testing.assert_allclose(closed, passed, rtol=1e-6)
    assert np.isfinite(closed)


def test_each_epoch_position_holds_every_row_with_probability_one_over_n():
    """Over keys, not only over a fit's steps: a 6-round Feistel permutation alone put
    rows in step 0's batch with frequencies 0.422 to 0.435 against 3/7 (n = 7, B = 3,
    200,000 keys, |z| up to 5.9); a uniform offset per epoch makes it exact."""
    n, b, num_keys = 7, 3, 100_000
    keys = jax.random.split(jax.random.key(0), num_keys)
    idx = np.asarray(jax.jit(jax.vmap(lambda k: batch_indices(k, 0, n, b, "epoch")))(keys))
    included = np.stack([(idx == i).any(axis=1) for i in range(n)])
    p = b / n
    z = (included.mean(axis=1) - p) / np.sqrt(p * (1 - p) / num_keys)
    assert np.all(np.abs(z) < 4), z
