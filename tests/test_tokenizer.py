"""The bundled GPT-2 tokenizer: tiktoken's gpt2 ids, with no network and no cache."""

import hashlib
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


def test_shipped_ranks_are_the_gpt2_file():
    data = resources.files("jaxgpt").joinpath("assets/gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == GPT2_RANKS_SHA256


def test_round_trip_of_unicode_and_whitespace():
    text = "naïve café — 東京\n\n  tabs\tand  spaces 12345 'll 've"
    assert token_ids_to_text(text_to_token_ids(text)) == text


def test_decode_rejects_a_batch():
    with pytest.raises(ValueError, match="one row"):
        token_ids_to_text(np.zeros((2, 3), dtype=np.int32))


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
