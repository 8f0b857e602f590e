"""Bad input raises a clear error, naming the argument, before any work starts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax
from vijax import models

F32 = np.float32


def lg_args(n=5, d=3):
    return dict(
        prior_mean=np.zeros(d, F32),
        prior_cov=np.eye(d, dtype=F32),
        design=np.ones((n, d), F32),
        observations=np.zeros(n, F32),
        noise_cov=np.eye(n, dtype=F32),
    )


def raises(exc, *fragments):
    """pytest.raises matching every fragment literally, in order."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


# ------------------------------------------------------------ linear_gaussian
@pytest.mark.parametrize(
    "change,exc,fragments",
    [
        (dict(design=np.ones((5, 4), F32)), ValueError, ("`design`", "(5, 3)", "(5, 4)")),
        (dict(observations=np.zeros(4, F32)), ValueError, ("`design`", "(4, 3)", "(5, 3)")),
        (dict(prior_mean=np.zeros(2, F32)), ValueError, ("`prior_cov`", "(2, 2)", "(3, 3)")),
        (dict(prior_mean=np.zeros((3, 1), F32)), ValueError, ("`prior_mean`", "1 dimension",
                                                             "(3, 1)")),
        (dict(observations=np.zeros((5, 1), F32)), ValueError, ("`observations`", "(5, 1)")),
        (dict(noise_cov=np.eye(4, dtype=F32)), ValueError, ("`noise_cov`", "(5, 5)", "(4, 4)")),
        (dict(prior_cov=np.ones((3, 2), F32)), ValueError, ("`prior_cov`", "square", "(3, 2)")),
        (dict(noise_cov=np.ones(5, F32)), ValueError, ("`noise_cov`", "square", "(5,)")),
        (dict(prior_cov=np.triu(np.ones((3, 3), F32)) + np.eye(3, dtype=F32)), ValueError,
         ("`prior_cov` must be symmetric",)),
        (dict(noise_cov=np.diag(np.array([1, 1, -2, 1, 1], F32))), ValueError,
         ("`noise_cov` must be positive definite", "-2")),
        (dict(prior_cov=np.ones((3, 3), F32)), ValueError, ("`prior_cov` must be positive definite",)),
        (dict(observations=np.zeros(5, np.int32)), TypeError, ("`observations`", "int32")),
        (dict(design=np.ones((5, 3), np.int64)), TypeError, ("`design`", "int64")),
        (dict(prior_mean=np.zeros(3, bool)), TypeError, ("`prior_mean`", "bool")),
    ],
)
def test_linear_gaussian_errors(change, exc, fragments):
    with raises(exc, *fragments):
        models.linear_gaussian(**{**lg_args(), **change})


def test_linear_gaussian_shape_errors_raise_under_jit():
    # Static checks run at trace time, before any computation.
    args = lg_args()

    @jax.jit
    def build(design):
        return models.linear_gaussian(**{**args, "design": design}).log_evidence

    with raises(ValueError, "`design`", "(5, 3)", "(5, 2)"):
        build(jnp.ones((5, 2)))


