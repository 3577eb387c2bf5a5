"""The picture of a features page in the docs (docs/images/sae_features.png), made offline.

    python scripts/features_screenshot.py [--out docs/images/sae_features.png]

Random weights of `jaxgpt train`'s demo config and an SAE built, not trained: feature f reads
the direction of one frequent token's embedding (`W_enc[:, f]`, unit norm; `b_enc` half that
token's own projection, so the feature fires on that token and on little else), its decoder
the same direction. After one block the residual stream of a random model is still mostly the
token's embedding, so each card shows its token, shaded, in the contexts of the demo corpus
(Python's help topics): what the page looks like, not a finding. The page is written beside
the picture's temporary profile and rendered by headless Chromium (/usr/bin/chromium); the
PNG is reduced to 64 colours to keep the repository small.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax.numpy as jnp
import numpy as np

from jaxgpt.nn.model import init_params
from jaxgpt.sae.features import FeaturesConfig, feature_stats, write_features_page
from jaxgpt.sae.model import SAEConfig, init_sae
from jaxgpt.training.config import DEMO_CONFIG
from jaxgpt.training.data import demo_corpus, tokenize_text

HOOK = "blocks.0.hook_resid_post"


def token_sae(params: dict, tokens: np.ndarray, d_sae: int) -> object:
    """An SAE whose feature f reads the embedding direction of the f-th most frequent token
    among `tokens` (after the 20 most frequent, mostly whitespace and punctuation)."""
    ids, counts = np.unique(tokens, return_counts=True)
    chosen = ids[np.argsort(-counts)][20:20 + d_sae]
    emb = np.asarray(params["tok_emb"]["embedding"])[chosen]  # [F, D]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sae = init_sae(SAEConfig("standard", DEMO_CONFIG.emb_dim, d_sae, hook_name=HOOK), 0)
    own = (emb * unit).sum(1)  # each token's embedding projected on its own direction
    return sae.replace(params={**sae.params, "W_enc": jnp.asarray(unit.T),
                               "b_enc": jnp.asarray(-0.5 * own), "W_dec": jnp.asarray(unit)})


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    """Render `page` with headless Chromium into `png`; stop if it logged a console message."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
             f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    if proc.returncode or console:
        raise SystemExit(f"chromium: exit {proc.returncode}; {console or proc.stderr[-500:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/images/sae_features.png")
    p.add_argument("--tokens", type=int, default=20000, help="tokens of the demo corpus read")
    args = p.parse_args()
    from PIL import Image

    params = init_params(DEMO_CONFIG, 0)
    tokens = tokenize_text(demo_corpus())[:args.tokens]
    sae = token_sae(params, tokens, 32)
    stats = feature_stats(params, DEMO_CONFIG, sae, tokens,
                          FeaturesConfig(top=8, contexts=8, before=10, after=4))
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        page = write_features_page(stats, Path(tmp) / "features.html",
                                   title=f"SAE features at {HOOK} (random weights, built SAE)")
        screenshot(page, Path(tmp) / "shot.png", 1100, 1000)
        Image.open(Path(tmp) / "shot.png").convert("RGB").quantize(64).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size:,} bytes): features "
          f"{', '.join(map(str, stats.features))}")


if __name__ == "__main__":
    main()
