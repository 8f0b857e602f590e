"""Diagnostics of a fitted q: PSIS, a diagnosis with a verdict, summaries, plots.

=================================  =======================================
module                             owns
=================================  =======================================
``vijax.diagnostics._psis``        :func:`psis` (Pareto-smoothed importance sampling), :func:`khat_threshold`
``vijax.diagnostics._diagnose``    :func:`diagnose`, :class:`Diagnosis` (k-hat, ESS, log evidence, corrected moments, verdict)
``vijax.diagnostics._summary``     :func:`summary`, :class:`Summary`
``vijax.diagnostics._plots``       :func:`plot_trace`, :func:`plot_marginals` (optional extra ``plots``)
``vijax.diagnostics._draws``       q's draws on the natural space, one chain per member
=================================  =======================================

Data flow: ``_draws`` and ``_psis`` are the leaves; ``_summary``,
``_diagnose`` and ``_plots`` read them, never the fitting engine.
"""

from vijax.diagnostics._diagnose import Diagnosis
from vijax.diagnostics._diagnose import diagnose
from vijax.diagnostics._plots import plot_marginals
from vijax.diagnostics._plots import plot_trace
from vijax.diagnostics._psis import MIN_DRAWS
from vijax.diagnostics._psis import khat_threshold
from vijax.diagnostics._psis import psis
from vijax.diagnostics._summary import Summary
from vijax.diagnostics._summary import summary

__all__ = [
    "Diagnosis",
    "MIN_DRAWS",
    "Summary",
    "diagnose",
    "khat_threshold",
    "plot_marginals",
    "plot_trace",
    "psis",
    "summary",
]
