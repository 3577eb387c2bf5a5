"""`scripts/induction_search.py` and `scripts/repeat_tokens.py` run as docs/research.md gives
them (a few steps): the search prints each layer's score before training and at each report,
and the token file holds the stream its flags ask for."""

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import stripe_means, xla_default_env

from jaxgpt.config import GPTConfig
from jaxgpt.interp import induction
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn.model import GPTModel, init_params

pytestmark = pytest.mark.slow  # each test runs a script in a subprocess

ROOT = Path(__file__).resolve().parents[1]
# At XLA's default optimisation: the script's time goes to training steps, not compiling.
ENV = {**xla_default_env(), "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _layer_best(params, cfg, model, seq):
    """Each layer's best head score averaged over the script's probes, from the patterns by
    the definition (`conftest.stripe_means`), not by the script's own path."""
    halves = (5, 8, 11) if seq >= 22 else (3, 5, 7)
    per_probe = []
    for half in halves:
        tokens = induction.repeated_tokens(32, half, cfg.vocab_size, 99 + half)
        _, cache = run_with_cache(params, cfg, tokens, model=model,
                                  names=lambda n: n.endswith("hook_pattern"))
        per_probe.append([stripe_means(np.asarray(cache["pattern", i], np.float64), half)
                          for i in range(cfg.n_layers)])
    return np.mean(per_probe, axis=0).max(axis=1)  # [L]


def test_the_search_reports_each_layers_score(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from induction_search import NoFeedForward
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cfg = GPTConfig(vocab_size=64, context_length=24, emb_dim=64, n_heads=4, n_layers=3,
                    drop_rate=0.0)
    for extra in ([], ["--attention-only"]):
        saved = tmp_path / f"params{len(extra)}.pkl"
        out = _run(ROOT / "scripts" / "induction_search.py", "--steps", 4, "--every", 2,
                   "--warmup", 2, "--layers", 3, "--seq", 24, "--max-gap", 3, "--save", saved,
                   *extra)
        rows = re.findall(r"(untrained|step \d+).*?best \[([^\]]*)\]", out)
        assert [name for name, _ in rows] == ["untrained", "step 2", "step 4"], out
        printed = {name: [float(v) for v in scores.split()] for name, scores in rows}
        model = GPTModel(cfg, feed_forward_cls=NoFeedForward) if extra else None
        with open(saved, "rb") as f:
            trained = pickle.load(f)
        untrained = init_params(cfg, 123, model=model)  # the script's default --seed
        for name, params in (("untrained", untrained), ("step 4", trained)):
            want = _layer_best(params, cfg, model, 24)
            # Printed to 3 decimals: within half a unit of the last, plus fp32 noise.
            np.testing.assert_allclose(printed[name], want, rtol=0, atol=5e-4 + 1e-6,
                                       err_msg=f"{name} {extra}: the printed per-layer best "
                                               f"is not each layer's best head score")


def test_repeat_tokens_writes_the_stream_its_flags_ask_for(tmp_path):
    path = tmp_path / "runs.u16"
    _run(ROOT / "scripts" / "repeat_tokens.py", path, "--runs", 30, "--copies", 3,
         "--max-gap", 2, "--vocab", 5000, "--seed", 7)
    want = induction.repeated_runs(30, 4, 16, 5000, seed=7, copies=3, max_gap=2)
    np.testing.assert_array_equal(np.fromfile(path, np.uint16), want)
