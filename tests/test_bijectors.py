"""vijax.bijectors: round trips, log-determinants against autodiff Jacobians, stability."""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vijax import bijectors


class Case(NamedTuple):
    make: Callable  # () -> Bijector
    n: int  # the unconstrained vector's length
    free: Callable  # constrained leaf -> the coordinates the log det is taken on
    in_support: Callable  # numpy y -> bool
    sample: Callable  # rng -> a point of the support (float64, numpy)
    bad: tuple  # points outside the support's closure (the inverse must raise)


def _gamma(rng, shape=(3,)):
    return rng.gamma(2.0, size=shape)


def _corr_factor(rng, d=4):
    a = rng.normal(size=(d, d + 2))
    s = a @ a.T
    c = s / np.sqrt(np.outer(np.diag(s), np.diag(s)))
    return np.linalg.cholesky(c)


def _cov_factor(rng, d=3):
    a = rng.normal(size=(d, d))
    return np.linalg.cholesky(a @ a.T + np.eye(d))


def _is_corr_factor(y):
    cov = y @ y.T
    return (np.allclose(y, np.tril(y)) and np.all(np.diag(y) > 0)
            and np.allclose(np.diag(cov), 1.0) and np.all(np.linalg.eigvalsh(cov) > 0))


def _ravel(y):
    return jnp.ravel(y)


_TRIL4 = np.tril_indices(4, -1)
_TRIL3 = np.tril_indices(3)
_SCALE = np.array([2.0, -0.5, 3.0])

CASES = {
    "identity": Case(bijectors.identity, 3, _ravel, lambda y: True,
                     lambda r: r.normal(size=3), (np.nan, np.array([0.0, np.inf]))),
    "exp": Case(bijectors.exp, 3, _ravel, lambda y: np.all(y > 0), _gamma,
                (-1.0, -1e-30, np.array([1.0, -2.0]), np.inf)),
    "softplus": Case(bijectors.softplus, 3, _ravel, lambda y: np.all(y > 0), _gamma,
                     (-1e-30, np.array([-1.0, 1.0]))),
    "lower_bounded": Case(lambda: bijectors.lower_bounded(-1.5), 3, _ravel,
                          lambda y: np.all(y > -1.5), lambda r: -1.5 + _gamma(r),
                          (-1.5001, -2.0)),
    "upper_bounded": Case(lambda: bijectors.upper_bounded(2.0), 3, _ravel,
                          lambda y: np.all(y < 2.0), lambda r: 2.0 - _gamma(r), (2.0001, 3.0)),
    "interval": Case(lambda: bijectors.interval(-1.0, 3.0), 3, _ravel,
                     lambda y: np.all((y > -1.0) & (y < 3.0)),
                     lambda r: r.uniform(-1.0, 3.0, size=3), (-1.0001, 3.5, np.nan)),
    "affine": Case(lambda: bijectors.affine(0.5, _SCALE), 3, _ravel, lambda y: True,
                   lambda r: r.normal(size=3), (np.array([0.0, np.inf, 1.0]),)),
    "ordered": Case(bijectors.ordered, 4, _ravel, lambda y: np.all(np.diff(y) > 0),
                    lambda r: np.sort(r.normal(size=4)),
                    (np.array([0.0, 2.0, 1.0, 3.0]), np.array([0.0, -0.001]))),
    "simplex": Case(bijectors.simplex, 3, lambda y: y[:-1],
                    lambda y: np.all(y >= 0) and np.isclose(np.sum(y), 1.0),
                    lambda r: r.dirichlet(np.ones(4)),
                    (np.array([0.5, 0.6, -0.1, 0.0]), np.array([0.3, 0.3, 0.3, 0.3]))),
    "corr_cholesky": Case(bijectors.corr_cholesky, 6, lambda y: y[_TRIL4], _is_corr_factor,
                          _corr_factor,
                          (np.eye(4) * 2.0,  # rows not of unit norm
                           np.eye(4) + np.eye(4, k=1) * 0.1,  # not lower-triangular
                           -np.eye(4))),  # negative diagonal
    "lower_cholesky": Case(bijectors.lower_cholesky, 6, lambda y: y[_TRIL3],
                           lambda y: np.allclose(y, np.tril(y)) and np.all(np.diag(y) > 0),
                           _cov_factor,
                           (np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                            np.diag([1.0, -0.5, 1.0]))),
}
NAMES = list(CASES)
ELEMENTWISE = NAMES[:7]