# ----------------------------------------------------- bayesian_linear_regression
X = np.ones((6, 2), F32)
Y = np.zeros(6, F32)


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(X=np.ones((6, 2), np.int32)), TypeError, ("`X`", "int32")),
        (dict(y=np.zeros(6, np.int64)), TypeError, ("`y`", "int64")),
        (dict(y=[0, 1, 0, 1, 0, 1]), TypeError, ("`y`", "int")),
        (dict(y=np.zeros(5, F32)), ValueError, ("`y`", "(6,)", "(5,)")),
        (dict(X=np.ones(6, F32)), ValueError, ("`X`", "2 dimension", "(6,)")),
        (dict(noise_scale=0.0), ValueError, ("`noise_scale` must be positive", "0.0")),
        (dict(noise_scale=-1.0), ValueError, ("`noise_scale` must be positive", "-1.0")),
        (dict(prior_scale=0.0), ValueError, ("`prior_scale` must be positive", "0.0")),
        (dict(prior_scale=float("nan")), ValueError, ("`prior_scale` must be positive",)),
        (dict(noise_scale=np.ones(2, F32)), ValueError, ("`noise_scale` must be a scalar", "(2,)")),
        (dict(noise_scale=True), TypeError, ("`noise_scale`", "bool")),
    ],
)
def test_blr_errors(kwargs, exc, fragments):
    args = dict(X=X, y=Y, noise_scale=1.0, prior_scale=1.0)
    args.update(kwargs)
    x, y = args.pop("X"), args.pop("y")
    with raises(exc, *fragments):
        models.bayesian_linear_regression(x, y, **args)


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(x=np.arange(4)), TypeError, ("`x`", "int")),
        (dict(x=np.zeros((4, 1), F32)), ValueError, ("`x`", "1 dimension", "(4, 1)")),
        (dict(noise_scale=-0.5), ValueError, ("`noise_scale` must be positive", "-0.5")),
        (dict(prior_scale=0), ValueError, ("`prior_scale` must be positive", "0")),
        (dict(prior_loc=np.zeros(2, F32)), ValueError, ("`prior_loc` must be a scalar", "(2,)")),
    ],
)
def test_normal_mean_errors(kwargs, exc, fragments):
    args = dict(x=np.zeros(4, F32), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
    args.update(kwargs)
    x = args.pop("x")
    with raises(exc, *fragments):
        models.normal_mean(x, **args)


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(y=np.array([0, 1, 1, 0, 1, 0], np.complex64)), TypeError, ("`y`", "complex64")),
        (dict(y=np.array([0, 1, 2, 0, 1, 0], np.int32)), ValueError, ("`y`", "got 2")),
        (dict(y=np.array([0, 1, 2, 0, 1, 0], F32)), ValueError, ("`y`", "0.0 or 1.0")),
        (dict(y=np.zeros(4, F32)), ValueError, ("`y`", "(6,)", "(4,)")),
        (dict(prior_scale=-1.0), ValueError, ("`prior_scale` must be positive", "-1.0")),
        (dict(X=np.ones((6, 2), np.int32)), TypeError, ("`X`", "int32")),
    ],
)
def test_logistic_regression_errors(kwargs, exc, fragments):
    args = dict(X=X, y=Y, prior_scale=1.0)
    args.update(kwargs)
    x, y = args.pop("X"), args.pop("y")
    with raises(exc, *fragments):
        models.logistic_regression(x, y, **args)


def test_models_reject_data_of_mixed_dtypes(x64):
    # float32 X with float64 y would silently promote everything to float64.
    x32, y64 = np.ones((6, 2), F32), np.zeros(6, np.float64)
    with raises(TypeError, "one floating dtype", "`X` is float32", "`y` is float64"):
        models.bayesian_linear_regression(x32, y64, noise_scale=1.0, prior_scale=1.0)
    with raises(TypeError, "one floating dtype", "`X` is float32", "`y` is float64"):
        models.logistic_regression(x32, y64)
    with raises(TypeError, "one floating dtype", "`observations` is float64"):
        models.linear_gaussian(**{**lg_args(n=6, d=2), "observations": y64})
    # One dtype throughout is accepted, in either precision.
    for dtype in (F32, np.float64):
        model = models.bayesian_linear_regression(
            x32.astype(dtype), y64.astype(dtype), noise_scale=1.0, prior_scale=1.0
        )
        assert model.log_joint(np.zeros(2, dtype)).dtype == dtype


def _non_finite_cases():
    x, y = np.ones((6, 2), F32), np.zeros(6, F32)
    blr = lambda **kw: models.bayesian_linear_regression(
        **{"X": x, "y": y, **kw}, noise_scale=1.0, prior_scale=1.0)
    logistic = lambda **kw: models.logistic_regression(**{"X": x, "y": y, **kw})
    nm = lambda **kw: models.normal_mean(
        **{"x": y, "prior_loc": 0.0, **kw}, noise_scale=1.0, prior_scale=1.0)
    lg = lambda **kw: models.linear_gaussian(**{**lg_args(), **kw})
    for bad in (np.nan, np.inf):
        yield blr, "X", x, bad
        yield blr, "y", y, bad
        yield logistic, "X", x, bad
        yield nm, "x", y, bad
        yield nm, "prior_loc", np.float32(0.0), bad
        for name, value in lg_args().items():
            yield lg, name, value, bad


@pytest.mark.parametrize("build, name, value, bad", list(_non_finite_cases()))
def test_models_reject_non_finite_data(build, name, value, bad):
    # NaN or inf data would come back as a NaN log evidence, silently.
    value = np.array(value, copy=True)
    value.reshape(-1)[-1] = bad
    with raises(ValueError, f"`{name}` must be finite", "1 NaN" if np.isnan(bad) else "1 infinite"):
        build(**{name: value})


