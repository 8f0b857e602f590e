"""Fitting algorithms other than optax on the ELBO, each an ``(init, step)`` pair run by the engine.

======================  ==========================================================
module                  owns
======================  ==========================================================
``_score``              the guarded score-based step, the KL trust region, the shared driver
``_bam``                :func:`batch_and_match` (Cai et al. 2024)
``_gsm``                :func:`gaussian_score_matching` (Modi et al. 2023)
``_pbam``               :func:`patched_batch_and_match` (Modi, Cai and Saul 2025)
``_slang``              :func:`slang` (Mishkin et al. 2018), low-rank-plus-diagonal precision
======================  ==========================================================
"""

from vijax.algorithms._bam import bam_algorithm
from vijax.algorithms._bam import batch_and_match
from vijax.algorithms._bam import make_bam_step
from vijax.algorithms._gsm import gaussian_score_matching
from vijax.algorithms._gsm import gsm_algorithm
from vijax.algorithms._gsm import make_gsm_step
from vijax.algorithms._pbam import make_pbam_step
from vijax.algorithms._pbam import patched_batch_and_match
from vijax.algorithms._pbam import pbam_algorithm
from vijax.algorithms._score import TrustState
from vijax.algorithms._slang import make_slang_step
from vijax.algorithms._slang import slang
from vijax.algorithms._slang import slang_algorithm

__all__ = [
    "TrustState",
    "bam_algorithm",
    "batch_and_match",
    "gaussian_score_matching",
    "gsm_algorithm",
    "make_bam_step",
    "make_gsm_step",
    "make_pbam_step",
    "make_slang_step",
    "patched_batch_and_match",
    "pbam_algorithm",
    "slang",
    "slang_algorithm",
]
