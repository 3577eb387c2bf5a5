"""`jaxgpt.sae.evals.run_evals` equals sae-lens 6.54.12's `run_evals` on the same SAEs, model
and tokens (tests/data/sae_evals, made by scripts/saelens_eval_fixtures.py in sae-lens's own
environment), and `jaxgpt sae eval` says it or refuses in one line."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from jaxgpt import cli
from jaxgpt.io import hf
from jaxgpt.sae.evals import EvalConfig, run_evals, token_batches
from jaxgpt.sae.formats import load_sae
from jaxgpt.sae.model import SAEConfig, from_params, hidden_pre, init_sae
from jaxgpt.sae.splice import as_rows
from jaxgpt.training.data import save_token_file

DATA = Path(__file__).parent / "data" / "sae_evals"
EXPECTED = json.loads((DATA / "expected.json").read_text())
# Each metric is a mean (or a ratio of means) of float32 per-token values whose inputs agree
# with sae-lens's to ~1e-6 relative (float32 rounding, other summation orders); the scores'
# denominators are >= 0.3 on these fixtures. 1e-4 relative leaves a margin of ~100.
RTOL = 1e-4


@pytest.fixture(scope="module")
def gpt2():
    return hf.load_pretrained(DATA / "gpt2")


def fixture_sae(name, tmp_path_factory):
    """The fixture SAE `name` (sae-lens marks its hook_z SAE `reshape_activations: hook_z`)."""
    sae = load_sae(DATA / name)
    assert sae.cfg.reshape_activations == ("hook_z" if name == "hook_z" else "none")
    return sae


def tokens():
    return np.asarray(EXPECTED["tokens"], np.int32)  # [N, B, T]


def assert_metrics(got, want, what):
    for group, values in want.items():
        for name, value in values.items():
            g = got[group][name]
            assert math.isclose(g, value, rel_tol=RTOL, abs_tol=1e-7), \
                f"{what}: {group}.{name} {g!r}, sae-lens {value!r}"


CASES = [(name, variant) for name, entry in EXPECTED["saes"].items()
         for variant in ("exclude_bos", "exclude_nothing") if variant in entry]


@pytest.mark.parametrize("name,variant", CASES)
def test_run_evals_equals_saelens(gpt2, name, variant, tmp_path_factory):
    cfg, params = gpt2
    sae = fixture_sae(name, tmp_path_factory)
    want = EXPECTED["saes"][name][variant]
    ignore = [EXPECTED["bos"]] if variant == "exclude_bos" else []
    metrics, features = run_evals(params, cfg, sae, tokens(), ignore_tokens=ignore)
    assert_metrics(metrics, want["metrics"], f"{name} ({variant})")
    for key, values in want["feature_metrics"].items():
        expected = np.array([np.nan if v is None else v for v in values])
        assert_close(features[key], expected, 1e-6, f"{name} {key}")  # counts / counts
        assert np.array_equal(np.isnan(features[key]), np.isnan(expected))


def test_fixture_features_are_decided_with_a_margin(gpt2, tmp_path_factory):
    """Which features fire is a comparison: the fixtures keep every pre-activation at least
    1e-5 from where the decision flips, 10 times the ~1e-6 by which jaxgpt's activations
    differ from sae-lens's (tests/test_sae_splice.py), so the L0s and densities above cannot
    come out otherwise on another machine."""
    cfg, params = gpt2
    from jaxgpt.interp.cache import run_with_cache

    for name, entry in EXPECTED["saes"].items():
        sae = fixture_sae(name, tmp_path_factory)
        hook = entry["hook_name"]
        _, cache = run_with_cache(params, cfg, tokens().reshape(-1, 16), names=[hook])
        h = np.asarray(hidden_pre(sae, as_rows(cache[hook], sae.cfg.d_in)))
        if sae.cfg.architecture == "topk":
            top = -np.sort(-h, axis=-1)
            k = int(sae.cfg.k)
            margin = np.minimum(top[..., k - 1] - top[..., k], np.abs(top[..., k - 1]))
        elif sae.cfg.architecture == "jumprelu":
            margin = np.abs(h - np.asarray(sae.params["threshold"]))
        else:
            margin = np.abs(h)
        assert margin.min() > 1e-5, f"{name}: a pre-activation {margin.min():.2g} from its edge"


def _exact_sae(d, hook):
    """A standard SAE that reconstructs any x exactly: ReLU(x) - ReLU(-x) = x."""
    eye = np.eye(d, dtype=np.float32)
    cfg = SAEConfig("standard", d_in=d, d_sae=2 * d, hook_name=hook)
    return from_params(cfg, {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d),
                             "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d)})


def test_an_exact_sae_scores_one_and_dead_and_dense_features_are_counted(gpt2):
    cfg, params = gpt2
    sae = _exact_sae(cfg.emb_dim, "blocks.1.hook_resid_pre")
    metrics, features = run_evals(params, cfg, sae, tokens(), ignore_tokens=[0])
    assert metrics["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1, 1e-5)
    assert metrics["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1, 1e-5)
    assert metrics["model_behavior_preservation"]["kl_div_with_sae"] < 1e-6
    quality = metrics["reconstruction_quality"]
    assert quality["explained_variance"] == pytest.approx(1, 1e-5) and quality["mse"] < 1e-9
    assert metrics["shrinkage"]["l2_ratio"] == pytest.approx(1, 1e-5)
    # Feature j and j + d are x_j's two signs: each fires on some tokens, not on all.
    assert metrics["features"]["dead_features"] == 0
    # One feature killed, one made to fire everywhere, at the threshold 0.5.
    b_enc = np.zeros(2 * cfg.emb_dim, np.float32)
    b_enc[3], b_enc[5] = -1e4, 1e4
    sae = sae.replace(params={**sae.params, "b_enc": jnp.asarray(b_enc)})
    metrics, features = run_evals(params, cfg, sae, tokens(), ignore_tokens=[0],
                                  dense_threshold=0.5)
    density = features["feature_density"]
    assert density[3] == 0 and density[5] == 1
    assert metrics["features"]["dead_features"] == int((density == 0).sum()) >= 1
    assert metrics["features"]["dense_features"] == int((density > 0.5).sum()) >= 1
    assert math.isnan(features["consistent_activation_heuristic"][3])


def test_token_batches_are_consecutive_windows_after_bos():
    ids = np.arange(100)
    batches = token_batches(ids, n_batches=3, batch_size=2, context_size=8, bos=99)
    assert batches.shape == (3, 2, 8) and (batches[..., 0] == 99).all()
    assert np.array_equal(batches[..., 1:].reshape(-1), np.arange(42))
    assert token_batches(ids, 50, 4, 10).shape == (2, 4, 10)  # as many whole batches as fit
    with pytest.raises(ValueError, match="do not fill one batch"):
        token_batches(ids[:10], 1, 2, 8)


def test_run_evals_refuses_bad_input_before_running(gpt2):
    cfg, params = gpt2
    sae = init_sae(SAEConfig("topk", d_in=32, d_sae=64, k=4, hook_name="blocks.1.hook_resid_pr"))
    with pytest.raises(ValueError, match="closest is 'blocks.1.hook_resid_pre'"):
        run_evals(params, cfg, sae, tokens())
    with pytest.raises(ValueError, match="d_in is 32, but blocks.0.mlp.hook_post has 128"):
        run_evals(params, cfg, sae, tokens(), hook_name="blocks.0.mlp.hook_post")
    with pytest.raises(ValueError, match="batchtopk"):
        run_evals(params, cfg, init_sae(SAEConfig("batchtopk", 32, 64, k=4)), tokens(),
                  hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="out of range|vocab"):
        run_evals(params, cfg, sae, tokens() + 100, hook_name="blocks.0.hook_resid_pre")


@pytest.mark.parametrize("changes,flag", [({"n_batches": 0}, "n_batches"),
                                          ({"context_size": 1}, "context_size"),
                                          ({"dense_threshold": 1.0}, "dense_threshold"),
                                          ({"exclude": (-1,)}, "exclude")])
def test_eval_config_names_the_bad_field(changes, flag):
    with pytest.raises(ValueError, match=f"EvalConfig.{flag} "):
        EvalConfig(**changes)


# --- jaxgpt sae eval -----------------------------------------------------------------------

def _cli_args(tmp_path, sae="topk", *extra):
    token_file = save_token_file(tokens().reshape(-1), tmp_path / "tokens.bin")
    return ["sae", "eval", "--sae", str(DATA / sae), "--checkpoint", str(DATA / "gpt2"),
            "--token-file", str(token_file), "--batches", "3", "--batch-size", "4",
            "--context-size", "16", "--no-prepend-bos", "--exclude", "0", *extra]


@pytest.mark.slow
def test_cli_prints_and_writes_saelens_metrics(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert cli.main(_cli_args(tmp_path, "topk", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    assert "ce_loss_score" in printed and "explained_variance" in printed
    report = json.loads(out.read_text())
    assert report["hook_name"] == "blocks.1.hook_resid_pre"
    assert_metrics(report["metrics"], EXPECTED["saes"]["topk"]["exclude_bos"]["metrics"], "cli")
    assert len(report["feature_metrics"]["feature_density"]) == 64


@pytest.mark.slow
@pytest.mark.parametrize("sae,extra,message", [
    ("topk", ["--hook", "blocks.1.hook_resid_pr"], "closest is 'blocks.1.hook_resid_pre'"),
    ("topk", ["--hook", "blocks.0.mlp.hook_pre"], "d_in is 32, but blocks.0.mlp.hook_pre has "
                                                  "128 values per token"),
    ("gpt2", [], "is not an sae-lens SAE folder"),
    ("topk", ["--batches", "0"], "--batches must be an int >= 1"),
    ("topk", ["--context-size", "17"], "longer than the model's context_length 16"),
])
def test_cli_refuses_bad_input_in_one_line(tmp_path, sae, extra, message, monkeypatch):
    from jaxgpt.cli import sae_eval

    def no_weights(args):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(sae_eval, "load_model", no_weights)
    with pytest.raises(SystemExit) as e:
        cli.main(_cli_args(tmp_path, sae, *extra))
    text = str(e.value)
    assert text.startswith("jaxgpt sae eval: ") and message in text and "\n" not in text
