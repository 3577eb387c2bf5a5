"""Write the fixtures tests/test_sae_evals.py and tests/test_sae_splice.py hold jaxgpt to:
sae-lens 6.54.12's evaluations and spliced runs of tiny SAEs on a tiny GPT-2.

    /work/saelens-venv/bin/python scripts/saelens_eval_fixtures.py [tests/data/sae_evals]

Run with sae-lens's own environment (torch, transformers, transformer-lens 3.x, sae-lens; not
jaxgpt's, which pins transformer-lens 4). Offline, seeded, CPU; it writes (~0.3 MB in all):

- `gpt2/`: a Hugging Face GPT-2 directory (vocab 97, context 16, emb 32, 4 heads, 2 layers),
  its weights N(0, 0.15) so that its logits are far from flat (a zero ablation then changes
  the loss by a lot, and `ce_loss_score`'s denominator is well away from 0);
- `<name>/`: SAEs in sae-lens's folder format (`cfg.json`, `sae_weights.safetensors`): a
  standard SAE on `blocks.0.hook_resid_post`, a topk one on `blocks.1.hook_resid_pre`, a
  jumprelu one on `blocks.1.hook_mlp_out` and a standard one on `blocks.0.attn.hook_z` (d_in
  = heads x head size: sae-lens flattens the heads), each built to reconstruct this model's
  activations roughly (a random frame of decoder directions around the activations' mean);
- `expected.json`: the token batches (token 0 is the BOS sae-lens excludes), and for each SAE
  `run_evals`'s metrics with `get_eval_everything_config` over those batches, excluding token
  0 (and, for the standard SAE, once more excluding nothing);
- `spliced.safetensors`: for the topk and the hook_z SAEs, `HookedSAETransformer`'s logits
  with the SAE spliced in, and its cache of `<hook>.hook_sae_acts_post`, `.hook_sae_recons`
  and, with the error term, `.hook_sae_error` and `.hook_sae_output`, on the first batch's
  first two rows.

The HookedTransformer is built from the Hugging Face model with no weight processing (no
LayerNorm folding, no centring), and its logits are checked against the Hugging Face model's
before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from sae_lens import HookedSAETransformer
from sae_lens.evals import get_eval_everything_config, run_evals
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from safetensors.torch import save_file
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformers import GPT2Config, GPT2LMHeadModel

SEED = 0
VOCAB, CONTEXT, EMB, HEADS, LAYERS = 97, 16, 32, 4, 2
N_BATCHES, BATCH = 3, 4
BOS = 0
TEMPERATURE = 0.5  # sampled below 1: the rows are likelier to the model, its loss lower
D_SAE = 64
# How far every pre-activation stays from where its feature's firing flips (`clear_edges`):
# ~1000 times (topk's: ~20 times) the 1e-6 by which jaxgpt's values differ from sae-lens's.
MARGIN, TOPK_MARGIN = 1e-3, 2e-5


def tiny_gpt2() -> GPT2LMHeadModel:
    """The seeded tiny GPT-2: matrices and biases N(0, 0.15), LayerNorm scales 1 + N(0, 0.1)
    and shifts N(0, 0.1)."""
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=EMB, n_head=HEADS,
                        n_layer=LAYERS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            norm = ".ln_" in name or name.startswith("transformer.ln_f")
            p.copy_(1.0 + 0.1 * noise if norm and name.endswith("weight")
                    else (0.1 if norm else 0.15) * noise)
    return model.eval()


def hooked(hf_model: GPT2LMHeadModel) -> HookedSAETransformer:
    """TransformerLens's model of `hf_model`, computing what it computes (no processing)."""
    cfg = HookedTransformerConfig(
        n_layers=LAYERS, d_model=EMB, d_head=EMB // HEADS, n_heads=HEADS, d_mlp=4 * EMB,
        n_ctx=CONTEXT, d_vocab=VOCAB, act_fn="gelu_new", normalization_type="LN", eps=1e-5,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False, seed=SEED)
    model = HookedSAETransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return model.eval()


