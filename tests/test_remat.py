"""Rematerialisation (`TrainConfig.remat`, `GPTModel.remat`): the gradient's program holds one
rematerialised region per block with the mode's policy, and keeps for the backward pass what
the mode says; the same loss and gradients as keeping every activation, dropout included;
generation drops it; the modes, their validation, and configs saved before the modes existed
(remat true/false)."""

import re

import jax
import jax.ad_checkpoint
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.cli import build_parser
from jaxgpt.config import GPTConfig
from jaxgpt.inference import Generator, generate
from jaxgpt.nn import GPTModel, init_params
from jaxgpt.nn import model as model_module
from jaxgpt.training import run_dir
from jaxgpt.training.config import TrainConfig, resolve_remat
from jaxgpt.training.loss import cross_entropy_loss

# The tiny config with the book's dropout, so the masks of the attention weights, the residual
# branches and the embeddings all enter the gradients.
DROPPY = dict(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
              drop_rate=0.1, qkv_bias=True)


def _loss_fn(cfg, tokens, remat, key):
    """params -> the training loss of `GPTModel(cfg, remat=remat)`, dropout on."""
    model = GPTModel(cfg, remat=remat)

    def loss(p):
        logits = model.apply({"params": p}, tokens, False, rngs={"dropout": key})  # [B, T, V]
        return cross_entropy_loss(logits, jnp.roll(tokens, -1, axis=1))

    return loss


def _loss_and_grads(cfg, params, tokens, remat, key):
    return jax.jit(jax.value_and_grad(_loss_fn(cfg, tokens, remat, key)))(params)


def _remat_policies(jaxpr):
    """The policy of every rematerialised region (`checkpoint` equation) in `jaxpr`, nested
    ones included (None: save nothing, recompute the whole region)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is jax.extend.core.primitives.remat_p:
            found.append(eqn.params["policy"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _remat_policies(sub)
    return found


def _grad_remat_policies(cfg, params, tokens, remat):
    """The rematerialised regions of the gradient's program (where the backward pass
    recomputes), with their policies."""
    loss = _loss_fn(cfg, tokens, remat, jax.random.PRNGKey(1))
    return _remat_policies(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)


# The policy each mode names (see `block_class`): "attention" keeps the outputs of matmuls
# without batch dimensions, "block" keeps nothing inside the block.
POLICIES = {"attention": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            "block": None, True: None}


def _worst(grads, ref):
    """max over leaves of max|g - ref| / scale, scale = the leaf's largest |ref| entry, or
    1e-3 of the largest entry of all leaves where that is more. The floor is for leaves whose
    exact gradient is zero (the key bias: softmax ignores a shift shared by all keys), where
    the computed value is only rounding noise of the other gradients' size."""
    top = max(float(jnp.max(jnp.abs(r))) for r in jax.tree_util.tree_leaves(ref))
    diffs = jax.tree_util.tree_map(
        lambda g, r: float(jnp.max(jnp.abs(g - r)) / max(float(jnp.max(jnp.abs(r))), 1e-3 * top)),
        grads, ref)
    return max(jax.tree_util.tree_leaves(diffs))


@pytest.mark.parametrize("remat", [pytest.param("attention", marks=pytest.mark.slow), "block",
                                   pytest.param(True, marks=pytest.mark.slow)])  # True: block
def test_remat_gives_the_loss_and_gradients_of_no_remat_with_dropout_on(remat, rng):
    cfg = GPTConfig(**DROPPY)
    params = init_params(cfg, 0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, cfg.context_length)), jnp.int32)
    key = jax.random.PRNGKey(1)
    loss0, grads0 = _loss_and_grads(cfg, params, tokens, "none", key)
    loss, grads = _loss_and_grads(cfg, params, tokens, remat, key)
    # The backward pass recomputes the same operations on the same inputs with the same
    # dropout masks; only the order of float32 sums inside XLA's fusions may differ. A sum of
    # n terms reassociated moves by at most (n - 1) * 2^-24 of its terms' absolute sum; the
    # longest sums here have B * T = 32 or 4 * D = 128 terms, and the gradients of these
    # random weights are not sums of much larger cancelling terms: 1e-5 of a leaf's scale.
    assert float(loss) == pytest.approx(float(loss0), rel=1e-6)
    assert _worst(grads, grads0) < 1e-5
    # What was compared is a program that recomputes (else the equality above is trivial).
    assert _grad_remat_policies(cfg, params, tokens, remat) == [POLICIES[remat]] * cfg.n_layers
    # Positive control: masks drawn from another key move the gradients by percents, so a
    # recomputation that drew masks other than the forward pass's would fail the bound above.
    _, other = _loss_and_grads(cfg, params, tokens, "none", jax.random.PRNGKey(2))
    assert _worst(other, grads0) > 1e-2


@pytest.mark.parametrize("remat", ["none", "attention", "block"])
def test_the_gradient_recomputes_each_block_with_the_modes_policy(remat, rng):
    cfg = GPTConfig(**DROPPY)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, cfg.context_length)), jnp.int32)
    policies = _grad_remat_policies(cfg, init_params(cfg, 0), tokens, remat)
    assert policies == ([] if remat == "none" else [POLICIES[remat]] * cfg.n_layers)


def _saved_residuals(cfg, params, tokens, remat, capsys):
    """(shape, what made it) of every array the forward pass keeps for the backward pass."""
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(
        _loss_fn(cfg, tokens, remat, jax.random.PRNGKey(1)), params)
    lines = capsys.readouterr().out.splitlines()
    found = [re.match(r"^\w+\[([\d,]*)\] (.*)$", line) for line in lines]
    assert lines and all(found), lines
    return [(tuple(int(d) for d in m.group(1).split(",") if d), m.group(2)) for m in found]


