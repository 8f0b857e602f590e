"""Tests of vijax.interop: the NumPyro and TFP adapters against a hand-written density.

The reference is non-centred eight schools written out by hand (scipy for the
values, jax.scipy for the gradients), with the log-Jacobian of tau = exp(z_tau).
"""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy import stats as jstats
from scipy import stats

import vijax
import vijax.interop
from vijax.interop import from_numpyro
from vijax.interop import from_tfp

numpyro = pytest.importorskip("numpyro")
tfp = pytest.importorskip("tensorflow_probability.substrates.jax")
import numpyro.distributions as dist  # noqa: E402

tfd = tfp.distributions

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
SHAPES = {"eta": (8,), "mu": (), "tau": ()}


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", sigma.shape[0]):
        eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * eta)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def tfp_eight_schools():
    f64 = lambda v: jnp.asarray(v, jnp.float64)  # noqa: E731  (TFP takes its dtype from these)
    return tfd.JointDistributionNamed(dict(
        mu=tfd.Normal(f64(0.0), f64(5.0)),
        tau=tfd.HalfCauchy(f64(0.0), f64(5.0)),
        eta=tfd.Sample(tfd.Normal(f64(0.0), f64(1.0)), 8),
        y=lambda mu, tau, eta: tfd.Independent(tfd.Normal(mu + tau * eta, f64(SIGMA)), 1),
    ))


def reference_log_joint(z):
    """The unconstrained log joint of one point, in NumPy float64 with scipy."""
    mu, log_tau, eta = float(z["mu"]), float(z["tau"]), np.asarray(z["eta"], np.float64)
    tau = np.exp(log_tau)
    return (
        stats.norm.logpdf(mu, 0.0, 5.0)
        + stats.halfcauchy.logpdf(tau, scale=5.0)
        + log_tau  # log |d tau / d z_tau|
        + stats.norm.logpdf(eta).sum()
        + stats.norm.logpdf(Y, mu + tau * eta, SIGMA).sum()
    )


def reference_log_joint_jax(z):
    """The same density in jax.scipy, for gradients."""
    tau = jnp.exp(z["tau"])
    half_cauchy = jnp.log(2.0) + jstats.cauchy.logpdf(tau, 0.0, 5.0)
    return (
        jstats.norm.logpdf(z["mu"], 0.0, 5.0) + half_cauchy + z["tau"]
        + jstats.norm.logpdf(z["eta"]).sum()
        + jstats.norm.logpdf(jnp.asarray(Y), z["mu"] + tau * z["eta"], jnp.asarray(SIGMA)).sum()
    )


def random_points(rng, n):
    """``n`` unconstrained points, stacked on a leading axis (float64 under x64)."""
    return {
        "eta": jnp.asarray(rng.normal(size=(n, 8))),
        "mu": jnp.asarray(rng.normal(0.0, 5.0, size=n)),
        "tau": jnp.asarray(rng.normal(0.0, 1.5, size=n)),
    }


def check_against_reference(model, rng):
    """log_joint (jit of vmap) and its gradient match the references in float64."""
    points = random_points(rng, 4)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(model.log_joint)))(points)
    want = [reference_log_joint({k: v[i] for k, v in points.items()}) for i in range(4)]
    np.testing.assert_allclose(values, want, rtol=1e-10)
    want_grads = jax.jit(jax.vmap(jax.grad(reference_log_joint_jax)))(points)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-9, atol=1e-12)


def check_constrain(model, rng, deterministic):
    draws = random_points(rng, 5)
    out = model.constrain(draws)
    assert set(out) == set(SHAPES) | ({"theta"} if deterministic else set())
    np.testing.assert_allclose(out["tau"], np.exp(draws["tau"]), rtol=1e-12)
    np.testing.assert_allclose(out["mu"], draws["mu"], rtol=1e-12)
    np.testing.assert_allclose(out["eta"], draws["eta"], rtol=1e-12)
    if deterministic:
        chex.assert_shape(out["theta"], (5, 8))
        theta = np.asarray(draws["mu"])[:, None] + np.exp(draws["tau"])[:, None] * draws["eta"]
        np.testing.assert_allclose(out["theta"], theta, rtol=1e-12)


def check_latent(model, dtype):
    assert {k: v.shape for k, v in model.latent.items()} == SHAPES
    for leaf in model.latent.values():
        assert leaf.dtype == dtype
        np.testing.assert_array_equal(leaf, 0.0)


# --- NumPyro ---------------------------------------------------------------------


def test_numpyro_eight_schools_matches_hand_written_density(x64, rng):
    model = from_numpyro(eight_schools, SIGMA, y=Y)
    assert model.name == "eight_schools"
    assert model.is_constrained
    check_latent(model, jnp.float64)
    check_against_reference(model, rng)
    check_constrain(model, rng, deterministic=True)


