"""vijax.flows: densities (quadrature, SciPy), identity start, estimators, errors, float32."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

import vijax
from vijax import flows

SMALL = dict(num_layers=3, hidden_width=8)

FLOWS = {
    "affine_coupling": flows.affine_coupling,
    "spline_coupling": flows.spline_coupling,
    "autoregressive": flows.autoregressive,
    "autoregressive_spline": lambda **kw: flows.autoregressive(transformer="spline", **kw),
}
BASES = {"full_rank": vijax.full_rank, "mean_field": vijax.mean_field}


def _perturbed(params, rng, scale):
    """Every leaf plus ``scale`` standard normal noise (networks included)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(
        treedef,
        [leaf + jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)
         for leaf in leaves],
    )


def _regression(rng, n=12, d=3):
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n)
    return vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(y), noise_scale=0.5, prior_scale=1.0)


# ------------------------------------------------------------- fixed names
@pytest.mark.parametrize("name", ["affine_coupling", "spline_coupling", "autoregressive"])
def test_factories_need_no_arguments(name):
    family = getattr(vijax.flows, name)()
    assert isinstance(family, vijax.VariationalFamily)
    assert family.name == name
    params = family.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    assert isinstance(params, flows.FlowParams)
    z = family.sample(jax.random.key(0), params, 4)
    assert z["w"].shape == (4, 3) and z["b"].shape == (4,)
    assert z["w"].dtype == jnp.float32
    assert family.log_prob(params, jax.tree_util.tree_map(lambda a: a[0], z)).shape == ()


# ------------------------------------------------------------- densities
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("flow", list(FLOWS))
def test_sampled_log_q_equals_log_prob_at_the_draws(x64, rng, flow, base):
    family = FLOWS[flow](base=BASES[base](), **SMALL)
    latent = {"a": jnp.zeros(3), "b": jnp.zeros(())}
    params = _perturbed(family.init(latent), rng, 0.4)
    z, log_q = family.sample_and_log_prob(jax.random.key(1), params, 64)
    chex.assert_trees_all_equal(z, family.sample(jax.random.key(1), params, 64))
    again = jax.vmap(lambda zi: family.log_prob(params, zi))(z)
    np.testing.assert_allclose(np.asarray(again), np.asarray(log_q), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("flow", list(FLOWS))
def test_log_prob_is_the_density_of_the_draws_by_quadrature(x64, rng, flow):
    # d = 2: q integrates to one on a grid (NumPy trapezoid), and its mean by
    # quadrature matches the mean of 20,000 draws within 4 standard errors.
    # The perturbed layers are far from the identity: log q differs from the
    # base Gaussian's log density by a term that varies across the draws.
    family = FLOWS[flow](base=vijax.full_rank(init_scale=1.0), **SMALL)
    params = _perturbed(family.init(jnp.zeros(2)), rng, 0.2)
    draws, log_q = family.sample_and_log_prob(jax.random.key(2), params, 20_000)
    base = vijax.full_rank().to_gaussian(params.base).log_prob(draws)
    assert np.std(np.asarray(log_q - base)) > 0.2
    draws = np.asarray(draws)
    lo = np.quantile(draws, 1e-4, axis=0) - 3.0 * draws.std(axis=0)
    hi = np.quantile(draws, 1 - 1e-4, axis=0) + 3.0 * draws.std(axis=0)
    g0, g1 = np.linspace(lo[0], hi[0], 801), np.linspace(lo[1], hi[1], 801)
    grid = np.stack(np.meshgrid(g0, g1, indexing="ij"), axis=-1).reshape(-1, 2)
    dens = np.exp(np.asarray(jax.jit(jax.vmap(lambda z: family.log_prob(params, z)))(grid)))
    dens = dens.reshape(801, 801)

    def integrate(f):
        return np.trapezoid(np.trapezoid(f, g1, axis=1), g0)

    assert abs(integrate(dens) - 1.0) < 1e-4
    for i, g in enumerate((g0[:, None], g1[None, :])):
        quad_mean = integrate(dens * g)
        se = draws[:, i].std(ddof=1) / np.sqrt(len(draws))
        assert abs(draws[:, i].mean() - quad_mean) < 4 * se + 1e-3


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("flow", list(FLOWS))
def test_a_new_flow_is_its_base_gaussian(x64, rng, flow, base):
    base_family = BASES[base](init_scale=0.7)
    family = FLOWS[flow](base=base_family, **SMALL)
    latent = {"a": jnp.asarray(rng.standard_normal(3)), "b": jnp.asarray(0.3)}
    params = family.init(latent)
    chex.assert_trees_all_close(params.base, base_family.init(latent))
    key = jax.random.key(3)
    z = family.sample(key, params, 16)
    chex.assert_trees_all_close(z, base_family.sample(key, params.base, 16), rtol=1e-12, atol=1e-12)
    g = base_family.to_gaussian(params.base)
    flat = jax.vmap(lambda zi: ravel_pytree(zi)[0])(z)
    ref = stats.multivariate_normal(np.asarray(g.mean), np.asarray(g.cov)).logpdf(np.asarray(flat))
    got = jax.vmap(lambda zi: family.log_prob(params, zi))(z)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10)


