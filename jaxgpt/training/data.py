"""The book's sliding-window data (`GPTDatasetV1`) as a numpy pipeline, resumable and seeded.

`GPTDatasetV1(txt, tokenizer, max_length, stride)` cuts a token stream into windows
`ids[i : i + max_length]` with targets `ids[i + 1 : i + max_length + 1]` for
`i in range(0, len(ids) - max_length, stride)`. `SlidingWindows` does the same over any
1-D token array (an in-memory array or a memory-mapped uint16 file), building a batch with one
fancy-indexing gather instead of a Python loop. `BatchLoader` shuffles the windows with a seeded
permutation per epoch, drops the last partial batch (as the book's `drop_last=True`), and keeps
its position as two ints, so a resumed run reads exactly the batches an uninterrupted one would.

Shapes: N tokens in the stream, W windows, B batch, T = max_length.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tiktoken

from jaxgpt.tokenizer import ENDOFTEXT, get_tokenizer

# uint16 holds every GPT-2 id (50257 < 65536) in half the bytes of int32.
TOKEN_DTYPE = np.uint16


def tokenize_text(text: str, tokenizer: tiktoken.Encoding | None = None) -> np.ndarray:
    """Token ids `[N]` (uint16) of `text` with the bundled GPT-2 tokenizer (`<|endoftext|>`
    allowed)."""
    tokenizer = tokenizer or get_tokenizer()
    ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return _as_uint16(np.asarray(ids, dtype=np.int64))


def _as_uint16(ids: np.ndarray) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"token ids must lie in [0, 65535] for a uint16 file; got {ids.max()}")
    return ids.astype(TOKEN_DTYPE)


def _text_chunks(path: Path, chunk_chars: int) -> Iterator[str]:
    """Pieces of the file whose concatenation is the file, cut only where BPE cuts anyway.

    A cut goes right after a newline with a non-space character on each side: GPT-2's
    pre-tokenizer makes that newline a piece of its own, so encoding the chunks one by one
    gives the ids of encoding the whole text at once (a test pins this down).
    """
    buf = ""
    with open(path, encoding="utf-8") as f:
        while True:
            try:
                block = f.read(chunk_chars)
            except UnicodeDecodeError:
                raise ValueError(f"{path} is not UTF-8 text: {_first_bad_utf8(path)}") from None
            buf += block
            if not block:
                if buf:
                    yield buf
                return
            cut, end = -1, len(buf) - 1  # the characters on both sides of a cut are in buf
            while True:
                pos = buf.rfind("\n", 1, end)
                if pos < 0:
                    break
                if not buf[pos - 1].isspace() and not buf[pos + 1].isspace():
                    cut = pos + 1
                    break
                end = pos
            if cut > 0:
                yield buf[:cut]
                buf = buf[cut:]


def _first_bad_utf8(path: Path, block: int = 1 << 20) -> str:
    """Where the file stops being UTF-8: `byte 0xe9 at offset 1234 (invalid continuation byte)`."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file fed to the decoder so far
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            pending = len(decoder.getstate()[0])  # bytes held back from the last block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                return f"byte 0x{e.object[e.start]:02x} at offset {at} ({e.reason})"
            if not data:
                return "the file changed while it was read"
            offset += len(data)


def tokenize_file(
    path: str | os.PathLike, out: str | os.PathLike | None = None, chunk_chars: int = 1 << 22
) -> np.ndarray:
    """Tokenize a UTF-8 text file in chunks; return the ids `[N]` (uint16).

    With `out`, the ids are streamed to that raw uint16 file (see `load_token_file`) and a
    read-only memory map of it is returned, so corpora larger than memory never sit in RAM.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    tokenizer = get_tokenizer()
    if out is None:
        parts = [tokenize_text(chunk, tokenizer) for chunk in _text_chunks(path, chunk_chars)]
        return np.concatenate(parts) if parts else np.zeros((0,), TOKEN_DTYPE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in _text_chunks(path, chunk_chars):
            tokenize_text(chunk, tokenizer).tofile(f)
    os.replace(tmp, out)
    return load_token_file(out)


def save_token_file(tokens: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ids `[N]` as a raw little-endian uint16 file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _as_uint16(np.asarray(tokens)).astype("<u2").tofile(path)
    return path


def looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file read as text (UTF-8 without control characters other
    than whitespace) rather than uint16 token ids: ids below 8192 (GPT-2's commonest tokens,
    any small vocabulary) have a high byte below 0x20, which text does not hold."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut off at the end
            return False
        text = head[:e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


class TextNotTokens(ValueError):
    """`load_token_file` of a file that holds text: `tokenize_file` reads it."""


def load_token_file(path: str | os.PathLike) -> np.ndarray:
    """A read-only memory map `[N]` (uint16) of a file written by `save_token_file`.

    Raises ValueError for a file that cannot be one: an odd size, or text (`TextNotTokens`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}")
    size = path.stat().st_size
    if size % 2:
        raise ValueError(f"{path} has {size} bytes; a uint16 token file has an even number")
    if size == 0:
        return np.zeros((0,), TOKEN_DTYPE)
    with open(path, "rb") as f:
        if looks_like_text(f.read(4096)):
            raise TextNotTokens(f"{path} holds text, not uint16 token ids; read it with "
                                f"tokenize_file, which tokenizes it")
    return np.memmap(path, dtype="<u2", mode="r")


