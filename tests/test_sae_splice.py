"""`jaxgpt.sae.splice`: an SAE in place of an activation on every path (run_with_hooks,
generate, the patching sweeps, the train step), its inner hook points hooked and cached as
sae-lens's HookedSAETransformer names them, and its values equal to sae-lens's."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, sharpened

from jaxgpt.inference import generate, generate_text_simple
from jaxgpt.interp import cache as cache_module
from jaxgpt.interp import patching
from jaxgpt.interp.cache import run_with_cache, run_with_hooks
from jaxgpt.io import hf
from jaxgpt.nn.hooks import hook_table
from jaxgpt.nn.model import GPTModel
from jaxgpt.sae.formats import load_sae
from jaxgpt.sae.model import SAEConfig, decode, encode, from_params, init_sae
from jaxgpt.sae.splice import (
    SAE_POINTS,
    check_hook,
    run_with_cache_with_saes,
    run_with_saes,
    splice,
)
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.step import init_train_state, make_train_step

DATA = Path(__file__).parent / "data" / "sae_evals"
HOOK = "blocks.1.hook_resid_pre"
# fp32 through the tiny model: logits and activations agree to ~1e-6 between two orders of
# the same float32 sums (values of a few units); 1e-5 is ten times that.
ATOL = 1e-5


def exact_sae(d, hook=HOOK):
    """A standard SAE that reconstructs any x exactly: ReLU(x) - ReLU(-x) = x."""
    eye = np.eye(d, dtype=np.float32)
    cfg = SAEConfig("standard", d_in=d, d_sae=2 * d, hook_name=hook)
    return from_params(cfg, {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d),
                             "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d)})


def random_sae(d, hook=HOOK, seed=0, architecture="standard"):
    """An SAE far from exact (decoder rows of norm 0.1 at init), with a nonzero bias; a
    standard one has the exact one's shapes, so a program compiled for either serves both."""
    k = {"k": 8} if architecture in ("topk", "batchtopk") else {}
    cfg = SAEConfig(architecture, d_in=d, d_sae=2 * d, hook_name=hook, **k)
    sae = init_sae(cfg, seed)
    b_dec = jax.random.normal(jax.random.key(seed + 1), (d,)) * 0.3
    return sae.replace(params={**sae.params, "b_dec": b_dec})


@pytest.fixture(scope="module")
def model():
    """The tiny model, its matrices x8 so that an activation's change moves the logits."""
    from conftest import TINY

    from jaxgpt.config import GPTConfig
    from jaxgpt.nn.model import init_params

    cfg = GPTConfig(**TINY)
    return cfg, sharpened(init_params(cfg, 0))


@pytest.fixture
def ids(rng):
    return jnp.asarray(rng.integers(0, 100, (2, 12)), jnp.int32)


def test_an_exact_sae_leaves_the_logits_unchanged_and_another_changes_them(model, ids):
    cfg, params = model
    clean = run_with_hooks(params, cfg, ids, [])
    assert_close(run_with_saes(params, cfg, ids, exact_sae(cfg.emb_dim)), clean, ATOL, "exact")
    assert_close(run_with_hooks(params, cfg, ids, [(HOOK, splice(exact_sae(cfg.emb_dim)))]),
                 clean, ATOL, "exact, as a hook")
    changed = run_with_saes(params, cfg, ids, random_sae(cfg.emb_dim))
    assert np.abs(np.asarray(changed - clean)).max() > 0.1


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_the_error_term_makes_any_sae_exact(model, ids, architecture):
    cfg, params = model
    sae = random_sae(cfg.emb_dim, architecture=architecture)
    clean, clean_cache = run_with_cache(params, cfg, ids, names=[HOOK])
    logits, cache = run_with_cache_with_saes(params, cfg, ids, sae, use_error_term=True)
    assert_close(logits, clean, ATOL, "logits with the error term")
    x = clean_cache[HOOK]
    recons = decode(sae, encode(sae, x), x)
    assert_close(cache[f"{HOOK}.hook_sae_error"], x - recons, ATOL, "the error")
    assert_close(cache[f"{HOOK}.hook_sae_output"], x, ATOL, "the output")
    assert_close(cache[HOOK], x, ATOL, "the point itself holds the SAE's output")


