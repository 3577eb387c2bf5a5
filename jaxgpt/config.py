"""Model configuration: the book's GPT_CONFIG dict as a frozen, hashable dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The book's 124M dict, kept verbatim so `GPTConfig(**GPT_CONFIG_124M)` reads like the book.
GPT_CONFIG_124M: dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

# name -> (emb_dim, n_layers, n_heads); everything else as in GPT_CONFIG_124M.
_PRESET_SIZES: dict[str, tuple[int, int, int]] = {
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
PRESETS: tuple[str, ...] = tuple(_PRESET_SIZES)


class ConfigError(ValueError):
    """A config field's bad value, said as `Owner.field <rule>, got <value>`.

    The parts are kept (`owner`, `field`, `rule`, `value`; `has_value` is False where the rule
    says the value itself) so that the command line can say the same of the flag that set the
    field, with the value typed there (`jaxgpt.cli.common.flag_error`). A rule that names
    another field names it as `Owner.other`.
    """

    def __init__(self, owner: str, field: str, rule: str, *value: Any):
        self.owner, self.field, self.rule = owner, field, rule
        self.has_value = bool(value)
        self.value = value[0] if value else None
        super().__init__(f"{owner}.{field} {rule}" + (f", got {self.value!r}" if value else ""))


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT model, with the book's key names.

    Frozen, so it is hashable and can be a Flax module field or a static jit argument.
    `tie_embeddings=True` makes the output head reuse the token embedding (as OpenAI's
    GPT-2 checkpoints do); the book's model, and so the default, keeps them separate.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GPTConfig.{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {value}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by "
                f"GPTConfig.n_heads ({self.n_heads})"
            )
        rate = self.drop_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {rate!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A GPT-2 size by name (`gpt2-small`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`)."""
        if name not in _PRESET_SIZES:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        emb_dim, n_layers, n_heads = _PRESET_SIZES[name]
        fields = dict(GPT_CONFIG_124M, emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """Build from a dict with the book's keys; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)
