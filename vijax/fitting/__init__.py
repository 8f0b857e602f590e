"""Fitting: the types, the pure step, the engine that runs algorithms, checkpoints, progress, drivers.

======================  ==========================================================
module                  owns
======================  ==========================================================
``_types``              :class:`FitState`, :class:`FitInfo`, :class:`FitResult`, :class:`FitError`
``_step``               :func:`make_step`, :func:`init_fit_state` (the pure optax step)
``_engine``             :class:`Algorithm`, the compiled chunk and its cache, the host loop
``_checkpoint``         :func:`save_checkpoint`, :func:`load_checkpoint` (data only)
``_progress``           the tqdm progress bar
``_drivers``            :func:`fit`, :func:`fit_batched`
``_deterministic``      :func:`fit_exact`, :class:`ExactFitResult` (L-BFGS on the exact ELBO)
``_stopping``           the tuning-free rule of ``fit(..., auto_stop=True)`` (host side)
======================  ==========================================================

Data flows one way: drivers -> step/stopping -> engine -> checkpoint/progress -> types.
An algorithm (:func:`vijax.batch_and_match`, ...) is an :class:`Algorithm`
``(init, step)`` pair handed to the engine; optax transformations
(:mod:`vijax.optim`) never import this package.
"""

from vijax.fitting._checkpoint import load_checkpoint
from vijax.fitting._checkpoint import save_checkpoint
from vijax.fitting._deterministic import ExactFitResult
from vijax.fitting._deterministic import fit_exact
from vijax.fitting._drivers import fit
from vijax.fitting._drivers import fit_batched
from vijax.fitting._engine import Algorithm
from vijax.fitting._step import init_fit_state
from vijax.fitting._step import make_step
from vijax.fitting._types import FitError
from vijax.fitting._types import FitInfo
from vijax.fitting._types import FitResult
from vijax.fitting._types import FitState

__all__ = [
    "Algorithm",
    "ExactFitResult",
    "FitError",
    "FitInfo",
    "FitResult",
    "FitState",
    "fit",
    "fit_batched",
    "fit_exact",
    "init_fit_state",
    "load_checkpoint",
    "make_step",
    "save_checkpoint",
]
