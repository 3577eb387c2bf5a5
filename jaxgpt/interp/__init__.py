"""Looking inside the model.

- `activations`: the sown attention weights and block outputs.
- `plots`: attention heatmaps.
"""
