"""Monte Carlo objectives whose ``jax.grad`` is a chosen gradient estimator.

Each objective returns a Monte Carlo estimate of a bound, built as a
*surrogate*: ``stop_gradient`` places the derivative where the estimator wants
it while the returned value stays the estimate itself. So
``value, grad = jax.value_and_grad(elbo, 1)(...)`` gives the ELBO estimate and
the estimator's gradient in one pass.

All samples are drawn at once (``family.sample``) and ``log_joint`` is
evaluated once, batched with ``vmap``. ``family.sample(key, params, S)`` is a
deterministic reparameterized transform of ``jax.random.normal(key, ...)``, so
two calls with the same key draw the same base noise whatever the estimator:
differences between estimators computed with one key are not sampling noise.
:func:`estimator_gradients` returns several estimators' gradients from one
shared set of draws and one batched ``log_joint`` call.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp

from vijax import _checks, _taylor
from vijax._gaussian import LowRankScale
from vijax.families._protocol import (
    VariationalFamily,
    check_draws,
    check_family,
    check_log_prob,
    describe,
    entropy_fn,
)

ArrayTree = Any

ELBO_ESTIMATORS = ("reparam", "closed_entropy", "stl", "score")
"""The textbook gradient estimators of :func:`elbo` (the default comparison set)."""

ADAPTIVE_ESTIMATORS = ("adaptive_stl",)
"""vijax's own ELBO estimator: STL's path term weighted per draw (see :func:`elbo`)."""

# Sticking the landing where it helps: unbiased, plain STL at a Gaussian
# posterior (where its variance vanishes), and no runaway noise far from it.
DEFAULT_ESTIMATOR = "adaptive_stl"

IWAE_ESTIMATORS = ("reparam", "dreg")
"""The gradient estimators of :func:`iwae_bound`."""

GRADIENT_ESTIMATORS = ELBO_ESTIMATORS + ADAPTIVE_ESTIMATORS + ("iwae", "dreg")
"""Names :func:`estimator_gradients` and :func:`vijax.compare_gradients` accept:
the ELBO estimators plus ``"iwae"`` and ``"dreg"``, the reparameterized and the
doubly reparameterized gradients of :func:`iwae_bound`."""

ANTITHETIC_ESTIMATORS = ("reparam", "closed_entropy", "stl", "adaptive_stl")
"""The estimators :func:`elbo` accepts with ``antithetic=True`` (the pathwise
ones; the score estimator's leave-one-out baseline assumes independent draws)."""

_sg = jax.lax.stop_gradient


def antithetic_allowed(family, estimator: str) -> bool:
    """Whether antithetic pairs are possible: a Gaussian view and a pathwise estimator."""
    return getattr(family, "to_gaussian", None) is not None and estimator in ANTITHETIC_ESTIMATORS


def check_antithetic(antithetic, family, estimator: str) -> bool:
    """Validates ``antithetic`` against the family and the estimator; returns it."""
    if not isinstance(antithetic, bool):
        raise TypeError(f"`antithetic` must be a bool; got {antithetic!r}.")
    if antithetic and not antithetic_allowed(family, estimator):
        if getattr(family, "to_gaussian", None) is None:
            raise ValueError(
                "`antithetic=True` reflects draws through q's mean, which needs a family "
                f"with a Gaussian view (`to_gaussian`); {describe(family)} has none."
            )
        raise ValueError(
            f"`antithetic=True` works with the estimators {ANTITHETIC_ESTIMATORS}; "
            f"got estimator={estimator!r}."
        )
    return antithetic


def _check_common(family, log_joint, num_samples) -> int:
    check_family(family)
    _checks.check_log_joint(log_joint)
    return _checks.check_positive_int("num_samples", num_samples)


def check_estimator(estimator: str, valid: tuple[str, ...], name: str = "estimator") -> str:
    if not isinstance(estimator, str) or estimator not in valid:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(v) for v in valid)}; "
            f"got {estimator!r}."
        )
    return estimator


def check_estimator_names(
    estimators: str | Sequence[str], valid: tuple[str, ...] = GRADIENT_ESTIMATORS
) -> tuple[str, ...]:
    """Validates a non-empty sequence of distinct estimator names (a str is one name)."""
    if isinstance(estimators, str):
        estimators = (estimators,)
    try:
        names = tuple(estimators)
    except TypeError:
        raise TypeError(
            f"`estimators` must be a sequence of names from {valid}; got "
            f"{type(estimators).__name__}."
        ) from None
    if not names:
        raise ValueError(f"`estimators` must name at least one of {valid}; got ().")
    for name in names:
        check_estimator(name, valid, "estimators")
    if len(set(names)) != len(names):
        raise ValueError(f"`estimators` must not repeat a name; got {names}.")
    return names


