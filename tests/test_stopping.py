"""The tuning-free stopping rule, ``vijax.fit(..., auto_stop=True)``.

The claims: on Bayesian linear regression it never stops before the exact KL
is within 0.1 nats of the family's optimum (computed in NumPy), and it stops
within twice the steps that took; on zoo models, within twice the steps the
ELBO took to get within 0.1 nats of its long-run optimum. "The steps that
took" are read off the same trajectory, replayed step by step with
``vijax.make_step`` and the same (averaged) optimizer.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vijax
from references import correlated_blr
from vijax.fitting._stopping import averaging


def _blr(d, rho, seed=0):
    model, _, _, mean, prec = correlated_blr(d, rho, seed=seed)
    return model, mean, np.linalg.inv(prec), prec


def _np_kl(mq, cq, mp, cp):
    d = len(mq)
    diff = mp - mq
    return 0.5 * (np.trace(np.linalg.solve(cp, cq)) + diff @ np.linalg.solve(cp, diff) - d
                  + np.linalg.slogdet(cp)[1] - np.linalg.slogdet(cq)[1])


def _replay(key, family, log_joint, params, opt, num_steps):
    """Last iterates and averages after every step, as fit runs them."""
    step = jax.jit(vijax.make_step(family, log_joint, opt))
    state = vijax.init_fit_state(key, params, opt)

    def body(state, _):
        state, _ = step(state)
        return state, (state.params, vijax.averaged_params(state))

    _, (raw, avg) = jax.jit(lambda s: jax.lax.scan(body, s, None, length=num_steps))(state)
    return raw, avg


def _first_within(gaps, tol=0.1):
    """1-based step after which ``gaps`` stays <= tol (None if it never settles)."""
    bad = np.flatnonzero(np.asarray(gaps) > tol)
    first = 0 if bad.size == 0 else bad[-1] + 1
    return None if first >= len(gaps) else first + 1


BLR_CASES = [
    (10, 0.5, "mean_field", 3e-2),
    (10, 0.5, "full_rank", 3e-2),
    (30, 0.8, "mean_field", 1e-2),
]
# benchmarks/stopping.py runs these and more (full-rank at d = 30), over keys.


@pytest.mark.parametrize("d, rho, name, lr", BLR_CASES)
def test_stops_after_the_kl_is_within_a_tenth_and_within_twice_the_steps(x64, d, rho, name, lr):
    model, mean, cov, prec = _blr(d, rho)
    family = getattr(vijax, name)()
    optimum = 0.0 if name == "full_rank" else _np_kl(mean, np.diag(1 / np.diag(prec)), mean, cov)
    params = family.init(model.latent)
    key = jax.random.key(1)
    result = vijax.fit(key, family, model.log_joint, params, optimizer=optax.adam(lr),
                       num_steps=20000, auto_stop=True, progress=False)
    stop = int(result.state.step)
    assert result.stopped_early and stop < 20000

    def gap(p):
        g = family.to_gaussian(p)
        return _np_kl(np.asarray(g.mean), np.asarray(g.scale.cov()), mean, cov) - optimum

    # Never before: what it returns is within 0.1 nats of the family optimum.
    assert gap(result.params) <= 0.1, (stop, gap(result.params))

    # Within twice the steps really needed, on the replayed trajectory: the
    # first step after which the better of the last iterate and the average
    # stays within 0.1.
    opt = averaging(optax.adam(lr), params, family)  # what fit wraps it in
    raw, avg = _replay(key, family, model.log_joint, params, opt, stop)
    kl = jax.jit(jax.vmap(lambda p: vijax.exact_kl(p, family, model)))
    best = np.minimum(np.asarray(kl(raw)), np.asarray(kl(avg))) - optimum
    needed = _first_within(best)
    assert needed is not None and needed <= stop <= 2 * needed, (needed, stop)


# One zoo case keeps the suite short; benchmarks/stopping.py runs four zoo
# models over three keys each (Poisson GLM full-rank among them).
ZOO_CASES = [("eight_schools", "mean_field", 3e-2)]


@pytest.mark.parametrize("model_name, name, lr", ZOO_CASES)
def test_on_the_zoo_it_stops_within_twice_the_steps_the_elbo_needs(model_name, name, lr):
    # No exact KL here: "needed" is the first step after which the better
    # candidate's ELBO stays within 0.1 nats of the best ELBO of a run three
    # times as long. Every ELBO is on one set of 2048 draws (common random
    # numbers), so their differences are precise.
    model = getattr(vijax.models, model_name)()  # float32, as the zoo is
    family = getattr(vijax, name)()
    params = family.init(model.latent)
    key = jax.random.key(3)
    result = vijax.fit(key, family, model.log_joint, params, optimizer=optax.adam(lr),
                       num_steps=20000, auto_stop=True, progress=False)
    stop = int(result.state.step)
    assert result.stopped_early

    every = 10
    opt = averaging(optax.adam(lr), params, family)  # what fit wraps it in
    raw, avg = _replay(key, family, model.log_joint, params, opt, 3 * stop)
    noise = jax.random.key(99)

    @jax.jit
    @jax.vmap
    def elbo(p):
        return vijax.elbo(noise, p, family, model.log_joint, num_samples=2048,
                          estimator="reparam")

    thin = lambda tree: jax.tree_util.tree_map(lambda x: x[every - 1::every], tree)  # noqa: E731
    best = np.maximum(np.asarray(elbo(thin(raw))), np.asarray(elbo(thin(avg))))
    assert np.all(np.isfinite(best))
    optimum = best.max()
    needed = every * _first_within(optimum - best)
    assert needed <= stop <= 2 * needed, (needed, stop)


def test_polynomial_decay_averaging_matches_its_numpy_weights(x64):
    # iterate_average(eta=3): iterate s of n enters with weight proportional
    # to prod of the update factors; by recursion the average equals
    # sum_s c_s x_s with c computed here in NumPy.
    eta, n = 3.0, 40
    xs = np.random.default_rng(0).standard_normal((n, 2))
    opt = vijax.iterate_average(optax.sgd(1.0), start=0, eta=eta)
    state = opt.init(jnp.zeros(2))
    params = jnp.zeros(2)
    for x in xs:
        updates, state = opt.update(params - jnp.asarray(x), state, params)  # sgd: params -> x
        params = optax.apply_updates(params, updates)
    coef = np.zeros(n)
    for k in range(1, n + 1):
        w = (1 + eta) / (k + eta)
        coef[:k - 1] *= 1 - w
        coef[k - 1] = w
    np.testing.assert_allclose(np.asarray(state.average), coef @ xs, rtol=1e-12)
    assert coef[-1] > coef[n // 2] > coef[0]  # late iterates weigh more
    with pytest.raises(ValueError, match="`eta` must be a finite float >= 0; got -1"):
        vijax.iterate_average(optax.sgd(1.0), start=0, eta=-1)


def test_auto_stop_arguments_resume_and_the_returned_params(monkeypatch):
    from vijax.fitting import _drivers, _stopping

    rules = []

    class Recording(_stopping.AutoStop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rules.append(self)

    monkeypatch.setattr(_drivers, "AutoStop", Recording)
    model = vijax.models.normal_mean(jnp.ones(3), noise_scale=1.0, prior_loc=0.0,
                                     prior_scale=1.0)
    family = vijax.mean_field()
    params = family.init(model.latent)
    fit = lambda key, init, **kw: vijax.fit(  # noqa: E731
        key, family, model.log_joint, init, optimizer=optax.adam(0.05), progress=False, **kw)
    with pytest.raises(ValueError, match="`tol` and `auto_stop=True` are two stopping rules"):
        fit(jax.random.key(0), params, num_steps=10, auto_stop=True, tol=1e-3)
    with pytest.raises(TypeError, match="`auto_stop` must be a bool or None; got 'yes'"):
        fit(jax.random.key(0), params, num_steps=10, auto_stop="yes")
    # Too few steps to converge: runs them all, returns a finite candidate.
    short = fit(jax.random.key(0), params, num_steps=60, auto_stop=True)
    assert not short.stopped_early and int(short.state.step) == 60
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(short.params))
    # Continued with auto_stop, it carries on and stops.
    more = fit(None, short.state, num_steps=5000, auto_stop=True)
    assert more.stopped_early and 60 < int(more.state.step) < 5060
    # The returned params are a candidate: the average, the last iterate,
    # or the best candidate of the rule's checks.
    avg = vijax.averaged_params(more)
    last = more.state.params
    assert any(all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(more.params),
                                                         jax.tree_util.tree_leaves(c)))
               for c in (avg, last, rules[-1].best))
    assert float(vijax.exact_kl(more.params, family, model)) < 0.1


def test_checks_follow_the_schedule_past_a_chunk_apart(monkeypatch):
    """Checks more than ``chunk_size`` steps apart still happen, on the schedule.

    Regression: the engine used to test the rule only where a chunk's end
    equalled ``next_check`` of that chunk's start, which never happens again
    once the checks are more than a chunk apart (about 10,000 steps into a
    run at 5% growth and 500-step chunks).
    """
    from vijax.fitting import _stopping

    seen = []

    def check(self, state):
        seen.append(int(state.step))
        return False

    monkeypatch.setattr(_stopping.AutoStop, "check", check)
    model = vijax.models.normal_mean(jnp.ones(2), noise_scale=1.0, prior_loc=0.0,
                                     prior_scale=1.0)
    family = vijax.mean_field()
    vijax.fit(jax.random.key(0), family, model.log_joint, family.init(model.latent),
              optimizer=optax.sgd(1e-3), num_steps=16_000, auto_stop=True, progress=False)
    want, c = [], _stopping.AutoStop.next_check(0)
    while c <= 16_000:
        want.append(c)
        c = _stopping.AutoStop.next_check(c)
    assert seen == want and seen[-1] > 15_000


def _fake_values(family, log_joint, key, params, num):
    """Candidate ``c`` scores ``c`` plus zero-mean noise of unit sd, different per candidate."""
    r = np.random.default_rng([int(round(float(params) * 1e6)), num])
    eps = r.standard_normal(num)
    return float(params) + (eps - eps.mean()) / eps.std()


class _Candidate(NamedTuple):
    params: Any
    opt_state: Any
    step: int


def _at(opt, c, step: int) -> _Candidate:
    """A state whose last iterate and average are both the scalar ``c``, at ``step``."""
    p = jnp.asarray(c)
    return _Candidate(p, opt.init(p), step)


@pytest.mark.parametrize("g2, g1, stops", [
    # Both gains below the tolerance, neither resolved on max_draws draws.
    (0.010, 0.012, True),
    # The last gain above it on its point estimate: goes on either way.
    (0.024, 0.030, False),
    # The last gain below, the one before above with a gap estimate of
    # 0.01**2 / (0.05 - 0.01) = 0.0025 nats, below GAP_TOL.
    (0.010, 0.050, True),
])
def test_at_its_draw_limit_the_stage_rule_decides_on_the_point_estimates(monkeypatch, g2, g1,
                                                                          stops):
    """``decide_at_limit``: a gain still in doubt on ``max_draws`` draws is judged on its mean.

    The candidates' per-draw ELBO terms are faked: candidate ``c`` scores ``c``
    plus zero-mean noise of unit sd that differs between candidates, so every
    gain is known exactly and its standard error on 4096 draws (about 0.022
    nats) leaves it within two of the tolerance, 0.0175.
    """
    from vijax.fitting import _stopping

    monkeypatch.setattr(_stopping, "_values", _fake_values)
    opt = averaging(optax.sgd(0.1), jnp.zeros(()))
    rules = {limit: _stopping.AutoStop(None, None, jax.random.key(0), tol=0.0175,
                                       max_draws=4096, decide_at_limit=limit)
             for limit in (False, True)}
    for limit, rule in rules.items():
        for step, c in ((100, 0.0), (150, g1)):
            p = jnp.asarray(c)
            rule.record(_Candidate(p, opt.init(p), step))
        p = jnp.asarray(g1 + g2)
        before = rule.num_evaluations
        verdict = rule.check(_Candidate(p, opt.init(p), 225))
        # 64 draws for the candidate (last iterate and average), the best
        # candidate so far and the two references. The gain's standard
        # error on 64 draws (about 0.18) says that only the limit may
        # resolve it, so the candidate and the reference at 2t/3 go
        # straight there, never past it; the older reference follows only
        # where a stop hangs on the gain before (the point estimate below
        # the tolerance, at the limit).
        older = 4096 if limit and g2 < 0.0175 else 0
        assert rule.num_evaluations - before == 5 * 64 + 2 * 4096 + older
        assert verdict == (stops and limit), (limit, rule.gap_estimate)
    stage = _stopping.AdaptiveStop(None, None, jax.random.key(0), 0, None)._stage
    assert stage.decide_at_limit and stage.max_draws == _stopping.STAGE_MAX_DRAWS
    assert stage.tol == _stopping.STAGE_RULE_TOL * _stopping.TOL
    assert stage.max_fall == _stopping.TOL
    assert stage.go_on_z == _stopping.STAGE_GO_ON_Z == 1.0


@pytest.mark.parametrize("margin, go_on_z, more", [
    # In doubt (within two standard errors of about 0.18 on 64 draws) but
    # above the tolerance by more than one: goes on at once.
    (0.27, 1.0, 0),
    # The same gain without go_on_z: refined, on the 256 draws that
    # _more_draws says may resolve it (64 * (2 * 0.18 / 0.27)^2 = 113), and
    # resolved there.
    (0.27, None, 256),
    # Within one standard error above: refined, as it might end the stage
    # (64 * (2 * 0.18 / 0.1)^2 = 830 -> 1024 draws).
    (0.10, 1.0, 1024),
])
def test_the_stage_rule_goes_on_without_more_draws_where_a_gain_is_likely_above(
        monkeypatch, margin, go_on_z, more):
    """``go_on_z``: a gain above the tolerance by more than that many standard errors goes on."""
    from vijax.fitting import _stopping

    monkeypatch.setattr(_stopping, "_values", _fake_values)
    opt = averaging(optax.sgd(0.1), jnp.zeros(()))
    rule = _stopping.AutoStop(None, None, jax.random.key(0), tol=0.0175, max_draws=4096,
                              decide_at_limit=True, go_on_z=go_on_z)
    for step, c in ((100, 0.0), (150, 0.03)):
        rule.record(_at(opt, c, step))
    before = rule.num_evaluations
    verdict = rule.check(_at(opt, 0.03 + 0.0175 + margin, 225))
    assert verdict is False
    # 64 draws for the candidate (last iterate and average), the best so
    # far and the two references; then the candidate and the reference at
    # 2t/3 on ``more`` draws each.
    assert rule.num_evaluations - before == 5 * 64 + 2 * more


@pytest.mark.parametrize("last, max_fall, stops", [
    # 1.8 nats below the best (standard error about 0.18), and 2.0 below at
    # the check before (150, = 2t/3): a stage ends there.
    (0.2, 0.05, True),
    # Without max_fall the windows decide: the gain on the candidate at
    # 2t/3 (0.0) is 0.2, above the tolerance, so the rule goes on.
    (0.2, None, False),
    # 0.03 below the best: not more than max_fall, and the gain over the
    # window is large, so the rule goes on.
    (1.97, 0.05, False),
])
def test_the_best_candidate_is_kept_and_a_fall_below_it_ends_a_stage(monkeypatch, last, max_fall,
                                                                     stops):
    """An iterate that spikes does not lose the best candidate of the checks.

    Candidates (faked ELBOs, as above): 2.0 at step 100, 0.0 at step 150 (a
    spike), then ``last`` at step 225. ``select`` returns the best, 2.0,
    whatever ``max_fall``; with ``max_fall`` a fall beyond doubt held since
    2t/3 ends the stage.
    """
    from vijax.fitting import _stopping

    monkeypatch.setattr(_stopping, "_values", _fake_values)
    opt = averaging(optax.sgd(0.1), jnp.zeros(()))
    rule = _stopping.AutoStop(None, None, jax.random.key(0), tol=0.0175, max_draws=4096,
                              decide_at_limit=True, max_fall=max_fall)
    state = lambda c, step: _at(opt, c, step)  # noqa: E731
    rule.record(state(2.0, 100))
    rule.record(state(0.0, 150))
    assert float(rule.best) == 2.0 and rule.fall[0] == pytest.approx(2.0)
    assert rule.check(state(last, 225)) == stops
    assert float(rule.best) == 2.0 and rule.fall[0] == pytest.approx(2.0 - last)
    before = rule.num_evaluations
    assert float(rule.select(state(last, 225))) == 2.0
    # The candidate on FINAL_DRAWS (last iterate and average), then it and
    # the best on CONFIRM_DRAWS common draws.
    assert rule.num_evaluations - before == 2 * _stopping.FINAL_DRAWS + 2 * _stopping.CONFIRM_DRAWS
    # A candidate as good as the best is returned without scoring the two again.
    good = state(2.5, 300)
    rule.check(good)
    before = rule.num_evaluations
    assert float(rule.select(good)) == 2.5
    assert rule.num_evaluations - before == 2 * _stopping.FINAL_DRAWS


def test_one_fall_does_not_end_a_stage_a_fall_held_since_two_thirds_does(monkeypatch):
    """Candidates (faked, as above): 2.0 at step 100, 1.99 at 150, then 0.2 from 225 on.

    The fall starts at 225. There it is one check old, and the windows say
    go on (the candidate at 2t/3 is no better than the one before it, but
    not worse beyond doubt either). At 340 every check since 2t/3 = 226.7
    fell, and the stage ends.
    """
    from vijax.fitting import _stopping

    monkeypatch.setattr(_stopping, "_values", _fake_values)
    opt = averaging(optax.sgd(0.1), jnp.zeros(()))
    rule = _stopping.AutoStop(None, None, jax.random.key(0), tol=0.0175, max_draws=4096,
                              decide_at_limit=True, max_fall=0.05)
    state = lambda c, step: _at(opt, c, step)  # noqa: E731
    rule.record(state(2.0, 100))
    rule.record(state(1.99, 150))
    assert rule.fallen_since is None
    assert not rule.check(state(0.2, 225))
    assert rule.fallen_since == 225
    assert rule.check(state(0.2, 340))
    assert float(rule.select(state(0.2, 340))) == 2.0
    # A check that does not fall breaks the run.
    rule.record(state(2.0, 400))
    assert rule.fallen_since is None


def test_more_draws_goes_to_the_first_size_that_may_resolve_the_gain():
    """``_more_draws``: ``num * 4**k`` (k >= 1) reaching ``num * (Z se / margin)**2``, capped."""
    from vijax.fitting._stopping import REFINE, Z, _more_draws

    # (Z se / margin)^2 = (2 * 0.02 / 0.01)^2 = 16: 256 -> 4096, in one go.
    assert _more_draws(256, 0.01, 0.02, 16384) == 4096
    # The sign of the margin does not matter.
    assert _more_draws(256, -0.01, 0.02, 16384) == 4096
    # Just short of resolved: one size up, never less.
    assert _more_draws(256, 0.0399, 0.02, 16384) == 256 * REFINE
    # 17 times as many needed: past 4096 to 16384, the cap.
    assert _more_draws(256, 0.01, 0.0206, 16384) == 16384
    assert _more_draws(256, 0.01, 0.0206, 4096) == 4096
    # A gain exactly at its threshold: the cap.
    assert _more_draws(64, 0.0, 0.01, 4096) == 4096
    # A "stop" confirmed on at least 4096 draws however small its doubt.
    assert _more_draws(256, 0.05, 0.001, 16384, at_least=4096) == 4096
    assert Z == 2.0
