"""Looking inside the model, and changing it: research on the one `GPTModel`.

- `cache`: `run_with_cache`, `run_with_hooks`, the `ActivationCache` (TransformerLens's names).
- `residual`: the logit lens, the residual stream's components, direct logit attribution.
- `plots`: attention heatmaps.
"""
