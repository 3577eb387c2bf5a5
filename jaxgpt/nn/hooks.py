"""Hook points: every activation of the model by name, to read (cache) or to change (hooks).

Each module of the model passes its activations through `hook_point(self, table, name, x)`.
The names are TransformerLens's for GPT-2 (`blocks.3.attn.hook_pattern`), so its notebooks
port. One table (`BLOCK`, `BEFORE_BLOCKS`, `AFTER_BLOCKS`: each part's TransformerLens prefix,
Flax module and points in forward order, with their shapes) is the only list of them:
`hook_names`, `module_path`, the cache's short names and the patching kinds derive from it,
and `hook_point` refuses a name it does not hold.

`GPTModel` carries a `HookTable`, a static, hashable module field that it hands down to its
blocks and their parts; an empty table (the default) returns at trace time, so a model without
hooks traces exactly the program it traced before hooks existed.

A hook is `fn(activation, name) -> activation`, a pure JAX function. Two ways to give its
arrays (a steering vector, a clean activation) to the model:

- bound: the function as it is, arrays and all, in the table (`hook_table`): a module field,
  so a new function is a new model and compiles anew. Training with hooks uses this.
- free: a hook that is a pytree (`jax.tree_util.Partial(fn, vector)`, or the makers in
  `jaxgpt.interp.interventions`) keeps only its structure in the table (`free_hooks`); its
  arrays ride in the params, beside the parameters of the module that holds the hook point
  (`params[...][HOOK_ARGS]`). The compiled program takes them as arguments, so a new vector
  of the same shape reuses it. `run_with_hooks`, `generate` and `generate_text_simple` do this.

A hook may also show values it computes on the way (an SAE spliced in, `jaxgpt.sae.splice`,
shows its feature activations): it lists their names in `value_names`, and its method
`with_values(x, name) -> (x, {value name: array})` is what runs when the table caches one of
them, under `<point>.<value name>` (`blocks.6.hook_resid_pre.hook_sae_acts_post`). A table
that caches none calls the hook as usual.

Shapes: B batch, T tokens (queries), S key slots, D emb_dim, H heads, Dh head_dim.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig

# Where a module's params hold the arrays of its free hooks: `{local name: [leaves, ...]}`.
HOOK_ARGS = "hook_args"


class Point(NamedTuple):
    """A hook point: its local name, and the axes of what a hook there sees (S: key slots,
    T without a cache; 4D: the feed-forward width)."""

    name: str
    shape: str


class Part(NamedTuple):
    """A module that holds hook points: its TransformerLens prefix, its Flax module name, and
    its points (and parts) in the order the forward pass reaches them."""

    prefix: str
    module: str
    points: tuple[Point | Part, ...]


# The one table of hook points: every name, part, module path, short name and patching kind
# is derived from it, and tests/test_hooks.py holds the model's `hook_point` calls to it.
_NORM = (Point("hook_scale", "B T 1"), Point("hook_normalized", "B T D"))  # before scale/shift
BLOCK = Part("blocks", "trf_blocks", (  # block i: TransformerLens's `blocks.{i}`, Flax's `_{i}`
    Point("hook_resid_pre", "B T D"),
    Part("ln1", "norm1", _NORM),
    Part("attn", "att", (Point("hook_q", "B T H Dh"), Point("hook_k", "B T H Dh"),
                         Point("hook_v", "B T H Dh"), Point("hook_attn_scores", "B H T S"),
                         Point("hook_pattern", "B H T S"), Point("hook_z", "B T H Dh"))),
    Point("hook_attn_out", "B T D"),
    Point("hook_resid_mid", "B T D"),
    Part("ln2", "norm2", _NORM),
    Part("mlp", "ff", (Point("hook_pre", "B T 4D"), Point("hook_post", "B T 4D"))),  # GELU's
    Point("hook_mlp_out", "B T D"),
    Point("hook_resid_post", "B T D"),
))
BEFORE_BLOCKS = (Point("hook_embed", "B T D"), Point("hook_pos_embed", "B T D"))
AFTER_BLOCKS = (Part("ln_final", "final_norm", _NORM),)


def _flat(entries: Sequence[Point | Part]) -> tuple[tuple[str, Point], ...]:
    """`(name relative to these entries, point)` of every point below them, in order."""
    out: list[tuple[str, Point]] = []
    for entry in entries:
        if isinstance(entry, Part):
            out += [(f"{entry.prefix}.{name}", point) for name, point in _flat(entry.points)]
        else:
            out.append((entry.name, entry))
    return tuple(out)


def block_points() -> tuple[tuple[str, Point], ...]:
    """A block's hook points in forward order, named within the block (`attn.hook_q`)."""
    return _flat(BLOCK.points)


