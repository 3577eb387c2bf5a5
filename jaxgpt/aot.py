"""Ahead-of-time lowering, and devices to compile for without the hardware.

    devices = target_devices("h100")                       # compile-only, no GPU needed
    lowered = lower_generate(cfg, batch=1, prompt_len=8, max_new_tokens=128,
                             dtype=jnp.bfloat16, devices=devices)
    compiled = lowered.compile()                           # XLA:GPU, on this CPU
    compiled.memory_analysis(), compiled.as_text()

`lower_generate` lowers the jitted loop that `jaxgpt.generate` runs (prefill and decoding, one
program), `lower_decode_step` one cached decoding step alone, and `lower_train_step` the step
`jaxgpt.train.make_train_step` builds, with the shardings `jaxgpt.sharding` gives it. All take
abstract inputs (`jax.ShapeDtypeStruct`s placed on `devices`): no weights are allocated, and
the result can be compiled for a device this machine does not have, or exported.

Targets: "h100", "h200", "a100" need `jax-cuda12-plugin` and `jax-cuda12-pjrt` (the installed
jax's version) and JAX's platforms limited to the CPU before any backend starts
(`JAX_PLATFORMS=cpu`), so that the plugin is registered without a GPU being opened; the
devices come from the GPU target configs shipped in `jaxgpt/assets/gpu_targets`. "tpu-v5e",
"tpu-v6e" need `libtpu` (jax's `tpu` extra; only one process at a time may load it). "cpu" is
this machine's CPU devices.

The helpers below read what a compiled program costs: `memory_stats`, `cost_stats` (XLA's
HloCostAnalysis; for the GPU plugin, whose `cost_analysis()` is None, run through the CPU
client on the optimized module), and `loop_stats` (kernels and cache-sized copies in the body
of the decoding loop, from the optimized HLO text).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt import sharding
from jaxgpt.config import GPTConfig

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


@functools.lru_cache(maxsize=None)
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


# --- abstract inputs -----------------------------------------------------------------------------


def _abstract(tree: Any, shardings: Any) -> Any:
    """`tree`'s leaves as ShapeDtypeStructs placed with `shardings` (one, or a matching tree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree
        )
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    devices = [jax.devices()[0]] if devices is None else list(devices)
    if not devices:
        raise ValueError("devices is empty: give at least one device (see target_devices)")
    return devices


def _check_size(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class _Program(NamedTuple):
    fn: Any  # a jitted function
    args: tuple  # abstract positional arguments (ShapeDtypeStructs, no shardings)
    static: dict  # static keyword arguments


class _Generation(NamedTuple):
    generate: _Program  # the whole loop, as jaxgpt.generate runs it
    decode_step: _Program  # one cached step (cache donated), greedy
    cache: Any  # the abstract KV cache the loop carries


def _generation_programs(cfg: GPTConfig, batch: int, prompt_len: int, max_new_tokens: int,
                         dtype: Any, platform: str = "cpu") -> _Generation:
    """Everything `aot` knows of `jaxgpt.generation`'s internals, in one place.

    `generate` pads prompts to a bucketed length, lays the weights out for the backend and the
    batch (`kv_cache.Layout.for_batch`, `kv_cache.prepare`, as `Generator.weights` does), then
    calls the jitted `generation._generate_jit`, which applies `GPTModel`; one decoding step is
    `GPTModel.apply` on a `KVCache` of `[B * H, S, Dh]` per layer.
    """
    from jaxgpt import generation, kv_cache
    from jaxgpt.model import GPTModel, param_shapes
    from jaxgpt.sampling import sampling_config

    sds = jax.ShapeDtypeStruct
    dtype = jnp.dtype(dtype)
    p = generation.bucket_length(min(prompt_len, cfg.context_length),
                                 generation._MIN_PROMPT_BUCKET, cap=cfg.context_length)
    new_slots = generation.bucket_length(max_new_tokens, generation._MIN_NEW_BUCKET)
    layout = kv_cache.Layout.for_batch(batch, platform)
    model = GPTModel(cfg, dtype=dtype, layout=layout)
    w = jax.eval_shape(lambda params: kv_cache.prepare(params, cfg, dtype, layout),
                       param_shapes(cfg))
    knobs = generation.Knobs(key=sds((2,), jnp.uint32), temperature=sds((), jnp.float32),
                             top_p=sds((), jnp.float32), eos_id=sds((), jnp.int32))
    generate = _Program(
        generation._generate_jit,
        (w, sds((batch, p), jnp.int32), sds((batch,), jnp.int32), sds((), jnp.int32), knobs),
        dict(model=model, new_slots=new_slots, sampling=sampling_config(0.0, None, None),
             use_cache=True),
    )
    slots = p + min(new_slots, cfg.context_length)  # what generation._start allocates
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, batch, slots, dtype))

    def step(w, cache, tokens, positions, slot):
        logits, cache = model.apply({"params": w}, tokens[:, None], positions=positions[:, None],
                                    cache=cache, slot=slot)  # [B, 1, V]
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache  # [B], cache

    vec = sds((batch,), jnp.int32)
    decode_step = _Program(jax.jit(step, donate_argnums=1),
                           (w, cache, vec, vec, sds((), jnp.int32)), {})
    return _Generation(generate, decode_step, cache)


