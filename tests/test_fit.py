"""Tests for vijax.fitting: fit, fit_batched, make_step, checkpoints."""

import os
import pickle
import re
import warnings

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax
from vijax.fitting import _engine


def orthogonal_blr(d, n=40, seed=0, dtype=np.float64):
    """BLR whose design has orthogonal columns: the posterior is diagonal."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, d)))
    x = (q * np.sqrt(n) * np.linspace(0.5, 1.5, d)).astype(dtype)
    y = (x @ rng.standard_normal(d) + rng.standard_normal(n)).astype(dtype)
    return vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)


def correlated_blr(d, n=30, seed=1, dtype=np.float64):
    """BLR with correlated columns: the posterior has strong correlations."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 1))
    x = (0.8 * base + 0.6 * rng.standard_normal((n, d))).astype(dtype)
    y = (x @ rng.standard_normal(d) + rng.standard_normal(n)).astype(dtype)
    return vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)


def std_normal_log_joint(z):
    return -0.5 * jnp.sum(jnp.square(z))


def run(key, family, log_joint, params, **kw):
    kw.setdefault("optimizer", optax.adam(0.05))
    kw.setdefault("num_samples", 4)
    kw.setdefault("progress", False)
    return vijax.fit(key, family, log_joint, params, **kw)


# --------------------------------------------------------------------------
# Convergence to the exact posterior.


@pytest.mark.parametrize(
    "family, model_fn",
    [
        (vijax.mean_field(), lambda: orthogonal_blr(3)),
        (
            vijax.mean_field(),
            lambda: vijax.models.normal_mean(
                jnp.linspace(-1.0, 2.0, 20), noise_scale=1.5, prior_loc=0.3, prior_scale=2.0
            ),
        ),
        (vijax.full_rank(), lambda: correlated_blr(3)),
        (vijax.low_rank(rank=1), lambda: correlated_blr(2)),
    ],
    ids=["mean_field-orthogonal_blr", "mean_field-normal_mean", "full_rank-blr",
         "low_rank-blr_d2"],
)
def test_conjugate_fit_reaches_exact_posterior(x64, family, model_fn):
    # STL's gradient variance vanishes at the exact posterior, so a constant
    # learning rate converges to it (Roeder et al. 2017).
    model = model_fn()
    params = family.init(model.latent)
    kl0 = float(vijax.exact_kl(params, family, model))
    res = run(
        jax.random.key(0), family, model.log_joint, params,
        optimizer=optax.adam(optax.cosine_decay_schedule(0.05, 3000, alpha=0.01)),
        num_steps=3000, estimator="stl", num_samples=4,
    )
    kl = float(vijax.exact_kl(res.params, family, model))
    assert kl0 > 1.0
    assert kl < 1e-3, (kl0, kl)
    assert res.num_skipped == 0
    assert res.trace.elbo.shape == (3000,)
    # The last ELBO estimates sit at log evidence (KL ~ 0, STL value ~ exact).
    np.testing.assert_allclose(
        np.mean(res.trace.elbo[-100:]), float(model.log_evidence), atol=0.05
    )


def test_fit_follows_dtype(dtype):
    model = orthogonal_blr(2, dtype=dtype)
    family = vijax.mean_field()
    res = run(jax.random.key(1), family, model.log_joint, family.init(model.latent),
              num_steps=50, chunk_size=16)
    assert res.params.loc.dtype == dtype
    assert res.params.raw_scale.dtype == dtype
    assert res.trace.elbo.dtype == dtype and res.trace.grad_norm.dtype == dtype
    assert res.trace.skipped.dtype == bool
    assert res.state.step.dtype == jnp.int32 and int(res.state.step) == 50
    # The ELBO improved and the gradient norms are real numbers.
    assert np.mean(res.trace.elbo[-10:]) > np.mean(res.trace.elbo[:10])
    assert np.all(np.isfinite(res.trace.grad_norm)) and np.all(res.trace.grad_norm > 0)


