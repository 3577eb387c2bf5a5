"""`jaxgpt sae`: sparse autoencoders on the model; one module per subcommand."""

from __future__ import annotations

from typing import Any

from jaxgpt.cli import sae_features


def add(sub: Any) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders (sae-lens's folders) on the model")
    commands = p.add_subparsers(dest="sae_command", required=True)
    sae_features.add(commands)
