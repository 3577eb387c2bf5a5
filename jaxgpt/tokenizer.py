"""The GPT-2 tokenizer, built offline from BPE ranks shipped inside the package.

`tiktoken.get_encoding("gpt2")` downloads OpenAI's vocabulary on first use; this module builds
the same `tiktoken.Encoding` from `jaxgpt/assets/gpt2.tiktoken` instead. Tokenizing happens
outside jit: the rest of the library works on token ids.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

import numpy as np
import numpy.typing as npt
import tiktoken

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's gpt2 split pattern (its `r50k_pat_str`); equivalent to GPT-2's original regex.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def _read_ranks() -> dict[bytes, int]:
    data = resources.files("jaxgpt").joinpath("assets/gpt2.tiktoken").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise RuntimeError(
            f"jaxgpt/assets/gpt2.tiktoken is damaged (sha256 {digest}, "
            f"expected {GPT2_RANKS_SHA256}); reinstall jaxgpt"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 `tiktoken.Encoding` (50257 ids, `<|endoftext|>` = 50256), with no network."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_read_ranks(),
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=50257,
    )


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> np.ndarray:
    """Encode `text` as int32 ids of shape `[1, T]` (`<|endoftext|>` allowed, as in the book)."""
    tokenizer = tokenizer or get_tokenizer()
    ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return np.asarray(ids, dtype=np.int32)[None, :]


def token_ids_to_text(ids: npt.ArrayLike, tokenizer: tiktoken.Encoding | None = None) -> str:
    """Decode ids of shape `[T]` or `[1, T]` back to text."""
    tokenizer = tokenizer or get_tokenizer()
    flat = np.asarray(ids)
    if flat.ndim == 2:
        if flat.shape[0] != 1:
            raise ValueError(f"token_ids_to_text decodes one row; got shape {flat.shape}")
        flat = flat[0]
    elif flat.ndim != 1:
        raise ValueError(f"token_ids_to_text takes ids of shape [T] or [1, T]; got {flat.shape}")
    return tokenizer.decode([int(i) for i in flat])


def token_strings(ids: npt.ArrayLike, tokenizer: tiktoken.Encoding | None = None) -> list[str]:
    """Each token of `ids` (`[T]`) as text of its own, for labels. GPT-2 splits most emoji
    and CJK characters across tokens, and a token's part of a character is written as its
    bytes (`\\xf0\\x9f\\x98`) where decoding the token alone gives U+FFFD, which says nothing."""
    tokenizer = tokenizer or get_tokenizer()
    return [tokenizer.decode_single_token_bytes(int(i)).decode("utf-8", "backslashreplace")
            for i in np.asarray(ids).reshape(-1)]
