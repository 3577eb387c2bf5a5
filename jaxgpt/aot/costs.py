"""What a compiled program costs: memory per device, flops and bytes accessed."""

from __future__ import annotations

from typing import Any

import jax


def memory_stats(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Argument, output, alias and temp bytes per device from `memory_analysis()`, and `peak`:
    arguments + outputs - aliased + temporaries (what must fit in the device's memory)."""
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("the compiled program has no memory analysis on this backend")
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


def cost_stats(lowered: jax.stages.Lowered,
               compiled: jax.stages.Compiled) -> dict[str, float | str | None]:
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
    executable: Any = compiled.runtime_executable()
    optimized = executable.hlo_modules()[0]
    # The same analysis for every target, for comparison (TPU's own counts on-chip traffic).
    try:
        hlo_bytes: float | None = float(_cpu_cost(optimized).get("bytes accessed", 0.0))
    except Exception:  # an instruction the CPU analysis does not know
        if not cost:
            raise
        hlo_bytes = None
    if cost:
        return {"flops": float(cost.get("flops", 0.0)),
                "bytes_accessed": float(cost.get("bytes accessed", 0.0)), "source": "target",
                "bytes_accessed_hlo": hlo_bytes}
    ir: Any = lowered.compiler_ir("hlo")
    before = ir.as_hlo_module()
    return {"flops": float(_cpu_cost(before).get("flops", 0.0)), "bytes_accessed": hlo_bytes,
            "source": "HloCostAnalysis via the CPU client", "bytes_accessed_hlo": hlo_bytes}

