"""Plots of a fit: its trace, and q's marginals against a reference (optional extra ``plots``).

matplotlib is imported inside the functions only, so ``import vijax`` never
needs it. The figures are made with ``matplotlib.pyplot`` (``plt.show()``
displays them, ``plt.close(fig)`` frees them) and nothing global is changed:
no ``rcParams``, no ``plt.show()``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from vijax import _checks
from vijax.diagnostics._draws import as_numpy, constrained_draws
from vijax.diagnostics._summary import _element_names
from vijax.fitting._types import FitInfo, FitResult


# The ELBO's y axis spans the later half's estimates and this many of their
# ranges below them, or the lowest 10% of all estimates cut off, whichever
# shows more: an early transient thousands of nats down would otherwise
# flatten the converged part into a line.
_YLIM_SPANS_BELOW = 3.0
_YLIM_CUT_QUANTILE = 0.1
_MAX_MEMBER_LABELS = 10
_NUM_BINS = 40
_QUANTILE_RANGE = (0.005, 0.995)  # the bins span these quantiles of all the draws


def _import_pyplot(fn: str):
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            f"vijax.{fn} needs matplotlib, an optional extra: `pip install \"vijax[plots]\"` "
            "(or `pip install matplotlib`)."
        ) from e
    return plt


# ---------------------------------------------------------------------------
# plot_trace
# ---------------------------------------------------------------------------


def _trace_arrays(result: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """``(elbo, grad_norm, skipped, first_step, batched)``; 2-d ``(members, steps)`` arrays."""
    if isinstance(result, FitResult):
        trace = result.trace
    elif isinstance(result, FitInfo):
        trace = result
    else:
        raise TypeError(
            "`result` must be a vijax.FitResult (from vijax.fit, vijax.fit_batched, ...) or "
            f"a vijax.FitInfo (a result's .trace); got {type(result).__name__}."
        )
    if not isinstance(trace, FitInfo):
        raise TypeError(
            f"`result.trace` must be a vijax.FitInfo; got {type(trace).__name__}."
        )
    elbo = np.asarray(trace.elbo, dtype=np.float64)
    grad_norm = np.asarray(trace.grad_norm, dtype=np.float64)
    skipped = np.asarray(trace.skipped)
    if elbo.ndim not in (1, 2):
        raise ValueError(
            "the trace's `elbo` must have shape (steps,), or (members, steps) from "
            f"vijax.fit_batched; got shape {elbo.shape}."
        )
    for name, x in (("grad_norm", grad_norm), ("skipped", skipped)):
        if x.shape != elbo.shape:
            raise ValueError(
                f"the trace's `{name}` must have the shape of its `elbo`, {elbo.shape}; "
                f"got shape {x.shape}."
            )
    if skipped.dtype != np.bool_:
        skipped = skipped.astype(bool)
    num_steps = elbo.shape[-1]
    if num_steps == 0:
        raise ValueError("`result` has an empty trace (0 steps): there is nothing to plot.")
    first = 0
    state = result.state if isinstance(result, FitResult) else None
    step = getattr(state, "step", None)
    if step is not None:
        # The trace holds the steps run by this call: the last is state.step - 1.
        first = max(0, int(np.max(np.asarray(step))) - num_steps)
    batched = elbo.ndim == 2
    elbo, grad_norm, skipped = (np.atleast_2d(x) for x in (elbo, grad_norm, skipped))
    return elbo, grad_norm, skipped, first, batched


def running_mean(elbo: np.ndarray, skipped: np.ndarray, window: int) -> np.ndarray:
    """The trailing mean over ``window`` steps of the finite, non-skipped estimates.

    Entry ``t`` averages the valid entries among steps ``t - window + 1 .. t``
    (fewer at the start); NaN where the window holds none. 1-d arrays.
    """
    valid = np.isfinite(elbo) & ~skipped
    values = np.where(valid, elbo, 0.0)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    counts = np.concatenate([[0], np.cumsum(valid)])
    end = np.arange(1, elbo.shape[0] + 1)
    start = np.maximum(end - window, 0)
    n = counts[end] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan)


def _check_axes(axes: Any, count: int) -> list:
    from matplotlib.axes import Axes

    if isinstance(axes, np.ndarray):
        axes = list(axes.ravel())
    elif isinstance(axes, Sequence) and not isinstance(axes, str):
        axes = list(axes)
    else:
        raise TypeError(
            f"`axes` must be None or a sequence of {count} matplotlib Axes; "
            f"got {type(axes).__name__}."
        )
    if len(axes) != count or not all(isinstance(a, Axes) for a in axes):
        raise ValueError(
            f"`axes` must hold {count} matplotlib Axes; got "
            f"{[type(a).__name__ for a in axes]}."
        )
    return axes


def _elbo_ylim(elbo: np.ndarray) -> Optional[tuple[float, float]]:
    """A y range that keeps the later half in view; None when the full range does."""
    late = elbo[:, elbo.shape[1] // 2:]
    late = late[np.isfinite(late)]
    every = elbo[np.isfinite(elbo)]
    if late.size < 2:
        return None
    lo, hi = float(late.min()), float(late.max())
    span = hi - lo
    if not span > 0:
        return None
    bottom = min(lo - _YLIM_SPANS_BELOW * span, float(np.quantile(every, _YLIM_CUT_QUANTILE)))
    top = max(float(every.max()), hi)
    margin = 0.05 * (top - bottom)
    if every.min() >= bottom - margin:
        return None
    return bottom - margin, top + margin


def plot_trace(result: Any, *, window: Optional[int] = None, axes: Any = None):
    """Returns a figure of a fit's trace: the ELBO estimates above, the gradient norm below.

    The top panel shows the per-step Monte Carlo ELBO estimate (light) and
    its running mean: entry ``t`` is the mean of the finite, non-skipped
    estimates among the ``window`` steps ending at ``t``. Its y axis spans
    the later half's estimates and a margin below them, so an early transient
    far below does not flatten the converged part (``set_ylim`` on the
    returned axes changes it). The bottom panel shows the gradient norm on a
    log scale. Skipped steps (``trace.skipped``: a non-finite loss, gradient
    or update) are marked by ticks along the bottom of both panels, with
    their count in the legend; non-finite values leave gaps in the lines.

    Results of :func:`vijax.fit_batched` (trace fields of shape
    ``(members, steps)``) give one line per member, in one colour each, and
    ticks in the member's colour. The x axis counts the steps of the run: a
    :class:`vijax.FitResult` continued from an earlier state starts at that
    state's step; a bare :class:`vijax.FitInfo` starts at 0.

    Args:
      result: a :class:`vijax.FitResult`, or a :class:`vijax.FitInfo` (e.g.
        ``result.trace``, or ``err.result.trace`` of a :class:`vijax.FitError`).
      window: the running mean's window in steps (an int >= 1); default about
        5% of the steps, at least 1.
      axes: None (a new figure), or a sequence of two matplotlib Axes to
        draw into: the ELBO's and the gradient norm's.

    Returns:
      The ``matplotlib.figure.Figure`` drawn into; ``fig.axes[0]`` holds the
      ELBO, ``fig.axes[1]`` the gradient norm (for a new figure).

    Raises:
      ImportError: matplotlib is not installed (the message names the extra
        ``vijax[plots]``).
      TypeError: ``result`` is neither a FitResult nor a FitInfo, ``window``
        not an int, or ``axes`` not a sequence.
      ValueError: ``window < 1``, ``axes`` not two Axes, an empty trace, or
        trace fields of mismatched or unexpected shapes.

    Example:
      >>> result = vijax.fit(key, family, model.log_joint, family.init(model.latent),
      ...                    optimizer=optax.adam(1e-2), num_steps=2000)
      >>> fig = vijax.plot_trace(result)  # doctest: +SKIP
      >>> fig.savefig("trace.png")  # doctest: +SKIP
    """
    plt = _import_pyplot("plot_trace")
    elbo, grad_norm, skipped, first, batched = _trace_arrays(result)
    members, num_steps = elbo.shape
    if window is None:
        window = max(1, int(round(0.05 * num_steps)))
    else:
        window = _checks.check_positive_int("window", window)
    if axes is None:
        fig, (ax_elbo, ax_grad) = plt.subplots(
            2, 1, sharex=True, figsize=(7.0, 5.0), layout="constrained"
        )
    else:
        ax_elbo, ax_grad = _check_axes(axes, 2)
        fig = ax_elbo.figure
    steps = first + np.arange(num_steps)
    colors = ["C0"] if not batched else [f"C{b % 10}" for b in range(members)]

    handles = []
    for b in range(members):
        e = np.where(np.isfinite(elbo[b]), elbo[b], np.nan)
        g = np.where(np.isfinite(grad_norm[b]) & (grad_norm[b] > 0), grad_norm[b], np.nan)
        raw, = ax_elbo.plot(steps, e, color=colors[b], alpha=0.3, linewidth=0.8,
                            label="ELBO estimate" if not batched else "_nolegend_")
        mean, = ax_elbo.plot(steps, running_mean(elbo[b], skipped[b], window),
                             color=colors[b], linewidth=1.5,
                             label=(f"running mean ({window} steps)" if not batched
                                    else f"member {b}"))
        ax_grad.plot(steps, g, color=colors[b], linewidth=0.8)
        if not batched:
            handles += [raw, mean]
        elif b < _MAX_MEMBER_LABELS:
            handles.append(mean)

    num_skipped = int(skipped.sum())
    if num_skipped:
        from matplotlib.collections import LineCollection

        member, step = np.nonzero(skipped)
        x = steps[step]
        segments = np.stack(
            [np.stack([x, np.zeros_like(x, dtype=float)], -1),
             np.stack([x, np.full(x.shape, 0.06)], -1)], axis=1
        )
        tick_colors = ["C3"] * len(x) if not batched else [colors[m] for m in member]
        label = f"skipped steps ({num_skipped})"
        if batched:
            hit = len(set(member.tolist()))
            label = f"skipped steps ({num_skipped} in {hit} member{'s' * (hit > 1)})"
        for ax in (ax_elbo, ax_grad):
            ticks = LineCollection(
                segments, colors=tick_colors, linewidths=1.0,
                transform=ax.get_xaxis_transform(), label=label, zorder=3,
            )
            ax.add_collection(ticks, autolim=False)
        handles.append(ax_elbo.collections[-1])

    ylim = _elbo_ylim(elbo)
    if ylim is not None:
        ax_elbo.set_ylim(*ylim)
    ax_elbo.set_ylabel("ELBO")
    title = None
    if batched:
        title = f"running mean ({window} steps)"
        if members > _MAX_MEMBER_LABELS:
            title += f"; first {_MAX_MEMBER_LABELS} of {members} members"
    ax_elbo.legend(handles=handles, title=title, fontsize="small", title_fontsize="small",
                   loc="lower right", bbox_to_anchor=(1.0, 0.08))  # above the ticks
    ax_grad.set_yscale("log")
    ax_grad.set_ylabel("gradient norm")
    ax_grad.set_xlabel("step")
    return fig


# ---------------------------------------------------------------------------
# plot_marginals
# ---------------------------------------------------------------------------


def _reference_arrays(reference: Any, shapes: dict) -> dict:
    """``{leaf name: (draws, elements) float64}`` from a dict or an InferenceData."""
    if hasattr(reference, "posterior"):
        posterior = reference.posterior
        available = [str(v) for v in getattr(posterior, "data_vars", posterior)]
        names = [name for name in shapes if name in available]
        if not names:
            raise ValueError(
                "`reference.posterior` has none of q's variables: q's are "
                f"{list(shapes)}; the posterior's are {available}."
            )
        out = {}
        for name in names:
            var = posterior[name]
            dims = tuple(getattr(var, "dims", ()))
            if "chain" in dims and "draw" in dims:
                var = var.transpose("chain", "draw", ...)
            x = np.asarray(getattr(var, "values", var))
            out[name] = _reference_leaf(f"reference.posterior[{name!r}]", x, shapes[name],
                                        chain_draw=True)
        return out
    if not isinstance(reference, dict):
        raise TypeError(
            "`reference` must be None, a dict {name: draws} or an arviz.InferenceData "
            f"(anything with a .posterior); got {type(reference).__name__}."
        )
    unknown = [name for name in reference if name not in shapes]
    if unknown:
        raise ValueError(
            f"`reference` has names {unknown} that q's draws do not; the available "
            f"names are {list(shapes)}."
        )
    if not reference:
        raise ValueError(
            f"`reference` must name at least one of {list(shapes)}; got an empty dict."
        )
    return {
        name: _reference_leaf(f"reference[{name!r}]", np.asarray(x), shapes[name])
        for name, x in reference.items()
    }


def _reference_leaf(where: str, x: np.ndarray, shape: tuple, chain_draw: bool = False):
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating)
                                 or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"`{where}` must be a real array of draws; got dtype {x.dtype}.")
    lead = x.ndim - len(shape)
    if tuple(x.shape[lead:]) != tuple(shape) or lead not in ((2,) if chain_draw else (1, 2)):
        expected = f"(chains, draws, *{shape})" if chain_draw else (
            f"(draws, *{shape}) or (chains, draws, *{shape})"
        )
        raise ValueError(
            f"`{where}` must have shape {expected}, the leaf's shape {shape} after the "
            f"draw axes; got shape {x.shape}."
        )
    num = int(np.prod(x.shape[:lead]))
    if num == 0:
        raise ValueError(f"`{where}` must hold at least one draw; got shape {x.shape}.")
    return x.reshape(num, -1).astype(np.float64)


def _check_weights(weights: Any, reference: dict) -> Optional[np.ndarray]:
    if weights is None:
        return None
    if not reference:
        raise ValueError("`weights` weigh the reference draws: pass `reference` too.")
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"`weights` must be a real array of the reference draws' weights; got "
            f"{type(weights).__name__}."
        ) from None
    counts = {name: x.shape[0] for name, x in reference.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(
            "`weights` need every reference variable to hold the same number of draws; "
            f"got {counts}."
        )
    n = next(iter(counts.values()))
    w = w.reshape(-1) if w.ndim == 2 else w
    if w.shape != (n,):
        raise ValueError(
            f"`weights` must have shape ({n},), one per reference draw (or (chains, "
            f"draws)); got shape {np.shape(weights)}."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(
            "`weights` must be finite and >= 0 with a positive sum; got min "
            f"{np.nanmin(w)!r}, sum {np.nansum(w)!r}, {int((~np.isfinite(w)).sum())} "
            "non-finite."
        )
    return w


def _select(labels: list, leaf_of: dict, names: Any, max_panels: int) -> tuple[list, str]:
    """The element labels to plot, and a note for the title ('' when all are shown)."""
    if names is None:
        if len(labels) <= max_panels:
            return labels, ""
        return labels[:max_panels], (
            f"the first {max_panels} of {len(labels)} elements; pass names= for others"
        )
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            "`names` must be None or a sequence of element labels like 'tau', "
            f"'theta[3]' (or leaf names like 'theta'); got {names!r}."
        )
    if not names:
        raise ValueError(f"`names` must name at least one of {labels}; got an empty sequence.")
    chosen = []
    for name in names:
        if name in leaf_of:  # a whole leaf: all its elements
            new = leaf_of[name]
        elif name in labels:
            new = [name]
        else:
            shown = labels if len(labels) <= 40 else labels[:40] + ["..."]
            raise ValueError(
                f"`names` has {name!r}, not an element of q's draws; the available "
                f"names are {shown} (or a whole leaf: {list(leaf_of)})."
            )
        chosen += [n for n in new if n not in chosen]
    return chosen, ""


def _histogram(x: np.ndarray, edges: np.ndarray, w: Optional[np.ndarray]) -> np.ndarray:
    """A density over ``edges``: counts / (all finite draws x bin width)."""
    ok = np.isfinite(x)
    x, w = x[ok], (None if w is None else w[ok])
    total = x.size if w is None else w.sum()
    counts = np.histogram(x, edges, weights=w)[0]
    if not total > 0:
        return np.zeros_like(counts, dtype=np.float64)
    return counts / (total * np.diff(edges))


def _edges(*columns: np.ndarray) -> np.ndarray:
    finite = np.concatenate([c[np.isfinite(c)] for c in columns])
    if finite.size == 0:
        return np.linspace(-1.0, 1.0, _NUM_BINS + 1)
    lo, hi = np.quantile(finite, _QUANTILE_RANGE)
    if not hi > lo:
        lo, hi = finite.min(), finite.max()
    if not hi > lo:
        pad = max(abs(lo) * 1e-3, 0.5)
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, _NUM_BINS + 1)


def plot_marginals(
    key: jax.Array,
    params: Any,
    family,
    model,
    *,
    reference: Any = None,
    num_samples: int = 4000,
    names: Optional[Sequence[str]] = None,
    max_panels: int = 16,
    weights: Any = None,
):
    """Returns a grid of q's one-dimensional marginals on the natural space, one panel per element.

    Draws ``num_samples`` from ``q`` (per member, pooled, for
    :func:`vijax.fit_batched` parameters), maps them through
    ``model.constrain`` as :func:`vijax.summary` does, and draws a
    density-normalized step histogram per scalar element, labelled as
    :func:`vijax.summary` labels its rows (``"tau"``, ``"theta[3]"``).
    ``reference`` draws (e.g. from NUTS) are overlaid on the same bins; the
    first panel's legend reads "q" / "reference". The bins span the 0.5% to
    99.5% quantiles of q's and the reference's draws together, so heavy tails
    do not squeeze the bulk; each histogram is normalized by all its finite
    draws, those outside the bins included.

    Args:
      key: a PRNG key for q's draws.
      params: the fitted parameters, or the :class:`vijax.FitResult` /
        :class:`vijax.FitState` holding them.
      family: the :class:`vijax.VariationalFamily` they belong to.
      model: the :class:`vijax.models.Model` fitted (its ``latent`` and
        ``constrain``).
      reference: None, a dict ``{leaf name: draws}`` with draws of shape
        ``(n, *leaf shape)`` (or ``(chains, draws, *leaf shape)``), keyed by
        the names of ``model.constrain``'s leaves (``vijax.to_arviz``'s
        variables; ``"z"`` for a lone array latent), a subset allowed; or an
        ``arviz.InferenceData`` (anything with a ``.posterior``), whose
        variables of those names are used, chains and draws pooled.
      num_samples: q's draws per member (an int >= 1).
      names: the element labels to show, in order (a leaf name, ``"theta"``,
        stands for all its elements); default the first ``max_panels``
        elements, which the figure's title says when some are left out.
      max_panels: the most panels shown when ``names`` is None (an int >= 1).
      weights: None, or non-negative weights of the reference draws, shape
        ``(n,)`` (or ``(chains, draws)``), e.g. importance weights; every
        reference variable must then hold the same ``n`` draws. They need not
        sum to one.

    Returns:
      The ``matplotlib.figure.Figure``: ``fig.axes`` holds one panel per
      element shown, titled by its label; each holds q's histogram (a filled
      ``StepPatch``) and, where the reference has that element, the
      reference's (an outline).

    Raises:
      ImportError: matplotlib is not installed (the message names the extra
        ``vijax[plots]``).
      TypeError: ``reference``, ``names`` or ``weights`` of the wrong type,
        or arguments :func:`vijax.summary` rejects.
      ValueError: reference names q's draws do not have (the message lists
        those available), reference draws of the wrong shape, unknown
        ``names``, ``max_panels < 1``, or weights of the wrong shape or sign.

    Example:
      >>> model = vijax.models.eight_schools()
      >>> result = vijax.fit(key, family, model.log_joint, family.init(model.latent),
      ...                    optimizer=optax.adam(1e-2), num_steps=2000)
      >>> fig = vijax.plot_marginals(key, result, family, model,
      ...                            reference=nuts_idata)  # doctest: +SKIP
    """
    plt = _import_pyplot("plot_marginals")
    max_panels = _checks.check_positive_int("max_panels", max_panels)
    # Every argument is checked before q's draws are compiled: the same call,
    # traced for its shapes only, checks key, params, family and model.
    shapes = {
        name: tuple(x.shape[2:]) for name, x in jax.eval_shape(
            lambda: constrained_draws(key, params, family, model, num_samples)
        ).items()
    }
    ref = {} if reference is None else _reference_arrays(reference, shapes)
    w = _check_weights(weights, ref)

    where, leaf_of, labels = {}, {}, []
    for name, shape in shapes.items():
        leaf_labels = _element_names(name, shape)
        leaf_of[name] = leaf_labels
        for j, label in enumerate(leaf_labels):
            where[label] = (name, j)
        labels += leaf_labels
    chosen, note = _select(labels, leaf_of, names, max_panels)

    draws = as_numpy(constrained_draws(key, params, family, model, num_samples))
    q = {name: x.reshape(x.shape[0] * x.shape[1], -1).astype(np.float64)
         for name, x in draws.items()}
    num_draws = next(iter(q.values())).shape[0]

    ncols = min(4, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = plt.figure(figsize=(3.0 * ncols, 2.4 * nrows + 0.4), layout="constrained")
    for i, label in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        name, j = where[label]
        xq = q[name][:, j]
        xr = ref[name][:, j] if name in ref else None
        edges = _edges(xq) if xr is None else _edges(xq, xr)
        ax.stairs(_histogram(xq, edges, None), edges, fill=True, alpha=0.4, color="C0",
                  label="q")
        if xr is not None:
            ax.stairs(_histogram(xr, edges, w), edges, color="k", linewidth=1.2,
                      label="reference")
        ax.set_title(label, fontsize="medium")
        ax.set_yticks([])
    # One legend for the figure, from the first panel that has both histograms.
    first = next((ax for ax in fig.axes if len(ax.patches) == 2), fig.axes[0])
    fig.legend(handles=list(first.patches), loc="outside lower center", ncols=2,
               fontsize="small", frameon=False)
    title = f"marginals of q ({num_draws} draws)"
    if note:
        title += f": {note}"
    fig.suptitle(title, fontsize="medium")
    return fig
