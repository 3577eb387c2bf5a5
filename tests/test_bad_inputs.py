"""Bad inputs that still got a traceback, a raw JAX error, silence or a late refusal (issue 31's
table, rows 1, 4, 6-13): each is one line, with the right exit code, before the work where
it can be.

The tiny checkpoints, the read-only directory and the subprocess runner are
tests/test_reliability.py's (GPT-2's vocabulary, so the command line can tokenize for them).
"""

import argparse
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_reliability
from test_reliability import SMALL, _env

from jaxgpt import cli
from jaxgpt.cli import common
from jaxgpt.cli import generate as generate_command
from jaxgpt.cli import patch as patch_command
from jaxgpt.cli.patch import layer_range
from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
from jaxgpt.inference import checks, decode
from jaxgpt.inference.decode import program_shape
from jaxgpt.inference.generator import Generator, generate, generate_stream
from jaxgpt.inference.sampling import sampling_config
from jaxgpt.inference.simple import generate_text_simple
from jaxgpt.interp import attribution, interventions, patching
from jaxgpt.interp.cache import run_with_cache, run_with_hooks
from jaxgpt.io import checkpoint
from jaxgpt.nn.model import count_params, init_params, param_shapes
from jaxgpt.tokenizer import EOT_ID, get_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"
small_ckpt = test_reliability.small_ckpt  # a checkpoint of SMALL (this module's own)
read_only = test_reliability.read_only
PATCH = ["patch", "--clean", "When Mary and John went", "--corrupt", "When John and Mary went",
         "--answer", " Mary", "--wrong", " John"]


def _no_loading(monkeypatch, *commands):
    """Make loading the weights fail the test: a refusal must come before it."""
    def load(args):
        raise AssertionError("the weights were loaded before the input was refused")
    for command in commands:
        monkeypatch.setattr(command, "load_model", load)


# 1: `<|endoftext|>` in a research command's prompt is the token, as `generate` takes it.