@pytest.mark.slow
def test_pytree_latent_and_legacy_key():
    family = vijax.full_rank()
    latent = {"a": jnp.zeros(2), "b": jnp.zeros(())}

    def log_joint(z):
        return -0.5 * (jnp.sum(jnp.square(z["a"] - 1.0)) + jnp.square(z["b"] + 2.0))

    res = run(jax.random.PRNGKey(0), family, log_joint, family.init(latent), num_steps=400)
    chex.assert_trees_all_close(res.params.loc, {"a": jnp.ones(2), "b": -2.0}, atol=0.15)
    same = run(jax.random.wrap_key_data(jax.random.PRNGKey(0)), family, log_joint,
               family.init(latent), num_steps=400)
    chex.assert_trees_all_equal(res.params, same.params)


# --------------------------------------------------------------------------
# Resuming, checkpoints, interruption.


@pytest.mark.slow
def test_resume_is_bitwise_identical_across_chunk_sizes():
    model = correlated_blr(4, dtype=np.float32)
    family = vijax.full_rank()
    params = family.init(model.latent)
    key = jax.random.key(3)
    full = run(key, family, model.log_joint, params, num_steps=300, chunk_size=100)
    first = run(key, family, model.log_joint, params, num_steps=150, chunk_size=64)
    second = run(None, family, model.log_joint, first.state, num_steps=150, chunk_size=50)
    for a, b in zip(jax.tree_util.tree_leaves(full.state),
                    jax.tree_util.tree_leaves(second.state._replace(key=0))):
        if not jnp.issubdtype(jnp.asarray(a).dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        full.trace.elbo, np.concatenate([first.trace.elbo, second.trace.elbo])
    )
    assert int(second.state.step) == 300
    # Continuing with a key given is an error: the key lives in the state.
    with pytest.raises(ValueError, match="`key` must be None"):
        run(key, family, model.log_joint, first.state, num_steps=1)


@pytest.mark.slow
def test_checkpoint_write_and_resume(tmp_path):
    model = orthogonal_blr(3, dtype=np.float32)
    family = vijax.mean_field()
    params = family.init(model.latent)
    key = jax.random.PRNGKey(5)  # legacy keys are saved as typed keys
    full = run(key, family, model.log_joint, params, num_steps=200, chunk_size=40)
    ckpt = tmp_path / "ckpt"
    part = run(key, family, model.log_joint, params, num_steps=120, chunk_size=25,
               checkpoint_dir=ckpt, checkpoint_every=50)
    assert sorted(os.listdir(ckpt)) == ["fit_state.npz"]  # no temporary left behind
    state = vijax.load_checkpoint(ckpt)
    assert int(state.step) == 120
    chex.assert_trees_all_equal(state.params, part.params)
    rest = run(None, family, model.log_joint, state, num_steps=80, chunk_size=40)
    chex.assert_trees_all_equal(rest.params, full.params)
    # Loading the file directly works too; a foreign file is refused.
    assert int(vijax.load_checkpoint(ckpt / "fit_state.npz").step) == 120
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ValueError, match="vijax checkpoint"):
        vijax.load_checkpoint(bad)


def test_checkpoint_every_saves_during_the_run(tmp_path, monkeypatch):
    saved = []
    real_save = _engine.save_checkpoint

    def spy(path, state):
        saved.append(int(state.step))
        return real_save(path, state)

    monkeypatch.setattr(_engine, "save_checkpoint", spy)
    family = vijax.mean_field()
    run(jax.random.key(0), family, std_normal_log_joint, family.init(jnp.zeros(2)),
        num_steps=100, chunk_size=10, checkpoint_dir=tmp_path, checkpoint_every=30)
    assert saved == [30, 60, 90, 100]


