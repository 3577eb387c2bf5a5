"""Loss, schedule, optimizer and train step against PyTorch; grad accumulation; the loop's
checkpoints, exact resume and NaN guard."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, reference, torch_reference

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.io import checkpoint
from jaxgpt.io.torch_state import from_torch_state_dict, to_torch_state_dict
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.loop import ResumeWarning, TrainingDiverged, run_steps, train_loop
from jaxgpt.training.loss import cross_entropy_loss, perplexity
from jaxgpt.training.optim import decay_mask, make_schedule
from jaxgpt.training.run_dir import list_checkpoints
from jaxgpt.training.step import init_train_state, make_train_step


def test_cross_entropy_matches_torch_with_ignore_index(rng):
    torch = reference("torch")
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 7))
    targets[0, :4] = -100
    targets[2, 6] = -100
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).flatten(0, 1), torch.from_numpy(targets).flatten()
    )
    got = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets))
    assert abs(float(got) - float(want)) < 1e-6
    assert float(perplexity(got)) == pytest.approx(np.exp(float(want)), rel=1e-6)
    # Ignored positions must not count: changing their logits leaves the loss unchanged.
    logits2 = logits.copy()
    logits2[0, :4] += 50.0
    assert float(cross_entropy_loss(jnp.asarray(logits2), jnp.asarray(targets))) == float(got)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    tc = TrainConfig(steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=4)
    lrs = np.array([float(make_schedule(tc)(s)) for s in range(11)])
    np.testing.assert_allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lrs[4], 1e-3, rtol=1e-6)  # cosine starts at the peak
    np.testing.assert_allclose(lrs[7], 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)  # halfway
    np.testing.assert_allclose(lrs[10], 1e-4, rtol=1e-6)
    assert np.all(np.diff(lrs[4:]) < 0)


def test_weight_decay_applies_to_matrices_only(tiny_cfg):
    from jaxgpt.nn import param_shapes

    mask = decay_mask(param_shapes(tiny_cfg))
    assert mask["trf_blocks_0"]["att"]["W_query"]["kernel"] is True
    assert mask["tok_emb"]["embedding"] is True
    assert mask["trf_blocks_0"]["att"]["W_query"]["bias"] is False
    assert mask["trf_blocks_0"]["norm1"]["scale"] is False
    assert mask["final_norm"]["shift"] is False


def _batches(n, b=4, t=8, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = rng.integers(0, TINY["vocab_size"], size=(b, t + 1))
        out.append((w[:, :-1].astype(np.int32), w[:, 1:].astype(np.int32)))
    return out


def adam_step_bound(b1: float, b2: float, t: int) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam's update t (1-based) can have, for any gradients.

    m_t = (1 - b1) sum_s b1^(t-s) g_s and v_t = (1 - b2) sum_s b2^(t-s) g_s^2, so by
    Cauchy-Schwarz |m_t| <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_k (b1^2 / b2)^k) * sqrt(v_t);
    the bias corrections divide m_t by 1 - b1^t and v_t by 1 - b2^t. It is 1 at t = 1.
    """
    series = sum((b1 * b1 / b2) ** k for k in range(t))
    return (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2) * series)


