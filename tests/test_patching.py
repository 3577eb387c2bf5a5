"""Activation patching: every sweep equals `patching.reference_sweep` (one activation patched
at a time, one forward pass each) however its patches are chunked, the stacked `_every` sweeps
are their kinds' laid out as documented, and all equal TransformerLens's
`transformer_lens.patching` on the same weights; the metric's reads."""

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    TINY,
    assert_close,
    jax_weights_of,
    random_hf_gpt2,
    reference,
    sharpened,
    tl_bridge,
)

from jaxgpt.config import GPTConfig
from jaxgpt.interp import patching
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn import init_params

T = 5


@pytest.fixture(scope="module")
def tiny(tiny):
    cfg, params = tiny  # conftest's tiny model, sharpened
    return cfg, sharpened(params)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    return rng.integers(0, 100, (2, T)).astype(np.int32)


def logit_diff(logits):  # [T, V]
    return logits[-1, 3] - logits[-1, 4]


# --- every public sweep is tested --------------------------------------------------------------

# The public sweeps as the tests call them: each one-kind sweep by its kind (held to
# `reference_sweep` under every chunking below; each carries its kind as `.kind`), and each
# stacked sweep with its kinds and whether a kind's result is transposed into the stack (as
# its docstring lays it out).
NAMED_SWEEPS = {getattr(patching, n).kind: n for n in dir(patching)
                if n.startswith("get_act_patch_") and hasattr(getattr(patching, n), "kind")}
STACKED_SWEEPS = {  # name: (its kinds, in order; the kinds transposed `[L, H, T]` -> `[L, T, H]`)
    "get_act_patch_block_every": (("resid_pre", "attn_out", "mlp_out"), ()),
    "get_act_patch_attn_head_all_pos_every": (
        ("z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos", "pattern_all_pos"), ()),
    "get_act_patch_attn_head_by_pos_every": (
        ("z_by_pos", "q_by_pos", "k_by_pos", "v_by_pos", "pattern_by_pos"), ("pattern_by_pos",)),
}


def test_every_public_sweep_is_in_the_tests_lists():
    public = sorted(n for n in dir(patching) if n.startswith("get_act_patch_"))
    untested = [n for n in public if n not in {*NAMED_SWEEPS.values(), *STACKED_SWEEPS}]
    assert untested == [], (f"{', '.join(untested)} not tested: add it to NAMED_SWEEPS (a "
                            f"kind's sweep) or STACKED_SWEEPS (a stack of kinds) in "
                            f"tests/test_patching.py")
    assert sorted(NAMED_SWEEPS) == sorted(patching.KINDS), "NAMED_SWEEPS must name every kind"


# --- every sweep, however chunked, equals patching one activation at a time --------------------


class Sweeps(NamedTuple):
    """A model and prompt pair to sweep, with each kind's `reference_sweep`, computed once."""

    cfg: GPTConfig
    params: dict
    corrupt: np.ndarray  # [T]
    clean_cache: object
    reference: object  # kind -> [L, *axes]


def sweeps_of(cfg, params, clean, corrupt):
    _, clean_cache = run_with_cache(params, cfg, clean)

    @functools.cache
    def reference_of(kind):
        return np.asarray(patching.reference_sweep(params, cfg, corrupt, clean_cache, logit_diff,
                                                   kind))

    return Sweeps(cfg, params, corrupt, clean_cache, reference_of)


@pytest.fixture(scope="module")
def four_heads(tiny, pair):
    return sweeps_of(*tiny, *pair)


@pytest.fixture(scope="module")
def eight_heads(pair):
    # An all_pos kind packs one row per head, and 4 rows split into chunks of ceil(4 / n)
    # rows for any n chunks, which always divides 4: a short last chunk takes 8 heads.
    cfg = GPTConfig(**{**TINY, "n_heads": 8})
    return sweeps_of(cfg, sharpened(init_params(cfg, 0)), *pair)


def rounding(want):
    # The sweep and one forward pass per patch compute the same fp32 logits in other groupings
    # (packed rows, a cache of the corrupted keys): the metrics agree to some fp32 spacings of
    # their size, measured at most 7 over every kind, chunking and stack here (1.7e-6 at
    # |metric| 3.6, where the spacing is 2.4e-7), 8 with made-up clean patterns (whose
    # activations are larger). 32 spacings leave 4x for another CPU's kernels, and are
    # below 1/3000 of the effects asserted (ptp > 0.05).
    return 32 * float(np.spacing(np.float32(np.abs(want).max())))