def _map_draws(fn: Callable, z: ArrayTree, num_samples: int) -> Any:
    """``vmap(fn)(z)``; with one draw, ``fn`` on it with the axis put back.

    A ``vmap`` over an axis of size 1 is not free on XLA CPU: measured 30%
    of a cheap minibatch step (60.6 against 41.6 us at d = 100, B = 1024),
    where the batched matrix products it leaves behind are slower than plain
    ones.
    """
    if num_samples == 1:
        return jax.tree_util.tree_map(
            lambda a: jnp.expand_dims(jnp.asarray(a), 0),
            fn(jax.tree_util.tree_map(lambda a: a[0], z)))
    return jax.vmap(fn)(z)


def check_log_joint_output(out: jax.Array, num_samples: int) -> jax.Array:
    """``out``, the log joints of ``num_samples`` draws, if one real float scalar each.

    Static checks (shape and dtype), so they hold under jit, vmap and grad.
    A complex log joint would otherwise give a complex ELBO, silently.
    """
    if out.shape != (num_samples,):
        raise ValueError(
            "`log_joint` must return a scalar for one latent; got output shape "
            f"{tuple(out.shape[1:])} per sample."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            "`log_joint` must return a real floating-point scalar (float32 or float64); "
            f"got dtype {out.dtype}."
        )
    return out


def batched_log_joint(log_joint: Callable, z: ArrayTree, num_samples: int) -> jax.Array:
    """``vmap(log_joint)(z)`` with a check that each call returns a real scalar."""
    return check_log_joint_output(
        jnp.asarray(_map_draws(log_joint, z, num_samples)), num_samples)


def batched_log_prob(family: VariationalFamily, params, z: ArrayTree) -> jax.Array:
    """``log q(z_s)`` for every sample ``z_s`` along the leading axis of ``z``."""
    num_samples = jax.tree_util.tree_leaves(z)[0].shape[0]
    out = _map_draws(functools.partial(family.log_prob, params), z, num_samples)
    return check_log_prob(family, out, num_samples)


def _sums_of_others(x: jax.Array) -> jax.Array:
    """``sum_{r != s} x_r`` for each ``s``, without subtracting (no cancellation)."""
    zero = jnp.zeros((1,), x.dtype)
    return jnp.concatenate([zero, jnp.cumsum(x[:-1])]) + jnp.concatenate(
        [jnp.cumsum(x[:0:-1])[::-1], zero]
    )


def _sums_of_other_groups(x: jax.Array, groups: tuple[int, ...]) -> jax.Array:
    """For antithetic draws: ``sum`` of ``x`` over every group of draws but draw ``s``'s own.

    ``groups[s]`` is the base draw that draw ``s`` reflects (its pair, or
    its four sign combinations for a low-rank family: :func:`antithetic_layout`).
    Leaving the partners out too keeps the sum independent of draw ``s``.
    """
    ids = jnp.asarray(groups)
    per_group = jax.ops.segment_sum(x, ids, num_segments=max(groups) + 1)
    return _sums_of_others(per_group)[ids]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stl_mix(groups, z_p, z_q, entropy):
    """Identity. Its VJP weights the STL path term of ``log q`` at draw ``s`` by ``c_s``.

    ``z_p`` feeds ``log p``, ``z_q`` the parameter-stopped ``log q``, and
    ``entropy`` an unbiased term for the entropy's gradient, added as ``h -
    stop_gradient(h)``: either the closed-form entropy (a scalar), which gets
    the weight ``mean_s(1 - c_s)``, or the per-draw ``log q(z_s)`` of the
    draws, differentiable in the parameters directly and through ``z`` (a
    vector, from ``sample_and_log_prob``), whose entry ``s`` gets the weight
    ``1 - c_s``. With ``a_s = grad_z log p(z_s)`` and ``b_s = grad_z log
    q(z_s)`` (read off the two cotangents), ``c_s = clip(sum_{r != s} <a_r,
    b_r> / sum_{r != s} ||b_r||^2, 0, 1)``: the least-squares weight of ``b``
    against ``a`` from the *other* draws, so independent of draw ``s``. The
    path term's expectation is ``grad H``, as is either entropy term's, so
    ``c_s * (path term) + (1 - c_s) * (entropy term)`` is unbiased. At a
    Gaussian posterior (a posterior in the family) ``a_s = b_s`` and ``c_s =
    1``: plain STL, as when S = 1. With ``groups`` (antithetic draws: the
    base draw of each draw, a static tuple; None for independent draws) the
    sums leave out draw ``s``'s partners too, which are not independent of it.
    """
    return z_p, z_q, entropy


def _stl_mix_fwd(groups, z_p, z_q, entropy):
    return (z_p, z_q, entropy), None


def _stl_mix_bwd(groups, _, cts):
    ct_p, ct_q, ct_h = cts
    leaves_q = jax.tree_util.tree_leaves(ct_q)
    s = leaves_q[0].shape[0]

    def per_draw(x):
        return jnp.sum(jnp.reshape(x, (s, -1)), axis=1)

    pairs = zip(jax.tree_util.tree_leaves(ct_p), leaves_q)
    if groups is None:
        others = _sums_of_others
    else:
        others = functools.partial(_sums_of_other_groups, groups=groups)
    num = others(functools.reduce(jnp.add, [per_draw(-p * q) for p, q in pairs]))
    den = others(functools.reduce(jnp.add, [per_draw(q * q) for q in leaves_q]))
    ok = den > 0  # else no other draw (S = 1) or no STL cotangent: c = 1
    c = jnp.where(ok, jnp.clip(num / jnp.where(ok, den, 1.0), 0.0, 1.0), 1.0)
    ct_q = jax.tree_util.tree_map(
        lambda t: t * jnp.reshape(c, (s,) + (1,) * (t.ndim - 1)).astype(t.dtype), ct_q
    )
    if jnp.ndim(ct_h) == 0:  # the closed-form entropy
        return ct_p, ct_q, ct_h * jnp.mean(1.0 - c).astype(ct_h.dtype)
    return ct_p, ct_q, ct_h * (1.0 - c).astype(ct_h.dtype)  # per-draw log q


