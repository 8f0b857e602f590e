"""optax transformations for variational families: natural gradient, iterate averaging.

They are plain ``optax.GradientTransformation`` objects: they read a family's
Gaussian view and never import the fitting engine, so they work in any loop.
"""

from vijax.optim._averaging import IterateAverageState
from vijax.optim._averaging import averaged_params
from vijax.optim._averaging import iterate_average
from vijax.optim._natural import NaturalGradientState
from vijax.optim._natural import natural_gradient

__all__ = [
    "IterateAverageState",
    "NaturalGradientState",
    "averaged_params",
    "iterate_average",
    "natural_gradient",
]
