"""Tests for vijax.iterate_average and vijax.averaged_params (Polyak-Ruppert averaging)."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax
from references import np_kl, np_moments
from vijax.optim._averaging import _find_states, restart_average


def _tree(rng, dtype):
    return {
        "a": jnp.asarray(rng.normal(size=3), dtype),
        "b": jnp.asarray(rng.normal(size=(2, 2)), dtype),
    }


def _run(opt, params, grads_seq):
    """Applies ``opt`` to a sequence of gradients; returns the states and iterates."""
    state = opt.init(params)
    update = jax.jit(opt.update)
    states, iterates = [], []
    for g in grads_seq:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        states.append(state)
        iterates.append(params)
    return states, iterates


@pytest.mark.parametrize("start", [0, 4])
def test_average_is_the_mean_of_the_iterates_after_start(dtype, rng, start):
    params = _tree(rng, dtype)
    grads = [_tree(rng, dtype) for _ in range(10)]
    states, iterates = _run(vijax.iterate_average(optax.sgd(0.3), start=start), params, grads)
    np_iterates = [jax.tree_util.tree_map(np.asarray, p) for p in iterates]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for t, state in enumerate(states, start=1):
        assert int(state.count) == t
        assert int(state.num_averaged) == max(t - start, 0)
        if t <= start:  # before averaging: the latest iterate
            want = np_iterates[t - 1]
        else:  # the NumPy mean of the iterates after updates start+1 .. t
            want = jax.tree_util.tree_map(
                lambda *xs: np.mean(np.stack(xs), axis=0), *np_iterates[start:t]
            )
        got = vijax.averaged_params(state)
        chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)
        chex.assert_trees_all_equal_dtypes(got, params)


def test_the_wrapped_optimizer_steps_exactly_as_without_the_wrapper(rng):
    params = _tree(rng, np.float32)
    grads = [_tree(rng, np.float32) for _ in range(6)]
    inner = optax.adam(0.1)
    wrapped_states, wrapped = _run(vijax.iterate_average(inner, start=2), params, grads)
    plain_states, plain = _run(inner, params, grads)
    chex.assert_trees_all_equal(wrapped, plain)
    chex.assert_trees_all_equal(wrapped_states[-1].inner_state, plain_states[-1])


def test_a_non_finite_iterate_is_left_out_of_the_average(rng):
    params = _tree(rng, np.float32)
    grads = [_tree(rng, np.float32) for _ in range(5)]
    opt = vijax.iterate_average(optax.sgd(0.1), start=0)
    states, iterates = _run(opt, params, grads[:3])
    before = states[-1]
    bad = jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan), grads[3])
    _, after = opt.update(bad, before, iterates[-1])
    assert int(after.count) == 4
    assert int(after.num_averaged) == 3
    chex.assert_trees_all_equal(after.average, before.average)
    # The next finite iterate is folded in as the fourth.
    good, later = opt.update(grads[4], after, iterates[-1])
    new = optax.apply_updates(iterates[-1], good)
    want = jax.tree_util.tree_map(lambda a, n: a + (n - a) / 4, before.average, new)
    assert int(later.num_averaged) == 4
    chex.assert_trees_all_close(later.average, want, rtol=1e-6)


def test_a_space_averages_the_images_and_reads_them_back(dtype, rng):
    """``space=(forward, inverse)``: the mean of forward(iterates), read back through inverse."""
    params = _tree(rng, dtype)
    grads = [_tree(rng, dtype) for _ in range(8)]
    space = (lambda p: jax.tree_util.tree_map(jnp.exp, p),
             lambda m: jax.tree_util.tree_map(jnp.log, m))
    start, eta = 2, 3.0
    opt = vijax.iterate_average(optax.sgd(0.3), start=start, eta=eta, space=space)
    states, iterates = _run(opt, params, grads)
    plain_states, plain = _run(optax.sgd(0.3), params, grads)
    chex.assert_trees_all_equal(iterates, plain)  # the steps are unchanged
    tol = 1e-12 if dtype == np.float64 else 2e-5
    images = [jax.tree_util.tree_map(lambda x: np.exp(np.asarray(x, np.float64)), p)
              for p in iterates]
    for t, state in enumerate(states, start=1):
        if t <= start:
            want = images[t - 1]
        else:  # polynomial-decay weights, computed from their definition
            n = t - start
            w = np.array([(1 + eta) / (k + eta) for k in range(1, n + 1)])
            coef = [w[k] * np.prod(1 - w[k + 1:]) for k in range(n)]
            want = jax.tree_util.tree_map(
                lambda *xs: sum(c * x for c, x in zip(coef, xs)), *images[start:t])
        chex.assert_trees_all_close(state.space_average, want, rtol=tol, atol=tol)
        got = vijax.averaged_params(state)
        chex.assert_trees_all_close(got, jax.tree_util.tree_map(np.log, want),
                                    rtol=tol, atol=tol)
        chex.assert_trees_all_equal_dtypes(got, params)
    # restart_average: the next averaged iterate replaces the average.
    restarted = restart_average(states[-1], iterates[-1])
    _, after = opt.update(grads[0], restarted, iterates[-1])
    new = jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, iterates[-1], grads[0])
    chex.assert_trees_all_close(after.average, new, rtol=tol, atol=tol)


def test_the_diagonal_gaussian_families_average_variances(dtype, rng):
    """mean_field and low_rank average ``softplus(raw_scale)**2``; the others their params."""
    for family in (vijax.mean_field(), vijax.low_rank(rank=2)):
        params = family.init(jnp.zeros(4, dtype))
        params = params._replace(raw_scale=jnp.asarray(rng.normal(size=4) * 3, dtype))
        forward, inverse = family.average_space
        image = forward(params)
        sd = np.log1p(np.exp(np.asarray(params.raw_scale, np.float64)))
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(np.asarray(image.raw_scale), sd**2, rtol=tol)
        chex.assert_trees_all_close(image.loc, params.loc)
        chex.assert_trees_all_close(inverse(image), params, rtol=tol, atol=tol)
        # A variance that underflows reads back as a finite, tiny scale.
        back = inverse(image._replace(raw_scale=jnp.zeros(4, dtype)))
        assert np.all(np.isfinite(np.asarray(back.raw_scale)))
        assert np.all(np.asarray(jax.nn.softplus(back.raw_scale)) < 1e-15)
    assert vijax.full_rank().average_space is None
    assert vijax.low_rank_precision(rank=2).average_space is None


def test_fit_auto_stop_averages_in_the_family_space():
    """``fit``'s rule keeps its average in ``family.average_space`` where there is one."""
    def log_joint(z):
        return -0.5 * jnp.sum(jnp.square(z - 1.0))

    for family, has_space in ((vijax.mean_field(), True), (vijax.full_rank(), False)):
        result = vijax.fit(jax.random.key(0), family, log_joint, family.init(jnp.zeros(3)),
                           num_steps=40, progress=False)
        (state,) = _find_states(result.state.opt_state)
        assert (state.space_average is not None) == has_space
        if has_space:
            forward, inverse = family.average_space
            chex.assert_trees_all_close(state.average, inverse(state.space_average))


