"""Data sharded over a mesh's data axis; parameters replicated; XLA partitions the sum.

vijax adds no distributed engine of its own: :func:`shard` places each data
leaf with a ``jax.sharding.NamedSharding`` that splits its rows over one mesh
axis, and :func:`vijax.fit` replicates the state on the same mesh. The
compiled loop then runs under XLA's SPMD partitioner: each device evaluates
the likelihood of its own rows (or, with minibatches, gathers the batch rows
it holds) and the partial sums are all-reduced.

Several hosts: start every process with ``jax.distributed.initialize()``,
build a mesh over ``jax.devices()`` (all hosts' devices), build each global
data array from the rows this process holds with
``jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
local_rows)``, and call ``vijax.fit`` with the same arguments in every
process.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def shard(data: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Returns ``data`` with every leaf's rows split over ``mesh``'s axis ``axis``.

    Args:
      data: a pytree of arrays with one leading size ``n`` (rows = data).
      mesh: a ``jax.sharding.Mesh``, e.g. ``jax.make_mesh((8,), ("data",))``.
      axis: the name of the mesh axis to split the rows over.

    Raises:
      TypeError: ``mesh`` is not a Mesh.
      ValueError: ``axis`` is not one of the mesh's axes, or its size does
        not divide ``n`` (drop or add rows first: no padding is done, since
        padded rows would enter the likelihood sum).
    """
    from vijax.models._data import check_data

    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(f"`axis` must be one of the mesh's axes {mesh.axis_names}; got {axis!r}.")
    data, n = check_data(data)
    size = mesh.shape[axis]
    if n % size:
        raise ValueError(
            f"The mesh axis {axis!r} has {size} devices, which does not divide the number "
            f"of data n = {n}: drop the last {n % size} rows or add {size - n % size} "
            "(vijax does not pad, since padded rows would enter the likelihood sum)."
        )
    return jax.device_put(data, NamedSharding(auto_mesh(mesh), PartitionSpec(axis)))


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in Auto mode (the SPMD partitioner decides the layouts).

    ``jax.make_mesh`` makes Explicit axes, under which every intermediate
    carries its sharding in its type; the fit loop, written for one device,
    lets XLA place its intermediates instead.
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def as_auto(data: Any) -> Any:
    """``data`` with each NamedSharding moved onto the Auto version of its mesh (no copy)."""

    def move(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            mesh = auto_mesh(sharding.mesh)
            if mesh is not sharding.mesh:
                return jax.device_put(leaf, NamedSharding(mesh, sharding.spec))
        return leaf

    return jax.tree_util.tree_map(move, data)


def data_mesh(data: Any) -> Optional[Mesh]:
    """The mesh the data leaves are sharded on (one for all), or ``None`` when unsharded."""
    meshes = set()
    for leaf in jax.tree_util.tree_leaves(data):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            meshes.add(sharding.mesh)
    if len(meshes) > 1:
        raise ValueError(
            "The data leaves are sharded over different meshes; place them all on one "
            "(vijax.data.shard(data, mesh))."
        )
    return next(iter(meshes)) if meshes else None


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every leaf replicated on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
