"""PSIS (vijax.diagnostics._psis): agreement with arviz.psislw, edge cases, errors.

Every distinct input shape and dtype compiles its own XLA program (about a
second or two here), so the tests share a few shapes: (21,), (100,), (1000,),
(4000,) and (2, 3, 100) in float64, (1000,) in float32, (32, 4000) for the
statistical check.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from vijax.diagnostics._psis import MIN_DRAWS, _tail_length, khat_threshold, psis

pytestmark = pytest.mark.usefixtures("x64")

# One jitted wrapper, so that its compilations are shared across tests.
_jit_psis = jax.jit(psis)


def _arviz(log_weights, normalize=True):
    """arviz.psislw with reff = 1 on a float64 copy (it works in place)."""
    import arviz

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return arviz.psislw(np.array(log_weights, dtype=np.float64), reff=1.0,
                            normalize=normalize)


def _normalized(smoothed):
    return np.asarray(smoothed - logsumexp(smoothed, axis=-1, keepdims=True))


def _assert_matches_arviz(log_weights, *, sort_ties=False):
    smoothed, khat = psis(log_weights)
    want, want_k = _arviz(log_weights)
    raw, _ = _arviz(log_weights, normalize=False)
    got = _normalized(smoothed)
    if sort_ties:
        # Tied raw weights in the tail get distinct smoothed values; which of
        # them gets which depends on the sort (numpy's is not stable).
        got, want = np.sort(got, axis=-1), np.sort(want, axis=-1)
        smoothed, raw = np.sort(smoothed, axis=-1), np.sort(raw, axis=-1)
    np.testing.assert_allclose(np.asarray(khat), want_k, rtol=1e-12, atol=1e-12)
    # -inf positions must agree; assert_allclose checks that.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # Unnormalized: the same scale as the input (arviz normalize=False).
    np.testing.assert_allclose(np.asarray(smoothed), raw, rtol=0, atol=1e-12)
    return smoothed, khat


def _normal_log_weights(rng, num_draws, p_scale, p_loc=0.0, log_z=0.0):
    """log p(z) + log_z - log q(z) for z ~ q = N(0, 1) and p = N(p_loc, p_scale^2)."""
    z = rng.normal(size=num_draws)
    log_p = -0.5 * ((z - p_loc) / p_scale) ** 2 - np.log(p_scale)
    return log_p + log_z + 0.5 * z**2


# ----------------------------------------------------------------- constants


def test_min_draws_is_the_first_sample_size_with_a_tail_of_five():
    assert MIN_DRAWS == 21
    assert _tail_length(21) == 5 and _tail_length(20) == 4
    assert [_tail_length(s) for s in (100, 225, 1000, 4000)] == [20, 45, 95, 190]


def test_khat_threshold():
    assert khat_threshold(21) == pytest.approx(1 - 1 / np.log10(21))
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(2154) < 0.7
    assert khat_threshold(2155) == 0.7 == khat_threshold(10**6)
    assert khat_threshold(np.int64(1000)) == pytest.approx(2 / 3)
    assert isinstance(khat_threshold(4000), float)
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 21; got 20"):
        khat_threshold(20)
    for bad in (100.0, True, "100"):
        with pytest.raises(TypeError, match="`num_samples`"):
            khat_threshold(bad)


# ------------------------------------------------------------ versus arviz


@pytest.mark.parametrize("num_draws", [21, 100, 1000, 4000])
def test_matches_arviz_light_and_heavy_tails(num_draws, rng):
    # Light: p = N(0.2, 1.1^2) against q = N(0, 1), weights with a thin tail.
    light = _normal_log_weights(rng, num_draws, 1.1, p_loc=0.2)
    _, khat = _assert_matches_arviz(light)
    if num_draws >= 1000:
        assert khat < 0.5
    # Heavy: q = Exp(rate 20) is much narrower than p = Exp(rate 1); the
    # weights w = exp(19 z) / 20 have an exact Pareto tail of shape 19/20.
    # k-hat's sd at S = 1000 is about 0.2, so over seeds it exceeds 0.7 about
    # 80% of the time (90% at S = 4000): this seed's draws do.
    z = rng.exponential(1 / 20, size=num_draws)
    heavy = (-z) - (np.log(20.0) - 20 * z)
    _, khat = _assert_matches_arviz(heavy)
    if num_draws >= 1000:
        assert khat > 0.7


def test_only_the_tail_changes_and_the_scale_is_the_input_scale(rng):
    lw = _normal_log_weights(rng, 4000, 1.1, p_loc=0.2, log_z=-123.4)
    smoothed, khat = psis(lw)
    smoothed = np.asarray(smoothed)
    tail = np.argsort(lw)[-_tail_length(4000):]
    body = np.setdiff1d(np.arange(4000), tail)
    np.testing.assert_array_equal(smoothed[body], lw[body])
    assert np.all(smoothed[tail] <= lw.max())
    # The PSIS estimate of log Z: Monte Carlo error ~ sd(w) / sqrt(S) ~ 0.01.
    assert float(logsumexp(smoothed) - np.log(4000)) == pytest.approx(-123.4, abs=0.05)


def test_matches_arviz_with_zero_weights(rng):
    lw = _normal_log_weights(rng, 100, 3.0)
    some = lw.copy()
    some[rng.choice(100, 30, replace=False)] = -np.inf
    smoothed, _ = _assert_matches_arviz(some)
    assert np.all(np.isneginf(np.asarray(smoothed)) == np.isneginf(some))
    # 90 zero weights: the cutoff is log(tiny), the tail the 10 positive weights.
    many = lw.copy()
    many[:90] = -np.inf
    _, khat = _assert_matches_arviz(many)
    assert np.isfinite(khat)
    # Weights below tiny times the largest are not in the tail either.
    tiny = lw.copy()
    tiny[:85] -= 1000.0
    _, khat = _assert_matches_arviz(tiny)
    assert np.isfinite(khat)


def test_a_tail_of_four_or_fewer_gives_inf_and_no_smoothing(rng):
    # 17 zero weights out of 21: four draws above the cutoff.
    lw = rng.normal(size=21)
    lw[:17] = -np.inf
    smoothed, khat = _assert_matches_arviz(lw)
    assert khat == np.inf
    np.testing.assert_array_equal(np.asarray(smoothed), lw)
    # Ties at the cutoff: the 5th, 6th and 7th largest are equal, so only the
    # four above them are in the tail.
    lw = rng.normal(size=21)
    order = np.argsort(lw)
    lw[order[-7:-4]] = lw[order[-5]]
    smoothed, khat = _assert_matches_arviz(lw)
    assert khat == np.inf
    np.testing.assert_array_equal(np.asarray(smoothed), lw)


def test_ties(rng):
    lw = _normal_log_weights(rng, 100, 3.0)
    # Ties at the cutoff (the 20th and 21st largest equal): a tail of 19.
    at_cutoff = lw.copy()
    order = np.argsort(at_cutoff)
    at_cutoff[order[-21]] = at_cutoff[order[-20]]
    _, khat = _assert_matches_arviz(at_cutoff)
    assert np.isfinite(khat)
    # Ties everywhere, in the tail too (rounded to one decimal).
    _assert_matches_arviz(np.round(lw, 1), sort_ties=True)


def test_batch_matches_arviz_row_by_row(rng):
    lw = np.stack([_normal_log_weights(rng, 100, s) for s in (0.8, 1.1, 1.5, 2.0, 3.0, 5.0)])
    lw = lw.reshape(2, 3, 100)
    lw[1, 2, :50] = -np.inf
    smoothed, khat = psis(lw)
    assert smoothed.shape == (2, 3, 100) and khat.shape == (2, 3)
    for i in np.ndindex(2, 3):
        want, want_k = _arviz(lw[i])
        np.testing.assert_allclose(_normalized(smoothed[i]), want, rtol=0, atol=1e-12)
        assert float(khat[i]) == pytest.approx(float(want_k), abs=1e-12)


# ------------------------------------------------------- dtypes and transforms


def test_float32_is_close_to_float64(rng):
    lw = _normal_log_weights(rng, 1000, 1.5)
    s64, k64 = psis(lw)
    s32, k32 = psis(lw.astype(np.float32))
    assert s32.dtype == jnp.float32 and k32.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(s32))) and np.isfinite(k32)
    assert float(k32) == pytest.approx(float(k64), abs=1e-4)
    np.testing.assert_allclose(np.asarray(s32), np.asarray(s64), rtol=0, atol=1e-4)


def test_jit_and_vmap_agree_with_eager(rng):
    lw = np.stack([_normal_log_weights(rng, 100, s) for s in (0.8, 1.1, 1.5, 2.0, 3.0, 5.0)])
    lw = lw.reshape(2, 3, 100)
    eager = psis(lw)
    for got in (_jit_psis(lw), jax.vmap(psis)(jnp.asarray(lw))):
        for a, b in zip(got, eager):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)


def test_traces_under_jit_of_grad():
    # Gradients are not part of the contract, but tracing them must not crash
    # (lowered only: compiling would cost a second or two).
    lowered = jax.jit(jax.grad(lambda x: psis(x)[0].sum())).lower(jnp.zeros(100))
    assert lowered is not None


def test_nan_inf_and_all_zero_rows_under_jit(rng):
    lw = np.stack([_normal_log_weights(rng, 100, s) for s in (0.8, 1.1, 1.5, 2.0, 3.0, 5.0)])
    lw = lw.reshape(2, 3, 100)
    clean_s, clean_k = psis(lw)
    lw[0, 1, 7] = np.nan
    lw[1, 0, 3] = np.inf
    lw[1, 2] = -np.inf
    with pytest.warns(RuntimeWarning, match=r"2 row\(s\) of `log_weights` hold NaN or \+inf "
                      r"and 1 row\(s\) are all -inf"):
        smoothed, khat = _jit_psis(lw)
        smoothed, khat = np.asarray(smoothed), np.asarray(khat)
    for i in [(0, 1), (1, 0)]:          # NaN or +inf: NaN everywhere in the row
        assert np.all(np.isnan(smoothed[i])) and np.isnan(khat[i])
    assert np.all(np.isneginf(smoothed[1, 2])) and np.isnan(khat[1, 2])  # all zero
    for i in [(0, 0), (0, 2), (1, 1)]:  # the other rows are untouched
        np.testing.assert_allclose(smoothed[i], np.asarray(clean_s[i]), rtol=0, atol=1e-13)
        assert khat[i] == pytest.approx(float(clean_k[i]), abs=1e-13)


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [
    np.arange(30),                        # int
    np.ones(30, dtype=bool),
    np.ones(30, dtype=np.complex64),
    np.ones(30, dtype=np.float16),
    ["a"] * 30,
    None,
    object(),
])
def test_non_float_input_is_a_type_error(bad):
    with pytest.raises(TypeError, match="`log_weights`"):
        psis(bad)


def test_shape_errors():
    with pytest.raises(ValueError, match="`log_weights` must have at least one dimension"):
        psis(1.0)
    with pytest.raises(ValueError, match="`log_weights` must have at least one dimension"):
        psis(np.float64(1.0))
    msg = (r"`log_weights` needs at least 21 draws along its last axis for the Pareto "
           r"tail fit \(the tail needs more than 4 draws\); got 20\.")
    with pytest.raises(ValueError, match=msg):
        psis(np.zeros(20))
    with pytest.raises(ValueError, match="got 20"):
        psis(np.zeros((100, 20)))
    with pytest.raises(ValueError, match="got 0"):
        _jit_psis(np.zeros((3, 0)))       # at trace time, under jit too


def test_nan_and_inf_values_are_errors_when_concrete():
    lw = np.zeros(100)
    lw[[3, 8]] = np.nan
    lw[50] = np.inf
    with pytest.raises(ValueError, match=r"`log_weights` must not contain NaN or \+inf; "
                       r"got 2 NaN and 1 \+inf entries \(the first at index \(3,\)\)"):
        psis(lw)
    batch = np.zeros((4, 100))
    batch[2, 40] = np.inf
    with pytest.raises(ValueError, match=r"got 0 NaN and 1 \+inf entries \(the first at "
                       r"index \(2, 40\)\)"):
        psis(jnp.asarray(batch))
    with pytest.raises(ValueError, match="every entry of `log_weights` is -inf"):
        psis(np.full(100, -np.inf))
    batch = np.zeros((4, 100))
    batch[[1, 3]] = -np.inf
    with pytest.raises(ValueError, match=r"2 row\(s\) of `log_weights` have every entry "
                       r"-inf .*the first at batch index \(1,\)"):
        psis(batch)


# ------------------------------------------------------------------ statistics


def test_khat_estimates_the_pareto_shape():
    # log weights = log of draws from a generalized Pareto with shape xi: the
    # tail above any threshold is again GPD(xi), so k-hat estimates xi, shrunk
    # by the prior to (n xi + 5) / (n + 10) with n = 190 tail draws. Across 32
    # independent data sets (one batch: one compilation) the mean is within 4
    # standard errors of that (the se from the spread across data sets), and
    # the spread itself is close to the asymptotic (1 + xi) / sqrt(n).
    num_sets, num_draws, n = 32, 4000, _tail_length(4000)
    rng = np.random.default_rng(7)
    for xi in (0.3, 0.8):
        u = rng.uniform(size=(num_sets, num_draws))
        draws = np.expm1(-xi * np.log1p(-u)) / xi          # GPD(xi, sigma=1) quantiles
        khat = np.asarray(psis(np.log(draws))[1])
        target = (n * xi + 5) / (n + 10)
        spread = khat.std(ddof=1)
        assert abs(khat.mean() - target) < 4 * spread / np.sqrt(num_sets)
        assert 0.7 < spread / ((1 + xi) / np.sqrt(n)) < 1.5
