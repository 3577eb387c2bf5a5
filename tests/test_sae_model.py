"""The SAE architectures (`jaxgpt.sae.model`) against sae-lens 6.54.12's own numbers.

tests/data/saelens/CASE/ holds what `scripts/saelens_fixtures.py` recorded with sae-lens (which
cannot be installed beside the test extra): a training SAE's save and, on fixed inputs with a
dead-feature mask, its training pass (pre-activations, activations, reconstruction, each loss
by name), the gradients of the total loss, BatchTopK's threshold update, and the folds. Here
jaxgpt loads the same folder and must give the same numbers; the pure-JAX properties of the
activation functions are checked without sae-lens.
"""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from jaxgpt.sae import model as M
from jaxgpt.sae.formats import load_sae

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "saelens"
sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/NAME.py` has it

import saelens_fixtures  # noqa: E402

CASES = list(saelens_fixtures.CASES)
# Compiled once per SAE config: far faster than the pass's many small ops run one by one.
training_forward = jax.jit(M.training_forward)
EPS = float(np.finfo(np.float32).eps)


def tol(want) -> float:
    """fp32 parity bound: the values here are sums of at most 32 products (d_sae), which torch
    and XLA add in different orders: 32 roundings of the largest magnitude (at least 1)."""
    return 32 * EPS * max(1.0, float(np.abs(np.asarray(want)).max()))


def expected(case: str) -> dict:
    with np.load(DATA / case / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def train_cfg(case: str) -> dict:
    return json.loads((DATA / case / "train" / "cfg.json").read_text())


@functools.cache  # shared by the tests of one case
def training_pass(case: str):
    """jaxgpt's training pass on the case's saved SAE: (the SAE, the output, the gradients
    of the total loss)."""
    e = expected(case)
    sae = load_sae(DATA / case / "train")

    def loss(params):
        out = M.training_forward(sae.replace(params=params), jnp.asarray(e["x"]),
                                 jnp.asarray(e["dead_mask"]), float(e["coefficient"]))
        return out.loss, out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sae.params)
    return sae, out, grads


@pytest.mark.parametrize("case", CASES)
def test_training_pass_matches_saelens(case):
    e = expected(case)
    _, out, _ = training_pass(case)
    for name, got in (("hidden_pre", out.hidden_pre), ("feature_acts", out.feature_acts),
                      ("sae_out", out.sae_out)):
        want = e[f"train_pass_{name}"]
        assert_close(got, want, tol(want), f"{case} {name}")
    want_losses = {k.removeprefix("losses/") for k in e if k.startswith("losses/")}
    assert set(out.losses) == want_losses
    for name, got in out.losses.items():
        want = e[f"losses/{name}"]
        assert_close(got, want, tol(want), f"{case} {name}")
    assert_close(out.loss, e["loss"], tol(e["loss"]), f"{case} loss")


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_saelens(case):
    """Through the custom VJPs (JumpReLU's and the step's straight-through estimates, with and
    without the estimate to the input), the top-k selections and the auxiliary loss."""
    e = expected(case)
    _, _, grads = training_pass(case)
    want_names = {k.removeprefix("grad/") for k in e if k.startswith("grad/")}
    assert set(grads) == want_names
    for name, got in grads.items():
        want = e[f"grad/{name}"]
        assert np.abs(want).max() > 0, f"{case}: sae-lens's gradient of {name} is 0"
        assert_close(got, want, tol(want), f"{case} d loss / d {name}")


@pytest.mark.parametrize("case", [c for c in CASES if saelens_fixtures.CASES[c][0] == "jumprelu"])
def test_jumprelu_threshold_gradient_comes_from_the_straight_through_window(case):
    """A positive control for the gradient test: the threshold's gradient is the STE's (and
    the pre-activation loss's, on dead features below their threshold), so it is non-zero
    where a pre-activation lies within half a bandwidth of a positive threshold, 0 where
    none does."""
    e = expected(case)
    cfg = train_cfg(case)
    h, t = e["train_pass_hidden_pre"], e["threshold_projected"]
    in_window = (np.abs((h - t) / cfg["jumprelu_bandwidth"]) < 0.5).any(0)
    possible = in_window.copy()
    if cfg["pre_act_loss_coefficient"] is not None:
        possible |= e["dead_mask"] & (t > h).any(0)
    assert (in_window & (t > 0)).any() and not possible.all()
    _, _, grads = training_pass(case)
    nonzero = np.asarray(grads["threshold"]) != 0
    assert not (nonzero & ~possible).any()
    assert nonzero[in_window & (t > 0)].all()


@pytest.mark.parametrize("case", CASES)
def test_recorded_decisions_have_a_margin(case):
    """The parity tests compare discontinuous functions (top-k, thresholds, the STE's
    rectangle): every recorded decision is far (10 tolerances) from its boundary, so a
    rounding difference of another CPU cannot flip one."""
    e = expected(case)
    cfg = train_cfg(case)
    h = e["train_pass_hidden_pre"]
    bound = 10 * tol(h)
    if cfg["architecture"] == "jumprelu":
        t = e["threshold_projected"]
        assert np.abs(h - t).min() > bound
        assert np.abs(np.abs((h - t) / cfg["jumprelu_bandwidth"]) - 0.5).min() > bound
        assert np.abs(e["inference_hidden_pre"] - e["threshold_projected"]).min() > bound
    elif cfg["architecture"] == "topk":
        s = -np.sort(-h, -1)
        assert (s[:, cfg["k"] - 1] - s[:, cfg["k"]]).min() > bound
    elif cfg["architecture"] == "batchtopk":
        r = np.sort(np.maximum(h, 0).ravel())[::-1]
        n = int(cfg["k"] * h.shape[0])
        assert r[n - 1] - r[n] > bound
    else:
        assert np.abs(h).min() > bound


@pytest.mark.parametrize("case", [c for c in CASES if saelens_fixtures.CASES[c][0] == "batchtopk"])
def test_batchtopk_threshold_update_matches_saelens(case):
    """sae-lens keeps the threshold in float64; jaxgpt in float32: one rounding of each of the
    two terms of the moving average."""
    e = expected(case)
    sae, out, _ = training_pass(case)
    assert_close(sae.state["topk_threshold"], e["topk_threshold_before"],
                 EPS * abs(float(e["topk_threshold_before"])), f"{case} saved threshold")
    got = M.update_topk_threshold(sae, out.feature_acts).state["topk_threshold"]
    want = e["topk_threshold_after"]
    assert float(want) != float(e["topk_threshold_before"])
    assert_close(got, want, 4 * EPS * abs(float(want)), f"{case} threshold after the pass")


@pytest.mark.parametrize("case", CASES)
def test_fold_W_dec_norm_matches_saelens_and_keeps_the_forward(case):
    e = expected(case)
    sae = load_sae(DATA / case / "train")
    x = jnp.asarray(e["x"])
    if not any(k.startswith("fold_W_dec_norm/") for k in e):  # sae-lens refuses it too
        with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
            M.fold_W_dec_norm(sae)
        return
    folded = M.fold_W_dec_norm(sae)
    for name, got in {**folded.params, **folded.state}.items():
        want = e[f"fold_W_dec_norm/{name}"]
        assert_close(got, want, tol(want), f"{case} folded {name}")
    np.testing.assert_allclose(np.linalg.norm(folded.params["W_dec"], axis=-1), 1.0,
                               atol=4 * EPS)
    want = M.forward(sae, x)
    assert_close(M.forward(folded, x), want, tol(want), f"{case} forward after folding")


@pytest.mark.parametrize("case", CASES)
def test_fold_activation_norm_scaling_factor_matches_saelens(case):
    e = expected(case)
    sae = load_sae(DATA / case / "train")
    s = saelens_fixtures.SCALING_FACTOR
    folded = M.fold_activation_norm_scaling_factor(sae, s)
    assert folded.cfg.normalize_activations == "none"
    for name, got in {**folded.params, **folded.state}.items():
        want = e[f"fold_scaling/{name}"]
        assert_close(got, want, tol(want), f"{case} {name} after folding the scale")
    if sae.cfg.normalize_activations == "none":
        # The SAE trained on activations times s, given the raw ones, reconstructs them.
        x = jnp.asarray(e["x"])
        want = M.forward(sae, x * s) / s
        assert_close(M.forward(folded, x), want, tol(want), f"{case} folded forward")


# --- pure-JAX properties -------------------------------------------------------------------

def test_topk_keeps_the_k_largest_of_each_row():
    h = jax.random.uniform(jax.random.key(0), (2, 3, 20), minval=0.1)  # positive: all kept
    acts = M.topk(h, 5)
    assert ((acts != 0).sum(-1) == 5).all()
    kth = jnp.sort(h, -1)[..., -5:-4]
    np.testing.assert_array_equal(acts, jnp.where(h >= kth, h, 0))


def test_topk_zeroes_negative_winners():
    h = -jnp.arange(1.0, 9.0)[None]  # all negative: the top k are ReLU'd to 0
    assert (M.topk(h, 3) == 0).all()


def test_batch_topk_keeps_k_per_row_on_average_over_the_batch():
    h = jax.random.uniform(jax.random.key(1), (4, 5, 16), minval=0.1)
    acts = M.batch_topk(h, 2.5)
    assert int((acts != 0).sum()) == int(2.5 * 20)
    assert (acts != 0).sum(-1).std() > 0  # not k per row
    kept = h.ravel()[np.asarray(acts.ravel() != 0)]
    assert kept.min() > h.ravel()[np.asarray(acts.ravel() == 0)].max()


def test_update_topk_threshold_keeps_it_when_nothing_fires():
    sae = M.init_sae(M.SAEConfig("batchtopk", 4, 8, k=2.0))
    sae = sae.replace(state={"topk_threshold": jnp.float32(0.3)})
    same = M.update_topk_threshold(sae, jnp.zeros((3, 8)))
    assert float(same.state["topk_threshold"]) == pytest.approx(0.3)
    acts = jnp.zeros((3, 8)).at[0, 1].set(0.5).at[2, 3].set(0.2)
    moved = M.update_topk_threshold(sae, acts)
    assert float(moved.state["topk_threshold"]) == pytest.approx(0.99 * 0.3 + 0.01 * 0.2)


def test_jumprelu_is_relu_gated_by_the_threshold():
    """sae-lens's inference JumpReLU: a negative threshold passes no negative activation."""
    h = jnp.array([-0.5, -0.05, 0.05, 0.3])
    t = jnp.array([-1.0, -0.1, 0.1, 0.1])
    np.testing.assert_array_equal(M.jumprelu(h, t, 0.05, False), h * jnp.array([0, 0, 0, 1]))


def test_training_pass_projects_a_negative_threshold():
    cfg = M.SAEConfig("jumprelu", 4, 6)
    sae = M.init_sae(cfg, 3)
    x = jax.random.normal(jax.random.key(4), (5, 4))
    negative = sae.replace(params={**sae.params, "threshold": jnp.full(6, -0.2)})
    zero = M.project_threshold(negative)
    np.testing.assert_array_equal(zero.params["threshold"], 0.0)
    assert training_forward(negative, x).loss == training_forward(zero, x).loss


def test_aux_loss_is_zero_without_dead_features():
    sae = M.init_sae(M.SAEConfig("topk", 8, 16, k=3), 0)
    x = jax.random.normal(jax.random.key(2), (4, 8))
    for dead in (None, jnp.zeros(16, bool)):
        out = training_forward(sae, x, dead)
        assert float(out.losses["auxiliary_reconstruction_loss"]) == 0.0
    out = training_forward(sae, x, jnp.arange(16) < 5)
    assert float(out.losses["auxiliary_reconstruction_loss"]) > 0.0


@pytest.mark.parametrize("rescale", [False, True])
def test_aux_loss_with_fewer_dead_features_than_k_aux(rescale):
    """Two dead features, fewer than d_in // 2 = 4: both reconstruct the residual, the loss
    scaled by 2 / 4 (the recorded cases have more dead features than k_aux)."""
    cfg = M.SAEConfig("topk", 8, 16, k=3, rescale_acts_by_decoder_norm=rescale,
                      aux_loss_coefficient=0.5)
    sae = M.init_sae(cfg, 0)
    rows = jnp.arange(1.0, 17.0)[:, None]  # decoder norms that differ, so rescaling shows
    sae = sae.replace(params={**sae.params, "W_dec": sae.params["W_dec"] * rows})
    x = jax.random.normal(jax.random.key(5), (4, 8))
    dead = jnp.zeros(16, bool).at[jnp.array([3, 11])].set(True)
    out = training_forward(sae, x, dead)
    h = np.asarray(out.hidden_pre, np.float64)
    W_dec = np.asarray(sae.params["W_dec"], np.float64)
    if rescale:
        W_dec = W_dec / np.linalg.norm(W_dec, axis=-1, keepdims=True)
    recons = h[:, [3, 11]] @ W_dec[[3, 11]]
    residual = np.asarray(x, np.float64) - np.asarray(out.sae_out, np.float64)
    want = 0.5 * (2 / 4) * ((recons - residual) ** 2).sum(-1).mean()
    got = out.losses["auxiliary_reconstruction_loss"]
    assert_close(got, want, 1e-5 * want, "aux loss")  # float32 against float64: a few ulps


def test_aux_loss_refuses_run_time_normalisation():
    sae = M.init_sae(M.SAEConfig("topk", 8, 16, k=3, normalize_activations="layer_norm"), 0)
    x = jnp.ones((2, 8))
    training_forward(sae, x)  # without a dead mask there is no auxiliary loss to refuse
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        training_forward(sae, x, jnp.zeros(16, bool))


def test_init_sae_as_saelens_initialises():
    cfg = M.SAEConfig("jumprelu", 8, 32, decoder_init_norm=0.1, jumprelu_init_threshold=0.02)
    sae = M.init_sae(cfg, 0)
    np.testing.assert_allclose(np.linalg.norm(sae.params["W_dec"], axis=-1), 0.1, rtol=1e-6)
    np.testing.assert_array_equal(sae.params["W_enc"], sae.params["W_dec"].T)
    assert not np.asarray(sae.params["b_enc"]).any() and not np.asarray(sae.params["b_dec"]).any()
    np.testing.assert_allclose(sae.params["threshold"], 0.02)
    plain = M.init_sae(cfg.replace(decoder_init_norm=None), 0)
    assert np.abs(plain.params["W_dec"]).max() <= (6 / 8) ** 0.5  # kaiming-uniform's bound
