"""The `jaxgpt` command: info and generate, offline."""

import os
import re
import subprocess
import sys

import pytest
from conftest import xla_default_env

from jaxgpt.cli import main


def _run(*args, tmp_path, env=None):
    env = {**os.environ, **(env or {})}
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
def test_info_prints_counts_without_allocating(capsys, monkeypatch, preset, params, mb):
    import jax

    from jaxgpt.nn import model

    counted = []  # (the tree's leaves, bytes of live arrays) at each count
    real = model.count_params

    def spy(tree):
        counted.append((jax.tree_util.tree_leaves(tree),
                        sum(a.nbytes for a in jax.live_arrays())))
        return real(tree)

    monkeypatch.setattr(model, "count_params", spy)
    before = sum(a.nbytes for a in jax.live_arrays())
    assert main(["info", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {params}" in out and f"size_fp32_mb: {mb}" in out
    assert counted
    for leaves, live in counted:  # shapes only, and no new array (the smallest weighs 622 MB)
        assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
        assert live - before < 2**20


@pytest.mark.slow
def test_info_of_gpt2_xl_stays_far_below_its_weights_in_memory():
    """The peak resident memory of a process that ran `jaxgpt info --preset gpt2-xl`: weights
    made and dropped again would show there (6.55 GB in float32; the process needs ~0.35 GB).
    Linux's VmHWM, the peak of this process image: `ru_maxrss` keeps the peak of the process
    it was forked from (here pytest's)."""
    code = ("import resource, sys; from jaxgpt.cli import main; "
            "rc = main(['info', '--preset', 'gpt2-xl']); "
            "from pathlib import Path; status = Path('/proc/self/status'); "
            "print([line.split()[1] for line in status.read_text().splitlines() "
            "if line.startswith('VmHWM:')][0] if status.exists() else "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr); "
            "sys.exit(rc)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    peak = int(res.stderr.split()[-1]) * 1024  # KiB (macOS's ru_maxrss is in bytes)
    weights = 1_637_792_000 * 4
    assert peak < weights / 4


def test_info_tied(capsys):
    assert main(["info", "--preset", "gpt2-small", "--tie-embeddings"]) == 0
    assert "parameters: 124,412,160" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_prints_prompt_then_text_offline(tmp_path):
    # The 124M model's random weights: at XLA's default optimisation, as drawing them runs long.
    res = _run("generate", "--prompt", "Hello, I am", "--max-new-tokens", "5", "--seed", "123",
               tmp_path=tmp_path, env=xla_default_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Hello, I am")
    assert len(res.stdout.strip()) > len("Hello, I am")
    assert "random" in res.stderr.lower()  # the weights are random until a checkpoint is given
    again = _run("generate", "--prompt", "Hello, I am", "--max-new-tokens", "5", "--seed", "123",
                 tmp_path=tmp_path, env=xla_default_env())
    assert again.stdout == res.stdout  # same seed, same weights, same greedy text


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "5"], "--top-k only apply when sampling, and sampling needs a temperature "
                           "above 0"),
        (["--top-p", "0.9", "--top-k", "3"], "--top-k and --top-p only apply when sampling"),
        (["--top-k", "0", "--temperature", "1"], "^jaxgpt generate: --top-k must be >= 1, got 0$"),
        (["--top-k", "50258", "--temperature", "1"],
         r"^jaxgpt generate: --top-k must be in \[1, 50257\] \(the vocabulary\), got 50258$"),
        (["--top-p", "1.5", "--temperature", "1"],
         r"^jaxgpt generate: --top-p must be in \(0, 1\], got 1.5$"),
        (["--temperature", "-1"],
         r"^jaxgpt generate: --temperature must be a finite number >= 0 \(0 = greedy\), "
         r"got -1.0$"),
        (["--top-k", "0"], "^jaxgpt generate: --top-k must be >= 1"),  # a bad value comes first
    ],
)
def test_sampling_flags_need_a_temperature_and_name_the_real_bounds(flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["generate", "--no-compile-cache", *flags])


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A tiny model with GPT-2's vocabulary (the CLI tokenizes with it), context 16."""
    from jaxgpt.config import GPTConfig
    from jaxgpt.io import checkpoint
    from jaxgpt.nn import init_params

    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1,
                    drop_rate=0.0, qkv_bias=False)
    return checkpoint.save(tmp_path_factory.mktemp("small") / "ckpt", init_params(cfg, 0), cfg)


