"""The `jaxgpt` command: info and generate, offline."""

import os
import subprocess
import sys

import pytest

from jaxgpt.cli import main


def _run(*args, tmp_path):
    env = dict(os.environ)
    env.update({
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "no-cache"),
        "HTTPS_PROXY": "http://127.0.0.1:9",  # any attempt to reach the network fails
        "HTTP_PROXY": "http://127.0.0.1:9",
        "JAX_PLATFORMS": "cpu",
    })
    return subprocess.run([sys.executable, "-m", "jaxgpt", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize(
    "preset, params, mb",
    [("gpt2-small", "163,009,536", "621.83"), ("gpt2-xl", "1,637,792,000", "6247.68")],
)
def test_info_prints_counts_without_allocating(capsys, preset, params, mb):
    assert main(["info", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {params}" in out and f"size_fp32_mb: {mb}" in out


def test_info_tied(capsys):
    assert main(["info", "--preset", "gpt2-small", "--tie-embeddings"]) == 0
    assert "parameters: 124,412,160" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_prints_prompt_then_text_offline(tmp_path):
    res = _run("generate", "--prompt", "Hello, I am", "--max-new-tokens", "5", "--seed", "123",
               tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Hello, I am")
    assert len(res.stdout.strip()) > len("Hello, I am")
    assert "random" in res.stderr.lower()  # the weights are random until a checkpoint is given
    again = _run("generate", "--prompt", "Hello, I am", "--max-new-tokens", "5", "--seed", "123",
                 tmp_path=tmp_path)
    assert again.stdout == res.stdout  # same seed, same weights, same greedy text


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--max-new-tokens", "-2"], "max-new-tokens"),
        (["generate", "--prompt", ""], "prompt"),
        (["info", "--preset", "gpt5"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, args, message):
    res = _run(*args, tmp_path=tmp_path)
    assert res.returncode != 0
    assert message in res.stderr
