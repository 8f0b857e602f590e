"""Posterior summaries of a fitted q on the model's natural space."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from vijax import _checks

from vijax.diagnostics._draws import as_numpy, constrained_draws

ArrayTree = Any

COLUMNS = ("mean", "sd", "mc_se", "q5", "q50", "q95")


class Summary(NamedTuple):
    """Per-element posterior statistics of q, printed as a table.

    Attributes:
      names: the row labels, ``"tau"``, ``"theta[3]"``, ``"L[1,0]"``, in order.
      stats: ``{column: (rows,) NumPy array}`` for the columns ``mean``, ``sd``,
        ``mc_se`` (the Monte Carlo standard error of ``mean``, ``sd /
        sqrt(draws)``: q's draws are independent), ``q5``, ``q50``, ``q95``.
      num_draws: the number of draws behind each row (chains x draws).
      num_chains: the number of chains (``fit_batched`` members; 1 otherwise).
    """

    names: tuple
    stats: dict
    num_draws: int
    num_chains: int

    def row(self, name: str) -> dict:
        """``{column: float}`` for the row labelled ``name``."""
        try:
            i = self.names.index(name)
        except ValueError:
            raise KeyError(f"no row {name!r}; rows are {list(self.names)}") from None
        return {c: float(self.stats[c][i]) for c in COLUMNS}

    def __str__(self) -> str:
        headers = ("", "mean", "sd", "mc_se", "5%", "50%", "95%")
        body = [
            [name] + [_fmt(self.stats[c][i], _decimals(self.stats["sd"][i])) for c in COLUMNS]
            for i, name in enumerate(self.names)
        ]
        widths = [max(len(h), *(len(r[j]) for r in body)) for j, h in enumerate(headers)]
        lines = [
            "  ".join(h.ljust(w) if j == 0 else h.rjust(w)
                      for j, (h, w) in enumerate(zip(headers, widths)))
        ]
        for r in body:
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(r, widths))))
        chains = f" in {self.num_chains} chains" if self.num_chains > 1 else ""
        lines.append(f"({self.num_draws} draws from q{chains}; mc_se: Monte Carlo se of the mean)")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / Jupyter
        p.text(str(self))


def _decimals(sd: float) -> int:
    """Decimals that show a row's sd to about two significant digits (1 to 10)."""
    if not np.isfinite(sd) or sd <= 0:
        return 3
    return int(np.clip(2 - np.floor(np.log10(sd)), 1, 10))


def _fmt(x: float, decimals: int) -> str:
    if not np.isfinite(x):
        return str(x)
    if abs(x) >= 1e6:
        return f"{x:.3e}"
    return f"{x:.{decimals}f}"


def _element_names(name: str, shape: tuple) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i) for i in idx)}]" for idx in np.ndindex(*shape)]


def summary(
    key: jax.Array,
    params: Any,
    family,
    model,
    *,
    num_samples: int = 4000,
    batched: Optional[bool] = None,
) -> Summary:
    """Returns mean, sd and 5/50/95% quantiles of q, per latent element, on the natural space.

    Draws ``num_samples`` from ``q`` (per member, for :func:`vijax.fit_batched`
    parameters), maps them through ``model.constrain`` (a constrained model's
    bijectors and deterministic quantities; the identity otherwise) and
    summarizes every element. ``print(vijax.summary(...))`` shows the table.

    Args:
      key: a PRNG key for the draws.
      params: the fitted parameters, or the :class:`vijax.FitResult` /
        :class:`vijax.FitState` holding them.
      family: the :class:`vijax.VariationalFamily` they belong to.
      model: the :class:`vijax.models.Model` fitted (its ``latent`` and
        ``constrain``), or the :class:`vijax.models.DataModel` fitted (with a
        global latent and no local latents; ``params`` may be the
        :class:`vijax.data.JointParams` of a fit that learned ``theta``).
      num_samples: draws per member (>= 2).
      batched: whether ``params`` carry a leading member axis (from
        ``fit_batched``); ``None`` (the default) tells from the shapes.

    Returns:
      A :class:`Summary`; ``summary.row("tau")["mean"]`` reads one number.

    Example:
      >>> family = vijax.mean_field()
      >>> result = vijax.fit(key, family, model.log_joint, family.init(model.latent),
      ...                    optimizer=optax.adam(1e-2), num_steps=2000)
      >>> print(vijax.summary(key, result, family, model))  # doctest: +SKIP
    """
    num_samples = _checks.check_positive_int("num_samples", num_samples, minimum=2)  # an sd needs two
    draws = as_numpy(constrained_draws(key, params, family, model, num_samples, batched))
    names, cols = [], {c: [] for c in COLUMNS}
    num_chains = next(iter(draws.values())).shape[0]
    for name, x in draws.items():
        shape = x.shape[2:]
        x = x.reshape(x.shape[0] * x.shape[1], -1).astype(np.float64)
        names += _element_names(name, shape)
        sd = x.std(axis=0, ddof=1)
        cols["mean"].append(x.mean(axis=0))
        cols["sd"].append(sd)
        cols["mc_se"].append(sd / np.sqrt(x.shape[0]))
        q = np.quantile(x, [0.05, 0.5, 0.95], axis=0)
        for c, row in zip(("q5", "q50", "q95"), q):
            cols[c].append(row)
    stats = {c: np.concatenate(v) for c, v in cols.items()}
    return Summary(tuple(names), stats, num_chains * num_samples, num_chains)