# ----------------------------------------------------------------- families
FAMILY_MAKERS = {
    "mean_field": vijax.mean_field,
    "full_rank": vijax.full_rank,
    "low_rank": lambda **kw: vijax.low_rank(rank=1, **kw),
}


@pytest.mark.parametrize("name", FAMILY_MAKERS)
@pytest.mark.parametrize(
    "init_scale,exc,fragments",
    [(0.0, ValueError, ("`init_scale` must be positive", "0.0")),
     (-0.1, ValueError, ("`init_scale` must be positive", "-0.1")),
     (float("nan"), ValueError, ("`init_scale` must be positive", "nan")),
     (float("inf"), ValueError, ("`init_scale` must be finite", "inf")),
     ("0.1", TypeError, ("`init_scale`", "'0.1'")),
     (True, TypeError, ("`init_scale`", "True")),
     (np.ones(2), TypeError, ("`init_scale`", "array")),
     (np.timedelta64(5), TypeError, ("`init_scale`", "timedelta64")),
     (np.array(True), TypeError, ("`init_scale`", "bool")),
     (10**400, ValueError, ("`init_scale`", "401 digits")),
     (None, TypeError, ("`init_scale`", "None"))],
)
def test_init_scale_errors(name, init_scale, exc, fragments):
    with raises(exc, *fragments):
        FAMILY_MAKERS[name](init_scale=init_scale)


@pytest.mark.parametrize("name", FAMILY_MAKERS)
@pytest.mark.parametrize(
    "init_scale",
    [np.float32(0.5), np.float64(0.5), np.int64(2), 2, np.array(0.5), jnp.float32(0.5)],
)
def test_init_scale_accepts_numpy_and_python_scalars(x64, name, init_scale):
    family = FAMILY_MAKERS[name](init_scale=init_scale)
    cov = np.asarray(family.to_gaussian(family.init(jnp.zeros(3))).cov)
    # Every family starts at marginal sds init_scale (low_rank: with correlations
    # of at most 0.01, tests/test_families.py; the others uncorrelated).
    np.testing.assert_allclose(np.diagonal(cov), float(init_scale) ** 2, rtol=1e-12)
    atol = 0.01 * float(init_scale) ** 2 if family.name == "low_rank" else 0.0
    np.testing.assert_allclose(cov, float(init_scale) ** 2 * np.eye(3), rtol=1e-12,
                               atol=atol + 1e-15)


@pytest.mark.parametrize(
    "rank,exc,fragments",
    [(0, ValueError, ("`rank`", ">= 1", "got 0")),
     (-3, ValueError, ("`rank`", ">= 1", "got -3")),
     (1.5, TypeError, ("`rank`", "1.5")),
     (None, TypeError, ("`rank`", "None"))],
)
def test_rank_errors(rank, exc, fragments):
    with raises(exc, *fragments):
        vijax.low_rank(rank=rank)


def test_rank_larger_than_d():
    with raises(ValueError, "`rank`", "d = 4", "got rank = 5"):
        vijax.low_rank(rank=5).init({"a": jnp.zeros(3), "b": jnp.zeros(())})


@pytest.mark.parametrize("name", FAMILY_MAKERS)
@pytest.mark.parametrize(
    "latent,exc,fragments",
    [
        (np.zeros(3, np.int32), TypeError, ("`latent`", "int32")),
        (jnp.zeros(3, jnp.int32), TypeError, ("`latent`", "int32")),
        ("abc", TypeError, ("`latent`", "floating-point")),
        ({"w": np.zeros(2, F32), "n": np.zeros(2, np.int32)}, TypeError,
         ("`latent['n']`", "int32")),
        ({"w": np.zeros(2, F32), "flag": np.zeros(2, bool)}, TypeError, ("`latent['flag']`", "bool")),
        ({"w": np.zeros(2, F32), "f": np.zeros(2, np.float16)}, TypeError,
         ("`latent`", "one floating dtype", "float16", "float32")),
        ({}, ValueError, ("`latent`", "at least one array leaf")),
        (np.zeros((0,), F32), ValueError, ("`latent`", "size 0")),
    ],
)
def test_bad_latents(name, latent, exc, fragments):
    family = FAMILY_MAKERS[name]()
    with raises(exc, *fragments):
        family.init(latent)


def test_mixed_float_widths_rejected(x64):
    with raises(TypeError, "`latent`", "float32", "float64"):
        vijax.mean_field().init({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float64)})


