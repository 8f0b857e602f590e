"""optax transformations for variational families: natural gradient, iterate averaging, adaptive step.

They are plain ``optax.GradientTransformation`` objects: they read a family's
Gaussian view and never import the fitting engine, so they work in any loop.
"""

from vijax.optim._adaptive import AdaptiveLRState
from vijax.optim._adaptive import adaptive_lr
from vijax.optim._adaptive import decrease
from vijax.optim._adaptive import learning_rate_scale
from vijax.optim._averaging import IterateAverageState
from vijax.optim._averaging import averaged_params
from vijax.optim._averaging import iterate_average
from vijax.optim._natural import NaturalGradientState
from vijax.optim._natural import natural_gradient

__all__ = [
    "AdaptiveLRState",
    "adaptive_lr",
    "decrease",
    "learning_rate_scale",
    "IterateAverageState",
    "NaturalGradientState",
    "averaged_params",
    "iterate_average",
    "natural_gradient",
]
