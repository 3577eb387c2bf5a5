"""The research pictures (issue 31, rows 7 and 14): text the font cannot draw is escaped, not a
warning and an empty box; and however many tokens, a picture is bounded in size, its labels
do not overlap, and its cells hold their numbers or say that they do not."""

import logging
import struct
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from jaxgpt.interp import plots
from jaxgpt.tokenizer import get_tokenizer, token_strings

ASCII = "When Mary and John went to the store, John gave a drink to"
# An emoji and CJK characters, split by GPT-2 into tokens of whole characters and of parts.
CJK = "Hi 😀 中国 のテキスト"
CJK_LABELS = ["Hi", " \\xf0\\x9f\\x98", "\\x80", "' '", "\\u4e2d", "\\xe5\\x9b", "\\xbd", "' '",
              "\\u306e", "\\u30c6", "\\u30ad", "\\u30b9\\u30c8"]
LONG = ("When Mary and John went to the store, John gave a drink to Mary. " * 40)


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots draw, kept open (plots close each one when it is written)."""
    figures = []
    real = plt.close

    def keep(fig=None):
        figures.append(fig)

    monkeypatch.setattr(plt, "close", keep)
    yield figures
    for fig in figures:
        real(fig)


@pytest.fixture
def quiet(caplog):
    """Every warning the plots give, as a `warnings` warning or through matplotlib's logger."""
    caplog.set_level(logging.DEBUG, logger="matplotlib")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records
                                               if r.levelno >= logging.WARNING]
    assert not said, said


def _tokens(text, n=None):
    return token_strings(get_tokenizer().encode(text)[:n])


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])  # IHDR: width, height


def _draw_all(tokens, tmp_path, text=""):
    """Each picture of `tokens`: {name: (path, the kept figure)}."""
    n = len(tokens)
    rng = np.random.default_rng(0)
    out = {name: tmp_path / f"{name}.png" for name in ("attention", "patching", "lens")}
    plots.plot_attention(rng.random((2, n, n)), tokens, out["attention"], layer=0)
    plots.plot_patching(rng.standard_normal((12, n)), [str(i) for i in range(12)], tokens,
                        out["patching"], title=f"patching {text!r}",
                        label=f"logit({tokens[-1]!r})", column_title="position")
    plots.plot_logit_lens([tokens] * 3, rng.random((3, n)), ["0_pre", "1_pre", "final_post"],
                          tokens, out["lens"], title=f"logit lens: {text!r}")
    return out


def _ticks(axis):
    return [t.get_text() for t in axis.get_ticklabels()]


# Row 7: emoji, CJK and a token's stray UTF-8 bytes.

def test_token_strings_write_a_tokens_part_of_a_character_as_its_bytes():
    ids = get_tokenizer().encode("😀 中")
    assert [get_tokenizer().decode([i]) for i in ids] == ["\ufffd", "\ufffd", " ", "\u4e2d"]
    assert token_strings(ids) == ["\\xf0\\x9f\\x98", "\\x80", " ", "\u4e2d"]
    assert token_strings(get_tokenizer().encode(" Mary had")) == [" Mary", " had"]


def test_tokens_the_font_cannot_draw_are_escaped_with_no_warning(tmp_path, drawn, quiet):
    tokens = _tokens(CJK)
    _draw_all(tokens, tmp_path, CJK)
    attention, patching, lens = (fig.axes[0] for fig in drawn)
    for ax in (attention, patching, lens):
        assert _ticks(ax.xaxis) == CJK_LABELS
    assert _ticks(attention.yaxis) == CJK_LABELS
    # DejaVu Sans has this emoji, not the CJK characters.
    assert patching.get_title() == ("patching 'Hi 😀 \\u4e2d\\u56fd "
                                    "\\u306e\\u30c6\\u30ad\\u30b9\\u30c8'")
    assert drawn[1].axes[1].get_ylabel() == "logit('\\u30b9\\u30c8')"  # the colour bar's
    cells = [t.get_text().split("\n")[0] for t in lens.texts]
    assert cells[:len(tokens)] == CJK_LABELS  # the top tokens, written in the cells


def test_plain_ascii_tokens_are_drawn_as_they_are(tmp_path, drawn, quiet):
    tokens = _tokens(ASCII)
    _draw_all(tokens, tmp_path)
    want = ["When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John",
            " gave", " a", " drink", " to"]
    for fig in drawn:
        assert _ticks(fig.axes[0].xaxis) == want


