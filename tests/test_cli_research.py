"""`jaxgpt patch` and `jaxgpt lens`: the pictures, the progress, and one-line errors."""

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from jaxgpt import cli
from jaxgpt.cli import lens as lens_command
from jaxgpt.cli import patch as patch_command
from jaxgpt.config import GPTConfig
from jaxgpt.interp import patching, plots
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn.model import init_params
from jaxgpt.tokenizer import get_tokenizer

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_model(monkeypatch):
    cfg = GPTConfig(**{**TINY, "vocab_size": 50257})
    params = init_params(cfg, 3)
    for command in (patch_command, lens_command):
        monkeypatch.setattr(command, "load_model", lambda args: (cfg, params, "tiny"))
        monkeypatch.setattr(command, "peek_config", lambda args: cfg)
    return cfg, params


@pytest.mark.slow
def test_patch_draws_layers_by_positions_and_by_heads(tiny_model, tmp_path, monkeypatch,
                                                      capsys):
    drawn = {}
    real = plots.plot_patching

    def spy(values, rows, columns, path, **kwargs):
        # By the picture it becomes: it is drawn into a temporary `.pos.tmp-PID-HEX.png`.
        final = Path(path).with_name(Path(path).name[1:].split(".tmp-")[0] + Path(path).suffix)
        drawn[str(final)] = (np.asarray(values), list(rows), list(columns), kwargs)
        return real(values, rows, columns, path, **kwargs)

    monkeypatch.setattr(plots, "plot_patching", spy)
    argv = ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary",
            "--wrong", " John"]
    by_pos, heads = tmp_path / "pos.png", tmp_path / "heads.png"
    assert cli.main([*argv, "--out", str(by_pos)]) == 0
    assert cli.main([*argv, "--kind", "heads", "--layers", "1:2", "--out", str(heads)]) == 0
    for path in (by_pos, heads):
        assert path.read_bytes()[:8] == PNG
    values, rows, columns, kwargs = drawn[str(by_pos)]
    assert values.shape == (2, 14) and rows == ["0", "1"] and columns[0] == "When"
    assert "logit(' Mary') - logit(' John')" in kwargs["title"]
    values, rows, columns, _ = drawn[str(heads)]
    assert values.shape == (1, 4) and rows == ["1"] and columns == ["0", "1", "2", "3"]
    # The picture is the sweep of the answer's logit difference, one head at a time.
    cfg, params = tiny_model
    tokenizer = get_tokenizer()
    clean, corrupt = (np.asarray(tokenizer.encode(t), np.int32) for t in (CLEAN, CORRUPT))
    mary, john = tokenizer.encode(" Mary")[0], tokenizer.encode(" John")[0]
    _, clean_cache = run_with_cache(params, cfg, clean)
    want = patching.reference_sweep(params, cfg, corrupt, clean_cache,
                                    lambda logits: logits[-1, mary] - logits[-1, john],
                                    "z_all_pos")
    np.testing.assert_allclose(values, want[1:2], atol=2e-5)
    err = capsys.readouterr().err
    assert "patches" in err and "wrote" in err  # progress, then the file


def test_patch_refuses_bad_input_in_one_line(tiny_model, tmp_path):
    argv = ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--out", str(tmp_path / "p.png")]
    cases = [
        (["--answer", " Mary Ann", "--wrong", " John"], r"--answer ' Mary Ann' is 2 tokens"),
        (["--answer", " Mary", "--wrong", " John", "--corrupt", "When Mary went"],
         r"--clean has 14 tokens and --corrupt 3: patching needs two prompts of the same"),
        (["--answer", " Mary", "--wrong", " John", "--corrupt", " word" * 17],
         "^jaxgpt patch: --corrupt has 17 tokens, more than the model's context_length 16$"),
        (["--answer", " Mary", "--wrong", " John", "--layers", "0:5"],
         r"--layers 0:5 is out of range: the model has 2 rows to draw, 0:2"),
        (["--answer", " Mary", "--wrong", " John", "--layers", "x"],
         r"--layers must be FIRST:STOP"),
        (["--answer", " Mary", "--wrong", " John", "--out", str(tmp_path / "no" / "p.png")],
         r"no directory"),
        (["--answer", " Mary", "--wrong", " John", "--out", str(tmp_path / "p.jpg")],
         r"must end in .png"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli.main([*argv, *extra])


def test_lens_draws_the_top_token_of_every_layer_and_position(tiny_model, tmp_path,
                                                              monkeypatch):
    drawn = {}
    real = plots.plot_logit_lens

    def spy(top, probs, rows, columns, path, **kwargs):
        drawn["args"] = (top, np.asarray(probs), list(rows), list(columns))
        return real(top, probs, rows, columns, path, **kwargs)

    monkeypatch.setattr(plots, "plot_logit_lens", spy)
    out = tmp_path / "lens.png"
    assert cli.main(["lens", "--prompt", "The capital of France is", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    top, probs, rows, columns = drawn["args"]
    assert rows == ["0_pre", "1_pre", "final_post"] and len(columns) == 5
    assert probs.shape == (3, 5) and ((probs > 0) & (probs <= 1)).all()
    with pytest.raises(SystemExit, match=r"--layers 2:9 is out of range.*3 rows to draw, 0:3"):
        cli.main(["lens", "--prompt", "Hi", "--layers", "2:9", "--out", str(out)])
    with pytest.raises(SystemExit, match="^jaxgpt lens: --prompt is empty"):
        cli.main(["lens", "--prompt", "", "--out", str(out)])
    # The token checks are the research functions' own, said of the flag before loading.
    monkeypatch.setattr(lens_command, "load_model", None)
    with pytest.raises(SystemExit, match="^jaxgpt lens: --prompt has 20 tokens, more than the "
                                         "model's context_length 16$"):
        cli.main(["lens", "--prompt", " word" * 20, "--out", str(out)])