def test_num_samples_errors():
    family = vijax.mean_field()
    params = family.init(jnp.zeros(2))
    with raises(ValueError, "`num_samples`", "got 0"):
        family.sample(jax.random.key(0), params, 0)
    with raises(TypeError, "`num_samples`", "2.0"):
        family.sample(jax.random.key(0), params, 2.0)


# ------------------------------------------------------- params against the family
LATENT = {"a": np.zeros(3, F32), "b": np.zeros(2, F32)}


def _std_normal(z):
    return -0.5 * sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(z))


def _stacked(params):
    """Two members on a leading axis, as vijax.fit_batched returns them."""
    return jax.tree_util.tree_map(lambda a: jnp.stack([a, a + 1]), params)


BATCHED = ("`params` carry a leading batch axis of size 2", "fit_batched",
           "tree_map(lambda a: a[i], params)", "jax.vmap")


@pytest.mark.parametrize("name", FAMILY_MAKERS)
def test_batched_params_are_named_at_every_gaussian_entry_point(dtype, name):
    family = FAMILY_MAKERS[name]()
    latent = jax.tree_util.tree_map(lambda a: a.astype(dtype), LATENT)
    pb = _stacked(family.init(latent))
    key = jax.random.key(0)
    calls = {
        "to_gaussian": lambda: family.to_gaussian(pb),  # used to build an inconsistent Gaussian
        "sample": lambda: family.sample(key, pb, 3),
        "log_prob": lambda: family.log_prob(pb, latent),
        "entropy": lambda: family.entropy(pb),
        "elbo": lambda: vijax.elbo(key, pb, family, _std_normal, num_samples=4),
        "fit": lambda: vijax.fit(key, family, _std_normal, pb, num_steps=1, progress=False),
        "diagnose": lambda: vijax.diagnose(key, pb, family, _std_normal, num_samples=30),
    }
    for call in calls.values():
        with raises(ValueError, *BATCHED):
            call()


def test_batched_params_in_exact_kl_and_elbo():
    model = models.normal_mean(np.zeros(4, F32), noise_scale=1.0, prior_loc=0.0,
                               prior_scale=1.0)
    family = vijax.full_rank()
    pb = _stacked(family.init(model.latent))
    for fn in (vijax.exact_kl, vijax.exact_elbo):
        with raises(ValueError, *BATCHED):
            fn(pb, family, model)


@pytest.mark.parametrize(
    "name,field,shape,expected",
    [("mean_field", "raw_scale", (4,), "(5,)"),
     ("full_rank", "raw_scale", (5, 1), "(5,)"),
     ("full_rank", "off_diag", (5, 4), "(5, 5)"),
     ("low_rank", "raw_scale", (6,), "(5,)"),
     ("low_rank", "cov_factor", (5, 2), "(5, 1)"),
     ("low_rank", "cov_factor", (4, 1), "(5, 1)")],
)
def test_params_of_the_wrong_shape_are_named(name, field, shape, expected):
    family = FAMILY_MAKERS[name]()
    params = family.init(LATENT)
    bad = params._replace(**{field: jnp.zeros(shape, F32)})
    message = (f"`params.{field}` has shape {shape}", f"expected {expected}", "d = 5")
    with raises(ValueError, *message):
        vijax.elbo(jax.random.key(0), bad, family, _std_normal, num_samples=4)
    with raises(ValueError, *message):
        family.to_gaussian(bad)
    # fit names its own argument and keeps the family's words.
    with raises(ValueError, "`init_params` do not match", *message):
        vijax.fit(jax.random.key(0), family, _std_normal, bad, num_steps=1, progress=False)


def test_param_shape_checks_leave_jit_vmap_and_grad_alone():
    family = vijax.low_rank(rank=2)
    params = family.init(LATENT)
    key = jax.random.key(0)

    def objective(p):
        return vijax.elbo(key, p, family, _std_normal, num_samples=4)

    expected = objective(params)
    # vmap over batched params is the way to use them: each member is checked.
    values = jax.vmap(objective)(_stacked(params))
    np.testing.assert_allclose(values[0], expected, rtol=1e-6)
    grads = jax.jit(jax.grad(objective))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    with raises(ValueError, *BATCHED):  # raised while tracing, before any work
        jax.jit(objective)(_stacked(params))


