"""Data parallelism and optional FSDP-style parameter sharding with `jax.sharding`.

One 1-D mesh axis, `data`, over all devices. Batches are split along it (data parallel);
with `fsdp=True` every weight matrix is also split along it (on its largest dimension that
divides evenly), and so are the AdamW moments that mirror it, while vectors (biases, LayerNorm)
stay replicated. XLA inserts the all-gathers and reduce-scatters. The same code runs on one
device (a mesh of one), on 8 simulated CPU devices, and across hosts after
`jax.distributed.initialize()` (each process then feeds its own rows of the global batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devices), (DATA,))


def param_spec(shape: Sequence[int], num_shards: int, fsdp: bool) -> P:
    """PartitionSpec of one parameter (or optimizer moment) of the given shape.

    Replicated unless `fsdp` and the array is a matrix (ndim >= 2): then its largest dimension
    that `num_shards` divides is split over `data` (replicated if none divides).
    """
    if not fsdp or num_shards == 1 or len(shape) < 2:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % num_shards == 0:
            spec: list[Any] = [None] * len(shape)
            spec[dim] = DATA
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """A NamedSharding for every array leaf of `tree` (params, optimizer state, train state)."""
    n = mesh.shape[DATA]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, param_spec(shape, n, fsdp))

    return jax.tree_util.tree_map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays `[B, ...]` split along the batch over `data`."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: Any, sharding: NamedSharding) -> Any:
    """Place a pytree of host arrays `[B, ...]` (the global batch) with `sharding`.

    With several processes, each process passes the same global batch and contributes its own
    contiguous rows (the mesh from `make_mesh` orders devices by process).
    """
    n_proc = jax.process_count()
    if n_proc == 1:
        return jax.device_put(batch, sharding)
    pid = jax.process_index()

    def put(x):
        x = np.asarray(x)
        rows = x.shape[0] // n_proc
        local = x[pid * rows : (pid + 1) * rows]
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    return jax.tree_util.tree_map(put, batch)


def describe(mesh: Mesh, fsdp: bool) -> str:
    n = mesh.shape[DATA]
    mode = "FSDP (weights and AdamW moments split) + data parallel" if fsdp else "data parallel"
    kinds = sorted({d.platform for d in mesh.devices.flat})
    return f"{n} {'/'.join(kinds)} device(s), {mode}"