def _x(rng, case, scale=1.5):
    return jnp.asarray(scale * rng.normal(size=case.n))


# ---------------------------------------------------------------- identities (float64)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name, x64, rng):
    case = CASES[name]
    b = case.make()
    assert b.name == name
    x = _x(rng, case)
    y = b.forward(x)
    np.testing.assert_allclose(b.inverse(y), x, rtol=1e-10, atol=1e-10)
    # From a point of the support drawn independently of `forward`.
    y = jnp.asarray(case.sample(rng))
    np.testing.assert_allclose(b.forward(b.inverse(y)), y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autodiff_jacobian(name, x64, rng):
    case = CASES[name]
    b = case.make()
    # Jitted, as one program: much faster than jacfwd run op by op. The
    # determinant is NumPy's, independent of the code under test.
    both = jax.jit(lambda x: (jax.jacfwd(lambda x: case.free(b.forward(x)))(x),
                              b.forward_log_det_jacobian(x)))
    for _ in range(2):
        jac, log_det = both(_x(rng, case))
        assert jac.shape == (case.n, case.n)
        sign, expected = np.linalg.slogdet(np.asarray(jac))
        assert sign != 0
        np.testing.assert_allclose(log_det, expected, rtol=1e-10, atol=1e-10)


def test_log_det_matches_numpyro(x64, rng):
    """An independent implementation: numpyro's transforms (same parametrizations)."""
    from numpyro.distributions import constraints
    from numpyro.distributions import transforms as T

    pairs = [
        (bijectors.simplex(), T.biject_to(constraints.simplex), 3),
        (bijectors.corr_cholesky(), T.CorrCholeskyTransform(), 6),
        (bijectors.ordered(), T.OrderedTransform(), 4),
        (bijectors.interval(-1.0, 3.0), T.biject_to(constraints.interval(-1.0, 3.0)), 3),
        (bijectors.softplus(), T.SoftplusTransform(), 3),
    ]
    for b, t, n in pairs:
        x = jnp.asarray(2.0 * rng.normal(size=n))
        y, ld = b.forward(x), b.forward_log_det_jacobian(x)
        # Jitted: numpyro's transforms run op by op are slow to first run.
        y_ref, ld_ref = jax.jit(lambda x: (t(x), jnp.sum(t.log_abs_det_jacobian(x, t(x)))))(x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12, err_msg=b.name)
        np.testing.assert_allclose(ld, ld_ref, rtol=1e-10, err_msg=b.name)
    # numpyro puts the diagonal last; the same map up to that permutation.
    x = jnp.asarray(rng.normal(size=6))
    rows, cols = np.tril_indices(3)
    order = np.concatenate([np.flatnonzero(rows != cols), np.flatnonzero(rows == cols)])
    t = T.LowerCholeskyTransform()
    b = bijectors.lower_cholesky()
    np.testing.assert_allclose(b.forward(x), t(x[order]), rtol=1e-12)
    np.testing.assert_allclose(b.forward_log_det_jacobian(x),
                               t.log_abs_det_jacobian(x[order], t(x[order])), rtol=1e-12)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_any_shape(name, x64, rng):
    b = CASES[name].make()
    if name == "affine":  # its scale has shape (3,): a (2, 3) leaf broadcasts it
        b = bijectors.affine(0.5, 2.0)
    x = rng.normal(size=(2, 3))
    y = np.asarray(b.forward(x))
    assert y.shape == x.shape
    # Element-wise: the map on the whole leaf is the map on each entry.
    for idx in np.ndindex(x.shape):
        np.testing.assert_allclose(b.forward(x[idx]), y[idx], rtol=1e-12)
    total = sum(b.forward_log_det_jacobian(x[idx]) for idx in np.ndindex(x.shape))
    np.testing.assert_allclose(b.forward_log_det_jacobian(x), total, rtol=1e-12)
    assert b.forward_log_det_jacobian(x[0, 0]).shape == ()
    assert y.dtype == np.float64


# ---------------------------------------------------------------- support and dtypes
@pytest.mark.parametrize("name", NAMES)
def test_forward_lands_in_support(name, x64, rng):
    case = CASES[name]
    b = case.make()
    for _ in range(5):
        y = np.asarray(b.forward(_x(rng, case, scale=3.0)))
        assert case.in_support(y), y


@pytest.mark.parametrize("name", NAMES)
def test_dtype_follows_input(name, dtype, rng):
    case = CASES[name]
    b = case.make()  # Python-float and float64 NumPy parameters must not promote
    # x64 on for float32 too: that is where a float64 constant would promote.
    with jax.enable_x64(True):
        x = _x(rng, case).astype(dtype)
        y = b.forward(x)
        assert y.dtype == dtype
        assert b.forward_log_det_jacobian(x).dtype == dtype
        assert b.inverse(y).dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_float32_finite_at_30(name):
    b = CASES[name].make()
    n = CASES[name].n
    # One program for the four quantities (compiling is most of the time).
    values = jax.jit(lambda x: (b.forward(x), b.forward_log_det_jacobian(x),
                                jax.grad(b.forward_log_det_jacobian)(x),
                                jax.grad(lambda x: jnp.sum(b.forward(x)))(x)))
    signs = [np.ones(n), -np.ones(n), np.where(np.arange(n) % 2, 1.0, -1.0)]
    for s in signs:
        x = jnp.asarray(30.0 * s, jnp.float32)
        y, log_det, grad_log_det, grad_forward = values(x)
        assert y.dtype == log_det.dtype == jnp.float32
        assert np.all(np.isfinite(y)), (s, y)
        assert np.isfinite(log_det), s
        assert np.all(np.isfinite(grad_log_det)), s
        assert np.all(np.isfinite(grad_forward)), s
    # The eager path (the jitted kernels called one by one) agrees.
    assert np.all(np.isfinite(b.forward(x))) and np.isfinite(b.forward_log_det_jacobian(x))


# ---------------------------------------------------------------- saturation
def _far_out(n):
    """``(P, n)`` unconstrained points from moderate magnitudes to saturating ones.

    Every sign pattern at 1 to 40 (float32 saturates from about 16, float64 from
    about 37), and all entries at -800 (where ``exp`` underflows to 0 in both
    dtypes; at +800 it overflows, which is not saturation).
    """
    signs = [np.ones(n), -np.ones(n), np.where(np.arange(n) % 2, 1.0, -1.0),
             np.where(np.arange(n) % 2, -1.0, 1.0)]
    points = [m * s for m in (1.0, 10.0, 17.0, 20.0, 30.0, 40.0) for s in signs]
    return np.stack(points + [np.full(n, -800.0)])


@pytest.mark.parametrize("name", NAMES)
def test_inverse_of_saturated_forward_is_finite(name, dtype):
    """Far out ``forward`` rounds onto the support's boundary; ``inverse`` reads it as inside.

    ``inverse(forward(x))`` must neither raise nor be infinite (the old
    ``interval``, ``lower_bounded``, ``upper_bounded`` and ``ordered`` raised,
    ``simplex`` and ``corr_cholesky`` returned ``inf``), agree with the jitted
    inverse, and map back onto ``forward(x)`` up to a float step.
    """
    b = CASES[name].make()
    xs = jnp.asarray(_far_out(CASES[name].n), dtype)  # leading axis: independent copies
    eps = float(np.finfo(dtype).eps)
    ys = b.forward(xs)
    assert np.all(np.isfinite(ys))
    back = b.inverse(ys)  # concrete: the support check runs, and must pass
    assert back.dtype == dtype
    assert np.all(np.isfinite(back)), back
    np.testing.assert_allclose(jax.jit(b.inverse)(ys), back, rtol=4 * eps, atol=4 * eps)
    np.testing.assert_allclose(b.forward(back), ys, rtol=64 * eps, atol=4 * eps)
    assert np.isfinite(b.forward_log_det_jacobian(xs))
    assert np.isfinite(b.forward_log_det_jacobian(back))


def _boundary_cases(dt):
    """``(bijector, a point on its support's boundary, the inverse expected there)``.

    The expected value is the inverse at the float next to the boundary
    inside, at least the smallest normal float away, computed in NumPy.
    """
    tiny = np.finfo(dt).tiny
    a = lambda *v: np.array(v, dt)  # noqa: E731

    def above(b):
        return np.nextafter(dt(b), dt(np.inf)) - dt(b)

    def below(b):
        return dt(b) - np.nextafter(dt(b), dt(-np.inf))

    return [
        (bijectors.exp(), a(0.0), a(np.log(tiny))),
        (bijectors.softplus(), a(0.0), a(np.log(tiny))),
        (bijectors.lower_bounded(-1.5), a(-1.5, 0.5), a(np.log(above(-1.5)), np.log(2.0))),
        (bijectors.lower_bounded(0.0), a(0.0), a(np.log(tiny))),
        (bijectors.upper_bounded(2.0), a(2.0), a(np.log(below(2.0)))),
        (bijectors.interval(-1.0, 3.0), a(-1.0, 3.0),
         a(np.log(above(-1.0)) - np.log(4.0), np.log(4.0) - np.log(below(3.0)))),
        (bijectors.ordered(), a(-30.0, -30.0, -29.0),
         a(-30.0, np.log(above(-30.0)), np.log(dt(-29.0) - dt(-30.0)))),
        (bijectors.simplex(), a(1.0, 0.0), a(-np.log(tiny))),
        (bijectors.corr_cholesky(), a([1.0, 0.0], [1.0, 0.0]), a(np.arcsinh(1.0 / tiny))),
        (bijectors.lower_cholesky(), a([2.0, 0.0], [0.5, 0.0]), a(np.log(2.0), 0.5, np.log(tiny))),
    ]


def test_inverse_reads_the_boundary_as_the_nearest_float_inside(dtype):
    eps, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).tiny)
    for b, y, expected in _boundary_cases(dtype):
        x = b.inverse(jnp.asarray(y))  # concrete: accepted, not an error
        assert x.dtype == dtype, b.name
        np.testing.assert_allclose(x, expected, rtol=4 * eps, err_msg=b.name)
        # The same under jit, where nothing is checked.
        np.testing.assert_allclose(jax.jit(b.inverse)(y), expected, rtol=4 * eps,
                                   err_msg=b.name)
        # forward(inverse(y)) gives y back, or the float next to it inside.
        np.testing.assert_allclose(b.forward(x), y, rtol=2 * eps, atol=2 * tiny, err_msg=b.name)
        assert np.isfinite(b.forward_log_det_jacobian(x)), b.name