def outer_points() -> tuple[tuple[str, Point], ...]:
    """The hook points outside the blocks: the embeddings' and the final LayerNorm's."""
    return _flat((*BEFORE_BLOCKS, *AFTER_BLOCKS))


def hook_points(cfg: GPTConfig) -> tuple[tuple[str, Point], ...]:
    """`(name, point)` of every hook point of `GPTModel(cfg)`, in forward order."""
    blocks = ((f"{BLOCK.prefix}.{i}.{name}", point) for i in range(cfg.n_layers)
              for name, point in block_points())
    return (*_flat(BEFORE_BLOCKS), *blocks, *_flat(AFTER_BLOCKS))


def block_names(i: int) -> tuple[str, ...]:
    """Block `i`'s hook points, in the order the forward pass reaches them."""
    return tuple(f"{BLOCK.prefix}.{i}.{name}" for name, _ in block_points())


def hook_names(cfg: GPTConfig) -> tuple[str, ...]:
    """Every hook point of `GPTModel(cfg)`, in the order the forward pass reaches them."""
    return tuple(name for name, _ in hook_points(cfg))


_IN_BLOCK = frozenset(name for name, _ in block_points())
_OUTSIDE = frozenset(name for name, _ in outer_points())
_MODULES = {part.prefix: part.module for part in (*BLOCK.points, *AFTER_BLOCKS)
            if isinstance(part, Part)}


def _in_block(name: str) -> tuple[str, str] | None:
    """`(layer, name within the block)` of a name in a block (`blocks.3.attn.hook_q`)."""
    match = re.fullmatch(rf"{BLOCK.prefix}\.(\d+)\.(.+)", name)
    return None if match is None else (match.group(1), match.group(2))


def is_point(name: str) -> bool:
    """Whether `name` is a hook point of the table (in some block, whatever the layer)."""
    inside = _in_block(name)
    return name in _OUTSIDE if inside is None else inside[1] in _IN_BLOCK


def module_path(name: str) -> tuple[tuple[str, ...], str]:
    """`(flax module path, local name)` of a hook point: where its free arrays live.

    `blocks.3.attn.hook_q` -> `(("trf_blocks_3", "att"), "hook_q")`.
    """
    inside = _in_block(name)
    path = () if inside is None else (f"{BLOCK.module}_{inside[0]}",)
    *parts, local = (name if inside is None else inside[1]).split(".")
    return (*path, *(_MODULES[p] for p in parts)), local