@pytest.mark.slow
def test_generate_reports_timings_and_a_second_run_loads_every_program_from_the_cache(
    tmp_path, small_checkpoint
):
    args = ("generate", "--checkpoint", str(small_checkpoint), "--max-new-tokens", "4")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = _run(*args, tmp_path=tmp_path, env=env)
    second = _run(*args, tmp_path=tmp_path, env=env)
    off = _run(*args, "--no-compile-cache", tmp_path=tmp_path, env=env)
    cache = tmp_path / "cache" / "jaxgpt" / "xla"
    pattern = (
        r"jaxgpt: load [\d.]+s, compile [\d.]+s \(XLA [\d.]+s, the rest tracing and lowering; "
        r"(\d+) of (\d+) programs from the compile "
        rf"cache {re.escape(str(cache))}\), generation [\d.]+s for 4 tokens: [\d.]+ tokens/s"
    )
    hits1, n1 = map(int, re.search(pattern, first.stderr).groups())
    hits2, n2 = map(int, re.search(pattern, second.stderr).groups())
    assert (hits1, n2, hits2) == (0, n1, n1) and n1 >= 1, (first.stderr, second.stderr)
    assert any(cache.iterdir())
    assert "compile cache off" in off.stderr
    assert first.stdout == second.stdout == off.stdout


def test_generation_past_the_context_warns_once_and_shows_progress(small_checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(small_checkpoint), "--max-new-tokens", "20",
                 "--no-compile-cache"]) == 0
    out, err = capsys.readouterr()
    assert err.count("warning:") == 1
    assert ("warning: 8 of the 20 new tokens lie past context_length 16: from new token 13 on, "
            "each one recomputes the whole 16-token window") in err
    # 2 FLOP per parameter (1.6M: mostly embedding and head) and position, 16 positions
    assert re.search(r"about 5\d.\d MFLOP per token instead of 3.\d\d MFLOP", err), err
    assert "jaxgpt: generated 20/20 tokens" in err
    assert out.startswith("Hello, I am")


def test_a_prompt_outside_the_models_vocabulary_fails_before_generating(tmp_path, capsys):
    from jaxgpt.config import GPTConfig
    from jaxgpt.io import checkpoint
    from jaxgpt.nn import init_params

    cfg = GPTConfig(vocab_size=100, context_length=16, emb_dim=16, n_heads=2, n_layers=1)
    path = checkpoint.save(tmp_path / "ckpt", init_params(cfg, 0), cfg)
    with pytest.raises(SystemExit, match=r"GPT-2 token id 15496, outside the model's vocabulary "
                                         r"\[0, 100\)"):
        main(["generate", "--checkpoint", str(path), "--max-new-tokens", "40",
              "--no-compile-cache"])
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_generate_num_samples_prints_k_differing_samples_of_one_batch(small_checkpoint, capsys,
                                                                       monkeypatch):
    from jaxgpt.inference import generator as generation

    batches = []
    real = generation.Generator.stream

    def spy(self, prompts, *args, **kwargs):
        batches.append(len(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(generation.Generator, "stream", spy)
    args = ["generate", "--checkpoint", str(small_checkpoint), "--max-new-tokens", "6",
            "--no-compile-cache", "--num-samples", "3"]
    assert main([*args, "--temperature", "1.0", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert batches == [3]  # one batch of 3 rows
    parts = re.split(r"^--- sample (\d) of 3 ---\n", out, flags=re.MULTILINE)
    assert parts[0] == "" and parts[1::2] == ["1", "2", "3"]
    samples = [p.rstrip("\n") for p in parts[2::2]]
    assert all(s.startswith("Hello, I am") for s in samples)
    assert len(set(samples)) == 3  # sampled rows draw their own tokens
    assert main(args) == 0  # greedy: the same continuation K times
    greedy = re.split(r"^--- sample \d of 3 ---\n", capsys.readouterr().out, flags=re.MULTILINE)[1:]
    assert len(greedy) == 3 and len(set(greedy)) == 1
    with pytest.raises(SystemExit, match="--num-samples must be >= 1, got 0"):
        main(["generate", "--num-samples", "0"])
