"""Choosing the CPU decoding layout by measuring (`jaxgpt.inference.layouts`): a fake timer
decides, the choice is kept per batch class in a JSON file, and the environment forces one."""

import json

import numpy as np
import pytest
from conftest import TINY

from jaxgpt.config import GPTConfig
from jaxgpt.inference import Generator, generate_text_simple, layouts
from jaxgpt.nn import init_params
from jaxgpt.nn.layout import Layout


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


@pytest.fixture
def measuring(monkeypatch):
    """Measuring on, on a machine that looks quiet (a busy one keeps nothing)."""
    monkeypatch.setenv(layouts.LAYOUT_ENV, "measure")
    monkeypatch.setattr(layouts.os, "getloadavg", lambda: (0.0, 0.0, 0.0))


def test_rows_only_where_faster_by_more_than_the_margin():
    seconds = {name: (t[False], t[True]) for name, t in TABLE.items()}
    assert layouts.choose(seconds) == WANT
    assert 1 - TABLE["proj"][True] / TABLE["proj"][False] < layouts.MARGIN  # the tie is real


def test_measuring_alternates_the_forms_and_keeps_the_best(cfg):
    timer = FakeTimer(TABLE)
    seconds = layouts.measure(cfg, timer, rounds=3)
    assert timer.calls[:4] == [("qkv", False), ("qkv", True)] * 2
    assert len(timer.calls) == 2 * 3 * len(TABLE)
    assert seconds == {name: (t[False], t[True]) for name, t in TABLE.items()}


def test_a_layout_is_measured_once_per_batch_class_and_kept(cfg, tmp_path, measuring):
    path = tmp_path / "layouts.json"
    timer = FakeTimer(TABLE)
    assert layouts.decode_layout(cfg, "float32", 8, "cpu", timer=timer, path=path) == WANT
    measured = len(timer.calls)
    assert measured > 0
    # 5 rows are in the class of 8: read back, not measured.
    assert layouts.decode_layout(cfg, "float32", 5, "cpu", timer=timer, path=path) == WANT
    assert len(timer.calls) == measured
    stored = json.loads(path.read_text())
    (key, entry), = stored.items()
    assert key.endswith("rows 8") and sorted(entry["rows"]) == ["head", "qkv"]
    # One row is another class, measured again (here with a table where nothing wins).
    flat = FakeTimer({name: {False: 1.0, True: 1.0} for name in TABLE})
    assert layouts.decode_layout(cfg, "float32", 1, "cpu", timer=flat, path=path) == Layout(
        fused_qkv=True)
    assert flat.calls and len(json.loads(path.read_text())) == 2
    # Another dtype is another measurement too.
    assert layouts.machine_key(cfg, "float32", 8) != layouts.machine_key(cfg, "bfloat16", 8)


def test_an_unreadable_cache_is_measured_again(cfg, tmp_path, measuring):
    path = tmp_path / "layouts.json"
    path.write_text("{not json")
    timer = FakeTimer(TABLE)
    assert layouts.decode_layout(cfg, "float32", 2, "cpu", timer=timer, path=path) == WANT
    assert timer.calls and len(json.loads(path.read_text())) == 1