def _one_step_outside(dt):
    """``(bijector, a point one float step outside its support's closure)``."""
    tiny = np.finfo(dt).tiny
    a = lambda *v: np.array(v, dt)  # noqa: E731
    out_below = lambda b: np.nextafter(dt(b), dt(-np.inf))  # noqa: E731
    out_above = lambda b: np.nextafter(dt(b), dt(np.inf))  # noqa: E731
    return [
        (bijectors.exp(), a(-tiny)),
        (bijectors.softplus(), a(-tiny)),
        (bijectors.lower_bounded(-1.5), a(0.5, out_below(-1.5))),
        (bijectors.upper_bounded(2.0), a(out_above(2.0))),
        (bijectors.interval(-1.0, 3.0), a(out_below(-1.0))),
        (bijectors.interval(-1.0, 3.0), a(out_above(3.0))),
        (bijectors.ordered(), a(-30.0, out_below(-30.0))),
        (bijectors.simplex(), a(1.0, -tiny)),
        (bijectors.corr_cholesky(), a([1.0, 0.0], [1.0, -tiny])),
        (bijectors.lower_cholesky(), a([1.0, 0.0], [0.5, -tiny])),
    ]


def test_inverse_one_float_step_outside_still_raises(dtype):
    """The closure is exact: the boundary is read as inside, the next float out is an error."""
    for b, y in _one_step_outside(dtype):
        with pytest.raises(ValueError, match=f"'{b.name}' bijector's `inverse` needs a value in"):
            b.inverse(jnp.asarray(y))
        if b.name != "corr_cholesky":  # it reads |L| inside jit (documented: no check)
            # Inside jit nothing can raise: the value outside gives NaN, not a
            # clipped finite number.
            assert np.any(np.isnan(jax.jit(b.inverse)(y))), b.name


