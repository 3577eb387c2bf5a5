"""Looking inside the model, and changing it: research on the one `GPTModel`.

- `cache`: `run_with_cache`, `run_with_hooks`, the `ActivationCache` (TransformerLens's names).
- `interventions`: hooks that add, scale, replace or ablate an activation.
- `patching`: activation-patching sweeps (`get_act_patch_*`), batched and compiled, and
  `reference_sweep`, the plain one-patch-at-a-time loop they are held to.
- `reads`: which logits a metric reads (so a sweep computes only those).
- `attribution`: attribution patching, every patch estimated from one backward pass.
- `residual`: the logit lens, the residual stream's components, direct logit attribution.
- `induction`: repeated random tokens and each head's induction score.
- `plots`: attention heatmaps, patching heatmaps, the logit lens.
"""
