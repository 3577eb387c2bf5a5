"""Reading optimized HLO text: computations, kernel launches, and the decoding loop's cost.

`loop_stats` finds the decoding loop (the innermost while loop whose body writes a cache-sized
array in place: the one that holds the decoding step) and counts the kernels one iteration
launches and the large arrays it writes whole, and reads its trip count where XLA knows it.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

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


Computations = dict[str, list[Instruction]]  # computation name -> its instructions


def parse_hlo(text: str) -> tuple[Computations, str]:
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


def launches(comps: Computations, name: str | None,
             seen: frozenset = frozenset()) -> list[Instruction]:
    """The instructions of computation `name` that run as kernels (or library calls), looking
    through calls (command buffers, async wrappers), not into fusions."""
    out: list[Instruction] = []
    for inst in comps.get(name or "", []):
        if inst.opcode in _FREE:
            continue
        callee = (inst.attr("to_apply") if inst.opcode == "call" else
                  inst.attr("calls") if inst.opcode.endswith("-start") else None)
        if callee is not None and callee in comps and callee not in seen:
            out += launches(comps, callee, seen | {callee})
            continue
        if inst.opcode.endswith("-done") or inst.opcode.endswith("-update"):
            continue  # the second half of an async pair: counted at its start
        out.append(inst)
    return out


def _called(comps: Computations, name: str | None) -> list[str]:
    """Every computation reachable from `name` (fusions, calls, loops), `name` included."""
    todo: list[str | None] = [name]
    found: list[str] = []
    while todo:
        c = todo.pop()
        if c is None or c in found or c not in comps:
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
    # The loop's trip count as XLA knows it when compiling (`known_trip_count` in its backend
    # config), or None: a loop of unknown length reads its condition back on a GPU each time.
    trip_count: int | None = None


def trip_count(loop: Instruction) -> int | None:
    """The `known_trip_count` XLA put in a while loop's backend config, or None."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.rest)
    return int(m.group(1)) if m else None


_DMA = ("copy-start", "slice-start")


def _sizes(inst: Instruction) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            for _, dims in _SHAPE_RE.findall(inst.shape)]


def loop_stats(hlo_text: str, cache_elements: int) -> LoopStats:
    """Kernels per iteration of the decoding loop, and big arrays it writes whole.

    The decoding loop is the while loop whose body updates an array of at least
    `cache_elements` elements (one layer's keys) with a `dynamic-update-slice` (the cached step
    writes each token's keys and values into the cache) and holds no other such loop: with
    the steps in chunks, the inner loop of a chunk, not the one around it. Kernels are the
    body's and condition's fusions, library calls (custom-calls) and every other instruction
    that is not free (parameters, tuples, bitcasts, constants) or an asynchronous copy
    (counted apart).
    A cache copy is a `copy`, `transpose` or `copy-start` (also inside a fusion) of an array
    of exactly `cache_elements` elements anywhere in the loops that write the cache (the
    chunk's and the one around it), or a launch of the step that writes such an array other
    than by a dynamic-update-slice (which XLA runs in place). Launches that write larger
    arrays whole (e.g. a weight matrix re-laid out every step) are listed as `large_writes`.
    """
    comps, _ = parse_hlo(hlo_text)
    loops = [i for insts in comps.values() for i in insts if i.opcode == "while"]

    def writes_cache(body: str | None) -> bool:
        return any(i.opcode == "dynamic-update-slice" and i.largest_array() >= cache_elements
                   for c in _called(comps, body) for i in comps[c])

    decoding = [w for w in loops if writes_cache(w.attr("body"))]
    if not decoding:
        raise ValueError("no while loop in this program writes a cache-sized array")
    bodies = {w.attr("body") for w in decoding}
    innermost = [w for w in decoding
                 if not bodies & set(_called(comps, w.attr("body"))[1:])]
    loop = innermost[0]
    body, cond = loop.attr("body"), loop.attr("condition")
    found = launches(comps, body) + launches(comps, cond)
    dmas = [i for i in found if i.opcode in _DMA]
    kernels_run = [i for i in found if i.opcode not in _DMA]
    kernels = []
    for inst in kernels_run:
        kind = inst.opcode
        if kind == "fusion":
            kind = f"fusion:{inst.attr('kind') or ''}"
        elif kind == "custom-call":
            m = re.search(r'custom_call_target="([^"]*)"', inst.rest)
            kind = f"custom-call:{m.group(1) if m else ''}"
        kernels.append((kind, inst.label()))

    def describe(i: Instruction) -> str:
        return f"{i.opcode} {i.name} {i.shape.split('{')[0]}"

    # Copies anywhere in the loops that carry the cache (with chunks, also between them).
    around = {c for w in decoding for part in ("body", "condition")
              for c in _called(comps, w.attr(part))}
    inside = [i for c in sorted(around) for i in comps[c]]
    copies = [describe(i) for i in inside
              if i.opcode in ("copy", "transpose", "copy-start") and cache_elements in _sizes(i)]
    large: list[str] = []
    on_chip: list[str] = []
    for i in kernels_run + dmas:
        if (i.opcode == "slice-start"  # its shape names the source; it writes only a slice
                or i.largest_array() < cache_elements
                or _only_updates(comps, i, cache_elements)):
            continue
        if cache_elements in _sizes(i):
            copies.append(describe(i))
        else:
            (on_chip if _ON_CHIP_RE.match(i.shape) else large).append(describe(i))
    return LoopStats(len(kernels_run), kernels, sorted(set(copies)), sorted(set(large)), len(dmas),
                     len(loops), sorted(set(on_chip)), trip_count(loop))


# A result (the first array of a tuple) whose layout puts it in memory space 1, e.g.
# `bf16[768,2304]{1,0:T(8,128)(2,1)S(1)}`.
_ON_CHIP_RE = re.compile(r"^\(?[a-z]+\d*\[[\d,]*\]\{[^}]*S\(1\)\}")


def _only_updates(comps: Computations, inst: Instruction, cache_elements: int) -> bool:
    """Whether every cache-sized result of `inst` is a dynamic-update-slice (which XLA runs in
    place), looking through a fusion's root tuple and bitcasts."""
    if inst.opcode == "dynamic-update-slice":
        return True
    if inst.opcode != "fusion":
        return False
    insts = {i.name: i for i in comps.get(inst.attr("calls") or "", [])}
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