def test_an_inner_hook_changes_the_output_by_what_it_changed(model, ids):
    """With the error term, ablating feature j takes its decoder row times its activation
    off the activation, and nothing else."""
    cfg, params = model
    sae = random_sae(cfg.emb_dim)
    _, clean_cache = run_with_cache(params, cfg, ids, names=[HOOK])
    x = clean_cache[HOOK]
    acts = encode(sae, x)
    j = int(np.argmax(np.asarray(acts).sum((0, 1))))  # a feature that fires

    def ablate_j(a, name):
        assert name == f"{HOOK}.hook_sae_acts_post"
        return a.at[..., j].set(0.0)

    _, cache = run_with_cache_with_saes(
        params, cfg, ids, sae, use_error_term=True, names=[HOOK, f"{HOOK}.hook_sae_acts_post"],
        hooks=[(f"{HOOK}.hook_sae_acts_post", ablate_j)])
    want = x - acts[..., j, None] * sae.params["W_dec"][j]
    assert_close(cache[HOOK], want, ATOL, "the activation less feature j")
    assert (np.asarray(cache[f"{HOOK}.hook_sae_acts_post"])[..., j] == 0).all()
    # The error term is a hook point too: zeroed, the output is the SAE's reconstruction.
    _, cache = run_with_cache_with_saes(
        params, cfg, ids, sae, use_error_term=True, names=[HOOK],
        hooks=[(f"{HOOK}.hook_sae_error", lambda e, name: e * 0)])
    assert_close(cache[HOOK], decode(sae, acts, x), ATOL, "the reconstruction alone")


def test_every_inner_point_is_cached_under_saelens_names(model, ids):
    cfg, params = model
    sae = random_sae(cfg.emb_dim)
    _, cache = run_with_cache_with_saes(params, cfg, ids, sae, use_error_term=True)
    for sub in SAE_POINTS:
        assert f"{HOOK}.{sub}" in cache
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (2, 12, sae.cfg.d_sae)
    assert "blocks.0.attn.hook_pattern" in cache  # and the model's own points
    _, cache = run_with_cache_with_saes(params, cfg, ids, sae)  # no error term: no error
    assert f"{HOOK}.hook_sae_error" not in cache and f"{HOOK}.hook_sae_output" in cache
    _, cache = run_with_cache_with_saes(params, cfg, ids, sae, names=lambda n: "sae" in n)
    assert sorted(cache) == sorted(f"{HOOK}.{s}" for s in SAE_POINTS if s != "hook_sae_error")


def test_a_hook_that_shows_values_is_called_plainly_when_none_is_cached(model, ids):
    cfg, params = model
    sae = random_sae(cfg.emb_dim)
    hook = splice(sae)
    calls = []

    class Spy:
        value_names = hook.value_names

        def __call__(self, x, name):
            calls.append("call")
            return hook(x, name)

        def with_values(self, x, name):
            calls.append("with_values")
            return hook.with_values(x, name)

    run_with_hooks(params, cfg, ids, [(HOOK, Spy())])
    run_with_cache(params, cfg, ids, names=[f"{HOOK}.hook_sae_acts_pre"], hooks=[(HOOK, Spy())])
    assert calls == ["call", "with_values"]
    with pytest.raises(ValueError, match="cached name"):
        run_with_cache(params, cfg, ids, names=[f"{HOOK}.hook_sae_nope"], hooks=[(HOOK, Spy())])


def test_a_new_sae_of_the_same_shape_reuses_the_compiled_program(model, ids):
    cfg, params = model
    run_with_saes(params, cfg, ids, random_sae(cfg.emb_dim, seed=0))
    size = cache_module._forward._cache_size()
    out = run_with_saes(params, cfg, ids, random_sae(cfg.emb_dim, seed=5))
    assert cache_module._forward._cache_size() == size
    assert_close(out, run_with_hooks(params, cfg, ids, [(HOOK, splice(random_sae(
        cfg.emb_dim, seed=5)))]), ATOL, "the second SAE's logits")


def test_excluded_positions_keep_their_activation(model, ids):
    cfg, params = model
    sae = random_sae(cfg.emb_dim)
    ids = ids.at[:, 0].set(7).at[1, 5].set(7)
    _, clean = run_with_cache(params, cfg, ids, names=[HOOK])
    _, cache = run_with_cache_with_saes(params, cfg, ids, sae, names=[HOOK],
                                        exclude_special_tokens=[7])
    x, out = np.asarray(clean[HOOK]), np.asarray(cache[HOOK])
    special = np.asarray(ids) == 7
    assert np.array_equal(out[special], x[special])
    assert np.abs(out[~special] - x[~special]).min(-1).max() > 0  # replaced elsewhere


