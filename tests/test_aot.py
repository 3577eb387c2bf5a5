"""Compiling for an H100 and a TPU v5e without either (`jaxgpt.aot`): the tiny config's
generation loop and train step compile, the cache is donated and never copied inside the
loop, the loop's kernel count stays bounded, and FSDP on 4 TPU chips all-gathers.

The targets need `jax-cuda12-plugin`/`jax-cuda12-pjrt` and `libtpu` (the `test` extra). Outside
CI a missing plugin skips these tests; under CI=true it fails them.
"""

import math
import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax._src import xla_bridge

from jaxgpt import aot
from jaxgpt.aot import targets
from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
from jaxgpt.inference.decode import DECODE_CHUNK
from jaxgpt.nn import count_params, layer_norm, param_shapes
from jaxgpt.training.config import TrainConfig

# The CUDA plugin can only give compile-only devices while JAX's backends are limited to the
# CPU (otherwise it tries to open a GPU). CI and the README run the suite with
# JAX_PLATFORMS=cpu; a bare `pytest` gets the same here, before any test starts a backend.
if not os.environ.get("JAX_PLATFORMS") and not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")

TARGETS = ["h100", "tpu-v5e"]
SIZES = dict(batch=2, prompt_len=8, max_new_tokens=16, dtype=jnp.bfloat16)
# Kernels per decoding step of the tiny config at B=2, as the pinned jax compiles the chunked
# loop (the 1-, 2- and 3-layer loops): (per block, the rest: embedding, head, greedy choice,
# the step's activity and the loops' counters). TPU v5e also counts its scalar-unit
# instructions. With one step per EOS check (chunk_steps=0) the rest is 11 and 38.
KERNELS = {"h100": (12, 12), "tpu-v5e": (21, 41)}
# Less than the n_layers = 2 kernels that one more unfused op (or a cache copy) in every block
# adds, so that fails; one kernel more or fewer outside the blocks does not.
SLACK = 1
# The loop's kernels that XLA adds itself (no op_name), by kind: XLA:TPU moves the loop counter
# to its scalar memory (a copy) and stages a [B*H, Dh] array of each block in on-chip memory
# (a reshape); XLA:GPU adds none.
UNNAMED = {"h100": lambda n: [], "tpu-v5e": lambda n: ["copy"] + ["reshape"] * n}


def _devices(target, count=1):
    try:
        return aot.target_devices(target, count)
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the {target} plugin: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def compiled_generation(request):
    cache = {}

    def get(target, tiny):
        if target not in cache:
            cfg = GPTConfig(**tiny)
            devices = _devices(target)
            gen = aot.lower_generate(cfg, devices=devices, **SIZES).compile()
            step = aot.lower_decode_step(cfg, devices=devices, **SIZES)
            cache[target] = (cfg, gen, step, step.compile())
        return cache[target]

    return get


def test_target_devices_rejects_unknown_names_and_bad_counts():
    with pytest.raises(ValueError, match="unknown target 'h1000'.*h100, h200, a100"):
        aot.target_devices("h1000")
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="count must be an int >= 1"):
            aot.target_devices("cpu", bad)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        aot.target_devices("cpu", len(jax.devices("cpu")) + 1)
    assert aot.target_devices("cpu") == jax.devices("cpu")[:1]


def test_a_missing_plugin_names_the_pip_packages(monkeypatch):
    import importlib.metadata
    import importlib.util

    real_find, real_version = importlib.util.find_spec, importlib.metadata.version

    def find_spec(name, *args):
        return None if name == "jax_plugins.xla_cuda12" else real_find(name, *args)

    def version(name):
        if name == "libtpu":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "version", version)
    targets._topology_devices.cache_clear()
    try:
        v = jax.__version__
        with pytest.raises(ImportError, match=f"jax-cuda12-plugin=={v} jax-cuda12-pjrt=={v}"):
            aot.target_devices("a100", 3)
        with pytest.raises(ImportError, match=rf"jax\[tpu\]=={v}.*libtpu"):
            aot.target_devices("tpu-v6e", 3)
    finally:
        targets._topology_devices.cache_clear()


