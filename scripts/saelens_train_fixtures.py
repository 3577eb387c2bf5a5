"""Expected values for tests/test_sae_train.py from sae-lens 6.54.12's trainer (run it in the
venv that has sae-lens; it cannot share jaxgpt's test venv, which pins transformer-lens 4):

    /work/saelens-venv/bin/python scripts/saelens_train_fixtures.py tests/data/sae_train

Writes `steps.npz` and `steps.json`: for a tiny SAE of each architecture, its weights as
sae-lens initialised them, the batches, and after each of a few `SAETrainer.step` calls the
loss terms, L0, explained variance and dead count sae-lens logs, the weights, BatchTopK's
threshold and the steps since each feature fired; and `schedules.json`: the learning rate of
every step of `get_lr_scheduler` and the values of `CoefficientScheduler` for a few settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer

D_IN, D_SAE, ROWS, STEPS = 8, 16, 32, 6
# name: (SAE class, config fields, trainer fields). Windows of 2 steps make features dead
# within the run, so the auxiliary and pre-activation losses are exercised.
CASES = {
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": 3}, {}),
    "topk_plain": (TopKTrainingSAE, TopKTrainingSAEConfig,
                   {"k": 3, "rescale_acts_by_decoder_norm": False, "aux_loss_coefficient": 0.5},
                   {"lr_warm_up_steps": 2}),
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig,
                 {"l1_coefficient": 0.5, "l1_warm_up_steps": 3},
                 {"lr_warm_up_steps": 2, "lr_decay_steps": 2, "lr_scheduler_name":
                  "cosineannealing", "lr_end": 1e-4}),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": 2.5}, {}),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig,
                 {"l0_coefficient": 0.3, "l0_warm_up_steps": 2, "jumprelu_init_threshold": 0.05,
                  "pre_act_loss_coefficient": 0.1}, {}),
}


def run_case(name: str, sae_cls: type, cfg_cls: type, fields: dict, trainer_fields: dict,
             arrays: dict, record: dict) -> None:
    torch.manual_seed(0)
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **fields))
    # The runner's config sets lr_end (lr / 10 by default) before it makes the trainer's.
    trainer_fields = {"lr_end": 1e-3, **trainer_fields}
    tc = SAETrainerConfig(total_training_samples=STEPS * ROWS, train_batch_size_samples=ROWS,
                          lr=1e-2, dead_feature_window=2, **trainer_fields)
    trainer = SAETrainer(tc, sae, data_provider=iter(()))
    for k, v in sae.state_dict().items():
        arrays[f"{name}/init/{k}"] = v.detach().numpy().astype(np.float32)
    gen = torch.Generator().manual_seed(1)
    logs = []
    for step in range(STEPS):
        # Features of different scales: some fire rarely, some never, once trained a little.
        x = torch.randn(ROWS, D_IN, generator=gen) * torch.linspace(0.2, 2.0, D_IN) + 0.3
        arrays[f"{name}/batch/{step}"] = x.numpy()
        out = trainer.step(x)
        log = trainer.build_train_step_log_dict(out, trainer.n_training_samples)
        losses = {k: float(v.detach()) for k, v in out.losses.items()}
        logs.append({"loss": float(out.loss), **losses,
                     "l0": log["metrics/l0"], "explained_variance":
                     log["metrics/explained_variance"], "dead_features":
                     int(log["sparsity/dead_features"]), "lr": log[
                         "details/current_learning_rate"]})
        trainer.n_training_steps += 1
        for k, v in sae.state_dict().items():
            arrays[f"{name}/after/{step}/{k}"] = v.detach().numpy().astype(np.float32)
        arrays[f"{name}/since_fired/{step}"] = trainer.n_forward_passes_since_fired.numpy().copy()
    record[name] = {"fields": fields, "trainer": trainer_fields, "lr": 1e-2,
                    "dead_feature_window": 2, "steps": logs}


def schedules() -> dict:
    out: dict = {"lr": [], "coefficient": []}
    settings = [
        {"scheduler_name": "constant", "warm_up_steps": 0, "decay_steps": 0},
        {"scheduler_name": "constant", "warm_up_steps": 3, "decay_steps": 4},
        {"scheduler_name": "constant", "warm_up_steps": 1, "decay_steps": 1},
        {"scheduler_name": "cosineannealing", "warm_up_steps": 2, "decay_steps": 3},
        {"scheduler_name": "cosineannealing", "warm_up_steps": 0, "decay_steps": 0},
        {"scheduler_name": "cosineannealingwarmrestarts", "warm_up_steps": 2,
         "decay_steps": 2, "num_cycles": 3},
    ]
    for s in settings:
        s = {"lr": 3e-3, "lr_end": 3e-4, "training_steps": 20, "num_cycles": 1, **s}
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([param], lr=s["lr"])
        sched = get_lr_scheduler(optimizer=opt, **s)
        lrs = []
        for _ in range(s["training_steps"]):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out["lr"].append({"settings": s, "lrs": lrs})
    for warm in (0, 1, 4):
        c = CoefficientScheduler(warm, 0.7)
        values = []
        for _ in range(8):
            values.append(c.value)
            c.step()
        out["coefficient"].append({"warm_up_steps": warm, "value": 0.7, "values": values})
    return out


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/sae_train")
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict = {}
    record: dict = {"d_in": D_IN, "d_sae": D_SAE, "rows": ROWS, "steps": STEPS, "cases": {}}
    for name, (sae_cls, cfg_cls, fields, trainer_fields) in CASES.items():
        run_case(name, sae_cls, cfg_cls, fields, trainer_fields, arrays, record["cases"])
    np.savez_compressed(out / "steps.npz", **arrays)
    (out / "steps.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "schedules.json").write_text(json.dumps(schedules(), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