def test_each_mode_keeps_what_it_says_for_the_backward_pass(rng, capsys):
    """"none" keeps every layer's `[B, H, T, T]` attention weights; "attention" keeps none of
    them but the 2-D matmul outputs (projections and feed-forward) of every block; "block"
    keeps no matmul output at all, only the blocks' inputs."""
    cfg = GPTConfig(**DROPPY)
    params = init_params(cfg, 0)
    b, t, h = 2, cfg.context_length, cfg.n_heads
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)

    def kept(remat):
        saved = _saved_residuals(cfg, params, tokens, remat, capsys)
        scores = [s for s, _ in saved if np.prod(s) == b * h * t * t]
        dots = [s for s, what in saved if what.startswith("output of dot_general")]
        return len(scores), len(dots)

    n = cfg.n_layers
    none, attention, block = kept("none"), kept("attention"), kept("block")
    assert none[0] >= n  # the positive control: the scores are found where they are kept
    assert attention[0] == 0 and attention[1] >= 4 * n  # at least Q, K, V and out_proj
    assert block == (0, 0)


def test_remat_modes_and_old_bools():
    assert TrainConfig().remat is None  # auto
    assert TrainConfig(remat=True).remat == "block"  # configs saved before the modes existed
    assert TrainConfig(remat=False).remat == "none"
    assert TrainConfig(remat="attention").remat == "attention"
    assert TrainConfig(remat=True) == TrainConfig(remat="block")  # one compiled step for both
    assert [resolve_remat(None, p) for p in ("cpu", "gpu", "cuda", "tpu")] == [
        "none", "attention", "attention", "attention"]
    assert resolve_remat(True, "cpu") == "block" and resolve_remat("none", "tpu") == "none"


@pytest.mark.parametrize("bad", ["attn", "", 1, 0, None])
def test_bad_remat_values_are_refused_naming_them(bad):
    if bad is not None:
        with pytest.raises(ValueError, match=rf"TrainConfig.remat must be one of 'none', "
                                             rf"'attention', 'block'.*got {bad!r}"):
            TrainConfig(remat=bad)
    cfg = GPTConfig(**DROPPY)
    with pytest.raises(ValueError, match=rf"remat must be one of .*got {bad!r}"):
        GPTModel(cfg, remat=bad).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))


def test_cli_remat_flag_takes_a_mode_and_alone_means_block():
    parse = build_parser().parse_args
    assert parse(["train"]).remat is None
    assert parse(["train", "--remat"]).remat == "block"
    assert parse(["train", "--remat", "attention"]).remat == "attention"
    with pytest.raises(SystemExit):
        parse(["train", "--remat", "attn"])


@pytest.mark.parametrize(
    "saved, now, warned",
    [
        (False, None, False),  # an old run (no --remat) resumed with the defaults on the CPU
        (False, "none", False),
        (True, "block", False),
        (True, None, True),  # block -> none (auto, CPU)
        (False, "attention", True),
        ("attention", "block", True),
    ],
)
def test_resume_compares_remat_as_modes_so_old_bools_load(monkeypatch, saved, now, warned):
    cfg = GPTConfig(**DROPPY)
    tc = TrainConfig(batch_size=4, seq_len=8, remat=now)
    train = tc.to_dict() | {"remat": saved}  # what an older run wrote to its metadata
    monkeypatch.setattr(run_dir.checkpoint, "load_config", lambda path: cfg)
    monkeypatch.setattr(run_dir.checkpoint, "load_metadata",
                        lambda path: {"train": train})
    monkeypatch.setattr(run_dir.jax, "default_backend", lambda: "cpu")
    lines = run_dir.resume_changes("ckpt", cfg, tc)
    assert [line for line in lines if line.startswith("TrainConfig.remat")] == (
        [f"TrainConfig.remat changed from {saved!r} to {tc.remat!r}: the run is no longer an "
         f"exact replay of an uninterrupted one"] if warned else [])
    assert len(lines) == int(warned)


@pytest.mark.parametrize("remat", [pytest.param("attention", marks=pytest.mark.slow), "block"])
def test_generation_builds_its_model_without_remat(remat, monkeypatch, rng):
    """Generator (and so generate and generate_stream) applies the caller's model with remat
    off: it only costs recomputation where no gradient is taken. Read off the blocks the traced
    program builds, as remat never changes a forward value (the tokens could not tell)."""
    # A vocabulary no other test compiles for, one per mode: every call here traces anew.
    cfg = GPTConfig(**{**DROPPY, "vocab_size": 90 + len(remat)})
    params = init_params(cfg, 0)
    model = GPTModel(cfg, remat=remat)
    built = []
    real = model_module.block_class
    monkeypatch.setattr(model_module, "block_class",
                        lambda mode: built.append(model_module.remat_mode(mode)) or real(mode))
    prompts = np.asarray(rng.integers(0, cfg.vocab_size, (2, 4)), np.int32)
    model.apply({"params": params}, prompts)
    assert built == [remat]  # the positive control: the recorder sees the mode it is given
    built.clear()
    for batch in (1, 2):
        applied, _ = Generator(params, cfg, model=model).weights(batch)
        assert model_module.remat_mode(applied.remat) == "none"
    generate(params, cfg, prompts, 4, model=model)
    assert built and set(built) == {"none"}