# chunk_size for a short last chunk, by the kind's axes: rows of packed suffixes split into
# ceil(patches / chunk_size) chunks of as many rows each as it takes (`patching.layout`).
# At T=5 and 4 heads: positions 3 rows -> 2 + 1; a head at each position (or each query row
# of a pattern) 10 rows -> 3 + 3 + 3 + 1; a pattern's entries 50 rows -> 16 x 3 + 2; and the
# heads alone 8 rows of the 8-head model -> 3 + 3 + 2.
SHORT_LAST_CHUNK = {("pos",): 3, ("pos", "head"): 5, ("head", "dest"): 5,
                    ("head", "dest", "src"): 5, ("head",): 3}
CHUNKINGS = ("one chunk", "a short last chunk", "one row per chunk")
# The fast tier: a kind of three of the ways a sweep packs its patches (layer x position,
# head x position, a pattern's entries), in one chunk and with a short last chunk; the slow
# tier has the rest.
FAST_KINDS = ("resid_pre", "z_by_pos", "pattern_dest_src")
FAST_CHUNKINGS = ("one chunk", "a short last chunk")


def chunk_size_of(kind, chunking, n_patches):
    """The chunk_size that chunks one layer's `n_patches` patches of `kind` as `chunking` says."""
    return {"one chunk": n_patches, "one row per chunk": 1,
            "a short last chunk": SHORT_LAST_CHUNK[patching.KINDS[kind].axes]}[chunking]


def chunks_are(chunking, rows):
    """Whether chunks of `rows` rows each are what `chunking` says."""
    if chunking == "one chunk":
        return len(rows) == 1
    if chunking == "a short last chunk":
        return len(rows) > 1 and rows[-1] < rows[0]
    return set(rows) == {1}


@pytest.mark.parametrize("kind,chunking", [
    pytest.param(k, c, id=f"{k}-{c.replace(' ', '_')}",
                 marks=() if k in FAST_KINDS and c in FAST_CHUNKINGS else pytest.mark.slow)
    for k in patching.KINDS for c in CHUNKINGS])
def test_every_sweep_equals_patching_one_activation_at_a_time(request, kind, chunking):
    heads_alone = patching.KINDS[kind].axes == ("head",)
    s = request.getfixturevalue(
        "eight_heads" if heads_alone and chunking == "a short last chunk" else "four_heads")
    every = patching.patches(patching.KINDS[kind], T, s.cfg.n_heads)
    chunk_size = chunk_size_of(kind, chunking, len(every))
    seen = []
    kwargs = dict(chunk_size=chunk_size, progress=lambda done, total: seen.append((done, total)))
    if chunking == "one chunk":  # patch_sweep itself; the others through the kind's name
        got = patching.patch_sweep(s.params, s.cfg, s.corrupt, s.clean_cache, logit_diff, kind,
                                   **kwargs)
    else:
        got = getattr(patching, NAMED_SWEEPS[kind])(s.params, s.cfg, s.corrupt, s.clean_cache,
                                                    logit_diff, **kwargs)
    want = s.reference(kind)
    what = f"{NAMED_SWEEPS[kind]}, chunk_size={chunk_size} ({chunking})"
    assert_close(got, want, rounding(want),
                 f"{what}: not the metric of patching one activation at a time")
    assert np.ptp(want) > 0.05, "the patches must move the metric for this test to mean much"
    # The chunks are as the test's name says, and the sweep ran each (its progress reports).
    _, chunks = patching.layout(every, T, chunk_size, lambda n: True)
    rows = [len(c) for c in chunks]
    assert chunks_are(chunking, rows), f"{what}: the layout has chunks of {rows} rows"
    done = list(itertools.accumulate(s.cfg.n_layers * sum(map(len, c)) for c in chunks))
    total = s.cfg.n_layers * len(every)
    want_seen = [(d, total) for d in done]
    assert seen == want_seen and done[-1] == total, (
        f"{what}: progress reported {seen}, not {want_seen} (one per chunk of the layout)")


@pytest.fixture(scope="module")
def four_tokens(tiny):
    # As many tokens as heads: a stacked sweep with its position and head axes swapped has the
    # documented shape and wrong values.
    cfg, params = tiny
    assert cfg.n_heads == 4
    clean, corrupt = np.random.default_rng(0).integers(0, 100, (2, 4)).astype(np.int32)
    return sweeps_of(cfg, params, clean, corrupt)