def test_endoftext_in_lens_and_patch_prompts_is_the_token(small_ckpt, tmp_path):
    ids = common.prompt_tokens("<|endoftext|> hello", SMALL, "--prompt", "lens")
    assert ids.tolist() == [EOT_ID, *get_tokenizer().encode(" hello")]
    lens = tmp_path / "lens.png"
    assert cli.main(["lens", "--prompt", "<|endoftext|> hello", "--checkpoint", str(small_ckpt),
                     "--out", str(lens)]) == 0
    assert lens.read_bytes()[:8] == PNG
    out = tmp_path / "patch.png"
    assert cli.main(["patch", "--clean", "<|endoftext|>Mary went", "--corrupt",
                     "<|endoftext|>John went", "--answer", " home", "--wrong", "<|endoftext|>",
                     "--checkpoint", str(small_ckpt), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


# 4: more rows than the memory holds are refused up front, naming the most that fit.

def test_the_memory_estimate_counts_weights_once_and_each_rows_cache_logits_and_activations():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    shape = program_shape(cfg, 5, 100)  # P 8, N 128, S 136
    est = checks.generation_memory
    for c in (cfg, cfg.replace(tie_embeddings=True), cfg.replace(qkv_bias=True, n_layers=2)):
        assert checks.param_count(c) == count_params(param_shapes(c))
    weights = est(cfg, 0, shape)
    assert weights == checks.param_count(cfg) * (4 + 4)  # the params and their decoding copy
    row = est(cfg, 1, shape) - weights
    assert est(cfg, 7, shape) == weights + 7 * row  # every other term is per row
    # A row holds at least its cache (keys and values, every layer) and its float32 logits.
    cache = 2 * cfg.n_layers * shape.cache_slots * cfg.emb_dim * 4
    assert row >= cache + cfg.vocab_size * 4
    assert est(cfg, 1, shape, use_cache=False) - weights < row - cache
    bf16 = jnp.bfloat16
    assert est(cfg, 1, shape, bf16) - est(cfg, 0, shape, bf16) < row
    # Sampling's [V] temporaries (where they, not the window's activations, are the peak
    # after the cache: a window of 24 tokens): more with top-k, more again with top-p.
    short = program_shape(cfg, 1, 3)
    greedy, sampled, top_k, top_p = (
        est(cfg, 1, short, sampling=sampling_config(t, k, p))
        for t, k, p in ((0.0, None, None), (1.0, None, None), (1.0, 50, None), (1.0, 50, 0.9)))
    assert greedy <= sampled < top_k < top_p
    # Longer generations hold more cache; 8 rows of 124M for 100 tokens fit in 16 GiB.
    assert est(cfg, 1, program_shape(cfg, 5, 500)) > est(cfg, 1, shape)
    assert est(cfg, 8, shape) < 16 * 2**30 // 2


def test_more_rows_than_fit_are_refused_naming_the_most_that_fit_before_tracing(tiny,
                                                                                 monkeypatch):
    cfg, params = tiny
    shape = program_shape(cfg, 2, 3)
    weights = checks.generation_memory(cfg, 0, shape)
    row = checks.generation_memory(cfg, 1, shape) - weights
    # A device whose half holds the weights and exactly 1,000 rows (what `ulimit -v` or a
    # cgroup would set: device_memory reads them; tests/test_reliability.py checks that).
    memory = 2 * (weights + 1000 * row)
    monkeypatch.setattr(checks, "device_memory", lambda device: memory)
    before = dict(decode.TRACE_COUNTS)
    cpu = jax.devices("cpu")[:1]
    checks.check_generation_memory(cfg, 1000, shape, devices=cpu)
    line = (r"^1,001 rows would take about [\d.]+ MiB to generate \(the weights [\d.]+ KiB, then "
            r"[\d.]+ KiB a row for the KV cache, logits, activations and tokens\), more than "
            r"half of the [\d.]+ MiB cpu memory this process may use: at most 1,000 rows "
            r"\(samples x prompts\) fit with these settings \(8 prompt slots, 16 new-token "
            r"slots, float32\)$")
    prompts = [[1, 2]] * 1001
    with pytest.raises(ValueError, match=line):
        generate(params, cfg, prompts, 3)
    with pytest.raises(ValueError, match=line):
        Generator(params, cfg, devices=cpu).generate(prompts, 3)
    with pytest.raises(ValueError, match=line):
        generate_stream(params, cfg, prompts, 3)  # refused when called, before a chunk
    assert dict(decode.TRACE_COUNTS) == before
    # Weights that do not fit at all are said so, not "at most 0 rows".
    monkeypatch.setattr(checks, "device_memory", lambda device: weights)
    with pytest.raises(ValueError, match=r"not even one row fits: the weights alone take "):
        checks.check_generation_memory(cfg, 1, shape, devices=cpu)


def test_generate_num_samples_past_the_memory_is_one_line_before_loading(small_ckpt, monkeypatch):
    _no_loading(monkeypatch, generate_command)
    monkeypatch.setattr(checks, "device_memory", lambda device: 4 * 2**30)
    with pytest.raises(SystemExit, match=r"^jaxgpt generate: --num-samples 100,000 would take "
                                         r"about [\d.]+ GiB to generate \(.*\), more than half "
                                         r"of the 4.0 GiB cpu memory this process may use: at "
                                         r"most [\d,]+ samples fit with these settings "):
        cli.main(["generate", "--checkpoint", str(small_ckpt), "--num-samples", "100000",
                  "--max-new-tokens", "3", "--no-compile-cache"])


@pytest.mark.slow
def test_generate_num_samples_past_ulimit_v_exits_1_with_one_line(tmp_path, small_ckpt):
    # 100,000 rows of SMALL's 50,257 float32 logits alone are 20 GB: past any 8 GB limit.
    res = subprocess.run(
        ["bash", "-c", 'ulimit -v 8000000 && exec "$@"', "-", sys.executable, "-m", "jaxgpt",
         "generate", "--checkpoint", str(small_ckpt), "--num-samples", "100000",
         "--max-new-tokens", "3", "--no-compile-cache"],
        capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("jaxgpt generate: --num-samples 100,000 would take about ")
    assert "of the 7.6 GiB cpu memory this process may use: at most " in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# 6: a reader of stdout that goes away (`| head -c 5`) ends the command quietly.

@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--stream", "--max-new-tokens", "100000"],
                                   ["--num-samples", "3000", "--max-new-tokens", "8"]],
                         ids=["stream", "at-the-end"])
def test_a_closed_stdout_ends_generate_quietly_with_141(tmp_path, small_ckpt, flags):
    # Without --stream the text is 3,000 samples (> 64 KiB, a pipe's buffer), so the print
    # at the end blocks until the reader goes, and then fails: no race with the reader.
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxgpt", "generate", "--checkpoint", str(small_ckpt),
         "--prompt", "Hello", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env(tmp_path))
    assert len(proc.stdout.read(5)) == 5  # what `head -c 5` does, then it exits
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == cli.BROKEN_PIPE, err
    assert "Broken pipe" not in err and "Errno 32" not in err and "Exception" not in err, err


