"""The sae-lens side of `scripts/bench_sae.py`: a worker that sae-lens's own Python runs.

Not run by hand: `bench_sae.py --saelens-python PY` starts `PY scripts/bench_sae_saelens.py
WORK` and sends it one JSON command a line on stdin; each answer is one JSON line on the
worker's stdout (everything the libraries print goes to stderr). `WORK` holds what
bench_sae.py wrote (so both sides train the same SAE on the same model and tokens):

- `spec.json`: the run's settings (hook, d_sae, k, lr, context, batch, ...);
- `hf/`: the language model as a Hugging Face GPT-2 directory (jaxgpt's exporter);
- `train_tokens.npy` `[rows, context]`, `heldout_tokens.npy` `[rows, context]`;
- `heldout_acts.npy` `[rows * context, d_in]`: jaxgpt's activations of the held-out tokens
  (only to report how far this side's own are from them);
- `sae_init.npz`: the initial SAE (W_enc, b_enc, W_dec, b_dec), jaxgpt's `init_sae`;
- `step_acts.npy` `[batch, d_in]`: the activations the SAE step alone trains on.

Commands: `{"op": "train", "n": N}` trains with sae-lens's runner
(`LanguageModelSAETrainingRunner`) from the initial SAE on the first `N / context` rows and
answers the seconds (and CPU seconds) its construction and `run()` took, and the trained SAE's
L0 and explained variance on the held-out tokens (its weights go to `saelens_trained.npz`);
`{"op": "step", "n": S}` times `SAETrainer.step` (forward, firing statistics, backward,
gradient clipping, Adam, schedulers) on `step_acts`, after one untimed step; `{"op": "forward",
"n": B}` times `next(ActivationsStore)` (the LM's forward pass over one batch's windows, the
mixing buffer), after an untimed one; `{"op": "quit"}`.
Needs torch and sae-lens 6.54.12 (not jaxgpt, not jax).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_sae import timed  # this script's folder is on sys.path


def hooked_transformer(hf_dir: Path) -> Any:
    """The GPT-2 of `hf_dir` as a HookedTransformer, offline, its weights as they are (no
    LayerNorm folding or centring: those change the residual stream the SAE reads)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir)
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, dtype=torch.float32,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False)
    model = HookedTransformer(cfg, tokenizer=None)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False)
    return model.eval()