def test_a_busy_machines_measurement_is_used_not_kept(cfg, tmp_path, measuring, monkeypatch):
    monkeypatch.setattr(layouts.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.setattr(layouts, "_UNKEPT", {})
    path = tmp_path / "layouts.json"
    timer = FakeTimer(TABLE)
    assert layouts.decode_layout(cfg, "float32", 8, "cpu", timer=timer, path=path) == WANT
    measured = len(timer.calls)
    assert not path.exists()
    # The same process does not measure again; a quiet one keeps its measurement.
    assert layouts.decode_layout(cfg, "float32", 8, "cpu", timer=timer, path=path) == WANT
    assert len(timer.calls) == measured
    monkeypatch.setattr(layouts, "_UNKEPT", {})
    monkeypatch.setattr(layouts.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert layouts.decode_layout(cfg, "float32", 8, "cpu", timer=timer, path=path) == WANT
    assert len(timer.calls) == 2 * measured and path.exists()


def test_the_environment_forces_a_layout(cfg, tmp_path, monkeypatch):
    never = FakeTimer({})  # any call fails: forced layouts are not measured
    path = tmp_path / "layouts.json"
    for text, want in [("qkv, proj", Layout(fused_qkv=True, qkv=True, proj=True)),
                       ("none", Layout(fused_qkv=True)),
                       ("all", Layout(True, True, True, True, True, True)),
                       ("fixed", Layout.for_batch(8, "cpu"))]:
        monkeypatch.setenv(layouts.LAYOUT_ENV, text)
        assert layouts.decode_layout(cfg, "float32", 8, "cpu", timer=never, path=path) == want
    monkeypatch.setenv(layouts.LAYOUT_ENV, "qkv,rows")
    with pytest.raises(ValueError, match="JAXGPT_DECODE_LAYOUT='qkv,rows' names rows"):
        layouts.decode_layout(cfg, "float32", 8, "cpu", timer=never, path=path)
    # GPU and TPU layouts are not measured.
    monkeypatch.setenv(layouts.LAYOUT_ENV, "measure")
    assert layouts.decode_layout(cfg, "float32", 1, "gpu", timer=never, path=path) == (
        Layout.for_batch(1, "gpu"))
    assert not never.calls and not path.exists()


def test_the_loop_confirms_or_replaces_the_per_matrix_choice():
    """The per-matrix choice stands unless another candidate's decoding step beats it
    by more than the margin; the candidates are timed alternately, once per round each."""
    steps = FakeSteps({WANT: 1.0, ALL_ROWS: 0.9, NO_ROWS: 1.2})
    layout, seconds = layouts.confirm(WANT, steps, rounds=2)
    assert layout == ALL_ROWS and seconds == {"chosen": 1.0, "all": 0.9, "none": 1.2}
    assert steps.calls == [WANT, ALL_ROWS, NO_ROWS] * 2
    within = FakeSteps({WANT: 1.0, ALL_ROWS: 1.0 - layouts.MARGIN / 2})
    assert layouts.confirm(WANT, within)[0] == WANT
    # A per-matrix choice that is one of the others is timed once per round.
    steps = FakeSteps()
    assert layouts.confirm(NO_ROWS, steps, rounds=3)[0] == NO_ROWS
    assert steps.calls == [NO_ROWS, ALL_ROWS] * 3


def test_the_step_timer_runs_the_decoding_program_with_each_layout(cfg):
    """Each layout's weights are prepared for the model that reads them (a mismatch fails to
    trace), and a step's time is a difference of two runs, never negative."""
    timer = layouts.step_timer(cfg, "float32", 2)
    assert all(timer(lay) >= 0 for lay in (WANT, ALL_ROWS, NO_ROWS, WANT))


def test_the_matmul_timer_times_both_forms(cfg):
    timer = layouts.matmul_timer(cfg, "float32", 2)
    assert all(timer(name, rows) > 0 for name in ("fc", "head") for rows in (False, True))


def test_a_generator_decodes_with_the_measured_layout(cfg, rng, measuring):
    """The first use measures into $XDG_CACHE_HOME/jaxgpt (a directory of this test run, see
    conftest), and the tokens are the book's whatever was chosen."""
    params = init_params(cfg, 5)
    gen = Generator(params, cfg)
    prompt = rng.integers(0, cfg.vocab_size, (3, 4))
    out = np.asarray(gen.generate(prompt, 6))
    np.testing.assert_array_equal(out, generate_text_simple(params, cfg, prompt, 6))
    stored = json.loads(layouts.cache_path().read_text())
    assert any(key.endswith("rows 4") for key in stored)
    model, _ = gen.weights(3)
    entry = stored[layouts.machine_key(cfg, "float32", 3)]
    assert model.layout == Layout(fused_qkv=True, **{n: n in entry["rows"] for n in TABLE})


def test_a_generator_takes_a_layout(cfg):
    params = init_params(cfg, 5)
    rows = Layout(True, True, True, True, True, True)
    gen = Generator(params, cfg, layout=rows)
    assert gen.weights(1)[0].layout == gen.weights(8)[0].layout == rows
    assert gen.weights(8)[1]["out_head"]["kernel"].shape == (cfg.vocab_size, cfg.emb_dim)
    with pytest.raises(ValueError, match="layout must be a jaxgpt.nn.layout.Layout or None"):
        Generator(params, cfg, layout="rows")