def test_numpyro_float32_follows_default_dtype():
    model = from_numpyro(eight_schools, SIGMA, y=Y)
    check_latent(model, jnp.float32)

    # The data may be traced: a model built inside jit (or vmap over data sets).
    @jax.jit
    def log_joint(y, z):
        return from_numpyro(eight_schools, SIGMA, y=y).log_joint(z)

    value = log_joint(Y, model.latent)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, reference_log_joint(model.latent), rtol=1e-5)


def test_numpyro_log_joint_rejects_wrong_keys():
    model = from_numpyro(eight_schools, SIGMA, y=Y)
    with pytest.raises(ValueError, match="latent sites"):
        model.log_joint({"mu": 0.0, "tau": 0.0})


def test_fit_through_numpyro_adapter():
    model = from_numpyro(eight_schools, SIGMA, y=Y)
    family = vijax.mean_field()
    result = vijax.fit(
        jax.random.key(0), family, model.log_joint, family.init(model.latent),
        optimizer=optax.adam(1e-2), num_steps=200, progress=False,
    )
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result.params))
    elbo = np.asarray(result.trace.elbo)
    assert elbo.shape == (200,) and np.all(np.isfinite(elbo))
    # Starting at z = 0 (tau = 1, mu = 0), the fit climbs: a run that did nothing fails.
    assert elbo[-50:].mean() > elbo[:50].mean()
    draws = jax.jit(lambda key, params: model.constrain(family.sample(key, params, 10)))(
        jax.random.key(1), result.params
    )
    chex.assert_shape(draws["theta"], (10, 8))
    assert bool(jnp.all(draws["tau"] > 0))


def _discrete(sigma, y=None):
    numpyro.sample("k", dist.Bernoulli(0.3))
    eight_schools(sigma, y)


def _all_observed(y):
    numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def _subsampled(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", y.shape[0], subsample_size=2):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[:2])


@pytest.mark.parametrize(
    "model, args, words",
    [
        (_discrete, (SIGMA, Y), ["'k'", "marginaliz", "enumerat"]),
        (_all_observed, (Y,), ["no latent"]),
        (_subsampled, (Y,), ["'data'", "subsample"]),
    ],
    ids=["discrete", "no_latent", "subsampled"],
)
def test_numpyro_model_errors(model, args, words):
    with pytest.raises(ValueError) as info:
        from_numpyro(model, *args)
    message = str(info.value).lower()
    for word in words:
        assert word in message


def test_numpyro_not_callable():
    with pytest.raises(TypeError, match="callable"):
        from_numpyro({"mu": 0.0})


def test_missing_numpyro_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpyro", None)
    with pytest.raises(ImportError, match=r'pip install "vijax\[numpyro\]"'):
        from_numpyro(eight_schools, SIGMA, y=Y)


# --- TFP -------------------------------------------------------------------------


def test_tfp_eight_schools_matches_hand_written_density(x64, rng):
    model = from_tfp(tfp_eight_schools(), y=jnp.asarray(Y))
    assert model.name == "JointDistributionNamed"
    check_latent(model, jnp.float64)
    check_against_reference(model, rng)
    check_constrain(model, rng, deterministic=False)


# Pinning draws from the distribution; TFP's Bernoulli sampler trips a jax deprecation.
@pytest.mark.filterwarnings("ignore:shape requires ndarray:DeprecationWarning")
def test_tfp_errors():
    with pytest.raises(TypeError, match="JointDistribution"):
        from_tfp(tfd.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="JointDistribution"):
        from_tfp(eight_schools)
    root = tfd.JointDistributionCoroutine.Root

    def coin():
        yield root(tfd.Bernoulli(probs=0.3, name="k"))
        yield root(tfd.Normal(0.0, 1.0, name="x"))

    with pytest.raises(ValueError, match="discrete latent part.*'k'"):
        from_tfp(tfd.JointDistributionCoroutine(coin), x=0.5)
    jd = tfd.JointDistributionNamed(dict(a=tfd.Normal(0.0, 1.0)))
    with pytest.raises(ValueError, match="'b'"):
        from_tfp(jd, b=1.0)
    with pytest.raises(ValueError, match="no latent parts"):
        from_tfp(jd, a=1.0)
    batched = tfd.JointDistributionSequential([
        tfd.Normal(0.0, 1.0), lambda a: tfd.Normal(a * jnp.ones(3), 1.0)])
    with pytest.raises(ValueError, match="Independent"):
        from_tfp(batched)


def test_missing_tfp_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_probability.substrates.jax", None)
    with pytest.raises(ImportError, match=r'pip install "vijax\[tfp\]"'):
        from_tfp(tfd.JointDistributionNamed(dict(a=tfd.Normal(0.0, 1.0))))


def test_interop_does_not_import_peers():
    code = (
        "import sys, vijax, vijax.interop; "
        "peers = [m for m in sys.modules if m.split('.')[0] in "
        "('numpyro', 'tensorflow_probability')]; "
        "assert not peers, peers"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
