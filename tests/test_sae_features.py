"""`jaxgpt.sae.features` and `jaxgpt sae features`: the statistics against plain NumPy over all
the activations at once, the streamed top-n against the all-at-once one, the page (escaping,
bytes, whitespace, dead features), one-line refusals, and the page in a real browser."""

import dataclasses
import html.parser
import json
import math
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from jaxgpt import cli
from jaxgpt.cli import sae_features as features_command
from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.nn.model import init_params
from jaxgpt.sae import features
from jaxgpt.sae.features import FeaturesConfig, feature_stats, features_page
from jaxgpt.sae.formats import save_sae
from jaxgpt.sae.model import SAEConfig, init_sae
from jaxgpt.tokenizer import EOT_ID, get_tokenizer

# The tiny model with GPT-2's vocabulary, so real text, <|endoftext|> and the page's tokens
# are GPT-2's.
CFG = GPTConfig(**{**TINY, "vocab_size": 50257})
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def model():
    return CFG, init_params(CFG, 0)


def make_sae(hook="blocks.0.hook_resid_post", d_in=32, d_sae=24, seed=0, dead=(5,),
             architecture="standard"):
    """A standard SAE at `hook` whose features fire on a spread of fractions of the tokens
    (random encoder, biases from 0 down), with the features `dead` never firing."""
    sae = init_sae(SAEConfig(architecture, d_in, d_sae, k=4, hook_name=hook), seed)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    scale = 1.0 if d_in == 32 else 0.3
    b_enc = -jax.random.uniform(k2, (d_sae,), maxval=0.15 * scale)
    b_enc = b_enc.at[jnp.asarray(dead, jnp.int32)].set(-1e3)
    params = {**sae.params, "W_enc": jax.random.normal(k1, (d_in, d_sae)) * scale,
              "b_enc": b_enc, "W_dec": jax.random.normal(k3, (d_sae, d_in)) * 0.1}
    return sae.replace(params=params)


def tokens_with_repeats(n=300, seed=0):
    """Random ids with one 16-token window repeated three times (window-aligned), so that
    windows tie on their maxima across batches."""
    ids = np.random.default_rng(seed).integers(0, 2000, n)
    ids[64:80] = ids[112:128] = ids[160:176] = ids[16:32]
    return ids


def numpy_stats(params, cfg, sae, ids, fc):
    """Every statistic of the features, by NumPy over the activations of all windows at
    once (as `feature_activations` streams them, so the same float32 values): (per-feature
    dict, the windows' tokens, the activations [N, T, F])."""
    windows = features.token_windows(ids, cfg, fc)
    text = windows[:, 1:] if fc.prepend_bos else windows  # the text in order, the tail left out
    np.testing.assert_array_equal(text.ravel(), ids[:text.size])
    assert not fc.prepend_bos or (windows[:, 0] == EOT_ID).all()
    parts = list(features.feature_activations(params, cfg, sae, windows, fc))
    assert [start for start, _, _ in parts] == list(range(0, len(windows), fc.batch_size))
    rows = np.concatenate([np.asarray(t) for _, t, _ in parts])
    acts = np.concatenate([np.asarray(a) for _, _, a in parts]).astype(np.float64)
    np.testing.assert_array_equal(rows, text)
    out = {}
    for f in range(acts.shape[-1]):
        a = acts[..., f]
        top = a.max()
        upper = 2.0 ** (math.floor(math.log2(top)) + 1) if top > 0 else 0.0
        counts = np.histogram(a[a > 0], np.linspace(0, upper, fc.bins + 1))[0] if top > 0 \
            else np.zeros(fc.bins, int)
        row_max, row_pos = a.max(1), a.argmax(1)
        order = [r for r in np.lexsort((np.arange(len(a)), -row_max)) if row_max[r] > 0]
        contexts = []
        for r in order[:fc.contexts]:
            at = range(row_pos[r] - fc.before, row_pos[r] + fc.after + 1)
            contexts.append((row_max[r], r, row_pos[r],
                             [rows[r, p] if 0 <= p < a.shape[1] else -1 for p in at],
                             [a[r, p] if 0 <= p < a.shape[1] else 0.0 for p in at]))
        out[f] = {"density": (a > 0).mean(), "max": max(top, 0.0), "range": upper,
                  "hist": counts, "contexts": contexts}
    return out, rows, acts