@pytest.mark.slow
def test_keyboard_interrupt_returns_last_completed_chunk(monkeypatch):
    family = vijax.mean_field()
    params = family.init(jnp.zeros(3))
    key = jax.random.key(7)
    full = run(key, family, std_normal_log_joint, params, num_steps=100, chunk_size=20)
    calls = []

    def hook(step):
        calls.append(step)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(_engine, "_host_hook", hook)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        part = run(key, family, std_normal_log_joint, params, num_steps=100, chunk_size=20)
    assert part.interrupted and not full.interrupted
    assert int(part.state.step) == 40 and part.trace.elbo.shape == (40,)
    monkeypatch.setattr(_engine, "_host_hook", lambda step: None)
    rest = run(None, family, std_normal_log_joint, part.state, num_steps=60, chunk_size=20)
    chex.assert_trees_all_equal(rest.params, full.params)


# --------------------------------------------------------------------------
# NaN safety.


def test_nan_region_is_survived():
    def log_joint(z):
        lp = -0.5 * jnp.sum(jnp.square(z - 0.5))
        return jnp.where(z[0] > 1.2, jnp.nan, lp)

    family = vijax.mean_field(init_scale=0.5)
    with pytest.warns(RuntimeWarning, match=r"of 500 steps \(\d+%\) were skipped") as caught:
        res = run(jax.random.key(0), family, log_joint, family.init(jnp.zeros(2)),
                  num_steps=500, optimizer=optax.adam(0.02), max_nonfinite=50)
    assert f"{int(res.num_skipped)} of 500 steps" in str(caught[0].message)
    assert caught[0].filename == __file__  # it points at the caller's line
    assert 20 < res.num_skipped < 500
    assert res.num_skipped == int(np.sum(res.trace.skipped))
    assert np.all(np.isfinite(np.asarray(res.trace.elbo)[~res.trace.skipped]))
    assert not np.any(np.isfinite(res.trace.elbo[res.trace.skipped]))
    for leaf in jax.tree_util.tree_leaves(res.params):
        assert np.all(np.isfinite(leaf))
    for leaf in jax.tree_util.tree_leaves(res.state.opt_state):
        assert np.all(np.isfinite(leaf))
    # The fit still moved toward the region it can see.
    assert float(res.params.loc[1]) > 0.3


@pytest.mark.parametrize("optimizer", [None, optax.adam(0.01)])
def test_a_log_joint_non_finite_where_q_starts_fails_at_once_not_after_every_decrease(optimizer):
    """Every step skipped: all were taken at the starting parameters, so the default's
    lowered steps (``adaptive_lr``) cannot help. It used to halve the step 8 times and
    fail at step 179, or, given fewer steps, return the start silently."""
    family = vijax.mean_field()
    init = family.init({"a": jnp.zeros(3), "b": jnp.zeros(2)})
    with pytest.raises(vijax.FitError, match="starting parameters") as caught:
        vijax.fit(jax.random.key(0), family, lambda z: jnp.nan, init, num_steps=400,
                  optimizer=optimizer, progress=False)
    assert caught.value.step == 19 and caught.value.result.num_skipped == 20
    # Fewer steps than that: the start comes back, said so.
    with pytest.warns(RuntimeWarning, match="all 10 steps were skipped"):
        result = vijax.fit(jax.random.key(0), family, lambda z: jnp.nan, init,
                           num_steps=10, optimizer=optimizer, progress=False)
    chex.assert_trees_all_equal(result.params, init)


def test_a_run_that_skips_no_step_or_under_one_percent_does_not_warn():
    family = vijax.mean_field()
    init = family.init(jnp.zeros(2))

    def log_joint(z):  # non-finite on about one step in a thousand (8 draws a step)
        return jnp.where(z[0] > 3.4, jnp.nan, -0.5 * jnp.sum(z**2))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=2000,
                           optimizer=optax.adam(0.01), progress=False)
        assert 0 < result.num_skipped < 0.01 * 2000
        vijax.fit(jax.random.key(0), family, lambda z: -0.5 * jnp.sum(z**2), init,
                  num_steps=200, optimizer=optax.adam(0.01), progress=False)


