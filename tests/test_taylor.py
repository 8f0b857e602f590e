"""Tests for the Taylor control variate (``vijax._taylor``; ``elbo(control=...)``, ``fit(control_variate=...)``).

Exact identities in float64 against closed forms written here in NumPy: on a
Gaussian target the estimator's value is the exact ELBO and its gradient the
exact gradient, whatever the draws and the expansion point. Monte Carlo
claims (unbiased off a Gaussian target, lower variance) are tested with the
standard errors of independent replicates.
"""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import vijax
from vijax import _taylor
from vijax.fitting import _drivers

Z = 5.0


# ------------------------------------------------------------------ a Gaussian target
def _gaussian_target(rng, d=5):
    """A pytree-latent Gaussian log density: ``{"a": (d - 1,), "b": ()}``, dense precision."""
    a = rng.normal(size=(d, d))
    prec = a @ a.T / d + np.eye(d)
    mu = rng.normal(size=d)
    latent = {"a": jnp.zeros(d - 1), "b": jnp.zeros(())}
    _, unravel = ravel_pytree(latent)
    p = jnp.asarray(prec)
    m = jnp.asarray(mu)

    def log_joint(z):
        flat = ravel_pytree(z)[0]
        return -0.5 * (flat - m) @ p @ (flat - m) + 3.0

    return log_joint, latent, prec, mu


def _exact_elbo_and_grads(prec, mu, loc, sd, factor=None):
    """ELBO of N(loc, W W^T + diag(sd^2)) under the target (up to its constant 3), and its
    gradients in (loc, sd, W), in NumPy."""
    d = loc.shape[0]
    cov = np.diag(sd**2) + (0 if factor is None else factor @ factor.T)
    r = loc - mu
    elbo = (-0.5 * (r @ prec @ r + np.trace(prec @ cov)) + 3.0
            + 0.5 * (d * (1 + np.log(2 * np.pi)) + np.linalg.slogdet(cov)[1]))
    cov_inv_diag = np.diagonal(np.linalg.solve(cov, np.eye(d)))
    g_loc = -prec @ r
    g_sd = -np.diagonal(prec) * sd + cov_inv_diag * sd
    g_w = None if factor is None else -prec @ factor + np.linalg.solve(cov, factor)
    return elbo, g_loc, g_sd, g_w


