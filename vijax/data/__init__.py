"""Big data: minibatches drawn in the compiled loop, the data ELBO, sharded data.

======================  ==========================================================
module                  owns
======================  ==========================================================
``_batching``           minibatch indices (epochs without replacement, or with)
``_objective``          :class:`JointParams`, :func:`data_elbo` (unbiased n/B scaling)
``_sharding``           :func:`shard` (rows over a mesh axis), multi-host notes
======================  ==========================================================

The models live in :mod:`vijax.models` (:func:`vijax.models.data_model`), the
amortized family in :mod:`vijax.families` (:func:`vijax.families.amortized`),
and :func:`vijax.fit` runs them (``batch_size=``, ``local_family=``).
"""

from vijax.data._batching import BATCHING
from vijax.data._objective import JointParams
from vijax.data._objective import data_elbo
from vijax.data._sharding import shard

__all__ = [
    "BATCHING",
    "JointParams",
    "data_elbo",
    "shard",
]
