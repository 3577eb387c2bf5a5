"""The seeds' chapter-2 word tokenizer (`SimpleTokenizerV2`): regex split, a vocabulary built
from a text, `<|unk|>` for unknown words and `<|endoftext|>` between documents.

It teaches what a tokenizer does; the models use the GPT-2 BPE tokenizer (`jaxgpt.tokenizer`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"
# Split on punctuation, double dashes and whitespace, keeping the separators (capture group).
_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Decoding joins words with spaces; this takes the space back out before punctuation.
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.:;?!"()\'])')


def split_words(text: str) -> list[str]:
    """The seeds' pre-processing: regex split, strip, drop empty strings."""
    return [item.strip() for item in _SPLIT.split(text) if item.strip()]


def build_vocab(text: str) -> dict[str, int]:
    """Sorted unique words of `text`, then `<|endoftext|>` and `<|unk|>`, numbered from 0."""
    words = sorted(set(split_words(text)) - {ENDOFTEXT, UNK})
    words.extend([ENDOFTEXT, UNK])
    return {word: i for i, word in enumerate(words)}


class SimpleTokenizerV2:
    """Word-level tokenizer over a fixed vocabulary; unknown words become `<|unk|>`."""

    def __init__(self, vocab: Mapping[str, int]):
        if UNK not in vocab:
            raise ValueError(f"the vocabulary needs an {UNK!r} entry for unknown words")
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in self.str_to_int.items()}

    @classmethod
    def from_text(cls, text: str) -> SimpleTokenizerV2:
        """A tokenizer whose vocabulary is `build_vocab(text)`."""
        return cls(build_vocab(text))

    @property
    def vocab_size(self) -> int:
        return len(self.str_to_int)

    def encode(self, text: str) -> list[int]:
        unk = self.str_to_int[UNK]
        return [self.str_to_int.get(word, unk) for word in split_words(text)]

    def decode(self, ids: Sequence[int]) -> str:
        try:
            words = [self.int_to_str[int(i)] for i in ids]
        except KeyError as e:
            raise ValueError(
                f"token id {e.args[0]} is not in the vocabulary [0, {self.vocab_size})"
            ) from None
        return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(words))
