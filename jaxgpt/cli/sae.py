"""`jaxgpt sae`: sparse autoencoders on the model's activations, as sae-lens makes them.

Each subcommand is a module `jaxgpt.cli.sae_<name>` with `add(sub)` and `run(args)`,
registered here in one line.
"""

from __future__ import annotations

from typing import Any

from jaxgpt.cli import sae_eval, sae_features, sae_train


def add(sub: Any) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders on the activations, as sae-lens makes them")
    commands = p.add_subparsers(dest="sae_command", required=True)
    sae_train.add(commands)
    sae_eval.add(commands)
    sae_features.add(commands)