def _platform(devices: Sequence[jax.Device]) -> str:
    """The backend name `kv_cache.Layout.for_batch` takes: "cpu", "gpu" or "tpu"."""
    platform = devices[0].platform
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def _lower(program: _Program, devices: Sequence[jax.Device]) -> jax.stages.Lowered:
    # Generation is not sharded: on several devices every input is replicated.
    mesh = sharding.make_mesh(devices)
    args = _abstract(program.args, NamedSharding(mesh, P()))
    return program.fn.lower(*args, **program.static)


def _lower_generation(which: str, cfg: GPTConfig, batch: int, prompt_len: int,
                      max_new_tokens: int, dtype: Any, devices) -> jax.stages.Lowered:
    """`lower_generate` and `lower_decode_step`: `which` program of `_Generation`, lowered for
    `devices` (the layouts follow their platform) after the sizes are checked."""
    sizes = [_check_size(v, name) for v, name in ((batch, "batch"), (prompt_len, "prompt_len"),
                                                  (max_new_tokens, "max_new_tokens"))]
    devices = _devices(devices)
    programs = _generation_programs(cfg, *sizes, dtype, _platform(devices))
    return _lower(getattr(programs, which), devices)


def lower_generate(
    cfg: GPTConfig,
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    dtype: Any = jnp.float32,
    devices: Sequence[jax.Device] | None = None,
) -> jax.stages.Lowered:
    """Lower the whole jitted generation (prefill, then the cached decoding loop) that
    `jaxgpt.generate(params, cfg, prompts, max_new_tokens, dtype=dtype)` runs, greedy, for
    `batch` prompts of `prompt_len` tokens, on `devices` (default: the first JAX device).

    Lengths are bucketed as `generate` buckets them, so this is the program `generate` would
    compile. Nothing is allocated; `.compile()` the result for its devices, or export it.
    """
    return _lower_generation("generate", cfg, batch, prompt_len, max_new_tokens, dtype,
                             devices)


def lower_decode_step(
    cfg: GPTConfig,
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    dtype: Any = jnp.float32,
    devices: Sequence[jax.Device] | None = None,
) -> jax.stages.Lowered:
    """Lower one cached decoding step (all blocks, head, greedy choice) with its KV cache
    donated, on the cache `lower_generate` with the same arguments allocates: what one token
    of the loop costs, as a program of its own."""
    return _lower_generation("decode_step", cfg, batch, prompt_len, max_new_tokens, dtype,
                             devices)


def cache_bytes(cfg: GPTConfig, *, batch: int, prompt_len: int, max_new_tokens: int,
                dtype: Any = jnp.float32) -> tuple[int, tuple[int, ...]]:
    """`(total bytes, shape of one layer's keys)` of the KV cache `lower_generate` allocates."""
    cache = _generation_programs(cfg, batch, prompt_len, max_new_tokens, dtype).cache
    leaves = jax.tree_util.tree_leaves(cache)
    return sum(a.size * a.dtype.itemsize for a in leaves), tuple(leaves[0].shape)