# 7: emoji and CJK text in a research command's picture: escaped, not a warning per glyph.

@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["lens", "--prompt", "Hi 😀 中国 のテキスト"],
    ["attention", "--prompt", "Hi 😀 中国 のテキスト"],
    ["patch", "--clean", "😀 中国 Mary went", "--corrupt", "😀 中国 John went", "--answer",
     " home", "--wrong", " John"]], ids=["lens", "attention", "patch"])
def test_emoji_and_cjk_in_a_picture_give_no_glyph_warnings(tmp_path, small_ckpt, argv):
    out = tmp_path / "out.png"
    res = subprocess.run([sys.executable, "-m", "jaxgpt", *argv, "--checkpoint", str(small_ckpt),
                          "--out", str(out)], capture_output=True, text=True, timeout=300,
                         env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == PNG
    assert "Glyph" not in res.stderr and "Warning" not in res.stderr, res.stderr


# 8: an unusable compile cache directory is one jaxgpt warning, and no cache.

@pytest.mark.slow
def test_an_unwritable_compile_cache_is_one_warning_naming_the_flag(tmp_path, small_ckpt,
                                                                     capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for path in ("/proc/nope", str(a_file)):
        args = argparse.Namespace(no_compile_cache=False, compile_cache=path)
        assert common.enable_compile_cache(args) is None
        err = capsys.readouterr().err
        assert err.startswith(f"jaxgpt: warning: --compile-cache {path} cannot be used (")
        assert err.endswith("compiling without a cache (--no-compile-cache: no warning)\n")
    # The whole command: that line, and none of JAX's (a warning per program, with its path).
    res = subprocess.run([sys.executable, "-m", "jaxgpt", "generate", "--checkpoint",
                          str(small_ckpt), "--max-new-tokens", "2", "--compile-cache",
                          "/proc/nope"], capture_output=True, text=True, timeout=300,
                         env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "compile cache off" in res.stderr
    assert "Warning" not in res.stderr and ".py:" not in res.stderr, res.stderr
    assert res.stderr.count("/proc/nope") == 1


# 9: `patch`'s refusals come before the sweep.

def test_patch_refuses_a_read_only_out_before_loading(read_only, monkeypatch):
    _no_loading(monkeypatch, patch_command)
    with pytest.raises(SystemExit, match=rf"^jaxgpt patch: --out {read_only}/p.png: cannot "
                                         rf"write there \(permission denied\)$"):
        cli.main([*PATCH, "--out", str(read_only / "p.png")])


def test_patch_normalize_with_nothing_to_restore_is_refused_before_the_sweep(
        tmp_path, small_ckpt, monkeypatch):
    out = str(tmp_path / "p.png")
    same = ["patch", "--clean", "When Mary went", "--corrupt", "When Mary went", "--answer",
            " Mary", "--wrong", " John", "--normalize", "--out", out]
    with monkeypatch.context() as m:
        _no_loading(m, patch_command)
        with pytest.raises(SystemExit, match="^jaxgpt patch: --normalize: --clean and "
                                             "--corrupt are the same tokens"):
            cli.main(same)

    def sweep(*args, **kwargs):
        raise AssertionError("the sweep ran before the refusal")

    monkeypatch.setattr(patching, "patch_sweep", sweep)
    # Different prompts, but one token for both answers: the same logit difference (0).
    with pytest.raises(SystemExit, match="^jaxgpt patch: --normalize: the clean and corrupted "
                                         "prompts give the same logit difference"):
        cli.main([*PATCH[:5], "--answer", " Mary", "--wrong", " Mary", "--normalize",
                  "--checkpoint", str(small_ckpt), "--out", out])


# 10 and 12: a hook that changes the dtype or fails on the activation's shape names its point.

def test_a_hook_returning_a_narrower_dtype_is_refused_naming_its_point(tiny):
    cfg, params = tiny
    tokens = np.arange(5)
    for dtype in (jnp.bfloat16, jnp.int32):
        hooks = [("blocks.1.hook_resid_pre", lambda x, name, d=dtype: x.astype(d))]
        with pytest.raises(ValueError, match=rf"^the hook at blocks.1.hook_resid_pre returned "
                                             rf"dtype {jnp.dtype(dtype).name} for an activation "
                                             rf"of dtype float32: return float32"):
            run_with_hooks(params, cfg, tokens, hooks)
    with pytest.raises(ValueError, match=r"^the hook at blocks.0.attn.hook_pattern returned "
                                         r"shape \(1, 4, 5\) for an activation of shape "
                                         r"\(1, 4, 5, 5\)"):
        run_with_hooks(params, cfg, tokens, [("blocks.0.attn.hook_pattern",
                                              lambda x, name: x[..., 0])])
    # A wider float (a float32 vector added to bf16 activations) is cast back, as before.
    vector = jnp.ones(cfg.emb_dim, jnp.float32)
    out = generate(params, cfg, [[1, 2, 3]], 2, dtype=jnp.bfloat16,
                   hooks=[("blocks.0.hook_resid_pre", interventions.add(vector))])
    assert np.asarray(out).shape == (1, 3 + 2)  # the prompt and the new tokens


def _nan_pattern(rows=None, cached_only=False):
    """A hook making the attention pattern NaN: of `rows` (default all), and with
    `cached_only` only in the cached steps (one query; the prefill's has the prompt's)."""
    def hook(x, name):
        if cached_only and x.shape[2] != 1:
            return x
        return x * jnp.nan if rows is None else x.at[rows].set(jnp.nan)
    return [("blocks.0.attn.hook_pattern", hook)]


NOT_FINITE = (r"^the logits stopped being finite \(NaN or inf\) at new token {step} of {n}, "
              r"in {rows}: a hook or the weights made them so, and a token chosen from them "
              r"would mean nothing$")


def test_a_hook_making_the_pattern_nan_stops_every_generation_path(tiny):
    cfg, params = tiny
    prompts = [[1, 2, 3], [4, 5, 6]]
    both = NOT_FINITE.format(step=1, n=6, rows="rows 0, 1 of 2")
    gen = Generator(params, cfg)
    for run in (lambda **kw: gen.generate(prompts, 6, **kw),
                lambda **kw: generate(params, cfg, np.asarray(prompts), 6, **kw),
                lambda **kw: gen.generate(prompts, 6, use_cache=False, **kw),
                lambda **kw: gen.generate(prompts, 6, temperature=1.0, top_p=0.9,
                                          key=jax.random.key(0), **kw),
                lambda **kw: list(gen.stream(prompts, 6, **kw))):
        with pytest.raises(FloatingPointError, match=both):
            run(hooks=_nan_pattern())
    # One row's NaN is that row's; the first step is the first one whose logits were NaN.
    with pytest.raises(FloatingPointError, match=NOT_FINITE.format(step=2, n=6,
                                                                   rows="row 1 of 2")):
        gen.generate(prompts, 6, hooks=_nan_pattern(rows=1, cached_only=True))


def test_the_stream_yields_the_tokens_before_the_first_nan_then_stops(tiny):
    cfg, params = tiny
    gen = Generator(params, cfg)
    want = np.asarray(gen.generate([[1, 2, 3]], 6))[:, 3:]
    chunks = gen.stream([[1, 2, 3]], 6, chunk_size=4, hooks=_nan_pattern(cached_only=True))
    assert np.asarray(next(chunks)).tolist() == want[:, :1].tolist()  # the prefill's token
    with pytest.raises(FloatingPointError, match=NOT_FINITE.format(step=2, n=6,
                                                                   rows="row 0 of 1")):
        next(chunks)


def test_finite_logits_give_the_same_tokens_with_the_check(tiny):
    cfg, params = tiny
    prompt = np.asarray([[1, 2, 3], [7, 8, 9]])
    want = np.asarray(generate_text_simple(params, cfg, prompt, 20))
    gen = Generator(params, cfg)
    identity = [("blocks.0.attn.hook_pattern", lambda x, name: x * 1.0)]
    for use_cache in (True, False):
        got = gen.generate(prompt, 20, use_cache=use_cache, hooks=identity)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.concatenate(list(gen.stream(prompt, 20)), axis=1),
                                  want[:, 3:])


@pytest.mark.parametrize("stream", [False, True])
def test_generate_with_nan_weights_is_one_line_exit_1(tmp_path, stream):
    params = init_params(SMALL, 0)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    ckpt = checkpoint.save(tmp_path / "nan", params, SMALL)
    with pytest.raises(SystemExit, match=r"^jaxgpt generate: the logits stopped being finite "
                                         r"\(NaN or inf\) at new token 1 of 3, in row 0 of 1: a "
                                         r"hook or the weights made them so"):
        cli.main(["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "3",
                  "--no-compile-cache", *(["--stream"] if stream else [])])


def test_a_vector_that_does_not_fit_names_the_hook_point_and_the_shapes(tiny):
    cfg, params = tiny
    hooks = [("blocks.0.hook_resid_pre", interventions.add(jnp.ones(77)))]
    with pytest.raises(ValueError, match=r"^the hook at blocks.0.hook_resid_pre failed on an "
                                         r"activation of shape \(1, \d+, 32\) float32: .*\(77,\)"):
        generate(params, cfg, [[1, 2, 3]], 4, hooks=hooks)


def test_empty_tokens_are_said_to_be_empty(tiny):
    cfg, params = tiny
    for empty in ([], [[]], np.zeros((1, 0), np.int32)):
        with pytest.raises(ValueError, match=r"^tokens is empty \(shape \((0,|1, 0)\)\): give "
                                             r"at least one token$"):
            run_with_cache(params, cfg, empty)


# 11: a metric that is not one number is refused before the sweep, saying what it returned.

def test_a_metric_that_is_not_a_scalar_is_refused_saying_what_it_gave(tiny):
    cfg, params = tiny
    tokens = np.arange(4)
    _, cache = run_with_cache(params, cfg, tokens)

    def per_position(logits):  # written for [T, V]; given [B, T, V], it returns [V]
        return logits[-1, 7] - logits[-1, 8]

    sweeps = [patching.get_act_patch_resid_pre, attribution.attribution_patch,
              patching.reference_sweep]
    for sweep in sweeps:
        kind = () if sweep is patching.get_act_patch_resid_pre else ("resid_pre",)
        with pytest.raises(ValueError, match=r"^the metric must return one number \(a scalar\), "
                                             r"got shape \(100,\) from logits of shape "
                                             r"\(1, 4, 100\) \(\[B, T, V\], of \[B, T\] tokens\)$"):
            sweep(params, cfg, tokens[None], cache, per_position, *kind)
    with pytest.raises(ValueError, match=r"got shape \(4,\) from logits of shape \(4, 100\) "
                                         r"\(\[T, V\], of \[T\] tokens\)$"):
        patching.get_act_patch_resid_pre(params, cfg, tokens, cache, lambda logits: logits[:, 7])


# 13: `--layers` as a Python slice: negative from the end, a reversed range said so.

def test_layers_count_from_the_end_and_a_reversed_range_is_said_so():
    assert layer_range("-2:", 13, "lens") == range(11, 13)
    assert layer_range("1:-1", 12, "patch") == range(1, 11)
    assert layer_range(":", 12, "patch") == range(12)
    with pytest.raises(SystemExit, match=r"^jaxgpt patch: --layers 3:1 is reversed, e\.g\. "
                                         r"1:3: FIRST must be below STOP \(STOP excluded\)$"):
        layer_range("3:1", 12, "patch")
    with pytest.raises(SystemExit, match=r"^jaxgpt patch: --layers 2:2 selects no row"):
        layer_range("2:2", 12, "patch")
    with pytest.raises(SystemExit, match=r"^jaxgpt lens: --layers -14: is out of range: the "
                                         r"model has 13 rows to draw, 0:13 \(or -13:\)$"):
        layer_range("-14:", 13, "lens")
    # argparse takes `-2:` as the value, not as an unknown flag.
    parser = cli.build_parser()
    for argv in (["lens", "--prompt", "Hi", "--layers", "-2:"],
                 [*PATCH, "--layers", "-3:-1"]):
        assert parser.parse_args(argv).layers == argv[-1]


def test_patch_and_lens_check_layers_before_loading(monkeypatch, tmp_path):
    _no_loading(monkeypatch, patch_command, cli.lens)
    monkeypatch.setattr(patch_command, "peek_config", lambda args: SMALL)
    monkeypatch.setattr(cli.lens, "peek_config", lambda args: SMALL)
    out = str(tmp_path / "p.png")
    with pytest.raises(SystemExit, match="^jaxgpt patch: --layers 1:0 is reversed"):
        cli.main([*PATCH, "--layers", "1:0", "--out", out])
    with pytest.raises(SystemExit, match="^jaxgpt lens: --layers 2:1 is reversed"):
        cli.main(["lens", "--prompt", "Hi", "--layers", "2:1", "--out", out])
