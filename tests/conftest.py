"""Shared fixtures: a tiny config for fast tests; the 124M config only where the figure matters."""

import importlib
import json
import os
import sys
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
from jaxgpt.nn import init_params
from jaxgpt.nn.cache import init_cache
from jaxgpt.training.data import save_token_file

# The tests compile thousands of small programs, and compiling is most of their time. XLA's
# backend optimisation level 0 (LLVM's -O0 for the CPU's machine code) compiles about 40%
# faster; the programs themselves (HLO, fusions, buffers, what the tests inspect and compare)
# are the same, and so are the results within every test's bound (docs/development.md). The
# processes the tests start inherit it. A level set in XLA_FLAGS already is kept (to run the
# suite at XLA's default: XLA_FLAGS=--xla_backend_optimization_level=2). XLA reads XLA_FLAGS
# when JAX first compiles, so setting it here, before any test runs, is in time.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()


def xla_default_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) with the tests' optimisation level taken out of
    XLA_FLAGS, for a process whose time goes to running rather than compiling (thousands of
    training steps, or the 124M model's random weights), where level 0 is the slower."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAG, "").strip()
    return env


# A suite launched in the background (`pytest &` in a script, CI runners that start jobs so)
# starts with SIGINT ignored, and every child inherits that: exec keeps an ignored signal
# ignored, and Python then installs no KeyboardInterrupt handler, so a test's SIGINT never
# reaches the child. That is Unix's convention (bash's manual: a background command ignores
# SIGINT, so that a Ctrl-C of the script leaves it running), and the commands keep it; so the
# tests give the children they interrupt SIGINT's default disposition. By a trampoline that
# execs rather than `preexec_fn`: Python code between fork and exec may deadlock in a process
# with threads (JAX's), and exec keeps the pid the test signals.
_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def default_sigint(argv: list[str]) -> list[str]:
    """`argv` as a command line that runs it with SIGINT's default disposition (Ctrl-C as
    from a terminal), however this process was launched: for every test that sends a child
    SIGINT."""
    return [sys.executable, "-c", _DEFAULT_SIGINT, *argv]


_TORCH = "pip install torch==2.13.0"
_TEST_EXTRA = 'pip install -e ".[test]"'
_BOOK = "pip install --no-deps llms-from-scratch==1.0.19"
# Every module the tests take from outside jaxgpt's own dependencies to compare against (and
# those of jaxgpt's that the book's modules need), with how to install it. Each is imported for
# real when the run starts, so a missing module, or one that fails on a missing dependency of
# its own (`llms_from_scratch.ch05` imports tqdm), stops the run there instead of skipping the
# parity tests (`bash .ci/run` installs them all). Tests take them with `reference(name)`.
REFERENCES = {
    "torch": _TORCH,
    "transformers": _TEST_EXTRA,
    "transformers.models.gpt2.modeling_gpt2": _TEST_EXTRA,  # `import transformers` is lazy
    "safetensors.numpy": _TEST_EXTRA,
    "tqdm": _TEST_EXTRA,
    "matplotlib.pyplot": _TEST_EXTRA,
    "tiktoken_ext.openai_public": _TEST_EXTRA,
    "llms_from_scratch.ch02": _BOOK,
    "llms_from_scratch.ch03": _BOOK,
    "llms_from_scratch.ch04": _BOOK,
    "llms_from_scratch.ch05": _BOOK,
    "transformer_lens": _TEST_EXTRA,
}
# Set to 1 to run only what needs no reference (the parity tests are then skipped); ignored
# under CI, where a reference that does not import is always an error.
SKIP_REFERENCES_ENV = "JAXGPT_TESTS_WITHOUT_REFERENCES"
# The reference modules as imported when the run started (filled by pytest_configure).
IMPORTED: dict[str, ModuleType] = {}


# The files of the longest tests: first, so that under pytest-xdist the short ones fill the
# workers' time around them rather than wait for them at the end. (test_sharding.py, the other
# user of `eight_devices`, stays where it is: by then the 8-device run is done.)
LONGEST_FIRST = ("test_generate_devices.py", "test_induction_head.py", "test_multiprocess.py",
                 "test_aot.py", "test_induction_search.py")
# libtpu lets one process at a time load it (a lock file), to share a TPU's chips; the tests
# only compile for a TPU, without one, in as many pytest-xdist workers as run them.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_collection_modifyitems(items):
    """The longest tests first."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable


def references_optional() -> bool:
    """Whether this run may go on without the references (the opt-out, outside CI)."""
    return os.environ.get(SKIP_REFERENCES_ENV) == "1" and os.environ.get("CI") != "true"


def import_references() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """Import every module of REFERENCES: (the modules, {name: error} of those that failed)."""
    modules, failed = {}, {}
    for name in REFERENCES:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as e:  # ImportError, or whatever a broken install raises on import
            failed[name] = f"{type(e).__name__}: {e}"
    return modules, failed


def require_references(failed: dict[str, str]) -> None:
    """Stop the run (UsageError) if a reference failed to import, unless the opt-out holds."""
    if not failed or references_optional():
        return
    what = "; ".join(f"{name} ({error})" for name, error in failed.items())
    how = "; ".join(dict.fromkeys(REFERENCES[name] for name in failed))
    raise pytest.UsageError(
        f"the parity tests' references do not import: {what}. Install them ({how}), or run "
        f"`bash .ci/run`, which installs everything. To run only the tests that need no "
        f"reference, set {SKIP_REFERENCES_ENV}=1 (not honoured under CI=true)."
    )


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller: the workers import them (and stop on a failure)
    modules, failed = import_references()
    require_references(failed)
    IMPORTED.update(modules)


def reference(name: str) -> ModuleType:
    """The reference module `name` (a key of REFERENCES) as imported when the run started.

    Where it did not import, the run stopped then, unless the opt-out allowed it to go on:
    then the calling test (or, called at a file's top level, the file) is skipped.
    """
    if name not in REFERENCES:
        raise KeyError(f"{name} is not in conftest.REFERENCES: add it there, so that the run "
                       f"imports it when it starts")
    if name in IMPORTED:
        return IMPORTED[name]
    if not references_optional():
        pytest.fail(f"{name} did not import when the run started", pytrace=False)
    pytest.skip(f"{name} does not import ({SKIP_REFERENCES_ENV}=1)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _compile_cache_in_tmp(tmp_path_factory, monkeypatch):
    """In-process CLI calls turn JAX's persistent compilation cache on: keep it in a directory
    of the test run, not the user's ~/.cache (nor the test's tmp_path, which tests use as a run
    directory that must hold only jaxgpt's files), and switch it off again afterwards."""
    import jax

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


# The book's dict for a tiny model: vocab ~100, context 16, emb 32, 4 heads, 2 layers.
TINY = {
    "vocab_size": 100,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


# Scripts that need 8 simulated CPU devices, by name: XLA_FLAGS must be set before jax is
# imported, so they run in a fresh interpreter, all of them in one (`eight_devices`). Each
# prints one JSON line last; a test file adds its script when it is imported.
EIGHT_DEVICE_SCRIPTS: dict[str, str] = {}
_EIGHT_DEVICES_CHILD = """
import contextlib, io, json, sys
for name, code in json.loads(sys.stdin.read()).items():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), {"__name__": name})
    print(name, out.getvalue().strip().splitlines()[-1])
"""


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory):
    """`{name: the JSON its script printed}` for every script of EIGHT_DEVICE_SCRIPTS, run
    one after the other in one subprocess with 8 simulated CPU devices (one start of JAX), once
    a run: under pytest-xdist the first worker to need it runs it, the others read its result
    (the directory all workers of this run share, under a lock)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/popen-gwI: the run's own directory
    result = shared / "eight-devices.json"
    with open(shared / "eight-devices.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.is_file():
            result.write_text(json.dumps(_run_eight_devices()))
    return json.loads(result.read_text())


def _run_eight_devices() -> dict:
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES_CHILD], env=env,
                          input=json.dumps(EIGHT_DEVICE_SCRIPTS), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split(" ", 1) for line in proc.stdout.strip().splitlines()]
    return {name: json.loads(out) for name, out in lines if name in EIGHT_DEVICE_SCRIPTS}


@pytest.fixture
def tiny_files(tmp_path):
    """The tiny config as JSON and 2,000 random tokens of its vocabulary as a token file, for
    tests that run `jaxgpt train`: (config path, token file path)."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], 2000)
    return cfg, save_token_file(tokens, tmp_path / "tokens.bin")


@pytest.fixture
def tiny_dict():
    return dict(TINY)


@pytest.fixture
def tiny_cfg():
    return GPTConfig(**TINY)


@pytest.fixture(scope="session")
def tiny():
    """The tiny config and its weights at seed 0, `(cfg, params)`, made once for every test
    that only needs some tiny model (read-only). A file whose tests rest on another seed's
    draw (an EOS token that first appears where the test needs it) keeps its own `tiny`."""
    cfg = GPTConfig(**TINY)
    return cfg, init_params(cfg, 0)


def sharpened(params):
    """`params` with every matrix x8 over GPT-2's init: logits that move by O(1) when one
    activation is patched (the research tests)."""
    return jax.tree_util.tree_map(lambda x: x * 8 if x.ndim == 2 else x, params)


def assert_close(got, want, atol, what):
    """`got` within `atol` of `want`, else one line: `what`, and which entries are off."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, not {want.shape}"
    off = np.argwhere(~(np.abs(got - want) <= atol))  # NaN is off too
    if len(off):
        first = tuple(map(int, off[0]))
        raise AssertionError(
            f"{what}: {len(off)} of {want.size} entries off (atol {atol:.2g}), at "
            f"{[tuple(map(int, i)) for i in off[:6]]}{'...' if len(off) > 6 else ''}; "
            f"{first}: {got[first]:.6g}, not {want[first]:.6g}")


def stripe_means(pattern, half):
    """Each head's mean weight on the induction stripe, by loops over the indices: `pattern`
    `[B, H, 2 * half, 2 * half]` -> `[H]` (the definition, written out)."""
    b, h = pattern.shape[:2]
    out = np.zeros(h)
    for head in range(h):
        weights = [pattern[row, head, q, q - half + 1] for row in range(b)
                   for q in range(half, 2 * half)]
        out[head] = np.mean(weights)
    return out


@pytest.fixture
def cfg_124m():
    return GPTConfig(**GPT_CONFIG_124M)


@pytest.fixture(scope="session")
def book_124m():
    """The book's 124M `GPTModel` (seed 123, as its own golden check) and the same weights in
    jaxgpt: `(torch model, cfg, params)`, built once for the tests that need the full size.
    Read-only: a test that changed either would change the others' reference."""
    from jaxgpt.io.torch_state import from_torch_state_dict

    ref = torch_reference(GPT_CONFIG_124M, seed=123)
    cfg = GPTConfig(**GPT_CONFIG_124M)
    return ref, cfg, from_torch_state_dict(ref.state_dict(), cfg)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def torch_reference(cfg_dict, seed=0):
    """The book's PyTorch GPTModel in eval mode, seeded."""
    torch = reference("torch")
    ch04 = reference("llms_from_scratch.ch04")
    torch.manual_seed(seed)
    return ch04.GPTModel(cfg_dict).eval()


def cached_logits(model, params, tokens, prefill, slots):
    """Logits `[B, T, V]` of `tokens` from `model`: `prefill` tokens at once into an empty
    cache, then one token per call, as generation runs it."""
    b, t = tokens.shape
    cache = init_cache(model.cfg, b, slots, model.dtype)
    out = model.apply({"params": params}, tokens[:, :prefill], cache, 0, method=type(model).decode)
    steps = [out.logits]
    for i in range(prefill, t):
        out = model.apply({"params": params}, tokens[:, i:i + 1], out.cache, i,
                          positions=jnp.full((b, 1), i), method=type(model).decode)
        steps.append(out.logits)
    return jnp.concatenate(steps, axis=1)


# --- Hugging Face GPT-2 and TransformerLens on the same weights ---------------------------------

TINY_HF = dict(vocab_size=100, n_positions=16, n_embd=32, n_head=4, n_layer=2,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def random_hf_gpt2(seed=0, **config):
    """A `GPT2LMHeadModel` in eval mode with every parameter random: weights and biases
    N(0, 0.02), LayerNorm scales 1 + N(0, 0.1) and shifts N(0, 0.1), so a swapped bias or a
    LayerNorm read without its parameters shows."""
    torch = reference("torch")
    transformers = reference("transformers")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY_HF, **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = ".ln_" in name or name.startswith("transformer.ln_f")
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.1 if is_norm else 0.02) * noise)
    return model.eval()


def tl_bridge(hf_model, tmp_dir):
    """TransformerLens 4.3's `TransformerBridge` around `hf_model`, offline: a word-level
    tokenizer written to `tmp_dir` (the tests pass token ids, never text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(hf_model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                            eos_token="t1").save_pretrained(tmp_dir)
    return TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf_model, tokenizer=AutoTokenizer.from_pretrained(str(tmp_dir)),
        device="cpu")


def jax_weights_of(hf_model):
    """`(cfg, params)`: the jaxgpt config and params of a Hugging Face GPT-2."""
    from jaxgpt.io.hf import from_hf_state_dict
    from jaxgpt.io.hf_config import hf_config_to_gpt

    cfg = hf_config_to_gpt(hf_model.config.to_dict())
    return cfg, from_hf_state_dict(hf_model.state_dict(), cfg)


# --- what the experiment trackers wrote, read with their own readers (jaxgpt.training.tracking)

def tb_scalars(logdir):
    """{tag: [(step, value)]} of the run's event files, by TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                 for tag in acc.Tags()["scalars"]}


def as_f32(records, key):
    return [(r["step"], float(np.float32(r[key]))) for r in records if key in r]


def wandb_runs(wandb_dir, timeout_s=60.0):
    """The history rows and config of each offline run under `wandb_dir`, oldest first, read
    with wandb's own reader of its run files (`DataStore`).

    `wandb.finish` can return before `wandb-core` has written the end of an offline run's file
    (seen on a loaded machine): each file is read again until it holds its run's exit record,
    for at most `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        runs = [_wandb_run(path) for run_dir in sorted(wandb_dir.glob("offline-run-*"))
                for path in run_dir.glob("*.wandb")]
        if all(run["exited"] for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _wandb_run(path):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    ds = DataStore()
    ds.open_for_scan(str(path))
    history, config, run_id, exited = [], {}, None, False
    try:
        while (data := ds.scan_data()) is not None:
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in rec.history.item})
            elif kind in ("config", "run"):
                update = rec.config.update if kind == "config" else rec.run.config.update
                config.update({i.key: json.loads(i.value_json) for i in update})
                run_id = rec.run.run_id if kind == "run" else run_id
            elif kind == "exit":
                exited = True
    finally:
        ds.close()
    return {"id": run_id, "history": history, "config": config, "exited": exited}
