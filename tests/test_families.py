"""Tests for vijax.families: mean_field, full_rank, low_rank over pytree latents."""

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

import vijax
from references import np_moments, perturb

FAMILIES = {
    "mean_field": lambda s=0.1: vijax.mean_field(init_scale=s),
    "full_rank": lambda s=0.1: vijax.full_rank(init_scale=s),
    "low_rank": lambda s=0.1: vijax.low_rank(rank=2, init_scale=s),
    "low_rank_precision": lambda s=0.1: vijax.low_rank_precision(rank=2, init_scale=s),
}
NAMES = tuple(FAMILIES)


def dict_latent(dtype=np.float64):
    return {
        "a": np.arange(6.0, dtype=dtype).reshape(2, 3) / 10,
        "b": np.asarray(0.5, dtype),
        "c": np.linspace(-1, 1, 4).astype(dtype),
    }


# -------------------------------------------------------------------- init
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "latent,d",
    [(np.linspace(0.0, 1.0, 5), 5), (np.asarray(1.5), 1), (dict_latent(), 11)],
    ids=["array", "scalar", "dict"],
)
def test_init_over_pytrees(x64, name, latent, d):
    if name.startswith("low_rank") and d < 2:
        family = getattr(vijax, name)(rank=1)
    else:
        family = FAMILIES[name]()
    params = family.init(latent)
    assert jax.tree_util.tree_structure(params.loc) == jax.tree_util.tree_structure(latent)
    chex.assert_trees_all_close(params.loc, jax.tree_util.tree_map(jnp.asarray, latent))
    chex.assert_shape(params.raw_scale, (d,))
    q = family.to_gaussian(params)
    assert q.dim == d
    np.testing.assert_allclose(q.mean, ravel_pytree(latent)[0], rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_init_under_jit_and_vmap_and_in_half_precision(x64, name):
    family = FAMILIES[name]()
    latent = jax.tree_util.tree_map(jnp.asarray, dict_latent())
    eager = family.init(latent)
    chex.assert_trees_all_equal(jax.jit(family.init)(latent), eager)
    batched = jax.vmap(family.init)(jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), latent))
    chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda a: a[1], batched), eager)
    for dtype in (jnp.float16, jnp.bfloat16):
        params = family.init(dict_latent(dtype))
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(dtype)}
        # The covariance in float32: XLA's CPU LAPACK (the precision family's
        # capacitance Cholesky) has no half-precision kernels.
        wide = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
        scale = np.asarray(family.to_gaussian(wide).cov, np.float64).diagonal() ** 0.5
        np.testing.assert_allclose(scale, 0.1, rtol=1e-2)


@pytest.mark.slow
def test_building_a_model_and_init_compile_nothing():
    # In a fresh process each eager jnp op compiles a small XLA program
    # (5 to 20 ms each); building a model and its initial parameters should
    # not pay that. The final eager op checks that the counter counts.
    code = (
        "import jax, numpy as np\n"
        "events = []\n"
        "jax.monitoring.register_event_duration_secs_listener(\n"
        "    lambda name, secs, **kw: events.append(name) if 'backend_compile' in name else None)\n"
        "import vijax\n"
        "x = jax.device_put(np.ones((50, 4), np.float32))\n"
        "y = jax.device_put(np.ones(50, np.float32))\n"
        "model = vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=2.0)\n"
        "for family in (vijax.mean_field(), vijax.full_rank(), vijax.low_rank(rank=2)):\n"
        "    family.init(model.latent)\n"
        "print(len(events))\n"
        "jax.numpy.square(x)\n"
        "print(len(events))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1"]


@pytest.mark.parametrize("name", NAMES)
def test_init_params_do_not_share_buffers_with_the_latent(name):
    # Donating the parameters to a jitted step must leave the latent alive.
    family = FAMILIES[name]()
    latent = {"a": jnp.zeros(3), "b": jnp.ones(())}
    params = family.init(latent)
    assert params.loc["a"] is not latent["a"] and params.loc["b"] is not latent["b"]
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x + 1, p), donate_argnums=0)
    for _ in range(2):
        params = step(params)
    np.testing.assert_array_equal(latent["a"], np.zeros(3))
    np.testing.assert_array_equal(latent["b"], 1.0)
    np.testing.assert_array_equal(params.loc["a"], np.full(3, 2.0))


