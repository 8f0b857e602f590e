"""vijax.models.constrained: a natural-space log density plus bijectors -> an unconstrained model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import vijax
from vijax import bijectors

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def _schools(dtype=np.float32):
    y, sigma = jnp.asarray(Y, dtype), jnp.asarray(SIGMA, dtype)

    def log_density(v):
        st = jax.scipy.stats
        theta = v["mu"] + v["tau"] * v["eta"]
        return (st.norm.logpdf(v["mu"], 0.0, 5.0) + st.cauchy.logpdf(v["tau"], 0.0, 5.0)
                + jnp.log(2.0) + st.norm.logpdf(v["eta"]).sum()
                + st.norm.logpdf(y, theta, sigma).sum())

    return vijax.models.constrained(
        log_density,
        {"mu": None, "tau": bijectors.exp(), "eta": None},
        {"mu": jnp.zeros((), dtype), "tau": jnp.ones((), dtype), "eta": jnp.zeros(8, dtype)},
        deterministic=lambda v: {"theta": v["mu"] + v["tau"] * v["eta"]},
        name="schools",
    )


def _scipy_log_joint(z):
    # Independent: SciPy densities on the natural space plus log |d tau / d z| = z_tau.
    mu, tau, eta = float(z["mu"]), float(np.exp(z["tau"])), np.asarray(z["eta"], float)
    return (scipy.stats.norm.logpdf(mu, 0, 5) + scipy.stats.halfcauchy.logpdf(tau, 0, 5)
            + scipy.stats.norm.logpdf(eta).sum()
            + scipy.stats.norm.logpdf(Y, mu + tau * eta, SIGMA).sum() + float(z["tau"]))


def test_log_joint_is_the_change_of_variables(x64, rng):
    model = _schools(np.float64)
    assert set(model.latent) == {"mu", "tau", "eta"}
    assert float(model.latent["tau"]) == 0.0  # log of the example scale 1.0
    for _ in range(3):
        z = {"mu": rng.normal(), "tau": rng.normal(), "eta": rng.normal(size=8)}
        got = float(model.log_joint(jax.tree_util.tree_map(jnp.asarray, z)))
        assert got == pytest.approx(_scipy_log_joint(z), abs=1e-10)


def test_constrain_maps_batches_and_adds_deterministic_quantities(rng):
    model = _schools()
    z = {"mu": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
         "tau": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
         "eta": jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)}
    v = model.constrain(z)
    assert set(v) == {"mu", "tau", "eta", "theta"}
    assert v["theta"].shape == (2, 3, 8) and v["tau"].shape == (2, 3)
    np.testing.assert_allclose(v["tau"], np.exp(z["tau"]), rtol=1e-6)
    np.testing.assert_allclose(
        v["theta"], z["mu"][..., None] + np.exp(z["tau"])[..., None] * z["eta"], rtol=1e-5)
    one = model.constrain(jax.tree_util.tree_map(lambda x: x[0, 0], z))
    np.testing.assert_allclose(one["theta"], v["theta"][0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"z\['eta'\]"):
        model.constrain({**z, "eta": z["eta"][..., :7]})


def test_a_fit_on_the_unconstrained_space_works_under_jit_and_grad():
    model = _schools()
    assert model.log_joint(model.latent).dtype == jnp.float32
    g = jax.jit(jax.grad(model.log_joint))(model.latent)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))
    family = vijax.mean_field()
    result = vijax.fit(jax.random.key(0), family, model.log_joint, family.init(model.latent),
                       optimizer=optax.adam(0.05), num_steps=300, progress=False)
    s = vijax.summary(jax.random.key(1), result, family, model, num_samples=2000)
    assert s.row("tau")["q5"] > 0  # every draw of tau is positive


def test_unconstrained_models_have_the_identity():
    model = vijax.models.logistic_regression(np.ones((4, 2), np.float32), np.zeros(4, np.float32))
    assert not model.is_constrained
    z = jnp.ones((3, 2))
    assert model.constrain(z) is z


def test_errors_name_the_argument():
    ok = dict(log_density=lambda v: v["a"], bijectors={"a": bijectors.exp()}, latent={"a": 1.0})
    with pytest.raises(ValueError, match="`bijectors` must have the latent's structure"):
        vijax.models.constrained(**{**ok, "bijectors": {"b": bijectors.exp()}})
    with pytest.raises(TypeError, match=r"`bijectors\['a'\]` must be a vijax.bijectors.Bijector"):
        vijax.models.constrained(**{**ok, "bijectors": {"a": jnp.exp}})
    with pytest.raises(ValueError, match=r"`latent\['a'\]` lies outside its bijector's support"):
        vijax.models.constrained(**{**ok, "latent": {"a": -1.0}})
    with pytest.raises(TypeError, match="`log_density` must be a callable"):
        vijax.models.constrained(**{**ok, "log_density": 3.0})
    with pytest.raises(TypeError, match="`deterministic` needs a dict latent"):
        vijax.models.constrained(lambda a: a, bijectors.exp(), 1.0, deterministic=lambda v: {})


@pytest.mark.parametrize("bijector, value", [
    (bijectors.exp(), 0.0),
    (bijectors.softplus(), 0.0),
    (bijectors.lower_bounded(-1.5), -1.5),
    (bijectors.upper_bounded(2.0), 2.0),
    (bijectors.interval(-1.0, 3.0), 3.0),
    (bijectors.ordered(), [0.0, 0.0, 1.0]),
    (bijectors.simplex(), [0.0, 0.5, 0.5]),
    (bijectors.corr_cholesky(), [[1.0, 0.0], [1.0, 0.0]]),
    (bijectors.lower_cholesky(), [[1.0, 0.0], [0.5, 0.0]]),
])
def test_an_example_latent_on_its_supports_boundary_is_refused(bijector, value):
    """``inverse`` reads a boundary value as the nearest float inside (round trips of
    saturated draws); as the fit's starting mean that is a start far out (a scale of
    0: log 0 read as about -87), so ``constrained`` refuses it by name."""
    value = jnp.asarray(value, jnp.float32)
    assert bool(np.all(np.isfinite(np.asarray(bijector.inverse(value)))))
    with pytest.raises(ValueError, match=r"`latent\['w'\]` lies on the boundary"):
        vijax.models.constrained(lambda v: 0.0 * jnp.sum(v["w"]), {"w": bijector},
                                 {"w": value})
    # Inside the support: accepted.
    inside = {"exp": 1.0, "softplus": 1.0, "lower_bounded": 0.0, "upper_bounded": 0.0,
              "interval": 1.0, "ordered": [0.0, 0.5, 1.0], "simplex": [0.2, 0.3, 0.5],
              "corr_cholesky": [[1.0, 0.0], [0.6, 0.8]],
              "lower_cholesky": [[1.0, 0.0], [0.5, 1.0]]}[bijector.name]
    vijax.models.constrained(lambda v: 0.0 * jnp.sum(v["w"]), {"w": bijector},
                             {"w": jnp.asarray(inside, jnp.float32)})