def test_a_hook_z_sae_reads_the_heads_flattened(model, ids):
    cfg, params = model
    z = "blocks.0.attn.hook_z"
    sae = random_sae(cfg.emb_dim, hook=z)
    _, clean = run_with_cache(params, cfg, ids, names=[z])
    _, cache = run_with_cache_with_saes(params, cfg, ids, sae)
    x = np.asarray(clean[z]).reshape(2, 12, cfg.emb_dim)
    assert_close(cache[f"{z}.hook_sae_input"], x, ATOL, "input, heads flattened")
    assert cache[f"{z}.hook_sae_output"].shape == (2, 12, cfg.n_heads, cfg.emb_dim // cfg.n_heads)
    assert_close(cache[z].reshape(2, 12, -1), decode(sae, encode(sae, x), x), ATOL, "output")


# --- every path ----------------------------------------------------------------------------
# Slow, as tests/test_hook_points.py's tests of every path are: each compiles a generation
# loop, a sweep or a train step for the splice (and one without, to compare).

@pytest.mark.slow
def test_generate_runs_the_splice_in_cached_and_uncached_decoding(model):
    cfg, params = model
    prompt = jnp.asarray([[5, 17, 42, 3]], jnp.int32)
    exact = [(HOOK, splice(exact_sae(cfg.emb_dim)))]
    plain = np.asarray(generate(params, cfg, prompt, 8))
    assert np.array_equal(np.asarray(generate(params, cfg, prompt, 8, hooks=exact)), plain)
    hooks = [(HOOK, splice(random_sae(cfg.emb_dim)))]
    cached = np.asarray(generate(params, cfg, prompt, 8, hooks=hooks))
    assert np.array_equal(cached, np.asarray(generate_text_simple(params, cfg, prompt, 8,
                                                                  hooks=hooks)))
    assert not np.array_equal(cached, plain)  # the SAE changed what the model says
    error = [(HOOK, splice(random_sae(cfg.emb_dim, seed=1), use_error_term=True))]
    assert np.array_equal(np.asarray(generate(params, cfg, prompt, 8, hooks=error)), plain)


@pytest.mark.slow
def test_a_patching_sweep_runs_on_the_spliced_model(model, rng):
    cfg, params = model
    clean_ids = rng.integers(0, 100, 8).astype(np.int32)
    corrupt_ids = clean_ids.copy()
    corrupt_ids[2] = (corrupt_ids[2] + 1) % 100
    sae = random_sae(cfg.emb_dim, hook="blocks.0.hook_mlp_out")
    spliced = GPTModel(cfg, hooks=hook_table(cfg, [(sae.cfg.hook_name, splice(sae))]))

    def metric(logits):
        return logits[-1, 3] - logits[-1, 4]

    _, clean_cache = run_with_cache(params, cfg, clean_ids, model=spliced)
    fast = patching.patch_sweep(params, cfg, corrupt_ids, clean_cache, metric, "resid_pre",
                                model=spliced)
    slow = patching.reference_sweep(params, cfg, corrupt_ids, clean_cache, metric, "resid_pre",
                                    model=spliced)
    assert_close(fast, slow, 1e-4, "the sweep on the spliced model")  # as tests/test_patching
    _, plain_cache = run_with_cache(params, cfg, clean_ids)
    plain = patching.patch_sweep(params, cfg, corrupt_ids, plain_cache, metric, "resid_pre")
    assert np.abs(np.asarray(fast - plain)).max() > 1e-2


@pytest.mark.slow
def test_the_train_step_trains_through_the_splice(model, rng):
    cfg, params = model
    tc = TrainConfig(steps=2, batch_size=2, seq_len=8, lr=1e-3, grad_clip=None)
    tokens = jnp.asarray(rng.integers(0, 100, (2, 9)), jnp.int32)
    batch = (tokens[:, :-1], tokens[:, 1:])
    key = jax.random.key(0)

    def one_step(hooks):
        step = make_train_step(cfg, tc, hooks=hooks)
        state, metrics = step(init_train_state(cfg, tc, params), batch, key)
        return state, metrics

    plain, plain_metrics = one_step(())
    exact, exact_metrics = one_step([(HOOK, splice(exact_sae(cfg.emb_dim)))])
    assert float(exact_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), abs=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(exact.params),
                    jax.tree_util.tree_leaves(plain.params), strict=True):
        assert_close(a, b, 1e-5, "params after a step through an exact SAE")
    _, other = one_step([(HOOK, splice(random_sae(cfg.emb_dim)))])
    assert abs(float(other["loss"]) - float(plain_metrics["loss"])) > 1e-2


