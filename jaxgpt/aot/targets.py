"""Devices to compile for without the hardware: NVIDIA GPUs and TPUs, and what each has.

"h100", "h200", "a100" need `jax-cuda12-plugin` and `jax-cuda12-pjrt` (the installed jax's
version) and JAX's platforms limited to the CPU before any backend starts
(`JAX_PLATFORMS=cpu`), so that the plugin is registered without a GPU being opened; the
devices come from the GPU target configs shipped in `jaxgpt/assets/gpu_targets`. "tpu-v5e",
"tpu-v6e" need `libtpu` (jax's `tpu` extra; only one process at a time may load it). "cpu" is
this machine's CPU devices.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import jax

GPU_TARGETS = {"h100": "h100_sxm", "h200": "h200", "a100": "a100_sxm_80"}
TPU_TARGETS = {"tpu-v5e": "v5e", "tpu-v6e": "v6e"}
TARGETS = (*GPU_TARGETS, *TPU_TARGETS, "cpu")

# HBM per chip and its bandwidth, from Google Cloud's TPU pages (v5e: 16 GiB, 819 GB/s;
# v6e Trillium: 32 GiB, 1640 GB/s). GPU figures come from the target configs.
_TPU_MEMORY = {"tpu-v5e": (16 * 2**30, 819e9), "tpu-v6e": (32 * 2**30, 1640e9)}
# TPU slice shapes (chips per host 2x2), smallest first: `count` devices come from the first
# that holds them.
_TPU_SLICES = ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")


@dataclass(frozen=True)
class TargetInfo:
    """What the report needs of a target: memory per device and its bandwidth (None: unknown)."""

    name: str
    platform: str  # "cuda", "tpu" or "cpu"
    memory_bytes: int | None
    bandwidth_bytes_per_s: float | None


def _check_target(name: Any) -> str:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return name


def _gpu_config_text(name: str) -> str:
    files = importlib.resources.files("jaxgpt") / "assets" / "gpu_targets"
    return (files / f"{GPU_TARGETS[name]}.txtpb").read_text()


def _proto_field(text: str, field: str) -> int:
    m = re.search(rf"^\s*{field}:\s*([0-9.e+]+)", text, re.MULTILINE)
    if m is None:
        raise ValueError(f"the GPU target config has no {field}")
    return int(float(m.group(1)))


def target_info(name: str) -> TargetInfo:
    """Memory size and bandwidth of one device of target `name` (see `TARGETS`)."""
    _check_target(name)
    if name in GPU_TARGETS:
        text = _gpu_config_text(name)
        return TargetInfo(name, "cuda", _proto_field(text, "device_memory_size"),
                          float(_proto_field(text, "memory_bandwidth")))
    if name in TPU_TARGETS:
        mem, bw = _TPU_MEMORY[name]
        return TargetInfo(name, "tpu", mem, bw)
    return TargetInfo(name, "cpu", None, None)


def _missing(packages: str, what: str) -> ImportError:
    version = jax.__version__
    return ImportError(
        f"compiling for {what} without the hardware needs {packages.format(v=version)} "
        f"(pip install {packages.format(v=version)}), pinned to the installed jax {version}"
    )


def _require_cuda_plugin(name: str) -> None:
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise _missing("jax-cuda12-plugin=={v} jax-cuda12-pjrt=={v}", name)


def _require_libtpu(name: str) -> None:
    try:
        importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        raise _missing('"jax[tpu]=={v}" (libtpu)', name) from None


@functools.cache
def _topology_devices(name: str, count: int) -> tuple[jax.Device, ...]:
    from jax.experimental import topologies

    if name in GPU_TARGETS:
        _require_cuda_plugin(name)
        try:
            topo = topologies.get_topology_desc(
                platform="cuda", target_config=_gpu_config_text(name), topology=f"1x1x{count}"
            )
        except NotImplementedError as e:
            raise RuntimeError(
                f"compile-only {name} devices need JAX's CUDA plugin registered without opening "
                f"a GPU: set JAX_PLATFORMS=cpu (or jax.config.update('jax_platforms', 'cpu')) "
                f"before JAX starts any backend ({e})"
            ) from e
        return tuple(topo.devices)
    _require_libtpu(name)
    for shape in _TPU_SLICES:
        x, y = (int(s) for s in shape.split("x"))
        if x * y >= count:
            topo = topologies.get_topology_desc(
                topology_name=f"{TPU_TARGETS[name]}:{shape}", platform="tpu"
            )
            return tuple(topo.devices[:count])
    raise ValueError(f"count {count} exceeds the largest {name} slice here ({_TPU_SLICES[-1]})")


def target_devices(name: str, count: int = 1) -> list[jax.Device]:
    """`count` devices of target `name` to compile for (compile-only for GPUs and TPUs).

    Args:
      name: one of "h100", "h200", "a100", "tpu-v5e", "tpu-v6e", "cpu".
      count: how many devices (GPUs: one host; TPUs: the first `count` chips of the smallest
        slice that holds them; CPU: at most `len(jax.devices("cpu"))`).

    Raises:
      ValueError for an unknown name or a bad count; ImportError naming the pip packages when
      the target's plugin is not installed; RuntimeError when JAX has opened its backends in a
      way that hides the CUDA plugin (see the module docstring).
    """
    _check_target(name)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if name == "cpu":
        cpus = jax.devices("cpu")
        if count > len(cpus):
            raise ValueError(
                f"count {count} exceeds the {len(cpus)} CPU device(s); start Python with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} for more"
            )
        return cpus[:count]
    return list(_topology_devices(name, count))