_stl_mix.defvjp(_stl_mix_fwd, _stl_mix_bwd)


def reflection_blocks(family: VariationalFamily, params: Any) -> tuple[int, int] | None:
    """The sizes of the two independent blocks of q's base noise, where it has them.

    A :class:`vijax.LowRankScale` draws ``z = mu + W eps_W + diag(s) eps_D``
    (``eps_W`` of ``rank`` entries, then ``eps_D`` of ``dim``): returns
    ``(rank, dim)``. None for any other Gaussian view (one block).
    """
    scale = family.to_gaussian(params).scale
    if isinstance(scale, LowRankScale):
        return scale.rank, scale.dim
    return None


def antithetic_layout(num_samples: int, blocked: bool) -> tuple[tuple[int, ...], tuple]:
    """``(groups, signs)``: each draw's base draw and the signs of its noise blocks.

    Without blocks, draws ``s`` and ``s + ceil(S / 2)`` are a pair
    ``(+eps, -eps)`` (with S odd the last reflection is dropped). With two
    blocks, ``S // 4`` base draws each give the four sign combinations
    ``(+, +), (-, -), (+, -), (-, +)`` of ``(eps_W, eps_D)``, then what is
    left (``S mod 4`` draws) is a pair and/or one single draw.
    """
    if not blocked:
        half = (num_samples + 1) // 2
        groups = (tuple(range(half)) * 2)[:num_samples]
        signs = tuple([(1, 1)] * half + [(-1, -1)] * half)[:num_samples]
        return groups, signs
    quads, rest = divmod(num_samples, 4)
    groups, signs = [], []
    for b in range(quads):
        groups += [b] * 4
        signs += [(1, 1), (-1, -1), (1, -1), (-1, 1)]
    if rest >= 2:
        groups += [quads] * 2
        signs += [(1, 1), (-1, -1)]
    if rest % 2:
        groups.append(max(groups, default=-1) + 1)
        signs.append((1, 1))
    return tuple(groups), tuple(signs)


def antithetic_sample(
    key: jax.Array, params: Any, family: VariationalFamily, num_samples: int
) -> ArrayTree:
    """Draws of q in reflected groups (:func:`antithetic_layout`).

    For a Gaussian ``z = mu + L eps``, the reflection ``2 mu - z = mu - L eps``
    is the draw of ``-eps``: ``ceil(S / 2)`` draws of ``family.sample``
    followed by their reflections, each half a sample of q, and the terms of
    ``f(z)`` odd in ``eps`` cancel within a pair. With ``S`` odd the last
    reflection is dropped. ``mu`` is the family's Gaussian view's mean, so
    the reflections depend on ``params`` as the draws do (pathwise).

    For a low-rank family (:func:`reflection_blocks`) each base draw
    ``(eps_W, eps_D)`` gives its four sign combinations instead, each a
    draw of q: on a quadratic ``log p`` the gradient with respect to the
    factor ``W`` then holds only ``eps_W eps_W^T`` noise (the cross term
    ``H diag(s) eps_D eps_W^T``, most of its noise at large d, cancels), and
    with STL it vanishes at the family's optimum.
    """
    blocks = reflection_blocks(family, params)
    if blocks is not None:
        return _blocked_sample(key, params, family, num_samples, blocks)
    half = (num_samples + 1) // 2
    z = family.sample(key, params, half)
    check_draws(family, z, half)
    example = jax.tree_util.tree_map(lambda a: a[0], z)
    unravel = jax.flatten_util.ravel_pytree(example)[1]
    mean = unravel(family.to_gaussian(params).mean)
    return jax.tree_util.tree_map(
        lambda a, m: jnp.concatenate([a, (2 * m)[None].astype(a.dtype) - a])[:num_samples],
        z, mean)


def _blocked_sample(key, params, family, num_samples: int, blocks) -> ArrayTree:
    groups, signs = antithetic_layout(num_samples, True)
    g = family.to_gaussian(params)
    rank, dim = blocks
    eps = jax.random.normal(key, (max(groups) + 1, rank + dim), g.mean.dtype)
    flips = jnp.asarray([[a] * rank + [b] * dim for a, b in signs], g.mean.dtype)
    flat = g.mean[None, :] + g.scale.apply(eps[jnp.asarray(groups)] * flips)
    shapes = jax.eval_shape(lambda: family.sample(key, params, 1))
    example = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape[1:], a.dtype), shapes)
    unravel = jax.flatten_util.ravel_pytree(example)[1]
    z = jax.vmap(unravel)(flat)
    check_draws(family, z, num_samples)
    return z