def test_under_ci_a_missing_plugin_fails_instead_of_skipping(monkeypatch):
    def missing(name, count=1):
        raise ImportError(f"no plugin for {name}")

    monkeypatch.setattr(aot, "target_devices", missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have the h100 plugin"):
        _devices("h100")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no plugin for h100"):
        _devices("h100")


def test_target_info_reads_memory_and_bandwidth_from_the_shipped_configs():
    h100 = aot.target_info("h100")
    assert h100.platform == "cuda" and h100.memory_bytes == 84942979072
    assert h100.bandwidth_bytes_per_s == pytest.approx(3.35e12, rel=1e-3)
    assert aot.target_info("a100").memory_bytes > 80e9
    assert aot.target_info("tpu-v5e").memory_bytes == 16 * 2**30


def test_weight_and_cache_bytes_of_124m():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    total, read = aot.weight_bytes(cfg, jnp.bfloat16)
    # 163,009,536 parameters; LayerNorm's 2 * 768 * 25 stay float32 (4 bytes).
    norms = 2 * 768 * (2 * 12 + 1)
    assert total == 2 * (163_009_536 - norms) + 4 * norms
    # A step reads one row of each embedding table, not the tables.
    assert read == total - 2 * (50257 + 1024 - 2) * 768
    nbytes, shape = aot.cache_bytes(cfg, batch=1, prompt_len=8, max_new_tokens=200,
                                    dtype=jnp.bfloat16)
    assert shape == (12, 8 + 256, 64)  # [B * H, P + bucketed new tokens, Dh]
    # keys and values of 12 layers in bf16, and each slot's position (int32 [B, S])
    assert nbytes == 2 * 12 * 2 * math.prod(shape) + 4 * (8 + 256)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_generation_loop_compiles_without_cache_copies_and_few_kernels(
    target, compiled_generation, tiny_dict
):
    cfg, gen, _, _ = compiled_generation(target, tiny_dict)
    _, layer = aot.cache_bytes(cfg, **SIZES)
    loop = aot.loop_stats(gen.as_text(), math.prod(layer))
    assert loop.cache_copies == []
    per_block, rest = KERNELS[target]
    assert abs(loop.kernels_per_step - (cfg.n_layers * per_block + rest)) <= SLACK, loop.kernels
    # Every kernel is the decoding loop's own (JAX names its ops `.../while/body/...`), or one
    # of those XLA adds, counted exactly: an unnamed copy more is not let through.
    assert all("/while/" in name for _, name in loop.kernels if name), loop.kernels
    assert sorted(k for k, name in loop.kernels if not name) == UNNAMED[target](cfg.n_layers)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_decode_step_donates_the_cache(target, compiled_generation, tiny_dict):
    cfg, _, lowered, step = compiled_generation(target, tiny_dict)
    cache_total, _ = aot.cache_bytes(cfg, **SIZES)
    mem = aot.memory_stats(step)
    # Every cache buffer is an input aliased to an output (TPU pads layouts: >=).
    assert mem["alias_bytes"] >= cache_total
    cost = aot.cost_stats(lowered, step)
    _, read = aot.weight_bytes(cfg, SIZES["dtype"])
    assert cost["flops"] > 0
    assert cost["bytes_accessed"] >= read  # a step reads every weight matrix at least once


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_loop_stats_finds_a_cache_copy_in_a_loop(target):
    """Positive control of the copy check: a loop that updates its cache and also carries the
    cache as it was, so the update cannot happen in place (XLA copies the cache each step);
    and the same copy made between chunks, outside the inner loop that holds the step."""
    devices = _devices(target)
    shape = (8, 64, 16)

    def f(cache, x):  # cache [8, 64, 16], x [8, 16]
        def body(c):
            i, cache, _ = c
            new = lax.dynamic_update_slice(cache, x[:, None, :] * i.astype(x.dtype), (0, i, 0))
            return i + 1, new, cache

        return lax.while_loop(lambda c: c[0] < 64, body, (0, cache, cache))[1:]

    sh = jax.sharding.SingleDeviceSharding(devices[0])
    args = (jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh),
            jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sh))
    text = jax.jit(f).lower(*args).compile().as_text()
    assert aot.loop_stats(text, math.prod(shape)).cache_copies

    def chunked(cache, x):  # the same copy, made between chunks of 4 in-place updates
        def step(i, c):
            return lax.dynamic_update_slice(c, x[:, None, :] * i.astype(x.dtype), (0, i, 0))

        def chunk(c):
            i, cache, _ = c
            return i + 4, lax.fori_loop(i, i + 4, step, cache), cache

        return lax.while_loop(lambda c: c[0] < 64, chunk, (0, cache, cache))[1:]

    text = jax.jit(chunked).lower(*args).compile().as_text()
    loop = aot.loop_stats(text, math.prod(shape))
    assert loop.loops == 2 and loop.cache_copies


