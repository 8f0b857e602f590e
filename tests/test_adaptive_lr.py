"""``vijax.adaptive_lr`` and ``fit``'s default: Adam whose step the auto_stop rule halves.

The claims: the wrapper is its optimizer with the step multiplied by a scale
kept in the state; ``fit`` without an optimizer stops on its own, having
halved the step at least once, with q within the rule's tolerance of the
family's optimum (exact KL in NumPy, float64) on Bayesian linear regression
whatever the conditioning, in float32 too; a stage restarts the iterate
average at its candidate; with the decreases spent, a stage that still gains
restarts at the same step instead of stopping; the result continues; and
every combination that could not lower the step is refused before any work.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax
from references import correlated_blr, np_kl
from vijax.fitting import _drivers
from vijax.fitting._stopping import TOL, AdaptiveStop
from vijax.optim._adaptive import check_nesting


def _blr(d, rho, seed=0):
    model, _, _, mean, prec = correlated_blr(d, rho, seed=seed)
    return model, mean, prec


def _np_kl_to_posterior(mq, cq, mp, prec):
    return np_kl(mq, cq, mp, np.linalg.inv(prec))


def _moments(family, params):
    g = family.to_gaussian(params)
    return np.asarray(g.mean, np.float64), np.asarray(g.scale.cov(), np.float64)


def test_the_wrapper_is_its_optimizer_with_a_scaled_step():
    grads = {"a": jnp.array([0.3, -1.2]), "b": jnp.array(2.0)}
    params = jax.tree_util.tree_map(jnp.zeros_like, grads)
    opt = vijax.adaptive_lr(optax.adam(0.1), factor=0.25)
    state = opt.init(params)
    assert isinstance(state, vijax.AdaptiveLRState)
    assert vijax.optim.learning_rate_scale(state) == 1.0
    ref = optax.adam(0.1)
    ref_state = ref.init(params)
    for k in range(3):
        if k == 2:
            state = vijax.optim.decrease(state)
        up, state = opt.update(grads, state, params)
        want, ref_state = ref.update(grads, ref_state, params)
        scale = 0.25 if k == 2 else 1.0
        for u, w in zip(jax.tree_util.tree_leaves(up), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(u, scale * w, rtol=1e-6)
    assert vijax.optim.learning_rate_scale(state) == 0.25
    assert int(state.num_decreases) == 1


def test_bad_wrappers_are_refused():
    with pytest.raises(ValueError, match="factor"):
        vijax.adaptive_lr(optax.adam(0.1), factor=1.0)
    with pytest.raises(TypeError):
        vijax.adaptive_lr("adam")
    params = jnp.zeros(2)
    inside = vijax.adaptive_lr(vijax.iterate_average(optax.adam(0.1), start=0))
    with pytest.raises(ValueError, match="other way round"):
        check_nesting(inside.init(params))
    twice = vijax.adaptive_lr(vijax.adaptive_lr(optax.adam(0.1)))
    with pytest.raises(ValueError, match="at most one"):
        check_nesting(twice.init(params))
    with pytest.raises(TypeError, match="AdaptiveLRState"):
        vijax.optim.learning_rate_scale(optax.adam(0.1).init(params))


@pytest.mark.parametrize("d, rho, name", [
    # Mean-field at d = 8 runs in the float32 test below.
    (10, 0.5, "full_rank"),
    # Correlated: mean-field converges slowly, and stages must not stop early.
    pytest.param(30, 0.9, "mean_field", marks=pytest.mark.slow),
])
def test_the_default_fit_stops_near_the_family_optimum(x64, d, rho, name):
    model, mean, prec = _blr(d, rho)
    family = getattr(vijax, name)()
    if name == "full_rank":
        optimum = 0.0
    else:
        diag = np.diag(1.0 / np.diag(prec))
        optimum = _np_kl_to_posterior(mean, diag, mean, prec)
    result = vijax.fit(jax.random.key(0), family, model.log_joint,
                       family.init(model.latent), num_steps=50_000, progress=False)
    assert result.stopped_early and int(result.state.step) < 50_000
    # The step was lowered at least once: a constant 0.1 is not the answer.
    assert vijax.optim.learning_rate_scale(result) <= 0.5
    gap = _np_kl_to_posterior(*_moments(family, result.params), mean, prec) - optimum
    # The rule's tolerance, with the margin its stage-to-stage test allows.
    assert -1e-9 < gap < 2 * TOL


def test_the_default_in_float32_and_deterministic():
    r = np.random.default_rng(0)
    x = r.standard_normal((200, 8)).astype(np.float32)
    y = (x @ r.standard_normal(8) + r.standard_normal(200)).astype(np.float32)
    model = vijax.models.bayesian_linear_regression(
        jnp.asarray(x), jnp.asarray(y), noise_scale=1.0, prior_scale=1.0)
    family = vijax.mean_field()
    init = family.init(model.latent)
    runs = [vijax.fit(jax.random.key(3), family, model.log_joint, init, num_steps=20_000,
                      progress=False) for _ in range(2)]
    for leaf in jax.tree_util.tree_leaves(runs[0].params):
        assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))
    assert runs[0].stopped_early
    assert int(runs[0].state.step) == int(runs[1].state.step)
    for a, b in zip(jax.tree_util.tree_leaves(runs[0].params),
                    jax.tree_util.tree_leaves(runs[1].params)):
        np.testing.assert_array_equal(a, b)
    x64 = x.astype(np.float64)
    prec = x64.T @ x64 + np.eye(8)
    post = np.linalg.solve(prec, x64.T @ y.astype(np.float64))
    diag = np.diag(1.0 / np.diag(prec))
    gap = (_np_kl_to_posterior(*_moments(family, runs[0].params), post, prec)
           - _np_kl_to_posterior(post, diag, post, prec))
    assert gap < 2 * TOL


class _Recording(AdaptiveStop):
    """AdaptiveStop that keeps the states it hands back (the restarts)."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.restarts = []
        type(self).last = self

    def check(self, state):
        verdict = super().check(state)
        if isinstance(verdict, vijax.FitState):
            self.restarts.append(verdict)
        return verdict

    def recover(self, state):
        out = super().recover(state)
        if out is not None:
            self.recovered = [*getattr(self, "recovered", []), out]
        return out