def token_batches(hf_model: GPT2LMHeadModel) -> torch.Tensor:
    """`[N, B, T]` rows the model samples itself (so its loss is low, and an ablation raises
    it by a lot), each starting at BOS, with a few BOS inside too."""
    gen = torch.Generator().manual_seed(SEED + 1)
    tokens = torch.full((N_BATCHES * BATCH, CONTEXT), BOS)
    for t in range(1, CONTEXT):
        logits = hf_model(tokens[:, :t]).logits[:, -1]
        probs = torch.softmax(logits / TEMPERATURE, -1)
        tokens[:, t] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    tokens = tokens.reshape(N_BATCHES, BATCH, CONTEXT)
    tokens[0, 1, 7] = BOS
    tokens[1, 2, 3] = BOS
    tokens[2, 0, 15] = BOS
    return tokens


class FixedBatches:
    """The part of sae-lens's ActivationsStore that `run_evals` uses, over fixed batches."""

    def __init__(self, batches: torch.Tensor):
        self.batches, self.next = batches, 0
        self.context_size = batches.shape[-1]
        self.store_batch_size_prompts = batches.shape[1]

    def get_batch_tokens(self, batch_size: int) -> torch.Tensor:
        assert batch_size == self.batches.shape[1]
        out = self.batches[self.next % len(self.batches)]
        self.next += 1
        return out

    def reset_input_dataset(self) -> None:
        self.next = 0


