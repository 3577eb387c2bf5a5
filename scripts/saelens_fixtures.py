"""Make the sae-lens fixtures the SAE tests compare against: tests/data/saelens/.

sae-lens cannot be installed beside jaxgpt's test extra (it pins transformer-lens < 4), so its
folders and outputs are made here, in an environment that has it, and committed:

    python scripts/saelens_fixtures.py --jaxgpt-python /path/to/jaxgpt/venv/bin/python

run with the Python of that environment (sae-lens 6.54.12, torch, CPU). For each case of
`CASES` it builds sae-lens's training SAE with tiny dimensions, sets its weights from a fixed
seed (non-zero biases; thresholds around the pre-activations), and writes into
tests/data/saelens/CASE/:

- `train/`: its training save (`save_model`), `inference/`: its inference save
  (`save_inference_model`);
- `expected.npz`: on fixed inputs `x`, the training forward pass (`training_forward_pass`
  with a dead-feature mask and a sparsity coefficient: hidden_pre, feature_acts, sae_out,
  each loss by name, the total, the gradient of the total for each parameter, BatchTopK's
  threshold after the pass); encode, forward and hidden_pre of each folder as sae-lens loads
  it (`SAE.load_from_disk`; a batchtopk training save with `TrainingSAE.load_from_disk`); the
  weights after `fold_W_dec_norm` where sae-lens allows it, and after
  `fold_activation_norm_scaling_factor`.

Then it has jaxgpt write folders (`write_jaxgpt_folders`, run with `--jaxgpt-python`, the
function the tests call too) into tests/data/saelens/from_jaxgpt/, loads each with sae-lens and
records its forward on fixed inputs in from_jaxgpt/expected.npz.

`--write-jaxgpt DEST` (with jaxgpt's Python) only writes jaxgpt's folders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "saelens"
SAELENS_VERSION = "6.54.12"
D_IN, D_SAE, N_ROWS = 8, 32, 6
METADATA = {"model_name": "tiny-gpt", "hook_name": "blocks.0.hook_resid_post",
            "hook_head_index": None, "context_size": 16, "prepend_bos": True}

# name: (training architecture, config fields beyond d_in/d_sae). Between them: every
# architecture, rescale_acts_by_decoder_norm both ways, apply_b_dec_to_input False, each
# run-time normalisation, each JumpReLU sparsity loss, the STE to the input, the pre-act loss.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {"l1_coefficient": 2.0}),
    "standard_lp2_layer_norm": ("standard", {"lp_norm": 2.0, "apply_b_dec_to_input": False,
                                             "normalize_activations": "layer_norm"}),
    "topk": ("topk", {"k": 4, "rescale_acts_by_decoder_norm": False,
                      "aux_loss_coefficient": 0.5}),
    "topk_rescale": ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "batchtopk": ("batchtopk", {"k": 2.5, "rescale_acts_by_decoder_norm": True,
                                "topk_threshold_lr": 0.2}),
    "batchtopk_no_rescale": ("batchtopk", {"k": 3.0, "rescale_acts_by_decoder_norm": False,
                                           "apply_b_dec_to_input": False,
                                           "topk_threshold_lr": 0.2}),
    "jumprelu": ("jumprelu", {"jumprelu_bandwidth": 0.5, "pre_act_loss_coefficient": 0.3}),
    "jumprelu_tanh_ste": ("jumprelu", {"jumprelu_sparsity_loss_mode": "tanh",
                                       "jumprelu_ste_to_input": True, "jumprelu_bandwidth": 0.4,
                                       "jumprelu_tanh_scale": 2.0,
                                       "normalize_activations": "constant_norm_rescale"}),
    "jumprelu_quadratic_ste": ("jumprelu", {"jumprelu_sparsity_loss_mode": "quadratic",
                                            "target_l0": 6.0, "jumprelu_bandwidth": 0.5,
                                            "jumprelu_ste_to_input": True,
                                            "apply_b_dec_to_input": False}),
}
COEFFICIENT = 0.7  # the sparsity coefficient of the recorded pass (standard's l1, jumprelu's l0)
SCALING_FACTOR = 2.5  # fold_activation_norm_scaling_factor's


def case_inputs(seed: int) -> dict[str, np.ndarray]:
    """The fixed inputs and weights of a case: numpy's PCG64 gives the same numbers on every
    machine."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    w = {
        "W_enc": (rng.standard_normal((D_IN, D_SAE)) * 0.4).astype(f32),
        "b_enc": (rng.standard_normal(D_SAE) * 0.2).astype(f32),
        "W_dec": (rng.standard_normal((D_SAE, D_IN)) * 0.3).astype(f32),
        "b_dec": (rng.standard_normal(D_IN) * 0.2).astype(f32),
        # Around the pre-activations' scale, so that the straight-through windows hold some;
        # two negative, which sae-lens's training pass projects to 0.
        "threshold": np.concatenate([[-0.05, -0.2], rng.uniform(0.05, 0.6, D_SAE - 2)]
                                    ).astype(f32),
        "x": (rng.standard_normal((N_ROWS, D_IN)) + 0.3).astype(f32),
        # About a third dead.
        "dead_mask": rng.uniform(size=D_SAE) < 0.35,
        "warm_x": [(rng.standard_normal((N_ROWS, D_IN))).astype(f32) for _ in range(2)],
    }
    return w


