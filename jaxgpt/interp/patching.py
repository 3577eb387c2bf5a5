"""Activation patching sweeps, with TransformerLens's names and results, batched and compiled.

    _, clean_cache = run_with_cache(params, cfg, clean_tokens)
    metric = lambda logits: logits[-1, mary] - logits[-1, john]     # logits [T, V] -> scalar
    get_act_patch_resid_pre(params, cfg, corrupted_tokens, clean_cache, metric)   # [L, T]

Each entry is the metric of the corrupted run with one activation (a layer's residual stream
at one position, one head's output at one position...) replaced by the clean run's. The
numbers are `transformer_lens.patching`'s, and `reference_sweep`'s, which computes them the
plain way, one forward pass per patch; the sweeps do much less work, because they compute only
what a patch can change:

- Nothing before layer l changes, so the patches that start at layer l join the batch there,
  from the corrupted run's residual stream (rows grow by one group per layer).
- Causally, nothing before position p changes either: a patch at p runs only positions p..T-1,
  attending to the corrupted run's keys and values for 0..p-1 (the model's own cached
  attention path, `GPTModel.run_block` with a cache). The suffixes of many patches are packed
  into one row, with a mask that keeps each patch's tokens to its own prefix.
- The output head runs only where the metric reads: `interp.reads` traces the metric and
  finds the positions (and, for a logit difference, the vocabulary columns) it looks at; the
  metric is evaluated on those logits alone, with the same result.

The patches go in chunks (about `chunk_size` patches per start layer, default: as many as fit
in about `MEMORY_BUDGET` bytes of activations), one compiled program run per chunk
(`sweep_chunk`); a chunk's `Packing` says which token of which row belongs to which patch,
and what each patch replaces. The kinds (`KINDS`) derive from the table of hook points
(`nn.hooks`): the points TransformerLens patches (`PATCHED`), swept by the axes of their
activations (`SWEEPS`).

Shapes: L layers, B batch, T tokens, H heads, D emb_dim, Dh head_dim, S packed tokens of a
chunk, U patches of a chunk per start layer, R positions the metric reads.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interp.cache import act_name, check_tokens, run_with_cache, run_with_hooks
from jaxgpt.interp.reads import check_metric, metric_reads
from jaxgpt.nn.attention import AttentionMask
from jaxgpt.nn.hooks import BLOCK, ByIdentity, block_points, hook_table
from jaxgpt.nn.model import GPTModel, apply_method, model_for

Metric = Callable[[jax.Array], jax.Array]
Progress = Callable[[int, int], None]
MEMORY_BUDGET = 1 << 30  # bytes of activations one chunk may take, by `chunk_bytes`


class Kind(NamedTuple):
    """One kind of patch: the block's hook point it replaces (`attn.hook_z`), TransformerLens's
    axes after `layer` (pos, head, dest, src), and the axes of the activation there."""

    hook: str
    axes: tuple[str, ...]
    shape: str  # as in the table of hook points (`nn.hooks`), e.g. "B T H Dh"

    @property
    def per_key(self) -> bool:
        """Whether the activation has a column per key, `[B, H, T, S]` (a pattern)."""
        return self.shape.split()[-1] == "S"


# The points TransformerLens's sweeps patch, by short name (`interp.cache.act_name`), and the
# sweeps of a point by the axes of its activation: (kind's suffix, axes after the layer).
PATCHED = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")
SWEEPS = {
    "B T D": (("", ("pos",)),),
    "B T H Dh": (("_by_pos", ("pos", "head")), ("_all_pos", ("head",))),
    "B H T S": (("_by_pos", ("head", "dest")), ("_all_pos", ("head",)),
                ("_dest_src", ("head", "dest", "src"))),
}
# Where each axis of a kind is in the activation's shape.
AXIS_DIM = {"pos": "T", "dest": "T", "src": "S", "head": "H"}


def _kinds() -> dict[str, Kind]:
    """Every kind of patch, from the table of hook points: `resid_pre`, ..., `z_by_pos`, ...,
    `pattern_dest_src`, in TransformerLens's order."""
    points = dict(block_points())
    hooks = {short: act_name(short, 0).removeprefix(f"{BLOCK.prefix}.0.") for short in PATCHED}
    unswept = [s for s, hook in hooks.items() if points[hook].shape not in SWEEPS]
    if unswept:
        raise ValueError(f"no sweep for the activation of {unswept[0]!r} "
                         f"({points[hooks[unswept[0]]].shape}): add its shape to SWEEPS")
    return {short + suffix: Kind(hook, axes, shape)
            for shape, sweeps in SWEEPS.items() for suffix, axes in sweeps
            for short, hook in hooks.items() if points[hook].shape == shape}