@pytest.mark.parametrize(
    "make", [lambda s: vijax.mean_field(init_scale=s), lambda s: vijax.full_rank(init_scale=s),
             lambda s: vijax.low_rank(rank=2, init_scale=s),
             lambda s: vijax.low_rank(rank=5, init_scale=s),
             lambda s: vijax.low_rank_precision(rank=2, init_scale=s),
             lambda s: vijax.low_rank_precision(rank=5, init_scale=s)],
    ids=["mean_field", "full_rank", "low_rank2", "low_rank_d", "low_rank_precision2",
         "low_rank_precision_d"],
)
def test_initial_covariance_is_init_scale_squared_identity(x64, make):
    family = make(0.37)
    params = family.init(np.zeros(5))
    cov = np.asarray(family.to_gaussian(params).cov)
    if family.name != "low_rank":
        np.testing.assert_allclose(cov, 0.37**2 * np.eye(5), rtol=1e-10, atol=1e-14)
        return
    # low_rank: the marginal sds are init_scale, the correlations at most 0.01,
    # and the factor is spread over every coordinate (not on the first axes).
    np.testing.assert_allclose(np.diagonal(cov), 0.37**2, rtol=1e-10)
    off = cov - np.diag(np.diagonal(cov))
    assert np.max(np.abs(off)) <= 0.01 * 0.37**2 + 1e-15
    assert np.all(np.abs(np.asarray(params.cov_factor)) > 0)
    np.testing.assert_array_equal(params.cov_factor, family.init(np.zeros(5)).cov_factor)


def test_low_rank_initial_factor_has_independent_columns():
    """Every (d, rank) up to 20: a factor with dependent columns would keep them (see low_rank)."""
    for rank in range(1, 11):
        family = vijax.low_rank(rank=rank)
        for d in range(rank, 21):
            w = np.asarray(family.init(np.zeros(d)).cov_factor, np.float64)
            assert np.linalg.matrix_rank(w) == rank, (d, rank)


