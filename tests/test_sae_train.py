"""SAE training: sae-lens's schedules and step, the sparse TopK twin of the dense pass, a run
directory with exact resume, several SAEs from one forward pass, resampling, refusals."""

import json
import os
import shutil
import signal
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EIGHT_DEVICE_SCRIPTS, TINY, as_f32, assert_close, tb_scalars, wandb_runs

from jaxgpt.config import ConfigError
from jaxgpt.sae.formats import load_sae
from jaxgpt.sae.model import SAEConfig, forward, from_params, init_sae, to_inference
from jaxgpt.sae.model import training_forward as dense_training_forward
from jaxgpt.sae.sparse import topk_training_forward
from jaxgpt.sae.step import init_sae_state, make_sae_step, optimizer, resample_dead
from jaxgpt.sae.store import ActivationStore
from jaxgpt.sae.train_config import SAETrainConfig, coefficient_at, lr_at
from jaxgpt.sae.training import (
    estimate_scaling_factors,
    resample_steps,
    sae_names,
    train_saes,
)
from jaxgpt.training.loop import ResumeWarning, TrainingInterrupted
from jaxgpt.training.progress import read_metrics

DATA = Path(__file__).parent / "data" / "sae_train"
RESID = "blocks.1.hook_resid_pre"
Z = "blocks.0.attn.hook_z"


# --- sae-lens's schedules and step ------------------------------------------------------------

SCHEDULES = json.loads((DATA / "schedules.json").read_text())


@pytest.mark.parametrize("case", SCHEDULES["lr"], ids=lambda c: "{scheduler_name}-w{warm_up_steps}"
                         "-d{decay_steps}".format(**c["settings"]))