@pytest.mark.parametrize("family_name", ["mean_field", "low_rank"])
@pytest.mark.parametrize("estimator", ["closed_entropy", "reparam"])
def test_exact_value_and_gradient_on_a_gaussian_target(x64, rng, family_name, estimator):
    log_joint, latent, prec, mu = _gaussian_target(rng)
    family = vijax.mean_field() if family_name == "mean_field" else vijax.low_rank(rank=2)
    params = family.init(latent)
    params = jax.tree_util.tree_map(
        lambda x: x + 0.4 * jnp.asarray(rng.normal(size=np.shape(x))), params)
    # Any expansion point: here far from both q and the target.
    ref = vijax.taylor_reference(log_joint, jax.tree_util.tree_map(lambda x: x + 2.0, latent))
    chex_np = np.testing
    chex_np.assert_allclose(ref.hess_diag, -np.diagonal(prec), rtol=1e-12)

    q = family.to_gaussian(params)
    loc = np.asarray(q.mean)
    factor = None
    if family_name == "low_rank":
        sd = np.asarray(q.scale.diag_scale)
        factor = np.asarray(q.scale.cov_factor)
    else:
        sd = np.asarray(q.scale.scale)
    want, g_loc, g_sd, g_w = _exact_elbo_and_grads(prec, mu, loc, sd, factor)
    dsd_draw = 1.0 / (1.0 + np.exp(-np.asarray(params.raw_scale)))  # softplus'
    for seed in (0, 1):
        value, grads = jax.value_and_grad(vijax.elbo, 1)(
            jax.random.key(seed), params, family, log_joint, num_samples=3,
            estimator=estimator, control=ref)
        if estimator == "closed_entropy" or family_name == "mean_field":
            np.testing.assert_allclose(ravel_pytree(grads.loc)[0], g_loc, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(grads.raw_scale, g_sd * dsd_draw, rtol=1e-10, atol=1e-12)
            if factor is not None:
                np.testing.assert_allclose(grads.cov_factor, g_w, rtol=1e-10, atol=1e-12)
        if estimator == "closed_entropy":
            np.testing.assert_allclose(value, want, rtol=1e-12)


def test_without_control_the_same_gradient_is_noisy(x64, rng):
    """The test above has power: the plain estimator's gradient differs from the exact one."""
    log_joint, latent, prec, mu = _gaussian_target(rng)
    family = vijax.mean_field()
    params = family.init(latent)
    q = family.to_gaussian(params)
    _, _, g_sd, _ = _exact_elbo_and_grads(prec, mu, np.asarray(q.mean), np.asarray(q.scale.scale))
    grads = jax.grad(vijax.elbo, 1)(jax.random.key(0), params, family, log_joint,
                                     num_samples=3, estimator="closed_entropy")
    dsd_draw = 1.0 / (1.0 + np.exp(-np.asarray(params.raw_scale)))
    assert np.max(np.abs(np.asarray(grads.raw_scale) - g_sd * dsd_draw)) > 1e-3


# ------------------------------------------------------------------ the Hessian diagonal
def _logistic(rng, n=40, d=6):
    x = rng.normal(size=(n, d))
    y = (rng.uniform(size=n) < 0.5).astype(np.float64)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    latent = {"w": jnp.zeros(d - 1), "b": jnp.zeros(())}

    def log_joint(z):
        w = ravel_pytree(z)[0]
        logits = xj @ w
        return jnp.sum(yj * logits - jax.nn.softplus(logits)) - 0.5 * jnp.sum(w**2)

    return log_joint, latent, x, y


def test_hessian_diagonal_matches_numpy(x64, rng):
    log_joint, latent, x, _ = _logistic(rng)
    loc = {"w": jnp.asarray(rng.normal(size=5)), "b": jnp.asarray(0.3)}
    for block in (1, 4, 64):
        ref = vijax.taylor_reference(log_joint, loc, block_size=block)
        m = np.asarray(ravel_pytree(loc)[0])
        p = 1.0 / (1.0 + np.exp(-(x @ m)))
        want = -np.sum(x**2 * (p * (1 - p))[:, None], axis=0) - 1.0
        np.testing.assert_allclose(ref.loc, m, rtol=0, atol=0)
        np.testing.assert_allclose(ref.hess_diag, want, rtol=1e-12)
        assert int(ref.step) == 0


# ------------------------------------------------------------------ off a Gaussian target
def _replicates(log_joint, latent, family, params, control, num, num_samples=4):
    def one(key):
        return ravel_pytree(jax.grad(vijax.elbo, 1)(
            key, params, family, log_joint, num_samples=num_samples,
            estimator="closed_entropy", control=control))[0]

    keys = jax.random.split(jax.random.key(7), num)
    return np.asarray(jax.lax.map(one, keys))


@pytest.mark.parametrize("family_name", ["mean_field", "low_rank"])
def test_unbiased_and_less_noisy_off_a_gaussian_target(x64, rng, family_name):
    log_joint, latent, _, _ = _logistic(rng, n=200)
    family = vijax.mean_field() if family_name == "mean_field" else vijax.low_rank(rank=2)
    params = family.init(latent)
    params = jax.tree_util.tree_map(
        lambda x: x + 0.2 * jnp.asarray(rng.normal(size=np.shape(x))), params)
    ref = vijax.taylor_reference(
        log_joint, jax.tree_util.tree_map(lambda x: x + 0.1, params.loc))
    n = 4000
    plain = _replicates(log_joint, latent, family, params, None, n)
    cv = _replicates(log_joint, latent, family, params, ref, n)
    # Same keys, same draws: the difference is the control variate's correction,
    # whose expectation must be zero.
    diff = cv - plain
    se = diff.std(axis=0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(diff.mean(axis=0)) <= Z * se + 1e-12)
    assert np.all(se > 0)
    # And it removes most of the noise where log p is close to quadratic.
    assert np.sum(cv.var(axis=0)) < 0.2 * np.sum(plain.var(axis=0))


def test_unbiasedness_check_has_power(x64, rng):
    """A control variate with a wrong expectation (a doubled Hessian diagonal) is caught."""
    log_joint, latent, _, _ = _logistic(rng, n=200)
    family = vijax.mean_field()
    params = family.init(latent)
    ref = vijax.taylor_reference(log_joint, params.loc)
    bad = ref._replace(hess_diag=2.0 * ref.hess_diag)
    n = 4000
    diff = (_replicates(log_joint, latent, family, params, bad, n)
            - _replicates(log_joint, latent, family, params, None, n))
    se = diff.std(axis=0, ddof=1) / np.sqrt(n)
    assert np.any(np.abs(diff.mean(axis=0)) > Z * se)


def test_float32_jit_and_vmap(rng):
    log_joint, latent, _, _ = _gaussian_target(rng)
    latent = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), latent)
    family = vijax.mean_field()
    params = family.init(latent)
    ref = vijax.taylor_reference(log_joint, latent)
    assert ref.hess_diag.dtype == jnp.float32

    @jax.jit
    def value_and_grad(key):
        return jax.value_and_grad(vijax.elbo, 1)(key, params, family, log_joint,
                                                 num_samples=4, estimator="closed_entropy",
                                                 control=ref)

    values, grads = jax.vmap(value_and_grad)(jax.random.split(jax.random.key(0), 3))
    assert values.dtype == jnp.float32 and values.shape == (3,)
    assert grads.raw_scale.dtype == jnp.float32
    # Float32 Gaussian target: every key gives the same (exact) gradient.
    np.testing.assert_allclose(grads.raw_scale[0], grads.raw_scale[1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ fit
def _blr(rng, n=60, d=12):
    x = rng.normal(size=(n, d))
    x[:, 1] += 0.8 * x[:, 0]
    y = x @ rng.normal(size=d) + rng.normal(size=n)
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(y), noise_scale=1.0, prior_scale=1.0)
    prec = x.T @ x + np.eye(d)
    mean = np.linalg.solve(prec, x.T @ y)
    return model, prec, mean


def _mean_field_gap(prec, mean, loc, sd):
    """KL(q || p) minus the mean-field optimum's, in NumPy."""
    r = np.asarray(loc) - mean
    sd = np.asarray(sd)
    kl = 0.5 * (np.sum(np.diagonal(prec) * sd**2) + r @ prec @ r - prec.shape[0]
                - 2 * np.sum(np.log(sd)) - np.linalg.slogdet(prec)[1])
    best = 0.5 * (np.sum(np.log(np.diagonal(prec))) - np.linalg.slogdet(prec)[1])
    return kl - best


def test_default_fit_with_control_variate_reaches_the_optimum(x64, rng):
    model, prec, mean = _blr(rng)
    family = vijax.mean_field()
    init = family.init(model.latent)
    res = vijax.fit(jax.random.key(0), family, model.log_joint, init, num_steps=20000,
                    progress=False, control_variate="taylor")
    assert res.stopped_early
    sd = jax.nn.softplus(res.params.raw_scale)
    assert _mean_field_gap(prec, mean, res.params.loc, sd) < 1e-3
    control = res.state.control
    assert isinstance(control, vijax.TaylorReference)
    every = _taylor.refresh_steps(mean.shape[0], 8)
    assert int(control.step) % every == 0 and 0 <= int(control.step) < int(res.state.step)
    # Its diagonal is the target's (BLR: -(X^T X + I)).
    np.testing.assert_allclose(control.hess_diag, -np.diagonal(prec), rtol=1e-10)


def test_fit_with_control_variate_resumes_bitwise(x64, rng, tmp_path):
    model, _, _ = _blr(rng)
    family = vijax.low_rank(rank=2)
    init = family.init(model.latent)
    opt = optax.adam(1e-2)
    kw = dict(optimizer=opt, progress=False, control_variate="taylor", chunk_size=40)
    whole = vijax.fit(jax.random.key(3), family, model.log_joint, init, num_steps=120, **kw)
    half = vijax.fit(jax.random.key(3), family, model.log_joint, init, num_steps=70, **kw)
    path = vijax.save_checkpoint(tmp_path / "s.npz", half.state)
    state = vijax.load_checkpoint(path)
    assert isinstance(state.control, vijax.TaylorReference)
    rest = vijax.fit(None, family, model.log_joint, state, num_steps=50, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(whole.state.params),
                    jax.tree_util.tree_leaves(rest.state.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.state.control.loc, rest.state.control.loc)
    # Refreshed at step 0 and every 50 steps (d = 12, 8 draws: max(50, 10 * 2)).
    assert int(whole.state.control.step) == 100


def test_fit_without_control_variate_is_unchanged(x64, rng):
    model, _, _ = _blr(rng)
    family = vijax.mean_field()
    init = family.init(model.latent)
    a = vijax.fit(jax.random.key(1), family, model.log_joint, init, num_steps=50,
                  optimizer=optax.adam(1e-2), progress=False)
    assert a.state.control is None
    # A state that carries a reference continues without one when none is asked for.
    b = vijax.fit(jax.random.key(1), family, model.log_joint, init, num_steps=20,
                  optimizer=optax.adam(1e-2), progress=False, control_variate="taylor")
    c = vijax.fit(None, family, model.log_joint, b.state, num_steps=5,
                  optimizer=optax.adam(1e-2), progress=False)
    assert c.state.control is None


def test_old_checkpoint_without_control_loads(tmp_path, rng):
    """A checkpoint written before FitState had ``control`` still reads as a FitState."""
    family = vijax.mean_field()
    params = family.init(jnp.zeros(3))
    state = vijax.init_fit_state(jax.random.key(0), params, optax.adam(1e-2))
    path = str(vijax.save_checkpoint(tmp_path / "new.npz", state))
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    header = json.loads(arrays["__header__"].tobytes().decode())
    tree = header["tree"]
    assert tree["fields"][-1] == "control"
    tree["fields"], tree["c"] = tree["fields"][:-1], tree["c"][:-1]
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    assert zipfile.is_zipfile(old)
    loaded = vijax.load_checkpoint(old)
    assert isinstance(loaded, vijax.FitState) and loaded.control is None


# ------------------------------------------------------------------ errors
def test_errors_name_the_argument(rng):
    log_joint, latent, _, _ = _gaussian_target(rng)
    mf = vijax.mean_field()
    params = mf.init(latent)
    ref = vijax.taylor_reference(log_joint, latent)
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="`control` must be a vijax.TaylorReference"):
        vijax.elbo(key, params, mf, log_joint, num_samples=2, control=(1, 2, 3))
    with pytest.raises(ValueError, match="pathwise estimator"):
        vijax.elbo(key, params, mf, log_joint, num_samples=2, estimator="score", control=ref)
    with pytest.raises(ValueError, match=r"`control.loc` must have shape \(5,\)"):
        vijax.elbo(key, params, mf, log_joint, num_samples=2,
                   control=ref._replace(loc=jnp.zeros(4)))
    fr = vijax.full_rank()
    with pytest.raises(ValueError, match="diagonal or low-rank plus diagonal.*CholeskyScale"):
        vijax.elbo(key, fr.init(latent), fr, log_joint, num_samples=2, control=ref)
    with pytest.raises(ValueError, match="diagonal or low-rank plus diagonal"):
        vijax.fit(key, fr, log_joint, fr.init(latent), num_steps=2, progress=False,
                  optimizer=optax.adam(1e-2), control_variate="taylor")
    with pytest.raises(ValueError, match="`control_variate` must be None or one of"):
        vijax.fit(key, mf, log_joint, params, num_steps=2, progress=False,
                  control_variate="quadratic")
    with pytest.raises(ValueError, match="`control_variate` needs a pathwise estimator"):
        vijax.fit(key, mf, log_joint, params, num_steps=2, progress=False,
                  estimator="score", optimizer=optax.adam(1e-2), control_variate="taylor")
    with pytest.raises(ValueError, match="`block_size` must be"):
        vijax.taylor_reference(log_joint, latent, block_size=0)
    with pytest.raises(TypeError, match="`log_joint` must be callable"):
        vijax.taylor_reference(None, latent)
    step = vijax.make_step(mf, log_joint, optax.adam(1e-2), control_variate="taylor")
    state = vijax.init_fit_state(key, params, optax.adam(1e-2))
    with pytest.raises(ValueError, match="needs `state.control`"):
        step(state)


def test_data_models_refuse_a_control_variate(rng):
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.normal(size=20).astype(np.float32)
    model = vijax.models.data_model(
        lambda w, r: -0.5 * (r["y"] - r["x"] @ w) ** 2, {"x": x, "y": y},
        latent=jnp.zeros(3), log_prior=lambda w: -0.5 * jnp.sum(w**2))
    family = vijax.mean_field()
    with pytest.raises(ValueError, match="`control_variate` is not supported for a data model"):
        vijax.fit(jax.random.key(0), family, model, family.init(model.latent), num_steps=2,
                  progress=False, control_variate="taylor")


# ------------------------------------------------------------------ "auto"
def test_probe_ratio_matches_numpy(x64, rng):
    log_joint, latent, x, y = _logistic(rng)
    f, _ = _taylor._flat(log_joint, latent)
    d = x.shape[1]
    m0 = rng.normal(size=d) * 0.3
    z = rng.normal(size=(6, d))
    u = rng.normal(size=(6, d))
    grads = np.asarray(jax.vmap(jax.grad(f))(jnp.asarray(z)))
    got = _taylor.probe_ratio(f, jnp.asarray(m0), jnp.asarray(z), jnp.asarray(u),
                              jnp.asarray(grads))
    # NumPy: grad log p(m0) and the Hessian there, from the model's formulas.
    p0 = 1.0 / (1.0 + np.exp(-(x @ m0)))
    g0 = x.T @ (y - p0) - m0
    hess = -(x.T * (p0 * (1 - p0))) @ x - np.eye(d)
    r = grads - g0[None, :] - (z - m0[None, :]) @ hess.T

    def spread(a):
        return np.sum((a - a.mean(axis=0)) ** 2)

    want = (spread(r) + spread(r * u)) / (spread(grads) + spread(grads * u))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # A quadratic log p leaves nothing.
    quad, qlatent, _, _ = _gaussian_target(rng)
    fq, _ = _taylor._flat(quad, qlatent)
    zq = jnp.asarray(rng.normal(size=(6, 5)))
    gq = jax.vmap(jax.grad(fq))(zq)
    assert float(_taylor.probe_ratio(fq, jnp.zeros(5), zq, jnp.ones((6, 5)), gq)) < 1e-20


def test_auto_uses_the_control_variate_on_a_gaussian_posterior(x64, rng):
    model, prec, mean = _blr(rng)
    family = vijax.low_rank(rank=2)
    res = vijax.fit(jax.random.key(0), family, model.log_joint, family.init(model.latent),
                    num_steps=300, optimizer=optax.adam(1e-2), progress=False,
                    control_variate="auto")
    control = res.state.control
    assert float(control.ratio) < 1e-8
    # As good as exact on one draw: the first point is kept past the refresh interval
    # (d = 12 and 8 draws: 50 steps), probed again at every 50th step.
    assert _taylor.refresh_steps(12, 8) == 50
    assert int(control.step) == 0
    np.testing.assert_allclose(control.hess_diag, -np.diagonal(prec), rtol=1e-10)
    np.testing.assert_allclose(control.loc, ravel_pytree(model.latent)[0])


def _one_step_by_hand(family, log_joint, state, optimizer, num_samples, control, antithetic):
    """The params after one step of the estimator "auto" should pick, written out."""
    key = jax.random.fold_in(state.key, state.step)
    grads = jax.grad(lambda p: -vijax.elbo(
        key, p, family, log_joint, num_samples=num_samples, estimator="closed_entropy",
        control=control, antithetic=antithetic))(state.params)
    updates, _ = optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates)