def test_skipped_step_keeps_params_and_optimizer_state():
    family = vijax.mean_field()
    opt = optax.adam(0.1)
    state = vijax.init_fit_state(jax.random.key(0), family.init(jnp.zeros(2)), opt)
    step = jax.jit(vijax.make_step(family, lambda z: jnp.sum(z) * jnp.nan, opt, num_samples=2))
    new, info = step(state)
    assert bool(info.skipped) and not np.isfinite(float(info.elbo))
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    assert int(new.step) == 1
    good = jax.jit(vijax.make_step(family, std_normal_log_joint, opt, num_samples=2))
    new, info = good(state)
    assert not bool(info.skipped) and np.isfinite(float(info.elbo))
    assert not np.array_equal(new.params.loc, state.params.loc)


def test_optimizer_that_makes_params_nonfinite_is_guarded():
    # Finite loss and gradient, but the update itself is NaN.
    bad_opt = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda g, s, p=None: (jax.tree_util.tree_map(lambda x: x * jnp.nan, g), s),
    )
    family = vijax.mean_field()
    params = family.init(jnp.zeros(2))
    with pytest.raises(vijax.FitError) as err:
        run(jax.random.key(0), family, std_normal_log_joint, params, optimizer=bad_opt,
            num_steps=10, max_nonfinite=3)
    assert err.value.step == 2
    chex.assert_trees_all_equal(err.value.state.params, params)


def test_nonfinite_update_keeps_params_and_the_optimizers_new_state():
    # SGD(0.1) that counts its calls and returns a NaN update on call 1
    # only: step 1 is skipped with the parameters of step 0 kept, the count
    # the optimizer returned is kept, and step 2 updates as usual.
    def update(g, count, p=None):
        u = jax.tree_util.tree_map(lambda x: jnp.where(count == 1, jnp.nan, -0.1 * x), g)
        return u, count + 1

    opt = optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)
    family = vijax.mean_field()
    loc0 = jnp.array([3.0, -2.0])
    state = vijax.init_fit_state(
        jax.random.key(0), family.init(jnp.zeros(2))._replace(loc=loc0), opt
    )
    step = jax.jit(vijax.make_step(family, std_normal_log_joint, opt, num_samples=2))
    s1, i0 = step(state)
    s2, i1 = step(s1)
    s3, i2 = step(s2)
    assert [bool(i.skipped) for i in (i0, i1, i2)] == [False, True, False]
    assert np.isfinite(float(i1.elbo)) and np.isfinite(float(i1.grad_norm))
    chex.assert_trees_all_equal(s2.params, s1.params)
    assert [int(s.opt_state) for s in (s1, s2, s3)] == [1, 2, 3]
    assert int(s2.step) == 2
    # Step 2 is an SGD step from step 1's parameters.
    assert not np.array_equal(s3.params.loc, s2.params.loc)
    assert np.all(np.isfinite(np.asarray(s3.params.loc)))


@pytest.mark.slow
def test_consecutive_nonfinite_steps_raise_with_last_finite_state():
    # The target is at 10 but the log joint is NaN beyond 1: the first SGD step
    # jumps to ~3, where with a tiny scale every later sample is NaN.
    def log_joint(z):
        return jnp.where(z[0] > 1.0, jnp.nan, -0.5 * jnp.square(z[0] - 10.0))

    family = vijax.mean_field(init_scale=1e-3)
    with pytest.raises(vijax.FitError, match=r"stopped at step \d+: 7 consecutive") as err:
        run(jax.random.key(0), family, log_joint, family.init(jnp.zeros(1)),
            num_steps=2000, optimizer=optax.sgd(0.3), max_nonfinite=7, chunk_size=64)
    e = err.value
    assert f"step {e.step}:" in str(e)
    assert int(e.state.step) == e.step + 1
    assert e.result.state is e.state
    assert e.result.trace.elbo.shape == (e.step + 1,)
    assert np.all(e.result.trace.skipped[-7:]) and not e.result.trace.skipped[-8]
    loc = float(e.state.params.loc[0])
    assert np.isfinite(loc) and loc > 1.0  # the last finite update, kept
    # The error's state continues like any other.
    res = run(None, family, lambda z: -0.5 * jnp.sum(jnp.square(z)), e.state,
              num_steps=5, optimizer=optax.sgd(0.3))
    assert int(res.state.step) == e.step + 6


