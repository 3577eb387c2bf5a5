"""Pictures of what the model computes: attention heatmaps, patching sweeps, the logit lens.
matplotlib is imported only when a picture is drawn.

However many tokens, a picture stays readable at 100% zoom: its text keeps its size, the figure
is at most MAX_SIDE_PX a side, tick labels are thinned to every k-th token when the cells are
too narrow for one each, and the numbers written in the cells are left out when they do not fit
(the axis label then says so). Text the font cannot draw (most emoji and CJK characters) is
shown escaped, `\\u4e16`, as a token's stray UTF-8 bytes are (`\\xf0`, see
`jaxgpt.tokenizer.token_strings`), never as an empty box.
"""

from __future__ import annotations

import functools
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The largest picture, in pixels a side: whole on a 4K screen (3840 x 2160) at 100% zoom, a
# scroll or two on a laptop's; beyond it the cells shrink, not the text.
MAX_SIDE_PX = 2000
TICK_PT = 8  # the tick labels' font size
CELL_PT = 6  # the font size of the text written in cells
# A tick label needs this much room across the axis (its line height, with a little air).
_TICK_PITCH_PT = 1.25 * TICK_PT
# DejaVu Sans's digits are 0.64 em wide; other characters average less.
_CHAR_EM = 0.64


def plot_attention(weights: np.ndarray, tokens: Sequence[str], path: str | os.PathLike, *,
                   layer: int, head: int | None = None) -> Path:
    """A heatmap of one layer's attention weights with the tokens on both axes.

    Args:
      weights: `[H, T, T]` (one prompt's weights for the layer).
      tokens: the T token strings, in order.
      path: the picture to write (its format from the suffix).
      layer: the layer's index (for the title).
      head: one head to draw; None draws every head in a grid.

    Returns:
      The path written.
    """
    plt = _pyplot()
    n_heads, t, _ = weights.shape
    heads = list(range(n_heads)) if head is None else [head]
    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    dpi = 110
    # bbox_inches="tight" pads the drawing by 0.1 in a side, beyond the figure's own edge.
    room = MAX_SIDE_PX / dpi - 0.3
    panel = min(max(2.5, 0.28 * t + 1.2),  # room for one label per token
                (room - 1.2) / cols, (room - 0.6) / rows)
    with _text_as_given():
        fig, axes = plt.subplots(rows, cols, figsize=(panel * cols + 1.2, panel * rows + 0.6),
                                 squeeze=False, layout="constrained")
        labels = [_label(s) for s in tokens]
        image = None
        for ax in axes.flat[len(heads):]:
            ax.set_visible(False)
        for ax, h in zip(axes.flat, heads, strict=False):
            image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"head {h}", fontsize=10)
        fig.suptitle(f"Attention weights, layer {layer}")
        assert image is not None  # at least one head is drawn
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
        drawn = [ax for ax, _ in zip(axes.flat, heads, strict=False)]
        steps = _tick_steps(fig, drawn[0], t, t, labels, labels)
        for ax in drawn:
            _set_ticks(ax, labels, labels, steps)
        fig.supxlabel(f"key (the token attended to){_every(steps[0], 'token')}", fontsize=9)
        fig.supylabel(f"query{_every(steps[1], 'token')}", fontsize=9)
        path = Path(path)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_patching(values: np.ndarray, rows: Sequence[str], columns: Sequence[str],
                  path: str | os.PathLike, *, title: str, label: str,
                  column_title: str) -> Path:
    """A heatmap of a patching sweep: `values` `[len(rows), len(columns)]` (layers by
    positions, or by heads), a diverging colour map centred at 0, each cell's value written in
    it when the cells are large enough to hold it."""
    plt = _pyplot()
    n_rows, n_cols = values.shape
    dpi = 100
    room = MAX_SIDE_PX / dpi
    title_width = 0.08 * max(len(line) for line in title.split("\n")) + 1.0  # 10pt text
    width = min(room, max(6.0, 0.55 * n_cols + 2.2, title_width))
    height = min(room, max(3.0, 0.36 * n_rows + 1.6))
    with _text_as_given():
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        bound = float(np.abs(values).max()) or 1.0
        image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_title(_wrap(title, width), fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8, label=_drawable(label))
        xlabels, ylabels = [_label(c) for c in columns], [_drawable(r) for r in rows]
        steps = _tick_steps(fig, ax, n_rows, n_cols, xlabels, ylabels)
        _set_ticks(ax, xlabels, ylabels, steps)
        texts = [f"{v:.2f}" for v in values.flat]
        written = _cells_hold(fig, ax, n_rows, n_cols, max(map(len, texts)), lines=1)
        if written:
            for (r, c), v in np.ndenumerate(values):
                ax.text(c, r, texts[r * n_cols + c], ha="center", va="center",
                        fontsize=CELL_PT, color="white" if abs(v) > 0.6 * bound else "black")
        ax.set_xlabel(_drawable(column_title + _every(steps[0], column_title))
                      + ("" if written else "; cells too small for their values: see the "
                                            "colour bar"), fontsize=9)
        ax.set_ylabel("layer" + _every(steps[1], "layer"), fontsize=9)
        path = Path(path)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_logit_lens(top_tokens: Sequence[Sequence[str]], probs: np.ndarray,
                    rows: Sequence[str], columns: Sequence[str], path: str | os.PathLike, *,
                    title: str) -> Path:
    """The logit lens as a grid: rows are the residual stream read at each layer, columns the
    prompt's positions; each cell the most likely next token and its probability (colour),
    written in it when the cells are large enough to hold them."""
    plt = _pyplot()
    n_rows, n_cols = probs.shape
    dpi = 100
    room = MAX_SIDE_PX / dpi
    width = min(room, max(4.0, 0.95 * n_cols + 2.0))
    height = min(room, max(3.0, 0.34 * n_rows + 1.6))
    with _text_as_given():
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(_wrap(title, width), fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8, label="probability of the top token")
        xlabels, ylabels = [_label(c) for c in columns], [_drawable(r) for r in rows]
        steps = _tick_steps(fig, ax, n_rows, n_cols, xlabels, ylabels)
        _set_ticks(ax, xlabels, ylabels, steps)
        # Eight characters a cell; a longer token runs into its neighbours, as a label would.
        written = _cells_hold(fig, ax, n_rows, n_cols, 8, lines=2)
        if written:
            for (r, c), p in np.ndenumerate(probs):
                ax.text(c, r, f"{_label(top_tokens[r][c])}\n{p:.2f}", ha="center",
                        va="center", fontsize=CELL_PT, color="white" if p > 0.6 else "black")
        ax.set_xlabel("position (the token read there)" + _every(steps[0], "position")
                      + ("" if written else "; cells too small for the top tokens: give a "
                                            "shorter prompt"), fontsize=9)
        ax.set_ylabel("residual stream" + _every(steps[1], "row"), fontsize=9)
        path = Path(path)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _text_as_given() -> Any:
    """A context in which text is drawn as written: a token such as ` $$` is not mathtext
    (matplotlib would fail to parse it)."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def _label(token: str) -> str:
    """A token as an axis label: visible even when it is whitespace, and drawable."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    return _drawable(shown if shown.strip() else repr(token))