@pytest.mark.slow
def test_one_row_layernorm_takes_fewer_gpu_kernels_in_one_pass():
    """Why `Layout.for_batch(1, "gpu")` sets `one_pass_norm`: XLA:GPU runs the book's
    LayerNorm of one row as two reductions and the normalisation (3 kernels), the one-pass
    statistics as one reduction and the normalisation (2); of two rows or more, the book's
    form is a single kernel, so there it keeps the book's form."""
    sh = jax.sharding.SingleDeviceSharding(_devices("h100")[0])

    def kernels(rows, one_pass):
        def norm(x, scale, shift):  # x [rows, 768] bf16
            return layer_norm(x, scale, shift, dtype=jnp.bfloat16, one_pass=one_pass)

        vec = jax.ShapeDtypeStruct((768,), jnp.float32, sharding=sh)
        x = jax.ShapeDtypeStruct((rows, 768), jnp.bfloat16, sharding=sh)
        comps, entry = aot.parse_hlo(jax.jit(norm).lower(x, vec, vec).compile().as_text())
        return len(aot.launches(comps, entry))

    assert (kernels(1, False), kernels(1, True)) == (3, 2)
    assert kernels(2, False) == 1


def test_loop_stats_tells_on_chip_staging_from_large_writes():
    """A weight staged into on-chip memory (layout memory space 1, as XLA:TPU writes it before
    a matmul) is not counted as a weight rewritten in HBM; the same write without S(1) is."""
    tup = "(s32[], f32[8,64,16], f32[128,512])"

    def module(layout):
        return "\n".join([
            f"body (p: {tup}) -> {tup} {{",
            f"  %p = {tup} parameter(0)",
            "  %c = f32[8,64,16]{2,1,0} get-tuple-element(%p), index=1",
            "  %w = f32[128,512]{1,0} get-tuple-element(%p), index=2",
            "  %u = f32[8,1,16]{2,1,0} constant({...})",
            "  %i = s32[] get-tuple-element(%p), index=0",
            "  %z = s32[] constant(0)",
            "  %d = f32[8,64,16]{2,1,0} dynamic-update-slice(%c, %u, %z, %i, %z)",
            f"  %s = f32[128,512]{{{layout}}} custom-call(%w), custom_call_target=\"Stage\"",
            f"  ROOT %t = {tup} tuple(%i, %d, %w)",
            "}",
            f"cond (p: {tup}) -> pred[] {{",
            f"  %p = {tup} parameter(0)",
            "  ROOT %k = pred[] constant(true)",
            "}",
            f"ENTRY main (a: {tup}) -> {tup} {{",
            f"  %a = {tup} parameter(0)",
            f"  ROOT %w = {tup} while(%a), condition=cond, body=body",
            "}",
        ])

    hbm = aot.loop_stats(module("1,0"), 8 * 64 * 16)
    vmem = aot.loop_stats(module("1,0:T(8,128)S(1)"), 8 * 64 * 16)
    assert (len(hbm.large_writes), len(hbm.on_chip_writes)) == (1, 0)
    assert (len(vmem.large_writes), len(vmem.on_chip_writes)) == (0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_train_step_compiles_with_its_state_donated(target, tiny_cfg):
    devices = _devices(target)
    tc = TrainConfig(loss_chunk=5)
    lowered = aot.lower_train_step(tiny_cfg, tc, batch=4, seq_len=8, devices=devices)
    mem = aot.memory_stats(lowered.compile())
    params = 4 * count_params(param_shapes(tiny_cfg))
    # Params and both AdamW moments are updated in place: 3x the float32 parameters.
    assert mem["alias_bytes"] >= 3 * params


@pytest.mark.slow
def test_attention_remat_keeps_the_attention_arrays_out_of_the_train_steps_memory():
    # T = 128 makes one layer's [B, H, T, T] float32 array (1 MiB) far larger than its
    # [B, T, D] activations (64 KiB), as at 124M and T = 1024.
    cfg = GPTConfig(vocab_size=100, context_length=128, emb_dim=32, n_heads=4, n_layers=4,
                    drop_rate=0.1, qkv_bias=False)
    b, t, h = 4, 128, cfg.n_heads
    devices = _devices("h100")
    stats = {}
    for remat in ("none", "attention"):
        lowered = aot.lower_train_step(cfg, TrainConfig(remat=remat), batch=b, seq_len=t,
                                       devices=devices)
        compiled = lowered.compile()
        stats[remat] = (aot.memory_stats(compiled)["temp_bytes"],
                        aot.cost_stats(lowered, compiled)["flops"])
    (temp_none, flops_none), (temp_att, flops_att) = stats["none"], stats["attention"]
    scores = b * h * t * t * 4  # bytes of one layer's float32 [B, H, T, T]
    # Without remat every layer's softmax weights live from its forward pass to its backward
    # pass (the gradient of the values needs them), so all n_layers are held at once when the
    # backward pass starts; with the policy none outlives its layer's forward pass, and the
    # backward pass recomputes one layer's at a time: at least n_layers - 1 of them fewer.
    assert temp_att <= temp_none - (cfg.n_layers - 1) * scores, stats
    # And the recomputation is in the program: at least the two batched attention matmuls
    # (scores and context, 2 * B * H * T * T * Dh flops each) once more per layer.
    dh = cfg.emb_dim // h
    assert flops_att >= flops_none + cfg.n_layers * 2 * (2 * b * h * t * t * dh), stats


@pytest.mark.slow
def test_fsdp_train_step_on_4_tpu_chips_all_gathers_its_weights(tiny_cfg):
    devices = _devices("tpu-v5e", 4)
    assert len(devices) == 4
    texts = {}
    for fsdp in (False, True):
        lowered = aot.lower_train_step(tiny_cfg, TrainConfig(), batch=8, seq_len=8,
                                       devices=devices, fsdp=fsdp)
        texts[fsdp] = lowered.compile().as_text()
    # FSDP gathers each split weight matrix before use (the gradients come back through
    # all-reduces or reduce-scatters, as XLA chooses); data parallel only all-reduces.
    gathers = len(re.findall(r"\ball-gather(?:-start)?\(", texts[True]))
    assert gathers >= tiny_cfg.n_layers * 6  # 6 matrices per block: Q, K, V, out, fc, proj
    assert "all-gather" not in texts[False]  # the weights are replicated
    assert "all-reduce" in texts[False]


def test_lower_functions_reject_bad_sizes(tiny_cfg):
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        aot.lower_generate(tiny_cfg, batch=0, prompt_len=4, max_new_tokens=4)
    with pytest.raises(ValueError, match="seq_len 17 exceeds the model's context_length 16"):
        aot.lower_train_step(tiny_cfg, TrainConfig(), batch=1, seq_len=17)
    with pytest.raises(ValueError, match="devices is empty"):
        aot.lower_decode_step(tiny_cfg, batch=1, prompt_len=4, max_new_tokens=4, devices=[])


@pytest.mark.slow
def test_the_decoding_step_runs_in_a_loop_of_known_trip_count_on_h100(tiny_cfg, tiny_dict,
                                                                     compiled_generation):
    """`generate`'s cached steps run `chunk_steps` at a time: XLA:GPU knows the inner loop's
    trip count (`known_trip_count`), so it runs a chunk without reading the condition back to
    the host after every step. `loop_stats` reads it off the loop that holds the step (its
    kernels include the output head), not the loop around it that checks for EOS.

    Controls: with one step per check (`chunk_steps=0`) the same reader finds no trip count,
    and on a plain function a `fori_loop` has one where a data-dependent `while_loop` has not,
    so a change in how XLA writes the annotation cannot make this pass vacuously."""
    devices = _devices("h100")
    sizes = dict(SIZES, devices=devices)
    _, layer = aot.cache_bytes(tiny_cfg, **SIZES)

    def decoding_loop(chunk_steps):
        text = aot.lower_generate(tiny_cfg, chunk_steps=chunk_steps, **sizes).compile().as_text()
        return aot.loop_stats(text, math.prod(layer))

    # The chunked loop (chunk_steps=8, the default) is the one the module already compiled.
    assert DECODE_CHUNK == 8
    _, gen, _, _ = compiled_generation("h100", tiny_dict)
    chunked, plain = aot.loop_stats(gen.as_text(), math.prod(layer)), decoding_loop(0)
    assert chunked.trip_count == 8
    assert any("out_head" in name for _, name in chunked.kernels)
    assert all("/while/body/while/" in name for _, name in chunked.kernels if name)
    assert plain.trip_count is None
    assert any("out_head" in name for _, name in plain.kernels)
    per_block, rest = KERNELS["h100"]
    assert abs(chunked.kernels_per_step - (tiny_cfg.n_layers * per_block + rest)) <= SLACK

    sh = jax.sharding.SingleDeviceSharding(devices[0])
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sh)

    def trip(loop_fn):
        comps, _ = aot.parse_hlo(jax.jit(loop_fn).lower(x).compile().as_text())
        loops = [i for insts in comps.values() for i in insts if i.opcode == "while"]
        assert len(loops) == 1
        return aot.trip_count(loops[0])

    def known(x):
        return lax.fori_loop(0, 5, lambda i, y: jnp.sin(y) * i, x)

    def unknown(x):
        return lax.while_loop(lambda y: y.sum() < 100.0, lambda y: y * 2.0 + 1.0, x)

    assert (trip(known), trip(unknown)) == (5, None)