class Worker:
    """The model, tokens and initial SAE, loaded once; one method a command."""

    def __init__(self, work: Path):
        from sae_lens import TopKTrainingSAEConfig

        self.work = work
        self.spec = json.loads((work / "spec.json").read_text())
        self.model = hooked_transformer(work / "hf")
        self.train_tokens = np.load(work / "train_tokens.npy")
        self.init = dict(np.load(work / "sae_init.npz"))
        self.step_acts = torch.from_numpy(np.load(work / "step_acts.npy"))
        s = self.spec
        self.sae_cfg = TopKTrainingSAEConfig(d_in=s["d_in"], d_sae=s["d_sae"], k=s["k"],
                                             dtype="float32", device="cpu")
        self.heldout = self._activations(np.load(work / "heldout_tokens.npy"))
        jax_acts = work / "heldout_acts.npy"
        self.heldout_gap = float((self.heldout - torch.from_numpy(np.load(jax_acts)))
                                 .abs().max()) if jax_acts.exists() else None

    @torch.no_grad()
    def _activations(self, tokens: np.ndarray) -> torch.Tensor:
        """The hook's activations of `tokens`, as sae-lens's activation store takes them
        (`run_with_cache` up to the hook's layer + 1), `[rows * context, d_in]`."""
        from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

        hook = self.spec["hook_name"]
        out = []
        for rows in np.array_split(tokens, max(1, len(tokens) // 32)):
            _, cache = self.model.run_with_cache(
                torch.from_numpy(rows).long(), names_filter=[hook], prepend_bos=False,
                stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook))
            out.append(cache[hook].reshape(-1, self.spec["d_in"]))
        return torch.cat(out)

    def _sae(self) -> Any:
        """A new TopK training SAE holding the initial weights bench_sae.py gave."""
        from sae_lens import TopKTrainingSAE

        sae = TopKTrainingSAE(self.sae_cfg)
        with torch.no_grad():
            for name, value in self.init.items():
                getattr(sae, name).copy_(torch.from_numpy(value))
        return sae

    def _runner_cfg(self, tokens: int) -> Any:
        from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

        s = self.spec
        return LanguageModelSAERunnerConfig(
            sae=self.sae_cfg, model_name="random-gpt2", hook_name=s["hook_name"],
            dataset_path="", is_dataset_tokenized=True, streaming=False,
            context_size=s["context"], training_tokens=tokens,
            train_batch_size_tokens=s["batch_tokens"],
            # One LM batch is one training batch, and the mixing buffer holds just that: each
            # step trains on the next batch_tokens tokens, shuffled among themselves.
            store_batch_size_prompts=s["batch_tokens"] // s["context"],
            n_batches_in_buffer=s["batch_tokens"] // s["context"],
            lr=s["lr"], dtype="float32", device="cpu", prepend_bos=False,
            logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
            output_path=None, verbose=False, seed=s["seed"])

    def _dataset(self, tokens: int) -> Any:
        """The first `tokens` tokens' windows as a pre-tokenized in-memory dataset."""
        from datasets import Dataset

        rows = -(-tokens // self.spec["context"])
        return Dataset.from_dict({"tokens": self.train_tokens[:rows].tolist()})

    def train(self, tokens: int) -> dict[str, Any]:
        from sae_lens import LanguageModelSAETrainingRunner

        data = self._dataset(tokens)
        cfg = self._runner_cfg(tokens)
        sae = self._sae()
        t0, c0 = time.perf_counter(), time.process_time()
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=data,
                                                override_model=self.model, override_sae=sae)
        trained = runner.run()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        np.savez(self.work / "saelens_trained.npz",
                 **{k: v.detach().numpy() for k, v in trained.state_dict().items()})
        return {"seconds": seconds, "cpu_seconds": cpu, "steps": cfg.total_training_steps,
                **self.evaluate(trained)}

    @torch.no_grad()
    def evaluate(self, sae: Any) -> dict[str, float]:
        """L0 and explained variance on the held-out activations, by sae-lens's evals
        definitions (`(acts != 0).sum(-1)` averaged; `ExplainedVarianceCalculator`)."""
        from sae_lens.evals import ExplainedVarianceCalculator

        sae.eval()
        ev = ExplainedVarianceCalculator()
        l0 = []
        for x in self.heldout.split(4096):
            acts = sae.encode(x)
            ev.add_batch(sae_output=sae.decode(acts), hidden_acts=x)
            l0.append((acts != 0).sum(-1).float())
        return {"l0": torch.cat(l0).mean().item(), "explained_variance": ev.compute()}

    def step(self, steps: int) -> dict[str, float]:
        from sae_lens.training.sae_trainer import SAETrainer

        cfg = self._runner_cfg(self.spec["batch_tokens"] * (steps + 1))
        trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=self._sae(),
                             data_provider=iter(()))
        return timed(lambda: trainer.step(self.step_acts), steps)

    def forward(self, batches: int) -> dict[str, float]:
        from sae_lens.training.activations_store import ActivationsStore

        tokens = self.spec["batch_tokens"] * (batches + 1)
        store = ActivationsStore.from_config(self.model, self._runner_cfg(tokens),
                                             override_dataset=self._dataset(tokens))
        return timed(lambda: next(store), batches)


def main() -> None:
    work = Path(sys.argv[1])
    # Answers go to the real stdout; whatever the libraries print goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    torch.manual_seed(0)
    worker = Worker(work)
    import sae_lens

    ready = {"ready": True, "sae_lens": sae_lens.__version__, "torch": torch.__version__,
             "threads": torch.get_num_threads(), "sae_cfg": worker.sae_cfg.to_dict(),
             "heldout_gap": worker.heldout_gap}
    print(json.dumps(ready), file=answers, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        answer = {"train": worker.train, "step": worker.step,
                  "forward": worker.forward}[cmd["op"]](cmd["n"])
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
