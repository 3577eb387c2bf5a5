"""The book's teaching code that the production path does not use, by chapter.

- `ch02`: the word tokenizers `SimpleTokenizerV1`, `SimpleTokenizerV2`.
- `ch03`: the attention classes `SelfAttention_v1`, `SelfAttention_v2`, `CausalAttention`,
  `MultiHeadAttentionWrapper`.
- `ch04`: the placeholder `DummyGPTModel` and the shortcut experiment
  (`ExampleDeepNeuralNetwork`, `print_gradients`).

The finished classes (`MultiHeadAttention`, `LayerNorm`, `GPTModel`, ...) are in `jaxgpt.nn`.
"""