def test_adamw_training_matches_torch_reference():
    """Five steps of warmup + cosine AdamW with clipping: losses to 1e-5, weights to a bound
    derived per weight from its gradients (the same on every CPU).

    Both frameworks compute the gradients in float32 with their own summation orders, so a
    gradient entry differs between them by a few ulp of the largest entries: about 1e-9 here
    (gradients <= 0.12, times ~0.2 after clipping); we allow DELTA = 1e-8. Adam moves a weight
    by lr_t * d_t (plus decoupled decay, computed alike on both sides), d_t =
    m_hat / (sqrt(v_hat) + eps). Perturbing every g_s by <= DELTA changes m_hat by <= DELTA and
    sqrt(v_hat) (a weighted RMS of the g_s) by <= DELTA, hence d_t by
    <= (1 + C_t) * DELTA / (min_s |g_s| + eps), C_t = `adam_step_bound` (~1).

    - Weights whose gradient is 0 (both sides compute exactly 0, e.g. embedding rows of tokens
      not in the batch) or >= THETA = 1e-5 = 1000 eps at every step: d_t is well determined,
      so the weights agree to sum_t lr_t (1 + C_t) DELTA / THETA (~7e-6) plus a few float32
      roundings of the weights themselves.
    - The rest have a gradient near zero at some step: nothing but rounding noise in a sum
      that cancels (e.g. a weight whose input is nearly always 0). Adam divides that noise by
      |g| + eps, so it moves the weight by up to lr_t * C_t in a direction that depends on the
      CPU's rounding; the two sides then differ by at most 2 sum_t lr_t C_t. On an AMD EPYC one
      such weight of `ff.layers.2` differs by 2.3e-5, on other CPUs less. They must be few.
    """
    torch = reference("torch")
    ch05 = reference("llms_from_scratch.ch05")
    cfg_dict = dict(TINY, qkv_bias=False)
    tiny_cfg = GPTConfig(**cfg_dict)
    ref = torch_reference(cfg_dict, seed=0).train()  # drop_rate 0: train mode is deterministic
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    params = from_torch_state_dict(ref.state_dict(), tiny_cfg)
    # grad_clip 0.5 is below the gradient norm (~2-3 here), so clipping is exercised.
    tc = TrainConfig(
        steps=5,
        batch_size=4,
        seq_len=8,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=2,
        weight_decay=0.1,
        grad_clip=0.5,
    )
    batches = _batches(tc.steps)

    state = init_train_state(tiny_cfg, tc, params)
    step = make_train_step(tiny_cfg, tc)
    jax_losses, norms = [], []
    for batch in batches:
        state, m = step(state, batch, jax.random.PRNGKey(0))
        jax_losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    assert min(norms) > tc.grad_clip

    schedule = make_schedule(tc)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tc.lr,
        betas=(tc.b1, tc.b2),
        eps=tc.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / tc.lr)
    torch_losses = []
    grads = {name: [] for name, _ in ref.named_parameters()}  # the clipped gradients Adam saw
    for inputs, targets in batches:
        opt.zero_grad()
        loss = ch05.calc_loss_batch(
            torch.from_numpy(inputs).long(), torch.from_numpy(targets).long(), ref, "cpu"
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), tc.grad_clip)
        for name, p in ref.named_parameters():
            grads[name].append(p.grad.abs().numpy().copy())
        opt.step()
        sched.step()
        torch_losses.append(loss.item())

    np.testing.assert_allclose(jax_losses, torch_losses, rtol=0, atol=1e-5)

    delta, theta = 1e-8, 1e3 * tc.eps
    lrs = [float(schedule(s)) for s in range(tc.steps)]
    c = [adam_step_bound(tc.b1, tc.b2, t) for t in range(1, tc.steps + 1)]
    tight = sum(lr * (1 + ct) * delta / theta for lr, ct in zip(lrs, c, strict=True))
    tight += tc.steps * 4 * np.finfo(np.float32).eps  # weights rounded each step, |w| < 2
    loose = 2 * sum(lr * ct for lr, ct in zip(lrs, c, strict=True))
    got = to_torch_state_dict(state.params, tiny_cfg)
    n_loose = n_all = 0
    for name, g in grads.items():
        g = np.stack(g)  # [steps, *shape]
        determined = np.all((g == 0) | (g >= theta), axis=0)
        diff = np.abs(got[name].numpy() - ref.state_dict()[name].numpy())
        assert diff[determined].max(initial=0) < tight, (name, diff[determined].max(), tight)
        assert diff.max() < loose, (name, diff.max(), loose)
        n_loose, n_all = n_loose + int(np.sum(~determined)), n_all + determined.size
    assert n_loose < 0.05 * n_all, (n_loose, n_all)  # the tight check covers nearly all weights
    moved = max(
        float((got[k] - start[k]).abs().max()) for k in ("tok_emb.weight", "out_head.weight")
    )
    assert moved > 100 * tight  # the weights changed well beyond the tolerance


