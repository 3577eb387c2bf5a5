"""`scripts/induction_search.py` and `scripts/repeat_tokens.py` run as docs/research.md gives
them (a few steps): the search prints each layer's score before training and at each report,
and the token file holds the stream its flags ask for."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_default_env

from jaxgpt.interp import induction

pytestmark = pytest.mark.slow  # each test runs a script in a subprocess

ROOT = Path(__file__).resolve().parents[1]
# At XLA's default optimisation: the script's time goes to training steps, not compiling.
ENV = {**xla_default_env(), "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_search_reports_each_layers_score():
    for extra in ([], ["--attention-only"]):
        out = _run(ROOT / "scripts" / "induction_search.py", "--steps", 4, "--every", 2,
                   "--warmup", 2, "--layers", 3, "--seq", 24, "--max-gap", 3, *extra)
        rows = re.findall(r"(untrained|step \d+).*?best \[([^\]]*)\]", out)
        assert [name for name, _ in rows] == ["untrained", "step 2", "step 4"], out
        for _, scores in rows:
            values = [float(v) for v in scores.split()]
            assert len(values) == 3 and all(0 < v < 1 for v in values), out


def test_repeat_tokens_writes_the_stream_its_flags_ask_for(tmp_path):
    path = tmp_path / "runs.u16"
    _run(ROOT / "scripts" / "repeat_tokens.py", path, "--runs", 30, "--copies", 3,
         "--max-gap", 2, "--vocab", 5000, "--seed", 7)
    want = induction.repeated_runs(30, 4, 16, 5000, seed=7, copies=3, max_gap=2)
    np.testing.assert_array_equal(np.fromfile(path, np.uint16), want)