def numpy_logit_weights(params, cfg, sae, hook):
    """`[d_sae, V]` logit weights in float64: each decoder row, carried into the residual
    stream by the hook's output projection, times final_norm.scale * W_U."""
    w_dec = np.asarray(sae.params["W_dec"], np.float64)
    block = hook.split(".")[1] if hook.startswith("blocks.") else None
    if hook.endswith("attn.hook_z"):
        w_dec = w_dec @ np.asarray(params[f"trf_blocks_{block}"]["att"]["out_proj"]["kernel"])
    elif hook.endswith("mlp.hook_post"):
        w_dec = w_dec @ np.asarray(params[f"trf_blocks_{block}"]["ff"]["layers_2"]["kernel"])
    w_u = np.asarray(params["out_head"]["kernel"], np.float64)
    return w_dec @ (np.asarray(params["final_norm"]["scale"], np.float64)[:, None] * w_u)


@pytest.mark.parametrize("hook, d_in, prepend_bos", [
    ("blocks.0.hook_resid_post", 32, False),
    ("blocks.1.attn.hook_z", 32, True),  # [B, T, H, Dh] flattened; logits through out_proj
    ("blocks.0.mlp.hook_post", 128, False),  # logits through the MLP's second layer
])
def test_statistics_equal_numpy_over_all_activations_at_once(model, hook, d_in, prepend_bos):
    cfg, params = model
    sae = make_sae(hook, d_in)
    ids = tokens_with_repeats()
    fc = FeaturesConfig(top=None, batch_size=3, contexts=4, before=3, after=2, bins=16,
                        prepend_bos=prepend_bos, logit_tokens=5)
    got = feature_stats(params, cfg, sae, ids, fc)
    want, rows, acts = numpy_stats(params, cfg, sae, ids, fc)
    assert got.n_tokens == rows.size and got.n_windows == len(rows)
    assert sorted(got.features) == list(range(sae.cfg.d_sae))
    density = np.array([want[f]["density"] for f in got.features])
    assert (np.diff(density) <= 0).all(), "not sorted densest first"
    assert got.n_dead == sum(want[f]["max"] == 0 for f in want) >= 1
    # Density and counts are exact; the max, histogram range and contexts are the same
    # float32 activations (the NumPy copy only widens them).
    for i, f in enumerate(got.features):
        w = want[f]
        assert got.density[i] == w["density"], f
        assert got.max_act[i] == w["max"] and got.hist_range[i] == w["range"], f
        np.testing.assert_array_equal(got.hist_counts[i], w["hist"], err_msg=f"feature {f}")
        assert got.context_count[i] == len(w["contexts"]), f
        for j, (act, row, pos, toks, tok_acts) in enumerate(w["contexts"]):
            assert (got.context_act[i, j], got.context_window[i, j], got.context_pos[i, j]) \
                == (act, row, pos), (f, j)
            np.testing.assert_array_equal(got.context_tokens[i, j], toks)
            np.testing.assert_array_equal(got.context_token_acts[i, j], tok_acts)
    # Logit weights: float32 sums of d_in * D products against float64; each term is at most
    # max|dir| * max|W_U|, so the error stays within a few ulps of d_in * D such terms.
    logits = numpy_logit_weights(params, cfg, sae, hook)
    top_ids = np.argsort(-logits, 1)[:, :5]
    bottom = np.sort(logits, 1)[:, :5]
    atol = 1e-5 * np.abs(logits).max()
    for i, f in enumerate(got.features):
        np.testing.assert_allclose(got.promoted_logit[i], logits[f, top_ids[f]], atol=atol)
        np.testing.assert_allclose(got.promoted_logit[i], logits[f, got.promoted[i]], atol=atol)
        np.testing.assert_allclose(got.suppressed_logit[i], bottom[f], atol=atol)
        np.testing.assert_allclose(got.suppressed_logit[i], logits[f, got.suppressed[i]],
                                   atol=atol)