@pytest.mark.slow
def test_grad_accumulation_gives_the_update_of_the_whole_batch(tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.0)
    batches = _batches(3, b=8)
    # Positions ignored unevenly across micro-batches: the per-token mean must still agree.
    batches[0][1][0, :5] = -100
    results = []
    for accum in (1, 4):
        tc = TrainConfig(steps=3, batch_size=8, seq_len=8, lr=1e-3, grad_accum=accum)
        state = init_train_state(cfg, tc, None)
        step = make_train_step(cfg, tc)
        losses = []
        for batch in batches:
            state, m = step(state, batch, jax.random.PRNGKey(0))
            losses.append(float(m["loss"]))
        results.append((losses, state.params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=2e-6)
    diffs = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))), *[r[1] for r in results]
        )
    )
    assert max(diffs) < 1e-5


def test_train_step_donates_the_state_and_draws_new_dropout_each_step(tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.5)
    tc = TrainConfig(steps=3, batch_size=4, seq_len=8, lr=1e-12, weight_decay=0.0)
    step = make_train_step(cfg, tc)
    state = init_train_state(cfg, tc)
    old_leaf = jax.tree_util.tree_leaves(state.params)[0]
    batch = _batches(1)[0]
    state, m1 = step(state, batch, jax.random.PRNGKey(0))
    assert old_leaf.is_deleted()  # donated
    state, m2 = step(state, batch, jax.random.PRNGKey(0))
    # Same batch, (almost) same weights: only the step-folded dropout key differs.
    assert float(m1["loss"]) != float(m2["loss"])
    assert int(state.step) == 2


def test_run_steps_draws_one_batch_per_step_and_stops_when_asked(tiny_cfg):
    """The loop `train_loop` runs, driven as an experiment drives it: the states and metrics
    are those of calling the step by hand, and a true return stops after that step without
    drawing another batch."""
    tc = TrainConfig(steps=4, batch_size=4, seq_len=8, weight_decay=0.0)
    step, key, batches = make_train_step(tiny_cfg, tc), jax.random.PRNGKey(0), _batches(4)
    want, state = [], init_train_state(tiny_cfg, tc)
    for batch in batches[:3]:
        state, m = step(state, batch, key)
        want.append(float(m["loss"]))
    drawn, seen = [], []

    def stream():
        for batch in batches:
            drawn.append(batch)
            yield batch

    def after(i, state, metrics, seconds):
        seen.append((i, int(state.step), float(metrics["loss"])))
        assert seconds > 0 and isinstance(metrics["loss"], np.ndarray)
        return i == 3

    last = run_steps(step, init_train_state(tiny_cfg, tc), stream(), range(1, 5), key, after)
    assert seen == [(i, i, loss) for i, loss in enumerate(want, start=1)]
    assert int(last.step) == 3 and len(drawn) == 3


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], n).astype(np.uint16)


@pytest.mark.slow
def test_resume_after_interruption_gives_the_losses_of_an_uninterrupted_run(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.1)  # dropout keys must be restored too
    # 14 windows / batch 4 = 3 batches an epoch: the 7 steps cross two epoch boundaries.
    tokens = _tokens(8 * 14 + 1 + 200)
    tc = TrainConfig(
        steps=7,
        batch_size=4,
        seq_len=8,
        lr=2e-3,
        warmup_steps=2,
        eval_every=3,
        save_every=2,
        keep=2,
        sample_tokens=0,
    )
    full = train_loop(cfg, tc, tokens[:113], tokens[113:], tmp_path / "full", progress=False)

    class Interrupt(Exception):
        pass

    def stop(step, record):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_loop(
            cfg, tc, tokens[:113], tokens[113:], tmp_path / "cut", on_step=stop, progress=False
        )
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == [
        "step_00000002",
        "step_00000004",
    ]
    with pytest.raises(FileExistsError, match="resume"):
        train_loop(cfg, tc, tokens[:113], tokens[113:], tmp_path / "cut", progress=False)
    resumed = train_loop(
        cfg, tc, tokens[:113], tokens[113:], tmp_path / "cut", resume=True, progress=False
    )

    assert [r["step"] for r in resumed] == [5, 6, 7]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]  # bit for bit
    assert [r["tokens_seen"] for r in resumed] == [r["tokens_seen"] for r in full[4:]]
    assert resumed[-1]["val_loss"] == full[-1]["val_loss"]
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 8))  # step 5 logged once, not twice
    _, p_full = checkpoint.restore(tmp_path / "full" / "checkpoints" / "step_00000007")
    _, p_cut = checkpoint.restore(tmp_path / "cut" / "checkpoints" / "step_00000007")
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_full, p_cut)
    # keep=2: only the two newest checkpoints remain.
    assert [p.name for p in list_checkpoints(tmp_path / "full" / "checkpoints")] == [
        "step_00000006",
        "step_00000007",
    ]


