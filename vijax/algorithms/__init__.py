"""Fitting algorithms other than optax on the ELBO, each an ``(init, step)`` pair run by the engine."""

from vijax.algorithms._bam import bam_algorithm
from vijax.algorithms._bam import batch_and_match
from vijax.algorithms._bam import make_bam_step

__all__ = ["bam_algorithm", "batch_and_match", "make_bam_step"]