# ------------------------------------------------------- sampling and density
@pytest.mark.parametrize("name", NAMES)
def test_sample_shapes(name):
    family = FAMILIES[name]()
    params = family.init(dict_latent(np.float32))
    z = family.sample(jax.random.key(0), params, 7)
    assert jax.tree_util.tree_structure(z) == jax.tree_util.tree_structure(params.loc)
    chex.assert_shape(z["a"], (7, 2, 3))
    chex.assert_shape(z["b"], (7,))
    chex.assert_shape(z["c"], (7, 4))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_log_prob_and_entropy_match_scipy(x64, rng, name):
    family = FAMILIES[name]()
    params = perturb(family.init(dict_latent()), rng)
    mean, cov = np_moments(name, params)
    z = family.sample(jax.random.key(1), params, 6)
    flat = np.stack([np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], z))[0])
                     for i in range(6)])
    want = stats.multivariate_normal(mean, cov).logpdf(flat)
    got = jax.vmap(lambda zi: family.log_prob(params, zi))(z)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(
        family.entropy(params), stats.multivariate_normal(mean, cov).entropy(), rtol=1e-10
    )
    np.testing.assert_allclose(family.to_gaussian(params).cov, cov, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_sample_covariance_matches_to_gaussian(x64, rng, name):
    family = FAMILIES[name]()
    params = perturb(family.init(np.zeros(3)), rng)
    mean, cov = np_moments(name, params)
    n = 40_000
    z = np.asarray(family.sample(jax.random.key(2), params, n))
    assert np.all(np.abs(z.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
    r = z - mean
    prods = r[:, :, None] * r[:, None, :]
    se = prods.std(0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(prods.mean(0) - cov) < 5 * se)


@pytest.mark.parametrize("name", NAMES)
def test_every_real_param_value_is_valid(dtype, rng, name):
    family = FAMILIES[name]()
    base = family.init(np.zeros(6, dtype))
    for _ in range(5):
        params = perturb(base, rng, scale=3.0)
        z = family.sample(jax.random.key(0), params, 4)
        lp = jax.vmap(lambda zi: family.log_prob(params, zi))(z)
        assert np.all(np.isfinite(np.asarray(lp)))
        assert np.isfinite(float(family.entropy(params)))


@pytest.mark.parametrize("name", NAMES)
def test_dtype_is_kept(dtype, name):
    family = FAMILIES[name]()
    params = family.init(dict_latent(dtype))
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == dtype
    z = family.sample(jax.random.key(0), params, 3)
    for leaf in jax.tree_util.tree_leaves(z):
        assert leaf.dtype == dtype
    one = jax.tree_util.tree_map(lambda a: a[0], z)
    assert family.log_prob(params, one).dtype == dtype
    assert family.entropy(params).dtype == dtype
    assert family.to_gaussian(params).cov.dtype == dtype


# ---------------------------------------------------------- transformations
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_grad(x64, rng, name):
    family = FAMILIES[name]()
    params = perturb(family.init(dict_latent()), rng)
    z = family.sample(jax.random.key(3), params, 5)
    one = jax.tree_util.tree_map(lambda a: a[0], z)

    eager = jax.vmap(lambda zi: family.log_prob(params, zi))(z)
    jitted = jax.jit(jax.vmap(family.log_prob, in_axes=(None, 0)))(params, z)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)
    z_jit = jax.jit(family.sample, static_argnums=2)(jax.random.key(3), params, 5)
    chex.assert_trees_all_close(z_jit, z, rtol=1e-12)

    # grad of log_prob and entropy against central finite differences in a random direction.
    flat, unravel = ravel_pytree(params)
    direction = rng.normal(size=flat.shape)
    h = 1e-6
    for fn in (lambda p: family.log_prob(p, one), family.entropy):
        g = ravel_pytree(jax.grad(fn)(params))[0]
        fd = (fn(unravel(flat + h * direction)) - fn(unravel(flat - h * direction))) / (2 * h)
        np.testing.assert_allclose(g @ direction, fd, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_sample_is_reparameterized(x64, rng, name):
    family = FAMILIES[name]()
    params = perturb(family.init(dict_latent()), rng)
    key = jax.random.key(4)

    def total(p):
        z = family.sample(key, p, 3)
        return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(z))

    g = jax.grad(total)(params)
    # Each sample is loc + (noise independent of loc): d/d loc of the sum is 3 everywhere.
    chex.assert_trees_all_close(g.loc, jax.tree_util.tree_map(lambda a: 3.0 * jnp.ones_like(a),
                                                              params.loc))
    assert float(jnp.sum(jnp.abs(g.raw_scale))) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_params_are_optax_updatable(name):
    family = FAMILIES[name]()
    params = family.init(dict_latent(np.float32))
    z0 = jax.tree_util.tree_map(jnp.zeros_like, params.loc)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    grads = jax.grad(lambda p: -family.log_prob(p, z0) - family.entropy(p))(params)
    updates, state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert type(new) is type(params)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    assert not np.allclose(np.asarray(new.raw_scale), np.asarray(params.raw_scale))
    assert np.isfinite(float(family.log_prob(new, z0)))


@pytest.mark.slow
def test_large_structured_families_stay_linear():
    # d = 100_000: a dense d x d factor would need 40 GB, so these run only if the
    # mean-field and low-rank paths never form one.
    d = 100_000
    for family in (vijax.mean_field(), vijax.low_rank(rank=2),
                   vijax.low_rank_precision(rank=2)):
        params = family.init(jnp.zeros(d))
        z = family.sample(jax.random.key(0), params, 2)
        chex.assert_shape(z, (2, d))
        assert np.isfinite(float(jax.jit(family.log_prob)(params, z[0])))
        assert np.isfinite(float(family.entropy(params)))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("make", [vijax.low_rank, vijax.low_rank_precision])
def test_low_rank_rank_errors(make):
    with pytest.raises(ValueError, match=re.escape("`rank` must be an int >= 1; got 0")):
        make(rank=0)
    with pytest.raises(ValueError, match="`rank`"):
        make(rank=-2)
    with pytest.raises(TypeError, match="`rank` must be an int"):
        make(rank=2.0)
    family = make(rank=4)
    with pytest.raises(ValueError, match=re.escape("d = 3; got rank = 4")):
        family.init(jnp.zeros(3))
    make(rank=3).init(jnp.zeros(3))  # rank == d is allowed


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_and_sample_argument_errors(name):
    family = FAMILIES[name]()
    params = family.init({"a": jnp.zeros(3), "b": jnp.zeros(())})
    with pytest.raises(ValueError, match="`z` must flatten to shape"):
        family.log_prob(params, {"a": jnp.zeros((2, 3)), "b": jnp.zeros((2,))})
    with pytest.raises(ValueError, match="`z` must have the latent's structure"):
        family.log_prob(params, jnp.zeros(4))
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 1; got 0"):
        family.sample(jax.random.key(0), params, 0)
    other = next(FAMILIES[n] for n in NAMES if n != name)().init(jnp.zeros(4))
    with pytest.raises(TypeError, match="`params` must be"):
        family.entropy(other)


# --------------------------------------------------------------- from_gaussian
@pytest.mark.parametrize("make", [vijax.mean_field, vijax.full_rank, lambda: vijax.low_rank(rank=2),
                                  lambda: vijax.low_rank_precision(rank=2)])
def test_from_gaussian_inverts_to_gaussian(x64, make):
    family = make()
    latent = {"a": jnp.zeros(3), "b": jnp.zeros(())}
    params = perturb(family.init(latent), np.random.default_rng(0), scale=0.3)
    back = family.from_gaussian(family.to_gaussian(params), latent)
    q1, q2 = family.to_gaussian(params), family.to_gaussian(back)
    np.testing.assert_allclose(q2.mean, q1.mean, rtol=1e-12)
    np.testing.assert_allclose(q2.cov, q1.cov, rtol=1e-10, atol=1e-12)
    assert jax.tree_util.tree_structure(back.loc) == jax.tree_util.tree_structure(latent)


def test_full_rank_from_gaussian_lands_on_the_posterior(x64, rng):
    x = rng.standard_normal((30, 4))
    model = vijax.models.bayesian_linear_regression(
        x, x @ np.arange(1.0, 5.0), noise_scale=0.5, prior_scale=1.0)
    family = vijax.full_rank()
    params = family.from_gaussian(model.posterior, model.latent)  # a precision-form Gaussian
    assert float(vijax.exact_kl(params, family, model)) < 1e-10
    np.testing.assert_allclose(family.to_gaussian(params).cov, model.posterior.cov, rtol=1e-10)


def test_from_gaussian_rejects_other_structures():
    g = vijax.Gaussian.from_cov(jnp.zeros(3), jnp.eye(3))
    with pytest.raises(ValueError, match="DiagonalScale"):
        vijax.mean_field().from_gaussian(g, jnp.zeros(3))
    with pytest.raises(ValueError, match="rank 2"):
        vijax.low_rank(rank=2).from_gaussian(g, jnp.zeros(3))
    with pytest.raises(ValueError, match="LowRankPrecisionScale of rank 2"):
        vijax.low_rank_precision(rank=2).from_gaussian(g, jnp.zeros(3))
    lrp = vijax.Gaussian.low_rank_precision(jnp.zeros(3), jnp.ones((3, 1)), jnp.ones(3))
    with pytest.raises(ValueError, match="LowRankPrecisionScale of rank 2"):
        vijax.low_rank_precision(rank=2).from_gaussian(lrp, jnp.zeros(3))
    with pytest.raises(ValueError, match="dimension 4"):
        vijax.full_rank().from_gaussian(g, jnp.zeros(4))
    with pytest.raises(TypeError, match="gaussian"):
        vijax.full_rank().from_gaussian(jnp.eye(3), jnp.zeros(3))