@pytest.mark.parametrize("family_name,antithetic", [
    ("mean_field", False), ("mean_field", True), ("low_rank", True)])
@pytest.mark.parametrize("ratio,draws", [(0.1, 8), (0.01 / 8, 1), (0.3, None)])
def test_auto_steps_on_one_draw_where_that_is_as_good_as_exact(x64, rng, ratio, draws,
                                                              family_name, antithetic):
    """Between probes the step's estimator follows the point's ratio: the control variate on
    the fit's draws below AUTO_MAX_RATIO, on one draw where ``ratio * S`` is at most
    ONE_DRAW_MAX_NOISE, the plain estimator at or above AUTO_MAX_RATIO; with antithetic
    draws (pairs, or fours for low-rank) too, one draw being one unreflected draw."""
    log_joint, latent, _, _ = _logistic(rng)
    family = vijax.mean_field() if family_name == "mean_field" else vijax.low_rank(rank=2)
    opt = optax.sgd(0.1)
    params = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jnp.asarray(rng.normal(size=np.shape(x))), family.init(latent))
    ref = vijax.taylor_reference(log_joint, latent)._replace(
        step=jnp.asarray(0, jnp.int32), ratio=jnp.asarray(ratio))
    state = vijax.init_fit_state(jax.random.key(3), params, opt)._replace(
        step=jnp.asarray(7, jnp.int32), control=ref)  # not a probe step
    step = vijax.make_step(family, log_joint, opt, num_samples=8, control_variate="auto",
                           antithetic=antithetic)
    got, _ = jax.jit(step)(state)
    assert int(_taylor.auto_branch(jnp.asarray(ratio), 8)) == {8: 1, 1: 2, None: 0}[draws]
    if draws is None:
        key = jax.random.fold_in(state.key, state.step)
        grads = jax.grad(lambda p: -vijax.elbo(key, p, family, log_joint, num_samples=8,
                                               antithetic=antithetic))(params)
        want = optax.apply_updates(params, opt.update(grads, state.opt_state, params)[0])
    else:
        want = _one_step_by_hand(family, log_joint, state, opt, draws, ref, antithetic)
    for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # One draw is only a choice where the fit takes more than one.
    assert int(_taylor.auto_branch(jnp.asarray(1e-9), 1)) == 1
    assert int(_taylor.auto_branch(jnp.asarray(0.5), 1)) == 0


