"""vijax: variational inference in JAX, exact where the maths allows it.

Every public name is re-exported here from the private module that owns it:

=========================  ==========================================
module                     owns
=========================  ==========================================
``vijax._gaussian``        :class:`Gaussian` and its scales, :func:`gaussian_kl`
``vijax._families``        :func:`mean_field`, :func:`full_rank`, :func:`low_rank`
``vijax.models``           models (:func:`vijax.models.bayesian_linear_regression`, ...)
``vijax._exact``           :func:`exact_kl`, :func:`exact_elbo`
``vijax._objectives``      :func:`elbo` and its estimators, :func:`iwae_bound`, :func:`renyi_bound`, :func:`estimator_gradients`
``vijax._compare``         :func:`compare_gradients`, :class:`GradientComparison`
``vijax._fit``             :func:`fit`, :func:`fit_batched`, :class:`FitState`, checkpoints
``vijax._natural``         :func:`natural_gradient` (an optax transformation), :class:`NaturalGradientState`
``vijax._averaging``       :func:`iterate_average` (wraps any optax optimizer), :func:`averaged_params`
``vijax._bam``             :func:`batch_and_match`, :func:`make_bam_step`
=========================  ==========================================
"""

from vijax import models
from vijax._averaging import IterateAverageState
from vijax._averaging import averaged_params
from vijax._averaging import iterate_average
from vijax._bam import batch_and_match
from vijax._bam import make_bam_step
from vijax._compare import GradientComparison
from vijax._compare import compare_gradients
from vijax._exact import exact_elbo
from vijax._exact import exact_kl
from vijax._families import FullRankParams
from vijax._families import LowRankParams
from vijax._families import MeanFieldParams
from vijax._families import VariationalFamily
from vijax._families import full_rank
from vijax._families import low_rank
from vijax._families import mean_field
from vijax._fit import FitError
from vijax._fit import FitInfo
from vijax._fit import FitResult
from vijax._fit import FitState
from vijax._fit import fit
from vijax._fit import fit_batched
from vijax._fit import init_fit_state
from vijax._fit import load_checkpoint
from vijax._fit import make_step
from vijax._fit import save_checkpoint
from vijax._gaussian import CholeskyScale
from vijax._gaussian import DiagonalScale
from vijax._gaussian import Gaussian
from vijax._gaussian import LowRankScale
from vijax._gaussian import PrecisionScale
from vijax._gaussian import gaussian_kl
from vijax._natural import NaturalGradientState
from vijax._natural import natural_gradient
from vijax._objectives import elbo
from vijax._objectives import estimator_gradients
from vijax._objectives import iwae_bound
from vijax._objectives import renyi_bound

__version__ = "0.1.0"

__all__ = [
    "CholeskyScale",
    "DiagonalScale",
    "FitError",
    "FitInfo",
    "FitResult",
    "FitState",
    "FullRankParams",
    "Gaussian",
    "GradientComparison",
    "IterateAverageState",
    "LowRankParams",
    "LowRankScale",
    "MeanFieldParams",
    "NaturalGradientState",
    "PrecisionScale",
    "VariationalFamily",
    "averaged_params",
    "batch_and_match",
    "compare_gradients",
    "elbo",
    "estimator_gradients",
    "exact_elbo",
    "exact_kl",
    "fit",
    "fit_batched",
    "full_rank",
    "gaussian_kl",
    "init_fit_state",
    "iterate_average",
    "iwae_bound",
    "load_checkpoint",
    "low_rank",
    "make_bam_step",
    "make_step",
    "mean_field",
    "models",
    "natural_gradient",
    "renyi_bound",
    "save_checkpoint",
]
