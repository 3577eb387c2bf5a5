"""Sparse autoencoders on the one model, as sae-lens defines them: the architectures
(`jaxgpt.sae.model`), sae-lens's folder format, activations streamed from any hook point,
training, splicing into every path, sae-lens's evaluations, and pages of features."""
