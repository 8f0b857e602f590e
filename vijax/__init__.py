"""vijax: variational inference in JAX, exact where the maths allows it.

Every public name is re-exported here from the private module that owns it:

=============================  ==========================================
module                         owns
=============================  ==========================================
``vijax._gaussian``            :class:`Gaussian` and its scales, :func:`gaussian_kl`
``vijax.families._protocol``   :class:`VariationalFamily`: the open family protocol and its capabilities
``vijax.families._gaussian``   :func:`mean_field`, :func:`full_rank`, :func:`low_rank`, :func:`low_rank_precision` and their params
``vijax.models``               models (:func:`vijax.models.bayesian_linear_regression`, the zoo, :func:`vijax.models.constrained`, ...)
``vijax.data``                 minibatches, :class:`JointParams`, the data ELBO, sharded data
``vijax.bijectors``            bijectors for constrained latents (:func:`vijax.bijectors.exp`, ...)
``vijax.flows``                normalizing-flow families (:func:`vijax.flows.spline_coupling`, ...)
``vijax.interop``              adapters: :func:`vijax.interop.from_numpyro`, :func:`vijax.interop.from_tfp`
``vijax.diagnostics._summary`` :func:`summary`, :class:`Summary` (q on the natural space)
``vijax.diagnostics._psis``    :func:`psis` (Pareto-smoothed importance sampling, k-hat)
``vijax.diagnostics._diagnose`` :func:`diagnose`, :class:`Diagnosis` (is my fit good?)
``vijax.diagnostics._plots``   :func:`plot_trace`, :func:`plot_marginals` (optional extra ``plots``)
``vijax.interop._arviz``       :func:`to_arviz` (optional extra ``arviz``)
``vijax._exact``               :func:`exact_kl`, :func:`exact_elbo`
``vijax._objectives``          :func:`elbo` and its estimators, :func:`iwae_bound`, :func:`renyi_bound`, :func:`estimator_gradients`
``vijax._taylor``              :func:`taylor_reference`, :class:`TaylorReference` (the Taylor control variate)
``vijax._compare``             :func:`compare_gradients`, :class:`GradientComparison`
``vijax.fitting._types``       :class:`FitState`, :class:`FitInfo`, :class:`FitResult`, :class:`FitError`
``vijax.fitting._step``        :func:`make_step`, :func:`init_fit_state` (the pure optax step)
``vijax.fitting._drivers``     :func:`fit`, :func:`fit_batched` (on the engine, ``vijax.fitting._engine``)
``vijax.fitting._deterministic`` :func:`fit_exact`, :class:`ExactFitResult` (L-BFGS on :func:`exact_elbo`)
``vijax.fitting._checkpoint``  :func:`save_checkpoint`, :func:`load_checkpoint` (data, never code)
``vijax.optim._natural``       :func:`natural_gradient` (an optax transformation), :class:`NaturalGradientState`
``vijax.optim._averaging``     :func:`iterate_average` (wraps any optax optimizer), :func:`averaged_params`
``vijax.optim._adaptive``      :func:`adaptive_lr` (a step ``fit``'s auto_stop lowers), :class:`AdaptiveLRState`
``vijax.algorithms._bam``      :func:`batch_and_match`, :func:`make_bam_step`
``vijax.algorithms._gsm``      :func:`gaussian_score_matching`, :func:`make_gsm_step`
``vijax.algorithms._pbam``     :func:`patched_batch_and_match`, :func:`make_pbam_step`
``vijax.algorithms._slang``    :func:`slang`, :func:`make_slang_step`
=============================  ==========================================
"""