def test_auto_refreshes_a_point_that_is_not_as_good_as_exact(x64, rng):
    """Past the refresh interval a probe replaces a point whose ratio is not small enough for
    one draw (on a logistic target), and keeps one that is (forced here)."""
    log_joint, latent, _, _ = _logistic(rng)
    family, opt = vijax.mean_field(), optax.sgd(0.1)
    params = family.init(latent)
    params = params._replace(raw_scale=jnp.full_like(params.raw_scale, -1.0))  # sd ~0.3
    every = _taylor.refresh_steps(6, 8)
    base = vijax.init_fit_state(jax.random.key(3), params, opt)._replace(
        step=jnp.asarray(every, jnp.int32))
    step = jax.jit(vijax.make_step(family, log_joint, opt, num_samples=8,
                                   control_variate="auto"))
    ref = vijax.taylor_reference(log_joint, latent)._replace(
        loc=jnp.full(6, 0.05), step=jnp.asarray(0, jnp.int32), ratio=jnp.asarray(0.1))
    after, _ = step(base._replace(control=ref))
    assert int(after.control.step) == every  # replaced: interval elapsed, not near exact
    assert 0.01 / 8 < float(after.control.ratio) < _taylor.AUTO_MAX_RATIO
    # The same probe with a quadratic target: near exact, kept.
    def quad(z):
        return -0.5 * jnp.sum((ravel_pytree(z)[0] - 0.3) ** 2)

    qstep = jax.jit(vijax.make_step(family, quad, opt, num_samples=8, control_variate="auto"))
    qref = vijax.taylor_reference(quad, latent)._replace(
        loc=jnp.full(6, 0.05), step=jnp.asarray(0, jnp.int32), ratio=jnp.asarray(0.0))
    kept, _ = qstep(base._replace(control=qref))
    assert int(kept.control.step) == 0
    assert float(kept.control.ratio) * 8 <= _taylor.ONE_DRAW_MAX_NOISE


