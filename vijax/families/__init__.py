"""Variational families: the open protocol and the Gaussian families.

``vijax.VariationalFamily(init=, sample=, log_prob=)`` is a family; entropy and
the Gaussian view are optional capabilities (see :mod:`vijax.families._protocol`).
The Gaussian families live in :mod:`vijax.families._gaussian`; the flow
families, built on this protocol, in :mod:`vijax.flows`; amortized families
``q(z_i | x_i)`` for the local latents of a data model in
:mod:`vijax.families._amortized`.
"""

from vijax.families._amortized import AmortizedFamily
from vijax.families._amortized import amortized
from vijax.families._gaussian import FullRankParams
from vijax.families._gaussian import LowRankParams
from vijax.families._gaussian import MeanFieldParams
from vijax.families._gaussian import full_rank
from vijax.families._gaussian import low_rank
from vijax.families._gaussian import mean_field
from vijax.families._protocol import VariationalFamily

__all__ = [
    "AmortizedFamily",
    "FullRankParams",
    "LowRankParams",
    "MeanFieldParams",
    "VariationalFamily",
    "amortized",
    "full_rank",
    "low_rank",
    "mean_field",
]
