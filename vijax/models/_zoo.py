"""A zoo of non-conjugate models on constrained spaces, each with a long-NUTS reference.

Every constructor returns :func:`vijax.models.constrained` of a log density
written on the natural space (scales positive, ``phi`` in (-1, 1)) with one
bijector per latent leaf, so ``model.log_joint`` is the density of the
unconstrained latent (Jacobian included) and ``model.constrain(draws)`` gives
the natural values plus the model's derived quantities.

Data are keyword arguments; each model documents a synthetic default drawn
with ``numpy.random.default_rng(seed)``. Labels and counts may be integer or
bool arrays (cast to the floating dtype; :mod:`vijax.models._labels`). The
computations run in the ``dtype=`` keyword's dtype when given (the data cast
to it); otherwise they follow the floating data's dtype: float32 for the
synthetic defaults whatever ``jax_enable_x64`` says (``dtype=jnp.float64``
gives the float64 model), float64 when float64 data are given. Densities
are normalised (every constant kept), so ``log_joint`` equals an independent
NumPyro twin's unconstrained log joint (``benchmarks/_zoo_numpyro.py``;
checked in ``tests/test_zoo.py``). Posterior
references from long NUTS runs on those twins (exact moments for Neal's
funnel) are stored in ``benchmarks/results/references/<model.name>.json``.

Two likelihoods are written in their log-parameter form rather than through
``jax.scipy.stats``: Bernoulli on logits (``y l - softplus(l)``, as in
:func:`vijax.models.logistic_regression`) and Poisson on the log rate
(``y f - exp(f) - log y!``); both are the same normalised densities, without
the ``log(sigmoid(l))`` and ``log(exp(f))`` round trips that lose precision
or turn an overflow into NaN. ``jax.scipy.stats`` has no half-Cauchy or
half-normal: they are the full densities on (0, inf) plus ``log 2``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import stats
from jax.scipy.special import gammaln

from vijax import _checks
from vijax import bijectors
from vijax._gaussian import Gaussian
from vijax.models import _labels
from vijax.models._constrained import constrained
from vijax.models._glm import predictor_moments
from vijax.models._model import Model, _Lazy

_LOG_2PI = math.log(2.0 * math.pi)

_LOG_2 = math.log(2.0)

# The classic eight schools data (Rubin 1981; Gelman et al., BDA3 section 5.5).
_EIGHT_SCHOOLS_Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
_EIGHT_SCHOOLS_SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)

# Log-Gaussian Cox process: a squared-exponential kernel on the cell centres of
# the unit square, with a fixed lengthscale and a small jitter on the diagonal.
LGCP_LENGTHSCALE = 0.2
LGCP_JITTER = 1e-6


# ------------------------------------------------------------------ data
def eight_schools_data() -> dict:
    """The classic eight schools data: ``y`` (effects) and ``sigma`` (their standard errors)."""
    return {"y": np.array(_EIGHT_SCHOOLS_Y), "sigma": np.array(_EIGHT_SCHOOLS_SIGMA)}


def hierarchical_logistic_data(
    seed: int = 0, num_obs: int = 500, num_features: int = 5, num_groups: int = 10
) -> dict:
    """Synthetic data drawn from the hierarchical logistic model (float64 NumPy)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_obs, num_features))
    group = rng.integers(0, num_groups, size=num_obs)
    w = rng.normal(size=num_features)
    alpha = 0.5 + 1.0 * rng.normal(size=num_groups)  # mu_a = 0.5, sigma_a = 1
    logits = x @ w + alpha[group]
    y = (rng.uniform(size=num_obs) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    return {"x": x, "y": y, "group": group, "num_groups": num_groups}


def sv_log_volatility_np(mu, phi, sigma, h_std):
    """The stationary AR(1) log volatility of the Stan user guide (NumPy, one series)."""
    h = np.empty_like(h_std)
    h[0] = mu + sigma * h_std[0] / np.sqrt(1.0 - phi**2)
    for t in range(1, len(h_std)):
        h[t] = mu + phi * (h[t - 1] - mu) + sigma * h_std[t]
    return h


def stochastic_volatility_data(seed: int = 0, num_steps: int = 100) -> dict:
    """Returns simulated from the model at ``mu = -1``, ``phi = 0.95``, ``sigma = 0.25``."""
    rng = np.random.default_rng(seed)
    h = sv_log_volatility_np(-1.0, 0.95, 0.25, rng.normal(size=num_steps))
    return {"returns": np.exp(h / 2.0) * rng.normal(size=num_steps)}


def poisson_glm_data(seed: int = 0, num_obs: int = 200, num_features: int = 5) -> dict:
    """Synthetic counts at intercept 1 and weights drawn from N(0, 0.3^2)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_obs, num_features))
    w = 0.3 * rng.normal(size=num_features)
    y = rng.poisson(np.exp(1.0 + x @ w)).astype(np.float64)
    return {"x": x, "y": y}


def item_response_data(seed: int = 0, num_students: int = 400, num_items: int = 100) -> dict:
    """Synthetic answers: abilities and difficulties drawn from N(0, 1) (``sigma_d = 1``)."""
    rng = np.random.default_rng(seed)
    ability = rng.normal(size=num_students)
    difficulty = rng.normal(size=num_items)
    logits = ability[:, None] - difficulty[None, :]
    y = (rng.uniform(size=logits.shape) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    return {"y": y}


def lgcp_cholesky(grid: int) -> np.ndarray:
    """The Cholesky factor of the LGCP kernel on a ``grid x grid`` lattice.

    Float64, cells in row-major order, centres ``((i + 0.5) / grid, (j + 0.5) / grid)``.
    """
    centres = (np.arange(grid) + 0.5) / grid
    s = np.stack(np.meshgrid(centres, centres, indexing="ij"), axis=-1).reshape(-1, 2)
    sq = np.sum((s[:, None, :] - s[None, :, :]) ** 2, axis=-1)
    k = np.exp(-0.5 * sq / LGCP_LENGTHSCALE**2) + LGCP_JITTER * np.eye(grid * grid)
    return np.linalg.cholesky(k)


def log_gaussian_cox_data(seed: int = 0, grid: int = 10) -> dict:
    """Counts simulated from the model at ``mu = 1``, ``sigma = 1``."""
    rng = np.random.default_rng(seed)
    f = 1.0 + 1.0 * lgcp_cholesky(grid) @ rng.normal(size=grid * grid)
    return {"counts": rng.poisson(np.exp(f)).reshape(grid, grid).astype(np.float64)}


def default_data(name: str, seed: int = 0) -> dict:
    """The float64 NumPy data of the zoo model ``name`` (a ``model.name``) with its defaults."""
    if name not in ZOO:
        raise ValueError(f"`name` must be one of {ZOO}; got {name!r}.")
    if name.startswith("eight_schools"):
        return eight_schools_data()
    if name == "neals_funnel":
        return {"dim": 10}
    return globals()[f"{name}_data"](seed)


def data_sha256(data: dict) -> str:
    """A fingerprint of the data (float32 bytes, in key order); a stored reference names it.

    The data are rounded to float32 first: the simulated data are float64
    NumPy results whose last bits move between NumPy releases (``np.exp``'s
    SIMD kernel changed the stochastic-volatility returns by an ulp), and a
    fingerprint of the float64 bytes then called an unchanged data set new.
    A one-ulp float64 change moves the float32 rounding only within 2^-29
    of a float32 boundary.
    """
    h = hashlib.sha256()
    for key in sorted(data):
        h.update(key.encode())
        h.update(np.ascontiguousarray(np.asarray(data[key], dtype=np.float32)).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------- helpers
def _zoo_dtype(dtype: Any) -> Optional[np.dtype]:
    """``None``, or ``dtype`` checked: float32, or float64 with ``jax_enable_x64`` on."""
    if dtype is None:
        return None
    try:
        checked = jnp.dtype(dtype)
    except (TypeError, ValueError):
        checked = None
    # Not `checked in (...)`: NumPy reads `None == np.dtype("float64")` as True.
    if checked is None or checked.name not in ("float32", "float64"):
        raise TypeError(
            f"`dtype` must be None, jnp.float32 or jnp.float64; got {dtype!r}."
        )
    if jax.dtypes.canonicalize_dtype(checked) != checked:
        # JAX would silently make float32 arrays: refuse rather than half-comply.
        raise ValueError(
            "`dtype` float64 needs 64-bit JAX: call "
            "`jax.config.update(\"jax_enable_x64\", True)` first (or build the model "
            "inside `with jax.enable_x64(True):`); got dtype=float64 with x64 disabled."
        )
    return checked


def _float_data(given: dict, defaults, dtype: Any = None, labels: Optional[dict] = None) -> dict:
    """The named arrays as one floating dtype, finite; ``None`` entries from ``defaults()``.

    ``labels`` maps the names of label and count arrays to their kind
    (:mod:`vijax.models._labels`): those may be integer or bool too. With
    ``dtype`` None, given floating arrays keep their dtype (they must share
    one) and the rest (integer labels, missing arrays) take it, or float32
    when no floating array is given; with a ``dtype``, every array is cast to it.
    """
    labels = labels or {}
    target = _zoo_dtype(dtype)
    out, whole = {}, {}
    for name, value in given.items():
        if value is None:
            continue
        if name in labels and _labels.is_whole(value):
            whole[name] = value  # cast below, once the dtype is known
        elif name in labels:
            # Floating labels keep their own dtype (checked against the rest below).
            out[name] = _labels.as_labels(name, value, kind=labels[name], dtype=None)
        else:
            out[name] = _checks.as_data(name, value)
    if target is not None:
        dtype = target
        out = {name: x.astype(dtype) for name, x in out.items()}
    elif out:
        _checks.check_same_dtype(out)
        dtype = next(iter(out.values())).dtype
    else:
        dtype = jnp.dtype(jnp.float32)
    for name, value in whole.items():
        out[name] = _labels.as_labels(name, value, kind=labels[name], dtype=dtype)
    missing = [name for name, value in given.items() if value is None]
    if missing:
        generated = defaults()
        for name in missing:
            out[name] = jnp.asarray(generated[name], dtype)
    return {name: out[name] for name in given}


def _all_or_none(names: dict) -> None:
    passed = [k for k, v in names.items() if v is not None]
    if passed and len(passed) != len(names):
        absent = [k for k in names if k not in passed]
        raise ValueError(
            f"Pass {', '.join(f'`{k}`' for k in names)} together (or none, for the "
            f"synthetic default); got {', '.join(f'`{k}`' for k in passed)} without "
            f"{', '.join(f'`{k}`' for k in absent)}."
        )


def _optional_size(name: str, value: Optional[int], actual: int) -> None:
    if value is not None and value != actual:
        raise ValueError(
            f"`{name}` must be None or match the data ({actual}); got {value}."
        )


def _half_cauchy(x, scale):
    return stats.cauchy.logpdf(x, 0.0, scale) + _LOG_2


def _half_normal(x, scale):
    return stats.norm.logpdf(x, 0.0, scale) + _LOG_2


def _bernoulli_logit(y, logits):
    return jnp.sum(y * logits - jax.nn.softplus(logits))


def _poisson_log_rate(y, log_rate, log_factorial):
    return jnp.sum(y * log_rate - jnp.exp(log_rate)) - log_factorial


# ---------------------------------------------------------------- models
def eight_schools(
    *, centered: bool = False, y: Any = None, sigma: Any = None, dtype: Any = None
) -> Model:
    """Returns the eight schools hierarchical model, centred or non-centred.

    ``mu ~ N(0, 5^2)``, ``tau ~ HalfCauchy(5)``, ``theta_j ~ N(mu, tau^2)``,
    ``y_j ~ N(theta_j, sigma_j^2)`` with known ``sigma_j``. Centred, the
    latent is ``{"mu", "tau", "theta"}``; non-centred it is
    ``{"mu", "tau", "eta"}`` with ``eta_j ~ N(0, 1)`` and
    ``theta = mu + tau * eta`` returned by ``constrain`` as a derived
    quantity. Both describe the same posterior over ``(mu, tau, theta)``; the
    centred one has the funnel-shaped geometry between ``tau`` and ``theta``.
    ``tau`` is unconstrained through the exp bijector. ``d = J + 2`` (10).

    Args:
      centered: the centred parameterisation (``theta`` a latent) if True.
      y: (J,) observed effects; default the classic data
        ``[28, 8, -3, 7, -1, 1, 18, 12]``.
      sigma: (J,) their standard errors (> 0); default
        ``[15, 10, 16, 11, 9, 11, 10, 18]``.
      dtype: the floating dtype of the data, latent and computations:
        ``jnp.float32``, or ``jnp.float64`` (needs ``jax_enable_x64``); the
        data are cast to it. Default None: the dtype of the given floating
        data, float32 for the synthetic default (even with
        ``jax_enable_x64``: pass ``dtype=jnp.float64`` for a float64 model).

    Returns:
      A :class:`Model` named ``"eight_schools_centered"`` or
      ``"eight_schools_noncentered"``.

    Raises:
      TypeError: data not floating point, of mixed dtypes (with ``dtype``
        None), or ``dtype`` not None, float32 or float64.
      ValueError: non-finite data, shapes that differ, ``sigma <= 0``, or
        ``dtype=float64`` without ``jax_enable_x64``.

    References:
      Rubin, D. B. (1981). Estimation in parallel randomized experiments.
      Gelman et al., Bayesian Data Analysis (3rd ed.), section 5.5.
    """
    if not isinstance(centered, (bool, np.bool_)):
        raise TypeError(f"`centered` must be a bool; got {centered!r}.")
    data = _float_data({"y": y, "sigma": sigma}, eight_schools_data, dtype)
    y, sigma = data["y"], data["sigma"]
    _checks.check_ndim("y", y, 1)
    _checks.check_shape("sigma", sigma, y.shape)
    _checks.check_positive("sigma", sigma)
    num_schools, dtype = y.shape[0], y.dtype
    exp = bijectors.exp()

    def prior(mu, tau):
        return stats.norm.logpdf(mu, 0.0, 5.0) + _half_cauchy(tau, 5.0)

    def likelihood(theta):
        return jnp.sum(stats.norm.logpdf(y, theta, sigma))

    if centered:
        def log_density(v):
            return (prior(v["mu"], v["tau"])
                    + jnp.sum(stats.norm.logpdf(v["theta"], v["mu"], v["tau"]))
                    + likelihood(v["theta"]))

        return constrained(
            log_density,
            {"mu": None, "tau": exp, "theta": None},
            {"mu": jnp.zeros((), dtype), "tau": jnp.ones((), dtype),
             "theta": jnp.zeros((num_schools,), dtype)},
            name="eight_schools_centered",
        )

    def theta(v):
        return v["mu"] + v["tau"] * v["eta"]

    def log_density(v):
        return (prior(v["mu"], v["tau"]) + jnp.sum(stats.norm.logpdf(v["eta"]))
                + likelihood(theta(v)))

    return constrained(
        log_density,
        {"mu": None, "tau": exp, "eta": None},
        {"mu": jnp.zeros((), dtype), "tau": jnp.ones((), dtype),
         "eta": jnp.zeros((num_schools,), dtype)},
        deterministic=lambda v: {"theta": theta(v)},
        name="eight_schools_noncentered",
    )


def hierarchical_logistic(
    *,
    x: Any = None,
    y: Any = None,
    group: Any = None,
    num_groups: Optional[int] = None,
    seed: int = 0,
    dtype: Any = None,
) -> Model:
    """Returns logistic regression with non-centred group intercepts.

    ``w ~ N(0, I_p)``, ``mu_a ~ N(0, 1)``, ``sigma_a ~ HalfNormal(1)``,
    ``a_g ~ N(0, 1)``, ``alpha_g = mu_a + sigma_a a_g``,
    ``y_i ~ Bernoulli(sigmoid(x_i^T w + alpha_{group_i}))``. The latent is
    ``{"w": (p,), "mu_a": (), "sigma_a": (), "a": (G,)}`` (``sigma_a`` through
    the exp bijector); ``constrain`` adds ``alpha`` (G,). ``d = p + G + 2``
    (17 for the default).

    The synthetic default (``x``, ``y``, ``group`` all None): ``n = 500``
    observations, ``p = 5`` standard normal features, ``G = 10`` groups drawn
    uniformly, ``w ~ N(0, I)``, ``mu_a = 0.5``, ``sigma_a = 1``, drawn with
    ``numpy.random.default_rng(seed)``.

    Args:
      x: (n, p) features, floating point.
      y: (n,) labels, 0 or 1: integer or bool (cast to ``x``'s dtype), or
        floating point of ``x``'s dtype.
      group: (n,) integer group of each observation, in ``[0, num_groups)``.
      num_groups: the number of groups G; default ``max(group) + 1``.
      seed: the seed of the synthetic data.
      dtype: the floating dtype of the data, latent and computations:
        ``jnp.float32``, or ``jnp.float64`` (needs ``jax_enable_x64``); the
        data are cast to it. Default None: the dtype of the given floating
        data, float32 for the synthetic default (even with
        ``jax_enable_x64``: pass ``dtype=jnp.float64`` for a float64 model).

    Returns:
      A :class:`Model` named ``"hierarchical_logistic"``.

    Raises:
      TypeError: ``x`` not floating point, ``y`` not real numbers, floating
        ``x`` and ``y`` of mixed dtypes (with ``dtype`` None), ``group`` not
        an integer array, or ``dtype`` not None, float32 or float64.
      ValueError: non-finite data, only some of ``x``, ``y``, ``group``
        given, shapes that disagree, a label not 0 or 1, a group outside
        ``[0, num_groups)``, or ``dtype=float64`` without ``jax_enable_x64``.
    """
    _all_or_none({"x": x, "y": y, "group": group})
    if group is None:
        generated = hierarchical_logistic_data(seed)
        if num_groups is not None:
            raise ValueError(
                "`num_groups` needs `group` (the synthetic default has 10 groups); "
                f"got num_groups={num_groups!r} without data."
            )
        num_groups = generated["num_groups"]
        group = generated["group"]
        data = _float_data({"x": None, "y": None}, lambda: generated, dtype)
    else:
        data = _float_data({"x": x, "y": y}, None, dtype, labels={"y": _labels.BINARY})
    x, y = data["x"], data["y"]
    _checks.check_ndim("x", x, 2)
    _checks.check_shape("y", y, (x.shape[0],))
    group = _group_index(group, x.shape[0])
    if num_groups is None:
        num_groups = int(np.max(group)) + 1 if group.size else 1
    num_groups = _checks.check_positive_int("num_groups", num_groups)
    if group.size and (group.min() < 0 or group.max() >= num_groups):
        bad = group[(group < 0) | (group >= num_groups)][0]
        raise ValueError(f"`group` must lie in [0, {num_groups}) (num_groups); got {bad}.")
    group = jnp.asarray(group)
    num_features, dtype = x.shape[1], x.dtype

    def alpha(v):
        return v["mu_a"] + v["sigma_a"] * v["a"]

    def log_density(v):
        logits = x @ v["w"] + alpha(v)[group]
        return (jnp.sum(stats.norm.logpdf(v["w"])) + stats.norm.logpdf(v["mu_a"])
                + _half_normal(v["sigma_a"], 1.0) + jnp.sum(stats.norm.logpdf(v["a"]))
                + _bernoulli_logit(y, logits))

    return constrained(
        log_density,
        {"w": None, "mu_a": None, "sigma_a": bijectors.exp(), "a": None},
        {"w": jnp.zeros((num_features,), dtype), "mu_a": jnp.zeros((), dtype),
         "sigma_a": jnp.ones((), dtype), "a": jnp.zeros((num_groups,), dtype)},
        deterministic=lambda v: {"alpha": alpha(v)},
        name="hierarchical_logistic",
    )


def _group_index(group: Any, n: int) -> np.ndarray:
    if isinstance(group, jax.core.Tracer):
        raise TypeError(
            "`group` must be a concrete integer array (it indexes the data); got a traced value."
        )
    dtype = getattr(group, "dtype", None)
    g = np.asarray(group)
    if dtype is None and g.dtype.kind in "f" and g.size == 0:
        g = g.astype(np.int64)
    if g.dtype.kind not in "iu":
        raise TypeError(
            f"`group` must be an integer array (the group of each observation); got "
            f"dtype {g.dtype}. Convert it explicitly, e.g. `group.astype(int)`."
        )
    if g.shape != (n,):
        raise ValueError(
            f"`group` must have shape ({n},), one per row of `x`; got shape {g.shape}."
        )
    return g


def stochastic_volatility(
    *,
    returns: Any = None,
    seed: int = 0,
    num_steps: Optional[int] = None,
    dtype: Any = None,
) -> Model:
    """Returns the stochastic volatility model of the Stan user guide (non-centred).

    ``mu ~ Cauchy(0, 10)``, ``phi ~ Uniform(-1, 1)``, ``sigma ~ HalfCauchy(5)``,
    ``h_std_t ~ N(0, 1)``; the log volatility is the stationary AR(1)
    ``h_1 = mu + sigma h_std_1 / sqrt(1 - phi^2)``,
    ``h_t = mu + phi (h_{t-1} - mu) + sigma h_std_t``, and
    ``returns_t ~ N(0, exp(h_t / 2)^2)``. The latent is
    ``{"mu", "phi", "sigma", "h_std": (T,)}`` (``phi`` through
    ``interval(-1, 1)``, ``sigma`` through exp); ``constrain`` adds ``h`` (T,).
    ``d = T + 3`` (103 for the default).

    The synthetic default: ``T = num_steps`` (100) returns simulated from the
    model at ``mu = -1``, ``phi = 0.95``, ``sigma = 0.25`` with
    ``numpy.random.default_rng(seed)``.

    Args:
      returns: (T,) mean-corrected returns.
      seed: the seed of the synthetic data.
      num_steps: the length of the synthetic series (default 100); with
        ``returns`` given, None or ``len(returns)``.
      dtype: the floating dtype of the data, latent and computations:
        ``jnp.float32``, or ``jnp.float64`` (needs ``jax_enable_x64``); the
        data are cast to it. Default None: the dtype of the given floating
        data, float32 for the synthetic default (even with
        ``jax_enable_x64``: pass ``dtype=jnp.float64`` for a float64 model).

    Returns:
      A :class:`Model` named ``"stochastic_volatility"``.

    Raises:
      TypeError: ``returns`` not floating point, or ``dtype`` not None, float32 or float64.
      ValueError: non-finite ``returns``, not 1-d, ``num_steps`` disagreeing,
        or ``dtype=float64`` without ``jax_enable_x64``.

    References:
      Stan User's Guide, section "Stochastic volatility models";
      Kim, Shephard and Chib (1998), Review of Economic Studies 65(3).
    """
    if returns is None:
        steps = 100 if num_steps is None else _checks.check_positive_int("num_steps", num_steps)
        data = _float_data(
            {"returns": None}, lambda: stochastic_volatility_data(seed, steps), dtype)
    else:
        data = _float_data({"returns": returns}, None, dtype)
    y = data["returns"]
    _checks.check_ndim("returns", y, 1)
    _optional_size("num_steps", num_steps, y.shape[0])
    dtype = y.dtype

    def log_volatility(v):
        # The recursion runs on g = h - mu: g_1 = e_1 / sqrt(1 - phi^2) (the
        # stationary law), g_t = phi g_{t-1} + e_t, with e = sigma h_std. A
        # sequential scan: XLA compiles it in about a second, where a parallel
        # prefix scan (log T depth) took seven and ran slower on a CPU.
        phi, e = v["phi"], v["sigma"] * v["h_std"]
        g1 = e[0] * jax.lax.rsqrt(1.0 - jnp.square(phi))

        def step(g, e_t):
            g = phi * g + e_t
            return g, g

        _, later = jax.lax.scan(step, g1, e[1:])
        return v["mu"] + jnp.concatenate([g1[None], later])

    def log_density(v):
        h = log_volatility(v)
        return (stats.cauchy.logpdf(v["mu"], 0.0, 10.0)
                + stats.uniform.logpdf(v["phi"], -1.0, 2.0)
                + _half_cauchy(v["sigma"], 5.0)
                + jnp.sum(stats.norm.logpdf(v["h_std"]))
                + jnp.sum(stats.norm.logpdf(y, 0.0, jnp.exp(0.5 * h))))

    return constrained(
        log_density,
        {"mu": None, "phi": bijectors.interval(-1.0, 1.0), "sigma": bijectors.exp(), "h_std": None},
        {"mu": jnp.zeros((), dtype), "phi": jnp.zeros((), dtype),
         "sigma": jnp.ones((), dtype), "h_std": jnp.zeros(y.shape, dtype)},
        deterministic=lambda v: {"h": log_volatility(v)},
        name="stochastic_volatility",
    )


def neals_funnel(*, dim: int = 10, dtype: Any = jnp.float32) -> Model:
    """Returns Neal's funnel in its centred (hard) form.

    ``v ~ N(0, 3^2)``, ``x_i ~ N(0, exp(v / 2)^2)`` for ``i < dim - 1``. The
    latent is ``{"v": (), "x": (dim - 1,)}``, already unconstrained (no
    bijector). The posterior is known exactly: ``v ~ N(0, 9)``; each ``x_i``
    has mean 0 and variance ``E[exp(v)] = exp(9 / 2)`` (sd ``exp(9/4)``, about
    9.49), a heavy-tailed scale mixture of normals. NUTS on this form is
    biased (it cannot enter the neck), so the stored reference is the exact
    answer.

    Args:
      dim: the total dimension ``d`` (>= 2).
      dtype: the floating dtype of the latent (there are no data):
        ``jnp.float32`` (the default, even with ``jax_enable_x64``; None
        means it too) or ``jnp.float64`` (needs ``jax_enable_x64``).

    Returns:
      A :class:`Model` named ``"neals_funnel"``.

    Raises:
      TypeError: ``dim`` not an int, or ``dtype`` not float32 or float64.
      ValueError: ``dim < 2``, or ``dtype=float64`` without ``jax_enable_x64``.

    References:
      Neal, R. M. (2003). Slice sampling. Annals of Statistics 31(3).
    """
    dim = _checks.check_positive_int("dim", dim, minimum=2)
    dtype = _zoo_dtype(jnp.float32 if dtype is None else dtype)

    def log_density(v):
        return (stats.norm.logpdf(v["v"], 0.0, 3.0)
                + jnp.sum(stats.norm.logpdf(v["x"], 0.0, jnp.exp(0.5 * v["v"]))))

    return constrained(
        log_density,
        {"v": None, "x": None},
        {"v": jnp.zeros((), dtype), "x": jnp.zeros((dim - 1,), dtype)},
        name="neals_funnel",
    )


def poisson_glm(*, x: Any = None, y: Any = None, seed: int = 0, dtype: Any = None) -> Model:
    """Returns Poisson regression with a log link.

    ``intercept ~ N(0, 1)``, ``w ~ N(0, I_p)``,
    ``y_i ~ Poisson(exp(intercept + x_i^T w))``. The latent is
    ``{"intercept": (), "w": (p,)}`` (unconstrained); ``d = p + 1`` (6).
    A GLM: its ``expected_log_joint(q)`` for a Gaussian ``q`` is closed form
    (``E exp(t) = exp(m + s^2 / 2)`` for each log rate), so
    :func:`vijax.exact_elbo` and :func:`vijax.fit_exact` take it.

    The synthetic default: ``n = 200`` observations of ``p = 5`` standard
    normal features, intercept 1 and weights drawn from ``N(0, 0.3^2)``, with
    ``numpy.random.default_rng(seed)``.

    Args:
      x: (n, p) features, floating point.
      y: (n,) counts (whole numbers >= 0): integer or bool (cast to ``x``'s
        dtype; at most ``2^24`` in float32), or floating point of ``x``'s dtype.
      seed: the seed of the synthetic data.
      dtype: the floating dtype of the data, latent and computations:
        ``jnp.float32``, or ``jnp.float64`` (needs ``jax_enable_x64``); the
        data are cast to it. Default None: the dtype of the given floating
        data, float32 for the synthetic default (even with
        ``jax_enable_x64``: pass ``dtype=jnp.float64`` for a float64 model).

    Returns:
      A :class:`Model` named ``"poisson_glm"``.

    Raises:
      TypeError: ``x`` not floating point, ``y`` not real numbers, floating
        ``x`` and ``y`` of mixed dtypes (with ``dtype`` None), or
        ``dtype`` not None, float32 or float64.
      ValueError: non-finite data, only one of ``x``, ``y`` given, shapes
        that disagree, ``y`` not counts (or an integer count too large for
        the dtype), or ``dtype=float64`` without ``jax_enable_x64``.
    """
    _all_or_none({"x": x, "y": y})
    data = _float_data({"x": x, "y": y}, lambda: poisson_glm_data(seed), dtype,
                       labels={"y": _labels.COUNTS})
    x, y = data["x"], data["y"]
    _checks.check_ndim("x", x, 2)
    _checks.check_shape("y", y, (x.shape[0],))
    log_factorial = jnp.sum(gammaln(y + 1.0))
    dtype = x.dtype

    def log_density(v):
        return (stats.norm.logpdf(v["intercept"]) + jnp.sum(stats.norm.logpdf(v["w"]))
                + _poisson_log_rate(y, v["intercept"] + x @ v["w"], log_factorial))

    # The flat latent is [intercept, w] (ravel_pytree sorts the keys), so the
    # log rates are [1, x] @ z.
    design = _Lazy(lambda x: jnp.concatenate([jnp.ones((x.shape[0], 1), x.dtype), x], 1), x)
    design_sq = _Lazy(jnp.square, design)

    def expected_log_joint(q: Gaussian):
        # E exp(t) = exp(m + s^2 / 2) for t ~ N(m, s^2): closed form.
        m, sd = predictor_moments(q, design(), design_sq())
        lik = jnp.sum(y * m - jnp.exp(m + 0.5 * jnp.square(sd))) - log_factorial
        prior = -0.5 * (q.dim * _LOG_2PI + jnp.sum(jnp.square(q.mean)) + jnp.sum(q.variance))
        return lik + prior

    model = constrained(
        log_density,
        {"intercept": None, "w": None},
        {"intercept": jnp.zeros((), dtype), "w": jnp.zeros((x.shape[1],), dtype)},
        name="poisson_glm",
    )
    return model._replace(expected_log_joint=expected_log_joint)


def item_response(
    *,
    y: Any = None,
    seed: int = 0,
    num_students: Optional[int] = None,
    num_items: Optional[int] = None,
    dtype: Any = None,
) -> Model:
    """Returns a Rasch (one-parameter logistic) item response model.

    ``ability_j ~ N(0, 1)``, ``sigma_d ~ HalfCauchy(1)``,
    ``difficulty_k ~ N(0, sigma_d^2)``,
    ``y_jk ~ Bernoulli(sigmoid(ability_j - difficulty_k))``. Fixing the
    abilities' location and scale (0 and 1) identifies the model: the logit
    scale is that of the abilities and only the spread of the difficulties is
    learned. With a few hundred answers per item the difficulties are pinned
    down by the data, so the centred form mixes well. The latent is
    ``{"ability": (J,), "difficulty": (K,), "sigma_d": ()}`` (``sigma_d``
    through exp); ``d = J + K + 1`` (501 for the default).

    The synthetic default: ``J = 400`` students and ``K = 100`` items,
    abilities and difficulties drawn from ``N(0, 1)`` with
    ``numpy.random.default_rng(seed)``.

    Args:
      y: (J, K) answers, 1 correct and 0 wrong: floating point, or integer or
        bool (cast to ``dtype``, float32 by default).
      seed: the seed of the synthetic data.
      num_students: J for the synthetic data (default 400); with ``y`` given,
        None or ``y.shape[0]``.
      num_items: K likewise (default 100).
      dtype: the floating dtype of the data, latent and computations:
        ``jnp.float32``, or ``jnp.float64`` (needs ``jax_enable_x64``); the
        data are cast to it. Default None: the dtype of the given floating
        data, float32 for the synthetic default (even with
        ``jax_enable_x64``: pass ``dtype=jnp.float64`` for a float64 model).

    Returns:
      A :class:`Model` named ``"item_response"``.

    Raises:
      TypeError: ``y`` not real numbers (complex, strings), or
        ``dtype`` not None, float32 or float64.
      ValueError: non-finite ``y``, not 2-d, an answer not 0 or 1, sizes
        that disagree, or ``dtype=float64`` without ``jax_enable_x64``.

    References:
      Rasch, G. (1960). Probabilistic models for some intelligence and
      attainment tests.
    """
    if y is None:
        j = 400 if num_students is None else _checks.check_positive_int(
            "num_students", num_students)
        k = 100 if num_items is None else _checks.check_positive_int("num_items", num_items)
        data = _float_data({"y": None}, lambda: item_response_data(seed, j, k), dtype)
    else:
        data = _float_data({"y": y}, None, dtype, labels={"y": _labels.BINARY})
    y = data["y"]
    _checks.check_ndim("y", y, 2)
    _optional_size("num_students", num_students, y.shape[0])
    _optional_size("num_items", num_items, y.shape[1])
    dtype = y.dtype

    def log_density(v):
        logits = v["ability"][:, None] - v["difficulty"][None, :]
        return (jnp.sum(stats.norm.logpdf(v["ability"]))
                + jnp.sum(stats.norm.logpdf(v["difficulty"], 0.0, v["sigma_d"]))
                + _half_cauchy(v["sigma_d"], 1.0)
                + _bernoulli_logit(y, logits))

    return constrained(
        log_density,
        {"ability": None, "difficulty": None, "sigma_d": bijectors.exp()},
        {"ability": jnp.zeros((y.shape[0],), dtype),
         "difficulty": jnp.zeros((y.shape[1],), dtype), "sigma_d": jnp.ones((), dtype)},
        name="item_response",
    )


def log_gaussian_cox(
    *, counts: Any = None, seed: int = 0, grid: Optional[int] = None, dtype: Any = None
) -> Model:
    """Returns a log-Gaussian Cox process on a square grid, whitened.

    The log intensity of cell ``c`` (cell area 1: ``f`` is the log expected
    count) is ``f = mu + sigma L u`` with ``u ~ N(0, I)``, ``L`` the Cholesky
    factor of a squared-exponential kernel on the cell centres of the unit
    square (lengthscale ``LGCP_LENGTHSCALE = 0.2``, jitter ``1e-6`` on the
    diagonal); ``mu ~ N(0, 1)``, ``sigma ~ HalfNormal(1)``, and
    ``counts_c ~ Poisson(exp(f_c))``. The latent is
    ``{"mu": (), "sigma": (), "u": (grid**2,)}`` (``sigma`` through exp;
    ``u`` in row-major cell order); ``constrain`` adds ``f`` as a
    ``(grid, grid)`` array. ``d = grid**2 + 2`` (102 for the default).

    The synthetic default: ``grid = 10``, counts simulated from the model at
    ``mu = 1``, ``sigma = 1`` with ``numpy.random.default_rng(seed)``.

    Args:
      counts: (grid, grid) counts (whole numbers >= 0): floating point, or
        integer or bool (cast to ``dtype``, float32 by default; at most
        ``2^24`` in float32).
      seed: the seed of the synthetic data.
      grid: the side of the synthetic grid (default 10); with ``counts``
        given, None or ``counts.shape[0]``.
      dtype: the floating dtype of the data, latent and computations:
        ``jnp.float32``, or ``jnp.float64`` (needs ``jax_enable_x64``); the
        data are cast to it. Default None: the dtype of the given floating
        data, float32 for the synthetic default (even with
        ``jax_enable_x64``: pass ``dtype=jnp.float64`` for a float64 model).

    Returns:
      A :class:`Model` named ``"log_gaussian_cox"``.

    Raises:
      TypeError: ``counts`` not real numbers (complex, strings), or
        ``dtype`` not None, float32 or float64.
      ValueError: non-finite ``counts``, not square, not counts (or an
        integer count too large for the dtype), ``grid`` disagreeing, or
        ``dtype=float64`` without ``jax_enable_x64``.

    References:
      Møller, Syversveen and Waagepetersen (1998), Log Gaussian Cox
      processes, Scandinavian Journal of Statistics 25(3); Murray, Adams and
      MacKay (2010), Elliptical slice sampling (the whitened form).
    """
    if counts is None:
        g = 10 if grid is None else _checks.check_positive_int("grid", grid)
        data = _float_data({"counts": None}, lambda: log_gaussian_cox_data(seed, g), dtype)
    else:
        data = _float_data({"counts": counts}, None, dtype, labels={"counts": _labels.COUNTS})
    counts = data["counts"]
    _checks.check_ndim("counts", counts, 2)
    if counts.shape[0] != counts.shape[1]:
        raise ValueError(
            f"`counts` must be a square (grid, grid) array; got shape {tuple(counts.shape)}."
        )
    _optional_size("grid", grid, counts.shape[0])
    g, dtype = counts.shape[0], counts.dtype
    chol = jnp.asarray(lgcp_cholesky(g), dtype)  # factored in float64, then cast
    flat = counts.reshape(-1)
    log_factorial = jnp.sum(gammaln(flat + 1.0))

    def log_intensity(v):
        return v["mu"] + v["sigma"] * (chol @ v["u"])

    def log_density(v):
        return (stats.norm.logpdf(v["mu"]) + _half_normal(v["sigma"], 1.0)
                + jnp.sum(stats.norm.logpdf(v["u"]))
                + _poisson_log_rate(flat, log_intensity(v), log_factorial))

    return constrained(
        log_density,
        {"mu": None, "sigma": bijectors.exp(), "u": None},
        {"mu": jnp.zeros((), dtype), "sigma": jnp.ones((), dtype),
         "u": jnp.zeros((g * g,), dtype)},
        deterministic=lambda v: {"f": log_intensity(v).reshape(g, g)},
        name="log_gaussian_cox",
    )


ZOO = (
    "eight_schools_centered",
    "eight_schools_noncentered",
    "hierarchical_logistic",
    "stochastic_volatility",
    "neals_funnel",
    "poisson_glm",
    "item_response",
    "log_gaussian_cox",
)
"""The names of the zoo's default models (``model.name``), one reference file each."""