def sample_with_log_prob(
    key: jax.Array, params: Any, family: VariationalFamily, num_samples: int,
    antithetic: bool = False,
) -> tuple[ArrayTree, Any]:
    """``(z, log q(z_s))`` from ``family.sample_and_log_prob`` where the family
    has it, else ``(z, None)`` from ``family.sample`` (``log q`` is then
    computed by ``log_prob`` where needed); with ``antithetic``,
    ``(antithetic_sample(...), None)``. The draws are checked."""
    if antithetic:  # its own draws are checked there; the reflections keep their shape
        return antithetic_sample(key, params, family, num_samples), None
    if family.sample_and_log_prob is None:
        z = family.sample(key, params, num_samples)
        check_draws(family, z, num_samples)
        return z, None
    z, log_q = family.sample_and_log_prob(key, params, num_samples)
    check_draws(family, z, num_samples)
    log_q = jnp.asarray(log_q)
    if log_q.shape != (num_samples,):
        raise ValueError(
            f"`family.sample_and_log_prob` of {describe(family)} must return one log "
            f"density per draw, shape ({num_samples},); got {tuple(log_q.shape)}."
        )
    return z, log_q


def draw(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    log_joint: Callable,
    num_samples: int,
    *,
    pathwise: bool,
    adaptive: bool = False,
    antithetic: bool = False,
) -> tuple[ArrayTree, jax.Array, Any, Any]:
    """Returns the draws ``z``, ``log p(x, z_s)`` from one batched call, the
    inputs ``(z_stl, entropy)`` of the ``"adaptive_stl"`` surrogate (None
    unless ``adaptive``), and ``log q(z_s)`` where the family computes it
    while sampling (``sample_and_log_prob``; else None).

    With ``pathwise=False`` the draws do not depend on ``params`` (the score
    estimator never differentiates through them or through ``log_joint``).
    With ``antithetic`` they come in reflected pairs (:func:`antithetic_sample`).
    """
    z, log_q = sample_with_log_prob(
        key, params if pathwise else _sg(params), family, num_samples, antithetic
    )
    if not (pathwise and adaptive):
        return z, batched_log_joint(log_joint, z, num_samples), None, log_q
    groups = None
    if antithetic:
        groups = antithetic_layout(num_samples, reflection_blocks(family, params) is not None)[0]
    if family.entropy is not None or family.to_gaussian is not None:
        z_p, z_stl, entropy = _stl_mix(
            groups, z, z, entropy_fn(family, "adaptive_stl")(params))
    elif log_q is not None:
        # No closed form, but log q of the draws came with them (a flow): the
        # Monte Carlo entropy -mean(log q) is the unbiased alternative.
        z_p, z_stl, mixed = _stl_mix(groups, z, z, log_q)
        entropy = -jnp.mean(mixed)
    else:
        # Neither: plain STL (no entropy term, no dtype promotion).
        return z, batched_log_joint(log_joint, z, num_samples), (z, None), log_q
    return z, batched_log_joint(log_joint, z_p, num_samples), (z_stl, entropy), log_q


def surrogates(
    params: Any,
    family: VariationalFamily,
    z: ArrayTree,
    log_p: jax.Array,
    names: tuple[str, ...],
    adaptive: Any = None,
    sampled_log_q: Any = None,
) -> dict[str, jax.Array]:
    """Returns ``{name: surrogate}`` for names in :data:`GRADIENT_ESTIMATORS`.

    ``z``, ``log_p``, ``adaptive`` and ``sampled_log_q`` come from
    :func:`draw`; only the ``log q`` variants the requested estimators need
    are computed (``sampled_log_q``, when given, is ``log q`` of the draws,
    differentiable in ``params`` directly and through ``z``). The value of each surrogate
    is the objective's estimate; its gradient with respect to ``params`` is
    the estimator. Arguments are assumed checked.
    """
    s = log_p.shape[0]

    @functools.cache
    def log_q():  # differentiable in params, directly and through z
        if sampled_log_q is not None:
            return sampled_log_q
        return batched_log_prob(family, params, z)

    @functools.cache
    def log_q_stopped_params():  # only the path through z (STL, DReG)
        return batched_log_prob(family, _sg(params), z)

    def log_w():
        return log_p - log_q()

    out = {}
    for name in names:
        if name == "reparam":
            out[name] = jnp.mean(log_w())
        elif name == "closed_entropy":
            out[name] = jnp.mean(log_p) + entropy_fn(family, "estimator='closed_entropy'")(params)
        elif name == "stl":
            out[name] = jnp.mean(log_p - log_q_stopped_params())
        elif name == "adaptive_stl":
            z_stl, entropy = adaptive
            lq = batched_log_prob(family, _sg(params), z_stl)
            out[name] = jnp.mean(log_p - lq)
            if entropy is not None:
                out[name] = out[name] + (entropy - _sg(entropy))
        elif name == "score":
            f = _sg(log_w())
            lq = batched_log_prob(family, params, _sg(z))
            if s >= 2:
                # Leave-one-out baseline: independent of z_s, so unbiased.
                baseline = (jnp.sum(f) - f) / (s - 1)
            else:
                baseline = jnp.zeros_like(f)
            # The draws do not depend on params, so the last term's gradient is
            # only that of parameters log_joint closes over (a data model's
            # theta): E_q[grad_theta log p], which f, stopped, would drop.
            out[name] = (jnp.mean(f) + jnp.mean((f - baseline) * (lq - _sg(lq)))
                         + jnp.mean(log_p - _sg(log_p)))
        elif name == "iwae":
            out[name] = jax.nn.logsumexp(log_w()) - math.log(s)
        elif name == "dreg":
            lw = _sg(log_w())
            weights_sq = jnp.square(jax.nn.softmax(lw))
            lw_path = log_p - log_q_stopped_params()
            out[name] = jax.nn.logsumexp(lw) - math.log(s) + jnp.sum(
                weights_sq * (lw_path - _sg(lw_path))
            )
        else:  # pragma: no cover - names are checked by the callers
            raise ValueError(f"unknown estimator {name!r}")
    return out


