"""Models: ``log_joint`` plus, for Gaussian-conjugate ones, exact answers.

Every constructor returns a :class:`Model`. Conjugate models also carry the
exact posterior, the log evidence and the closed-form expected log joint that
:func:`vijax.exact_elbo` and :func:`vijax.exact_kl` use; constrained models
carry ``constrain`` back to their natural space.

==============================  ==============================================
module                          owns
==============================  ==============================================
``vijax.models._model``         :class:`Model`
``vijax.models._conjugate``     ``linear_gaussian``, ``bayesian_linear_regression``, ``normal_mean``
``vijax.models._logistic``      ``logistic_regression``
``vijax.models._labels``        labels and counts: integer and bool arrays checked and cast to the
                                data's floating dtype (``logistic_regression`` and the zoo)
``vijax.models._constrained``   ``constrained``: a natural-space log density plus bijectors
``vijax.models._data``          :class:`DataModel`, ``data_model``: prior + sum over data (minibatches,
                                theta, local latents; see :mod:`vijax.data`)
``vijax.models._zoo``           the zoo: ``eight_schools``, ``hierarchical_logistic``,
                                ``stochastic_volatility``, ``neals_funnel``, ``poisson_glm``,
                                ``item_response``, ``log_gaussian_cox`` (long-NUTS references
                                in ``benchmarks/results/references/``)
==============================  ==============================================
"""

from vijax.models._conjugate import bayesian_linear_regression
from vijax.models._conjugate import linear_gaussian
from vijax.models._conjugate import normal_mean
from vijax.models._constrained import constrained
from vijax.models._data import DataModel
from vijax.models._data import data_model
from vijax.models._logistic import logistic_regression
from vijax.models._model import Model
from vijax.models._zoo import eight_schools
from vijax.models._zoo import hierarchical_logistic
from vijax.models._zoo import item_response
from vijax.models._zoo import log_gaussian_cox
from vijax.models._zoo import neals_funnel
from vijax.models._zoo import poisson_glm
from vijax.models._zoo import stochastic_volatility

__all__ = [
    "DataModel",
    "Model",
    "bayesian_linear_regression",
    "constrained",
    "data_model",
    "eight_schools",
    "hierarchical_logistic",
    "item_response",
    "linear_gaussian",
    "log_gaussian_cox",
    "logistic_regression",
    "neals_funnel",
    "normal_mean",
    "poisson_glm",
    "stochastic_volatility",
]
