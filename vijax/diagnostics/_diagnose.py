"""Is this fit good? PSIS k-hat, importance-weighted corrections and a verdict.

:func:`diagnose` draws from q, weighs each draw by ``p(x, z) / q(z)``, and
smooths the weights with :func:`vijax.psis`. The Pareto shape ``k-hat`` of
their tail says how far q is from the posterior, whatever the ELBO says (Yao,
Vehtari, Simpson and Gelman 2018): two fits whose ELBOs differ by half a nat
can be one good and one useless. The smoothed weights also correct q: they
estimate the log evidence and the posterior's means and sds, reliably while
k-hat stays below the sample-size-dependent threshold.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax import _checks
from vijax._cache import LRU
from vijax._objectives import draws_and_log_weights
from vijax.diagnostics._draws import as_model, is_batched, named_leaves
from vijax.diagnostics._psis import MIN_DRAWS, khat_threshold, psis
from vijax.diagnostics._summary import _decimals, _element_names, _fmt
from vijax.families import _protocol as _family
from vijax.families._gaussian import (
    FullRankParams,
    LowRankParams,
    LowRankPrecisionParams,
    MeanFieldParams,
)
from vijax.fitting._types import FitResult, FitState
from vijax.flows._family import FlowParams
from vijax.models._model import Model
from vijax.optim._adaptive import find_adaptive

ArrayTree = Any

#: k-hat at or below which q itself is close to the posterior (Yao et al. 2018).
GOOD_KHAT = 0.5
#: Log joints are evaluated over blocks of this many draws (bounds memory).
_BLOCK = 1024
#: Rows shown by the printout before it elides the rest.
_MAX_ROWS = 20


class Diagnosis(NamedTuple):
    """What :func:`diagnose` found. ``print(diagnosis)`` shows it as a report.

    Attributes:
      khat: the Pareto k-hat of the importance weights (``inf`` when the tail
        could not be fitted).
      khat_threshold: ``min(1 - 1/log10(S), 0.7)`` for ``S`` draws: below
        it, the PSIS estimates are reliable.
      reliable: ``khat <= khat_threshold``.
      ess: the effective sample size of the smoothed weights, ``1 / sum
        w_s^2`` for normalized weights (out of ``num_samples``).
      log_evidence: the PSIS estimate of log p(x) (the log mean of the
        smoothed weights).
      log_evidence_se: its standard error (delta method, from the smoothed
        weights; trustworthy only when ``reliable``).
      mean, sd: PSIS-corrected posterior means and sds per element, a pytree
        shaped like one latent on the natural space (``model.constrain``'s
        output; the latent itself for a bare log joint).
      q_mean, q_sd: the same moments of q's own draws, unweighted.
      elbo: the ELBO estimate from the same draws (mean log weight).
      elbo_se: its Monte Carlo standard error.
      num_samples: the number of draws ``S``.
      verdict: what the numbers mean, in words, and what to try when q is
        not good enough.
    """

    khat: float
    khat_threshold: float
    reliable: bool
    ess: float
    log_evidence: float
    log_evidence_se: float
    mean: Any
    sd: Any
    q_mean: Any
    q_sd: Any
    elbo: float
    elbo_se: float
    num_samples: int
    verdict: str

    def __str__(self) -> str:
        lines = [
            f"k-hat {self.khat:.2f} (threshold {self.khat_threshold:.2f} for "
            f"{self.num_samples} draws); ESS {self.ess:.0f} of {self.num_samples}",
            f"log evidence {self.log_evidence:.4g} +- {self.log_evidence_se:.2g} (PSIS)   "
            f"ELBO {self.elbo:.4g} +- {self.elbo_se:.2g}",
            f"verdict: {self.verdict}",
            "",
        ]
        names, cols = _rows(self)
        headers = ("", "q mean", "q sd", "PSIS mean", "PSIS sd")
        shown = min(len(names), _MAX_ROWS)
        body = []
        for i in range(shown):
            dec = _decimals(cols[3][i])
            body.append([names[i]] + [_fmt(c[i], dec) for c in cols])
        widths = [max(len(h), *(len(r[j]) for r in body)) for j, h in enumerate(headers)]
        lines.append("  ".join(h.ljust(w) if j == 0 else h.rjust(w)
                               for j, (h, w) in enumerate(zip(headers, widths))))
        for r in body:
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(r, widths))))
        if shown < len(names):
            lines.append(f"... ({len(names) - shown} more rows; the fields hold them all)")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / Jupyter
        p.text(str(self))


def _rows(d: Diagnosis) -> tuple[list, list]:
    names, cols = [], [[], [], [], []]
    trees = [named_leaves(t) for t in (d.q_mean, d.q_sd, d.mean, d.sd)]
    for name, leaf in trees[0].items():
        names += _element_names(name, np.shape(leaf))
        for col, tree in zip(cols, trees):
            col.extend(np.ravel(tree[name]).tolist())
    return names, [np.asarray(c) for c in cols]


#: vijax's flows, for advice: the ones a flow's q does not use yet.
_FLOWS = ("affine_coupling", "spline_coupling", "autoregressive")
#: The family of params of each known type, for advice (and of a name, for
#: families whose params are of a type of their own).
_KINDS = (
    (FlowParams, "flow"),
    (FullRankParams, "full_rank"),
    (LowRankPrecisionParams, "low_rank_precision"),
    (LowRankParams, "low_rank"),
    (MeanFieldParams, "mean_field"),
)
_NAMED = {"mean_field": "mean_field", "full_rank": "full_rank", "low_rank": "low_rank",
          "low_rank_precision": "low_rank_precision", **{f: "flow" for f in _FLOWS}}


def _join_or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _richer(family, params) -> tuple[str, str]:
    """``(why, remedy)``: a family more expressive than ``family``'s q, never it or a lesser one.

    Gaussian families rank mean_field < low_rank, low_rank_precision <
    full_rank < flows. The kind is read from the params' type (a flow on a
    mean-field base is still a flow), else from ``family.name``.
    """
    kind = next((k for t, k in _KINDS if isinstance(params, t)), None)
    if kind is None:
        kind = _NAMED.get(getattr(family, "name", None))
    if kind == "mean_field":
        return "", "a richer family (vijax.low_rank or vijax.full_rank, which capture correlations)"
    if kind in ("low_rank", "low_rank_precision"):
        factor = getattr(params, "cov_factor" if kind == "low_rank" else "prec_factor", None)
        rank = np.shape(factor)[-1] if np.ndim(factor) == 2 else None
        higher = f"vijax.{kind} with a rank above {rank}" if rank else "a higher rank"
        return "", f"a richer family (vijax.full_rank, or {higher})"
    if kind == "full_rank":
        return ("q is already a full-rank Gaussian: no Gaussian family does better. ",
                "a normalizing flow from vijax.flows (e.g. vijax.flows.spline_coupling(), "
                "started at this fit with its from_gaussian)")
    if kind == "flow":
        leaves = jax.tree_util.tree_leaves(getattr(params, "layers", None))
        layers = f" than its {np.shape(leaves[0])[0]}" if leaves and np.ndim(leaves[0]) else ""
        others = [f"vijax.flows.{f}" for f in _FLOWS if f != getattr(family, "name", None)]
        return "", (f"a more expressive flow (more layers{layers}, wider networks, or "
                    f"another flow: {', '.join(others)})")
    return "", "a richer family (e.g. vijax.full_rank, or a flow from vijax.flows)"


def _fit_status(result: Any) -> str | None:
    """``"converged"``, ``"unconverged"`` or None (unknown) for what ``diagnose`` was given.

    ``"unconverged"`` only where the fit certainly ran a stopping rule: its
    optimizer holds a :func:`vijax.adaptive_lr` (as the default one does),
    which :func:`vijax.fit` runs only under ``auto_stop``.
    """
    if not isinstance(result, FitResult) or _flag(result.interrupted) is not False:
        return None
    stopped = _flag(result.stopped_early)
    if stopped:
        return "converged"
    if stopped is False and isinstance(result.state, FitState) and find_adaptive(
        result.state.opt_state
    ):
        return "unconverged"
    return None


def _flag(x: Any) -> bool | None:
    """A FitResult's flag as a bool; None unless it is one bool (not per member)."""
    return bool(x) if isinstance(x, (bool, np.bool_)) else None


