"""The model zoo (vijax/models/_zoo.py): NumPyro twins, data checks, constrain, references.

Each zoo model's ``log_joint`` must equal the unconstrained log joint of its
independent NumPyro twin (benchmarks/_zoo_numpyro.py) in float64: both keep
every normalising constant, so the difference is zero up to rounding, not just
constant. The stored long-NUTS references (benchmarks/results/references/) are
checked by reading the files only.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vijax
from vijax.models import _zoo

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "benchmarks" / "results" / "references"
STATS = ("mean", "sd", "q05", "q50", "q95", "mcse_mean", "ess_bulk", "r_hat")


def build(name, data=None):
    """The zoo model ``name`` from ``data`` (the float64 NumPy defaults when None)."""
    if name == "neals_funnel":
        return _zoo.neals_funnel(dim=10, dtype=jnp.float64 if data is not None else jnp.float32)
    if name.startswith("eight_schools"):
        return _zoo.eight_schools(centered=name.endswith("_centered"), **(data or {}))
    return getattr(_zoo, name)(**(data or {}))


def _float64_data(name):
    data = _zoo.default_data(name)
    return {k: v for k, v in data.items() if k != "dim"}


# Natural shapes (latent and derived) of the default models, and their supports.
SHAPES = {
    "eight_schools_centered": {"mu": (), "tau": (), "theta": (8,)},
    "eight_schools_noncentered": {"mu": (), "tau": (), "eta": (8,), "theta": (8,)},
    "hierarchical_logistic": {"w": (5,), "mu_a": (), "sigma_a": (), "a": (10,), "alpha": (10,)},
    "stochastic_volatility": {"mu": (), "phi": (), "sigma": (), "h_std": (100,), "h": (100,)},
    "neals_funnel": {"v": (), "x": (9,)},
    "poisson_glm": {"intercept": (), "w": (5,)},
    "item_response": {"ability": (400,), "difficulty": (100,), "sigma_d": ()},
    "log_gaussian_cox": {"mu": (), "sigma": (), "u": (100,), "f": (10, 10)},
}
POSITIVE = {"tau", "sigma_a", "sigma", "sigma_d"}
DIMENSION = {"eight_schools_centered": 10, "eight_schools_noncentered": 10,
             "hierarchical_logistic": 17, "stochastic_volatility": 103, "neals_funnel": 10,
             "poisson_glm": 6, "item_response": 501, "log_gaussian_cox": 102}


def test_zoo_lists_every_model():
    assert set(_zoo.ZOO) == set(SHAPES) == set(DIMENSION)


# ------------------------------------------------------------ NumPyro twins
@pytest.mark.parametrize("name", _zoo.ZOO)
def test_log_joint_equals_numpyro_twin(x64, name):
    pytest.importorskip("numpyro")
    from benchmarks import _zoo_numpyro as twins

    data = _zoo.default_data(name)
    model = build(name, _float64_data(name))
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(model.latent))
    potential = twins.potential_fn(name, data)
    rng = np.random.default_rng(11)
    z = jax.tree_util.tree_map(  # three points, stacked
        lambda leaf: jnp.asarray(0.7 * rng.normal(size=(3,) + leaf.shape)), model.latent)
    ours = jax.jit(jax.vmap(model.log_joint))(z)
    theirs = -jax.jit(jax.vmap(potential))(z)
    assert np.all(np.isfinite(ours)) and np.ptp(np.asarray(ours)) > 1e-3
    # Both normalised: equal, not just equal up to a constant. Equal at the
    # same unconstrained point also means the same bijectors (phi = -1 + 2
    # sigmoid(z) as NumPyro's interval transform, exp for the scales).
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-9)
    # The natural values and derived quantities agree with NumPyro's too.
    twin = twins.TWINS[name]
    values = jax.jit(model.constrain)(z)
    assert sorted(values) == sorted(twin.latent + twin.deterministic)
    expected = jax.jit(jax.vmap(lambda p: twins.constrain(name, data, p)))(z)
    for site, value in values.items():
        # f goes through two Cholesky factors of a kernel with condition ~1e8.
        np.testing.assert_allclose(value, expected[site], rtol=1e-10, atol=1e-9, err_msg=site)


# --------------------------------------------------------- dtypes, constrain
@pytest.mark.parametrize("name", _zoo.ZOO)
def test_float32_default_and_batched_constrain(name):
    model = build(name)
    assert model.name == name
    leaves = jax.tree_util.tree_leaves(model.latent)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert sum(leaf.size for leaf in leaves) == DIMENSION[name]
    value = jax.jit(model.log_joint)(model.latent)
    assert value.dtype == jnp.float32 and value.shape == () and jnp.isfinite(value)

    rng = np.random.default_rng(3)
    draws = jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(rng.normal(size=(3, 2) + leaf.shape), jnp.float32), model.latent)
    out = jax.jit(model.constrain)(draws)
    assert {k: v.shape[2:] for k, v in out.items()} == SHAPES[name]
    assert all(v.shape[:2] == (3, 2) and v.dtype == jnp.float32 for v in out.values())
    for site in POSITIVE & set(out):
        assert np.all(np.asarray(out[site]) > 0), site
    if "phi" in out:
        assert np.all(np.abs(np.asarray(out["phi"])) < 1)
    # The derived quantities are those of the draws: spot-check one per model.
    if "theta" in out and "eta" in out:
        np.testing.assert_allclose(
            out["theta"], out["mu"][..., None] + out["tau"][..., None] * out["eta"], rtol=1e-5)
    if "alpha" in out:
        np.testing.assert_allclose(
            out["alpha"], out["mu_a"][..., None] + out["sigma_a"][..., None] * out["a"],
            rtol=1e-5, atol=1e-6)
    if "h" in out:
        d = {k: np.asarray(v[1, 0], np.float64) for k, v in out.items()}
        np.testing.assert_allclose(
            out["h"][1, 0], _zoo.sv_log_volatility_np(d["mu"], d["phi"], d["sigma"], d["h_std"]),
            rtol=1e-4, atol=1e-4)


def test_float64_data_gives_float64_model(x64):
    model = _zoo.poisson_glm(**_float64_data("poisson_glm"))
    assert model.latent["w"].dtype == jnp.float64
    assert model.log_joint(model.latent).dtype == jnp.float64


def test_log_joint_is_jittable_and_differentiable():
    model = _zoo.stochastic_volatility(num_steps=20)
    value, grad = jax.jit(jax.value_and_grad(model.log_joint))(model.latent)
    assert jnp.isfinite(value)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grad))


# ------------------------------------------------------------- data checks
NON_FINITE = [
    (_zoo.eight_schools, "y"), (_zoo.eight_schools, "sigma"),
    (_zoo.hierarchical_logistic, "x"), (_zoo.hierarchical_logistic, "y"),
    (_zoo.stochastic_volatility, "returns"),
    (_zoo.poisson_glm, "x"), (_zoo.poisson_glm, "y"),
    (_zoo.item_response, "y"),
    (_zoo.log_gaussian_cox, "counts"),
]
DATA_OF = {
    _zoo.eight_schools: "eight_schools_centered",
    _zoo.hierarchical_logistic: "hierarchical_logistic",
    _zoo.stochastic_volatility: "stochastic_volatility",
    _zoo.poisson_glm: "poisson_glm",
    _zoo.item_response: "item_response",
    _zoo.log_gaussian_cox: "log_gaussian_cox",
}


def _float32_data(constructor):
    data = _zoo.default_data(DATA_OF[constructor])
    return {k: (np.asarray(v, np.float32) if k not in ("group", "num_groups") else v)
            for k, v in data.items()}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("constructor, array", NON_FINITE,
                         ids=[f"{c.__name__}-{a}" for c, a in NON_FINITE])
def test_non_finite_data_names_the_array(constructor, array, bad):
    data = _float32_data(constructor)
    data[array] = data[array].copy()
    data[array].flat[3] = bad
    with pytest.raises(ValueError, match=f"`{array}` must be finite"):
        constructor(**data)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _zoo.eight_schools(y=np.zeros(8, np.float32), sigma=np.ones(7, np.float32)),
     ValueError, "`sigma` must have shape"),
    (lambda: _zoo.eight_schools(sigma=-np.ones(8, np.float32)), ValueError,
     "`sigma` must be positive"),
    (lambda: _zoo.eight_schools(y=np.zeros(8, np.int32)), TypeError, "`y`"),
    (lambda: _zoo.eight_schools(centered="yes"), TypeError, "`centered`"),
    (lambda: _zoo.hierarchical_logistic(x=np.zeros((4, 2), np.float32)), ValueError,
     "together"),
    (lambda: _zoo.hierarchical_logistic(
        x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 2, 0], np.float32),
        group=np.zeros(4, int)), ValueError, "`y` must hold 0.0 or 1.0"),
    (lambda: _zoo.hierarchical_logistic(
        x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.float32),
        group=np.zeros(4, np.float32)), TypeError, "`group` must be an integer array"),
    (lambda: _zoo.hierarchical_logistic(
        x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.float32),
        group=np.array([0, 1, 2, 3]), num_groups=3), ValueError, r"`group` must lie in \[0, 3\)"),
    (lambda: _zoo.hierarchical_logistic(
        x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.float32),
        group=np.zeros(3, int)), ValueError, r"`group` must have shape \(4,\)"),
    (lambda: _zoo.stochastic_volatility(returns=np.zeros((5, 2), np.float32)), ValueError,
     "`returns` must have 1 dimension"),
    (lambda: _zoo.stochastic_volatility(returns=np.zeros(5, np.float32), num_steps=6),
     ValueError, "`num_steps`"),
    (lambda: _zoo.neals_funnel(dim=1), ValueError, "`dim`"),
    (lambda: _zoo.poisson_glm(x=np.zeros((3, 2), np.float32), y=np.array([0, 1.5, 2], np.float32)),
     ValueError, "`y` must hold counts"),
    (lambda: _zoo.poisson_glm(x=np.zeros((3, 2), np.float32), y=-np.ones(3, np.float32)),
     ValueError, "`y` must hold counts"),
    (lambda: _zoo.poisson_glm(x=np.zeros((3, 2), np.float32), y=np.ones(4, np.float32)),
     ValueError, r"`y` must have shape \(3,\)"),
    (lambda: _zoo.item_response(y=np.full((3, 2), 0.5, np.float32)), ValueError,
     "`y` must hold 0.0 or 1.0"),
    (lambda: _zoo.item_response(y=np.zeros((3, 2), np.float32), num_items=3), ValueError,
     "`num_items`"),
    (lambda: _zoo.log_gaussian_cox(counts=np.zeros((3, 4), np.float32)), ValueError,
     "`counts` must be a square"),
    (lambda: _zoo.log_gaussian_cox(counts=np.zeros((3, 3), np.float32), grid=4), ValueError,
     "`grid`"),
])
def test_bad_data_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mixed_dtypes_are_rejected(x64):
    with pytest.raises(TypeError, match="share one floating dtype"):
        _zoo.poisson_glm(x=np.zeros((3, 2), np.float64), y=np.zeros(3, np.float32))


# ------------------------------------------------- integer labels and counts
# (constructor, the label or count array, its kind): integers and bools are cast.
LABELS = [
    (_zoo.hierarchical_logistic, "y", "binary"),
    (_zoo.poisson_glm, "y", "counts"),
    (_zoo.item_response, "y", "binary"),
    (_zoo.log_gaussian_cox, "counts", "counts"),
]


def _point(model, seed=5):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(0.5 * rng.normal(size=leaf.shape), leaf.dtype), model.latent)


@pytest.mark.parametrize("whole", [np.int64, np.int32, bool, list])
@pytest.mark.parametrize("constructor, array, kind", LABELS,
                         ids=[f"{c.__name__}-{a}" for c, a, _ in LABELS])
def test_integer_and_bool_labels_and_counts_are_cast(constructor, array, kind, whole):
    data = _float32_data(constructor)
    labels = data[array]
    if whole is bool:
        if kind == "counts":  # bool counts are counts of 0 and 1
            labels = np.minimum(labels, 1.0)
            data[array] = labels
        given = labels.astype(bool)
    elif whole is list:
        given = labels.astype(int).tolist()
    else:
        given = labels.astype(whole)
    model = constructor(**{**data, array: given})
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(model.latent))
    same = constructor(**data)  # the float32 labels
    z = _point(same)
    value = model.log_joint(z)
    assert value.dtype == jnp.float32
    np.testing.assert_array_equal(value, same.log_joint(z))


def test_integer_counts_follow_the_dtype_of_x_and_of_dtype(x64):
    data = _float64_data("poisson_glm")
    ints = data["y"].astype(np.int64)
    model = _zoo.poisson_glm(x=data["x"], y=ints)  # float64 x: float64 model
    assert model.latent["w"].dtype == jnp.float64
    twin = _zoo.poisson_glm(**data)  # checked against NumPyro above
    np.testing.assert_array_equal(model.log_joint(_point(twin)), twin.log_joint(_point(twin)))
    lgcp = _zoo.log_gaussian_cox(counts=_zoo.log_gaussian_cox_data()["counts"].astype(np.int64),
                                 dtype=jnp.float64)
    assert lgcp.latent["u"].dtype == jnp.float64
    # Counts past 2^24 are not exact in float32, but are in float64.
    big = np.array([0, 2**24 + 1, 3])
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"`y` must hold counts of at most 2\^24 = 16777216 "
                                         r"to be exact in float32; got 16777217"):
        _zoo.poisson_glm(x=x.astype(np.float32), y=big)
    assert _zoo.poisson_glm(x=x, y=big).latent["w"].dtype == jnp.float64
    assert _zoo.poisson_glm(x=x, y=big, dtype=jnp.float64).latent["w"].dtype == jnp.float64


@pytest.mark.parametrize("call, error, match", [
    (lambda: _zoo.poisson_glm(x=np.zeros((3, 2), np.float32), y=np.array([0, -2, 1])),
     ValueError, r"`y` must hold counts \(whole numbers >= 0\); got -2"),
    (lambda: _zoo.log_gaussian_cox(counts=-np.ones((2, 2), np.int8)),
     ValueError, "`counts` must hold counts.*got -1"),
    (lambda: _zoo.poisson_glm(x=np.zeros((3, 2), np.float32), y=np.ones(3, np.complex64)),
     TypeError, "`y` must be a real array.*got dtype complex64"),
    (lambda: _zoo.item_response(y=np.array([[0, 1], [2, 0]])),
     ValueError, "`y` must hold 0.0 or 1.0; got 2"),
    (lambda: _zoo.item_response(y=np.array([["a", "b"]])), TypeError, "`y`.*<U1"),
    (lambda: _zoo.hierarchical_logistic(
        x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 3, 0]), group=np.zeros(4, int)),
     ValueError, "`y` must hold 0.0 or 1.0; got 3"),
    (lambda: _zoo.hierarchical_logistic(
        x=np.zeros((4, 2), np.float32), y=np.zeros(3, int), group=np.zeros(4, int)),
     ValueError, r"`y` must have shape \(4,\)"),
    (lambda: _zoo.poisson_glm(x=np.zeros((3, 2), np.int32), y=np.zeros(3, int)),
     TypeError, "`x` must have a floating-point dtype"),
])
def test_bad_integer_labels_and_counts_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------ dtype keyword
@pytest.mark.parametrize("name", _zoo.ZOO)
def test_dtype_float64_gives_the_float64_model(x64, name):
    def make(**kw):
        if name.startswith("eight_schools"):
            return _zoo.eight_schools(centered=name.endswith("_centered"), **kw)
        return getattr(_zoo, name)(**kw)

    default = make()  # float32 whatever jax_enable_x64 says (documented)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(default.latent))
    model = make(dtype=jnp.float64)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(model.latent))
    rng = np.random.default_rng(7)
    z32 = jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(0.5 * rng.normal(size=(3,) + leaf.shape), jnp.float32),
        default.latent)
    z64 = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float64), z32)
    value = jax.vmap(model.log_joint)(z64)
    assert value.dtype == jnp.float64
    # The float64 model is the one built from the float64 default data, which
    # the NumPyro twin test checks ...
    twin = build(name, _float64_data(name))
    np.testing.assert_allclose(value, jax.vmap(twin.log_joint)(z64), rtol=1e-12)
    # ... and the float32 model to float32 precision.
    np.testing.assert_allclose(jax.vmap(default.log_joint)(z32), value, rtol=2e-5)
    out = model.constrain(z64)
    assert all(v.dtype == jnp.float64 for v in out.values())
    grad = jax.grad(model.log_joint)(jax.tree_util.tree_map(lambda v: v[0], z64))
    assert all(g.dtype == jnp.float64 for g in jax.tree_util.tree_leaves(grad))
    if model.expected_log_joint is not None:
        q = vijax.Gaussian.diagonal(jnp.zeros(DIMENSION[name], jnp.float64),
                                    jnp.full(DIMENSION[name], 0.1, jnp.float64))
        assert model.expected_log_joint(q).dtype == jnp.float64


def test_dtype_casts_given_data(x64):
    data = _float64_data("poisson_glm")
    down = _zoo.poisson_glm(**data, dtype=jnp.float32)
    assert down.latent["w"].dtype == jnp.float32
    np.testing.assert_array_equal(
        down.log_joint(_point(down)),
        _zoo.poisson_glm(**{k: v.astype(np.float32) for k, v in data.items()}).log_joint(
            _point(down)))
    # With a dtype, mixed dtypes are cast rather than rejected.
    mixed = _zoo.poisson_glm(x=data["x"].astype(np.float32), y=data["y"], dtype=jnp.float64)
    assert mixed.latent["w"].dtype == jnp.float64
    returns = _zoo.stochastic_volatility_data()["returns"].astype(np.float32)
    up = _zoo.stochastic_volatility(returns=returns, dtype=jnp.float64)
    assert up.latent["h_std"].dtype == jnp.float64
    assert up.log_joint(up.latent).dtype == jnp.float64


ZOO_CONSTRUCTORS = [_zoo.eight_schools, _zoo.hierarchical_logistic, _zoo.stochastic_volatility,
                    _zoo.neals_funnel, _zoo.poisson_glm, _zoo.item_response,
                    _zoo.log_gaussian_cox]


@pytest.mark.parametrize("constructor", ZOO_CONSTRUCTORS, ids=lambda c: c.__name__)
def test_bad_dtype_raises_naming_it(constructor):
    for bad in (jnp.int32, "float16", "nonsense", np.complex64):
        with pytest.raises(TypeError, match="`dtype` must be .*jnp.float32 or jnp.float64"):
            constructor(dtype=bad)
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="`dtype` float64 needs 64-bit JAX.*jax_enable_x64"):
            constructor(dtype=jnp.float64)


def test_synthetic_data_follows_the_seed_and_sizes():
    a, b = _zoo.poisson_glm_data(0), _zoo.poisson_glm_data(1)
    assert not np.array_equal(a["y"], b["y"])
    np.testing.assert_array_equal(a["y"], _zoo.poisson_glm_data(0)["y"])
    model = _zoo.item_response(num_students=7, num_items=3, seed=2)
    assert model.latent["ability"].shape == (7,) and model.latent["difficulty"].shape == (3,)
    assert _zoo.log_gaussian_cox(grid=4).latent["u"].shape == (16,)
    assert _zoo.stochastic_volatility(num_steps=12).latent["h_std"].shape == (12,)


# --------------------------------------------------------------- references
def _reference(name):
    path = REFERENCES / f"{name}.json"
    assert path.exists(), f"missing reference {path}; run `python -m benchmarks.zoo_references`"
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", _zoo.ZOO)
def test_stored_reference_is_complete_and_converged(name):
    record = _reference(name)
    assert record["model"] == name and not record["quick"]
    # The reference is for today's default data.
    assert record["data"]["sha256"] == _zoo.data_sha256(_zoo.default_data(name))
    sites = SHAPES[name]
    assert set(record["statistics"]) == set(sites)
    for site, shape in sites.items():
        entry = record["statistics"][site]
        assert tuple(entry["shape"]) == shape, site
        for stat in STATS:
            value = np.asarray(entry[stat], dtype=np.float64)  # None (exact) -> nan
            assert value.shape == shape, (site, stat)
            if record["kind"] == "nuts" or stat not in ("ess_bulk", "r_hat"):
                assert np.all(np.isfinite(value)), (site, stat)
        if record["kind"] == "nuts":
            assert np.all(np.asarray(entry["r_hat"]) < 1.01), site
            assert np.all(np.asarray(entry["ess_bulk"]) > 400), site
            assert np.all(np.asarray(entry["sd"]) > 0), site
    summary = record["summary"]
    assert summary["max_r_hat"] < 1.01
    settings = record["settings"]
    assert settings["num_chains"] == 4 and settings["num_samples"] >= 2000
    assert isinstance(settings["seed"], int)
    for key in ("divergences", "wall_time_s"):
        assert key in summary
    assert {"numpyro", "jax", "arviz"} <= set(record["versions"])
    assert "cpu" in record["machine"]


def test_funnel_reference_is_exact():
    record = _reference("neals_funnel")
    assert record["kind"] == "exact"
    v, x = record["statistics"]["v"], record["statistics"]["x"]
    assert (v["mean"], v["sd"]) == (0.0, 3.0)
    np.testing.assert_allclose(x["sd"], math.exp(9.0 / 4.0), rtol=1e-15)
    np.testing.assert_allclose(v["q95"], 3.0 * 1.6448536269514722, rtol=1e-12)
    # The x quantile solves E[Phi(q exp(-v/2))] = 0.95: check it by Gauss-Hermite.
    s, w = np.polynomial.hermite_e.hermegauss(200)
    from scipy.special import ndtr
    cdf = np.sum(w * ndtr(x["q95"][0] * np.exp(-1.5 * s))) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(cdf, 0.95, atol=1e-8)
    # The non-centred NUTS check agrees on v's mean within a few MCSE.
    check = record["check"]["statistics"]["v"]
    assert abs(check["mean"]) < 5 * check["mcse_mean"]
    assert check["r_hat"] < 1.01


def test_references_readme_lists_every_model():
    text = (REFERENCES / "README.md").read_text()
    for name in _zoo.ZOO:
        assert f"| {name} |" in text
