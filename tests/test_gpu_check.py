"""`scripts/gpu_check.py`: its CPU mode runs every section on the tiny config, and a section
that fails or finds no time left is recorded while the others run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_tiny_runs_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    s = report["sections"]
    assert list(s) == ["environment", "correctness", "decoding", "kernels", "training"]
    failed = {name: body.get("error") or body.get("skipped") for name, body in s.items()
              if "error" in body or "skipped" in body}
    assert not failed, failed
    assert s["environment"]["backend"] == "cpu"
    assert s["correctness"]["tiny"]["equal"] and s["correctness"]["bf16_logits"]["within"]
    (row,) = s["decoding"]["rows"]
    assert {"chunk_8", "chunk_0"} <= set(row) and row["bytes_per_step"] > 0
    kernels = s["kernels"]
    assert kernels["B=2/chunk_8"]["loop_stats_trip_count"] == 8
    assert kernels["B=2/chunk_0"]["loop_stats_trip_count"] is None
    # XLA:CPU runs each instruction as a thunk: the trace sees the loop's steps.
    assert kernels["B=2/chunk_8"]["launched_per_step"]["cpu_thunks"] > 0
    assert s["training"]["tokens_per_s"] > 0 and s["training"]["batch"] == 2
    table = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## correctness", "## decoding (bf16)", "## kernels per decoding step",
                    "## training (bf16)"):
        assert heading in table


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path):
    gc = _module()
    run = gc.Run(gc.parse(["--tiny", "--out", str(tmp_path)]))

    def broken(run, out):
        out["partial"] = 1
        raise RuntimeError("no such device")

    def fine(run, out):
        out["value"] = 2

    gc.section(run, "broken", broken)
    gc.section(run, "fine", fine)
    gc.section(run, "late", fine, need_s=run.args.budget_s + 1)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert saved["broken"]["partial"] == 1
    assert saved["broken"]["error"] == "RuntimeError: no such device"
    assert "traceback" in saved["broken"]
    assert saved["fine"] == {"value": 2}
    assert "needed" in saved["late"]["skipped"]
    assert "error: RuntimeError: no such device" in (tmp_path / "gpu_check.md").read_text()


def test_the_train_batch_is_the_largest_power_of_two_that_fits(monkeypatch):
    """A fake program whose peak is 100 + 10 B bytes, and which XLA refuses from B=256: with
    1000 bytes the largest power of two is 64 (B <= 90), whatever the guess from B=16."""
    gc = _module()
    compiled = []

    def program(cfg, batch, seq_len):
        compiled.append(batch)
        if batch >= 256:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return "step", "lowered", "args", {"peak_bytes": 100 + 10 * batch}

    monkeypatch.setattr(gc, "_train_program", program)
    for limit, want in ((1000, 64), (100_000, 128), (200, 8)):
        compiled.clear()
        prog, batch, tried = gc._largest_batch(None, 8, limit, 128 if limit > 10_000 else 512,
                                               16 if limit > 200 else 8, lambda: 1e9)
        assert batch == want and prog[3]["peak_bytes"] == 100 + 10 * want, (limit, tried)
        assert len(compiled) <= 4, compiled  # a guess, not a walk over every size
    # Nothing fits: no program, and the size tried is said.
    prog, batch, tried = gc._largest_batch(None, 8, 50, 512, 16, lambda: 1e9)
    assert prog is None and tried == {16: 260}
    # Out of time after the first compile: the first is kept, nothing more is compiled.
    compiled.clear()
    prog, batch, tried = gc._largest_batch(None, 8, 1000, 512, 16, lambda: 0.0)
    assert batch == 16 and compiled == [16] and "budget" in str(tried)