_UNCONVERGED = (
    "The fit ran all its steps without auto_stop finding it converged "
    "(result.stopped_early is False): continue it first, with vijax.fit(None, family, "
    "log_joint, result.state, num_steps=...)."
)


def _verdict(khat: float, threshold: float, ess: float, num: int, family=None,
             params: Any = None, status: str | None = None) -> str:
    if not np.isfinite(khat):
        text = (
            "k-hat could not be estimated (too few distinct weights in the tail); "
            "nothing below can be trusted. Draw more samples."
        )
    elif khat > threshold:
        why, remedy = _richer(family, params)
        remedies = [remedy]
        if status is None:
            remedies.append("a longer fit")
        remedies.append("a reparametrization of the model (e.g. a non-centred one of a "
                        "hierarchical model)")
        text = (
            f"unreliable: k-hat {khat:.2f} > {threshold:.2f}. q misses part of the "
            "posterior (its tails are too light, or it is too narrow or misplaced), "
            "so neither q's moments, the ELBO, nor the PSIS corrections can be "
            "trusted. "
        )
        if status == "unconverged":
            text += f"{_UNCONVERGED} {why}If k-hat stays high, try {_join_or(remedies)}."
        else:
            text += f"{why}Try {_join_or(remedies)}."
    elif khat > GOOD_KHAT:
        text = (
            f"usable with PSIS: k-hat {khat:.2f} is in ({GOOD_KHAT}, {threshold:.2f}]. "
            "q is not close to the posterior, but the PSIS-corrected means, sds and "
            "log evidence are reliable: prefer them to q's own moments."
        )
        if status == "unconverged":
            text += " " + _UNCONVERGED
    else:
        text = (
            f"good: k-hat {khat:.2f} <= {GOOD_KHAT}. q is close to the posterior, and "
            "the PSIS-corrected estimates are reliable."
        )
    if np.isfinite(khat) and ess < min(100.0, 0.1 * num):
        text += f" Only {ess:.0f} effective draws of {num}: increase num_samples."
    return text