def _objective(key, params, family, log_joint, num_samples, name,
               antithetic: bool = False, control=None) -> jax.Array:
    z, log_p, adaptive, log_q = draw(
        key, params, family, log_joint, num_samples, pathwise=name != "score",
        adaptive=name == "adaptive_stl", antithetic=antithetic,
    )
    if control is not None:
        layout = None
        if antithetic:  # a reflected draw's Hessian-vector product is its partner's negated
            layout = antithetic_layout(num_samples,
                                       reflection_blocks(family, params) is not None)
        q_s, expected = _taylor.control_terms(control, log_joint, params, family, z, layout)
        log_p = log_p - q_s + expected
    return surrogates(params, family, z, log_p, (name,), adaptive, log_q)[name]


def elbo(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    num_samples: int,
    estimator: str = DEFAULT_ESTIMATOR,
    antithetic: bool = False,
    control: Any = None,
) -> jax.Array:
    """Returns an unbiased Monte Carlo ELBO estimate whose gradient is ``estimator``.

    ``ELBO = E_q[log p(x, z) - log q(z)]`` estimated from ``num_samples``
    draws of ``q``; ``jax.grad`` with respect to ``params`` gives:

    * ``"reparam"``: the pathwise gradient of ``mean(log p(z_s) - log q(z_s))``
      with a Monte Carlo entropy (ADVI; Kucukelbir et al. 2017).
    * ``"closed_entropy"``: the pathwise gradient of ``mean(log p(z_s))`` plus
      the gradient of the family's closed-form entropy.
    * ``"stl"``: sticking the landing (Roeder, Wu and Duvenaud 2017): the
      pathwise gradient with the parameters stopped inside ``log q``; its
      variance vanishes when ``q`` equals the posterior.
    * ``"adaptive_stl"`` (the default): STL where it helps. Far from the
      posterior plain STL's path term through ``log q`` carries noise that
      grows with ``||L^{-1}||``, and Adam, normalizing every coordinate, turns
      it into a random walk of a full-rank factor's off-diagonal entries that
      makes the factor exponentially ill-conditioned (a d = 501 item-response
      model diverged); on a spline flow fitting Neal's funnel it stalls the
      fit. Here, with S >= 2, that path term at draw ``s`` is weighted by
      ``c_s`` in [0, 1] and the rest of its expectation, ``(1 - c_s) grad
      H``, is added exactly with a closed-form entropy (``family.entropy`` or
      ``to_gaussian``), or as ``(1 - c_s)`` times the reparameterized
      gradient of ``-log q(z_s)`` where the family samples with its log
      density (``sample_and_log_prob``, as the flows do); ``c_s = clip(sum
      <a_r, b_r> / sum ||b_r||^2, 0, 1)`` over the *other* draws (``a =
      grad_z log p``, ``b = grad_z log q``), so it is independent of draw
      ``s`` and the estimator stays unbiased. At a posterior inside the
      family ``a = b``, so ``c = 1``: plain STL, whose variance vanishes
      there; with S = 1, or with neither a closed-form entropy nor
      ``sample_and_log_prob``, it is plain STL. Not an average of S
      independent terms, and not forward-mode differentiable (a
      ``custom_vjp``).
    * ``"score"``: the score-function (REINFORCE) gradient
      ``mean((f_s - b_s) grad log q(z_s))`` with ``f = log p - log q`` and a
      leave-one-out baseline ``b_s`` (mean of the other samples' ``f``) when
      ``num_samples >= 2`` (no baseline when ``num_samples == 1``). It never
      differentiates ``log_joint``, so it works for non-differentiable log
      joints.

    Every estimator is unbiased for the exact ELBO gradient, ``-grad KL(q ||
    p(z | x))``, and the returned value is unbiased for the ELBO (the same
    value for ``"reparam"``, ``"stl"`` and ``"score"`` with one key;
    ``"closed_entropy"`` uses the exact entropy). The same key gives the same
    draws for every estimator. For :func:`vijax.mean_field` and
    :func:`vijax.full_rank`, ``"reparam"`` and ``"closed_entropy"`` give the
    same *gradient* (only their values differ): with the invertible map
    ``z = m + L eps``, ``log q(z) = log N(eps; 0, I) - log |det L|``, whose
    pathwise gradient is minus the entropy's. :func:`vijax.low_rank` maps
    ``d + rank`` base draws onto ``d`` coordinates, so there the scale
    gradients differ.

    Args:
      key: a PRNG key (typed ``jax.random.key`` or legacy uint32).
      params: the family's parameters.
      family: a :class:`vijax.VariationalFamily`.
      log_joint: ``log_joint(z) -> scalar``, the unnormalised log p(x, z) of
        one latent pytree. It is called once, under ``vmap`` over the draws.
      num_samples: the number of draws S (>= 1).
      estimator: one of ``"reparam"``, ``"closed_entropy"``, ``"stl"``,
        ``"adaptive_stl"``, ``"score"``. The default, ``"adaptive_stl"``, is
        unbiased like the others, its noise vanishes as ``q`` approaches a
        Gaussian posterior, which is what lets Adam settle on it (``python -m
        benchmarks.parameterization`` measures the difference for STL), and
        it does not blow up far from the posterior.
      antithetic: draw ``ceil(S / 2)`` samples and their reflections through
        q's mean (``mu +- L eps``; :func:`vijax._objectives.antithetic_sample`)
        instead of S independent ones. Each draw is still a draw of q, so
        every estimate stays unbiased, but the terms odd in ``eps`` cancel
        within a pair: for a quadratic ``log p`` (a Gaussian posterior) the
        gradient with respect to the mean is exact, and near any posterior
        its noise shrinks with the third derivative instead of the second.
        The scale's gradient gets only ``ceil(S / 2)`` independent draws, so
        its noise grows by up to twice. For :func:`vijax.low_rank` (``z = mu +
        W eps_W + diag(s) eps_D``) the draws come in fours instead, every sign
        combination of ``(eps_W, eps_D)``: the mean's gradient is still exact
        on a quadratic ``log p`` (with ``S`` a multiple of 4, or 2 more), and
        the factor's gradient loses the term ``H diag(s) eps_D eps_W^T``, which
        dominates its noise at large d (with ``"stl"`` it is zero at the
        family's optimum on a Gaussian target), for ``S / 4`` independent
        draws of ``eps_D``. Needs a family with a Gaussian view
        (``to_gaussian``) and a pathwise estimator (not ``"score"``). With
        ``"adaptive_stl"`` the weight of draw ``s`` leaves its partners out too.
      control: a :class:`vijax.TaylorReference` (:func:`vijax.taylor_reference`)
        for the Taylor control variate, or None. With one, ``log p(z_s)`` is
        replaced by ``log p(z_s) - Q(z_s) + E_q[Q]``, ``Q`` the second-order
        expansion of ``log p`` at ``control.loc``, whose expectation is exact
        (:mod:`vijax._taylor`): still unbiased, value and gradient, and with
        ``"closed_entropy"`` the gradient is exact for a Gaussian posterior.
        Each draw costs one Hessian-vector product more. For families with a
        diagonal or low-rank-plus-diagonal covariance and pathwise estimators.

    Returns:
      A scalar ELBO estimate (a bound: larger is better).

    Raises:
      ValueError: unknown ``estimator`` or ``num_samples < 1``,
        ``log_joint`` does not return a scalar, or ``params`` do not have the
        family's shapes (a Gaussian family's params from ``fit_batched``,
        with a leading batch axis, included).
      TypeError: ``family`` is not a family, ``log_joint`` not callable or
        not returning a real floating-point value.

    References:
      A. Kucukelbir et al., Automatic differentiation variational inference,
      JMLR 2017. G. Roeder, Y. Wu and D. Duvenaud, Sticking the landing:
      simple, lower-variance gradient estimators for variational inference,
      NeurIPS 2017. R. Ranganath, S. Gerrish and D. Blei, Black box
      variational inference, AISTATS 2014.

    Example:
      >>> import jax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.mean_field()
      >>> params = family.init(model.latent)
      >>> grads = jax.grad(vijax.elbo, argnums=1)(
      ...     jax.random.key(0), params, family, model.log_joint,
      ...     num_samples=8, estimator="stl")
    """
    check_estimator(estimator, ELBO_ESTIMATORS + ADAPTIVE_ESTIMATORS)
    num_samples = _check_common(family, log_joint, num_samples)
    antithetic = check_antithetic(antithetic, family, estimator)
    _taylor.check_control(control, family, params, estimator)
    return _objective(key, params, family, log_joint, num_samples, estimator, antithetic,
                      control)


