"""The finding of docs/research.md ("Features of a small GPT's residual stream"): its measure on
made-up units whose answer is known, and the shortened experiment, in which an SAE's features
are single tokens more often than random directions of the same residual stream and than the
MLP's neurons, by more than both shares' 95% intervals."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_default_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sae_finding  # noqa: E402  (scripts/sae_finding.py, the experiment)

sys.path.remove(str(ROOT / "scripts"))


def test_purity_is_the_share_of_the_commonest_label_among_the_top_positions():
    labels = np.array([7, 7, 7, 3, 5, 7, 3, 9])
    # Unit 0 is largest at positions 0, 1, 5, 3 (labels 7, 7, 7, 3): 3 of 4 agree. Unit 1 at
    # 4, 6, 7, 2 (5, 3, 9, 7): no two agree.
    acts = np.array([[9, 0], [8, 0], [0, 1], [6, 0], [0, 9], [7, 0], [0, 8], [0, 7]], float)
    positions, scored = sae_finding.top_positions(acts, 4)
    assert positions[:, 0].tolist() == [0, 1, 5, 3]
    assert positions[:, 1].tolist() == [4, 6, 7, 2]
    assert scored.tolist() == [True, True]
    assert sae_finding.purity(labels, positions).tolist() == [0.75, 0.25]


def test_a_unit_positive_at_fewer_than_top_positions_is_not_scored():
    acts = np.zeros((10, 2))
    acts[:3, 0] = 1.0  # fires 3 times
    acts[:, 1] = np.arange(10) + 1.0
    _, scored = sae_finding.top_positions(acts, 4)
    assert scored.tolist() == [False, True]
    with pytest.raises(ValueError, match="top must be in"):
        sae_finding.top_positions(acts, 11)


def test_wilson_interval():
    # Known values of the Wilson score interval at z = 1.96 (Newcombe 1998, table I: 81/263;
    # and 0 of 10, whose upper end is z^2 / (n + z^2)).
    lo, hi = sae_finding.wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert sae_finding.wilson(0, 10) == pytest.approx((0.0, 1.96**2 / (10 + 1.96**2)))


def test_shares_count_units_by_measure():
    r = sae_finding.Recipe(top=4, purity=0.75)
    inputs = np.array([[1, 3, 1, 3], [1, 2, 1, 3]])  # two windows of 4 tokens
    words = np.array([0, 1, 2, 1])  # tokens 1 and 3 are one word (" The", "the")
    labels = sae_finding.position_labels(inputs, words)
    # A window's first position follows nothing, and matches no other such position.
    assert labels["one previous token"].tolist() == [-1, 1, 3, 1, -2, 1, 2, 1]
    # Unit 0 is largest where the token is 1; unit 1 at positions 1, 0, 3, 2 (tokens 3, 1, 3, 1:
    # half one token, all one word).
    unit0 = (labels["one token"] == 1) + 0.1
    unit1 = np.array([7, 8, 5, 6, 1, 1, 1, 1])
    row = sae_finding.shares({"units": np.stack([unit0, unit1], 1)}, labels, r)["units"]
    assert (row["units"], row["scored"]) == (2, 2)
    assert [row[m]["count"] for m in sae_finding.MEASURES] == [1, 2, 0]
    assert row["one word"]["share"] == 1.0
    # What the page's features are listed with: the commonest token and each purity.
    pieces = [b"a", b"b", b"c", b"B"]
    found = sae_finding.verdicts(np.stack([unit0, unit1], 1), labels, pieces, r)
    # Feature 0's top positions follow -1, 3, -2, 2: two window starts, which do not agree.
    assert found == [{"feature": 0, "token": "b", "one token": 1.0, "one word": 1.0,
                      "one previous token": 0.25},
                     {"feature": 1, "token": "b", "one token": 0.5, "one word": 1.0,
                      "one previous token": 0.5}]  # feature 1's tie of b and B: the lower id


def test_a_word_drops_whitespace_and_case_but_keeps_bytes_apart():
    # The two halves of a UTF-8 character are different tokens, not one "word" of U+FFFD.
    pieces = [b" The", b"the", b"\xe2\x80", b"\x99", b"\n", b"  ", b"The"]
    words = sae_finding.word_ids(pieces)
    assert words[0] == words[1] == words[6]
    assert words[2] != words[3]
    assert words[4] == words[5]  # whitespace is one word
    assert len(set(words.tolist())) == 4


def test_a_context_shows_a_character_split_over_tokens_whole():
    pieces = [b"it", b"\xe2\x80", b"\x99", b"s", b" here", b"\n"]
    inputs = np.array([[0, 1, 2, 3, 4, 5]])
    acts = np.array([[0.0], [0], [0], [2.5], [0], [0]])  # top at the "s" after the apostrophe
    [line] = sae_finding.contexts(inputs, pieces, acts, 0, 1)
    assert line.split() == ["2.50", "it\u2019[s]", "here\\n"]


def test_the_recipes_are_valid_and_a_bad_flag_is_named():
    assert sae_finding.check(sae_finding.Recipe()) is None
    assert sae_finding.check(sae_finding.QUICK) is None
    bad = {"layer": 4, "heads": 3, "holdout": 1.0, "purity": 0.0, "k": 600, "top": 0,
           "gpt_steps": 0}
    for name, value in bad.items():
        problem = sae_finding.check(dataclasses.replace(sae_finding.Recipe(), **{name: value}))
        assert problem is not None and problem.startswith(f"--{name.replace('_', '-')}"), name


@pytest.mark.slow  # trains a GPT and an SAE in a subprocess (about 100 s of CPU)
def test_sae_features_are_single_tokens_more_often_than_random_directions(tmp_path):
    env = {**xla_default_env(), "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sae_finding.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = json.loads((tmp_path / "finding.json").read_text())["shares"]
    sae = shares["SAE features"]
    assert sae["scored"] >= 40, proc.stdout  # enough features for an interval of +-0.15
    low = sae["one token"]["wilson95"][0]
    for other in ("random directions", "MLP neurons"):
        # The intervals do not overlap: each is 95%, so this is a difference at p < 0.01.
        assert low > shares[other]["one token"]["wilson95"][1], proc.stdout
