"""A Hugging Face GPT-2 `config.json` to and from `GPTConfig`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from jaxgpt.config import GPTConfig

# transformers' GPT2Config defaults: a key absent from config.json takes these values.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# What the GPT-2 format cannot say about a jaxgpt model, kept in config.json under a key of its
# own (transformers keeps unknown keys and ignores them): whether Q/K/V have biases.
QKV_BIAS_KEY = "jaxgpt_qkv_bias"
# Keys read from config.json: one that is missing but spelt almost like a key there (n_embed
# for n_embd) is a typo that would silently take transformers' default.
_READ_KEYS = (*_HF_DEFAULTS, "n_ctx", "model_type", "architectures", QKV_BIAS_KEY)
# Both spell the tanh approximation of GELU that jaxgpt computes.
_HF_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def hf_config_to_gpt(config: Mapping[str, Any], source: str = "config.json") -> GPTConfig:
    """A `GPTConfig` from a Hugging Face GPT-2 `config.json` dict.

    Keys that would make transformers compute something jaxgpt does not (another model_type,
    a LayerNorm eps other than 1e-5, a non-tanh GELU, attention scaling variants, n_inner other
    than 4 * n_embd, cross-attention) raise ValueError naming `source` and the key, and so does a
    key spelt almost like one of GPT-2's that is missing (`n_embed` for `n_embd`). The
    checkpoint always has query/key/value biases, so `qkv_bias=True` unless config.json says
    `"jaxgpt_qkv_bias": false` (as `gpt_config_to_hf` writes for a model without them: the
    biases are then zero). jaxgpt has one dropout rate: when
    resid/embd/attn_pdrop differ, `resid_pdrop` is used (with a warning; inference ignores it).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    _check_spelling(config, source)
    c = {**_HF_DEFAULTS, **config}
    if "n_positions" not in config and "n_ctx" in config:  # configs older than transformers 2.x
        c["n_positions"] = config["n_ctx"]

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{source}: {key}={c.get(key)!r} is not supported: {why}")

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "gpt2" and not (
        model_type is None and archs and all(str(a).startswith("GPT2") for a in archs)
    ):
        raise bad("model_type", "jaxgpt reads GPT-2 checkpoints (model_type 'gpt2') only")
    sizes = {}
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = c[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(key, "it must be a positive int")
        sizes[key] = value
    eps = c["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
        raise bad("layer_norm_epsilon", "jaxgpt's LayerNorm uses eps=1e-5")
    if c["activation_function"] not in _HF_TANH_GELU:
        raise bad("activation_function",
                  f"jaxgpt computes the tanh GELU ({' or '.join(_HF_TANH_GELU)})")
    if c["n_inner"] is not None and c["n_inner"] != 4 * sizes["n_embd"]:
        raise bad("n_inner", f"jaxgpt's feed-forward width is 4 * n_embd = {4 * sizes['n_embd']}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if c[key] is not want:
            raise bad(key, f"jaxgpt needs {str(want).lower()}")
    if not isinstance(c["tie_word_embeddings"], bool):
        raise bad("tie_word_embeddings", "it must be true or false")
    drop_rate = _drop_rate(c, bad, source)
    qkv_bias = config.get(QKV_BIAS_KEY, True)  # a GPT-2 checkpoint always holds the biases
    if not isinstance(qkv_bias, bool):
        raise bad(QKV_BIAS_KEY, "it must be true or false")
    try:
        return GPTConfig(
            vocab_size=sizes["vocab_size"],
            context_length=sizes["n_positions"],
            emb_dim=sizes["n_embd"],
            n_heads=sizes["n_head"],
            n_layers=sizes["n_layer"],
            drop_rate=drop_rate,
            qkv_bias=qkv_bias,
            tie_embeddings=c["tie_word_embeddings"],
        )
    except ValueError as e:  # e.g. n_embd not divisible by n_head
        raise ValueError(f"{source}: {e}") from e


def gpt_config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The `config.json` dict of a transformers `GPT2LMHeadModel` with `cfg`'s architecture."""
    # GPT-2's <|endoftext|> id, where the vocabulary has it (transformers warns otherwise).
    eot = 50256 if cfg.vocab_size > 50256 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
        QKV_BIAS_KEY: cfg.qkv_bias,
    }


def _drop_rate(c: Mapping[str, Any], bad: Callable[[str, str], ValueError], source: str) -> float:
    """jaxgpt's one dropout rate from a config's three: `resid_pdrop`, with a warning when the
    others differ (inference is not affected)."""
    rates = {}
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        rate = c[key]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise bad(key, "a dropout rate must be in [0, 1)")
        rates[key] = float(rate)
    if len(set(rates.values())) > 1:
        warnings.warn(
            f"{source}: resid/embd/attn_pdrop differ ({rates}); jaxgpt has one drop_rate and "
            f"uses resid_pdrop={rates['resid_pdrop']} (inference is not affected)",
            stacklevel=3,
        )
    return rates["resid_pdrop"]


def _check_spelling(config: Mapping[str, Any], source: str) -> None:
    """ValueError naming a key that looks like a misspelt GPT-2 key (`n_embed`) whose real
    spelling is missing: transformers would ignore it and use its default instead."""
    import difflib

    absent = [k for k in _READ_KEYS if k not in config]
    for key in config:
        if key in _READ_KEYS or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, absent, n=1, cutoff=0.8)
        if close:
            default = f" {_HF_DEFAULTS[close[0]]!r}" if close[0] in _HF_DEFAULTS else ""
            raise ValueError(
                f"{source}: unknown key {key!r}; did you mean {close[0]!r}? Without "
                f"{close[0]!r}, transformers and jaxgpt take its default{default}"
            )