def _correlated_blr(rng, d=5, n=30):
    x = rng.normal(size=(n, d))
    x[:, 1] += 0.9 * x[:, 0]  # correlated posterior: mean-field is not exact
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(y), noise_scale=0.5, prior_scale=1.0
    )
    prec = x.T @ x / 0.25 + np.eye(d)
    mean = np.linalg.solve(prec, x.T @ y / 0.25)
    return model, mean, np.linalg.inv(prec), prec


@pytest.mark.slow
def test_averaging_brings_a_constant_step_fit_closer_to_the_mean_field_optimum(x64, rng):
    """The Monte Carlo claim: over 32 keys, the averaged q is closer to the optimum.

    With a constant step, the stl noise does not vanish at the mean-field
    optimum, so the last iterate jitters; its mean over the tail does not.
    The excess KL over the mean-field optimum (computed in NumPy) is compared
    key by key.
    """
    model, mean, cov, prec = _correlated_blr(rng)
    best_kl = np_kl(mean, np.diag(1.0 / np.diag(prec)), mean, cov)
    family = vijax.mean_field()
    opt = vijax.iterate_average(vijax.natural_gradient(family, 0.3, max_variance_growth=2.0), start=500)
    keys = jax.random.split(jax.random.key(0), 32)
    result = vijax.fit_batched(
        keys, family, model.log_joint, family.init(model.latent), optimizer=opt,
        num_steps=3000, num_samples=4, progress=False,
    )
    averaged = vijax.averaged_params(result)
    assert int(result.state.opt_state.num_averaged[0]) == 2500

    def excess(batched, i):
        m, c = np_moments("mean_field", jax.tree_util.tree_map(lambda x: x[i], batched))
        return np_kl(m, c, mean, cov) - best_kl

    last = np.array([excess(result.params, i) for i in range(32)])
    avg = np.array([excess(averaged, i) for i in range(32)])
    diff = last - avg
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert diff.mean() > 3 * se, (diff.mean(), se)
    assert avg.mean() < 0.2 * last.mean(), (avg.mean(), last.mean())