@pytest.mark.slow
def test_resume_accepts_changed_optimisation_settings_with_a_warning(tmp_path, tiny_cfg, capsys):
    tokens = _tokens(600)
    tc = TrainConfig(steps=2, batch_size=4, seq_len=8, save_every=1, sample_tokens=0)
    train_loop(tiny_cfg, tc, tokens[:500], tokens[500:], tmp_path, progress=False)
    capsys.readouterr()
    # A diverged run's advice (a lower lr, grad_clip off) and an extended run (steps=4): each
    # change is a ResumeWarning at the caller, in the Python settings' names.
    changed = tc.replace(steps=4, lr=1e-3, grad_clip=None, eval_every=3)
    with pytest.warns(ResumeWarning) as caught:
        records = train_loop(
            tiny_cfg, changed, tokens[:500], tokens[500:], tmp_path, resume=True, progress=False
        )
    assert [r["step"] for r in records] == [3, 4]
    assert records[0]["lr"] == pytest.approx(float(make_schedule(changed)(2)))
    assert [str(w.message).split(":")[0] for w in caught] == [
        "TrainConfig.steps changed from 2 to 4",
        "TrainConfig.lr changed from 0.0004 to 0.001",
        "TrainConfig.grad_clip changed from 1.0 to None",
        "TrainConfig.eval_every changed from 100 to 3",
    ]
    assert str(caught[1].message).endswith(": the run is no longer an exact replay of an "
                                           "uninterrupted one")
    assert str(caught[3].message).endswith(": changes only when the loop evaluates, samples "
                                           "or saves")
    assert {w.filename for w in caught} == {__file__}  # the caller's line, not the loop's
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="^TrainConfig.steps must be more than 4 to extend the "
                                         "run: .*step_00000004 is at step 4, got 3$"):
        train_loop(
            tiny_cfg, changed.replace(steps=3), tokens[:500], tokens[500:], tmp_path,
            resume=True, progress=False,
        )


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A 2-step run with a checkpoint per step, for the tests that only resume from it (a
    refused resume writes nothing): (its directory, its TrainConfig, its tokens)."""
    out = tmp_path_factory.mktemp("two-step-run")
    tokens = _tokens(600)
    tc = TrainConfig(steps=2, batch_size=4, seq_len=8, save_every=1, sample_tokens=0)
    train_loop(GPTConfig(**TINY), tc, tokens[:500], tokens[500:], out, progress=False)
    return out, tc, tokens


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seq_len": 4}, "^TrainConfig.seq_len must stay 8 to resume .*step_00000002: the "
                         r"data's order, windows and split follow it \(.*\), got 4$"),
        pytest.param({"seed": 7}, "^TrainConfig.seed must stay 123 to resume .*, got 7$",
                     marks=pytest.mark.slow),
        pytest.param({"batch_size": 8}, "^TrainConfig.batch_size must stay 4 to resume .*, got 8$",
                     marks=pytest.mark.slow),
        ({"model": {"n_layers": 3}}, r"another model config \(n_layers: 2 -> 3\)"),
    ],
)
def test_resume_refuses_other_model_or_data_naming_the_field(two_step_run, tiny_cfg, change,
                                                             message):
    out, tc, tokens = two_step_run
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    change = dict(change)
    cfg = tiny_cfg.replace(**change.pop("model", {}))
    with pytest.raises(ValueError, match=message):
        train_loop(
            cfg, tc.replace(steps=3, **change), tokens[:500], tokens[500:], out,
            resume=True, progress=False,
        )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_resume_without_a_checkpoint_is_an_error_naming_the_directory(tmp_path, tiny_cfg):
    tokens = _tokens(600)
    tc = TrainConfig(steps=2, batch_size=4, seq_len=8, sample_tokens=0)
    with pytest.raises(FileNotFoundError, match=f"nothing to resume: {tmp_path / 'run'}"):
        train_loop(
            tiny_cfg, tc, tokens[:500], tokens[500:], tmp_path / "run", resume=True,
            progress=False,
        )
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_cfg):
    tokens = _tokens(600)
    # lr 1e30: step 1 is finite but throws the weights to ~1e30; step 2 overflows.
    tc = TrainConfig(
        steps=5, batch_size=4, seq_len=8, lr=1e30, min_lr=1e30, save_every=1, sample_tokens=0
    )
    # The advice names the Python settings (the command's flags in tests/test_train_cli.py).
    with pytest.raises(TrainingDiverged, match=r"step 2.*step_00000001\. Try a lower "
                       r"TrainConfig\.lr or TrainConfig\.grad_clip, then resume=True$"):
        train_loop(tiny_cfg, tc, tokens[:500], tokens[500:], tmp_path, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1]


def test_train_config_rejects_bad_values_naming_them():
    with pytest.raises(ConfigError, match=r"^TrainConfig.batch_size must be divisible by "
                                          r"TrainConfig.grad_accum \(3\), got 8$"):
        TrainConfig(batch_size=8, grad_accum=3)
    with pytest.raises(ConfigError, match="^TrainConfig.lr must be a positive number, got -1.0$"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"^TrainConfig.dtype must be one of \['bfloat16', "
                                          r"'float32'\], got 'float16'$"):
        TrainConfig(dtype="float16")
    with pytest.raises(ConfigError, match=r"^TrainConfig.warmup_steps must be at most "
                                          r"TrainConfig.steps \(10\), got 50$"):
        TrainConfig(steps=10, warmup_steps=50)
    with pytest.raises(ConfigError, match="^TrainConfig.seq_len must be at most the model's "
                                          "context_length 16, got 32$"):
        train_loop(GPTConfig(**TINY), TrainConfig(seq_len=32), _tokens(10), _tokens(10), "unused")


@pytest.mark.slow
def test_samples_use_temperature_and_top_k_with_a_fixed_key(monkeypatch):
    import jaxgpt.training.evaluation
    from jaxgpt.nn import init_params
    from jaxgpt.training.evaluation import sample_text as _sample

    cfg = GPTConfig(**dict(TINY, vocab_size=50257, emb_dim=16, n_heads=2))
    tc = TrainConfig(seq_len=8, sample_prompt="def", sample_tokens=5, seed=7)
    params = init_params(cfg, 0)
    calls = []
    real = jaxgpt.training.evaluation.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(jaxgpt.training.evaluation, "generate", spy)
    first, second = _sample(params, cfg, tc), _sample(params, cfg, tc)
    assert first == second and first.startswith("def") and first[3:].strip()
    assert [(c["temperature"], c["top_k"]) for c in calls] == [(1.0, 25)] * 2
    np.testing.assert_array_equal(calls[0]["key"], jax.random.PRNGKey(7))
    greedy = _sample(params, cfg, tc.replace(sample_temperature=0.0))
    assert calls[-1]["key"] is None and calls[-1]["top_k"] is None and greedy.startswith("def")


@pytest.mark.slow
def test_rotation_removes_killed_saves_and_keeps_what_jaxgpt_did_not_write(tmp_path, tiny_cfg):
    import subprocess
    import sys

    tokens = _tokens(600)
    tc = TrainConfig(steps=1, batch_size=4, seq_len=8, save_every=1, keep=1, sample_tokens=0)
    train_loop(tiny_cfg, tc, tokens[:500], tokens[500:], tmp_path, progress=False)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000001" / "notes.txt").write_text("mine")  # someone's file in a checkpoint
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    killed = ckpts / f".step_00000002.tmp-{dead}-0123abcd"  # a run killed while saving step 2
    (killed / "params").mkdir(parents=True)
    (killed / "config.json").write_text("{}")
    with pytest.warns(ResumeWarning, match="TrainConfig.steps changed from 1 to 3"):
        train_loop(
            tiny_cfg, tc.replace(steps=3), tokens[:500], tokens[500:], tmp_path, resume=True,
            progress=False,
        )
    # keep=1 rotates out step 2; step 1 holds a file jaxgpt did not write, so it stays.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000003"]
    assert (ckpts / "step_00000001" / "notes.txt").read_text() == "mine"