@pytest.mark.parametrize("flow", list(FLOWS))
def test_from_gaussian_puts_the_flow_on_a_conjugate_posterior(x64, rng, flow):
    # q = p(z | x) exactly: every log weight is log p(x), so the ELBO, the IWAE
    # bound and diagnose's PSIS estimate all equal the exact log evidence.
    model = _regression(rng)
    family = FLOWS[flow](**SMALL)
    params = family.from_gaussian(model.posterior, model.latent)
    log_z = float(model.log_evidence)
    key = jax.random.key(4)
    for value in (
        vijax.elbo(key, params, family, model.log_joint, num_samples=32, estimator="reparam"),
        vijax.elbo(key, params, family, model.log_joint, num_samples=32, estimator="stl"),
        vijax.iwae_bound(key, params, family, model.log_joint, num_samples=32),
        vijax.renyi_bound(key, params, family, model.log_joint, num_samples=32, alpha=0.5),
    ):
        np.testing.assert_allclose(float(value), log_z, rtol=0, atol=1e-9)
    diag = vijax.diagnose(key, params, family, model, num_samples=200)
    np.testing.assert_allclose(diag.log_evidence, log_z, atol=1e-9)
    np.testing.assert_allclose(diag.mean, np.asarray(model.posterior.mean), atol=0.3)


# ------------------------------------------------------------- estimators
@pytest.mark.parametrize("flow", ["affine_coupling", "spline_coupling"])
def test_path_estimators_vanish_at_a_posterior_the_flow_contains(x64, rng, flow):
    # At q = p the ELBO gradient is exactly zero. STL and DReG (and
    # adaptive_stl) are zero draw by draw; the reparameterized gradient is
    # only zero on average. compare_gradients, with the exact reference 0.
    model = _regression(rng)
    family = FLOWS[flow](**SMALL)
    params = family.from_gaussian(model.posterior, model.latent)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    cmp = vijax.compare_gradients(
        jax.random.key(5), params, family, model,
        estimators=("reparam", "stl", "adaptive_stl", "dreg"), num_samples=4,
        num_replicates=64, reference=zero,
    )
    var = dict(zip(cmp.estimators, np.asarray(cmp.variance)[:, 0]))
    assert var["reparam"] > 1e-2, var
    for name in ("stl", "adaptive_stl", "dreg"):
        assert var[name] < 1e-20 * var["reparam"], var