def iwae_bound(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    num_samples: int,
    estimator: str = "reparam",
) -> jax.Array:
    """Returns the importance-weighted bound estimate whose gradient is ``estimator``.

    ``IWAE_K = log (1/K) sum_k w_k`` with ``w_k = p(x, z_k) / q(z_k)`` and
    ``K = num_samples`` draws of ``q``, computed stably with ``logsumexp``.
    Its expectation is a lower bound on ``log p(x)`` that equals the ELBO at
    ``K = 1`` and grows with ``K`` (Burda et al. 2016). For one set of draws
    ``IWAE_K >= mean_k log w_k`` (Jensen), the reparameterized ELBO estimate
    with the same key.

    ``jax.grad`` with respect to ``params`` gives:

    * ``"reparam"``: the pathwise gradient ``sum_k w~_k grad log w_k`` with
      normalized weights ``w~_k = w_k / sum_j w_j``.
    * ``"dreg"``: the doubly reparameterized gradient (Tucker et al. 2019),
      ``sum_k w~_k^2 (d log w_k / d z_k) (d z_k / d params)`` with the
      parameters stopped inside ``log q``. It is unbiased for the same
      gradient as ``"reparam"`` and its signal-to-noise ratio does not decay
      as ``K`` grows. At ``K = 1`` it is the STL gradient.

    The returned value is the same ``IWAE_K`` estimate for both estimators.

    Note: DReG gives the gradient with respect to the *variational*
    parameters only. If ``log_joint`` closes over model parameters that you
    also differentiate, their gradient from the ``"dreg"`` surrogate is wrong
    (it carries ``w~_k^2`` where it needs ``w~_k``); use ``"reparam"`` for
    those.

    Args:
      key: a PRNG key (typed ``jax.random.key`` or legacy uint32).
      params: the family's parameters.
      family: a :class:`vijax.VariationalFamily`.
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree.
      num_samples: the number of importance samples K (>= 1).
      estimator: ``"reparam"`` or ``"dreg"``.

    Returns:
      A scalar estimate of the IWAE bound (larger is better).

    Raises:
      ValueError: unknown ``estimator``, ``num_samples < 1``, or ``log_joint``
        does not return a scalar.
      TypeError: ``family`` is not a family or ``log_joint`` not callable.

    References:
      Y. Burda, R. Grosse and R. Salakhutdinov, Importance weighted
      autoencoders, ICLR 2016. G. Tucker, D. Lawson, S. Gu and C. J.
      Maddison, Doubly reparameterized gradient estimators for Monte Carlo
      objectives, ICLR 2019. T. Rainforth et al., Tighter variational bounds
      are not necessarily better, ICML 2018.

    Example:
      >>> import jax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.mean_field()
      >>> params = family.init(model.latent)
      >>> bound, grads = jax.value_and_grad(vijax.iwae_bound, argnums=1)(
      ...     jax.random.key(0), params, family, model.log_joint,
      ...     num_samples=16, estimator="dreg")
    """
    check_estimator(estimator, IWAE_ESTIMATORS)
    num_samples = _check_common(family, log_joint, num_samples)
    name = "iwae" if estimator == "reparam" else "dreg"
    return _objective(key, params, family, log_joint, num_samples, name)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, (bool, jnp.bool_)):
        raise TypeError(f"`alpha` must be a real number; got {alpha!r}.")
    try:
        value = float(alpha)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            "`alpha` must be a concrete real number (a Python float, not a traced "
            f"value); got {type(alpha).__name__}."
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"`alpha` must be finite; got {value!r}.")
    return value