# ---------------------------------------------------------------- transformations
@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_grad_and_leading_axes(name, rng):
    case = CASES[name]
    b = case.make()
    xs = jnp.asarray(rng.normal(size=(3, case.n)), jnp.float32)

    # One program (compiling is most of a test's time).
    @jax.jit
    def batched(xs):
        ys = jax.vmap(b.forward)(xs)
        # inverse(forward(x)) = x, so its gradient (through inverse's) is all ones.
        round_trip_grad = jax.grad(lambda x: jnp.sum(b.inverse(b.forward(x))))
        vmapped = (ys, jax.vmap(b.forward_log_det_jacobian)(xs), jax.vmap(b.inverse)(ys),
                   jax.vmap(jax.grad(b.forward_log_det_jacobian))(xs),
                   jax.vmap(round_trip_grad)(xs))
        # The same batch as leading axes of one leaf (element-wise bijectors
        # see a (3, n) leaf): independent copies, the log det summed.
        leaf = (b.forward(xs), b.forward_log_det_jacobian(xs), b.inverse(ys))
        return vmapped, leaf

    (ys, lds, back, grads, rt_grads), (ys_leaf, ld_leaf, back_leaf) = batched(xs)
    np.testing.assert_allclose(rt_grads, np.ones(xs.shape), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ys_leaf, ys, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ld_leaf, jnp.sum(lds), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back_leaf, back, rtol=1e-5, atol=1e-5)
    # Rows as NumPy arrays: slicing jax arrays op by op is slow to first run.
    rows = [np.asarray(a) for a in (xs, ys, lds, back, grads)]
    for x, y, ld, xb, g in zip(*rows):
        # vmap under jit equals a loop of eager calls.
        np.testing.assert_allclose(b.forward(x), y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.forward_log_det_jacobian(x), ld, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(xb, x, rtol=1e-3, atol=1e-4)
        # The gradient against central differences (float32: loose).
        h = 1e-2
        fd = [(b.forward_log_det_jacobian(x + h * e) - b.forward_log_det_jacobian(x - h * e))
              / (2 * h) for e in np.eye(case.n, dtype=x.dtype)]
        np.testing.assert_allclose(g, fd, rtol=1e-2, atol=5e-3)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NAMES)