@pytest.mark.parametrize("batch_size", [1, 25])  # 25: every window in one batch
def test_streamed_top_n_equals_the_all_at_once_top_n(model, batch_size):
    cfg, params = model
    sae = make_sae()
    ids = tokens_with_repeats(400)
    fc = FeaturesConfig(top=None, contexts=5, before=4, after=1, batch_size=batch_size)
    got = feature_stats(params, cfg, sae, ids, fc)
    want, _, _ = numpy_stats(params, cfg, sae, ids, fc)
    # The window repeated as windows 1, 4, 7 and 10 ties with itself: the earliest first.
    tied = 0
    for i, f in enumerate(got.features):
        contexts = want[f]["contexts"]
        assert got.context_count[i] == len(contexts)
        assert [(got.context_act[i, j], got.context_window[i, j], got.context_pos[i, j])
                for j in range(len(contexts))] == [c[:3] for c in contexts], f
        tied += [c[1] for c in contexts[:4]] == [1, 4, 7, 10]
    assert tied >= 3, "the test needs features whose top windows tie"


def test_histogram_is_exact_on_bin_edges_while_its_range_doubles(model):
    """Feature 0 of an SAE on hook_embed reads the embedding's first coordinate, so its
    activations are values we choose: edges of the bins, and a stream whose maximum grows
    batch after batch (0.3, then 1.0 = an edge of the doubled range, then 5.0)."""
    cfg, params = model
    values = np.array([0.1, 0.125, 0.3, 0.25, 0.5, 1.0, 0.75, 5.0, 4.0, 0.0, -1.0, 2.0],
                      np.float32)
    emb = np.zeros((cfg.vocab_size, cfg.emb_dim), np.float32)
    emb[:len(values), 0] = values
    params = {**params, "tok_emb": {"embedding": jnp.asarray(emb)}}
    sae = init_sae(SAEConfig("standard", 32, 2, hook_name="hook_embed"), 0)
    w_enc = np.zeros((32, 2), np.float32)
    w_enc[0, 0] = 1.0
    sae = sae.replace(params={**sae.params, "W_enc": jnp.asarray(w_enc),
                              "b_dec": jnp.zeros(32)})
    ids = np.repeat(np.arange(len(values)), 4)  # 12 windows of 4, one value each
    fc = FeaturesConfig(context_size=4, batch_size=2, top=None, bins=8)
    got = feature_stats(params, cfg, sae, ids, fc)
    row = list(got.features).index(0)
    assert got.max_act[row] == 5.0 and got.hist_range[row] == 8.0
    want = np.histogram(np.repeat(values[values > 0], 4), np.linspace(0, 8.0, 9))[0]
    np.testing.assert_array_equal(got.hist_counts[row], want)
    assert want.tolist() == [4 * 6, 4, 4, 0, 4, 4, 0, 0]  # 1.0 and 2.0 and 4.0 start bins


def test_the_page_shows_the_densest_or_the_listed_features(model):
    cfg, params = model
    sae = make_sae(dead=(5, 9))
    ids = tokens_with_repeats()
    every = feature_stats(params, cfg, sae, ids, FeaturesConfig(top=None))
    top = feature_stats(params, cfg, sae, ids, FeaturesConfig(top=4))
    np.testing.assert_array_equal(top.features, every.features[:4])
    assert top.n_dead == 2 and top.n_scanned == 24
    listed = feature_stats(params, cfg, sae, ids, FeaturesConfig(features=(9, 3, 17)))
    assert sorted(listed.features) == [3, 9, 17] and listed.features[-1] == 9  # dead: last
    assert listed.n_dead == 1 and listed.n_scanned == 3
    for i, f in enumerate(listed.features):
        j = list(every.features).index(f)
        assert listed.density[i] == every.density[j]
        np.testing.assert_array_equal(listed.context_tokens[i], every.context_tokens[j])
    page = features_page(listed)
    assert page.count('<section class="card') == 3
    dead_card = page[page.index('id="f9"'):]
    dead_card = dead_card[:dead_card.index("</section>")]
    assert "dead" in dead_card and "Top contexts" not in dead_card


