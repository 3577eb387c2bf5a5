"""`scripts/bench_sae.py`, the speed benchmark against sae-lens: its jaxgpt side runs as the
docs give it (`--no-saelens --quick`, so the script cannot rot where sae-lens is not
installed), its flags are refused in one line, and its table and config check say what they
should. The sae-lens side (`scripts/bench_sae_saelens.py`) needs sae-lens's own Python and is
run by hand (docs/performance.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import xla_default_env

from jaxgpt.sae.model import SAEConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**xla_default_env(), "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _bench(*args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_sae.py"),
                           *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_sae
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return bench_sae


@pytest.mark.slow  # a subprocess that trains the tiny SAE three times
def test_the_jaxgpt_side_runs_without_saelens(tmp_path):
    out = tmp_path / "figures.json"
    proc = _bench("--no-saelens", "--quick", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| end to end, tokens/s |" in proc.stdout
    assert "| held-out explained variance |" in proc.stdout
    figures = json.loads(out.read_text())
    assert set(figures) == {"tokens", "jaxgpt"}
    (run,) = figures["jaxgpt"]["train"]
    quick = _script().QUICK
    assert run["steps"] == figures["tokens"] // quick.batch_tokens == 4
    # TopK keeps at most k features a token; a random model's activations give it k.
    assert 0 < run["l0"] <= quick.k
    # Reconstructing from k of 256 features after 4 steps explains less than everything.
    assert -1 < run["explained_variance"] < 1
    for phase in ("train", "forward", "step"):
        (timing,) = figures["jaxgpt"][phase]
        assert timing["seconds"] > 0 and timing["cpu_seconds"] > 0


@pytest.mark.slow  # each starts the script
@pytest.mark.parametrize("args, message", [
    (["--quick"], "give --saelens-python PATH"),
    (["--no-saelens", "--saelens-python", sys.executable], "give --saelens-python PATH"),
    (["--no-saelens", "--tokens", "1000"], "--tokens must be a positive multiple of the batch"),
    (["--no-saelens", "--quick", "--repeats", "0"], "--repeats must be at least 1"),
    (["--saelens-python", "/nonexistent/python"], "is not an executable file"),
])
def test_bad_flags_are_refused_in_one_line(args, message):
    proc = _bench(*args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]


def test_the_table_gives_jaxgpts_speed_up_over_the_medians():
    bench = _script()
    res = {"jaxgpt": {"train": [{"seconds": 2.0, "cpu_seconds": 3.0, "l0": 32.0,
                                 "explained_variance": 0.5}] * 2 +
                      [{"seconds": 4.0, "cpu_seconds": 3.0, "l0": 32.0,
                        "explained_variance": 0.5}],
                      "forward": [{"seconds": 1.0, "cpu_seconds": 2.0}],
                      "step": [{"seconds": 0.1, "cpu_seconds": 0.2}]},
           "sae-lens": {"train": [{"seconds": 6.0, "cpu_seconds": 12.0, "l0": 31.5,
                                   "explained_variance": 0.25}],
                        "forward": [{"seconds": 1.5, "cpu_seconds": 2.0}],
                        "step": [{"seconds": 0.5, "cpu_seconds": 0.5}]}}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in bench.table(res, 4096).splitlines()[2:]}
    # Medians: 2 s against 6 s end to end, 100 ms against 500 ms a step.
    assert rows["end to end, tokens/s"][-1].strip(" |") == "3.00x"
    assert rows["end to end, tokens per CPU-second"][-1].strip(" |") == "4.00x"
    assert rows["LM forward of a batch, ms"][-1].strip(" |") == "1.50x"
    assert rows["SAE step alone, ms"][-1].strip(" |") == "5.00x"
    assert rows["SAE step alone, CPU ms"][-1].strip(" |") == "2.50x"
    assert rows["end to end, tokens/s"][1] == "2,048.0 (1,024.0-2,048.0, 50%)"
    assert rows["held-out L0"][1:3] == ["32.0000", "31.5000"]


def test_a_saelens_sae_that_differs_from_jaxgpts_is_refused():
    bench = _script()
    ours = SAEConfig("topk", 768, 6144, k=32, rescale_acts_by_decoder_norm=True)
    theirs = {"d_in": 768, "d_sae": 6144, "k": 32, "apply_b_dec_to_input": True,
              "normalize_activations": "none", "rescale_acts_by_decoder_norm": True,
              "decoder_init_norm": 0.1, "aux_loss_coefficient": 1.0}
    bench.check_same_sae(ours, theirs)
    with pytest.raises(SystemExit, match="rescale_acts_by_decoder_norm=False"):
        bench.check_same_sae(ours, {**theirs, "rescale_acts_by_decoder_norm": False})