def test_nonfinite_initial_params_are_rejected():
    family = vijax.mean_field()
    params = family.init(jnp.zeros(2))._replace(raw_scale=jnp.array([0.0, jnp.nan]))
    with pytest.raises(ValueError, match="`init_params` must be finite"):
        run(jax.random.key(0), family, std_normal_log_joint, params, num_steps=1)


# --------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"num_steps": 0}, ValueError, r"`num_steps` must be an int >= 1; got 0"),
        ({"num_steps": 2.5}, TypeError, r"`num_steps` must be an int"),
        ({"optimizer": optax.adam}, TypeError, r"optax.GradientTransformation.*adam\(learning_rate\)"),
        ({"optimizer": "adam"}, TypeError, r"`optimizer` must be an optax.GradientTransformation.*got str"),
        ({"num_samples": 0}, ValueError, r"`num_samples`"),
        ({"estimator": "magic"}, ValueError, r"`estimator` must be one of"),
        ({"chunk_size": 0}, ValueError, r"`chunk_size`"),
        ({"max_nonfinite": 0}, ValueError, r"`max_nonfinite`"),
        ({"progress": "yes"}, TypeError, r"`progress`"),
        ({"tol": -1.0}, ValueError, r"`tol`"),
        ({"checkpoint_every": 10}, ValueError, r"`checkpoint_every` needs `checkpoint_dir`"),
    ],
)
def test_bad_arguments_raise(kwargs, error, pattern):
    family = vijax.mean_field()
    base = dict(optimizer=optax.adam(0.1), num_steps=10, progress=False)
    base.update(kwargs)
    with pytest.raises(error, match=pattern):
        vijax.fit(jax.random.key(0), family, std_normal_log_joint, family.init(jnp.zeros(2)),
                  **base)


def test_params_that_do_not_match_the_family_raise():
    opt = optax.adam(0.1)
    fr = vijax.full_rank().init(jnp.zeros(2))
    with pytest.raises(TypeError, match="`init_params` do not match the 'mean_field' family"):
        vijax.fit(jax.random.key(0), vijax.mean_field(), std_normal_log_joint, fr,
                  optimizer=opt, num_steps=1, progress=False)
    with pytest.raises(TypeError, match="`family` must be a vijax.VariationalFamily"):
        vijax.fit(jax.random.key(0), "mean_field", std_normal_log_joint, fr,
                  optimizer=opt, num_steps=1)
    with pytest.raises(TypeError, match="`log_joint` must be callable"):
        vijax.fit(jax.random.key(0), vijax.full_rank(), 3.0, fr, optimizer=opt, num_steps=1)
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        vijax.fit(0, vijax.full_rank(), std_normal_log_joint, fr, optimizer=opt, num_steps=1)
    # A vijax model in place of its log joint: the error says what to pass, and
    # points to fit_exact where the model gives E_q[log p].
    x = np.random.default_rng(0).normal(size=(20, 2))
    glm = vijax.models.logistic_regression(x, (x[:, 0] > 0).astype(x.dtype))
    with pytest.raises(TypeError, match=r"got Model\. For a vijax model, pass `model\.log_joint` "
                                        r"\(this model gives E_q\[log p\] exactly: vijax\.fit_exact"):
        vijax.fit(jax.random.key(0), vijax.full_rank(), glm, fr, num_steps=1)
    plain = vijax.models.Model(std_normal_log_joint, jnp.zeros(2))
    with pytest.raises(TypeError, match=r"pass `model\.log_joint`\.$"):
        vijax.elbo(jax.random.key(0), fr, vijax.full_rank(), plain, num_samples=1)
    # A state from one optimizer does not continue under another.
    state = vijax.init_fit_state(jax.random.key(0), fr, opt)
    with pytest.raises(ValueError, match="`init_params.opt_state` does not match"):
        vijax.fit(None, vijax.full_rank(), std_normal_log_joint, state,
                  optimizer=optax.sgd(0.1), num_steps=1, progress=False)