class FakeTokenizer:
    """Token bytes chosen to break a page that does not escape, or that decodes carelessly."""

    TOKENS = {0: b"<script>alert(1)</script>", 1: b'" onmouseover="x', 2: b"\xf0\x9f",
              3: b"\x98\x80", 4: b"\n", 5: b"  ", 6: b"<|endoftext|>", 7: b"&amp;", 8: b"\x07",
              9: b"a\n\xf0"}
    special_tokens_set = {"<|endoftext|>"}

    def decode_single_token_bytes(self, token):
        return self.TOKENS[token]


def one_feature_stats(tokens, acts, **overrides):
    """A `FeatureStats` of one feature with one context: the tokens and their activations."""
    n = len(tokens)
    fields = dict(
        features=np.array([7]), density=np.array([0.5]), max_act=np.array([max(acts)]),
        hist_counts=np.array([[3, 0, 1, 2]]), hist_range=np.array([4.0]),
        context_act=np.array([[max(acts)]]), context_count=np.array([1]),
        context_window=np.array([[0]]), context_pos=np.array([[0]]),
        context_tokens=np.array([tokens]), context_token_acts=np.array([acts])[None],
        promoted=np.array([[0, 6]]), promoted_logit=np.array([[0.5, 0.25]]),
        suppressed=np.array([[1, 2]]), suppressed_logit=np.array([[-0.5, -0.25]]),
        n_tokens=10, n_windows=1, context_size=n, n_dead=0, n_scanned=1, before=2,
        hook_name='blocks.0.hook_resid_post"><script>', architecture="standard", d_in=32,
        d_sae=8)
    fields["context_tokens"] = fields["context_tokens"][None]
    return features.FeatureStats(**{**fields, **overrides})


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_the_page_escapes_hostile_tokens_and_shows_bytes_whitespace_and_eot():
    stats = one_feature_stats([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0.5, 1, 2, 2, 0, 0, 1, 0, 0, 1])
    page = features_page(stats, FakeTokenizer(), title="<b>t</b>")
    parsed = Tags()
    parsed.feed(page)
    assert [t for t, _ in parsed.tags].count("script") == 0
    assert not any(k.startswith("on") for _, attrs in parsed.tags for k in attrs)
    text = "".join(parsed.text)
    for shown in ("<script>alert(1)</script>", '" onmouseover="x', "\\xf0\\x9f", "\\x98\\x80",
                  "↵", "<|endoftext|>", "&amp;", "\\x07", "<b>t</b>", '"><script>', "a↵\\xf0",
                  "··"):
        assert shown in text, shown  # as text, after the parser unescapes it
    assert any(a.get("class") == "t bytes" for t, a in parsed.tags if t == "span")
    assert any(a.get("class") == "t special" for t, a in parsed.tags if t == "span")
    maxed = [a for t, a in parsed.tags if t == "span" and "max" in a.get("class", "").split()]
    assert len(maxed) == 1 and "\\xf0\\x9f" in page[page.index("t bytes max"):][:200]
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch


def test_emoji_split_across_tokens_shows_its_bytes_with_the_real_tokenizer():
    tokenizer = get_tokenizer()
    ids = tokenizer.encode("hi 😀 <script>")
    partial = [t for t in ids if not _utf8(tokenizer.decode_single_token_bytes(t))]
    assert partial, "the emoji should be split into tokens that are not whole characters"
    page = features_page(one_feature_stats(ids[:9] + [-1] * (9 - len(ids[:9])),
                                           [1.0] * 9, hook_name="x"), tokenizer)
    assert "<script" not in page and "&lt;" in page  # " <", "script", ">": three tokens
    assert page.count("t bytes") == len(partial)
    parsed = Tags()
    parsed.feed(page)
    tips = [a["title"] for t, a in parsed.tags if "bytes" in a.get("class", "")]
    assert len(tips) == len(partial) and all("part of ' 😀'" in tip for tip in tips), tips