# ------------------------------------------------------------ log joint output
@pytest.mark.parametrize("to_bad", [lambda x: x + 0j, lambda x: x > 0])
def test_log_joint_must_return_a_real_float(to_bad):
    family = vijax.mean_field()
    params = family.init(LATENT)
    bad = lambda z: to_bad(_std_normal(z))  # noqa: E731
    got = str(jnp.asarray(bad(LATENT)).dtype)
    for estimator in ("reparam", "stl", "score"):
        with raises(TypeError, "`log_joint` must return a real floating-point scalar", got):
            vijax.elbo(jax.random.key(0), params, family, bad, num_samples=4,
                       estimator=estimator)
    with raises(TypeError, "`log_joint` must return a real floating-point scalar", got):
        vijax.fit(jax.random.key(0), family, bad, params, num_steps=1, progress=False)
    # diagnose evaluates log joints in blocks of 1024 draws past 1024.
    for num in (30, 1030):
        with raises(TypeError, "`log_joint` must return a real floating-point scalar", got):
            vijax.diagnose(jax.random.key(0), params, family, bad, num_samples=num)


# ------------------------------------------------------ data models in diagnostics
def _regression(**kwargs):
    from jax.scipy.stats import norm

    x = np.asarray(jax.random.normal(jax.random.key(0), (40, 3)), F32)
    y = x @ np.array([1.0, -2.0, 0.5], F32)
    if "theta" in kwargs:
        lik = lambda w, t, d: norm.logpdf(d["y"], d["x"] @ w, jnp.exp(t))  # noqa: E731
    else:
        lik = lambda w, d: norm.logpdf(d["y"], d["x"] @ w, 0.5)  # noqa: E731
    return models.data_model(lik, {"x": x, "y": y}, latent=np.zeros(3, F32),
                             log_prior=lambda w, *t: norm.logpdf(w).sum(), **kwargs)


def test_diagnose_and_summary_take_a_data_model():
    model = _regression()
    family = vijax.mean_field()
    params = family.init(model.latent)._replace(loc=jnp.array([1.0, -2.0, 0.5]))
    key = jax.random.key(1)
    got = vijax.diagnose(key, params, family, model, num_samples=200)
    want = vijax.diagnose(key, params, family, model.log_joint, num_samples=200)
    assert got.log_evidence == want.log_evidence and got.khat == want.khat
    s = vijax.summary(key, params, family, model, num_samples=50)
    plain = vijax.models.Model(log_joint=model.log_joint, latent=model.latent)
    np.testing.assert_array_equal(
        s.stats["mean"], vijax.summary(key, params, family, plain, num_samples=50).stats["mean"])


def test_diagnose_reads_theta_from_joint_params():
    model = _regression(theta=jnp.zeros((), F32))
    family = vijax.mean_field()
    q = family.init(model.latent)._replace(loc=jnp.array([1.0, -2.0, 0.5]))
    theta = jnp.asarray(-1.0, F32)
    key = jax.random.key(1)
    got = vijax.diagnose(key, vijax.data.JointParams(q=q, theta=theta), family, model,
                         num_samples=200)
    want = vijax.diagnose(key, q, family, lambda z: model.log_joint(z, theta), num_samples=200)
    assert got.log_evidence == want.log_evidence
    default = vijax.diagnose(key, q, family, model, num_samples=200)  # model.theta
    assert default.log_evidence != got.log_evidence


def test_diagnostics_refuse_a_data_model_with_local_latents():
    model = models.data_model(lambda x, zl: -0.5 * jnp.sum(jnp.square(x - zl)),
                              np.zeros((5, 2), F32), local_latent=np.zeros(2, F32))
    family = vijax.mean_field()
    params = family.init(np.zeros(2, F32))
    with raises(ValueError, "`log_joint` is a vijax.models.DataModel with local latents"):
        vijax.diagnose(jax.random.key(0), params, family, model, num_samples=30)
    with raises(ValueError, "`model` is a vijax.models.DataModel with local latents"):
        vijax.summary(jax.random.key(0), params, family, model, num_samples=30)


def test_sampling_with_replacement_without_a_batch_size_is_refused():
    from jax.scipy.stats import norm

    model = vijax.models.data_model(lambda w, r: norm.logpdf(r["y"], w[0], 1.0),
                                    {"y": np.zeros(10, np.float32)}, latent=jnp.zeros(1))
    family = vijax.mean_field()
    with pytest.raises(ValueError, match=r"`batching='with_replacement'` .* need `batch_size`"):
        vijax.fit(jax.random.key(0), family, model, family.init(model.latent),
                  optimizer=optax.adam(0.1), num_steps=5, batching="with_replacement",
                  progress=False)
