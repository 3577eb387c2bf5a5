"""What a training run measures at each evaluation: the validation loss and a sample text."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.generator import generate
from jaxgpt.nn.model import GPTModel
from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from jaxgpt.training.config import DTYPES, TrainConfig
from jaxgpt.training.loss import cross_entropy_sum
from jaxgpt.training.step import flat_logits


@functools.lru_cache(maxsize=8)
def make_eval_step(cfg: GPTConfig, dtype: str = "float32") -> Callable:
    """Jitted `eval_step(params, inputs, targets) -> (nll_sum, count)` with dropout off."""
    model = GPTModel(cfg, dtype=DTYPES[dtype])

    @jax.jit
    def eval_step(params: Any, inputs: jax.Array,
                  targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        return cross_entropy_sum(flat_logits(model, params, inputs), targets.reshape(-1))

    return eval_step


def evaluate(
    eval_step: Callable, params: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Mean loss over all targets of `batches` (NaN if there are none)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        s, n = jax.device_get(eval_step(params, inputs, targets))
        total, count = total + float(s), count + int(n)
    return total / count if count else float("nan")



def sample_text(params: Any, cfg: GPTConfig, tc: TrainConfig) -> str | None:
    """`tc.sample_prompt` continued by `tc.sample_tokens` tokens drawn with temperature and top-k
    and the key PRNGKey(tc.seed) (None without a GPT-2 vocabulary)."""
    if tc.sample_tokens == 0 or not tc.sample_prompt:
        return None
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(tc.sample_prompt, tokenizer)
    if cfg.vocab_size < tokenizer.n_vocab or idx.shape[1] > cfg.context_length:
        return None  # a custom vocabulary: GPT-2 text has no meaning here
    if jax.process_count() > 1:
        # generate runs on this process's devices: every process gets all the weights (the
        # same in each, so they all draw the same sample).
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    sampled = tc.sample_temperature > 0
    out = generate(
        params,
        cfg,
        [[int(t) for t in jax.device_get(idx)[0]]],
        tc.sample_tokens,
        temperature=tc.sample_temperature,
        top_k=min(tc.sample_top_k, cfg.vocab_size) if sampled and tc.sample_top_k else None,
        key=jax.random.PRNGKey(tc.seed) if sampled else None,
    )
    return token_ids_to_text(out[0], tokenizer)
