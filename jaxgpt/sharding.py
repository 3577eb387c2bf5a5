"""Data parallelism and optional FSDP-style parameter sharding with `jax.sharding`.

One 1-D mesh axis, `data`, over all devices. Batches are split along it (data parallel);
with `fsdp=True` every weight matrix is also split along it (on its largest dimension that
divides evenly), and so are the AdamW moments that mirror it, while vectors (biases, LayerNorm)
stay replicated. XLA inserts the all-gathers and reduce-scatters. The same code runs on one
device (a mesh of one), on 8 simulated CPU devices, and across hosts after
`jax.distributed.initialize()` (each process then builds and feeds only the rows of the global
batch that its devices hold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    def one(leaf: Any) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, param_spec(shape, n, fsdp))

    return jax.tree_util.tree_map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays `[B, ...]` split along the batch over `data`."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: Any, sharding: NamedSharding) -> Any:
    """Place a pytree of host arrays `[B, ...]` (the whole global batch, the same in every
    process) with `sharding`; each process contributes the rows its devices hold."""
    return jax.tree_util.tree_map(
        lambda x: global_rows(lambda rows: (np.asarray(x)[rows],), len(x), sharding)[0], batch
    )


def global_rows(
    make_rows: Callable[[np.ndarray], tuple[np.ndarray, ...]],
    num_rows: int,
    sharding: jax.sharding.Sharding,
) -> tuple[jax.Array, ...]:
    """Global arrays `[num_rows, ...]` with `sharding`, each process building only its rows.

    `make_rows(rows)` returns a tuple of host arrays `[len(rows), ...]` for the global row
    numbers `rows` (int `[n]`); it is called once for each distinct block of rows that this
    process's devices hold (read from `sharding.addressable_devices_indices_map`, not from an
    assumed device order), never for rows that live only on other processes' devices.
    """
    blocks: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def block(index: Any) -> tuple[np.ndarray, ...]:
        start, stop, _ = index[0].indices(num_rows) if index else (0, num_rows, 1)
        if (start, stop) not in blocks:
            blocks[start, stop] = tuple(np.asarray(a) for a in make_rows(np.arange(start, stop)))
        return blocks[start, stop]

    probe = sharding.addressable_devices_indices_map((num_rows,))
    first = block(next(iter(probe.values())))
    out = []
    for k, sample in enumerate(first):
        shape = (num_rows, *sample.shape[1:])
        def rows_of(index: Any, k: int = k) -> np.ndarray:
            return block(index)[k][(slice(None),) + tuple(index[1:])]

        out.append(jax.make_array_from_callback(shape, sharding, rows_of))
    return tuple(out)


def check_batch_split(batch_size: int) -> None:
    """Raise ValueError unless `batch_size` rows split evenly over the processes and devices."""
    n_proc = jax.process_count()
    if batch_size % n_proc:
        raise ValueError(
            f"the batch of {batch_size} rows does not divide by the {n_proc} processes: each "
            f"process must feed the same number of rows; use a batch_size that is a multiple "
            f"of {n_proc}"
        )


def describe(mesh: Mesh, fsdp: bool) -> str:
    n = mesh.shape[DATA]
    mode = "FSDP (weights and AdamW moments split) + data parallel" if fsdp else "data parallel"
    kinds = sorted({d.platform for d in mesh.devices.flat})
    return f"{n} {'/'.join(kinds)} device(s), {mode}"