def weight_bytes(cfg: GPTConfig, dtype: Any = jnp.float32) -> tuple[int, int]:
    """`(all, read per decoding step)` bytes of the weights in compute `dtype` (LayerNorm
    parameters stay float32). A step reads every matrix, but of the two embedding tables only
    one row each, unless the head is the token embedding (tied)."""
    from jaxgpt.model import param_shapes

    itemsize = jnp.dtype(dtype).itemsize
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(cfg)):
        norm = any(getattr(k, "key", None) in ("scale", "shift") for k in path)
        total += leaf.size * (4 if norm else itemsize)
    tables = (cfg.vocab_size + cfg.context_length) * cfg.emb_dim * itemsize
    read = total - tables + 2 * cfg.emb_dim * itemsize
    if cfg.tie_embeddings:
        read += cfg.vocab_size * cfg.emb_dim * itemsize
    return total, read


def lower_train_step(
    cfg: GPTConfig,
    tc: Any,
    *,
    batch: int,
    seq_len: int,
    devices: Sequence[jax.Device] | None = None,
    fsdp: bool = False,
) -> jax.stages.Lowered:
    """Lower `jaxgpt.train.make_train_step(cfg, tc')` for a global batch `[batch, seq_len]` on a
    data mesh over `devices`, the state placed as `jaxgpt.train` places it (with `fsdp`,
    weights and AdamW moments split over the devices). `tc'` is `tc` with `batch_size`,
    `seq_len` and `fsdp` replaced. The state is donated, as in training."""
    from jaxgpt import train

    batch, seq_len = _check_size(batch, "batch"), _check_size(seq_len, "seq_len")
    if seq_len > cfg.context_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context_length "
                         f"{cfg.context_length}")
    tc = tc.replace(batch_size=batch, seq_len=seq_len, fsdp=bool(fsdp))
    mesh = sharding.make_mesh(_devices(devices))
    n = mesh.shape[sharding.DATA]
    if (batch // tc.grad_accum) % n:
        raise ValueError(f"the micro-batch (batch {batch} / grad_accum {tc.grad_accum}) must "
                         f"be divisible by the {n} devices")
    state = jax.eval_shape(lambda: train.init_train_state(cfg, tc))
    state_sh = sharding.tree_shardings(state, mesh, tc.fsdp)
    step = train.make_train_step(cfg, tc, mesh, state_sh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    return step.lower(_abstract(state, state_sh), (tokens, tokens), key)


# --- what a compiled program costs ----------------------------------------------------------------


def memory_stats(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Argument, output, alias and temp bytes per device from `memory_analysis()`, and `peak`:
    arguments + outputs - aliased + temporaries (what must fit in the device's memory)."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"])
    return out


def _cpu_cost(module: Any) -> dict[str, float]:
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)


def cost_stats(lowered: jax.stages.Lowered, compiled: jax.stages.Compiled) -> dict[str, float]:
    """`flops` and `bytes_accessed` of one run of the program, per device.

    From the target compiler's `cost_analysis()` where it has one (TPU, CPU). The GPU plugin
    returns None without a device; then XLA's HloCostAnalysis runs through the CPU client:
    bytes on the optimized GPU module (its fusions and library calls decide what touches
    memory), flops on the module before optimization (library GEMM calls carry no flop count).
    Loops count their body once. `bytes_accessed_hlo` is the CPU client's HloCostAnalysis of
    the optimized module for every target (the TPU compiler's own figure also counts traffic
    to and from on-chip memory).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    optimized = compiled.runtime_executable().hlo_modules()[0]
    # The same analysis for every target, for comparison (TPU's own counts on-chip traffic).
    try:
        hlo_bytes = float(_cpu_cost(optimized).get("bytes accessed", 0.0))
    except Exception:  # an instruction the CPU analysis does not know
        if not cost:
            raise
        hlo_bytes = None
    if cost:
        return {"flops": float(cost.get("flops", 0.0)),
                "bytes_accessed": float(cost.get("bytes accessed", 0.0)), "source": "target",
                "bytes_accessed_hlo": hlo_bytes}
    before = lowered.compiler_ir("hlo").as_hlo_module()
    return {"flops": float(_cpu_cost(before).get("flops", 0.0)), "bytes_accessed": hlo_bytes,
            "source": "HloCostAnalysis via the CPU client", "bytes_accessed_hlo": hlo_bytes}


# --- the optimized HLO text: loops, kernels, copies ----------------------------------------------

# Instructions that launch nothing: they name, regroup or reinterpret buffers.
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INST_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_SHAPE_RE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")


class Instruction(NamedTuple):
    name: str
    opcode: str
    shape: str  # the result's shape text, e.g. "bf16[12,24,64]{2,1,0}" or a tuple
    rest: str  # operands and attributes
    root: bool = False

    def operands(self) -> list[str]:
        head = self.rest.split(")", 1)[0]
        return re.findall(r"%([\w.\-]+)", head)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.rest)
        return m.group(1) if m else None

    def largest_array(self) -> int:
        """Elements of the largest array in the result's shape."""
        sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                 for _, dims in _SHAPE_RE.findall(self.shape)]
        return max(sizes, default=0)

    def label(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.rest)
        return m.group(1) if m else ""


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """The computations of an HLO module's text: `({name: instructions}, entry name)`."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        m = _COMP_RE.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INST_RE.match(line)
        if m:
            comps[current].append(
                Instruction(m.group(2), m.group(4), m.group(3), m.group(5), bool(m.group(1))))
    return comps, entry


def _launches(comps, name: str, seen: frozenset = frozenset()) -> list[Instruction]:
    """The instructions of computation `name` that run as kernels (or library calls), looking
    through calls (command buffers, async wrappers), not into fusions."""
    out = []
    for inst in comps.get(name, []):
        if inst.opcode in _FREE:
            continue
        callee = (inst.attr("to_apply") if inst.opcode == "call" else
                  inst.attr("calls") if inst.opcode.endswith("-start") else None)
        if callee in comps and callee not in seen:
            out += _launches(comps, callee, seen | {callee})
            continue
        if inst.opcode.endswith("-done") or inst.opcode.endswith("-update"):
            continue  # the second half of an async pair: counted at its start
        out.append(inst)
    return out


def _called(comps, name: str) -> list[str]:
    """Every computation reachable from `name` (fusions, calls, loops), `name` included."""
    todo, found = [name], []
    while todo:
        c = todo.pop()
        if c in found or c not in comps:
            continue
        found.append(c)
        for inst in comps[c]:
            todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)="
                               r"\{?%?([\w.\-]+)", inst.rest)
            m = re.search(r"branch_computations=\{([^}]*)\}", inst.rest)
            if m:
                todo += [b.strip().lstrip("%") for b in m.group(1).split(",")]
    return found


class LoopStats(NamedTuple):
    kernels_per_step: int  # launches in the loop body and its condition, per iteration
    kernels: list[tuple[str, str]]  # (opcode or fusion kind, op_name) of each launch
    cache_copies: list[str]  # writes of whole cache-sized arrays inside the loop (not updates)
    large_writes: list[str]  # other writes of arrays larger than the cache (e.g. weights)
    async_copies_per_step: int  # copy-start / slice-start (TPU: DMAs, e.g. to on-chip memory)
    loops: int  # while loops in the program
    # Writes of arrays larger than the cache into on-chip memory (memory space 1 in the layout:
    # TPU VMEM), apart from `large_writes`: XLA:TPU staging a weight for a matmul, not a copy
    # left in HBM.
    on_chip_writes: list[str]


_DMA = ("copy-start", "slice-start")


def _sizes(inst: Instruction) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            for _, dims in _SHAPE_RE.findall(inst.shape)]


def loop_stats(hlo_text: str, cache_elements: int) -> LoopStats:
    """Kernels per iteration of the decoding loop, and big arrays it writes whole.

    The decoding loop is the while loop whose body updates an array of at least
    `cache_elements` elements (one layer's keys) with a `dynamic-update-slice`: the cached step
    writes each token's keys and values into the cache. Kernels are the body's and
    condition's fusions, library calls (custom-calls) and every other instruction that is not
    free (parameters, tuples, bitcasts, constants) or an asynchronous copy (counted apart).
    A cache copy is a `copy`, `transpose` or `copy-start` (also inside a fusion) of an array
    of exactly `cache_elements` elements, or a launch that writes such an array other than by
    a dynamic-update-slice (which XLA runs in place). Launches that write larger arrays whole
    (e.g. a weight matrix re-laid out every step) are listed as `large_writes`.
    """
    comps, _ = parse_hlo(hlo_text)
    loops = [i for insts in comps.values() for i in insts if i.opcode == "while"]

    def writes_cache(body: str) -> bool:
        return any(i.opcode == "dynamic-update-slice" and i.largest_array() >= cache_elements
                   for c in _called(comps, body) for i in comps[c])

    decoding = [w for w in loops if writes_cache(w.attr("body"))]
    if not decoding:
        raise ValueError("no while loop in this program writes a cache-sized array")
    loop = decoding[0]
    body, cond = loop.attr("body"), loop.attr("condition")
    launches = _launches(comps, body) + _launches(comps, cond)
    dmas = [i for i in launches if i.opcode in _DMA]
    launches = [i for i in launches if i.opcode not in _DMA]
    kernels = []
    for inst in launches:
        kind = inst.opcode
        if kind == "fusion":
            kind = f"fusion:{inst.attr('kind') or ''}"
        elif kind == "custom-call":
            m = re.search(r'custom_call_target="([^"]*)"', inst.rest)
            kind = f"custom-call:{m.group(1) if m else ''}"
        kernels.append((kind, inst.label()))

    def describe(i: Instruction) -> str:
        return f"{i.opcode} {i.name} {i.shape.split('{')[0]}"

    inside = [i for c in _called(comps, body) + _called(comps, cond) for i in comps[c]]
    copies = [describe(i) for i in inside
              if i.opcode in ("copy", "transpose", "copy-start") and cache_elements in _sizes(i)]
    large, on_chip = [], []
    for i in launches + dmas:
        if (i.opcode == "slice-start"  # its shape names the source; it writes only a slice
                or i.largest_array() < cache_elements
                or _only_updates(comps, i, cache_elements)):
            continue
        if cache_elements in _sizes(i):
            copies.append(describe(i))
        else:
            (on_chip if _ON_CHIP_RE.match(i.shape) else large).append(describe(i))
    return LoopStats(len(launches), kernels, sorted(set(copies)), sorted(set(large)), len(dmas),
                     len(loops), sorted(set(on_chip)))


# A result (the first array of a tuple) whose layout puts it in memory space 1, e.g.
# `bf16[768,2304]{1,0:T(8,128)(2,1)S(1)}`.
_ON_CHIP_RE = re.compile(r"^\(?[a-z]+\d*\[[\d,]*\]\{[^}]*S\(1\)\}")


def _only_updates(comps, inst: Instruction, cache_elements: int) -> bool:
    """Whether every cache-sized result of `inst` is a dynamic-update-slice (which XLA runs in
    place), looking through a fusion's root tuple and bitcasts."""
    if inst.opcode == "dynamic-update-slice":
        return True
    if inst.opcode != "fusion":
        return False
    insts = {i.name: i for i in comps.get(inst.attr("calls"), [])}
    roots = [i for i in insts.values() if i.root]
    todo = [r.name for r in roots]
    while todo:
        i = insts.get(todo.pop())
        if i is None or i.largest_array() < cache_elements:
            continue
        if i.opcode in ("tuple", "bitcast"):
            todo += i.operands()
        elif i.opcode != "dynamic-update-slice":
            return False
    return True
