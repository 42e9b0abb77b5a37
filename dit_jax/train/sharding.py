"""Device mesh and shardings: Mesh(('data', 'fsdp')), batches over both axes, params replicated or FSDP.

Data parallelism: the global batch is split over every device, P(('data', 'fsdp')).
FSDP (config.fsdp): each large parameter (and its optimizer/EMA copies) is split along its largest axis that
the 'fsdp' axis size divides; XLA inserts the all-gathers and reduce-scatters. Small leaves stay replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**14  # leaves smaller than this stay replicated: splitting them costs more than it saves


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A 2-D mesh of shape (data, fsdp) over `devices` (default all); data=-1 takes what fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but there are {n}: set "
                         f"mesh.data=-1 (every device not used by fsdp)")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def local_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """The rows of a (global_batch, ...) batch that this process's devices hold under batch_sharding, sorted:
    what this process reads of every global batch (the order `shard_batch` expects its local data in)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((int(global_batch),))
    rows = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(int(global_batch))))
    return np.asarray(sorted(rows), np.int64)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest axis that fsdp_size divides, for leaves of at least FSDP_MIN_SIZE elements."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(abstract: PyTree, mesh: Mesh, fsdp: bool) -> PyTree:
    """NamedShardings for a tree of arrays / ShapeDtypeStructs: replicated, or FSDP when `fsdp`."""
    size = mesh.shape["fsdp"] if fsdp else 1
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), size)), abstract)


def shard_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global jax.Arrays sharded over the mesh (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