def renyi_bound(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    num_samples: int,
    alpha: float,
) -> jax.Array:
    """Returns the Monte Carlo variational Rényi bound estimate (reparameterized gradient).

    ``L_alpha = 1 / (1 - alpha) * log (1/K) sum_k w_k^(1 - alpha)`` with
    ``w_k = p(x, z_k) / q(z_k)`` and ``K = num_samples`` draws, computed
    stably with ``logsumexp`` (Li and Turner 2016, eq. 12). ``alpha = 0`` is
    the IWAE bound, ``alpha -> 1`` the ELBO (handled exactly: ``alpha = 1``
    returns ``mean_k log w_k``). For one set of draws the estimate does not
    increase with ``alpha``. The exact ``L_alpha`` is a lower bound on
    ``log p(x)`` for ``alpha > 0``, equals it at ``alpha = 0`` and is an upper
    bound for ``alpha < 0``; the K-sample estimate is biased downwards for
    ``alpha != 1``, less so as K grows. ``jax.grad`` gives the pathwise
    (reparameterized) gradient.

    Args:
      key: a PRNG key (typed ``jax.random.key`` or legacy uint32).
      params: the family's parameters.
      family: a :class:`vijax.VariationalFamily`.
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree.
      num_samples: the number of draws K (>= 1).
      alpha: the Rényi order, a finite Python float (static).

    Returns:
      A scalar estimate of the Rényi bound.

    Raises:
      ValueError: ``num_samples < 1``, non-finite ``alpha``, or ``log_joint``
        does not return a scalar.
      TypeError: ``alpha`` is not a concrete real number, ``family`` is not a
        family or ``log_joint`` not callable.

    References:
      Y. Li and R. E. Turner, Rényi divergence variational inference,
      NeurIPS 2016.
    """
    alpha = _check_alpha(alpha)
    num_samples = _check_common(family, log_joint, num_samples)
    z, log_q = sample_with_log_prob(key, params, family, num_samples)
    if log_q is None:
        log_q = batched_log_prob(family, params, z)
    log_w = batched_log_joint(log_joint, z, num_samples) - log_q
    if alpha == 1.0:
        return jnp.mean(log_w)
    one_minus = 1.0 - alpha
    return (jax.nn.logsumexp(one_minus * log_w) - math.log(num_samples)) / one_minus


