"""Decoding layouts: the package's fixed rule per backend (`Layout.for_batch`), which measures
nothing and writes nothing, and the lab that measures (`scripts/layout_lab.py`), imported as
the scripts import it and run as its docs give it (`scripts/bench_layouts.py`)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from jaxgpt.config import GPTConfig
from jaxgpt.inference import Generator, generate_text_simple
from jaxgpt.nn import init_params
from jaxgpt.nn.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/NAME.py` has it

import layout_lab  # noqa: E402


class FakeTimer:
    """Seconds per (matrix, as rows) from a table, a little noise on every other call; records
    the calls."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, name, as_rows):
        self.calls.append((name, as_rows))
        noise = 0.5 if len(self.calls) % 4 == 1 else 0.0  # an outlier the best-of must drop
        return self.table[name][as_rows] + noise


class FakeSteps:
    """Seconds per decoding step per layout from a table (1.0 where not given);
    records the layouts asked for."""

    def __init__(self, table=None):
        self.table, self.calls = table or {}, []

    def __call__(self, layout):
        self.calls.append(layout)
        return self.table.get(layout, 1.0)


ALL_ROWS = Layout(True, True, True, True, True, True)
NO_ROWS = Layout(fused_qkv=True)

# [in, out] and rows seconds: qkv and head clearly faster as rows, proj within the margin
# (1% faster), out and fc slower as rows.
TABLE = {"qkv": {False: 1.0, True: 0.5}, "out": {False: 1.0, True: 1.2},
         "fc": {False: 1.0, True: 1.1}, "proj": {False: 1.0, True: 0.99},
         "head": {False: 3.0, True: 2.0}}
WANT = Layout(fused_qkv=True, qkv=True, head=True)


@pytest.fixture
def cfg():
    return GPTConfig(**TINY)


# --- the package: a fixed rule ----------------------------------------------------------------


def test_the_rule_per_backend_and_batch():
    gpu = ALL_ROWS._replace(one_pass_norm=True)  # one pass applies to a single row only
    for batch in (1, 8, 32):
        assert Layout.for_batch(batch, "cpu") == ALL_ROWS  # docs/performance.md's figures
        assert Layout.for_batch(batch, "gpu") == gpu
        assert Layout.for_batch(batch, "tpu") == NO_ROWS


def test_a_generator_decodes_with_the_rule_and_writes_nothing(cfg, rng, tmp_path, monkeypatch):
    """No timing, no file: the home and the cache directory stay empty, and the tokens are the
    book's."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    params = init_params(cfg, 5)
    gen = Generator(params, cfg)
    prompt = rng.integers(0, cfg.vocab_size, (3, 4))
    out = np.asarray(gen.generate(prompt, 6))
    np.testing.assert_array_equal(out, generate_text_simple(params, cfg, prompt, 6))
    assert gen.weights(3)[0].layout == gen.weights(1)[0].layout == Layout.for_batch(3)
    assert list(home.iterdir()) == list(cache.iterdir()) == []


def test_a_generator_takes_a_layout(cfg):
    params = init_params(cfg, 5)
    gen = Generator(params, cfg, layout=NO_ROWS)
    assert gen.weights(1)[0].layout == gen.weights(8)[0].layout == NO_ROWS
    assert gen.weights(8)[1]["out_head"]["kernel"].shape == (cfg.emb_dim, cfg.vocab_size)
    with pytest.raises(ValueError, match="layout must be a jaxgpt.nn.layout.Layout or None"):
        Generator(params, cfg, layout="rows")


# --- the lab: scripts/layout_lab.py -----------------------------------------------------------


def test_rows_only_where_faster_by_more_than_the_margin():
    seconds = {name: (t[False], t[True]) for name, t in TABLE.items()}
    assert layout_lab.choose(seconds) == WANT
    assert 1 - TABLE["proj"][True] / TABLE["proj"][False] < layout_lab.MARGIN  # a real tie


def test_measuring_alternates_the_forms_and_keeps_the_best(cfg):
    timer = FakeTimer(TABLE)
    seconds = layout_lab.measure(cfg, timer, rounds=3)
    assert timer.calls[:4] == [("qkv", False), ("qkv", True)] * 2
    assert len(timer.calls) == 2 * 3 * len(TABLE)
    assert seconds == {name: (t[False], t[True]) for name, t in TABLE.items()}


def test_the_loop_confirms_or_replaces_the_per_matrix_choice():
    """The per-matrix choice stands unless another candidate's decoding step beats it
    by more than the margin; the candidates are timed alternately, once per round each."""
    steps = FakeSteps({WANT: 1.0, ALL_ROWS: 0.9, NO_ROWS: 1.2})
    layout, seconds = layout_lab.confirm(WANT, steps, rounds=2)
    assert layout == ALL_ROWS and seconds == {"chosen": 1.0, "all": 0.9, "none": 1.2}
    assert steps.calls == [WANT, ALL_ROWS, NO_ROWS] * 2
    within = FakeSteps({WANT: 1.0, ALL_ROWS: 1.0 - layout_lab.MARGIN / 2})
    assert layout_lab.confirm(WANT, within)[0] == WANT
    # A per-matrix choice that is one of the others is timed once per round.
    steps = FakeSteps()
    assert layout_lab.confirm(NO_ROWS, steps, rounds=3)[0] == NO_ROWS
    assert steps.calls == [NO_ROWS, ALL_ROWS] * 3


@pytest.mark.slow
def test_the_timers_run(cfg):
    """Each layout's weights are prepared for the model that reads them (a mismatch fails to
    trace), and a step's time is a difference of two runs, never negative."""
    steps = layout_lab.step_timer(cfg, "float32", 2)
    assert all(steps(lay) >= 0 for lay in (WANT, ALL_ROWS, NO_ROWS, WANT))
    timer = layout_lab.matmul_timer(cfg, "float32", 2)
    assert all(timer(name, rows) > 0 for name in ("fc", "head") for rows in (False, True))


def test_a_scripts_layout_argument():
    assert layout_lab.parse_layout("rule") is None
    assert layout_lab.parse_layout("qkv, proj") == Layout(fused_qkv=True, qkv=True, proj=True)
    assert layout_lab.parse_layout("none") == NO_ROWS
    assert layout_lab.parse_layout("all") == ALL_ROWS
    with pytest.raises(ValueError, match="layout 'qkv,rows' names rows"):
        layout_lab.parse_layout("qkv,rows")


@pytest.mark.slow
def test_bench_layouts_runs_as_its_docs_give_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "scripts/bench_layouts.py", "--tiny", "--rows", "2",
                          "--rounds", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2 row(s): chosen rows" in res.stdout and "| chosen |" in res.stdout
    assert "confirmed in the decoding program" in res.stdout
    assert list(tmp_path.iterdir()) == []  # the lab writes nothing either
