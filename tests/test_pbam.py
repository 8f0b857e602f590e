"""Patched batch-and-match (Modi, Cai and Saul 2025): match, patch, fixed point, fits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vijax
from vijax.algorithms._pbam import pbam_match
from vijax.algorithms._pbam import patch as _patch

patch = jax.jit(_patch, static_argnums=3)


def _low_rank_target(rng, d, k, dtype=np.float64):
    """A Gaussian whose covariance is exactly W W^T + diag(s^2), rank k."""
    w = rng.normal(size=(d, k))
    s = 0.3 * np.exp(0.5 * rng.normal(size=d))
    m = 3.0 * rng.normal(size=d)
    target = vijax.Gaussian.low_rank(jnp.asarray(m, dtype), jnp.asarray(w, dtype),
                                     jnp.asarray(s, dtype))
    return target, w, s


def _np_kl0(s, c):
    """KL(N(0, s) || N(0, c)) by NumPy (the factor-analysis objective)."""
    d = s.shape[0]
    return 0.5 * (np.trace(np.linalg.solve(c, s)) - d + np.linalg.slogdet(c)[1]
                  - np.linalg.slogdet(s)[1])


def test_match_solves_the_proximal_problem_without_a_dense_matrix(x64, rng):
    # NumPy reference: BaM's Sigma' U Sigma' + Sigma' = V with V built from
    # the current W W^T + diag(s^2), and the mean formula; the factored
    # Sigma' (diagonal plus low rank) is made dense only here.
    d, k, b, lam = 9, 2, 4, 3.5
    mu = rng.normal(size=d)
    w, s = rng.normal(size=(d, k)), np.exp(0.3 * rng.normal(size=d))
    z, g = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    new_mu, matched, ok = pbam_match(*(jnp.asarray(a) for a in (mu, w, s, z, g)), lam)
    assert bool(ok)
    zb, gb = z.mean(0), g.mean(0)
    c = (z - zb).T @ (z - zb) / b
    gam = (g - gb).T @ (g - gb) / b
    u = lam * gam + lam / (1 + lam) * np.outer(gb, gb)
    v = w @ w.T + np.diag(s**2) + lam * c + lam / (1 + lam) * np.outer(mu - zb, mu - zb)
    sigma = np.asarray(matched.dense())
    np.testing.assert_allclose(sigma @ u @ sigma + sigma, v, rtol=1e-9, atol=1e-11)
    assert np.all(np.linalg.eigvalsh(sigma) > 0)
    np.testing.assert_allclose(new_mu, mu / (1 + lam) + lam / (1 + lam) * (sigma @ gb + zb),
                               rtol=1e-10)
    np.testing.assert_allclose(matched.diagonal(), np.diag(sigma), rtol=1e-12)
    x = rng.normal(size=(d, 3))
    np.testing.assert_allclose(matched.matmul(jnp.asarray(x)), sigma @ x, rtol=1e-10)


def test_patch_recovers_an_exact_low_rank_covariance(x64, rng):
    # For S that is itself rank k plus diagonal, given in the factored form
    # the match step produces (split unevenly, with a cancelling pair of
    # columns of opposite sign), a few rounds from a poor start give S.
    from vijax.algorithms._pbam import Matched
    d, k = 12, 2
    _, w0, s0 = _low_rank_target(rng, d, k)
    cov = w0 @ w0.T + np.diag(s0**2)
    extra = rng.normal(size=(d, 1))
    a = np.concatenate([w0, np.diag(s0 / np.sqrt(2)), extra, extra], 1)
    target = Matched(jnp.asarray(0.5 * s0**2), jnp.asarray(a),
                     jnp.asarray(np.r_[np.ones(k + d), 1.0, -1.0]))
    np.testing.assert_allclose(target.dense(), cov, rtol=1e-10, atol=1e-12)
    w, s = patch(target, jnp.asarray(0.1 * rng.normal(size=(d, k))), jnp.ones(d), 100)
    assert _np_kl0(cov, np.asarray(w @ w.T + jnp.diag(s**2))) < 1e-6


def test_patch_is_monotone_and_finds_a_maximum_likelihood_factor_analysis(x64, rng):
    # S not rank k plus diagonal (a rank-2-plus-diagonal matrix perturbed
    # by a full-rank one): the patch attains the minimum of
    # KL(N(0, S) || N(0, W W^T + Psi)) over (W, log Psi) (checked with
    # SciPy's L-BFGS), and satisfies Psi = diag(S - W W^T).
    import scipy.optimize
    from vijax.algorithms._pbam import Matched
    # Each round lowers the objective (NumPy), from several poor starts.
    d, k = 10, 2
    _, w0, s0 = _low_rank_target(rng, d, k)
    a = rng.normal(size=(d, d))
    cov = w0 @ w0.T + np.diag(s0**2) + 0.05 * a @ a.T / d
    target = Matched(jnp.zeros(d), jnp.asarray(np.linalg.cholesky(cov)), jnp.ones(d))
    results = []
    for _ in range(3):
        w, s = jnp.asarray(0.1 * rng.normal(size=(d, k))), jnp.ones(d)
        kls = []
        for _ in range(60):
            w, s = patch(target, w, s, 1)
            kls.append(_np_kl0(cov, np.asarray(w @ w.T + jnp.diag(s**2))))
        assert all(b <= a + 1e-12 for a, b in zip(kls, kls[1:]))
        # Convergence can be slow where a variance nears zero (here one is
        # about 0.5% of S_ii): finish with more rounds.
        w, s = patch(target, w, s, 3000)
        results.append((_np_kl0(cov, np.asarray(w @ w.T + jnp.diag(s**2))), np.asarray(w),
                        np.asarray(s)))
        assert results[-1][0] <= kls[-1] + 1e-12
    ours, w, s = min(results, key=lambda r: r[0])

    def objective(x):
        wm, log_psi = x[: d * k].reshape(d, k), x[d * k:]
        return _np_kl0(cov, wm @ wm.T + np.diag(np.exp(log_psi)))

    # A local minimum (the objective is not convex; other starts may find
    # others): L-BFGS started from the patch's answer cannot improve it.
    polished = scipy.optimize.minimize(
        objective, np.r_[w.ravel(), np.log(s**2)], method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-10}).fun
    assert ours <= polished + 1e-7, (ours, polished)
    np.testing.assert_allclose(s**2, np.diag(cov - w @ w.T), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_a_low_rank_gaussian_target_is_a_fixed_point(x64, rng, batch_size):
    d, k = 20, 3
    target, _, _ = _low_rank_target(rng, d, k)
    family = vijax.low_rank(rank=k)
    start = family.from_gaussian(target, jnp.zeros(d))
    result = vijax.patched_batch_and_match(
        jax.random.key(0), target.log_prob, start, num_steps=5, batch_size=batch_size,
        learning_rate=7.0, progress=False)
    assert result.num_skipped == 0
    assert float(vijax.gaussian_kl(family.to_gaussian(result.params), target)) < 1e-9


@pytest.mark.slow
def test_reaches_a_low_rank_target_with_batches_much_smaller_than_d(x64, rng):
    # d = 50, rank 3, B = 8 from the default start (KL about 5e3). Measured:
    # KL 1e-4 after 1000 steps; full-rank BaM with the same B stays above
    # KL 4000 (each step learns the covariance on an 8-dimensional span).
    d, k = 50, 3
    target, _, _ = _low_rank_target(rng, d, k)
    family = vijax.low_rank(rank=k)
    start = family.init(jnp.zeros(d))
    assert float(vijax.gaussian_kl(family.to_gaussian(start), target)) > 1000
    result = vijax.patched_batch_and_match(
        jax.random.key(0), target.log_prob, start, num_steps=1000, batch_size=8,
        progress=False)
    assert result.num_skipped == 0
    assert float(vijax.gaussian_kl(family.to_gaussian(result.params), target)) < 1e-2


def test_fits_linear_regression_as_well_as_adam_on_the_same_family(x64, rng):
    # Bayesian linear regression, d = 6: the posterior is not rank 2 plus
    # diagonal, so the best rank-2 q has KL > 0. pBaM's answer (the
    # score-matching optimum, not the KL one) should be within 0.05 nats of
    # what Adam on the ELBO reaches in the same family.
    x = rng.normal(size=(60, 6)) @ np.diag(np.linspace(0.3, 2.0, 6))
    x[:, 1] += x[:, 0]
    y = x @ rng.normal(size=6) + 0.5 * rng.normal(size=60)
    model = vijax.models.bayesian_linear_regression(jnp.asarray(x), jnp.asarray(y),
                                                    noise_scale=0.5, prior_scale=1.0)
    family = vijax.low_rank(rank=2)
    result = vijax.patched_batch_and_match(
        jax.random.key(0), model.log_joint, family.init(model.latent), num_steps=300,
        batch_size=16, progress=False)
    import optax
    adam = vijax.fit(jax.random.key(1), family, model.log_joint, family.init(model.latent),
                     optimizer=optax.adam(1e-2), num_steps=4000, num_samples=16,
                     estimator="stl", progress=False)
    kl_pbam = float(vijax.exact_kl(result.params, family, model))
    kl_adam = float(vijax.exact_kl(adam.params, family, model))
    assert kl_adam > 1e-3  # the family cannot hold the posterior exactly
    assert kl_pbam < kl_adam + 0.05, (kl_pbam, kl_adam)


def test_float32_continuation_and_vmap(rng):
    d, k = 8, 2
    target, _, _ = _low_rank_target(rng, d, k, dtype=np.float32)
    family = vijax.low_rank(rank=k)
    start = family.init(jnp.zeros(d, jnp.float32))
    kw = dict(batch_size=6, progress=False, chunk_size=20)
    whole = vijax.patched_batch_and_match(jax.random.key(1), target.log_prob, start,
                                          num_steps=60, **kw)
    part = vijax.patched_batch_and_match(jax.random.key(1), target.log_prob, start,
                                         num_steps=25, **kw)
    rest = vijax.patched_batch_and_match(None, target.log_prob, part.state, num_steps=35, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(whole.params),
                    jax.tree_util.tree_leaves(rest.params)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    # The pure step vmaps over keys.
    step = vijax.make_pbam_step(target.log_prob, batch_size=4)
    init = vijax.algorithms.pbam_algorithm(target.log_prob, batch_size=4).init
    states = jax.vmap(lambda key: init(key, start))(jax.random.split(jax.random.key(2), 3))
    new, info = jax.jit(jax.vmap(step))(states)
    assert new.params.cov_factor.shape == (3, d, k) and info.elbo.shape == (3,)
    one, _ = jax.jit(step)(jax.tree_util.tree_map(lambda a: a[1], states))
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(new.params)):
        np.testing.assert_allclose(a, b[1], rtol=1e-4, atol=1e-5)


def test_non_finite_scores_are_rejected(x64):
    family = vijax.low_rank(rank=1)
    start = family.init(jnp.zeros(3))

    def log_joint(z):  # nan everywhere
        return jnp.sum(jnp.log(-jnp.abs(z) - 1.0))

    with pytest.raises(vijax.FitError):
        vijax.patched_batch_and_match(jax.random.key(0), log_joint, start, num_steps=30,
                                      batch_size=4, max_nonfinite=5, progress=False)


def test_errors(rng):
    target, _, _ = _low_rank_target(rng, 4, 1, dtype=np.float32)
    start = vijax.low_rank(rank=1).init(jnp.zeros(4))
    run = lambda params, **kw: vijax.patched_batch_and_match(  # noqa: E731
        jax.random.key(0), target.log_prob, params, **{
            "num_steps": 1, "batch_size": 2, "progress": False, **kw})
    with pytest.raises(ValueError, match="low-rank Gaussian family only.*low_rank"):
        run(vijax.full_rank().init(jnp.zeros(4)))
    with pytest.raises(ValueError, match="`patch_steps` must be an int >= 1"):
        run(start, patch_steps=0)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        run(start, batch_size=0)
    with pytest.raises(ValueError, match="`max_kl`"):
        run(start, max_kl=-1.0)
    with pytest.raises(TypeError, match="`learning_rate`"):
        run(start, learning_rate="big")
