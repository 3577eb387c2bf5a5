"""Sparse autoencoders on the one model, as sae-lens 6.54.12 defines them (docs/sae.md).

- `model`: `SAEConfig`, the `SAE` pytree, `encode`, `decode`, `forward`, the training losses
  of the four architectures (standard, topk, batchtopk, jumprelu), folding.
- `formats`: sae-lens's folder (`cfg.json` + `sae_weights.safetensors`), `load_sae`, `save_sae`.
- `splice`: an SAE in place of an activation, a hook usable everywhere hooks are, with
  sae-lens's inner hook points; `run_with_saes`, `run_with_cache_with_saes`.
- `evals`: sae-lens's `run_evals` metrics.
- `store`: `ActivationStore`, any hook point's activations streamed and shuffled on the device.
- `train_config`, `step`, `sparse`, `training`: `SAETrainConfig`, the jitted step (TopK's on
  its k kept features), `train_saes` with its run directory and resampling of dead features.
- `features`: per-feature statistics streamed over text, and the features page.
"""