KINDS = _kinds()


def sizes(kind: Kind, t: int, h: int) -> tuple[int, ...]:
    """The size of each of the kind's axes (after the layer), for `t` tokens and `h` heads."""
    return tuple(h if axis == "head" else t for axis in kind.axes)


class Patch(NamedTuple):
    """A patch without its layer: where its run starts and what it replaces."""

    cell: tuple[int, ...]  # its place in the result, after the layer
    start: int  # the first position it can change
    pos: int | None  # the position (query, for a pattern) replaced; None: every position
    head: int | None
    src: int | None  # a pattern's key position; None: the whole row


def patches(kind: Kind, t: int, h: int) -> list[Patch]:
    """Every patch of `kind` at one layer, in the result's order."""
    out = []
    for cell in itertools.product(*map(range, sizes(kind, t, h))):
        at = dict(zip(kind.axes, cell, strict=True))
        pos = at.get("pos", at.get("dest"))
        out.append(Patch(cell, 0 if pos is None else pos, pos, at.get("head"), at.get("src")))
    return out


# A patch's field laid out per packed token (`_replaced`): a field that is None (every
# position, or every key), and a filler token (it pads a row and belongs to no patch).
EVERY = -1
FILLER = -2


class Packing(NamedTuple):
    """A chunk laid out: P rows, each packing the suffixes of a few patches into S tokens
    (arrays, not static, so every chunk of one shape reuses the compiled program)."""

    token_pos: np.ndarray  # [P, S] int32: each packed token's position
    allowed: np.ndarray  # [P, S, T + S] bool: its keys, the prefix slots then its row's
    # [U, R] int32: where each patch's read positions are, in the packed tokens [P * S] then
    # the corrupted run's T (P * S + r: a position before the patch's start, unchanged)
    read_from: np.ndarray
    replaced: np.ndarray  # what the patch replaces: [P, S] | [P, S, H] | [P, H, S, T + S] bool
    key_pos: np.ndarray  # [P, S, T + S] int32: each key slot's position (pattern patches)


def pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Patches (by suffix length) into rows of `width` tokens: longest first, each into the
    first row with room (a suffix of T - p and one of p + 1 fill a row of T + 1)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            rows.append([])
            room.append(width)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