def _utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_the_hook_point_is_checked_and_reached():
    sae_cfg = SAEConfig("standard", 32, 8, hook_name="blocks.1.hook_resid_pots")
    with pytest.raises(ValueError, match=r"the closest is 'blocks.1.hook_resid_post'$"):
        FeaturesConfig().check(sae_cfg, CFG)
    with pytest.raises(ValueError, match="attention weights over the keys"):
        FeaturesConfig(hook_name="blocks.0.attn.hook_pattern").check(sae_cfg, CFG)
    with pytest.raises(ValueError, match="d_in is 32, but blocks.0.mlp.hook_post has 128"):
        FeaturesConfig(hook_name="blocks.0.mlp.hook_post").check(sae_cfg, CFG)


@pytest.mark.parametrize("fields, message", [
    ({"bins": 24}, "FeaturesConfig.bins must be a power of two"),
    ({"features": (3, 3)}, "FeaturesConfig.features lists a feature twice"),
    ({"features": ()}, "FeaturesConfig.features must be a non-empty list"),
    ({"contexts": 0}, "FeaturesConfig.contexts must be an int >= 1, got 0"),
    ({"context_size": 1, "prepend_bos": True}, "FeaturesConfig.context_size must be an int >= 2"),
])
def test_features_config_refuses_bad_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        FeaturesConfig(**fields)


def test_features_config_is_checked_against_the_sae_and_the_model():
    sae_cfg = SAEConfig("standard", 32, 8, hook_name="blocks.0.hook_resid_post")
    with pytest.raises(ConfigError, match="features must be below the SAE's d_sae 8, got 8"):
        FeaturesConfig(features=(1, 8)).check(sae_cfg, CFG)
    with pytest.raises(ConfigError, match="context_size must be at most the model's "
                                          "context_length 16"):
        FeaturesConfig(context_size=17).check(sae_cfg, CFG)
    with pytest.raises(ConfigError, match="hook_name must be given"):
        FeaturesConfig().check(sae_cfg.replace(hook_name=None), CFG)


# --- the command ---------------------------------------------------------------------------

@pytest.fixture
def tiny_cli(model, monkeypatch, tmp_path):
    """`jaxgpt sae features` on the tiny model (monkeypatched in), with an SAE folder and a
    text file: (argv before --out, the SAE)."""
    cfg, params = model
    monkeypatch.setattr(features_command, "load_model", lambda args: (cfg, params, "tiny"))
    monkeypatch.setattr(features_command, "peek_config", lambda args: cfg)
    sae = make_sae()
    save_sae(sae, tmp_path / "sae", metadata={"hook_name": sae.cfg.hook_name,
                                              "context_size": 12, "prepend_bos": True})
    text = tmp_path / "text.txt"
    text.write_text("Every effort moves you forward. <script>alert(1)</script> 😀\n" * 20)
    return ["sae", "features", "--sae", str(tmp_path / "sae"), "--text-file", str(text)], sae


def test_the_command_writes_the_page_as_the_sae_was_trained(tiny_cli, tmp_path, capsys):
    argv, sae = tiny_cli
    out = tmp_path / "f.html"
    assert cli.main([*argv, "--out", str(out), "--top", "5", "--batch-size", "3"]) == 0
    page = out.read_text()
    assert page.count('<section class="card') == 5 and "<script" not in page
    assert "windows of 12" in page  # the metadata's context_size, <|endoftext|> first
    err = capsys.readouterr().err
    assert "windows of 12 led by <|endoftext|>" in err and f"wrote {out}" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temps


def test_every_flag_reaches_its_features_config_field():
    argv = ["sae", "features", "--sae", "x", "--hook", "h", "--context-size", "9",
            "--batch-size", "3", "--max-tokens", "50", "--prepend-bos", "--top", "7",
            "--features", "1,2", "--contexts", "3", "--before", "2", "--after", "1", "--bins",
            "8", "--logit-tokens", "4"]
    fc = features_command._config(cli.build_parser().parse_args(argv))
    assert fc == FeaturesConfig("h", 9, 3, 50, True, 7, (1, 2), 3, 2, 1, 8, 4)
    changed = [f.name for f in dataclasses.fields(fc) if getattr(fc, f.name) != f.default]
    assert changed == [f.name for f in dataclasses.fields(fc)]  # a flag for every field
    assert features_command._config(cli.build_parser().parse_args(argv[:4])) \
        == FeaturesConfig()  # no flags: the config's defaults (those from the SAE: later)


