"""``antithetic=True``: reflected draws, exact mean gradients on a Gaussian posterior, unbiased.

The draws are checked to be ``ceil(S / 2)`` draws of the family followed by
their reflections through q's mean; on Bayesian linear regression (a
quadratic log joint) the gradient with respect to q's mean must then equal
the exact one (``vijax.exact_kl``'s) for every key, to float64 precision; on
every family and pathwise estimator, with S even and odd, the mean over
independent keys of the whole gradient must lie within ``Z`` standard errors
(computed here) of the exact ``-grad KL``; and fit, make_step and elbo must
refuse what they cannot do before any work.
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
        res = vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=3,
                        progress=False, **kw)
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