@pytest.mark.slow
def test_estimators_agree_in_mean_and_path_noise_falls_near_the_posterior(x64, rng):
    flow = "spline_coupling"
    # Paired (same draws) differences of estimators have mean zero within
    # 5 standard errors (coordinates of all parameters); and as q approaches
    # the posterior along a line (t = 0.3 -> 0.03), the variance of STL and
    # DReG falls about as t^2 (100x), over 5x more than reparam's, which
    # stays well above theirs.
    model = _regression(rng)
    family = FLOWS[flow](num_layers=2, hidden_width=6)
    star = family.from_gaussian(model.posterior, model.latent)
    direction = _perturbed(jax.tree_util.tree_map(jnp.zeros_like, star), rng, 1.0)
    names = ("reparam", "stl", "adaptive_stl", "score", "dreg")

    @jax.jit
    def replicate(t, keys):
        params = jax.tree_util.tree_map(lambda a, b: a + t * b, star, direction)

        def one(key):
            g = vijax.estimator_gradients(key, params, family, model.log_joint,
                                          num_samples=4, estimators=names)
            return {e: ravel_pytree(v)[0] for e, v in g.items()}

        return jax.vmap(one)(keys)

    keys = jax.random.split(jax.random.key(6), 400)
    far = {e: np.asarray(v) for e, v in replicate(0.3, keys).items()}
    for name in ("stl", "adaptive_stl", "score"):  # ELBO estimators: the same mean
        diff = far[name] - far["reparam"]
        se = diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
        z = np.abs(diff.mean(axis=0)) / np.where(se > 0, se, 1.0)
        assert np.max(z) < 5.0, (name, np.max(z))
    near = {e: np.asarray(v) for e, v in replicate(0.03, keys).items()}
    var = {e: (np.var(far[e], axis=0).sum(), np.var(near[e], axis=0).sum()) for e in names}
    fall = {e: v[1] / v[0] for e, v in var.items()}
    for name in ("stl", "dreg", "adaptive_stl"):
        assert fall[name] < 0.05 and fall[name] < fall["reparam"] / 5, (name, fall)
        assert var[name][1] < var["reparam"][1] / 10, (name, var)


def test_closed_entropy_and_natural_gradient_need_a_gaussian_view():
    family = flows.affine_coupling(**SMALL)
    params = family.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="closed-form entropy"):
        vijax.elbo(jax.random.key(0), params, family, lambda z: -jnp.sum(z**2),
                   num_samples=2, estimator="closed_entropy")


# ------------------------------------------------------------- fitting
def test_a_flow_fits_a_banana_better_than_a_full_rank_gaussian():
    # log Z = 0 for this normalized banana, so -ELBO is the KL.
    def banana(z):
        return (stats_norm_logpdf(z[0], 1.0) + stats_norm_logpdf(z[1] - (z[0] ** 2 - 1.0), 0.5))

    key = jax.random.key(7)
    kl = {}
    for name, family in (("flow", flows.affine_coupling(num_layers=4, hidden_width=16)),
                         ("gauss", vijax.full_rank())):
        result = vijax.fit(key, family, banana, family.init(jnp.zeros(2)),
                           optimizer=optax.adam(3e-3), num_steps=1500, num_samples=16,
                           progress=False)
        draws = jax.random.split(jax.random.key(8), 8)
        values = jnp.stack([vijax.elbo(k, result.params, family, banana, num_samples=512,
                                       estimator="reparam") for k in draws])
        kl[name] = (-float(values.mean()), float(values.std(ddof=1)) / np.sqrt(8))
    gap = kl["gauss"][0] - kl["flow"][0]
    assert gap > 4 * np.hypot(kl["gauss"][1], kl["flow"][1]) and gap > 0.1, kl


def stats_norm_logpdf(x, sd):
    return -0.5 * (x / sd) ** 2 - jnp.log(sd) - 0.5 * jnp.log(2 * jnp.pi)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["affine_coupling", "spline_coupling", "autoregressive"])
def test_defaults_are_stable_in_float32_on_the_funnel(name):
    # Neal's funnel, d = 10, float32, every default: 10,000 steps, no NaN.
    model = vijax.models.neals_funnel(dim=10)
    family = getattr(vijax.flows, name)()
    result = vijax.fit(jax.random.key(9), family, model.log_joint, family.init(model.latent),
                       optimizer=optax.adam(1e-3), num_steps=10_000, progress=False)
    assert result.num_skipped == 0
    assert np.all(np.isfinite(np.asarray(result.trace.elbo)))
    for leaf in jax.tree_util.tree_leaves(result.params):
        assert leaf.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(leaf)))
    # Not stuck: over a nat better than the initial q (the funnel's log Z is 0).
    first, last = np.mean(result.trace.elbo[:50]), np.mean(result.trace.elbo[-500:])
    assert last > first + 1.0, (first, last)