def test_a_stage_restarts_the_average_at_its_candidate_and_the_run_continues(x64, monkeypatch):
    monkeypatch.setattr(_drivers, "AdaptiveStop", _Recording)
    model, mean, prec = _blr(6, 0.5)
    family = vijax.full_rank()
    init = family.init(model.latent)
    result = vijax.fit(jax.random.key(1), family, model.log_joint, init,
                       num_steps=50_000, progress=False)
    rule = _Recording.last
    assert rule.decreases and rule.restarts
    assert len(rule.decreases) == len(rule.restarts)
    for k, (step, restart) in enumerate(zip(rule.decreases, rule.restarts)):
        assert int(restart.step) == step
        (avg,) = vijax.optim._averaging._find_states(restart.opt_state)
        assert int(avg.num_averaged) == 0
        for a, p in zip(jax.tree_util.tree_leaves(avg.average),
                        jax.tree_util.tree_leaves(restart.params)):
            np.testing.assert_array_equal(a, p)
        assert vijax.optim.learning_rate_scale(restart.opt_state) == 0.5 ** (k + 1)
    assert vijax.optim.learning_rate_scale(result) == 0.5 ** len(rule.decreases)
    # A stage runs at least as long as the one before (the last one too).
    ends = [0, *rule.decreases, int(result.state.step)]
    lengths = np.diff(ends)
    assert np.all(lengths[1:] >= lengths[:-1]), lengths
    # Steps are counted through the stages, and the state continues.
    more = vijax.fit(None, family, model.log_joint, result.state, num_steps=100,
                     progress=False)
    assert int(more.state.step) >= int(result.state.step) + min(100, 50)
    assert vijax.optim.learning_rate_scale(more) <= vijax.optim.learning_rate_scale(result)