# --- against sae-lens ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def saelens():
    """The fixtures: the tiny GPT-2, its tokens, HookedSAETransformer's arrays."""
    from safetensors.numpy import load_file

    cfg, params = hf.load_pretrained(DATA / "gpt2")
    expected = json.loads((DATA / "expected.json").read_text())
    tokens = np.asarray(expected["tokens"], np.int32)[0, :2]
    return cfg, params, tokens, load_file(DATA / "spliced.safetensors")


def _load(name, tmp_path):
    """The fixture SAE (its hook_z one read as 'none': see tests/test_sae_evals.py)."""
    folder = DATA / name
    if name == "hook_z":
        shutil.copytree(folder, tmp_path / name)
        raw = json.loads((tmp_path / name / "cfg.json").read_text())
        (tmp_path / name / "cfg.json").write_text(json.dumps({**raw, "reshape_activations":
                                                              "none"}))
        folder = tmp_path / name
    return load_sae(folder)


@pytest.mark.parametrize("name", ["topk", "hook_z"])
def test_spliced_runs_equal_hooked_sae_transformers(saelens, name, tmp_path):
    cfg, params, tokens, want = saelens
    sae = _load(name, tmp_path)
    hook = sae.cfg.hook_name
    logits, cache = run_with_cache_with_saes(params, cfg, tokens, sae)
    assert_close(logits, want[f"{name}/logits"], ATOL, f"{name}: logits with the SAE")
    for sub in ("hook_sae_acts_post", "hook_sae_recons"):
        assert_close(cache[f"{hook}.{sub}"], want[f"{name}/{sub}"], ATOL, f"{name}: {sub}")
    logits, cache = run_with_cache_with_saes(params, cfg, tokens, sae, use_error_term=True)
    assert_close(logits, want[f"{name}/error_term_logits"], ATOL, f"{name}: error term logits")
    for sub in ("hook_sae_error", "hook_sae_output"):
        assert_close(cache[f"{hook}.{sub}"], want[f"{name}/{sub}"], ATOL, f"{name}: {sub}")


# --- refusals ------------------------------------------------------------------------------

def test_check_hook_names_the_closest_point_and_the_width(model):
    cfg, _ = model
    assert check_hook(cfg, "blocks.0.attn.hook_z", 32) == "blocks.0.attn.hook_z"
    assert check_hook(cfg, "blocks.1.mlp.hook_post", 128) == "blocks.1.mlp.hook_post"
    with pytest.raises(ValueError, match="the closest is 'blocks.1.hook_resid_pre'"):
        check_hook(cfg, "blocks.1.hook_resid_pr", 32)
    with pytest.raises(ValueError, match="d_in is 48, but blocks.1.hook_resid_pre has 32"):
        check_hook(cfg, HOOK, 48)
    with pytest.raises(ValueError, match="attention weights"):
        check_hook(cfg, "blocks.0.attn.hook_pattern", 12)
    with pytest.raises(ValueError, match="no hook point"):
        check_hook(cfg, None, 32)


def test_splice_refuses_what_it_cannot_do(model, ids):
    cfg, params = model
    sae = random_sae(cfg.emb_dim)
    with pytest.raises(ValueError, match="to_inference"):
        splice(random_sae(cfg.emb_dim, architecture="batchtopk"))
    with pytest.raises(ValueError, match="use_error_term=True"):
        splice(sae, hooks=[("hook_sae_error", lambda x, n: x)])
    with pytest.raises(ValueError, match="not an SAE's inner hook point"):
        splice(sae, hooks=[("hook_sae_acts", lambda x, n: x)])
    with pytest.raises(ValueError, match="no SAE is spliced at 'blocks.0.hook_resid_pre'"):
        run_with_saes(params, cfg, ids, sae,
                      hooks=[("blocks.0.hook_resid_pre.hook_sae_acts_post", lambda x, n: x)])
    with pytest.raises(ValueError, match="two SAEs read"):
        run_with_saes(params, cfg, ids, [sae, sae])
    with pytest.raises(ValueError, match="cannot read blocks.0.hook_resid_pre"):
        run_with_hooks(params, cfg, ids, [("blocks.0.hook_resid_pre",
                                           splice(random_sae(48)))])
    with pytest.raises(ValueError, match="exclude has shape"):
        run_with_hooks(params, cfg, ids, [(HOOK, splice(sae, exclude=np.zeros((2, 5), bool)))])
