"""Diagnostics of a fitted q: posterior summaries (later: PSIS, diagnose, plots).

=================================  =======================================
module                             owns
=================================  =======================================
``vijax.diagnostics._summary``     :func:`summary`, :class:`Summary`
``vijax.diagnostics._draws``       q's draws on the natural space, one chain per member
=================================  =======================================
"""

from vijax.diagnostics._summary import Summary
from vijax.diagnostics._summary import summary

__all__ = ["Summary", "summary"]