def estimator_gradients(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    *,
    num_samples: int,
    estimators: Sequence[str] = ELBO_ESTIMATORS,
) -> dict[str, Any]:
    """Returns ``{estimator: gradient}`` for several estimators from one set of draws.

    Every gradient is computed from the same base draws and the same batched
    ``log_joint`` evaluation (one forward pass; the backward passes of the
    pathwise estimators are batched with ``jax.jacrev``), so differences
    between estimators are not sampling noise. Each entry equals ``jax.grad`` of the corresponding
    objective called with the same ``key``:

    * ``"reparam"``, ``"closed_entropy"``, ``"stl"``, ``"score"``: the
      gradient of :func:`elbo` with that ``estimator``; all are unbiased for
      ``-grad KL(q || p(z | x))``.
    * ``"iwae"``, ``"dreg"``: the gradient of :func:`iwae_bound` with
      ``estimator="reparam"`` and ``"dreg"``, with ``K = num_samples``; both
      are unbiased for the gradient of the expected IWAE bound (which is not
      the ELBO gradient unless ``K = 1``).

    Args:
      key: a PRNG key (typed ``jax.random.key`` or legacy uint32).
      params: the family's parameters.
      family: a :class:`vijax.VariationalFamily`.
      log_joint: ``log_joint(z) -> scalar`` for one latent pytree.
      num_samples: the number of draws S (>= 1), shared by all estimators.
      estimators: distinct names from :data:`GRADIENT_ESTIMATORS` (a single
        str is one name).

    Returns:
      A dict from estimator name to a gradient pytree shaped like ``params``
      (in the order of ``estimators``; ``jit`` returns dicts with sorted keys).

    Raises:
      ValueError: an unknown or repeated name, no names, ``num_samples < 1``.
      TypeError: ``family`` is not a family or ``log_joint`` not callable.

    Example:
      >>> import jax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.full_rank()
      >>> params = family.init(model.latent)
      >>> grads = vijax.estimator_gradients(
      ...     jax.random.key(0), params, family, model.log_joint,
      ...     num_samples=4, estimators=("reparam", "stl"))
      >>> sorted(grads)
      ['reparam', 'stl']
    """
    names = check_estimator_names(estimators, GRADIENT_ESTIMATORS)
    num_samples = _check_common(family, log_joint, num_samples)
    pathwise = tuple(name for name in names if name != "score")
    grads = {}
    if pathwise:
        def objectives(p):
            z, log_p, adaptive, log_q = draw(
                key, p, family, log_joint, num_samples, pathwise=True,
                adaptive="adaptive_stl" in pathwise,
            )
            out = surrogates(p, family, z, log_p, pathwise, adaptive, log_q)
            return out, (_sg(z), _sg(log_p))

        grads, (z, log_p) = jax.jacrev(objectives, has_aux=True)(params)
    else:
        z, log_p, _, _ = draw(key, params, family, log_joint, num_samples, pathwise=False)
    if "score" in names:
        # Differentiated apart from the pathwise estimators, which share the
        # backward pass through log_joint: a zero cotangent times a non-finite
        # log_joint derivative would be NaN, and score must not depend on it.
        grads["score"] = jax.grad(
            lambda p: surrogates(p, family, z, log_p, ("score",))["score"]
        )(params)
    return {name: grads[name] for name in names}


def draws_and_log_weights(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    log_joint: Callable[[ArrayTree], jax.Array],
    num_samples: int,
    *,
    block_size: int | None = None,
) -> tuple[ArrayTree, jax.Array]:
    """``(z, log p(x, z_s) - log q(z_s))``: draws from q and their log importance weights.

    ``block_size`` evaluates ``log_joint`` and ``log_prob`` over blocks of
    that many draws (``lax.map``), bounding the memory of large draws; the
    values do not depend on it. Pure: jit and vmap it as you like.
    """
    z, log_q = sample_with_log_prob(key, params, family, num_samples)
    if block_size is None or block_size >= num_samples:
        if log_q is None:
            log_q = batched_log_prob(family, params, z)
        return z, batched_log_joint(log_joint, z, num_samples) - log_q

    if log_q is None:  # both in one pass over the blocks
        log_p, log_q = jax.lax.map(
            lambda zi: (jnp.asarray(log_joint(zi)), jnp.asarray(family.log_prob(params, zi))),
            z, batch_size=block_size)
        check_log_joint_output(log_p, num_samples)
        log_q = check_log_prob(family, log_q, num_samples)
    else:
        log_p = jax.lax.map(lambda zi: jnp.asarray(log_joint(zi)), z, batch_size=block_size)
        check_log_joint_output(log_p, num_samples)
    return z, log_p - log_q