def test_the_learning_rate_is_saelens_schedule(case):
    s = case["settings"]
    tc = SAETrainConfig(training_tokens=s["training_steps"], train_batch_size_tokens=1,
                        lr=s["lr"], lr_end=s["lr_end"], lr_scheduler_name=s["scheduler_name"],
                        lr_warm_up_steps=s["warm_up_steps"], lr_decay_steps=s["decay_steps"],
                        n_restart_cycles=s["num_cycles"])
    got = [float(lr_at(tc, i)) for i in range(tc.steps)]
    # torch computes the cosine recursively in float64, jaxgpt in closed form in float32.
    np.testing.assert_allclose(got, case["lrs"], rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("case", SCHEDULES["coefficient"], ids=lambda c: f"w{c['warm_up_steps']}")
def test_sparsity_coefficients_warm_up_as_saelens(case):
    got = [float(coefficient_at(case["value"], case["warm_up_steps"], i)) for i in range(8)]
    np.testing.assert_allclose(got, case["values"], rtol=1e-6)


STEPS = json.loads((DATA / "steps.json").read_text())
ARRAYS = np.load(DATA / "steps.npz")
# sae-lens trains topk and batchtopk SAEs as if the decoder rows had norm 1 by default.
ARCH = {"topk": ("topk", {"rescale_acts_by_decoder_norm": True}), "topk_plain": ("topk", {}),
        "standard": ("standard", {}), "jumprelu": ("jumprelu", {}),
        "batchtopk": ("batchtopk", {"rescale_acts_by_decoder_norm": True})}


def _saelens_case(name):
    case = STEPS["cases"][name]
    arch, extra = ARCH[name]
    cfg = SAEConfig(arch, STEPS["d_in"], STEPS["d_sae"], **extra, **case["fields"])
    tc = SAETrainConfig(training_tokens=STEPS["steps"] * STEPS["rows"],
                        train_batch_size_tokens=STEPS["rows"], lr=case["lr"],
                        dead_feature_window=case["dead_feature_window"], **case["trainer"])
    init = {k.split("/")[-1]: ARRAYS[k] for k in ARRAYS.files if k.startswith(f"{name}/init/")}
    state = {"topk_threshold": init.pop("topk_threshold")} if "topk_threshold" in init else None
    return case, cfg, tc, from_params(cfg, init, state)


@pytest.mark.parametrize("name", list(STEPS["cases"]))
def test_each_step_is_saelens_trainer_step(name):
    case, cfg, tc, sae = _saelens_case(name)
    state = init_sae_state([cfg], tc, [sae])
    step = make_sae_step(tc)
    for i, want in enumerate(case["steps"]):
        state, (m,) = step(state, jnp.asarray(ARRAYS[f"{name}/batch/{i}"]))
        # Losses ~15 summed over 8 features: fp32 rounding of sums in another order, 1e-5.
        for key in ("loss", "mse_loss", "l1_loss", "auxiliary_reconstruction_loss", "l0_loss",
                    "pre_act_loss", "l0", "explained_variance"):
            if key in want:
                assert_close(m[key], want[key], 2e-5, f"{name} step {i} {key}")
        assert int(m["dead_features"]) == want["dead_features"], (name, i)
        # sae-lens logs the rate after its scheduler stepped: the next step's.
        assert_close(lr_at(tc, i + 1), want["lr"], 1e-9, f"{name} step {i} lr")
        np.testing.assert_array_equal(state.since_fired[0], ARRAYS[f"{name}/since_fired/{i}"])
        # Weights: Adam divides rounding-level gradient differences by |g|, which magnifies
        # them where a gradient is near 0: up to ~1e-6 of lr 1e-2 per step (measured 5e-7
        # after 6 steps).
        for k, v in state.saes[0].params.items():
            assert_close(v, ARRAYS[f"{name}/after/{i}/{k}"], 5e-6, f"{name} step {i} {k}")
    if cfg.architecture == "batchtopk":
        assert_close(state.saes[0].state["topk_threshold"],
                     ARRAYS[f"{name}/after/{len(case['steps']) - 1}/topk_threshold"], 1e-7,
                     "topk_threshold")
    # The cases make features dead within the run, so the counters and aux loss are held.
    if name.startswith("topk"):
        assert max(s["dead_features"] for s in case["steps"]) > 0


def test_runs_differing_only_in_loop_settings_share_one_compiled_step():
    tc = SAETrainConfig()
    assert make_sae_step(tc) is make_sae_step(tc.replace(log_every=1, save_every=7, keep=1))
    assert make_sae_step(tc) is not make_sae_step(tc.replace(lr=1e-3))


# --- the sparse TopK pass -------------------------------------------------------------------

@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("dead", [0, 3, 40], ids=["none-dead", "few-dead", "many-dead"])
def test_sparse_topk_gives_the_dense_pass_loss_and_gradients(rescale, apply_b_dec, dead):
    cfg = SAEConfig("topk", 16, 64, k=4, rescale_acts_by_decoder_norm=rescale,
                    apply_b_dec_to_input=apply_b_dec)
    sae = init_sae(cfg, 1)
    keys = jax.random.split(jax.random.key(7), len(sae.params))
    sae = sae.replace(params={k: v + 0.05 * jax.random.normal(key, v.shape)
                              for key, (k, v) in zip(keys, sae.params.items(), strict=True)})
    x = jax.random.normal(jax.random.key(3), (24, 16))
    mask = jnp.arange(64) < dead  # 3 <= d_in // 2 = 8 reads them all; 40 takes a top-k

    def run(fn):
        def loss(p):
            out = fn(sae.replace(params=p), x, mask)
            return out.loss, out.losses
        return jax.value_and_grad(loss, has_aux=True)(sae.params)

    (l_dense, terms_dense), g_dense = run(dense_training_forward)
    (l_sparse, terms_sparse), g_sparse = run(topk_training_forward)
    # Sums of 16 to 64 fp32 products in another order: 1e-6 of values ~1-40.
    assert_close(l_sparse, l_dense, 2e-5, "loss")
    for k in terms_dense:
        assert_close(terms_sparse[k], terms_dense[k], 2e-5, k)
    assert (float(terms_dense["auxiliary_reconstruction_loss"]) > 0) == (dead > 0)
    for k in g_dense:
        assert_close(g_sparse[k], g_dense[k], 1e-6, f"gradient of {k}")


# --- train_saes on the tiny model -----------------------------------------------------------

# 2,000 tokens: 125 windows of 16; buffers of 4 batches of 64 rows (16 windows).
# The standard SAE resamples its dead features after steps 8 and 16.
TC = SAETrainConfig(training_tokens=64 * 24, train_batch_size_tokens=64, context_size=16,
                    n_batches_in_buffer=4, store_batch_size_prompts=4, log_every=4,
                    save_every=8, n_batches_for_norm_estimate=3, lr=3e-3,
                    feature_sampling_window=8, dead_feature_window=4)
TOPK = SAEConfig("topk", 32, 64, k=4, hook_name=RESID, rescale_acts_by_decoder_norm=True)
STANDARD = SAEConfig("standard", 32, 48, hook_name=Z, l1_coefficient=0.05,
                     normalize_activations="expected_average_only_in")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], 2000)


