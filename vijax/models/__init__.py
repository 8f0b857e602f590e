"""Models: ``log_joint`` plus, for Gaussian-conjugate ones, exact answers.

Every constructor returns a :class:`Model`. Conjugate models also carry the
exact posterior, the log evidence and the closed-form expected log joint that
:func:`vijax.exact_elbo` and :func:`vijax.exact_kl` use.
"""

from vijax.models._conjugate import bayesian_linear_regression
from vijax.models._conjugate import linear_gaussian
from vijax.models._conjugate import normal_mean
from vijax.models._constrained import constrained
from vijax.models._logistic import logistic_regression
from vijax.models._model import Model

__all__ = [
    "Model",
    "bayesian_linear_regression",
    "constrained",
    "linear_gaussian",
    "logistic_regression",
    "normal_mean",
]
