"""The bundled GPT-2 tokenizer: tiktoken's gpt2 ids, with no network and no cache."""

import base64
import hashlib
import json
import math
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
from conftest import reference

from jaxgpt.tokenizer import (
    GPT2_PAT_STR,
    GPT2_RANKS_SHA256,
    get_tokenizer,
    text_to_token_ids,
    token_ids_to_text,
)

# Ids printed in "Build a Large Language Model From Scratch" (chapters 2 and 4).
GOLDEN = [
    ("Hello, I am", [15496, 11, 314, 716]),
    (
        "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
        [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114,
         286, 617, 34680, 27271, 13],
    ),
    ("Akwirw ier", [33901, 86, 343, 86, 220, 959]),
]


@pytest.mark.parametrize("text, ids", GOLDEN)
def test_golden_ids(text, ids):
    got = text_to_token_ids(text)
    assert got.dtype == np.int32 and got.shape == (1, len(ids))
    assert got[0].tolist() == ids
    assert token_ids_to_text(got) == text


def test_encoding_is_gpt2():
    tok = get_tokenizer()
    assert tok.name == "gpt2" and tok.n_vocab == 50257
    assert tok.eot_token == 50256
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_split_pattern_is_tiktokens_gpt2_pattern():
    openai_public = reference("tiktoken_ext.openai_public")
    assert GPT2_PAT_STR == openai_public.r50k_pat_str


def _openai_files(ranks):
    """OpenAI's `vocab.bpe` and `encoder.json` (bytes) that BPE `ranks` {token: rank} imply:
    the merges in rank order, each the pair that byte-pair encoding with the lower ranks
    splits its token into, and every token with its id, bytes spelled as GPT-2 spells them."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    spell = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}

    def text(token):
        return "".join(spell[b] for b in token)

    def halves(token):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            rank, i = min((ranks.get(a + b, math.inf), i)
                          for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False)))
            assert rank < ranks[token], token
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    order = sorted(ranks, key=ranks.get)
    merges = [" ".join(map(text, halves(token))) for token in order[256:]]
    vocab = "#version: 0.2\n" + "\n".join(merges) + "\n"
    encoder = {text(token): ranks[token] for token in order} | {"<|endoftext|>": 50256}
    return vocab.encode(), json.dumps(encoder).encode()


def test_shipped_ranks_are_the_gpt2_file(tmp_path, monkeypatch):
    """The shipped ranks are OpenAI's: the `vocab.bpe` and `encoder.json` they imply have the
    sha256 that tiktoken pins for `get_encoding("gpt2")`, and tiktoken builds these very ranks
    from those files. Nothing but the file comes from jaxgpt."""
    openai_public = reference("tiktoken_ext.openai_public")
    import tiktoken.load

    data = resources.files("jaxgpt").joinpath("assets/gpt2.tiktoken").read_bytes()
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in data.splitlines())}
    pinned = {}  # tiktoken's recipe for gpt2, its downloads and checks left out
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks",
                        lambda **kwargs: pinned.update(kwargs) or {})
    openai_public.gpt2()
    vocab, encoder = _openai_files(ranks)
    assert hashlib.sha256(vocab).hexdigest() == pinned["vocab_bpe_hash"]
    assert hashlib.sha256(encoder).hexdigest() == pinned["encoder_json_hash"]
    (tmp_path / "vocab.bpe").write_bytes(vocab)
    (tmp_path / "encoder.json").write_bytes(encoder)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    built = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"),
        vocab_bpe_hash=pinned["vocab_bpe_hash"], encoder_json_hash=pinned["encoder_json_hash"])
    assert built == ranks
    assert hashlib.sha256(data).hexdigest() == GPT2_RANKS_SHA256  # what jaxgpt checks on load


def test_round_trip_of_unicode_and_whitespace():
    text = "naïve café — 東京\n\n  tabs\tand  spaces 12345 'll 've"
    assert token_ids_to_text(text_to_token_ids(text)) == text


def test_decode_rejects_a_batch():
    with pytest.raises(ValueError, match="one row"):
        token_ids_to_text(np.zeros((2, 3), dtype=np.int32))


@pytest.mark.slow
def test_works_offline_with_an_empty_tiktoken_cache(tmp_path):
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from jaxgpt.tokenizer import get_tokenizer\n"
        "print(get_tokenizer().encode('Hello, I am'))\n"
    )
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[15496, 11, 314, 716]"
    assert not (tmp_path / "empty").exists()
