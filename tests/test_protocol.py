"""The open family protocol: a family of init, sample and log_prob runs everywhere it should."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax

B = 1.0  # the banana's curvature


def banana_log_joint(z):
    """x1 ~ N(0, 1), x2 | x1 ~ N(B (x1^2 - 1), 0.5): normalized, so log Z = 0."""
    x1, x2 = z[0], z[1]
    return (jax.scipy.stats.norm.logpdf(x1, 0.0, 1.0)
            + jax.scipy.stats.norm.logpdf(x2, B * (x1**2 - 1.0), jnp.sqrt(0.5)))


def quadratic_flow():
    """A flow-like family written here from scratch: an affine map, then
    ``z2 += quad * z1**2 + lin * z1`` (triangular, unit Jacobian for the shift).
    It contains the banana (loc = (0, -B), scales (1, sqrt .5), quad = B)."""

    def init(latent):
        d = latent.shape[0]
        return {"loc": jnp.zeros(d, latent.dtype), "log_scale": jnp.full(d, -1.0, latent.dtype),
                "quad": jnp.zeros((), latent.dtype), "lin": jnp.zeros((), latent.dtype)}

    def forward(params, eps):  # eps: (n, d)
        z = params["loc"][None, :] + jnp.exp(params["log_scale"])[None, :] * eps
        shift = params["quad"] * z[:, 0] ** 2 + params["lin"] * z[:, 0]
        return z.at[:, 1].add(shift)

    def sample(key, params, num_samples):
        eps = jax.random.normal(key, (num_samples,) + params["loc"].shape, params["loc"].dtype)
        return forward(params, eps)

    def log_prob(params, z):
        shift = params["quad"] * z[0] ** 2 + params["lin"] * z[0]
        u = z.at[1].add(-shift)
        eps = (u - params["loc"]) * jnp.exp(-params["log_scale"])
        return jnp.sum(jax.scipy.stats.norm.logpdf(eps)) - jnp.sum(params["log_scale"])

    return vijax.VariationalFamily(init=init, sample=sample, log_prob=log_prob)


def elbo_and_se(key, family, params, log_joint, n=20000):
    """The ELBO by plain Monte Carlo in NumPy terms, with its standard error."""
    z = family.sample(key, params, n)
    log_w = np.asarray(jax.vmap(log_joint)(z) - jax.vmap(lambda x: family.log_prob(params, x))(z),
                       np.float64)
    return log_w.mean(), log_w.std(ddof=1) / np.sqrt(n)


@pytest.mark.slow
def test_a_flow_like_family_fits_a_banana_better_than_the_full_rank_gaussian():
    latent = jnp.zeros(2)
    results = {}
    for name, family in [("flow", quadratic_flow()), ("full_rank", vijax.full_rank())]:
        res = vijax.fit(jax.random.key(0), family, banana_log_joint, family.init(latent),
                        optimizer=optax.adam(2e-2), num_steps=2000, num_samples=16,
                        estimator="stl", progress=False)
        assert res.num_skipped == 0
        results[name] = elbo_and_se(jax.random.key(1), family, res.params, banana_log_joint)
    (flow, flow_se), (gauss, gauss_se) = results["flow"], results["full_rank"]
    assert flow - gauss > 3 * np.hypot(flow_se, gauss_se), results
    assert flow > -0.02 - 3 * flow_se  # the family contains the target: ELBO -> log Z = 0
    assert gauss < -0.1  # a Gaussian cannot bend


@pytest.fixture(scope="module")
def flow_setup():
    family = quadratic_flow()
    params = jax.tree_util.tree_map(lambda a: a + 0.1, family.init(jnp.zeros(2)))
    return family, params


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["reparam", "stl", "score"])
def test_elbo_estimators_run_on_a_protocol_only_family(flow_setup, estimator):
    family, params = flow_setup
    value, grads = jax.value_and_grad(vijax.elbo, argnums=1)(
        jax.random.key(0), params, family, banana_log_joint, num_samples=32,
        estimator=estimator)
    assert np.isfinite(value)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow
def test_every_objective_runs_on_a_protocol_only_family(flow_setup):
    family, params = flow_setup
    key = jax.random.key(0)
    for estimator in ("reparam", "dreg"):
        bound = vijax.iwae_bound(key, params, family, banana_log_joint, num_samples=16,
                                 estimator=estimator)
        assert np.isfinite(bound)
        # IWAE >= the reparameterized ELBO estimate on the same draws.
        assert bound >= vijax.elbo(key, params, family, banana_log_joint, num_samples=16,
                                   estimator="reparam") - 1e-6
    assert np.isfinite(vijax.renyi_bound(key, params, family, banana_log_joint,
                                         num_samples=16, alpha=0.5))
    grads = vijax.estimator_gradients(key, params, family, banana_log_joint, num_samples=8,
                                      estimators=("reparam", "stl", "score", "iwae", "dreg"))
    assert sorted(grads) == ["dreg", "iwae", "reparam", "score", "stl"]
    # compare_gradients against a reference: the reparam gradient from many draws.
    reference = jax.grad(vijax.elbo, argnums=1)(
        jax.random.key(9), params, family, banana_log_joint, num_samples=20000,
        estimator="reparam")
    cmp = vijax.compare_gradients(key, params, family, banana_log_joint,
                                  estimators=("reparam", "stl"), num_samples=(4,),
                                  num_replicates=50, reference=reference)
    assert cmp.reference_name == "reference" and np.all(cmp.cosine > 0)
    res = vijax.fit_batched(jax.random.split(key, 3), family, banana_log_joint, params,
                            optimizer=optax.adam(1e-2), num_steps=50, progress=False)
    assert res.trace.elbo.shape == (3, 50)


def test_missing_capabilities_raise_errors_that_name_them(flow_setup):
    family, params = flow_setup
    model = vijax.models.normal_mean(jnp.ones(2), noise_scale=1.0, prior_loc=0.0,
                                     prior_scale=1.0)
    with pytest.raises(ValueError, match="closed_entropy.*closed-form entropy.*`family.entropy`"):
        vijax.elbo(jax.random.key(0), params, family, banana_log_joint, num_samples=4,
                   estimator="closed_entropy")
    with pytest.raises(ValueError, match="closed_entropy"):
        vijax.fit(jax.random.key(0), family, banana_log_joint, params,
                  optimizer=optax.adam(1e-2), num_steps=5, estimator="closed_entropy")
    with pytest.raises(ValueError, match="closed_entropy"):
        vijax.compare_gradients(jax.random.key(0), params, family, banana_log_joint,
                                estimators=("closed_entropy",), num_samples=(2,),
                                num_replicates=4, reference=params)
    with pytest.raises(ValueError, match="exact_kl needs `family.to_gaussian`"):
        vijax.exact_kl(params, family, model)
    with pytest.raises(ValueError, match="exact_elbo needs `family.to_gaussian`"):
        vijax.exact_elbo(params, family, model)
    with pytest.raises(ValueError, match="natural_gradient needs `family.to_gaussian`"):
        vijax.natural_gradient(family, 0.1)
    with pytest.raises(ValueError, match="'low_rank' family gives a LowRankScale"):
        vijax.natural_gradient(vijax.low_rank(rank=1), 0.1)


@pytest.mark.slow
def test_an_entropy_capability_enables_closed_entropy(flow_setup):
    family, params = flow_setup
    # The quadratic shift has a unit Jacobian: H[q] = sum log_scale + d/2 log(2 pi e).
    entropy = lambda p: jnp.sum(p["log_scale"]) + jnp.log(2 * jnp.pi * jnp.e)  # noqa: E731
    with_entropy = family._replace(entropy=entropy, name="quadratic_flow")
    key = jax.random.key(3)
    closed = vijax.elbo(key, params, with_entropy, banana_log_joint, num_samples=8,
                        estimator="closed_entropy")
    mc = elbo_and_se(key, family, params, banana_log_joint)
    assert abs(float(closed) - mc[0]) < 0.5  # 8 draws of log p against 20000 of log w
    res = vijax.fit(key, with_entropy, banana_log_joint, params, optimizer=optax.adam(1e-2),
                    num_steps=20, estimator="closed_entropy", progress=False)
    assert res.num_skipped == 0


def test_a_family_needs_the_three_functions():
    family = quadratic_flow()
    with pytest.raises(TypeError, match="family.log_prob` must be a callable"):
        vijax.fit(jax.random.key(0), family._replace(log_prob=None), banana_log_joint,
                  family.init(jnp.zeros(2)), optimizer=optax.adam(1e-2), num_steps=2)
    with pytest.raises(TypeError, match="family.entropy` must be None or a callable"):
        vijax.elbo(jax.random.key(0), family.init(jnp.zeros(2)), family._replace(entropy=1.0),
                   banana_log_joint, num_samples=2)


# ----------------------------------------------------------------- bad input
def _broken(**changes):
    family = quadratic_flow()
    return family._replace(**changes), family.init(jnp.zeros(2))


def _fit(family, params):
    return vijax.fit(jax.random.key(0), family, banana_log_joint, params,
                     optimizer=optax.adam(1e-2), num_steps=10, progress=False)


def test_sample_without_a_sample_axis_is_named_before_the_loop():
    family, params = _broken()
    no_axis = family._replace(sample=lambda key, p, n: family.sample(key, p, n)[0])
    with pytest.raises(ValueError, match=r"`family.sample`.*leading sample axis.*got shape \(2,\)"):
        _fit(no_axis, params)
    with pytest.raises(ValueError, match=r"`family.sample`.*leading sample axis"):
        vijax.elbo(jax.random.key(0), params, no_axis, banana_log_joint, num_samples=3)


def test_sample_with_the_wrong_structure_is_named_before_the_loop():
    family, params = _broken()
    as_dict = family._replace(sample=lambda key, p, n: {"z": family.sample(key, p, n)})
    with pytest.raises(ValueError, match="`family.log_prob`.*raised on one draw of `family.sample`"):
        _fit(as_dict, params)


@pytest.mark.slow
def test_a_non_scalar_log_prob_is_named_before_the_loop():
    family, params = _broken()
    per_coord = family._replace(log_prob=lambda p, z: jnp.stack([family.log_prob(p, z)] * 2))
    with pytest.raises(ValueError, match=r"`family.log_prob`.*scalar.*got shape \(2,\)"):
        _fit(per_coord, params)
    with pytest.raises(ValueError, match=r"`family.log_prob`.*scalar"):
        vijax.elbo(jax.random.key(0), params, per_coord, banana_log_joint, num_samples=3,
                   estimator="reparam")


def test_params_the_family_rejects_are_named():
    family, params = _broken()
    with pytest.raises(TypeError, match="do not match the family: `family.sample` raised"):
        _fit(family, {"loc": jnp.zeros(2)})
