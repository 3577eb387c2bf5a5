"""The sliding-window pipeline against the book's GPTDatasetV1; loader order, resume; files."""

import numpy as np
import pytest
from conftest import reference

from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.training.data import (
    BatchLoader,
    LoaderState,
    SlidingWindows,
    demo_corpus,
    load_token_file,
    save_token_file,
    tokenize_file,
    tokenize_text,
    train_val_split,
)

TEXT = (
    "In the sunlit terraces of the palace, the people gathered.\n\nEvery effort moves you"
    " forward, they said <|endoftext|> Another day. \n  Indented line\nlast words\n"
) * 3


@pytest.mark.parametrize("max_length, stride", [(4, 4), (8, 3), (5, 1)])
def test_windows_match_the_reference_dataset(max_length, stride):
    ch02 = reference("llms_from_scratch.ch02")
    ref = ch02.GPTDatasetV1(TEXT, get_tokenizer(), max_length, stride)
    ours = SlidingWindows(tokenize_text(TEXT), max_length, stride)
    assert len(ours) == len(ref) > 0
    inputs, targets = ours.get(np.arange(len(ours)))
    want_in = np.stack([x.numpy() for x, _ in (ref[i] for i in range(len(ref)))])
    want_tg = np.stack([y.numpy() for _, y in (ref[i] for i in range(len(ref)))])
    np.testing.assert_array_equal(inputs, want_in)
    np.testing.assert_array_equal(targets, want_tg)
    assert inputs.dtype == np.int32


def test_loader_visits_every_window_once_per_epoch_in_a_seeded_order():
    windows = SlidingWindows(np.arange(200, dtype=np.uint16), 4, 4)  # 49 windows
    loader = BatchLoader(windows, 8, seed=7)
    assert loader.batches_per_epoch == 6  # 49 // 8: the last partial batch is dropped
    epoch0 = np.concatenate([loader.next()[0][:, 0] // 4 for _ in range(6)])
    assert loader.state == LoaderState(1, 0)
    epoch1 = np.concatenate([loader.next()[0][:, 0] // 4 for _ in range(6)])
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    again = BatchLoader(windows, 8, seed=7)
    np.testing.assert_array_equal(
        np.concatenate([again.next()[0][:, 0] // 4 for _ in range(6)]), epoch0
    )
    other = BatchLoader(windows, 8, seed=8)
    assert not np.array_equal(other.next()[0], BatchLoader(windows, 8, seed=7).next()[0])
    ordered = BatchLoader(windows, 8, shuffle=False)
    np.testing.assert_array_equal(ordered.next()[0][:, 0], np.arange(8) * 4)


def test_loader_resumed_from_its_state_continues_with_the_same_batches():
    windows = SlidingWindows(np.arange(300, dtype=np.uint16) % 251, 5, 2)
    a = BatchLoader(windows, 4, seed=3)
    for _ in range(40):  # past an epoch boundary
        a.next()
    saved = LoaderState.from_array(a.state.to_array())
    b = BatchLoader(windows, 4, seed=3, state=saved)
    for _ in range(50):
        xa, ya = a.next()
        xb, yb = b.next()
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])  # target = input shifted by one


def test_too_little_data_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="3 window.*fewer than one batch of 4"):
        BatchLoader(SlidingWindows(np.arange(13, dtype=np.uint16), 4, 4), 4)


def test_chunked_file_tokenization_equals_whole_text_and_memmaps(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 5, encoding="utf-8")
    whole = tokenize_text(TEXT * 5)
    np.testing.assert_array_equal(tokenize_file(path, chunk_chars=37), whole)
    mm = tokenize_file(path, out=tmp_path / "corpus.bin", chunk_chars=50)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, whole)
    np.testing.assert_array_equal(
        load_token_file(save_token_file(whole, tmp_path / "b.bin")), whole
    )
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="3 bytes"):
        load_token_file(tmp_path / "odd.bin")


def test_windows_over_a_memmap_read_the_same_rows(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    mm = load_token_file(save_token_file(tokens, tmp_path / "t.bin"))
    idx = np.array([5, 0, 17])
    mapped, in_memory = SlidingWindows(mm, 16, 8).get(idx), SlidingWindows(tokens, 16, 8).get(idx)
    for a, b in zip(mapped, in_memory, strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_val_split_and_demo_corpus():
    train, val = train_val_split(np.arange(100), 0.9)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(val, np.arange(90, 100))
    with pytest.raises(ValueError, match="train_ratio must be in \\(0, 1\\), got 1.5"):
        train_val_split(np.arange(10), 1.5)
    text = demo_corpus()
    assert len(text) > 100_000 and "while" in text and text == demo_corpus()
