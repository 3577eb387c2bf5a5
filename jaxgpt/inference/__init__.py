"""Generation: the book's greedy loop, and the fast path with a KV cache, sampling and EOS.

- `simple`: `generate_text_simple`, the book's loop as one jit-compiled `fori_loop`.
- `generator`: `generate`, `generate_stream` and `Generator` (decode-ready weights kept).
- `decode`: the compiled decoding programs (prefill, cached steps in chunks, bucketed shapes).
- `sampling`: `GenerationConfig` (temperature, top-k, top-p, EOS), and choosing a token.
- `checks`: argument checks shared by every entry point.
"""

from jaxgpt.inference.generator import Generator, cut_after_eos, generate, generate_stream
from jaxgpt.inference.sampling import GenerationConfig
from jaxgpt.inference.simple import generate_text_simple

__all__ = [
    "GenerationConfig",
    "Generator",
    "cut_after_eos",
    "generate",
    "generate_stream",
    "generate_text_simple",
]
