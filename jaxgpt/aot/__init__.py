"""Compiling for accelerators without the hardware, and reading what it costs.

    devices = target_devices("h100")                       # compile-only, no GPU needed
    lowered = lower_generate(cfg, batch=1, prompt_len=8, max_new_tokens=128,
                             dtype=jnp.bfloat16, devices=devices)
    compiled = lowered.compile()                           # XLA:GPU, on this CPU
    memory_stats(compiled), loop_stats(compiled.as_text(), cache_elements)

- `targets`: compile-only devices ("h100", "h200", "a100", "tpu-v5e", "tpu-v6e", "cpu").
- `lowering`: `lower_generate`, `lower_decode_step`, `lower_train_step`, byte counts.
- `costs`: `memory_stats`, `cost_stats`; `hlo`: `parse_hlo`, `loop_stats`, `trip_count`.
"""

from jaxgpt.aot.costs import cost_stats, memory_stats
from jaxgpt.aot.hlo import Instruction, LoopStats, launches, loop_stats, parse_hlo, trip_count
from jaxgpt.aot.lowering import (
    cache_bytes,
    lower_decode_step,
    lower_generate,
    lower_train_step,
    platform_of,
    weight_bytes,
)
from jaxgpt.aot.targets import TARGETS, TargetInfo, target_devices, target_info

__all__ = [
    "TARGETS",
    "Instruction",
    "LoopStats",
    "TargetInfo",
    "cache_bytes",
    "cost_stats",
    "launches",
    "loop_stats",
    "lower_decode_step",
    "lower_generate",
    "lower_train_step",
    "memory_stats",
    "parse_hlo",
    "platform_of",
    "target_devices",
    "target_info",
    "trip_count",
    "weight_bytes",
]