@pytest.mark.slow
def test_averaging_variances_removes_the_bias_a_constant_step_leaves(x64, rng):
    """The Monte Carlo claim behind ``family.average_space``, over 16 keys.

    Adam at a constant step, with the same keys (so the same iterates) and
    two averages: of the parameters, and of the variances. The mean of a
    jittering ``raw_scale`` is biased low by about the jitter's variance; the
    mean variance is not. The excess KL over the mean-field optimum (NumPy)
    is compared key by key.
    """
    model, mean, cov, prec = _correlated_blr(rng, d=20, n=200)
    best_kl = np_kl(mean, np.diag(1.0 / np.diag(prec)), mean, cov)
    family = vijax.mean_field()
    keys = jax.random.split(jax.random.key(1), 16)
    excess = {}
    for space in (None, family.average_space):
        opt = vijax.iterate_average(optax.adam(0.3), start=500, space=space)
        result = vijax.fit_batched(
            keys, family, model.log_joint, family.init(model.latent), optimizer=opt,
            num_steps=3000, num_samples=4, progress=False)
        averaged = vijax.averaged_params(result)
        excess[space is None] = np.array([
            np_kl(*np_moments("mean_field", jax.tree_util.tree_map(lambda x: x[i], averaged)),
                  mean, cov) - best_kl for i in range(16)])
    diff = excess[True] - excess[False]
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert diff.mean() > 3 * se, (diff.mean(), se)
    assert excess[False].mean() < 0.2 * excess[True].mean(), excess


@pytest.mark.slow
def test_checkpoint_resume_of_an_averaged_fit_is_bitwise(tmp_path, rng):
    model, *_ = _correlated_blr(rng)
    family = vijax.mean_field()
    opt = vijax.iterate_average(optax.adam(0.05), start=100)
    params = family.init(model.latent)
    kw = dict(optimizer=opt, progress=False, chunk_size=50)
    full = vijax.fit(jax.random.key(1), family, model.log_joint, params, num_steps=300, **kw)
    vijax.fit(jax.random.key(1), family, model.log_joint, params, num_steps=150,
              checkpoint_dir=tmp_path, **kw)
    assert os.path.exists(tmp_path / "fit_state.npz")
    resumed = vijax.fit(None, family, model.log_joint, vijax.load_checkpoint(tmp_path),
                        num_steps=150, **kw)
    chex.assert_trees_all_equal(vijax.averaged_params(resumed), vijax.averaged_params(full))
    assert int(resumed.state.opt_state.num_averaged) == 200