def _params(saes):
    return [{k: np.asarray(v) for k, v in s.params.items()} for s in saes]


@pytest.fixture(scope="module")
def full_run(tiny, tokens, tmp_path_factory):
    """An uninterrupted run of a topk and a standard SAE: (out dir, SAEs, logged records)."""
    cfg, params = tiny
    out = tmp_path_factory.mktemp("sae") / "run"
    logged = []
    saes = train_saes(params, cfg, tokens, [TOPK, STANDARD], TC, out, progress=False,
                      on_log=logged.extend)
    return out, saes, logged


def test_a_run_lowers_the_loss_and_writes_metrics_checkpoints_and_sae_folders(full_run):
    out, saes, logged = full_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == logged
    assert [r["step"] for r in records] == [s for s in (4, 8, 12, 16, 20, 24) for _ in (0, 1)]
    names = sae_names([TOPK, STANDARD])
    assert names == [RESID, Z]
    for name, arch_key in zip(names, ("auxiliary_reconstruction_loss", "l1_loss"), strict=True):
        rs = [r for r in records if r["sae"] == name]
        for key in ("loss", "mse_loss", arch_key, "l0", "explained_variance", "dead_fraction",
                    "dead_features", "lr", "tokens_seen", "tokens_per_s"):
            assert all(np.isfinite(r[key]) for r in rs), key
        assert rs[-1]["mse_loss"] < 0.8 * rs[0]["mse_loss"]
        assert rs[-1]["explained_variance"] > rs[0]["explained_variance"]
    assert all(r["l0"] == 4 for r in records if r["sae"] == RESID)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000008", "step_00000016", "step_00000024"]
    assert (out / "metrics.png").stat().st_size > 0
    # The folders hold what the run returned, as sae-lens saves it for inference.
    x = jax.random.normal(jax.random.key(0), (5, 32))
    for name, sae in zip(names, saes, strict=True):
        loaded = load_sae(out / "saes" / name)
        assert loaded.cfg.hook_name == sae.cfg.hook_name
        assert_close(forward(loaded, x), forward(to_inference(sae), x), 1e-5, name)
    # The standard SAE trained on scaled inputs; the saved one takes the raw activations.
    assert saes[1].cfg.normalize_activations == "none"


def test_the_scaling_factor_is_saelens_estimate_folded_into_the_saved_sae(tiny, tokens):
    cfg, params = tiny
    store = ActivationStore(params, cfg, tokens, [Z], TC)
    factor = estimate_scaling_factors(store, 3)[Z]
    again = ActivationStore(params, cfg, tokens, [Z], TC)
    rows = np.concatenate([np.asarray(again.next_batch()[Z]) for _ in range(3)])
    assert_close(factor, np.sqrt(32) / np.linalg.norm(rows, axis=-1).mean(), 1e-4 * factor,
                 "scaling factor")