@pytest.mark.slow
@pytest.mark.parametrize("name", STACKED_SWEEPS)
def test_the_stacked_sweeps_are_their_kinds_laid_out_as_documented(four_tokens, name):
    s = four_tokens
    kinds, transposed = STACKED_SWEEPS[name]
    got = np.asarray(getattr(patching, name)(s.params, s.cfg, s.corrupt, s.clean_cache,
                                             logit_diff))
    want = np.stack([s.reference(k).transpose(0, 2, 1) if k in transposed else s.reference(k)
                     for k in kinds])
    assert got.shape == want.shape, f"{name}: shape {got.shape}, documented {want.shape}"
    for i, kind in enumerate(kinds):
        laid = " transposed" if kind in transposed else ""
        assert_close(got[i], want[i], rounding(want[i]), f"{name}[{i}] is not {kind}'s sweep{laid}")
        assert np.ptp(want[i]) > 0.05, f"{kind}'s patches must move the metric"


@pytest.mark.slow
def test_a_batch_of_prompts_small_chunks_and_a_metric_of_every_position(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(1)
    clean, corrupt = (rng.integers(0, 100, (2, 6)).astype(np.int32) for _ in range(2))
    _, clean_cache = run_with_cache(params, cfg, clean)

    def loss(logits):  # [B, T, V]: every position read, every column
        return -jax.nn.log_softmax(logits)[:, :-1, :][
            jnp.arange(2)[:, None], jnp.arange(5)[None], clean[:, 1:]].mean()

    seen = []
    got = patching.get_act_patch_attn_head_v_by_pos(
        params, cfg, corrupt, clean_cache, loss, chunk_size=5,
        progress=lambda done, total: seen.append((done, total)))
    want = np.asarray(patching.reference_sweep(params, cfg, corrupt, clean_cache, loss,
                                               "v_by_pos"))
    assert_close(got, want, rounding(want), "a batch of 2 prompts, chunk_size=5, a metric of "
                 "every position: not the metric of patching one activation at a time")
    assert len(seen) > 1 and seen[-1] == (2 * 6 * 4, 2 * 6 * 4)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_new_prompt_pair_reuses_the_compiled_sweep(tiny, pair):
    cfg, params = tiny
    sizes = []
    for clean, corrupt in (pair, pair[::-1]):
        _, clean_cache = run_with_cache(params, cfg, clean)
        patching.get_act_patch_mlp_out(params, cfg, corrupt, clean_cache, logit_diff)
        sizes.append(patching.sweep_chunk._cache_size())
    assert sizes[1] == sizes[0]


BAD_INPUTS = ("a_corrupted_prompt_shorter_than_the_clean", "an_unknown_kind",
              "a_clean_cache_without_the_patched_activation", "chunk_size_0")


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_inputs_get_one_line_each(tiny, pair, bad):
    cfg, params = tiny
    clean, corrupt = pair
    _, clean_cache = run_with_cache(params, cfg, clean)
    _, partial_cache = run_with_cache(params, cfg, clean, names=[("resid_pre", 0)])
    sweep = functools.partial(patching.get_act_patch_resid_pre, params, cfg)
    call, message = {
        BAD_INPUTS[0]: (lambda: sweep(corrupt[:4], clean_cache, logit_diff),
                        "patching needs prompts of the same length"),
        BAD_INPUTS[1]: (lambda: patching.patch_sweep(params, cfg, corrupt, clean_cache,
                                                     logit_diff, "resid"),
                        "kind must be one of resid_pre"),
        BAD_INPUTS[2]: (lambda: sweep(corrupt, partial_cache, logit_diff),
                        "clean_cache has no 'blocks.1.hook_resid_pre'"),
        BAD_INPUTS[3]: (lambda: sweep(corrupt, clean_cache, logit_diff, chunk_size=0),
                        "chunk_size must be an int >= 1"),
    }[bad]
    with pytest.raises(ValueError, match=message):
        call()


def test_rows_pack_suffixes_two_by_two():
    # The suffix of the patch at position p has 8 - p tokens: p and 7 - p fill a row of 9.
    rows = patching.pack([8 - p for p in range(8)], 9)
    assert sorted(sorted(r) for r in rows) == [[0, 7], [1, 6], [2, 5], [3, 4]]


# --- TransformerLens ---------------------------------------------------------------------------

# Not `get_act_patch_resid_mid`: TransformerLens 4.3's bridge aliases `hook_resid_mid` to
# `ln2.hook_in`, so its patch reaches the MLP's input but not the residual connection around
# the MLP; jaxgpt patches the residual stream itself, as HookedTransformer does (held to
# one-at-a-time patching above).
TL_SWEEPS = [  # ours, TransformerLens's
    ("get_act_patch_resid_pre", "get_act_patch_resid_pre"),
    ("get_act_patch_attn_out", "get_act_patch_attn_out"),
    ("get_act_patch_mlp_out", "get_act_patch_mlp_out"),
    ("get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_out_by_pos"),
    ("get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_q_by_pos"),
    ("get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_k_by_pos"),
    ("get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_v_by_pos"),
    ("get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_pattern_by_pos"),
    ("get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_out_all_pos"),
    ("get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_q_all_pos"),
    ("get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_k_all_pos"),
    ("get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_head_v_all_pos"),
    ("get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_head_pattern_all_pos"),
    ("get_act_patch_attn_head_pattern_dest_src_pos",
     "get_act_patch_attn_head_pattern_dest_src_pos"),
    ("get_act_patch_block_every", "get_act_patch_block_every"),
    ("get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_all_pos_every"),
    ("get_act_patch_attn_head_by_pos_every", "get_act_patch_attn_head_by_pos_every"),
]


@pytest.fixture(scope="module")
def tl_pair(tmp_path_factory):
    torch = reference("torch")
    reference("transformer_lens")
    hf = random_hf_gpt2(seed=4)
    with torch.no_grad():  # sharper attention: else patching q, k or a pattern moves nothing
        for block in hf.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)
    cfg, params = jax_weights_of(hf)
    bridge = tl_bridge(hf, tmp_path_factory.mktemp("tok"))
    clean, corrupt = np.array([[5, 9, 13, 2, 71]]), np.array([[5, 9, 40, 2, 71]])
    _, tl_cache = bridge.run_with_cache(torch.as_tensor(clean))
    _, cache = run_with_cache(params, cfg, clean)
    return cfg, params, bridge, corrupt, cache, tl_cache


