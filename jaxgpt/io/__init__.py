"""Weights in and out: the book's PyTorch state dicts, Hugging Face directories, orbax.

- `torch_state`: the book's PyTorch `GPTModel` state_dict to and from jaxgpt params.
- `hf`, `hf_config`: Hugging Face GPT-2 weights, directories and `config.json`.
- `checkpoint`: jaxgpt's orbax checkpoints (params + config; sharded, multi-process).
- `formats`: what each format's directory holds; `files`: atomic writes and what jaxgpt may
  replace; `params`: parameter trees as flat path tables.
"""