class _NoDecreases(_Recording):
    """The recording rule with its decreases already spent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "max_decreases": 0})


def test_with_its_decreases_spent_a_stage_that_gains_restarts_at_the_same_step(x64, monkeypatch):
    # The first stage has no stage before it to compare with, so it always
    # "gains": with no decrease left, the run must go on at the same step
    # rather than stop there, and stop once a stage gains too little.
    monkeypatch.setattr(_drivers, "AdaptiveStop", _NoDecreases)
    model, _, _ = _blr(6, 0.5)
    family = vijax.full_rank()
    result = vijax.fit(jax.random.key(1), family, model.log_joint, family.init(model.latent),
                       num_steps=50_000, progress=False)
    rule = _NoDecreases.last
    assert result.stopped_early and int(result.state.step) < 50_000
    assert rule.decreases == [] and rule.restarts
    for restart in rule.restarts:
        assert vijax.optim.learning_rate_scale(restart.opt_state) == 1.0
        (avg,) = vijax.optim._averaging._find_states(restart.opt_state)
        assert int(avg.num_averaged) == 0
    assert vijax.optim.learning_rate_scale(result) == 1.0


def test_what_cannot_lower_the_step_is_refused_before_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("a fit state was built before the refusal")

    monkeypatch.setattr(_drivers, "_init_state", no_work)
    model, _, _ = _blr(3, 0.0)
    family = vijax.mean_field()
    init = family.init(model.latent)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="auto_stop=True or None"):
        vijax.fit(key, family, model.log_joint, init, num_steps=10, auto_stop=False)
    with pytest.raises(ValueError, match="auto_stop=True or None"):
        vijax.fit(key, family, model.log_joint, init, num_steps=10, tol=1e-3)
    with pytest.raises(ValueError, match="other way round"):
        vijax.fit(key, family, model.log_joint, init, num_steps=10, optimizer=vijax.adaptive_lr(
            vijax.iterate_average(optax.adam(0.1), start=0)))
    with pytest.raises(TypeError, match="auto_stop"):
        vijax.fit(key, family, model.log_joint, init, num_steps=10, auto_stop="yes")
    with pytest.raises(ValueError, match="fit_batched has no auto_stop"):
        vijax.fit_batched(jax.random.split(key, 2), family, model.log_joint, init,
                          optimizer=vijax.adaptive_lr(optax.adam(0.1)), num_steps=10)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), init)
    with pytest.raises(ValueError, match="fit_batched has no auto_stop"):
        vijax.fit_batched(jax.random.split(key, 2), family, model.log_joint, stacked,
                          optimizer=vijax.adaptive_lr(optax.adam(0.1)), num_steps=10,
                          params_batched=True)
    data = vijax.models.data_model(
        lambda z, x: -0.5 * jnp.sum((x - z["w"]) ** 2), jnp.zeros((4, 3)),
        latent={"w": jnp.zeros(3)}, log_prior=lambda z: -0.5 * jnp.sum(z["w"] ** 2))
    dinit = family.init(data.latent)
    with pytest.raises(ValueError, match="must be given for data models"):
        vijax.fit(key, family, data, dinit, num_steps=10)
    with pytest.raises(ValueError, match="not available for data models"):
        vijax.fit(key, family, data, dinit, num_steps=10,
                  optimizer=vijax.adaptive_lr(optax.adam(0.1)))
    monkeypatch.undo()
    # A plain optimizer keeps the old behaviour: no auto_stop unless asked.
    plain = vijax.fit(key, family, model.log_joint, init, num_steps=10,
                      optimizer=optax.adam(0.1), progress=False)
    assert int(plain.state.step) == 10 and not plain.stopped_early


def _walled(z):
    """N(1, I) inside |x| < 8, NaN outside: a step too large leaves the finite region."""
    x = z["x"]
    return jnp.where(jnp.all(jnp.abs(x) < 8.0), -0.5 * jnp.sum((x - 1.0) ** 2), jnp.nan)


def test_a_step_too_large_is_lowered_instead_of_failing(monkeypatch):
    monkeypatch.setattr(_drivers, "AdaptiveStop", _Recording)
    family = vijax.mean_field()
    init = family.init({"x": jnp.zeros(3)})
    key = jax.random.key(0)
    # Without the wrapper, this step size fails (the old behaviour, kept).
    with pytest.raises(vijax.FitError):
        vijax.fit(key, family, _walled, init, optimizer=optax.sgd(50.0), num_steps=500,
                  progress=False)
    result = vijax.fit(key, family, _walled, init,
                       optimizer=vijax.adaptive_lr(optax.sgd(50.0)), num_steps=20_000,
                       progress=False)
    rule = _Recording.last
    assert rule.recoveries, "the step was never lowered after non-finite steps"
    assert result.num_skipped >= 20 * len(rule.recoveries)
    assert result.stopped_early
    # After non-finite steps the average restarts where the run does.
    for recovered in rule.recovered:
        (avg,) = vijax.optim._averaging._find_states(recovered.opt_state)
        assert int(avg.num_averaged) == 0
        chex.assert_trees_all_equal(avg.average, recovered.params)
    g = family.to_gaussian(result.params)
    np.testing.assert_allclose(g.mean, 1.0, atol=0.05)
    np.testing.assert_allclose(g.scale.cov_diag(), 1.0, atol=0.1)
    # Once the decreases are spent, FitError as before.
    with pytest.raises(vijax.FitError):
        vijax.fit(key, family, _walled, init, optimizer=vijax.adaptive_lr(optax.sgd(1e7)),
                  num_steps=5000, progress=False)


@pytest.mark.parametrize("name, d", [("mean_field", 7), ("low_rank", 40), ("full_rank", 30),
                                     ("full_rank", 1000)])
def test_the_default_first_step_shrinks_with_the_parameters_per_dimension(name, d):
    family = vijax.low_rank(rank=5) if name == "low_rank" else getattr(vijax, name)()
    params = family.init(jnp.zeros(d))
    total = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    want = 0.1 * min(1.0, np.sqrt(2 * d / total))
    got = _drivers.default_learning_rate(params)
    # Rounded down to two significant digits.
    assert want * 0.9 <= got <= want and float(f"{got:.2g}") == got
    assert _drivers.default_optimizer(params) is _drivers.default_optimizer(params)
    if name == "mean_field":
        assert got == 0.1


def test_a_flow_takes_its_first_step_from_its_base_dimension_and_the_default_fit_converges():
    """A flow's d is its base's (not unknown): its thousands of network weights per
    dimension give it a small first step. At 0.1 (flows' step before) this fit ended
    1.7e7 to 3.4e9 nats from the target over three keys; now 0.004 to 0.007."""
    family = vijax.flows.affine_coupling()
    latent = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    params = family.init(latent)
    total = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    lr = _drivers.default_learning_rate(params)
    assert 0.9 * 0.1 * np.sqrt(2 * 7 / total) <= lr <= 0.1 * np.sqrt(2 * 7 / total) < 0.01

    def log_joint(z):  # normalized: log Z = 0, so KL(q || p) = -ELBO
        return (jax.scipy.stats.norm.logpdf(z["a"], 1.0, 2.0).sum()
                + jax.scipy.stats.norm.logpdf(z["b"], z["a"][0], 0.5).sum())

    result = vijax.fit(jax.random.key(1), family, log_joint, params, num_steps=20_000,
                       progress=False)
    assert result.stopped_early
    d = vijax.diagnose(jax.random.key(5), result.params, family, log_joint)
    assert -d.elbo < 0.05 + 3 * d.elbo_se, (d.elbo, d.elbo_se)


@pytest.mark.parametrize("d, want", [(2, 8), (100, 8), (150, 10), (1000, 25), (10_000, 80)])
def test_the_default_draws_grow_as_the_root_of_d_above_100(d, want):
    for family in (vijax.mean_field(), vijax.low_rank(rank=2)):
        assert _drivers.default_num_samples(family.init(jnp.zeros(d))) == want
    # A pytree latent counts every leaf of its loc.
    latent = {"a": jnp.zeros(d), "b": jnp.zeros((2, 3))}
    got = _drivers.default_num_samples(vijax.mean_field().init(latent))
    assert got == max(8, round(8 * np.sqrt((d + 6) / 100)))
    # No loc (a flow-like params tree): the parameter count is not d.
    assert _drivers.default_num_samples({"w": jnp.zeros(10 * d + 10_000)}) == 8


def test_only_the_default_fit_takes_the_default_draws(monkeypatch):
    """optimizer=None at d = 1000 runs 25 draws a step; any optimizer or num_samples given keeps its own."""
    seen = []

    class Seen(Exception):
        pass

    def spy(family, log_joint, optimizer, num_samples, *args, **kwargs):
        seen.append(num_samples)
        raise Seen

    monkeypatch.setattr(_drivers, "_run", spy)
    family = vijax.mean_field()
    init = family.init(jnp.zeros(1000))
    calls = [dict(), dict(num_samples=3), dict(optimizer=optax.adam(1e-2)),
             dict(optimizer=vijax.adaptive_lr(optax.adam(1e-2)))]
    for kwargs in calls:
        with pytest.raises(Seen):
            vijax.fit(jax.random.key(0), family, _std_normal, init, num_steps=10,
                      progress=False, **kwargs)
    assert seen == [25, 3, 8, 8]
    # A continued default run keeps its draws (and so its compiled loop).
    monkeypatch.undo()
    result = vijax.fit(jax.random.key(0), family, _std_normal, family.init(jnp.zeros(200)),
                       num_steps=10, progress=False)
    monkeypatch.setattr(_drivers, "_run", spy)
    with pytest.raises(Seen):
        vijax.fit(None, family, _std_normal, result.state, num_steps=10, progress=False)
    assert seen[-1] == 11


def _std_normal(z):
    return -0.5 * jnp.sum(z**2)


def _state_with_average(family, model, opt, loc, variances, count):
    """A FitState whose iterate average (and last iterate) is N(loc, diag(variances))."""
    params = family.init(model.latent)._replace(
        loc=jnp.asarray(loc), raw_scale=vijax.families._gaussian._softplus_inverse(
            jnp.sqrt(jnp.asarray(variances))))
    opt_state = opt.init(params)
    (avg,) = vijax.optim._averaging._find_states(opt_state)
    swapped = avg._replace(num_averaged=jnp.asarray(count, jnp.int32), average=params,
                           space_average=family.average_space[0](params))
    opt_state = jax.tree_util.tree_map(
        lambda n: swapped if isinstance(n, vijax.IterateAverageState) else n, opt_state,
        is_leaf=lambda n: isinstance(n, vijax.IterateAverageState))
    return vijax.FitState(params, opt_state, jnp.asarray(1000, jnp.int32), jax.random.key(0))


@pytest.mark.parametrize("low, high, pooled_wins", [(0.5, 1.5, True), (0.3, 1.0, False)])
def test_the_result_pools_the_last_two_stages_averages_where_that_scores_higher(
        x64, low, high, pooled_wins):
    # The previous stage's average has variances `low` times the mean-field
    # optimum's, this stage's `high` times, 300 and 100 iterates: pooled in
    # variance space they are (3 low + high) / 4 times the optimum.
    from vijax.fitting._stopping import averaging

    model, mean, prec = _blr(10, 0.5)
    family = vijax.mean_field()
    opt = averaging(vijax.adaptive_lr(optax.adam(0.01)), family.init(model.latent), family)
    v_opt = 1.0 / np.diag(prec)
    before = _state_with_average(family, model, opt, mean, low * v_opt, 300)
    state = _state_with_average(family, model, opt, mean, high * v_opt, 100)
    rule = AdaptiveStop(family, model.log_joint, jax.random.key(5), 0, state.params)
    rule._previous = rule._average_of(before)
    pooled = rule._pooled(state)
    want = (300 * low + 100 * high) / 400 * v_opt  # NumPy, float64
    g = family.to_gaussian(pooled)
    np.testing.assert_allclose(np.square(np.asarray(g.scale.scale)), want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g.mean), mean, rtol=1e-12)
    # select returns whichever is nearer the optimum (exact KL, NumPy).
    chosen = rule.select(state)
    kl = {name: _np_kl_to_posterior(*_moments(family, p), mean, prec)
          for name, p in [("pooled", pooled), ("current", state.params), ("chosen", chosen)]}
    assert (kl["pooled"] < kl["current"]) == pooled_wins
    assert kl["chosen"] == pytest.approx(min(kl["pooled"], kl["current"]), abs=1e-12)
    # A recovery forgets the previous stage: nothing to pool with then.
    rule._previous = None
    assert rule._pooled(state) is None


def test_an_average_in_a_space_the_rule_does_not_know_is_not_pooled(x64):
    model, mean, prec = _blr(4, 0.5)
    family = vijax.mean_field()
    other = (lambda p: {"v": jnp.exp(p.raw_scale)},
             lambda s: family.init(model.latent)._replace(raw_scale=jnp.log(s["v"])))
    opt = vijax.iterate_average(vijax.adaptive_lr(optax.adam(0.01)), start=0, eta=3,
                                space=other)
    params = family.init(model.latent)
    state = vijax.FitState(params, opt.init(params), jnp.asarray(10, jnp.int32),
                           jax.random.key(0))
    rule = AdaptiveStop(family, model.log_joint, jax.random.key(5), 0, params)
    assert rule._average_of(state) is None
    rule._previous = (family.average_space[0](params), 5)
    assert rule._pooled(state) is None


def test_the_default_moves_the_low_rank_factor_in_units_of_the_marginal_sds():
    """``default_optimizer`` for LowRankParams: Adam's update, the factor's rows times q's
    marginal sds ``sqrt(softplus(raw)^2 + |W_i|^2)``."""
    family = vijax.low_rank(rank=2)
    params = family.init(jnp.zeros(6))
    params = params._replace(raw_scale=jnp.linspace(-3.0, 1.0, 6),
                             cov_factor=jnp.arange(12.0).reshape(6, 2) / 10)
    grads = jax.tree_util.tree_map(lambda x: jnp.sin(3.0 * x + 1.0), params)
    opt = _drivers.default_optimizer(params)
    assert opt is _drivers.default_optimizer(params)
    assert opt is not _drivers.default_optimizer(vijax.mean_field().init(jnp.zeros(6)))
    got = opt.update(grads, opt.init(params), params)[0]
    lr = _drivers.default_learning_rate(params)
    adam = optax.adam(lr)
    want = adam.update(grads, adam.init(params), params)[0]
    sd = np.log1p(np.exp(np.asarray(params.raw_scale, np.float64)))
    factor = np.asarray(params.cov_factor, np.float64)
    marginal = np.sqrt(sd ** 2 + np.sum(factor ** 2, axis=1))
    # q's marginal sds, as the family's own Gaussian view gives them
    np.testing.assert_allclose(
        marginal, np.sqrt(np.asarray(family.to_gaussian(params).scale.cov_diag())), rtol=1e-5)
    np.testing.assert_allclose(got.cov_factor, np.asarray(want.cov_factor) * marginal[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(got.raw_scale, want.raw_scale, rtol=1e-6)
    # The mean moves at the mean-field family's step (loc_steps_scaled).
    np.testing.assert_allclose(got.loc, np.asarray(want.loc) * (0.1 / lr), rtol=1e-6)
    with pytest.raises(ValueError, match="needs `params`"):
        _drivers.factor_in_sd_units().update(grads, optax.EmptyState())


@pytest.mark.parametrize("family", [vijax.mean_field(), vijax.full_rank()],
                         ids=["mean_field", "full_rank"])
def test_the_default_is_plain_adam_outside_the_low_rank_family(family):
    """Mean-field and full-rank: Adam at the family's step on every parameter, mean included."""
    params = family.init({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    grads = jax.tree_util.tree_map(lambda x: jnp.cos(2.0 * x + 0.3), params)
    lr = _drivers.default_learning_rate(params)
    opt = _drivers.default_optimizer(params)
    assert opt is _drivers.default_optimizer(params)
    got = opt.update(grads, opt.init(params), params)[0]
    want = optax.adam(lr).update(grads, optax.adam(lr).init(params), params)[0]
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_loc_steps_scaled_scales_the_mean_only():
    params = vijax.full_rank().init({"a": jnp.zeros(3), "b": jnp.zeros(2)})
    updates = jax.tree_util.tree_map(lambda x: jnp.cos(2.0 * x + 0.3), params)
    got = _drivers.loc_steps_scaled(2.5).update(updates, optax.EmptyState())[0]
    for name in params._fields:
        for g, u in zip(jax.tree_util.tree_leaves(getattr(got, name)),
                        jax.tree_util.tree_leaves(getattr(updates, name))):
            np.testing.assert_allclose(g, np.asarray(u) * (2.5 if name == "loc" else 1.0),
                                       rtol=1e-6)


def test_loc_steps_scaled_checks_its_input():
    with pytest.raises(ValueError, match="`ratio` must be a positive finite number; got -1.0"):
        _drivers.loc_steps_scaled(-1.0)
    with pytest.raises(ValueError, match="needs parameters with a `loc` field"):
        _drivers.loc_steps_scaled(2.0).update({"w": jnp.ones(2)}, optax.EmptyState())


def test_the_default_fit_moves_a_precision_factor_in_its_own_units():
    """``low_rank_precision`` on the Poisson GLM (rank 2): with Adam's raw steps the
    factor stayed near its start (a saddle) and the fit stopped at the mean-field
    optimum, 0.059 to 0.061 nats short; scaled by the marginal precisions' roots,
    0.0002 to 0.0006 (three keys, by hand). The optimum: fit_exact, whose own test
    checks it against SciPy."""
    family = vijax.low_rank_precision(rank=2)
    model = vijax.models.poisson_glm()
    init = family.init(model.latent)
    assert isinstance(_drivers.default_optimizer(init), optax.GradientTransformation)
    best = vijax.fit_exact(family, model, init, tol=1e-7).elbo
    result = vijax.fit(jax.random.key(0), family, model.log_joint, init, num_steps=100_000,
                       progress=False)
    assert result.stopped_early
    gap = best - float(vijax.exact_elbo(result.params, family, model))
    assert -1e-3 < gap < 0.01, gap