def test_what_is_escaped_is_asked_of_the_font(tmp_path, drawn, quiet):
    # Computer Modern Sans (cmss10, shipped with matplotlib) has no é; DejaVu Sans has it.
    assert plots._label(" café") == " café"
    with matplotlib.rc_context({"font.family": ["cmss10"]}):
        assert plots._label(" café") == " caf\\xe9"
        plots.plot_attention(np.ones((1, 1, 1)), [" café"], tmp_path / "a.png", layer=0)
    assert _ticks(drawn[0].axes[0].xaxis) == [" caf\\xe9"]


def test_a_token_with_dollar_signs_is_text_not_mathtext(tmp_path, drawn, quiet):
    tokens = _tokens("It costs $$ or $5")
    assert " $$" in tokens
    # Drawn as mathtext, ` $$` would fail to parse (a ValueError from savefig).
    _draw_all(tokens, tmp_path, "It costs $$ or $5")
    assert _ticks(drawn[1].axes[0].xaxis) == tokens


# Row 14: long prompts.

@pytest.fixture(scope="module")
def long_prompt(tmp_path_factory):
    """The three pictures of a 512-token prompt, drawn once: {name: (path, figure)}."""
    figures = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plt, "close", figures.append)
        paths = _draw_all(_tokens(LONG, 512), tmp_path_factory.mktemp("long"))
    yield {name: (path, fig) for (name, path), fig in zip(paths.items(), figures, strict=True)}
    for fig in figures:
        plt.close(fig)


@pytest.mark.parametrize("n", [121, 512])
def test_pictures_stay_within_max_side_px_however_many_tokens(tmp_path, request, n):
    if n == 512:
        paths = {name: path for name, (path, _) in request.getfixturevalue("long_prompt").items()}
    else:
        paths = _draw_all(_tokens(LONG, n), tmp_path)
    bound = 2000  # plots.MAX_SIDE_PX, written out so that the sizes are checked first
    for name, path in paths.items():
        width, height = _png_size(path)
        assert width <= bound and height <= bound, (name, width, height)
        # The room is used: the cells shrink to the cap, not below it.
        assert width >= 0.95 * bound, (name, width)
    assert plots.MAX_SIDE_PX == bound


def test_a_short_prompt_keeps_its_size_and_every_label(tmp_path, drawn):
    tokens = _tokens(ASCII)
    out = _draw_all(tokens, tmp_path)
    # As before row 14: 0.55 in a column, 0.95 in a lens cell, at 100 dpi.
    assert _png_size(out["patching"]) == (990, 592)
    assert _png_size(out["lens"]) == (1530, 300)
    for fig in drawn:
        assert _ticks(fig.axes[0].xaxis) == tokens
        assert "labelled" not in fig.axes[0].get_xlabel()


def test_cell_values_are_written_only_when_the_cells_hold_them(tmp_path, drawn):
    short, long = _tokens(ASCII), _tokens(LONG, 121)
    values = np.arange(2 * 14).reshape(2, 14) / 10
    plots.plot_patching(values, ["0", "1"], short, tmp_path / "short.png", title="t",
                        label="v", column_title="position")
    plots.plot_patching(np.ones((12, 121)), [str(i) for i in range(12)], long,
                        tmp_path / "long.png", title="t", label="v", column_title="position")
    small, large = (fig.axes[0] for fig in drawn)
    assert [t.get_text() for t in small.texts] == [f"{v:.2f}" for v in values.flat]
    assert "too small" not in small.get_xlabel()
    assert len(large.texts) == 0
    assert large.get_xlabel() == "position; cells too small for their values: see the colour bar"
    # The lens likewise: 14 positions hold their top tokens, 121 do not, and say so.
    for tokens in (short, long):
        plots.plot_logit_lens([tokens], np.ones((1, len(tokens))), ["final_post"], tokens,
                              tmp_path / "lens.png", title="t")
    assert len(drawn[2].axes[0].texts) == 14 and len(drawn[3].axes[0].texts) == 0
    assert "cells too small for the top tokens" in drawn[3].axes[0].get_xlabel()


def test_tick_labels_are_thinned_apart_and_keep_the_last_token(long_prompt):
    tokens = _tokens(LONG, 512)
    for _, fig in long_prompt.values():
        ax = fig.axes[0]
        shown = _ticks(ax.xaxis)
        step = round(len(tokens) / len(shown))
        assert 1 < step < len(tokens) // 10  # thinned, and still labelled along the axis
        assert shown == [plots._label(t) for t in tokens][(len(tokens) - 1) % step::step]
        assert ax.get_xticks()[-1] == len(tokens) - 1  # the position that predicts
        assert f"every {step}" in (fig.get_supxlabel() or ax.get_xlabel())
        # Neighbouring labels do not overlap as drawn (x labels stand on end: 90 degrees).
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in ax.xaxis.get_ticklabels()]
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:], strict=False))