# Loads libtpu (for a TPU v5e target) and holds it until its stdin closes.
_LOAD_LIBTPU = ("import sys; from jaxgpt import aot; aot.target_devices('tpu-v5e'); "
                "print('loaded', flush=True); sys.stdin.read()")


@pytest.mark.slow
def test_the_suite_loads_libtpu_while_another_process_holds_its_lock():
    """Two suites side by side (or a suite beside a TPU program): libtpu lets one process at a
    time load it (/tmp/libtpu_lockfile) unless ALLOW_MULTIPLE_LIBTPU_LOAD is set, as conftest
    sets it for the run and the processes it starts."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(aot.__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    alone = {**env, "ALLOW_MULTIPLE_LIBTPU_LOAD": "0"}
    holder = subprocess.Popen([sys.executable, "-c", _LOAD_LIBTPU], env=alone, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        assert holder.stdout.readline() == "loaded\n"

        def load(env):
            return subprocess.run([sys.executable, "-c", _LOAD_LIBTPU], env=env, input="",
                                  capture_output=True, text=True, timeout=300)

        blocked = load(alone)  # the control: without the setting, the lock stops it
        assert blocked.returncode != 0 and "libtpu_lockfile" in blocked.stderr, blocked.stderr
        ours = load(env)
        assert ours.returncode == 0 and ours.stdout == "loaded\n", ours.stderr[-3000:]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