FAST_TL = ("get_act_patch_attn_head_out_by_pos", "get_act_patch_block_every")


@pytest.mark.parametrize("ours,theirs", [
    pytest.param(a, b, id=a, marks=() if a in FAST_TL else pytest.mark.slow) for a, b in TL_SWEEPS])
def test_sweeps_match_transformer_lens(tl_pair, ours, theirs):
    import torch
    import transformer_lens.patching as tlp

    cfg, params, bridge, corrupt, cache, tl_cache = tl_pair

    def metric(logits):  # [1, T, V], torch or JAX alike
        return logits[0, -1, 3] - logits[0, -1, 7]

    want = getattr(tlp, theirs)(bridge, torch.as_tensor(corrupt), tl_cache, metric).numpy()
    got = np.asarray(getattr(patching, ours)(params, cfg, corrupt, cache, metric))
    # Two implementations of fp32 GPT-2 (HF numerics and jaxgpt's) on the same weights: the
    # logits here are below 0.34 in size, where fp32's spacing is 3e-8, and each side sums them
    # in its own groupings, a few spacings apart (measured: the corrupted run's logits 1.2e-7,
    # every sweep's metrics, a difference of two logits, at most 1.04e-7). 1e-6 leaves 8x for
    # another CPU's kernels, and is 1/1000 of the smallest spread asserted below.
    assert_close(got, want, 1e-6, f"{ours} is not TransformerLens's {theirs}")
    assert np.ptp(want) > 1e-3


def test_a_pattern_patch_replaces_the_whole_row_as_transformer_lens_does(tiny, pair):
    # A real clean pattern is 0 above the diagonal, as the corrupted one is; a made-up one is
    # not, and TransformerLens copies the row whole: so does the sweep.
    cfg, params = tiny
    clean, corrupt = pair
    _, cache = run_with_cache(params, cfg, clean)
    rng = np.random.default_rng(5)
    acts = dict(cache.acts)
    for i in range(cfg.n_layers):
        name = f"blocks.{i}.attn.hook_pattern"
        acts[name] = acts[name] + 0.2 * jnp.asarray(rng.random(acts[name].shape), jnp.float32)
    made_up = type(cache)(acts, params=params, cfg=cfg, model=cache.model)
    for kind in ("pattern_by_pos", "pattern_dest_src"):
        got = patching.patch_sweep(params, cfg, corrupt, made_up, logit_diff, kind)
        want = np.asarray(patching.reference_sweep(params, cfg, corrupt, made_up, logit_diff,
                                                   kind))
        assert_close(got, want, rounding(want), f"{kind} with a made-up clean pattern: not "
                     f"the metric of patching one activation at a time")