def _drawable(text: str) -> str:
    """`text` with each character the font has no glyph for written as its escape (`\\u4e16`,
    `\\U0001f600`), so matplotlib neither warns nor draws an empty box; line breaks kept."""
    glyphs = _glyphs()
    return "".join(c if c == "\n" or ord(c) in glyphs
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def _glyphs() -> frozenset[int]:
    """The characters the fonts of rcParams["font.family"] can draw (matplotlib falls back
    from one family to the next), asked of the fonts themselves."""
    import matplotlib
    from matplotlib import font_manager

    families = matplotlib.rcParams["font.family"]
    return _charmap(tuple(font_manager.findfont(font_manager.FontProperties(family=[family]))
                          for family in families))


@functools.lru_cache(maxsize=4)
def _charmap(fonts: tuple[str, ...]) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(code for font in fonts for code in FT2Font(font).get_charmap())


def _wrap(title: str, width_in: float) -> str:
    """A 10pt title wrapped to a figure `width_in` wide, each of its lines in at most three
    (a long prompt is cut short: its tokens are on the axis)."""
    chars = max(20, int((width_in - 0.5) / (_CHAR_EM * 10 / 72)))
    return "\n".join(textwrap.fill(line, chars, max_lines=3, placeholder=" ...") or line
                      for line in _drawable(title).split("\n"))


def _cell_pt(fig: Any, ax: Any, n_rows: int, n_cols: int) -> tuple[float, float]:
    """The width and height of one of `ax`'s cells, in points, as the layout draws it."""
    fig.draw_without_rendering()  # the constrained layout sizes the axes
    box = ax.get_window_extent()  # pixels at fig.dpi
    return box.width * 72 / fig.dpi / n_cols, box.height * 72 / fig.dpi / n_rows


def _tick_steps(fig: Any, ax: Any, n_rows: int, n_cols: int, xlabels: Sequence[str],
                ylabels: Sequence[str]) -> tuple[int, int]:
    """Label every k-th column and every j-th row, `(k, j)` as small as keeps the labels
    apart: every label set, the layout makes room for them, then the cells are measured."""
    _set_ticks(ax, xlabels, ylabels, (1, 1))
    width, height = _cell_pt(fig, ax, n_rows, n_cols)
    return (max(1, math.ceil(_TICK_PITCH_PT / width)),
            max(1, math.ceil(_TICK_PITCH_PT / height)))


def _set_ticks(ax: Any, xlabels: Sequence[str], ylabels: Sequence[str],
               steps: tuple[int, int]) -> None:
    """Every k-th label on the x axis and every j-th on the y axis, `steps = (k, j)`, counted
    back from the last (the position that predicts the next token is always labelled)."""
    for labels, setter, rotation, step in ((xlabels, ax.set_xticks, 90, steps[0]),
                                           (ylabels, ax.set_yticks, 0, steps[1])):
        ticks = range((len(labels) - 1) % step, len(labels), step)
        setter(ticks, [labels[i] for i in ticks], rotation=rotation, fontsize=TICK_PT)


def _every(step: int, what: str) -> str:
    """The axis label's note that only every `step`-th tick is labelled."""
    if step == 1:
        return ""
    teen = step % 100 in (11, 12, 13)
    suffix = "th" if teen else {1: "st", 2: "nd", 3: "rd"}.get(step % 10, "th")
    return f"; every {step}{suffix} {what} labelled"


def _cells_hold(fig: Any, ax: Any, n_rows: int, n_cols: int, chars: int, lines: int) -> bool:
    """Whether each cell can hold `lines` lines of `chars` characters of CELL_PT text."""
    width, height = _cell_pt(fig, ax, n_rows, n_cols)
    return width >= chars * _CHAR_EM * CELL_PT + 2 and height >= lines * 1.2 * CELL_PT + 1