def test_inverse_outside_support_raises(name):
    case = CASES[name]
    b = case.make()
    for bad in case.bad:
        with pytest.raises(ValueError, match=f"'{name}' bijector's `inverse` needs a value in"):
            b.inverse(jnp.asarray(bad))


def test_inverse_message_and_no_check_under_jit():
    with pytest.raises(ValueError, match=r"'exp'.*\[0, inf\); got -1\.0\.$"):
        bijectors.exp().inverse(-1.0)
    with pytest.raises(ValueError, match=r"\[-1\.0, 3\.0\]; got 3\.5 among an array of shape"):
        bijectors.interval(-1.0, 3.0).inverse(jnp.array([0.0, 3.5]))
    # Inside jit the value is not concrete: no error, a NaN.
    assert np.isnan(jax.jit(bijectors.exp().inverse)(-1.0))
    assert np.isnan(jax.jit(bijectors.softplus().inverse)(-1.0))


@pytest.mark.parametrize("call, error, match", [
    (lambda: bijectors.interval(1.0, 0.0), ValueError, r"`low` < `high`.*low=1\.0 and high=0\.0"),
    (lambda: bijectors.interval(0.0, 0.0), ValueError, r"`low` < `high`"),
    (lambda: bijectors.interval(np.zeros(2), np.array([1.0, -1.0])), ValueError,
     r"`low` < `high`.*index \(1,\)"),
    (lambda: bijectors.interval(0.0, np.inf), ValueError, r"`high` of the 'interval'.*finite"),
    (lambda: bijectors.interval(np.nan, 1.0), ValueError, r"`low` of the 'interval'.*finite"),
    (lambda: bijectors.interval("0", 1.0), TypeError, r"`low` of the 'interval'"),
    (lambda: bijectors.lower_bounded(-np.inf), ValueError, r"`low` of the 'lower_bounded'"),
    (lambda: bijectors.upper_bounded(np.nan), ValueError, r"`high` of the 'upper_bounded'"),
    (lambda: bijectors.affine(scale=0.0), ValueError, r"`scale`.*nonzero.*got 0\.0"),
    (lambda: bijectors.affine(scale=np.array([1.0, 0.0])), ValueError, r"`scale`.*index \(1,\)"),
    (lambda: bijectors.affine(shift=np.inf), ValueError, r"`shift` of the 'affine'.*finite"),
    (lambda: bijectors.affine(scale=True), TypeError, r"`scale` of the 'affine'"),
    (lambda: bijectors.affine(scale=np.ones(4)).forward(jnp.ones(3)), ValueError,
     r"`scale`.*shape \(4,\).*leaf's shape \(3,\)"),
    (lambda: bijectors.corr_cholesky().forward(jnp.zeros(4)), ValueError,
     r"'corr_cholesky'.*d\(d-1\)/2.*got length 4"),
    (lambda: bijectors.corr_cholesky().forward_log_det_jacobian(jnp.zeros(5)), ValueError,
     r"d\(d-1\)/2.*got length 5"),
    (lambda: bijectors.lower_cholesky().forward(jnp.zeros(4)), ValueError,
     r"'lower_cholesky'.*d\(d\+1\)/2.*got length 4"),
    (lambda: bijectors.corr_cholesky().inverse(jnp.eye(3)[:2]), ValueError, r"square.*\(2, 3\)"),
    (lambda: bijectors.ordered().forward(jnp.zeros(())), ValueError, r"'ordered'.*shape \(\)"),
    (lambda: bijectors.simplex().forward(jnp.zeros(())), ValueError, r"'simplex'.*shape \(\)"),
])
def test_bad_arguments_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_factories_with_traced_parameters():
    """A factory called inside a trace (e.g. a vmapped bound) skips the value checks."""
    lows = jnp.array([0.0, 1.0])
    ys = jax.vmap(lambda lo: bijectors.lower_bounded(lo).forward(jnp.zeros(())))(lows)
    np.testing.assert_allclose(ys, lows + 1.0)
    # A concrete y against a traced bound: the support check steps aside.
    xs = jax.vmap(lambda lo: bijectors.interval(lo, 4.0).inverse(2.0))(lows)
    np.testing.assert_allclose(xs, [0.0, np.log(1.0 / 2.0)], atol=1e-6)