# --------------------------------------------------------------------------
# Compilation cache.


@pytest.mark.slow
def test_second_fit_does_not_trace_again():
    traces = []

    def log_joint(z):
        traces.append(1)  # runs only while JAX traces
        return std_normal_log_joint(z)

    family, opt = vijax.full_rank(), optax.adam(0.05)
    params = family.init(jnp.zeros(3))
    run(jax.random.key(0), family, log_joint, params, optimizer=opt, num_steps=100,
        chunk_size=32)
    n = len(traces)
    assert n >= 1
    run(jax.random.key(0), family, log_joint, params, optimizer=opt, num_steps=100,
        chunk_size=32)
    run(jax.random.key(1), family, log_joint, params, optimizer=opt, num_steps=37,
        chunk_size=32)
    res = run(jax.random.key(2), family, log_joint, params, optimizer=opt, num_steps=1000,
              chunk_size=32)
    run(None, family, log_joint, res.state, optimizer=opt, num_steps=5, chunk_size=32)
    assert len(traces) == n
    assert res.trace.elbo.shape == (1000,)
    # The counter does see a new configuration.
    run(jax.random.key(0), family, log_joint, params, optimizer=opt, num_steps=10,
        chunk_size=16)
    assert len(traces) > n


# --------------------------------------------------------------------------
# Batched fits (seed sweeps in one compiled loop).


@pytest.mark.slow
def test_fit_batched_matches_separate_fits(x64):
    model = correlated_blr(3)
    family = vijax.full_rank()
    params = family.init(model.latent)
    keys = jax.random.split(jax.random.key(11), 4)
    opt = optax.adam(0.05)  # one object: the separate fits share one compilation
    batch = vijax.fit_batched(keys, family, model.log_joint, params,
                              optimizer=opt, num_steps=150, num_samples=4,
                              progress=False, chunk_size=64)
    assert batch.trace.elbo.shape == (4, 150)
    assert batch.num_skipped.shape == (4,)
    assert batch.state.step.shape == (4,)
    for b in range(4):
        single = run(keys[b], family, model.log_joint, params, optimizer=opt,
                     num_steps=150, chunk_size=64)
        member = jax.tree_util.tree_map(lambda a: a[b], batch.params)
        chex.assert_trees_all_close(member, single.params, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(batch.trace.elbo[b], single.trace.elbo, rtol=1e-9)
    # Members differ (different seeds), and a batched state continues.
    assert not np.allclose(batch.params.loc[0], batch.params.loc[1])
    more = vijax.fit_batched(None, family, model.log_joint, batch.state,
                             optimizer=opt, num_steps=10, num_samples=4,
                             progress=False, chunk_size=64)
    np.testing.assert_array_equal(np.asarray(more.state.step), [160] * 4)
    with pytest.raises(ValueError, match="`keys` must be None.*got"):
        vijax.fit_batched(keys, family, model.log_joint, batch.state, optimizer=opt,
                          num_steps=1, num_samples=4, progress=False)


@pytest.mark.slow
def test_fit_batched_over_initial_params():
    family = vijax.mean_field()
    inits = jax.vmap(lambda m: family.init(m))(jnp.array([[-3.0, 0.0], [3.0, 1.0]]))
    keys = jax.random.split(jax.random.key(0), 2)
    res = vijax.fit_batched(keys, family, std_normal_log_joint, inits, params_batched=True,
                            optimizer=optax.adam(0.05), num_steps=20, num_samples=2,
                            progress=False)
    single = run(keys[1], family, std_normal_log_joint,
                 jax.tree_util.tree_map(lambda a: a[1], inits), optimizer=optax.adam(0.05),
                 num_steps=20, num_samples=2)
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda a: a[1], res.params), single.params, rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="leading batch axis of size 3"):
        vijax.fit_batched(jax.random.split(jax.random.key(0), 3), family,
                          std_normal_log_joint, inits, params_batched=True,
                          optimizer=optax.adam(0.05), num_steps=2, progress=False)