def test_a_wrapped_chain_averages_the_real_iterates(rng):
    # The documented form: the wrapper outside the whole chain.
    params = _tree(rng, np.float32)
    grads = [_tree(rng, np.float32) for _ in range(6)]
    opt = vijax.iterate_average(optax.chain(optax.scale_by_adam(), optax.scale(-0.1)), start=2)
    states, iterates = _run(opt, params, grads)
    want = jax.tree_util.tree_map(lambda *xs: np.mean(np.stack(xs), axis=0), *iterates[2:])
    chex.assert_trees_all_close(vijax.averaged_params(states[-1]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fit_batched_averages_each_member_as_fit_does(rng):
    model, *_ = _correlated_blr(rng)
    family = vijax.mean_field()
    opt = vijax.iterate_average(optax.adam(0.05), start=50)
    params = family.init(model.latent)
    keys = jax.random.split(jax.random.key(2), 3)
    kw = dict(optimizer=opt, num_steps=200, progress=False)
    batched = vijax.averaged_params(
        vijax.fit_batched(keys, family, model.log_joint, params, **kw))
    for b in range(3):
        single = vijax.averaged_params(vijax.fit(keys[b], family, model.log_joint, params, **kw))
        member = jax.tree_util.tree_map(lambda x: x[b], batched)
        chex.assert_trees_all_close(member, single, rtol=1e-4, atol=1e-6)


def test_a_pytree_latent_in_float32_through_fit():
    def log_joint(z):  # N(1, 1) on every coordinate of a dict latent
        return -0.5 * sum(jnp.sum(jnp.square(x - 1.0)) for x in jax.tree_util.tree_leaves(z))

    latent = {"w": jnp.zeros((2, 2), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    family = vijax.mean_field()
    params = family.init(latent)
    result = vijax.fit(jax.random.key(0), family, log_joint, params, num_steps=300,
                       optimizer=vijax.iterate_average(optax.adam(0.05), start=100),
                       estimator="reparam", progress=False)
    averaged = vijax.averaged_params(result)
    chex.assert_trees_all_equal_structs(averaged, params)
    chex.assert_trees_all_equal_dtypes(averaged, params)
    assert int(result.state.opt_state.num_averaged) == 200
    chex.assert_trees_all_close(averaged.loc, jax.tree_util.tree_map(jnp.ones_like, latent),
                                atol=0.1)


def test_init_under_vmap_copies_the_params(rng):
    opt = vijax.iterate_average(optax.sgd(0.1), start=0)
    batched = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), _tree(rng, np.float32))
    state = jax.vmap(opt.init)(batched)
    for p, a in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(state.average)):
        assert p is not a and p.unsafe_buffer_pointer() != a.unsafe_buffer_pointer()
        chex.assert_trees_all_equal(p, a)


def test_averaged_params_finds_the_state_inside_a_chain_and_a_fit_state(rng):
    params = _tree(rng, np.float32)
    opt = optax.chain(optax.clip(1.0), vijax.iterate_average(optax.sgd(0.1), start=0))
    state = opt.init(params)
    chex.assert_trees_all_equal(vijax.averaged_params(state), params)
    fit_state = vijax.init_fit_state(jax.random.key(0), params, opt)
    chex.assert_trees_all_equal(vijax.averaged_params(fit_state), params)


def test_the_average_does_not_share_buffers_with_params(rng):
    params = _tree(rng, np.float32)
    state = vijax.iterate_average(optax.sgd(0.1), start=0).init(params)
    for p, a in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.average)):
        assert p is not a
        assert p.unsafe_buffer_pointer() != a.unsafe_buffer_pointer()
    # With a space whose forward passes a leaf through (the mean-field loc).
    family = vijax.mean_field()
    mf = family.init(jnp.zeros(3))
    state = vijax.iterate_average(optax.sgd(0.1), start=0, space=family.average_space).init(mf)
    assert mf.loc.unsafe_buffer_pointer() != state.space_average.loc.unsafe_buffer_pointer()


def test_bad_arguments_name_the_argument(rng):
    with pytest.raises(TypeError, match="`optimizer` must be an optax.GradientTransformation"):
        vijax.iterate_average(optax.adam, start=0)
    with pytest.raises(ValueError, match=r"`start` must be an int >= 0; got -1"):
        vijax.iterate_average(optax.sgd(0.1), start=-1)
    with pytest.raises(ValueError, match=r"`start` must be an int in \[0, 2147483647\]"):
        vijax.iterate_average(optax.sgd(0.1), start=2**31)
    with pytest.raises(TypeError):  # start is keyword-only
        vijax.iterate_average(optax.sgd(0.1), 10)
    for bad in (1.5, True, "10"):
        with pytest.raises(TypeError, match="`start` must be an int >= 0"):
            vijax.iterate_average(optax.sgd(0.1), start=bad)
    opt = vijax.iterate_average(optax.sgd(0.1), start=0)
    params = _tree(rng, np.float32)
    with pytest.raises(ValueError, match="`params` must be passed"):
        opt.update(params, opt.init(params))
    with pytest.raises(TypeError, match="got a tuple with none"):
        vijax.averaged_params(optax.sgd(0.1).init(params))
    fitted = vijax.init_fit_state(jax.random.key(0), params, optax.sgd(0.1))
    with pytest.raises(TypeError, match="got a FitState with none"):
        vijax.averaged_params(fitted)
    for bad in ((jnp.exp,), (jnp.exp, 1.0), [jnp.exp, jnp.log]):
        with pytest.raises(TypeError, match="`space` must be None or a pair of callables"):
            vijax.iterate_average(optax.sgd(0.1), start=0, space=bad)
    with pytest.raises(TypeError, match="`family.average_space` must be None or a pair"):
        vijax.fit(jax.random.key(0), vijax.mean_field()._replace(average_space=(jnp.exp,)),
                  lambda z: -jnp.sum(z**2), vijax.mean_field().init(jnp.zeros(2)),
                  num_steps=10, progress=False)
    twice = vijax.iterate_average(vijax.iterate_average(optax.sgd(0.1), start=0), start=0)
    with pytest.raises(ValueError, match="got 2"):
        vijax.averaged_params(twice.init(params))