_programs = LRU(16)


def _program(family, log_joint: Callable, constrain: Callable, num_samples: int) -> Callable:
    def build():
        def run(key, params):
            z, lw = draws_and_log_weights(
                key, params, family, log_joint, num_samples, block_size=_BLOCK
            )
            return lw, constrain(z)

        return jax.jit(run)

    return _programs.get((family, log_joint, constrain, num_samples), build)


def _identity(z):
    return z


def diagnose(
    key: jax.Array,
    params: Any,
    family,
    log_joint: Any,
    *,
    num_samples: int = 4000,
) -> Diagnosis:
    """Returns a :class:`Diagnosis` of a fitted q: k-hat, ESS, log evidence, corrected moments.

    Draws ``z_s ~ q`` (``family.sample(key, params, num_samples)``), computes
    the log weights ``log p(x, z_s) - log q(z_s)``, smooths them with
    :func:`vijax.psis`, and reports k-hat against ``min(1 - 1/log10(S),
    0.7)``, the effective sample size, the PSIS estimate of the log evidence
    with its standard error, the PSIS-corrected means and sds on the natural
    space, and the ELBO with its standard error; ``verdict`` says in words
    what to make of them. ``print(diagnose(...))`` shows the report.

    k-hat reads q's fit to the posterior, not the optimizer's convergence: a
    mean-field q of a correlated posterior can be fully converged and still
    get k-hat near 1 (Yao et al. 2018).

    When k-hat is high the verdict's advice goes beyond the family in use:
    ``low_rank`` or ``full_rank`` for ``mean_field``, ``full_rank`` for the
    low-rank families, a flow (:mod:`vijax.flows`) for ``full_rank``, and more
    layers or another flow for a flow; a reparametrization of the model
    always. Given a :class:`vijax.FitResult` of an ``auto_stop`` run that used
    all its steps (``stopped_early`` False), it says to continue the fit first.

    Args:
      key: a PRNG key for the draws.
      params: the family's parameters, or the :class:`vijax.FitResult` /
        :class:`vijax.FitState` holding them (one fit: for
        :func:`vijax.fit_batched` results, diagnose each member).
      family: the :class:`vijax.VariationalFamily` they belong to.
      log_joint: the :class:`vijax.models.Model` fitted (its ``log_joint``,
        and ``constrain`` for moments on the natural space), a
        :class:`vijax.models.DataModel` with a global latent and no local
        latents (its full-data ``log_joint``, with ``theta`` from
        :class:`vijax.data.JointParams` params, else ``model.theta``), or a
        bare ``log_joint(z) -> scalar`` (moments of the latent itself).
      num_samples: draws from q (>= 21, the fewest the Pareto fit accepts;
        thousands for a trustworthy k-hat).

    Returns:
      A :class:`Diagnosis`.

    Raises:
      TypeError: a wrong ``family``, ``log_joint`` or ``key``, or a log joint
        that does not return a real floating-point scalar.
      ValueError: ``num_samples`` below 21, batched ``params``, a data model
        with local latents, or a log
        weight that is NaN or +inf (``log_joint`` or ``family.log_prob``
        returned NaN or +inf at a draw from q; a -inf log joint is fine:
        that draw gets zero weight).

    Example:
      >>> result = vijax.fit(key, family, model.log_joint, family.init(model.latent),
      ...                    optimizer=optax.adam(1e-2), num_steps=2000)
      >>> d = vijax.diagnose(key, result, family, model)
      >>> print(d)  # doctest: +SKIP
      >>> d.khat, d.reliable, d.mean  # doctest: +SKIP
    """
    key = _checks.typed_key("key", key)
    num_samples = _checks.check_positive_int("num_samples", num_samples, minimum=MIN_DRAWS)
    status = _fit_status(params)
    # The model first: a data model with local latents (family=None in its fit)
    # is named as such, not as a missing family.
    params, log_joint = as_model(log_joint, params, "log_joint")
    family = _family.check_family(family)
    if isinstance(log_joint, Model):
        model = log_joint
        if is_batched(params, family, model):
            raise ValueError(
                "`params` carry a leading member axis (from vijax.fit_batched); diagnose "
                "one member at a time: jax.tree_util.tree_map(lambda x: x[i], params)."
            )
        _family.check_params("params", params, family)
        fn, constrain = model.log_joint, (model.constrain if model.is_constrained else _identity)
    elif callable(log_joint):
        fn, constrain = log_joint, _identity
        _family.check_params("params", params, family)
    else:
        raise TypeError(
            "`log_joint` must be a vijax.models.Model or a callable log_joint(z) -> "
            f"scalar (or a vijax.models.DataModel); got {type(log_joint).__name__}."
        )
    lw, theta = _program(family, fn, constrain, num_samples)(key, params)
    lw = np.asarray(lw, np.float64)
    bad = np.isnan(lw) | (lw == np.inf)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"The log weights log p(x, z) - log q(z) are NaN or +inf at {int(bad.sum())} of "
            f"{num_samples} draws from q (the first at draw {first}): `log_joint` or "
            "`family.log_prob` returned NaN or +inf there. Fix the model (a -inf log "
            "joint is fine: it gives that draw zero weight)."
        )
    if np.all(lw == -np.inf):
        raise ValueError(
            f"`log_joint` is -inf at all {num_samples} draws from q: q puts its mass "
            "where the model has none, so there is nothing to weigh."
        )
    smoothed, khat = psis(jnp.asarray(lw))
    smoothed, khat = np.asarray(smoothed, np.float64), float(khat)
    top = smoothed.max()
    r = np.exp(smoothed - top)  # weights relative to the largest
    w = r / r.sum()
    ess = float(1.0 / np.sum(w**2))
    log_evidence = float(top + np.log(r.mean()))
    log_evidence_se = float(r.std(ddof=1) / (math.sqrt(num_samples) * r.mean()))
    finite = np.isfinite(lw)
    elbo = float(lw.mean()) if finite.all() else -np.inf
    elbo_se = float(lw.std(ddof=1) / math.sqrt(num_samples)) if finite.all() else np.nan

    def moments(x):
        x = np.asarray(x, np.float64)
        flat = x.reshape(num_samples, -1)
        q_mean, q_sd = flat.mean(0), flat.std(0, ddof=1)
        mean = w @ flat
        sd = np.sqrt(np.maximum(w @ (flat - mean) ** 2, 0.0))
        shape = x.shape[1:]
        return tuple(a.reshape(shape) for a in (mean, sd, q_mean, q_sd))

    treedef = jax.tree_util.tree_structure(theta)
    parts = [moments(x) for x in jax.tree_util.tree_leaves(theta)]
    mean, sd, q_mean, q_sd = (
        jax.tree_util.tree_unflatten(treedef, [p[i] for p in parts]) for i in range(4)
    )
    threshold = khat_threshold(num_samples)
    return Diagnosis(
        khat=khat,
        khat_threshold=threshold,
        reliable=bool(khat <= threshold),
        ess=ess,
        log_evidence=log_evidence,
        log_evidence_se=log_evidence_se,
        mean=mean,
        sd=sd,
        q_mean=q_mean,
        q_sd=q_sd,
        elbo=elbo,
        elbo_se=elbo_se,
        num_samples=num_samples,
        verdict=_verdict(khat, threshold, ess, num_samples, family, params, status),
    )
