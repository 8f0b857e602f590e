"""``antithetic=True``: reflected draws, exact mean gradients on a Gaussian posterior, unbiased.

The draws are checked to be ``ceil(S / 2)`` draws of the family followed by
their reflections through q's mean; on Bayesian linear regression (a
quadratic log joint) the gradient with respect to q's mean must then equal
the exact one (``vijax.exact_kl``'s) for every key, to float64 precision; on
every family and pathwise estimator, with S even and odd, the mean over
independent keys of the whole gradient must lie within ``Z`` standard errors
(computed here) of the exact ``-grad KL``; and fit, make_step and elbo must
refuse what they cannot do before any work. For the low-rank family the
draws come in fours (every sign combination of the factor's and the
diagonal's noise), and its factor's STL gradient is then exactly zero at the
family's optimum on a Gaussian target, for every key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import vijax
from vijax._objectives import ANTITHETIC_ESTIMATORS, antithetic_sample
from vijax.fitting._drivers import default_antithetic

from test_objectives import FAMILIES, Z, _assert_mean_within, _flat, _keys, _params, _regression


@pytest.mark.parametrize("num_samples", [4, 5])
def test_draws_are_family_draws_then_their_reflections_on_pytree_latents(x64, rng, num_samples):
    family = vijax.full_rank()
    latent = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    params = _params(rng, family, latent)
    key = jax.random.key(3)
    z = antithetic_sample(key, params, family, num_samples)
    half = (num_samples + 1) // 2
    first = family.sample(key, params, half)
    mean = family.to_gaussian(params).mean
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])
    zf, firstf = np.asarray(flat(z)), np.asarray(flat(first))
    assert zf.shape == (num_samples, 4)
    np.testing.assert_array_equal(zf[:half], firstf)
    np.testing.assert_allclose(zf[half:], (2 * np.asarray(mean) - firstf)[: num_samples - half],
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_mean_gradient_is_exact_on_a_gaussian_posterior(x64, rng, family_name):
    model = _regression(rng)
    family = FAMILIES[family_name]()
    params = _params(rng, family, model.latent)
    exact = -np.asarray(jax.grad(vijax.exact_kl)(params, family, model).loc)
    assert np.linalg.norm(exact) > 1.0
    for estimator in ANTITHETIC_ESTIMATORS:
        grads = jax.vmap(lambda k: jax.grad(vijax.elbo, argnums=1)(
            k, params, family, model.log_joint, num_samples=6, estimator=estimator,
            antithetic=True).loc)(_keys(5, 20))
        np.testing.assert_allclose(np.asarray(grads), np.broadcast_to(exact, grads.shape),
                                   rtol=1e-10, atol=1e-10, err_msg=estimator)
    # Without pairs the same gradient is noisy (the test can fail).
    plain = jax.vmap(lambda k: jax.grad(vijax.elbo, argnums=1)(
        k, params, family, model.log_joint, num_samples=6).loc)(_keys(5, 20))
    assert np.max(np.std(np.asarray(plain), axis=0)) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("family_name", list(FAMILIES))
@pytest.mark.parametrize("num_samples", [3, 4])
def test_every_pathwise_estimator_stays_unbiased(x64, rng, family_name, num_samples):
    model = _regression(rng)
    family = FAMILIES[family_name]()
    params = _params(rng, family, model.latent)

    @jax.jit
    def replicate(keys):
        def one(key):
            return {e: ravel_pytree(jax.grad(vijax.elbo, argnums=1)(
                key, params, family, model.log_joint, num_samples=num_samples, estimator=e,
                antithetic=True))[0] for e in ANTITHETIC_ESTIMATORS}, vijax.elbo(
                key, params, family, model.log_joint, num_samples=num_samples,
                estimator="reparam", antithetic=True)
        return jax.vmap(one)(keys)

    grads, values = replicate(_keys(11, 3000))
    exact = -_flat(jax.grad(vijax.exact_kl)(params, family, model))
    for e, g in grads.items():
        _assert_mean_within(g, exact, f"{family_name} {e} antithetic S={num_samples}", z=Z)
    _assert_mean_within(values, float(vijax.exact_elbo(params, family, model)), "value")


def test_fit_with_antithetic_draws_compiles_apart_and_converges(rng):
    model = _regression(rng, n=40, d=4, dtype=np.float32)
    family = vijax.mean_field()
    init = family.init(model.latent)
    kw = dict(optimizer=optax.adam(0.05), num_steps=600, progress=False)
    a = vijax.fit(jax.random.key(0), family, model.log_joint, init, antithetic=True, **kw)
    b = vijax.fit(jax.random.key(0), family, model.log_joint, init, **kw)
    assert not np.allclose(_flat(a.params), _flat(b.params))  # not the cached plain chunk
    assert a.params.loc.dtype == jnp.float32
    post = model.posterior  # the mean-field optimum: its mean, sds 1 / sqrt(P_ii)
    prec = np.linalg.inv(np.asarray(post.scale.cov(), np.float64))
    best = family.from_gaussian(vijax.Gaussian.diagonal(
        post.mean, jnp.asarray(1.0 / np.sqrt(np.diagonal(prec)), jnp.float32)), model.latent)
    gap = float(vijax.exact_kl(a.params, family, model)) - float(
        vijax.exact_kl(best, family, model))
    assert 0.0 <= gap < 0.05, gap
    # The default optimizer and its auto_stop take it too.
    res = vijax.fit(jax.random.key(1), family, model.log_joint, init, num_steps=20_000,
                    antithetic=True, progress=False)
    assert res.stopped_early
    batched = vijax.fit_batched(jax.vmap(jax.random.key)(jnp.arange(2)), family,
                                model.log_joint, init, antithetic=True, **kw)
    np.testing.assert_allclose(_flat(jax.tree_util.tree_map(lambda x: x[0], batched.params)),
                               _flat(a.params), rtol=1e-4, atol=1e-5)
    step = vijax.make_step(family, model.log_joint, optax.adam(0.05), num_samples=4,
                           antithetic=True)
    state = vijax.init_fit_state(jax.random.key(0), init, optax.adam(0.05))
    state, info = jax.jit(step)(state)
    assert np.isfinite(float(info.elbo))


def test_the_default_fit_draws_pairs_from_d_1000():
    """``antithetic=None``: pairs in the default fit at d >= 1000 where allowed, else not."""

    def log_joint(z):
        return -0.5 * jnp.sum(jnp.square(z - 1.0))

    family = vijax.mean_field()

    def run(d, **kw):
        init = family.init(jnp.zeros(d, jnp.float32))
        # No control variate: it makes this quadratic target's gradient exact
        # whatever the draws.
        res = vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=3,
                        progress=False, control_variate=False, **kw)
        return _flat(res.params)

    big = run(1000)
    np.testing.assert_array_equal(big, run(1000, antithetic=True))
    assert not np.array_equal(big, run(1000, antithetic=False))
    np.testing.assert_array_equal(run(999), run(999, antithetic=False))
    # A given optimizer, or an estimator pairs cannot serve: independent draws, no error.
    adam = optax.adam(0.1)
    np.testing.assert_array_equal(run(1000, optimizer=adam),
                                  run(1000, optimizer=adam, antithetic=False))
    np.testing.assert_array_equal(run(1000, estimator="score"),
                                  run(1000, estimator="score", antithetic=False))
    params = family.init(jnp.zeros(1000))
    bare = vijax.VariationalFamily(init=family.init, sample=family.sample,
                                   log_prob=family.log_prob)
    assert default_antithetic(params, family, "adaptive_stl")
    assert not default_antithetic(params, bare, "adaptive_stl")
    assert not default_antithetic(params, family, "score")
    assert not default_antithetic(family.init(jnp.zeros(999)), family, "adaptive_stl")


def test_bad_arguments_raise_before_work(rng):
    model = _regression(rng, dtype=np.float32)
    family = vijax.mean_field()
    params = family.init(model.latent)
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="`antithetic` must be a bool"):
        vijax.elbo(key, params, family, model.log_joint, num_samples=4, antithetic="yes")
    with pytest.raises(ValueError, match=r"antithetic=True.*estimator='score'"):
        vijax.elbo(key, params, family, model.log_joint, num_samples=4, estimator="score",
                   antithetic=True)
    bare = vijax.VariationalFamily(init=family.init, sample=family.sample,
                                   log_prob=family.log_prob)
    with pytest.raises(ValueError, match="Gaussian view"):
        vijax.fit(key, bare, model.log_joint, params, optimizer=optax.adam(0.1),
                  num_steps=10, antithetic=True, progress=False)
    with pytest.raises(ValueError, match="Gaussian view"):
        vijax.make_step(bare, model.log_joint, optax.adam(0.1), antithetic=True)
    x = jnp.asarray(rng.normal(size=(20, 2)))
    data = vijax.models.data_model(
        lambda z, row: -0.5 * jnp.sum(jnp.square(row - z)), x, latent=jnp.zeros(2),
        log_prior=lambda z: -0.5 * jnp.sum(jnp.square(z)))
    with pytest.raises(ValueError, match="not supported for data models"):
        vijax.fit(key, family, data, family.init(jnp.zeros(2)), optimizer=optax.adam(0.1),
                  num_steps=10, antithetic=True, progress=False)
    with pytest.raises(TypeError, match="`antithetic` must be a bool or None"):
        vijax.fit(key, family, data, family.init(jnp.zeros(2)), optimizer=optax.adam(0.1),
                  num_steps=10, antithetic="yes", progress=False)
    with pytest.raises(TypeError, match="`antithetic` must be a bool"):
        vijax.fit_batched(jax.random.split(key, 2), family, data, family.init(jnp.zeros(2)),
                          optimizer=optax.adam(0.1), num_steps=10, antithetic=1,
                          progress=False)


@pytest.mark.parametrize("num_samples, want", [
    (4, ((0, 0, 0, 0), 4)),
    (5, ((0, 0, 0, 0, 1), 4)),
    (6, ((0, 0, 0, 0, 1, 1), 4)),
    (7, ((0, 0, 0, 0, 1, 1, 2), 4)),
    (9, ((0, 0, 0, 0, 1, 1, 1, 1, 2), 8)),
])
def test_low_rank_draws_come_in_fours_of_sign_combinations(x64, rng, num_samples, want):
    from vijax._objectives import antithetic_layout

    groups, signs = antithetic_layout(num_samples, True)
    assert groups == want[0]
    assert signs[:4] == ((1, 1), (-1, -1), (1, -1), (-1, 1))
    family = vijax.low_rank(rank=2)
    params = _params(rng, family, jnp.zeros(5))
    z = np.asarray(antithetic_sample(jax.random.key(1), params, family, num_samples))
    g = family.to_gaussian(params)
    mean = np.asarray(g.mean)
    w, sd = np.asarray(g.scale.cov_factor), np.asarray(g.scale.diag_scale)
    # Each full group of four: z(+,+) + z(-,-) = 2 mean = z(+,-) + z(-,+), and
    # z(+,+) - z(+,-) = 2 diag(sd) eps_D lies in the diagonal block only:
    # z(+,+) - z(-,+) = 2 W eps_W lies in the factor's column space.
    for b in range(want[1] // 4):
        pp, mm, pm, mp = z[4 * b: 4 * b + 4]
        np.testing.assert_allclose(pp + mm, 2 * mean, atol=1e-12)
        np.testing.assert_allclose(pm + mp, 2 * mean, atol=1e-12)
        eps_w = np.linalg.lstsq(w, (pp - mp) / 2, rcond=None)[0]
        np.testing.assert_allclose(w @ eps_w, (pp - mp) / 2, atol=1e-12)
        eps_d = (pp - pm) / (2 * sd)
        np.testing.assert_allclose(pp, mean + w @ eps_w + sd * eps_d, atol=1e-12)
    # What is left of S mod 4: a pair reflected through the mean, then one draw.
    rest = z[want[1]:]
    if len(rest) >= 2:
        np.testing.assert_allclose(rest[0] + rest[1], 2 * mean, atol=1e-12)


def test_on_a_gaussian_target_the_factors_stl_gradient_vanishes_at_the_low_rank_optimum(x64, rng):
    # The factor's stationarity condition is (H - Sigma^-1) W = 0; with the
    # four sign combinations the factor's STL gradient is exactly
    # -(H - Sigma^-1) W eps_W eps_W^T, so zero there for every key.
    # Independent draws keep the cross term H diag(s) eps_D eps_W^T.
    import scipy.optimize

    model = _regression(rng, n=12, d=5)
    family = vijax.low_rank(rank=1)
    params0 = _params(rng, family, model.latent)
    flat0, unravel = ravel_pytree(params0)
    kl = jax.jit(jax.value_and_grad(lambda f: vijax.exact_kl(unravel(f), family, model)))
    res = scipy.optimize.minimize(lambda f: tuple(np.asarray(a, np.float64) for a in kl(f)),
                                  np.asarray(flat0), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 10000})
    opt = unravel(jnp.asarray(res.x))
    assert np.max(np.abs(np.asarray(kl(jnp.asarray(res.x))[1]))) < 1e-6
    assert np.max(np.abs(np.asarray(opt.cov_factor))) > 0.05  # a factor that matters

    def factor_grads(antithetic):
        return np.asarray(jax.vmap(lambda k: jax.grad(vijax.elbo, argnums=1)(
            k, opt, family, model.log_joint, num_samples=8, estimator="stl",
            antithetic=antithetic).cov_factor)(_keys(9, 50)))

    # Zero up to the optimum's own residual gradient (< 1e-6), times eps_W^2.
    assert np.max(np.abs(factor_grads(True))) < 2e-5
    assert np.max(np.std(factor_grads(False), axis=0)) > 0.05