def _row(in_row: Sequence[tuple[int, Patch]], width: int, t: int,
         filler: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(owner, pos, allowed)` of one row's tokens: each token's patch (index `filler` for the
    fillers after the suffixes, at position t - 1), its position, and the keys it sees."""
    pairs = [(i, p) for i, patch in in_row for p in range(patch.start, t)]
    pairs += [(filler, t - 1)] * (width - len(pairs))
    owner, pos = (np.array(a, np.int32) for a in zip(*pairs, strict=True))
    starts = {i: patch.start for i, patch in in_row}
    start = np.array([starts.get(int(i), t - 1) for i in owner])
    prefix = np.arange(t)[None, :] < start[:, None]  # [S, T]: the corrupted keys before it
    own = (owner[:, None] == owner[None, :]) & (pos[None, :] <= pos[:, None])  # [S, S]
    return owner, pos, np.concatenate([prefix, own], axis=1)


def _replaced(kind: Kind, chunk: Sequence[Patch], owner: np.ndarray, pos: np.ndarray,
              key_pos: np.ndarray, h: int) -> np.ndarray:
    """What each token's patch replaces (see `Packing.replaced`); fillers replace nothing."""

    def field(name: str) -> np.ndarray:  # [P, S]: the owner's field, EVERY for None
        values = [EVERY if getattr(p, name) is None else getattr(p, name) for p in chunk]
        return np.array(values + [FILLER], np.int32)[owner]

    patch_pos, patch_head, patch_src = field("pos"), field("head"), field("src")
    at_pos = (owner < len(chunk)) & ((patch_pos == EVERY) | (patch_pos == pos))  # [P, S]
    if "head" not in kind.axes:
        return at_pos
    heads = np.arange(h)
    if not kind.per_key:
        return at_pos[..., None] & (heads == patch_head[..., None])  # [P, S, H]
    # The slots that stand for the patch's key positions: the prefix before its start, and
    # its own tokens (later ones too: a row of the pattern is replaced whole, as
    # TransformerLens does, though the mask zeroes what a query may not see).
    t = key_pos.shape[-1] - pos.shape[-1]
    start = np.array([p.start for p in chunk] + [t], np.int32)[owner]  # [P, S]
    its_keys = np.concatenate([np.arange(t) < start[..., None],
                               owner[:, :, None] == owner[:, None, :]], axis=-1)  # [P, S, T + S]
    at_src = (patch_src[..., None] == EVERY) | (key_pos == patch_src[..., None])  # [P, S, T + S]
    return ((heads[None, :, None, None] == patch_head[:, None, :, None])
            & (at_pos[..., None] & its_keys & at_src)[:, None])  # [P, H, S, T + S]


def pack_chunk(chunk: Sequence[Patch], rows: Sequence[Sequence[int]], n_rows: int,
               n_patches: int, width: int, kind: Kind, t: int, h: int,
               reads: np.ndarray) -> Packing:
    """The chunk's packing, padded to `n_rows` rows and `n_patches` patches; `rows` lists the
    chunk's patches (indices into `chunk`) in each row; `reads` are the positions the metric
    reads."""
    laid = [_row([(i, chunk[i]) for i in r], width, t, len(chunk)) for r in rows]
    laid += [_row([], width, t, len(chunk))] * (n_rows - len(rows))
    owner, pos, allowed = (np.stack(a) for a in zip(*laid, strict=True))  # [P, S, ...]
    packed_at = {(int(i), int(p)): j for j, (i, p) in enumerate(zip(owner.ravel(), pos.ravel(),
                                                                    strict=True))}
    corrupted_at = owner.size  # the corrupted run's tokens follow the packed ones
    read_from = np.array([[packed_at.get((i, int(r)), corrupted_at + int(r)) for r in reads]
                          for i in range(n_patches)], np.int32).reshape(n_patches, len(reads))
    key_pos = np.concatenate([np.broadcast_to(np.arange(t), (*pos.shape, t)),
                              np.broadcast_to(pos[:, None, :], (*pos.shape, width))],
                             axis=2).astype(np.int32)  # [P, S, T + S]
    replaced = _replaced(kind, chunk, owner, pos, key_pos, h)
    return Packing(pos, allowed, read_from, replaced, key_pos)


class Corrupted(NamedTuple):
    """What the sweep reads of the corrupted run, stacked over layers."""

    resid_pre: jax.Array  # [L, B, T, D]: each block's input, before its hook_resid_pre
    keys: jax.Array  # [L, B * H, T, Dh]
    values: jax.Array  # [L, B * H, T, Dh]
    final: jax.Array  # [B, T, D]: the last block's output


def corrupted_run(params: Any, cfg: GPTConfig, tokens: np.ndarray,
                  model: GPTModel) -> Corrupted:
    """The corrupted run's residual streams, keys and values (in the cache's layout)."""
    n = cfg.n_layers
    # Each block's input as it receives it: the sweep runs the block on it, the block's own
    # hooks and all (the embeddings, then the block before's output; not hook_resid_pre's).
    inputs = ["hook_embed", "hook_pos_embed", *(act_name("resid_post", i) for i in range(n - 1))]
    names = inputs + [act_name(short, i) for short in ("k", "v") for i in range(n)]
    final, cache = run_with_cache(params, cfg, tokens, names=names, model=model,
                                  stop_at_layer=n)  # the blocks' output; no head
    b, t = tokens.shape

    def heads(name: str) -> jax.Array:  # [B, T, H, Dh] per layer -> [L, B * H, T, Dh]
        return jnp.stack([cache[name, i].transpose(0, 2, 1, 3).reshape(b * cfg.n_heads, t, -1)
                          for i in range(n)])

    resid = [cache["hook_embed"] + cache["hook_pos_embed"],
             *(cache["resid_post", i] for i in range(n - 1))]
    return Corrupted(jnp.stack(resid), heads("k"), heads("v"), final)


def _take_clean(kind: Kind, clean: jax.Array, packing: Packing, b: int, act: jax.Array,
                name: str) -> jax.Array:
    """The hook at layer k: the newest group of rows (the patches starting at k) takes the
    clean activation where its patch says. `act` `[(k + 1) * B * P, ...]`, `clean` `[B, ...]`."""
    p = packing.token_pos.shape[0]
    if kind.per_key:  # clean [B, H, T, T] -> [B, P, H, S, T + S]
        rows = jnp.moveaxis(clean[:, :, packing.token_pos], 1, 2)  # [B, P, H, S, T]
        packed = jnp.take_along_axis(rows, packing.key_pos[None, :, None], axis=-1)
    else:  # clean [B, T, ...] -> [B, P, S, ...]
        packed = clean[:, packing.token_pos]
    where = packing.replaced
    where = where.reshape(1, *where.shape, *(1,) * (packed.ndim - 1 - where.ndim))
    newest = act[-b * p:].reshape(packed.shape)
    patched = jnp.where(where, packed.astype(act.dtype), newest)
    return act.at[-b * p:].set(patched.reshape(b * p, *act.shape[1:]))


@functools.partial(jax.jit, static_argnames=("model", "kind", "reads", "lead"))
def sweep_chunk(params: Any, run: Corrupted, clean: jax.Array, packing: Packing, *,
                model: GPTModel, kind: Kind, reads: ByIdentity, lead: bool) -> jax.Array:
    """The metric of every patch of one chunk at every layer: `[L, U]` (`lead`: the metric
    takes `[B, T, V]`, else `[T, V]`)."""
    cfg = model.cfg
    b, t = run.final.shape[:2]
    p, s = packing.token_pos.shape
    h = cfg.n_heads
    k_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (p, t)),
                             packing.token_pos], axis=1)  # [P, T + S]
    variables = {"params": params}
    x = jnp.zeros((0, s, cfg.emb_dim), run.final.dtype)
    for k in range(cfg.n_layers):
        new = run.resid_pre[k][:, packing.token_pos].reshape(b * p, s, cfg.emb_dim)
        x = jnp.concatenate([x, new])  # [(k + 1) * B * P, S, D]
        groups = (k + 1) * b
        mask = AttentionMask(*(jnp.tile(a, (groups, *(1,) * (a.ndim - 1)))
                               for a in (packing.allowed, packing.token_pos, k_pos)))
        cache = tuple(_row_cache(c[k], b, p, h, groups, s) for c in (run.keys, run.values))
        hook = functools.partial(_take_clean, kind, clean[k], packing, b)
        block = model.clone(hooks=model.hooks.plus(
            hook_table(cfg, [(f"{BLOCK.prefix}.{k}.{kind.hook}", hook)])))
        x, _ = block.apply(variables, k, x, mask, cache, t, method=GPTModel.run_block)
    x = x.reshape(cfg.n_layers, b, p * s, cfg.emb_dim)
    stream = jnp.concatenate([x, jnp.broadcast_to(run.final, (cfg.n_layers, *run.final.shape))],
                             axis=2)  # [L, B, P * S + T, D]: the packed tokens, the corrupted
    hidden = stream[:, :, packing.read_from]  # [L, B, U, R, D]
    analysis = reads.obj
    columns = None if analysis.columns is None else jnp.asarray(analysis.columns)
    logits = apply_method(model, variables, GPTModel.head)(hidden, columns)  # [L, B, U, R, C]
    logits = jnp.moveaxis(logits, 1, 2)  # [L, U, B, R, C]
    return jax.vmap(jax.vmap(analysis.evaluate))(logits if lead else logits[:, :, 0])


def _row_cache(kv: jax.Array, b: int, p: int, h: int, groups: int, s: int) -> jax.Array:
    """One layer's corrupted keys (or values) `[B * H, T, Dh]` as the cache of every row:
    `[groups * P * H, T + S, Dh]`, the prefix slots filled, the S packed slots empty."""
    t, dh = kv.shape[1:]
    per_row = jnp.broadcast_to(kv.reshape(b, 1, h, t, dh), (b, p, h, t, dh))
    prefix = jnp.tile(per_row.reshape(b * p * h, t, dh), (groups // b, 1, 1))
    return jnp.concatenate([prefix, jnp.zeros((groups * p * h, s, dh), kv.dtype)], axis=1)


def chunk_bytes(cfg: GPTConfig, batch: int, t: int, n_rows: int, width: int,
                pattern: bool) -> int:
    """About the activations a chunk of `n_rows` rows of `width` tokens holds at the last
    layer (every start layer's rows): the MLP's `[tokens, 4D]` twice, the residual stream a
    few times, the scores `[rows * H, S, T + S]` three times (scores, exponentials, weights),
    the caches, and a pattern patch's clean rows."""
    rows = cfg.n_layers * batch * n_rows
    tokens = rows * width
    dense = tokens * (2 * 4 * cfg.emb_dim + 6 * cfg.emb_dim)
    attention = rows * cfg.n_heads * (t + width) * (3 * width + 2 * cfg.head_dim)
    clean = 2 * batch * n_rows * cfg.n_heads * width * (t + width) if pattern else 0
    return 4 * (dense + attention + clean)


def layout(every: Sequence[Patch], t: int, chunk_size: int | None,
           fits: Callable[[int], bool]) -> tuple[int, list[list[list[int]]]]:
    """`(width, chunks)`: rows of `width` tokens (see `pack`), split evenly into
    ceil(patches / `chunk_size`) chunks, or (None) as few as `fits(rows)` allows; each chunk a
    list of rows of indices into `every`. A row packs up to two patches, so a chunk may hold a
    few more than `chunk_size`."""
    lengths = [t - patch.start for patch in every]
    width = t + 1 if min(lengths) < t else t
    rows = pack(lengths, width)
    if chunk_size is not None:
        n = math.ceil(len(every) / chunk_size)
    else:
        n = 1
        while n < len(rows) and not fits(math.ceil(len(rows) / n)):
            n += 1
    per = math.ceil(len(rows) / n)
    return width, [rows[i:i + per] for i in range(0, len(rows), per)]


@functools.lru_cache(maxsize=16)
def _reads(metric: Metric, shape: tuple[int, ...]) -> ByIdentity:
    """The metric's analysis, once per metric and shape (so a sweep's program is reused)."""
    return ByIdentity(metric_reads(metric, shape))


def clean_activations(clean_cache: Any, kind: Kind, cfg: GPTConfig,
                      tokens: np.ndarray) -> jax.Array:
    """The clean activations the patches take, stacked over layers: `[L, B, ...]`."""
    names = [f"{BLOCK.prefix}.{i}.{kind.hook}" for i in range(cfg.n_layers)]
    missing = [n for n in names if n not in clean_cache]
    if missing:
        raise ValueError(f"clean_cache has no {missing[0]!r}: run_with_cache the clean prompt "
                         f"keeping it (names=None keeps every activation)")
    clean = jnp.stack([jnp.asarray(clean_cache[n]) for n in names])
    b, t = tokens.shape
    got = clean.shape[1], clean.shape[3 if kind.per_key else 2]
    if got != (b, t):
        raise ValueError(f"the clean run has {got[0]} prompts of {got[1]} tokens, the corrupted "
                         f"tokens {b} of {t}: patching needs prompts of the same length")
    return clean


class Plan(NamedTuple):
    """A sweep laid out (`plan_sweep`): the corrupted run, the clean activations, and the
    chunks of patches, each a list of rows of indices into `patches`."""

    model: GPTModel
    kind: Kind
    lead: bool  # the metric takes `[B, T, V]` (else `[T, V]`)
    reads: ByIdentity
    run: Corrupted
    clean: jax.Array  # [L, B, ...]
    patches: list[Patch]
    width: int
    chunks: list[list[list[int]]]
    n_rows: int
    n_patches: int


def plan_sweep(params: Any, cfg: GPTConfig, corrupted_tokens: Any, clean_cache: Any,
               metric: Metric, kind: str, *, model: GPTModel | None = None,
               chunk_size: int | None = None) -> Plan:
    """Every argument of `patch_sweep` checked, the corrupted run made, the patches chunked."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    what = KINDS[kind]
    lead = np.ndim(corrupted_tokens) == 2
    tokens = check_tokens(corrupted_tokens, cfg, "corrupted_tokens")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    model = model_for(cfg, model).clone(remat=False)
    b, t = tokens.shape
    clean = clean_activations(clean_cache, what, cfg, tokens)
    logits = (b, t, cfg.vocab_size) if lead else (t, cfg.vocab_size)
    check_metric(metric, logits)
    reads = _reads(metric, logits)
    run = corrupted_run(params, cfg, tokens, model)
    every = patches(what, t, cfg.n_heads)
    width, chunks = layout(every, t, chunk_size, lambda n: chunk_bytes(
        cfg, b, t, n, t + 1, what.per_key) <= MEMORY_BUDGET)
    n_rows = max(len(c) for c in chunks)
    n_patches = max(sum(len(r) for r in c) for c in chunks)
    return Plan(model, what, lead, reads, run, clean, every, width, chunks, n_rows, n_patches)


def plan_chunk(plan: Plan, chunk: list[list[int]]) -> tuple[list[int], Packing]:
    """`(members, packing)` of one chunk: its patches (indices into `plan.patches`, in the
    order of the program's results) and how they are packed."""
    members = [i for row in chunk for i in row]
    local = {i: j for j, i in enumerate(members)}
    t = plan.run.final.shape[1]
    packing = pack_chunk([plan.patches[i] for i in members],
                         [[local[i] for i in row] for row in chunk], plan.n_rows,
                         plan.n_patches, plan.width, plan.kind, t, plan.model.cfg.n_heads,
                         plan.reads.obj.rows)
    return members, packing


def patch_sweep(params: Any, cfg: GPTConfig, corrupted_tokens: Any, clean_cache: Any,
                metric: Metric, kind: str, *, model: GPTModel | None = None,
                chunk_size: int | None = None, progress: Progress | None = None) -> jax.Array:
    """The metric of the corrupted run with each activation of `kind` (a key of `KINDS`)
    patched in from `clean_cache`: `[L, *axes]` (see the module's docstring).

    `corrupted_tokens` `[T]` gives the metric logits `[T, V]`, `[B, T]` gives it `[B, T, V]`
    (every prompt is patched at once, as TransformerLens does). About `chunk_size` patches per
    start layer go in one program (`layout`; default: what fits in `MEMORY_BUDGET`);
    `progress(done, total)` is called after each chunk. Equals `reference_sweep`, in far less
    work.
    """
    plan = plan_sweep(params, cfg, corrupted_tokens, clean_cache, metric, kind, model=model,
                      chunk_size=chunk_size)
    t = plan.run.final.shape[1]
    out = np.zeros((cfg.n_layers, *sizes(plan.kind, t, cfg.n_heads)), np.float32)
    done, total = 0, cfg.n_layers * len(plan.patches)
    for chunk in plan.chunks:
        members, packing = plan_chunk(plan, chunk)
        values = np.asarray(sweep_chunk(params, plan.run, plan.clean, packing, model=plan.model,
                                        kind=plan.kind, reads=plan.reads,
                                        lead=plan.lead))  # [L, U]
        for j, i in enumerate(members):
            out[(slice(None),) + plan.patches[i].cell] = values[:, j]
        done += cfg.n_layers * len(members)
        if progress is not None:
            progress(done, total)
    return jnp.asarray(out)


def _where_clean(where: jax.Array, clean: jax.Array, x: jax.Array, name: str) -> jax.Array:
    return jnp.where(where, clean, x)


def reference_sweep(params: Any, cfg: GPTConfig, corrupted_tokens: Any, clean_cache: Any,
                    metric: Metric, kind: str, *, model: GPTModel | None = None) -> jax.Array:
    """`patch_sweep` the plain way, as TransformerLens's `generic_activation_patch` does it:
    for each patch, one run of the corrupted tokens with the clean activation put in at its
    point by a hook (`run_with_hooks`), and the metric of its logits. One forward pass per
    patch, so slow: it is what the tests hold every sweep to."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    what = KINDS[kind]
    lead = np.ndim(corrupted_tokens) == 2
    tokens = check_tokens(corrupted_tokens, cfg, "corrupted_tokens")
    clean = clean_activations(clean_cache, what, cfg, tokens)  # [L, B, ...]
    check_metric(metric, tokens.shape + (cfg.vocab_size,) if lead else
                 (tokens.shape[1], cfg.vocab_size))
    dims = what.shape.split()
    shape = sizes(what, tokens.shape[1], cfg.n_heads)
    out = np.zeros((cfg.n_layers, *shape), np.float32)
    for layer in range(cfg.n_layers):
        for cell in itertools.product(*map(range, shape)):
            # Every prompt, and all of each axis the kind leaves out (every position...).
            index: list[Any] = [slice(None)] * len(dims)
            for axis, i in zip(what.axes, cell, strict=True):
                index[dims.index(AXIS_DIM[axis])] = i
            where = np.zeros(clean.shape[1:], bool)
            where[tuple(index)] = True
            hook = jax.tree_util.Partial(_where_clean, jnp.asarray(where), clean[layer])
            logits = run_with_hooks(params, cfg, tokens, [(f"{BLOCK.prefix}.{layer}.{what.hook}",
                                                           hook)], model=model)
            out[(layer,) + cell] = metric(logits if lead else logits[0])
    return jnp.asarray(out)


def _named(kind: str, shape: str) -> Callable[..., jax.Array]:
    def sweep(params: Any, cfg: GPTConfig, corrupted_tokens: Any, clean_cache: Any,
              metric: Metric, *, model: GPTModel | None = None, chunk_size: int | None = None,
              progress: Progress | None = None) -> jax.Array:
        return patch_sweep(params, cfg, corrupted_tokens, clean_cache, metric, kind,
                           model=model, chunk_size=chunk_size, progress=progress)

    what = KINDS[kind]
    sweep.kind = kind  # type: ignore[attr-defined]
    sweep.__name__ = sweep.__qualname__ = f"sweep_{kind}"
    sweep.__doc__ = (f"Patch `{what.hook}` of each layer {shape}, clean into corrupted: the "
                     f"metric of each patched run, `[{', '.join(['n_layers', *what.axes])}]` "
                     f"(see `patch_sweep`).")
    return sweep


get_act_patch_resid_pre = _named("resid_pre", "at each position")
get_act_patch_resid_mid = _named("resid_mid", "at each position")
get_act_patch_attn_out = _named("attn_out", "at each position")
get_act_patch_mlp_out = _named("mlp_out", "at each position")
get_act_patch_attn_head_out_by_pos = _named("z_by_pos", "for each head at each position")
get_act_patch_attn_head_q_by_pos = _named("q_by_pos", "for each head at each position")
get_act_patch_attn_head_k_by_pos = _named("k_by_pos", "for each head at each position")
get_act_patch_attn_head_v_by_pos = _named("v_by_pos", "for each head at each position")
get_act_patch_attn_head_out_all_pos = _named("z_all_pos", "for each head, every position")
get_act_patch_attn_head_q_all_pos = _named("q_all_pos", "for each head, every position")
get_act_patch_attn_head_k_all_pos = _named("k_all_pos", "for each head, every position")
get_act_patch_attn_head_v_all_pos = _named("v_all_pos", "for each head, every position")
get_act_patch_attn_head_pattern_by_pos = _named("pattern_by_pos",
                                                "for each head's row of each query position")
get_act_patch_attn_head_pattern_all_pos = _named("pattern_all_pos", "for each head, every row")
get_act_patch_attn_head_pattern_dest_src_pos = _named(
    "pattern_dest_src", "for each head's weight of each query and key position")


def get_act_patch_block_every(params: Any, cfg: GPTConfig, corrupted_tokens: Any,
                              clean_cache: Any, metric: Metric, **kwargs: Any) -> jax.Array:
    """`resid_pre`, `attn_out` and `mlp_out` sweeps stacked: `[3, L, T]`."""
    return jnp.stack([patch_sweep(params, cfg, corrupted_tokens, clean_cache, metric, k,
                                  **kwargs) for k in ("resid_pre", "attn_out", "mlp_out")])


def get_act_patch_attn_head_all_pos_every(params: Any, cfg: GPTConfig, corrupted_tokens: Any,
                                          clean_cache: Any, metric: Metric,
                                          **kwargs: Any) -> jax.Array:
    """Each head's output, queries, keys, values and pattern, every position: `[5, L, H]`."""
    kinds = ("z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos", "pattern_all_pos")
    return jnp.stack([patch_sweep(params, cfg, corrupted_tokens, clean_cache, metric, k,
                                  **kwargs) for k in kinds])


def get_act_patch_attn_head_by_pos_every(params: Any, cfg: GPTConfig, corrupted_tokens: Any,
                                         clean_cache: Any, metric: Metric,
                                         **kwargs: Any) -> jax.Array:
    """Each head's output, queries, keys, values and pattern row, by position:
    `[5, L, T, H]` (the pattern's `[L, H, T]` transposed, as TransformerLens does)."""
    kinds = ("z_by_pos", "q_by_pos", "k_by_pos", "v_by_pos")
    out = [patch_sweep(params, cfg, corrupted_tokens, clean_cache, metric, k, **kwargs)
           for k in kinds]
    pattern = patch_sweep(params, cfg, corrupted_tokens, clean_cache, metric, "pattern_by_pos",
                          **kwargs)
    return jnp.stack([*out, pattern.transpose(0, 2, 1)])