def test_fit_batched_and_vmap_over_flow_params():
    family = flows.autoregressive(num_layers=2, hidden_width=8)
    params = family.init(jnp.zeros(3))
    keys = jax.random.split(jax.random.key(10), 3)
    result = vijax.fit_batched(keys, family, lambda z: -0.5 * jnp.sum((z - 1.0) ** 2), params,
                               optimizer=optax.adam(1e-2), num_steps=100, progress=False)
    batched = result.params
    assert batched.layers["w_in"].shape == (3,) + params.layers["w_in"].shape
    z = jnp.ones(3)
    lp = jax.vmap(family.log_prob, in_axes=(0, None))(batched, z)
    assert lp.shape == (3,) and np.all(np.isfinite(np.asarray(lp)))
    g = jax.grad(lambda p: family.log_prob(p, z))(params)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)


def test_a_one_dimensional_spline_flow():
    family = flows.autoregressive(transformer="spline", num_layers=2)
    params = family.init(jnp.zeros(()))
    z, log_q = family.sample_and_log_prob(jax.random.key(11), params, 5)
    assert z.shape == (5,) and log_q.shape == (5,)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["affine_coupling", "spline_coupling"])
def test_coupling_on_a_one_dimensional_latent_is_a_clear_error(name):
    family = getattr(vijax.flows, name)()
    with pytest.raises(ValueError, match=r"dimension >= 2.*got d = 1.*autoregressive"):
        family.init(jnp.zeros(1))
    with pytest.raises(ValueError, match="got d = 1"):
        family.init({"s": jnp.zeros(())})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(num_layers=2.5), TypeError, "num_layers"),
        (dict(hidden_width=0), ValueError, "hidden_width"),
        (dict(hidden_layers=-1), ValueError, "hidden_layers"),
        (dict(activation="relu"), TypeError, "activation"),
        (dict(base=vijax.low_rank(rank=1)), TypeError, "square"),
        (dict(base="full_rank"), TypeError, "family"),
        (dict(seed=-1), TypeError, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        vijax.flows.spline_coupling(**kwargs).init(jnp.zeros(3))


def test_bad_spline_and_transformer_arguments():
    with pytest.raises(ValueError, match="bins"):
        vijax.flows.spline_coupling(bins=1)
    with pytest.raises(ValueError, match="bound"):
        vijax.flows.spline_coupling(bound=0.0)
    with pytest.raises(ValueError, match="transformer.*'affine' or 'spline'.*'rqs'"):
        vijax.flows.autoregressive(transformer="rqs")


def test_a_base_whose_dimension_does_not_match_the_layers():
    family = flows.affine_coupling(**SMALL)
    params3 = family.init(jnp.zeros(3))
    params4 = family.init(jnp.zeros(4))
    mixed = params4._replace(base=params3.base)
    with pytest.raises(ValueError, match=r"params.layers\[.*must have shape.*d = 3"):
        family.sample(jax.random.key(0), mixed, 2)
    with pytest.raises(ValueError, match="dimension 4"):
        family.from_gaussian(vijax.Gaussian.diagonal(jnp.zeros(3), jnp.ones(3)), jnp.zeros(4))
    with pytest.raises(TypeError, match="FlowParams"):
        family.sample(jax.random.key(0), params3.base, 2)


def test_a_malformed_sample_and_log_prob_is_named():
    def init(latent):
        return {"loc": jnp.zeros_like(latent)}

    def sample(key, params, n):
        return params["loc"][None, :] + jax.random.normal(key, (n,) + params["loc"].shape)

    def log_prob(params, z):
        return -0.5 * jnp.sum((z - params["loc"]) ** 2)

    with pytest.raises(TypeError, match="sample_and_log_prob"):
        vijax.elbo(jax.random.key(0), {"loc": jnp.zeros(2)},
                   vijax.VariationalFamily(init, sample, log_prob, sample_and_log_prob=3),
                   lambda z: -jnp.sum(z**2), num_samples=2)
    bad = vijax.VariationalFamily(
        init, sample, log_prob,
        sample_and_log_prob=lambda k, p, n: (sample(k, p, n), jnp.zeros((n, 2))))
    with pytest.raises(ValueError, match=r"sample_and_log_prob.*one log density per draw"):
        vijax.elbo(jax.random.key(0), {"loc": jnp.zeros(2)}, bad, lambda z: -jnp.sum(z**2),
                   num_samples=2, estimator="reparam")