def test_auto_leaves_a_fit_alone_where_the_expansion_does_not_pay(x64):
    """A Laplace-like target: the expansion at any point explains nothing of the gradient's
    variation over q, so "auto" never uses it and the fit is the plain one."""

    def log_joint(z):
        return -jnp.sum(jnp.sqrt(1e-4 + jnp.square(z)))

    family = vijax.mean_field()
    init = family.init(jnp.zeros(4))
    kw = dict(num_steps=200, optimizer=optax.adam(1e-2), progress=False)
    auto = vijax.fit(jax.random.key(0), family, log_joint, init, control_variate="auto", **kw)
    plain = vijax.fit(jax.random.key(0), family, log_joint, init, **kw)
    assert float(auto.state.control.ratio) > _taylor.AUTO_MAX_RATIO
    assert not np.any(np.asarray(auto.state.control.hess_diag))  # never computed
    for a, b in zip(jax.tree_util.tree_leaves(auto.state.params),
                    jax.tree_util.tree_leaves(plain.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_default_fit_uses_auto_where_it_can_run(rng):
    model, _, _ = _blr(rng, n=30, d=4)
    kw = dict(num_steps=60, progress=False, chunk_size=30)
    mf = vijax.mean_field()
    res = vijax.fit(jax.random.key(0), mf, model.log_joint, mf.init(model.latent), **kw)
    assert isinstance(res.state.control, vijax.TaylorReference)
    # Off when asked, with a given optimizer, or for a dense factor.
    off = vijax.fit(jax.random.key(0), mf, model.log_joint, mf.init(model.latent),
                    control_variate=False, **kw)
    assert off.state.control is None
    given = vijax.fit(jax.random.key(0), mf, model.log_joint, mf.init(model.latent),
                      optimizer=optax.adam(1e-2), **kw)
    assert given.state.control is None
    fr = vijax.full_rank()
    assert vijax.fit(jax.random.key(0), fr, model.log_joint, fr.init(model.latent),
                     **kw).state.control is None

    # A log joint whose gradient does not differentiate (forward over reverse): none,
    # and no error.
    @jax.custom_vjp
    def square(x):
        return x * x

    def host_grad(x, g):  # a gradient computed outside JAX: no derivative of its own
        return jax.pure_callback(lambda a, b: np.asarray(2 * a * b, np.float32),
                                 jax.ShapeDtypeStruct(x.shape, x.dtype), x, g,
                                 vmap_method="sequential")

    square.defvjp(lambda x: (x * x, x), lambda x, g: (host_grad(x, g),))
    res = vijax.fit(jax.random.key(0), mf, lambda z: -0.5 * jnp.sum(square(z)),
                    mf.init(jnp.zeros(3)), **kw)
    assert res.state.control is None
    assert _drivers.default_control_variate(
        mf.init(jnp.zeros(3)), mf, lambda z: -0.5 * jnp.sum(z**2), "adaptive_stl") == "auto"
    assert _drivers.default_control_variate(
        mf.init(jnp.zeros(3)), mf, lambda z: -0.5 * jnp.sum(z**2), "score") is None


@pytest.mark.parametrize("family_name,num_samples", [
    ("mean_field", 6), ("mean_field", 5), ("low_rank", 8), ("low_rank", 7)])
def test_antithetic_draws_reuse_their_partners_products(x64, rng, family_name, num_samples):
    """With reflected draws half the Hessian-vector products are computed; the terms are the
    same as with every product computed (checked against a layout-free evaluation)."""
    log_joint, latent, _, _ = _logistic(rng, n=50)
    family = vijax.mean_field() if family_name == "mean_field" else vijax.low_rank(rank=2)
    params = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jnp.asarray(rng.normal(size=np.shape(x))), family.init(latent))
    ref = vijax.taylor_reference(log_joint, jax.tree_util.tree_map(lambda x: x - 0.2, latent))
    from vijax import _objectives
    z = _objectives.antithetic_sample(jax.random.key(4), params, family, num_samples)
    blocked = family_name == "low_rank"
    layout = _objectives.antithetic_layout(num_samples, blocked)
    computed, _ = _taylor.reflected(layout)
    assert len(computed) == (num_samples + 1) // 2

    def terms(p, lay):
        zz = _objectives.antithetic_sample(jax.random.key(4), p, family, num_samples)
        q_s, expected = _taylor.control_terms(ref, log_joint, p, family, zz, lay)
        return jnp.sum(q_s) + expected

    del z
    v1, g1 = jax.value_and_grad(terms)(params, layout)
    v2, g2 = jax.value_and_grad(terms)(params, None)
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_taylor_replaces_an_unused_auto_point_at_once(x64):
    """A state from an "auto" run whose point was not worth using (no Hessian diagonal)
    continues under "taylor" with a new point at its first step."""

    def log_joint(z):
        return -jnp.sum(jnp.sqrt(1e-4 + jnp.square(z)))

    family = vijax.mean_field()
    kw = dict(optimizer=optax.adam(1e-2), progress=False)
    auto = vijax.fit(jax.random.key(0), family, log_joint, family.init(jnp.zeros(4)),
                     num_steps=60, control_variate="auto", **kw)
    assert float(auto.state.control.ratio) >= _taylor.AUTO_MAX_RATIO
    more = vijax.fit(None, family, log_joint, auto.state, num_steps=1,
                     control_variate="taylor", **kw)
    assert int(more.state.control.step) == 60
    assert np.all(np.asarray(more.state.control.hess_diag) < 0)


def test_a_resumed_state_with_a_wrong_control_is_refused(rng):
    model, _, _ = _blr(rng, n=20, d=3)
    family = vijax.mean_field()
    kw = dict(optimizer=optax.adam(1e-2), progress=False, control_variate="taylor")
    res = vijax.fit(jax.random.key(0), family, model.log_joint, family.init(model.latent),
                    num_steps=5, **kw)
    bad = res.state._replace(control=res.state.control._replace(loc=jnp.zeros(2)))
    with pytest.raises(ValueError, match=r"`init_params.control.loc` must have shape \(3,\)"):
        vijax.fit(None, family, model.log_joint, bad, num_steps=5, **kw)
    with pytest.raises(TypeError, match="`init_params.control` must be a vijax.TaylorReference"):
        vijax.fit(None, family, model.log_joint, res.state._replace(control=(1,)),
                  num_steps=5, **kw)