from vijax import bijectors
from vijax import data
from vijax import diagnostics
from vijax import flows
from vijax import interop
from vijax import models
from vijax._compare import GradientComparison
from vijax._compare import compare_gradients
from vijax._exact import exact_elbo
from vijax.data._objective import JointParams
from vijax._exact import exact_kl
from vijax.algorithms._bam import batch_and_match
from vijax.algorithms._bam import make_bam_step
from vijax.algorithms._gsm import gaussian_score_matching
from vijax.algorithms._gsm import make_gsm_step
from vijax.algorithms._pbam import make_pbam_step
from vijax.algorithms._pbam import patched_batch_and_match
from vijax.algorithms._slang import make_slang_step
from vijax.algorithms._slang import slang
from vijax.diagnostics._diagnose import Diagnosis
from vijax.diagnostics._diagnose import diagnose
from vijax.diagnostics._plots import plot_marginals
from vijax.diagnostics._plots import plot_trace
from vijax.diagnostics._psis import psis
from vijax.diagnostics._summary import Summary
from vijax.diagnostics._summary import summary
from vijax.interop._arviz import to_arviz
from vijax.families._gaussian import FullRankParams
from vijax.families._gaussian import LowRankParams
from vijax.families._gaussian import LowRankPrecisionParams
from vijax.families._gaussian import MeanFieldParams
from vijax.families._gaussian import full_rank
from vijax.families._gaussian import low_rank
from vijax.families._gaussian import low_rank_precision
from vijax.families._gaussian import mean_field
from vijax.families._protocol import VariationalFamily
from vijax.fitting._checkpoint import load_checkpoint
from vijax.fitting._checkpoint import save_checkpoint
from vijax.fitting._drivers import fit
from vijax.fitting._drivers import fit_batched
from vijax.fitting._deterministic import ExactFitResult
from vijax.fitting._deterministic import fit_exact
from vijax.fitting._step import init_fit_state
from vijax.fitting._step import make_step
from vijax.fitting._types import FitError
from vijax.fitting._types import FitInfo
from vijax.fitting._types import FitResult
from vijax.fitting._types import FitState
from vijax._gaussian import CholeskyScale
from vijax._gaussian import DiagonalScale
from vijax._gaussian import Gaussian
from vijax._gaussian import LowRankPrecisionScale
from vijax._gaussian import LowRankScale
from vijax._gaussian import PrecisionScale
from vijax._gaussian import gaussian_kl
from vijax._objectives import elbo
from vijax._objectives import estimator_gradients
from vijax._objectives import iwae_bound
from vijax._objectives import renyi_bound
from vijax._taylor import TaylorReference
from vijax._taylor import taylor_reference
from vijax.optim._adaptive import AdaptiveLRState
from vijax.optim._adaptive import adaptive_lr
from vijax.optim._averaging import IterateAverageState
from vijax.optim._averaging import averaged_params
from vijax.optim._averaging import iterate_average
from vijax.optim._natural import NaturalGradientState
from vijax.optim._natural import natural_gradient

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLRState",
    "CholeskyScale",
    "Diagnosis",
    "DiagonalScale",
    "ExactFitResult",
    "FitError",
    "FitInfo",
    "FitResult",
    "FitState",
    "FullRankParams",
    "Gaussian",
    "GradientComparison",
    "IterateAverageState",
    "JointParams",
    "LowRankParams",
    "LowRankPrecisionParams",
    "LowRankPrecisionScale",
    "LowRankScale",
    "MeanFieldParams",
    "NaturalGradientState",
    "PrecisionScale",
    "Summary",
    "TaylorReference",
    "VariationalFamily",
    "adaptive_lr",
    "averaged_params",
    "batch_and_match",
    "bijectors",
    "compare_gradients",
    "data",
    "diagnose",
    "diagnostics",
    "elbo",
    "estimator_gradients",
    "exact_elbo",
    "exact_kl",
    "fit",
    "fit_batched",
    "fit_exact",
    "flows",
    "full_rank",
    "gaussian_kl",
    "gaussian_score_matching",
    "init_fit_state",
    "interop",
    "iterate_average",
    "iwae_bound",
    "load_checkpoint",
    "low_rank",
    "low_rank_precision",
    "make_bam_step",
    "make_gsm_step",
    "make_pbam_step",
    "make_slang_step",
    "make_step",
    "mean_field",
    "models",
    "natural_gradient",
    "patched_batch_and_match",
    "plot_marginals",
    "plot_trace",
    "psis",
    "renyi_bound",
    "save_checkpoint",
    "slang",
    "summary",
    "taylor_reference",
    "to_arviz",
]
