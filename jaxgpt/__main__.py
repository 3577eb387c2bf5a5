"""`python -m jaxgpt`: the `jaxgpt` command."""

from jaxgpt.cli import entry

entry()
