"""The open family protocol: ``init``, ``sample`` and ``log_prob``; everything else a capability.

A variational family is a :class:`VariationalFamily`, a NamedTuple of pure
functions in the manner of ``optax.GradientTransformation``. Three are
required; the others are optional capabilities that some functions use and
check for by presence (never by comparing names):

========================  ===============================================
capability                used by
========================  ===============================================
``entropy``               ``elbo(..., estimator="closed_entropy")``
``to_gaussian``           :func:`vijax.exact_kl`, :func:`vijax.exact_elbo`,
                          :func:`vijax.natural_gradient`, ``closed_entropy``
                          (when ``entropy`` is absent)
``from_gaussian``         :func:`vijax.natural_gradient`; flows (start at a
                          fitted Gaussian)
``sample_and_log_prob``   every objective (``log q`` of the draws computed
                          while sampling: one pass through a flow)
``average_space``         ``fit(..., auto_stop=True)``'s iterate average
                          (:func:`vijax.iterate_average`'s ``space``)
========================  ===============================================

Every Monte Carlo objective, :func:`vijax.fit` and :func:`vijax.fit_batched`
need only the three required functions.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks
from vijax._cache import LRU

ArrayTree = Any

OPTIONAL = ("entropy", "to_gaussian", "from_gaussian", "sample_and_log_prob")


class VariationalFamily(NamedTuple):
    """A variational family: pure functions of a parameter pytree.

    Only ``init``, ``sample`` and ``log_prob`` are required:
    ``vijax.VariationalFamily(init=..., sample=..., log_prob=...)`` is a valid
    family for :func:`vijax.fit`, :func:`vijax.fit_batched`,
    :func:`vijax.elbo` (every estimator but ``"closed_entropy"``),
    :func:`vijax.iwae_bound`, :func:`vijax.renyi_bound`,
    :func:`vijax.estimator_gradients` and :func:`vijax.compare_gradients`
    (given a reference gradient). The rest are capabilities: a function that
    needs one the family lacks raises an error naming it.

    Attributes:
      init: ``init(latent) -> params``. ``latent`` is an example latent pytree
        (an array, a scalar, a dict of arrays). Params are a pytree of
        floating-point arrays of one dtype (what optax updates).
      sample: ``sample(key, params, num_samples) -> z``, a latent pytree with a
        leading axis of size ``num_samples`` on every leaf, reparameterized
        (differentiable with respect to ``params``) for every estimator but
        ``"score"``.
      log_prob: ``log_prob(params, z) -> scalar``, the log density of one
        latent ``z`` (a pytree shaped like the latent, no sample axis).
      entropy: optional; ``entropy(params) -> scalar`` in closed form.
      to_gaussian: optional; ``to_gaussian(params) -> vijax.Gaussian`` over
        the flat latent (``ravel_pytree`` order), keeping the family's
        structured scale: the Gaussian view.
      name: optional; a label for messages and tables (``"mean_field"``, ...).
        Behaviour never depends on it.
      from_gaussian: optional; ``from_gaussian(gaussian, latent) -> params``,
        the inverse of ``to_gaussian``: the parameters whose Gaussian is
        ``gaussian`` (a flat :class:`vijax.Gaussian`), shaped after
        ``latent``. Example: ``family.from_gaussian(model.posterior,
        model.latent)`` puts ``q`` on a conjugate posterior.
      sample_and_log_prob: optional; ``sample_and_log_prob(key, params,
        num_samples) -> (z, log_q)``: the draws of ``sample`` (the same
        values for the same key) and ``log q(z_s)`` for each, differentiable
        in ``params`` both directly and through ``z``. Where inverting the
        sampling map is dear (a flow), objectives use it instead of
        ``log_prob`` at the draws (``"reparam"``, ``iwae_bound``,
        ``renyi_bound``, :func:`vijax.diagnose`). The path estimators
        (``"stl"``, ``"dreg"``) still call ``log_prob``.
      average_space: optional; a pair of functions ``(forward, inverse)``,
        the parameterization in which ``fit``'s ``auto_stop`` averages the
        iterates (:func:`vijax.iterate_average`'s ``space``): ``forward(params)``
        returns a pytree of arrays, ``inverse`` maps it back. The mean-field
        and low-rank families average their diagonal's variances, in which the
        expected gradient is linear near a Gaussian target, so that the
        average of a constant step's jittering iterates is not biased by the
        jitter. Without one the parameters themselves are averaged.

    Example:
      A family of your own (here a Gaussian with a learned diagonal, written
      from scratch) needs only the three functions:

      >>> import jax, jax.numpy as jnp, vijax
      >>> def init(latent):
      ...     return {"loc": jnp.zeros_like(latent), "log_scale": jnp.full_like(latent, -1.0)}
      >>> def sample(key, params, num_samples):
      ...     eps = jax.random.normal(key, (num_samples,) + params["loc"].shape)
      ...     return params["loc"] + jnp.exp(params["log_scale"]) * eps
      >>> def log_prob(params, z):
      ...     return jax.scipy.stats.norm.logpdf(
      ...         z, params["loc"], jnp.exp(params["log_scale"])).sum()
      >>> family = vijax.VariationalFamily(init=init, sample=sample, log_prob=log_prob)
    """

    init: Callable[[ArrayTree], Any]
    sample: Callable[..., ArrayTree]
    log_prob: Callable[[Any, ArrayTree], jax.Array]
    entropy: Optional[Callable[[Any], jax.Array]] = None
    to_gaussian: Optional[Callable[[Any], Any]] = None
    name: Optional[str] = None
    from_gaussian: Optional[Callable[[Any, ArrayTree], Any]] = None
    sample_and_log_prob: Optional[Callable[..., Any]] = None
    average_space: Optional[tuple[Callable[[Any], Any], Callable[[Any], Any]]] = None


def describe(family: VariationalFamily) -> str:
    """``"the 'full_rank' family"``, or ``"the family"`` when it has no name."""
    return f"the {family.name!r} family" if family.name else "the family"


def check_family(family: Any) -> VariationalFamily:
    """Returns ``family`` if it is a VariationalFamily with callable functions."""
    if not isinstance(family, VariationalFamily):
        raise TypeError(
            "`family` must be a vijax.VariationalFamily (e.g. vijax.mean_field(), or "
            "vijax.VariationalFamily(init=..., sample=..., log_prob=...)); got "
            f"{type(family).__name__}."
        )
    for field in ("init", "sample", "log_prob"):
        fn = getattr(family, field)
        if not callable(fn):
            raise TypeError(
                f"`family.{field}` must be a callable; got {type(fn).__name__}."
            )
    for field in OPTIONAL:
        fn = getattr(family, field)
        if fn is not None and not callable(fn):
            raise TypeError(
                f"`family.{field}` must be None or a callable; got {type(fn).__name__}."
            )
    _checks.check_space("family.average_space", family.average_space)
    if family.name is not None and not isinstance(family.name, str):
        raise TypeError(f"`family.name` must be None or a str; got {family.name!r}.")
    return family


def require(family: VariationalFamily, capability: str, needed_by: str) -> Callable:
    """Returns ``family.<capability>``, or raises ``ValueError`` naming what is missing."""
    fn = getattr(family, capability)
    if fn is None:
        raise ValueError(
            f"{needed_by} needs `family.{capability}`, and {describe(family)} has "
            f"none. Give the family `{capability}=...`, or use a method that does "
            "not need it."
        )
    return fn


def entropy_fn(family: VariationalFamily, needed_by: str) -> Callable:
    """The closed-form entropy: ``family.entropy``, else through the Gaussian view."""
    if family.entropy is not None:
        return family.entropy
    if family.to_gaussian is not None:
        return lambda params: family.to_gaussian(params).entropy()
    raise ValueError(
        f"{needed_by} needs a closed-form entropy (`family.entropy`, or a Gaussian "
        f"view `family.to_gaussian`), and {describe(family)} has neither. Use "
        "estimator='stl' or 'reparam', which need only sample and log_prob."
    )


# ---------------------------------------------------------------- draws
def check_draws(family: VariationalFamily, z: ArrayTree, num_samples: int) -> None:
    """Raises unless every leaf of ``z`` has a leading axis of size ``num_samples``."""
    leaves = jax.tree_util.tree_flatten_with_path(z)[0]
    if not leaves:
        raise ValueError(
            f"`family.sample` of {describe(family)} must return a latent pytree with "
            f"at least one array; got {z!r}."
        )
    for path, leaf in leaves:
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] != num_samples:
            raise ValueError(
                f"`family.sample` of {describe(family)} must return draws with a "
                f"leading sample axis of size num_samples = {num_samples} on every "
                f"leaf; got shape {shape} at z{jax.tree_util.keystr(path)}."
            )


def check_log_prob(family: VariationalFamily, out: Any, num_samples: int) -> jax.Array:
    """Checks ``vmap(log_prob)`` output: one scalar per draw."""
    out = jnp.asarray(out)
    if out.shape != (num_samples,):
        raise ValueError(
            f"`family.log_prob` of {describe(family)} must return a scalar for one "
            f"latent; got shape {tuple(out.shape[1:])} per draw."
        )
    return out


def _check_abstract(name: str, params: Any, family: VariationalFamily) -> bool:
    """The checks of :func:`check_params` that depend only on shapes and dtypes.

    Returns True (the value cached for a family and params structure that passed).
    """
    # Two sample counts: a missing sample axis cannot hide behind a leaf whose
    # first dimension happens to equal one of them.
    key = jax.random.key(0)
    for num in (5, 3):
        try:
            z = jax.eval_shape(lambda k, p: family.sample(k, p, num), key, params)
        except Exception as e:  # the family names what it expected
            # A ValueError (wrong shapes, a batch axis) stays one; anything
            # else (wrong type or structure) is a TypeError.
            error = ValueError if isinstance(e, ValueError) else TypeError
            raise error(
                f"`{name}` do not match {describe(family)}: `family.sample` raised on "
                f"them (build the params with family.init(latent)): {e}"
            ) from e
        check_draws(family, z, num)
    one = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), z)
    try:
        lp = jax.eval_shape(family.log_prob, params, one)
    except Exception as e:
        raise ValueError(
            f"`family.log_prob` of {describe(family)} raised on one draw of "
            f"`family.sample` (a latent without the sample axis): {e}"
        ) from e
    if tuple(getattr(lp, "shape", (None,))) != ():
        raise ValueError(
            f"`family.log_prob` of {describe(family)} must return a scalar for one "
            f"latent; got shape {tuple(getattr(lp, 'shape', ()))}."
        )
    return True


# Families and parameter structures already checked: a repeated fit (the same
# family, parameters of the same shapes) skips the abstract evaluation, which
# costs milliseconds of tracing per call.
_checked = LRU(64)


def check_params(name: str, params: Any, family: VariationalFamily) -> Any:
    """Checks, before any work, that ``params`` work with ``family``.

    Static checks by abstract evaluation (``jax.eval_shape``, nothing runs):
    ``family.sample`` accepts the params and returns draws with a sample
    axis, and ``family.log_prob`` returns a scalar for one of them. The
    params must be floating-point arrays of one dtype, and finite when
    concrete.
    """
    family = check_family(family)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(f"`{name}` must hold at least one array; got {params!r}.")
    dtypes = {jnp.asarray(leaf).dtype for leaf in leaves}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise TypeError(
            f"`{name}` must be floating-point arrays of one dtype; got "
            f"{sorted(str(d) for d in dtypes)}."
        )
    signature = (
        family,
        jax.tree_util.tree_structure(params),
        tuple((jnp.shape(leaf), jnp.result_type(leaf)) for leaf in leaves),
    )
    _checked.get(signature, lambda: _check_abstract(name, params, family))
    for leaf in leaves:
        if _checks.is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"`{name}` must be finite; got non-finite entries.")
    return params