def activations(model: HookedSAETransformer, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """The activations at `hook`, one row per token (heads flattened)."""
    _, cache = model.run_with_cache(tokens.reshape(-1, CONTEXT), names_filter=[hook])
    act = cache[hook]
    return act.flatten(-2, -1).reshape(-1, EMB) if act.ndim == 4 else act.reshape(-1, EMB)


def frame_sae(kind: str, hook: str, acts: torch.Tensor, gen: torch.Generator) -> Any:
    """An SAE of `kind` that roughly reconstructs `acts`: b_dec their mean, decoder rows in
    +-pairs of random directions (so ReLU's halves add up), scaled by least squares."""
    d_in = acts.shape[-1]
    dirs = torch.randn(D_SAE // 2, d_in, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    W_dec = torch.cat([dirs, -dirs]) + 0.05 * torch.randn(D_SAE, d_in, generator=gen)
    mean = acts.mean(0)
    centred = acts - mean
    pre = centred @ W_dec.T
    recons = torch.relu(pre) @ W_dec
    scale = (recons * centred).sum() / (recons * recons).sum()
    meta = {"hook_name": hook, "model_name": "tiny-gpt2", "hook_head_index": None,
            "prepend_bos": True}
    common = {"d_in": d_in, "d_sae": D_SAE, "reshape_activations":
              "hook_z" if hook.endswith("hook_z") else "none"}
    if kind == "standard":
        sae: Any = StandardSAE(StandardSAEConfig(**common))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(k=12, **common))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    with torch.no_grad():
        sae.W_dec.copy_(W_dec * scale)
        sae.W_enc.copy_(W_dec.T)
        sae.b_dec.copy_(mean)
        sae.b_enc.copy_(-0.1 * pre.std() * torch.rand(D_SAE, generator=gen))
        if kind == "jumprelu":
            sae.threshold.copy_(0.3 * pre.std() * torch.rand(D_SAE, generator=gen))
    clear_edges(sae, kind, acts)
    return sae.eval()


def clear_edges(sae: Any, kind: str, acts: torch.Tensor) -> None:
    """Keep every pre-activation on `acts` away from where its feature's firing flips (by
    `MARGIN`; topk: between each row's k-th and (k+1)-th, by `TOPK_MARGIN`), so that jaxgpt's
    float32 rounding, not sae-lens's, cannot change an L0 or a density: standard and jumprelu
    features near the edge get their b_enc moved up a little, until none is."""
    for _ in range(50):
        h = (acts - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
        if kind == "topk":
            top = h.topk(sae.cfg.k + 1, dim=-1).values
            gap = min((top[:, -2] - top[:, -1]).min().item(), top[:, -2].abs().min().item())
            assert gap > TOPK_MARGIN, f"topk: a row's k-th and (k+1)-th are {gap:.2g} apart"
            return
        edge = sae.threshold if kind == "jumprelu" else torch.zeros(D_SAE)
        near = ((h - edge).abs() < MARGIN).any(0)
        if not near.any():
            return
        sae.b_enc[near] += 2.5 * MARGIN
    raise AssertionError(f"{kind}: pre-activations stay within {MARGIN} of an edge")


SAES = {"standard": ("standard", "blocks.0.hook_resid_post"),
        "topk": ("topk", "blocks.1.hook_resid_pre"),
        "jumprelu": ("jumprelu", "blocks.1.hook_mlp_out"),
        "hook_z": ("standard", "blocks.0.attn.hook_z")}
SPLICED = ("topk", "hook_z")  # whose spliced runs are kept
CACHED = ("hook_sae_acts_post", "hook_sae_recons")


def evals(sae: Any, model: HookedSAETransformer, batches: torch.Tensor,
          exclude: list[int]) -> dict[str, Any]:
    """sae-lens's `run_evals` over `batches`, every metric on, excluding tokens `exclude`."""
    config = get_eval_everything_config(batch_size_prompts=BATCH,
                                        n_eval_reconstruction_batches=N_BATCHES,
                                        n_eval_sparsity_variance_batches=N_BATCHES)
    metrics, features = run_evals(sae, FixedBatches(batches), model, ActivationScaler(),
                                  config, exclude_special_tokens=exclude or False)
    keep = ("feature_density", "consistent_activation_heuristic")
    return {"metrics": metrics, "feature_metrics": {
        k: [None if v != v else v for v in features[k]] for k in keep}}  # NaN: null


def spliced(sae: Any, model: HookedSAETransformer, tokens: torch.Tensor,
            name: str) -> dict[str, torch.Tensor]:
    """HookedSAETransformer's logits and SAE cache, without and with the error term."""
    hook = sae.cfg.metadata.hook_name
    out: dict[str, torch.Tensor] = {}
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    out[f"{name}/logits"] = logits
    for sub in CACHED:
        out[f"{name}/{sub}"] = cache[f"{hook}.{sub}"]
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    out[f"{name}/error_term_logits"] = logits
    for sub in ("hook_sae_error", "hook_sae_output"):
        out[f"{name}/{sub}"] = cache[f"{hook}.{sub}"]
    return {k: v.detach().contiguous().float() for k, v in out.items()}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/sae_evals")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    hf_model = tiny_gpt2()
    model = hooked(hf_model)
    batches = token_batches(hf_model)
    flat = batches.reshape(-1, CONTEXT)
    gap = (model(flat) - hf_model(flat).logits).abs().max().item()
    assert gap < 1e-4, f"TransformerLens's model is not the Hugging Face one: {gap}"
    hf_model.save_pretrained(out / "gpt2", safe_serialization=True)

    gen = torch.Generator().manual_seed(SEED + 2)
    expected: dict[str, Any] = {"tokens": batches.tolist(), "bos": BOS, "saes": {}}
    arrays: dict[str, torch.Tensor] = {}
    for name, (kind, hook) in SAES.items():
        sae = frame_sae(kind, hook, activations(model, batches, hook), gen)
        sae.save_model(out / name)
        entry = {"hook_name": hook, "architecture": kind,
                 "exclude_bos": evals(sae, model, batches, [BOS])}
        if name == "standard":
            entry["exclude_nothing"] = evals(sae, model, batches, [])
        expected["saes"][name] = entry
        if name in SPLICED:
            arrays.update(spliced(sae, model, batches[0, :2], name))
        m = entry["exclude_bos"]["metrics"]
        print(f"{name:9s} {hook:26s} l0 {m['sparsity']['l0']:6.2f}  explained_variance "
              f"{m['reconstruction_quality']['explained_variance']:+.3f}  ce_loss_score "
              f"{m['model_performance_preservation']['ce_loss_score']:+.3f}  (ablation "
              f"{m['model_performance_preservation']['ce_loss_with_ablation']:.3f}, clean "
              f"{m['model_performance_preservation']['ce_loss_without_sae']:.3f})")
    expected["tokens_dtype"] = "int32"
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    save_file(arrays, str(out / "spliced.safetensors"))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