class ByIdentity:
    """An object hashed and compared by identity, for a static jit argument that is not
    hashable by value: a bound hook in a hashable table, a metric's analysis in a sweep."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByIdentity) and other.obj is self.obj


@dataclasses.dataclass(frozen=True)
class FreeHook:
    """The static part of a pytree hook: its structure and non-array leaves. Its arrays are
    read from the params when the model runs (`HOOK_ARGS`)."""

    treedef: Any
    statics: tuple  # each leaf, or None where an array goes

    def build(self, arrays: Sequence[Any]) -> Callable:
        """The hook with `arrays` in the array places."""
        it = iter(arrays)
        leaves = [next(it) if s is None else s.obj for s in self.statics]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


@dataclasses.dataclass(frozen=True)
class HookTable:
    """Which hook points run which hooks, and which keep their value (a static module field).

    `hooks`: `(name, hook)` pairs, run in order at their point (a `ByIdentity` holder of a bound
    function, or a `FreeHook`); `cache`: names whose value (after the hooks) is sown in the
    `intermediates` collection under the name, and `<point>.<value>` names of values the hooks
    there show (`value_names`); `prefix`: where in the model this table was handed down to
    (`blocks.3.attn`).
    """

    hooks: tuple[tuple[str, Any], ...] = ()
    cache: frozenset[str] = frozenset()
    prefix: str = ""

    def __bool__(self) -> bool:
        return bool(self.hooks) or bool(self.cache)

    def plus(self, other: HookTable) -> HookTable:
        """This table's hooks, then `other`'s (at one point, this table's run first); both
        tables' cached names."""
        return HookTable(self.hooks + other.hooks, self.cache | other.cache, self.prefix)

    def under(self, part: str) -> HookTable:
        """The table as the part `part` of this module sees it."""
        if not self:
            return self
        return dataclasses.replace(self, prefix=f"{self.prefix}.{part}" if self.prefix else part)


def hook_point(module: nn.Module, table: HookTable, name: str, x: jax.Array) -> jax.Array:
    """`x` through the hooks at `module`'s point `name`, kept if the table caches it."""
    if not table:
        return x
    full = f"{table.prefix}.{name}" if table.prefix else name
    if not is_point(full):
        raise ValueError(f"hook_point {full!r} is not in jaxgpt.nn.hooks' table of hook points: "
                         f"a part calls its default's points (all: hook_names(cfg))")
    free = 0
    for point, hook in table.hooks:
        if point != full:
            continue
        if isinstance(hook, FreeHook):
            fn = hook.build(module.get_variable("params", HOOK_ARGS)[name][free])
            free += 1
        else:
            fn = hook.obj
        shown = [v for v in getattr(fn, "value_names", ()) if f"{full}.{v}" in table.cache]
        try:
            if shown:
                showing: Any = fn  # a hook with `value_names` has `with_values` (module doc)
                y, values = showing.with_values(x, full)
                for value in shown:
                    _keep(module, f"{full}.{value}", values[value])
            else:
                y = fn(x, full)
        except (TypeError, ValueError) as e:  # at trace time: say where, and what it was given
            if type(e) not in (TypeError, ValueError):
                raise  # JAX's own (a tracer used as a bool...) explain themselves, and are typed
            raise type(e)(f"the hook at {full} failed on an activation of shape {x.shape} "
                          f"{x.dtype}: {e}") from e
        x = _checked(y, x, full)
    if full in table.cache:
        _keep(module, full, x)
    return x


def _checked(y: Any, x: jax.Array, full: str) -> jax.Array:
    """A hook's result `y` for the activation `x` at `full`, cast back to `x`'s dtype; a
    ValueError (at trace time) if its shape differs or its dtype is not at least as wide (an
    int truncates, a bf16 rounds what the model keeps in float32)."""
    if getattr(y, "shape", None) != x.shape:
        raise ValueError(f"the hook at {full} returned shape {getattr(y, 'shape', type(y))} "
                         f"for an activation of shape {x.shape}: return the activation's shape")
    if jnp.promote_types(x.dtype, y.dtype) != y.dtype:
        raise ValueError(f"the hook at {full} returned dtype {y.dtype} for an activation of "
                         f"dtype {x.dtype}: return {x.dtype} (a wider float is cast back)")
    return y.astype(x.dtype)  # a float32 vector added to bf16 activations stays bf16


def _keep(module: nn.Module, name: str, x: jax.Array) -> None:
    """Sow `x` as `name` in the `intermediates` collection (the last value kept)."""
    module.sow("intermediates", name, x, init_fn=lambda: None, reduce_fn=lambda _, new: new)


def check_names(cfg: GPTConfig, names: Iterable[str], what: str = "hook point") -> None:
    """A ValueError naming the first name `GPTModel(cfg)` has no hook point for."""
    known = set(hook_names(cfg))
    for name in names:
        if name not in known:
            layer = re.match(r"blocks\.(\d+)\.", name) if isinstance(name, str) else None
            if layer and int(layer.group(1)) >= cfg.n_layers:
                raise ValueError(f"{what} {name!r}: layer {layer.group(1)} is out of range "
                                 f"[0, {cfg.n_layers - 1}]")
            raise ValueError(f"unknown {what} {name!r}: names are TransformerLens's, e.g. "
                             f"'blocks.0.hook_resid_pre', 'blocks.0.attn.hook_pattern', "
                             f"'ln_final.hook_scale' (all: jaxgpt.nn.hooks.hook_names(cfg))")


def _check_hooks(cfg: GPTConfig, hooks: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    pairs = []
    for item in hooks:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise ValueError(f"a hook is a (name, fn) pair with fn(activation, name) -> "
                             f"activation, got {item!r}")
        pairs.append((item[0], item[1]))
    check_names(cfg, [name for name, _ in pairs])
    return pairs


def hook_table(cfg: GPTConfig, hooks: Iterable[tuple[str, Any]] = (),
               cache: Iterable[str] = ()) -> HookTable:
    """A table of bound hooks (their arrays are constants of the program) and cached names,
    checked against `GPTModel(cfg)`'s hook points and the values its hooks show."""
    pairs = _check_hooks(cfg, hooks)
    cache = frozenset(cache)
    shown = {f"{name}.{value}" for name, fn in pairs for value in getattr(fn, "value_names", ())}
    check_names(cfg, sorted(cache - shown), "cached name")
    return HookTable(tuple((name, ByIdentity(fn)) for name, fn in pairs), cache)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def free_hooks(cfg: GPTConfig, hooks: Iterable[tuple[str, Any]] = (),
               cache: Iterable[str] = ()) -> tuple[HookTable, dict]:
    """`(table, args)`: the hooks with their arrays taken out, and those arrays laid out as
    params (merge them in with `with_hook_args`). Equal structures give equal tables, so a
    compiled program is reused when only the arrays change. A hook without arrays (a plain
    function) stays bound."""
    table = hook_table(cfg, hooks, cache)
    entries: list[tuple[str, Any]] = []
    args: dict[str, Any] = {}
    for name, held in table.hooks:
        leaves, treedef = jax.tree_util.tree_flatten(held.obj)
        arrays = [leaf for leaf in leaves if _is_array(leaf)]
        if not arrays:
            entries.append((name, held))
            continue
        statics = tuple(None if _is_array(leaf) else ByIdentity(leaf) if not _hashable(leaf)
                        else _Static(leaf) for leaf in leaves)
        entries.append((name, FreeHook(treedef, statics)))
        path, local = module_path(name)
        node = args
        for key in path:
            node = node.setdefault(key, {})
        node.setdefault(HOOK_ARGS, {}).setdefault(local, []).append(arrays)
    return dataclasses.replace(table, hooks=tuple(entries)), args


class _Static:
    """A hashable non-array leaf, compared by value (a Python number, a string)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return hash((type(self.obj), self.obj))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Static) and type(other.obj) is type(self.obj)
                and other.obj == self.obj)


def _hashable(leaf: Any) -> bool:
    try:
        hash(leaf)
    except TypeError:
        return False
    return True


def with_hook_args(params: Any, args: dict) -> Any:
    """`params` with the free hooks' arrays merged in (new dicts along the way; the arrays
    are not copied). Arrays `params` holds already (a model's own free hooks) come first at
    each point, as that model's hooks run first (`HookTable.plus`)."""
    if not args:
        return params
    out = dict(params)
    for key, value in args.items():
        if key == HOOK_ARGS:
            held = out.get(key, {})
            out[key] = {**held, **{name: [*held.get(name, []), *arrays]
                                   for name, arrays in value.items()}}
        else:
            out[key] = with_hook_args(out.get(key, {}), value)
    return out
