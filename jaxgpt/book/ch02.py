"""The book's chapter-2 word tokenizers: regex split and a vocabulary built from a text.

`SimpleTokenizerV1` knows only the words of its vocabulary and raises `UnknownWordError` (a
`KeyError`, as the book's dictionary lookup) for any other; `SimpleTokenizerV2` adds `<|unk|>`
for unknown words and `<|endoftext|>` between documents, which is why the chapter moves on to it.

It teaches what a tokenizer does; the models use the GPT-2 BPE tokenizer (`jaxgpt.tokenizer`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"
# Split on punctuation, double dashes and whitespace, keeping the separators (capture group).
_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Decoding joins words with spaces; this takes the space back out before punctuation. The book's
# V1 does so before fewer marks than V2 (not before ":" or ";"); each class keeps its own.
_SPACE_BEFORE_PUNCT_V1 = re.compile(r'\s+([,.?!"()\'])')
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.:;?!"()\'])')


def split_words(text: str) -> list[str]:
    """The book's pre-processing: regex split, strip, drop empty strings."""
    return [item.strip() for item in _SPLIT.split(text) if item.strip()]


def build_vocab(text: str, special_tokens: bool = True) -> dict[str, int]:
    """Sorted unique words of `text`, numbered from 0.

    With `special_tokens` (V2's vocabulary) `<|endoftext|>` and `<|unk|>` follow the words;
    without (V1's) the vocabulary is the words alone.
    """
    if not special_tokens:
        return {word: i for i, word in enumerate(sorted(set(split_words(text))))}
    words = sorted(set(split_words(text)) - {ENDOFTEXT, UNK})
    words.extend([ENDOFTEXT, UNK])
    return {word: i for i, word in enumerate(words)}


class UnknownWordError(KeyError):
    """`SimpleTokenizerV1.encode` met a word outside its vocabulary.

    A `KeyError` whose `args[0]` is the word, as the book's `self.str_to_int[s]` raises, with a
    message that says what to do about it.
    """

    def __init__(self, word: str, vocab_size: int):
        super().__init__(word)
        self.word = word
        self.vocab_size = vocab_size

    def __str__(self) -> str:
        return (
            f"{self.word!r} is not in the vocabulary ({self.vocab_size} words); "
            f"SimpleTokenizerV2 maps unknown words to {UNK!r}"
        )


class _WordTokenizer:
    """What V1 and V2 share: the vocabulary both ways round, and decoding."""

    _space_before_punct: re.Pattern = _SPACE_BEFORE_PUNCT

    def __init__(self, vocab: Mapping[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in self.str_to_int.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.str_to_int)

    def decode(self, ids: Sequence[int]) -> str:
        """Words joined by spaces, without the space before punctuation.

        Raises ValueError naming the first id that is not in the vocabulary.
        """
        try:
            words = [self.int_to_str[int(i)] for i in ids]
        except KeyError as e:
            raise ValueError(
                f"token id {e.args[0]} is not in the vocabulary [0, {self.vocab_size})"
            ) from None
        return self._space_before_punct.sub(r"\1", " ".join(words))


class SimpleTokenizerV1(_WordTokenizer):
    """Word-level tokenizer over a fixed vocabulary; a word outside it is an error.

    `encode` raises `UnknownWordError` (a `KeyError`) for such a word, which is the limitation
    `SimpleTokenizerV2` removes. Decoding takes the space out before `, . ? ! " ( ) '` (not
    before `:` or `;`, as in the book's V1).
    """

    _space_before_punct = _SPACE_BEFORE_PUNCT_V1

    @classmethod
    def from_text(cls, text: str) -> SimpleTokenizerV1:
        """A tokenizer whose vocabulary is the sorted unique words of `text`."""
        return cls(build_vocab(text, special_tokens=False))

    def encode(self, text: str) -> list[int]:
        """Token ids of the words of `text`; raises `UnknownWordError` for an unknown word."""
        ids = []
        for word in split_words(text):
            if word not in self.str_to_int:
                raise UnknownWordError(word, self.vocab_size)
            ids.append(self.str_to_int[word])
        return ids


class SimpleTokenizerV2(_WordTokenizer):
    """Word-level tokenizer over a fixed vocabulary; unknown words become `<|unk|>`."""

    def __init__(self, vocab: Mapping[str, int]):
        if UNK not in vocab:
            raise ValueError(f"the vocabulary needs an {UNK!r} entry for unknown words")
        super().__init__(vocab)

    @classmethod
    def from_text(cls, text: str) -> SimpleTokenizerV2:
        """A tokenizer whose vocabulary is `build_vocab(text)`."""
        return cls(build_vocab(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of the words of `text`, `<|unk|>`'s id for words outside the vocabulary."""
        unk = self.str_to_int[UNK]
        return [self.str_to_int.get(word, unk) for word in split_words(text)]