def train_val_split(tokens: np.ndarray, train_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The first `train_ratio` of the tokens for training, the rest for validation.

    The book splits the text by characters at 90%; splitting the token stream keeps memory maps
    as views (no copy).
    """
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    split = int(train_ratio * len(tokens))
    return tokens[:split], tokens[split:]


class SlidingWindows:
    """The book's `GPTDatasetV1` over a token array: window `i` starts at `i * stride`.

    Args:
      tokens: 1-D ids `[N]`, any integer dtype (a memory map is fine: only the rows a batch
        needs are read).
      max_length: T, tokens per input window.
      stride: distance between window starts (`stride < max_length` overlaps windows).
    """

    def __init__(self, tokens: np.ndarray, max_length: int, stride: int):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D [N], got shape {tokens.shape}")
        for name, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.tokens = tokens
        self.max_length = int(max_length)
        self.stride = int(stride)
        # range(0, N - T, stride), as GPTDatasetV1: the last start leaves room for its target.
        self.num_windows = len(range(0, max(len(tokens) - self.max_length, 0), self.stride))

    def __len__(self) -> int:
        return self.num_windows

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(inputs, targets)`, each int32 `[len(indices), T]`, for the given window indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_windows):
            raise IndexError(f"window index outside [0, {self.num_windows})")
        rows = indices[:, None] * self.stride + np.arange(self.max_length + 1)  # [B, T + 1]
        window = np.asarray(self.tokens[rows], dtype=np.int32)
        return window[:, :-1], window[:, 1:]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        inputs, targets = self.get(np.array([i]))
        return inputs[0], targets[0]


@dataclass
class LoaderState:
    """Where a `BatchLoader` stands: the epoch and the next batch within it."""

    epoch: int = 0
    batch: int = 0

    def to_array(self) -> np.ndarray:
        return np.array([self.epoch, self.batch], dtype=np.int64)

    @classmethod
    def from_array(cls, a: npt.ArrayLike) -> LoaderState:
        a = np.asarray(a)
        return cls(int(a[0]), int(a[1]))


class BatchLoader:
    """Endless batches `(inputs, targets)`, int32 `[B, T]`, with a seeded shuffle per epoch.

    Epoch `e` visits the windows in the order `np.random.default_rng([seed, e]).permutation(W)`
    (or in order with `shuffle=False`) and drops the last partial batch. `state` (epoch, batch)
    is all a checkpoint needs to continue with the same batches.
    """

    def __init__(
        self,
        windows: SlidingWindows,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        state: LoaderState | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if len(windows) < batch_size:
            raise ValueError(
                f"{len(windows)} window(s) of {windows.max_length} tokens "
                f"(stride {windows.stride}) "
                f"from {len(windows.tokens)} tokens: fewer than one batch of {batch_size}; "
                f"give more text or a smaller batch size / sequence length"
            )
        self.windows = windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.batches_per_epoch = len(windows) // batch_size
        self.state = state or LoaderState()
        self._order_epoch = -1
        self._order = np.arange(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = len(self.windows)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """The window indices `[B]` of the next batch (`windows.get` builds any rows of it);
        advances `state`."""
        st = self.state
        order = self._epoch_order(st.epoch)
        idx = order[st.batch * self.batch_size : (st.batch + 1) * self.batch_size]
        if st.batch + 1 == self.batches_per_epoch:
            self.state = LoaderState(st.epoch + 1, 0)
        else:
            self.state = LoaderState(st.epoch, st.batch + 1)
        return idx

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch; advances `state`."""
        return self.windows.get(self.next_indices())

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next()

    def first(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The first `n` batches of epoch 0 in order, without touching `state` (for evaluation)."""
        n = min(n, self.batches_per_epoch)
        order = np.arange(len(self.windows))
        return [
            self.windows.get(order[i * self.batch_size : (i + 1) * self.batch_size])
            for i in range(n)
        ]


def demo_corpus() -> str:
    """The offline demo corpus: Python's own help topics (`pydoc_data.topics`), ~465k characters.

    Every CPython installation ships it; the 79 topics (the language reference sections that
    `help("if")` shows) are joined in sorted order with blank lines, ~139k GPT-2 tokens.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))