def test_resume_after_an_interrupt_is_the_uninterrupted_run_bit_for_bit(tiny, tokens, tmp_path,
                                                                        full_run):
    cfg, params = tiny
    out = tmp_path / "run"

    def interrupt(records):  # before the standard SAE's first resampling (after step 8)
        if records[0]["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as e:
        train_saes(params, cfg, tokens, [TOPK, STANDARD], TC, out, progress=False,
                   on_log=interrupt)
    assert e.value.step == 5 and e.value.checkpoint.name == "step_00000005"
    saes = train_saes(params, cfg, tokens, [TOPK, STANDARD], TC, out, resume=True,
                      progress=False)
    for got, want in zip(_params(saes), _params(full_run[1]), strict=True):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    records = {(r["step"], r["sae"]): r for r in map(
        json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for r in full_run[2]:  # every record of the uninterrupted run, the same
        mine = records[r["step"], r["sae"]]
        assert {**mine, "tokens_per_s": 0} == {**r, "tokens_per_s": 0}
    assert (5, RESID) in records  # and the step the interrupt saved
    assert "resampled" in records[16, Z]  # the resumed run resampled, as the first did


def test_several_saes_from_one_forward_pass_train_as_each_alone(tiny, tokens, full_run):
    cfg, params = tiny
    short = TC.replace(training_tokens=64 * 8)
    together = train_saes(params, cfg, tokens, [TOPK, STANDARD], short, progress=False)
    alone = [train_saes(params, cfg, tokens, [c], short, progress=False)[0]
             for c in (TOPK, STANDARD)]
    # One program holding both SAEs may fuse their arrays' operations differently from one
    # holding one; fp32 rounding then differs by ~1e-7 relative per step, which Adam's
    # normalised updates carry at most ~lr * 1e-3 per step (measured 0 here).
    for a, b in zip(_params(together), _params(alone), strict=True):
        for k in a:
            assert_close(a[k], b[k], 1e-6, k)


def test_resampling_gives_dead_features_a_high_loss_input_and_fresh_adam_state():
    tc = SAETrainConfig(training_tokens=64, train_batch_size_tokens=64, dead_feature_window=5)
    cfg = SAEConfig("standard", 8, 12)
    sae = init_sae(cfg, 0)
    dead = np.zeros(12, bool)
    dead[[2, 7]] = True
    since = jnp.where(dead, 10, 0).astype(jnp.int32)
    opt = optimizer(tc).init(sae.params)
    opt = opt._replace(mu=jax.tree_util.tree_map(jnp.ones_like, opt.mu),
                       nu=jax.tree_util.tree_map(jnp.ones_like, opt.nu))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x[17] *= 50  # one row the SAE reconstructs far worse than every other
    before = {k: np.asarray(v) for k, v in sae.params.items()}
    sae2, opt2, since2, n = resample_dead(sae, opt, since, jnp.asarray(x), jnp.float32(1.0),
                                          jax.random.key(0), tc)
    assert int(n) == 2
    p = {k: np.asarray(v) for k, v in sae2.params.items()}
    alive = ~dead
    for k in p:  # the alive features are untouched
        cols = (slice(None), alive) if k == "W_enc" else alive
        if k != "b_dec":
            np.testing.assert_array_equal(p[k][cols], before[k][cols])
    direction = x[17] - before["b_dec"]
    direction /= np.linalg.norm(direction)
    dec_norm = np.linalg.norm(before["W_dec"][alive], axis=-1).mean()
    enc_norm = np.linalg.norm(before["W_enc"][:, alive], axis=0).mean()
    for f in (2, 7):  # p proportional to the error squared: the outlier row wins
        assert_close(p["W_dec"][f], direction * dec_norm, 1e-5, "decoder row")
        assert_close(p["W_enc"][:, f], direction * 0.2 * enc_norm, 1e-5, "encoder column")
        assert p["b_enc"][f] == 0
    for moments in (opt2.mu, opt2.nu):
        assert (np.asarray(moments["W_dec"])[dead] == 0).all()
        assert (np.asarray(moments["W_dec"])[alive] == 1).all()
        assert (np.asarray(moments["b_enc"])[dead] == 0).all()
    np.testing.assert_array_equal(since2, np.zeros(12))
    # The revived features fire on the input they were given.
    acts = np.asarray(sae2.replace(params=sae2.params).params["W_enc"].T @ (x[17] - p["b_dec"]))
    assert (acts[[2, 7]] > 0).all()


def test_resampling_runs_at_its_steps_and_keeps_features_alive(tiny, tokens):
    cfg, params = tiny
    assert resample_steps(SAETrainConfig(training_tokens=1000, train_batch_size_tokens=1,
                                         feature_sampling_window=300,
                                         dead_feature_window=200)) == [300, 600]
    # A strong L1 kills features within a few steps; resampling every 6 steps revives them.
    tc = TC.replace(training_tokens=64 * 20, feature_sampling_window=6, dead_feature_window=3,
                    log_every=1)
    sae = SAEConfig("standard", 32, 64, hook_name=RESID, l1_coefficient=3.0)
    logs = {}
    for resample in (False, True):
        logged = []
        train_saes(params, cfg, tokens, [sae], tc.replace(resample_dead=resample),
                   progress=False, on_log=logged.extend)
        logs[resample] = logged
    counts = {r["step"]: r["resampled"] for r in logs[True] if "resampled" in r}
    assert sorted(counts) == [6, 12] and counts[6] > 0
    assert not any("resampled" in r for r in logs[False])
    assert logs[False][6]["dead_features"] > 0  # there was something to revive
    assert logs[True][6]["dead_features"] < logs[False][6]["dead_features"]


# --- refusals -------------------------------------------------------------------------------

def test_train_saes_refuses_what_cannot_work_before_computing(tiny, tokens, tmp_path):
    cfg, params = tiny
    with pytest.raises(ValueError, match="closest is 'blocks.1.hook_resid_pre'"):
        train_saes(params, cfg, tokens, [TOPK.replace(hook_name="blocks.1.resid_pre")], TC)
    with pytest.raises(ValueError, match="d_in 24 does not match blocks.1.hook_resid_pre"):
        train_saes(params, cfg, tokens, [TOPK.replace(d_in=24)], TC)
    with pytest.raises(ValueError, match="has no hook_name"):
        train_saes(params, cfg, tokens, [TOPK.replace(hook_name=None)], TC)
    with pytest.raises(ValueError, match="k must be in"):
        TOPK.replace(k=65)
    with pytest.raises(ValueError, match="architecture 'gated'"):
        TOPK.replace(architecture="gated")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        train_saes(params, cfg, tokens, [TOPK], TC, tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_saes(params, cfg, tokens, [TOPK], TC, tmp_path / "new", resume=True)
    for field, value, rule in [("lr", 0.0, "positive"), ("lr_scheduler_name", "linear", "one of"),
                               ("training_tokens", 10, "at least one batch"),
                               ("lr_warm_up_steps", 100, "at most the run's")]:
        with pytest.raises(ConfigError, match=f"SAETrainConfig.{field} .*{rule}"):
            TC.replace(**{field: value})


def test_resume_refuses_other_data_and_warns_of_other_optimisation(tiny, tokens, full_run,
                                                                    tmp_path):
    cfg, params = tiny
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    with pytest.raises(ConfigError, match="SAETrainConfig.seed must stay 42"):
        train_saes(params, cfg, tokens, [TOPK, STANDARD], TC.replace(seed=1), out, resume=True)
    with pytest.raises(ValueError, match="holds other SAEs"):
        train_saes(params, cfg, tokens, [TOPK], TC, out, resume=True)
    with pytest.raises(ConfigError, match="more than 24 steps"):
        train_saes(params, cfg, tokens, [TOPK, STANDARD], TC, out, resume=True)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train_saes(params, cfg, tokens, [TOPK, STANDARD], TC, out)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ConfigError):
        warnings.simplefilter("always")
        train_saes(params, cfg, tokens, [TOPK, STANDARD], TC.replace(lr=1e-3), out,
                   resume=True)
    assert not caught  # refused before any warning: the steps are what cannot work
    # The newest checkpoint damaged: the one before it is resumed from, with a warning.
    (out / "checkpoints" / "step_00000024" / "extra" / "manifest.ocdbt").unlink()
    logged = []
    with warnings.catch_warnings(record=True) as caught, pytest.raises(_Stop):
        warnings.simplefilter("always")
        train_saes(params, cfg, tokens, [TOPK, STANDARD],  # stopped at its first record
                   TC.replace(lr=1e-3, training_tokens=64 * 28), out, resume=True,
                   progress=False, on_log=lambda r: (logged.extend(r), _stop(r)))
    assert logged[0]["step"] == 20  # from step 16 on
    said = sorted(str(w.message) for w in caught if w.category is ResumeWarning)
    assert [m.split(":")[0] for m in said] == [
        "SAETrainConfig.lr changed from 0.003 to 0.001",
        "SAETrainConfig.training_tokens changed from 1536 to 1792",
        f"cannot read the checkpoint {out.absolute()}/checkpoints/step_00000024"]
    assert said[-1].endswith("trying the checkpoint before it")


class _Stop(Exception):
    pass


def _stop(records):
    raise _Stop


# --- 8 devices ------------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jaxgpt.config import GPTConfig
    from jaxgpt.nn.model import init_params
    from jaxgpt.sae.model import SAEConfig
    from jaxgpt.sae.train_config import SAETrainConfig
    from jaxgpt.sae.training import train_saes

    assert jax.device_count() == 8, jax.devices()
    cfg = GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0, qkv_bias=True)
    params = init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, 100, 2000)
    tc = SAETrainConfig(training_tokens=64 * 10, train_batch_size_tokens=64, context_size=16,
                        n_batches_in_buffer=4, store_batch_size_prompts=8, lr=3e-3,
                        log_every=1)
    saes = [SAEConfig("topk", 32, 64, k=4, hook_name="blocks.1.hook_resid_pre",
                      rescale_acts_by_decoder_norm=True),
            SAEConfig("batchtopk", 32, 64, k=4, hook_name="blocks.0.attn.hook_z"),
            SAEConfig("standard", 32, 48, hook_name="blocks.0.attn.hook_z",
                      l1_coefficient=0.05)]
    out = {}
    for n in (1, 8):
        logged = []
        trained = train_saes(params, cfg, tokens, saes, tc, devices=jax.devices()[:n],
                             progress=False, on_log=logged.extend)
        out[n] = {"losses": [r["loss"] for r in logged],
                  "params": [[np.asarray(v).ravel().tolist() for v in s.params.values()]
                             for s in trained]}
    print(json.dumps(out))
""")
EIGHT_DEVICE_SCRIPTS["sae_train"] = SCRIPT


@pytest.mark.slow
def test_eight_devices_train_the_saes_of_one(eight_devices):
    one, many = eight_devices["sae_train"]["1"], eight_devices["sae_train"]["8"]
    # The devices' partial gradients are summed in another order (an all-reduce): ~1e-7
    # relative in fp32, which Adam's normalised updates carry up to ~lr * 1e-3 per weight
    # and step (lr 3e-3, 10 steps: 3e-5).
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=1e-5)
    assert len(set(one["losses"])) > 3
    for a, b in zip(many["params"], one["params"], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=3e-5)


def test_the_trackers_get_every_record_once_across_an_interrupt(tiny, tokens, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, params = tiny
    out = tmp_path / "run"
    tc = TC.replace(log="tensorboard,wandb", training_tokens=64 * 12)

    def interrupt(records):
        if records[0]["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train_saes(params, cfg, tokens, [TOPK, STANDARD], tc, out, progress=False,
                   on_log=interrupt)
    train_saes(params, cfg, tokens, [TOPK, STANDARD], tc, out, resume=True, progress=False)
    metrics = read_metrics(out / "metrics.jsonl")
    _, got = tb_scalars(out / "tensorboard")
    runs = wandb_runs(out / "wandb")
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    rows = {row["_step"]: row for run in runs for row in run["history"]}
    assert sorted(rows) == [4, 5, 8, 12]
    for name in (RESID, Z):
        mine = [r for r in metrics if r["sae"] == name]
        assert [r["step"] for r in mine] == [4, 5, 8, 12]
        for key in ("loss", "mse_loss", "l0", "explained_variance", "dead_fraction", "lr"):
            assert got[f"{name}/{key}"] == as_f32(mine, key), (name, key)
            assert [rows[r["step"]][f"{name}/{key}"] for r in mine] == [r[key] for r in mine]
    assert runs[0]["config"]["sae_train"]["log"] == "tensorboard,wandb"
    assert runs[0]["config"]["saes"][Z]["architecture"] == "standard"
    sizes = [2 * c.d_in * c.d_sae + c.d_in + c.d_sae for c in (TOPK, STANDARD)]
    assert runs[0]["config"]["parameters"] == sum(sizes)
    assert got["parameters"] == [(0, float(sum(sizes)))]