@pytest.mark.slow
def test_make_step_vmaps_over_keys():
    family, opt = vijax.mean_field(), optax.adam(0.1)
    step = vijax.make_step(family, std_normal_log_joint, opt, num_samples=2)
    keys = jax.random.split(jax.random.key(0), 3)
    states = jax.vmap(vijax.init_fit_state, in_axes=(0, None, None))(
        keys, family.init(jnp.zeros(2)), opt)
    new, info = jax.jit(jax.vmap(step))(states)
    assert info.elbo.shape == (3,) and new.params.loc.shape == (3, 2)
    one, _ = jax.jit(step)(jax.tree_util.tree_map(lambda a: a[1], states))
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[1], new.params),
                                one.params, rtol=1e-6)


# --------------------------------------------------------------------------
# Early stopping and progress.


@pytest.mark.slow
def test_early_stopping_stops_a_converged_fit():
    model = orthogonal_blr(2, dtype=np.float32)
    family = vijax.mean_field()
    params = family.init(model.latent)
    res = run(jax.random.key(0), family, model.log_joint, params, num_steps=20000,
              chunk_size=100, estimator="stl", tol=1e-4, window=100, patience=2)
    assert res.stopped_early
    assert 300 <= res.trace.elbo.shape[0] < 20000
    assert res.trace.elbo.shape[0] % 100 == 0  # checked between chunks
    assert float(vijax.exact_kl(res.params, family, model)) < 0.05
    off = run(jax.random.key(0), family, model.log_joint, params, num_steps=300,
              chunk_size=100)
    assert not off.stopped_early and off.trace.elbo.shape == (300,)


def test_progress_bar_is_tqdms(capsys):
    family = vijax.mean_field()
    params = family.init(jnp.zeros(2))
    run(jax.random.key(0), family, std_normal_log_joint, params, num_steps=30,
        chunk_size=10, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"vijax.fit: 100%.*30/30", err) and "elbo=" in err


def test_progress_default_is_off_when_stderr_is_not_a_terminal(capsys):
    family = vijax.mean_field()
    vijax.fit(jax.random.key(0), family, std_normal_log_joint, family.init(jnp.zeros(2)),
              optimizer=optax.adam(0.1), num_steps=10, num_samples=2)
    assert capsys.readouterr().err == ""


def _item_response(rng):
    """A Rasch model: 250 abilities, 60 difficulties and a mean (d = 311), float32."""
    theta, beta = rng.normal(size=250), rng.normal(size=60)
    logits = theta[:, None] - beta[None, :] + 0.5
    y = jnp.asarray(rng.random(logits.shape) < 1.0 / (1.0 + np.exp(-logits)), jnp.float32)

    def log_joint(z):
        eta = z["theta"][:, None] - z["beta"][None, :] + z["mu"]
        prior = jnp.sum(z["theta"] ** 2) + jnp.sum(z["beta"] ** 2) + z["mu"] ** 2
        return jnp.sum(y * eta - jax.nn.softplus(eta)) - 0.5 * prior

    latent = {"theta": jnp.zeros(250), "beta": jnp.zeros(60), "mu": jnp.zeros(())}
    family = vijax.full_rank()
    flat, unravel = jax.flatten_util.ravel_pytree(latent)
    loc = jax.random.uniform(jax.random.key(1), flat.shape, minval=-2.0, maxval=2.0)
    return family, log_joint, family.init(latent)._replace(loc=unravel(loc))