# --- sae-lens's side (its own environment) -------------------------------------------------

def make_saelens_case(name: str, seed: int) -> None:
    import torch
    from sae_lens import SAE, TrainingSAE
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    arch, fields = CASES[name]
    sae_cls, cfg_cls = get_sae_training_class(arch)
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(**METADATA), **fields)
    sae = sae_cls(cfg)
    inp = case_inputs(seed)
    with torch.no_grad():
        for p in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch == "jumprelu"
                                                          else ()):
            getattr(sae, p).data = torch.from_numpy(inp[p]).clone()
    t = torch.from_numpy
    x, dead = t(inp["x"]), t(inp["dead_mask"])
    coefficients = {"standard": {"l1": COEFFICIENT}, "jumprelu": {"l0": COEFFICIENT}}.get(
        arch, {})

    def step_input(xs: torch.Tensor) -> TrainStepInput:
        return TrainStepInput(sae_in=xs, coefficients=coefficients, dead_neuron_mask=dead,
                              n_training_steps=0, is_logging_step=False)

    if arch == "batchtopk":  # a learned threshold to save
        with torch.no_grad():
            for warm in inp["warm_x"]:
                sae.training_forward_pass(step_input(t(warm)))
    case_dir = OUT / name
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    sae.save_model(case_dir / "train")
    sae.save_inference_model(case_dir / "inference")
    exp: dict[str, np.ndarray] = {"x": inp["x"], "dead_mask": inp["dead_mask"],
                                  "coefficient": np.float32(COEFFICIENT)}
    if arch == "batchtopk":
        exp["topk_threshold_before"] = np.float64(sae.topk_threshold.item())

    # Each folder as sae-lens loads it.
    folders = {"train": case_dir / "train", "inference": case_dir / "inference"}
    for kind, folder in folders.items():
        loader = TrainingSAE if json.loads((folder / "cfg.json").read_text())[
            "architecture"] == "batchtopk" else SAE
        loaded = loader.load_from_disk(folder)
        with torch.no_grad():
            _, cache = loaded.run_with_cache(x)
            exp[f"{kind}_hidden_pre"] = _np(cache["hook_sae_acts_pre"])
            exp[f"{kind}_encode"] = _np(loaded.encode(x))
            exp[f"{kind}_forward"] = _np(loaded(x))

    # The training pass (it projects JumpReLU's threshold, updates BatchTopK's after).
    out = sae.training_forward_pass(step_input(x))
    out.loss.backward()
    exp["train_pass_hidden_pre"] = _np(out.hidden_pre)
    exp["train_pass_feature_acts"] = _np(out.feature_acts)
    exp["train_pass_sae_out"] = _np(out.sae_out)
    exp["loss"] = _np(out.loss)
    for k, v in out.losses.items():
        exp[f"losses/{k}"] = _np(v)
    for k, p in sae.named_parameters():
        exp[f"grad/{k}"] = _np(p.grad)
    if arch == "batchtopk":
        exp["topk_threshold_after"] = np.float64(sae.topk_threshold.item())
    if arch == "jumprelu":
        exp["threshold_projected"] = _np(sae.threshold)

    # The folds, on a fresh copy of the saved SAE.
    def fresh() -> Any:
        return TrainingSAE.load_from_disk(case_dir / "train")

    if arch not in ("topk", "batchtopk") or fields.get("rescale_acts_by_decoder_norm"):
        folded = fresh()
        folded.fold_W_dec_norm()
        exp.update({f"fold_W_dec_norm/{k}": _np(v) for k, v in folded.state_dict().items()})
    scaled = fresh()
    scaled.fold_activation_norm_scaling_factor(SCALING_FACTOR)
    exp.update({f"fold_scaling/{k}": _np(v) for k, v in scaled.state_dict().items()})
    np.savez(case_dir / "expected.npz", **exp)


