"""The activation store: the model's activations at hook points, each row once per epoch,
shuffled on the device, resumable from its position, its memory stated."""

import dataclasses

import numpy as np
import pytest
from conftest import TINY

from jaxgpt.interp.cache import run_with_cache
from jaxgpt.sae.store import (
    ActivationStore,
    StorePosition,
    hook_widths,
    stop_layer,
    store_memory,
)
from jaxgpt.sae.train_config import SAETrainConfig

HOOKS = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post"]
# 8-token windows; a buffer of 6 batches of 32 rows is 24 windows, run 4 at a time.
TC = SAETrainConfig(training_tokens=10_000, train_batch_size_tokens=32, context_size=8,
                    n_batches_in_buffer=6, store_batch_size_prompts=4)


@pytest.fixture(scope="module")
def tokens():
    # 80 windows and 5 tokens left over: 3 full buffers and one of 8 windows (2 batches).
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], 80 * 8 + 5)


def _sorted_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_an_epoch_serves_every_row_of_every_hook_once_in_a_shuffled_order(tiny, tokens):
    cfg, params = tiny
    store = ActivationStore(params, cfg, tokens, HOOKS, TC)
    per_epoch = sum(store.batches_in(0, j) for j in range(store.buffers_per_epoch))
    assert (store.buffers_per_epoch, per_epoch) == (4, 20)  # 80 windows x 8 / 32
    got = {h: [] for h in HOOKS}
    for _ in range(per_epoch):
        batch = store.next_batch()
        for h in HOOKS:
            got[h].append(np.asarray(batch[h]))
    assert store.position == StorePosition(1, 0, 0)
    # The reference: run_with_cache over the same windows in chunks of the store's shape
    # (4 windows), so both run the same program and agree bit for bit.
    windows = tokens[:80 * 8].reshape(80, 8)
    want = {h: [] for h in HOOKS}
    for i in range(0, 80, 4):
        _, cache = run_with_cache(params, cfg, windows[i:i + 4], names=HOOKS, stop_at_layer=2)
        for h in HOOKS:
            want[h].append(np.asarray(cache[h]).reshape(4 * 8, -1))
    widths = {"blocks.0.attn.hook_z": 32, "blocks.1.hook_resid_pre": 32,
              "blocks.0.mlp.hook_post": 128}  # hook_z as H * Dh, as sae-lens flattens it
    for h in HOOKS:
        g, w = np.concatenate(got[h]), np.concatenate(want[h])
        assert g.shape == w.shape == (640, widths[h])
        np.testing.assert_array_equal(_sorted_rows(g), _sorted_rows(w))  # each row once
        assert not np.array_equal(g, w)  # and not in the windows' order
    # The hooks' rows stay aligned: row i of every hook comes from the same token.
    first = np.asarray(got["blocks.1.hook_resid_pre"][0])
    ref = np.concatenate(want["blocks.1.hook_resid_pre"])
    where = [int(np.flatnonzero((ref == r).all(1))[0]) for r in first[:5]]
    z = np.concatenate(want["blocks.0.attn.hook_z"])
    np.testing.assert_array_equal(np.asarray(got["blocks.0.attn.hook_z"][0])[:5], z[where])


def test_a_store_started_at_a_position_serves_what_follows_it(tiny, tokens):
    cfg, params = tiny
    first = ActivationStore(params, cfg, tokens, HOOKS[1:2], TC)
    for _ in range(7):  # into the second buffer
        first.next_batch()
    pos = StorePosition.from_array(first.position.to_array())
    assert pos == first.position == StorePosition(0, 1, 1)
    later = [np.asarray(first.next_batch()[HOOKS[1]]) for _ in range(16)]  # into epoch 1
    resumed = ActivationStore(params, cfg, tokens, HOOKS[1:2], TC, position=pos)
    again = [np.asarray(resumed.next_batch()[HOOKS[1]]) for _ in range(16)]
    for a, b in zip(later, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each epoch visits the windows in an order of its own.
    assert not np.array_equal(first.epoch_order(0), first.epoch_order(1))


def test_widths_and_the_layer_the_model_stops_at(tiny):
    cfg, _ = tiny
    assert hook_widths(cfg, ["hook_embed", "blocks.1.ln2.hook_normalized"]) == {
        "hook_embed": 32, "blocks.1.ln2.hook_normalized": 32}
    assert stop_layer(["hook_embed"]) == 0
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.1.mlp.hook_pre"]) == 2
    assert stop_layer(["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]) == 1
    assert stop_layer(["ln_final.hook_normalized"]) is None


def test_the_store_refuses_what_cannot_work(tiny, tokens):
    cfg, params = tiny
    with pytest.raises(ValueError, match="closest is 'blocks.1.hook_resid_pre'"):
        hook_widths(cfg, ["blocks.1.hook_resid_pr"])
    with pytest.raises(ValueError, match="not one vector per token"):
        ActivationStore(params, cfg, tokens, ["blocks.0.attn.hook_pattern"], TC)
    with pytest.raises(ValueError, match="fewer rows than one batch"):
        ActivationStore(params, cfg, tokens[:30], HOOKS, TC)
    with pytest.raises(ValueError, match="more than the model's context_length 16"):
        ActivationStore(params, cfg, tokens, HOOKS, TC.replace(context_size=32))
    with pytest.raises(ValueError, match="at least one hook"):
        ActivationStore(params, cfg, tokens, [], TC)


def test_store_memory_states_the_buffer_and_the_forward_temporaries(tiny):
    cfg, params = tiny
    mem = store_memory(params, cfg, HOOKS, TC)
    # 24 windows of 8 tokens, each row 32 + 32 + 128 float32 features.
    assert mem["buffer"] == 24 * 8 * (32 + 32 + 128) * 4
    assert mem["batch"] == 32 * (32 + 32 + 128) * 4
    assert mem["total"] == mem["buffer"] + mem["batch"] + mem["forward_temp"]
    # The model's activations grow with the windows run at once (a positive control that the
    # figure is the compiled program's, not a constant).
    more = store_memory(params, cfg, HOOKS, dataclasses.replace(TC, store_batch_size_prompts=24))
    assert 0 < mem["forward_temp"] < more["forward_temp"]