@pytest.mark.slow
def test_default_full_rank_fit_of_an_item_response_model_stays_well_conditioned():
    # Regression: the mean started in U(-2, 2), Adam(1e-2), the default
    # estimator. Plain STL adds -tril(U^{-T} eps eps^T) to the gradient of the
    # unit-triangular factor U = I + N: zero mean, but as large as ||U^{-1}||.
    # Adam turns it into a random walk of all d(d-1)/2 entries, so U grew
    # exponentially ill-conditioned (in float64 too) and the fit raised
    # FitError (see the next test); adaptive_stl does not.
    family, log_joint, params = _item_response(np.random.default_rng(0))
    res = vijax.fit(jax.random.key(0), family, log_joint, params, optimizer=optax.adam(1e-2),
                    num_steps=400, chunk_size=400, progress=False)
    assert res.num_skipped == 0
    assert np.max(np.asarray(res.trace.grad_norm)) < 1e5
    tril = np.asarray(family.to_gaussian(res.params).scale.tril, np.float64)
    assert np.linalg.cond(tril) < 1e4


@pytest.mark.slow
def test_plain_stl_fails_on_the_item_response_model():
    # The regression above can fail: the same fit with plain STL does.
    family, log_joint, params = _item_response(np.random.default_rng(0))
    with pytest.raises(vijax.FitError, match="stopped at step"):
        vijax.fit(jax.random.key(0), family, log_joint, params, optimizer=optax.adam(1e-2),
                  num_steps=400, chunk_size=400, progress=False, estimator="stl")


def test_a_fresh_fit_without_a_key_says_when_none_is_a_key():
    family = vijax.mean_field()
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key .*got None.*FitState"):
        vijax.fit(None, family, lambda z: -0.5 * jnp.sum(z**2), family.init(jnp.zeros(2)),
                  optimizer=optax.adam(0.1), num_steps=10, progress=False)


def test_init_fit_state_makes_a_state_for_a_control_variate_step():
    family = vijax.mean_field()
    params = family.init(jnp.zeros(3))
    opt = optax.adam(0.05)
    log_joint = lambda z: -0.5 * jnp.sum((z - 1.0) ** 2)  # noqa: E731
    step = jax.jit(vijax.make_step(family, log_joint, opt, num_samples=4,
                                   control_variate="taylor"))
    with pytest.raises(ValueError, match=r"vijax.init_fit_state\(.*control_variate='taylor'"):
        step(vijax.init_fit_state(jax.random.key(0), params, opt))
    state = vijax.init_fit_state(jax.random.key(0), params, opt, control_variate="taylor")
    for _ in range(3):
        state, info = step(state)
    assert int(state.control.step) == 0 and not bool(info.skipped)
    # The reference point was taken at the first step, at q's mean then (0).
    np.testing.assert_allclose(state.control.loc, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="control_variate"):
        vijax.init_fit_state(jax.random.key(0), params, opt, control_variate="taylr")
    with pytest.raises(ValueError, match="params.loc"):
        vijax.init_fit_state(jax.random.key(0), {"w": jnp.zeros(2)}, opt,
                             control_variate="auto")


def test_a_fit_whose_steps_run_out_before_its_rule_stops_it_says_so():
    family = vijax.mean_field()
    init = family.init(jnp.zeros(3))
    log_joint = lambda z: -0.5 * jnp.sum(z**2)  # noqa: E731
    with pytest.warns(RuntimeWarning, match=r"num_steps=100 steps before its stopping rule"):
        result = vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=100,
                           progress=False)
    assert not result.stopped_early
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        # Stopped by the rule, or no rule (a plain optimizer): nothing to say.
        assert vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=100_000,
                         progress=False).stopped_early
        vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=100,
                  optimizer=optax.adam(0.01), progress=False)


def test_a_rule_that_stops_the_fit_at_its_last_step_counts_as_stopped():
    """The verdict at the last step was dropped: stopped_early False, and a warning that
    the steps ran out before the rule stopped the fit."""
    family = vijax.mean_field()
    init = family.init(jnp.zeros(3))
    log_joint = lambda z: -0.5 * jnp.sum(z**2)  # noqa: E731
    free = vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=100_000,
                     progress=False)
    assert free.stopped_early
    last = int(free.state.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        capped = vijax.fit(jax.random.key(0), family, log_joint, init, num_steps=last,
                           progress=False)
    assert capped.stopped_early and int(capped.state.step) == last
    chex.assert_trees_all_equal(capped.params, free.params)