def write_folder(tmp_path, name, architecture="standard", d_in=32, hook="blocks.0.hook_resid_post"):
    sae = make_sae(hook, 32)
    folder = save_sae(sae, tmp_path / name, metadata={"hook_name": hook})
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(architecture=architecture, d_in=d_in)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return str(folder)


def test_the_command_refuses_bad_input_in_one_line(tiny_cli, tmp_path, capsys):
    argv, _ = tiny_cli
    out = ["--out", str(tmp_path / "f.html")]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cases = [
        (["--hook", "blocks.0.hook_resid_pots"],
         r"'blocks.0.hook_resid_pots' is not a hook point of this model \(2 layers\); the "
         "closest is 'blocks.0.hook_resid_post'"),
        (["--hook", "blocks.0.mlp.hook_post"],
         "the SAE's d_in is 32, but blocks.0.mlp.hook_post has 128 values per token"),
        (["--sae", str(model_dir)], "is not an sae-lens SAE folder"),
        (["--sae", write_folder(tmp_path, "gated", "gated")],
         "architecture 'gated' is not one jaxgpt reads"),
        (["--sae", write_folder(tmp_path, "wide", d_in=48)], "W_enc has shape"),
        (["--features", "3,40"], "--features must be below the SAE's d_sae 24, got 40"),
        (["--bins", "12"], "--bins must be a power of two"),
        (["--context-size", "17"], "--context-size must be at most the model's context_length"),
        (["--out", str(tmp_path / "f.png")], "--out .* must end in .html"),
        (["--text-file", str(tmp_path / "none.txt")], "--text-file .* does not exist"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, *out, *extra])
        msg = str(e.value.code)
        assert msg.startswith("jaxgpt sae features: ") and "\n" not in msg, msg
        assert re.search(message, msg), (extra, msg)
    assert not (tmp_path / "f.html").exists()
    assert "reading" not in capsys.readouterr().err  # refused before the model ran


# --- a real browser ------------------------------------------------------------------------

def chromium(page, tmp_path, *flags):
    """Run headless Chromium on the file `page` with console messages logged: (its stdout,
    the console messages it logged)."""
    if not os.path.exists(CHROMIUM):  # under CI=true: .ci/run installs it
        pytest.fail(f"no {CHROMIUM}: apt-get install chromium (bash .ci/run does)")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", "--hide-scrollbars", *flags, page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_renders_in_chromium_with_its_cards_and_no_console_errors(model, tmp_path):
    cfg, params = model
    tokenizer = get_tokenizer()
    text = "Every effort moves you. <script>alert('x')</script> naïve 😀 café\n\tend " * 30
    ids = np.asarray(tokenizer.encode(text + "<|endoftext|>", allowed_special="all"))
    stats = feature_stats(params, cfg, make_sae(dead=(5,)), ids,
                          FeaturesConfig(features=(5, 0, 1, 2, 3, 4, 6)))
    page = features.write_features_page(stats, tmp_path / "features.html")
    dom, console = chromium(page, tmp_path, "--dump-dom")
    assert console == [], console
    cards = Tags()
    cards.feed(dom)
    ids_in_dom = [a["id"] for t, a in cards.tags if t == "section"]
    assert sorted(ids_in_dom) == sorted(f"f{f}" for f in stats.features)
    assert not any(t == "script" for t, _ in cards.tags)
    shot = tmp_path / "features.png"
    _, console = chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    assert console == [] and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("JAXGPT_FEATURES_SCREENSHOT"):  # to look at it
        shutil.copy(shot, os.environ["JAXGPT_FEATURES_SCREENSHOT"])
    # Positive control: the same reading of the log catches a page's console error and a
    # script the policy blocks.
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("</main>", "</main><script>nope()</script>"))
    _, console = chromium(bad, tmp_path, "--dump-dom")
    assert any("Content Security Policy" in line for line in console), console
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); nope()</script>")
    _, console = chromium(bad, tmp_path, "--dump-dom")
    assert any("boom" in line for line in console) and any("Uncaught" in line for line in console)
