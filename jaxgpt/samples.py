"""The sample text a training run prints and records at each evaluation."""

from __future__ import annotations

import jax

from jaxgpt.config import GPTConfig
from jaxgpt.train import TrainConfig


def _sample(params, cfg: GPTConfig, tc: TrainConfig) -> str | None:
    """`tc.sample_prompt` continued by `tc.sample_tokens` tokens drawn with temperature and top-k
    and the key PRNGKey(tc.seed) (None without a GPT-2 vocabulary)."""
    from jaxgpt.generation import generate
    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

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