def _np(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy().copy() if hasattr(v, "detach") else np.asarray(v)


def record_jaxgpt_folders(dest: Path) -> None:
    """sae-lens's forward of each folder jaxgpt wrote under `dest`, into dest/expected.npz."""
    import torch
    from sae_lens import SAE, TrainingSAE

    x = jaxgpt_folder_input()
    exp = {"x": x}
    for folder in sorted(p for p in dest.iterdir() if p.is_dir()):
        loader = TrainingSAE if json.loads((folder / "cfg.json").read_text())[
            "architecture"] == "batchtopk" else SAE
        sae = loader.load_from_disk(folder)
        with torch.no_grad():
            exp[f"{folder.name}/encode"] = _np(sae.encode(torch.from_numpy(x)))
            exp[f"{folder.name}/forward"] = _np(sae(torch.from_numpy(x)))
        exp[f"{folder.name}/class"] = np.array(type(sae).__name__)
    np.savez(dest / "expected.npz", **exp)


# --- jaxgpt's side (jaxgpt's environment; the tests call it too) ---------------------------

# name: (architecture, config fields, inference save?)
JAXGPT_FOLDERS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "standard_inference": ("standard", {"normalize_activations": "layer_norm"}, True),
    "topk_rescale_inference": ("topk", {"k": 3, "rescale_acts_by_decoder_norm": True}, True),
    "topk_train": ("topk", {"k": 3, "apply_b_dec_to_input": False}, False),
    "batchtopk_inference": ("batchtopk", {"k": 2.0, "rescale_acts_by_decoder_norm": True},
                            True),
    "batchtopk_train": ("batchtopk", {"k": 2.0, "rescale_acts_by_decoder_norm": True}, False),
    "jumprelu_inference": ("jumprelu", {"jumprelu_sparsity_loss_mode": "tanh"}, True),
    "jumprelu_train": ("jumprelu", {"normalize_activations": "constant_norm_rescale"}, False),
}


def jaxgpt_folder_input() -> np.ndarray:
    """The rows sae-lens's forward of jaxgpt's folders is recorded on, `[5, 8]`."""
    return (np.random.default_rng(99).standard_normal((5, 8)) + 0.2).astype(np.float32)


def write_jaxgpt_folders(dest: str | os.PathLike) -> list[Path]:
    """jaxgpt's SAE folders of `JAXGPT_FOLDERS` under `dest` (d_in 8, d_sae 16; weights from
    numpy's PCG64, the same on every machine); their paths."""
    from jaxgpt.sae.formats import save_sae
    from jaxgpt.sae.model import SAEConfig, from_params

    paths = []
    for i, (name, (arch, fields, inference)) in enumerate(JAXGPT_FOLDERS.items()):
        rng = np.random.default_rng(1000 + i)
        d_in, d_sae = 8, 16
        params = {"W_enc": rng.standard_normal((d_in, d_sae)) * 0.5,
                  "b_enc": rng.standard_normal(d_sae) * 0.2,
                  "W_dec": rng.standard_normal((d_sae, d_in)) * 0.3,
                  "b_dec": rng.standard_normal(d_in) * 0.2}
        if arch == "jumprelu":
            params["threshold"] = rng.uniform(0.0, 0.5, d_sae)
        params = {k: v.astype(np.float32) for k, v in params.items()}
        cfg = SAEConfig(arch, d_in, d_sae, hook_name="blocks.1.hook_resid_pre", **fields)
        state = {"topk_threshold": np.float32(0.125)} if arch == "batchtopk" else None
        sae = from_params(cfg, params, state)
        paths.append(save_sae(sae, Path(dest) / name, inference=inference,
                              metadata={"model_name": "tiny-gpt", "context_size": 16},
                              overwrite=True))
    return paths


# --- the run -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jaxgpt-python", help="a Python with jaxgpt's dependencies, to write "
                        "its folders (tests/data/saelens/from_jaxgpt)")
    parser.add_argument("--write-jaxgpt", metavar="DEST", help="only write jaxgpt's folders "
                        "into DEST (run with jaxgpt's Python)")
    args = parser.parse_args()
    if args.write_jaxgpt:
        write_jaxgpt_folders(args.write_jaxgpt)
        return
    if os.environ.get("PYTHONHASHSEED") != "0":
        # sae-lens's inference cfg.json lists its fields in a set's order: fix the hash seed
        # so that a rerun writes the same bytes.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    import sae_lens
    import torch

    if sae_lens.__version__ != SAELENS_VERSION:
        sys.exit(f"these fixtures are sae-lens {SAELENS_VERSION}'s; this is "
                 f"{sae_lens.__version__}")
    torch.manual_seed(0)  # the SAEs' own init is overwritten; this keeps the run repeatable
    for seed, name in enumerate(CASES):
        make_saelens_case(name, seed)
        print(f"{name}: {OUT / name}")
    if args.jaxgpt_python:
        dest = OUT / "from_jaxgpt"
        shutil.rmtree(dest, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
        subprocess.run([args.jaxgpt_python, __file__, "--write-jaxgpt", str(dest)], env=env,
                       check=True)
        record_jaxgpt_folders(dest)
        print(f"from_jaxgpt: {dest}")


if __name__ == "__main__":
    main()
