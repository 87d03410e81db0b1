"""Configuration: the model's typed dataclass with a small dict of named presets, and `option`, the
field helper of every run config.

`ModelConfig` follows gpt-fast's `ModelArgs` + `transformer_configs`: a checkpoint stores
`asdict(config)` in its metadata, so `ModelConfig.from_dict` rebuilds the model without any other input.

Run configs (training, inference, evolution, worlds) are dataclasses whose fields are made with
`option(default, help, ...)`: the help text, the allowed choices and the allowed range live next to
the field. `check_options(config)`, called from each config's `__post_init__`, enforces them (numbers
finite, inside their range, choices among theirs) and raises `ConfigError` naming the field; the CLI
(h2q/cli.py) builds one flag per field from the same metadata, so `--help` shows each range.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from h2q.errors import ConfigError
from h2q.tokenizer import VOCAB_SIZE


def option(default, help: str, *, choices=None, at_least=None, above=None, at_most=None, below=None,
           metavar: str | None = None, cli: bool = True):
    """A dataclass field with its help text, choices and range (bounds inclusive: at_least / at_most;
    exclusive: above / below). None as a value always passes: it means "not set"."""
    bounds = {k: v for k, v in dict(at_least=at_least, above=above, at_most=at_most, below=below).items()
              if v is not None}
    meta = {"help": help, "choices": list(choices) if choices is not None else None, "bounds": bounds,
            "metavar": metavar, "cli": cli}
    return field(default=default, metadata=meta)


def range_text(bounds: dict) -> str:
    """'>= 1', '> 0 and <= 1', ... for help texts and messages."""
    signs = {"at_least": ">=", "above": ">", "at_most": "<=", "below": "<"}

    def number(v) -> str:
        if isinstance(v, int) and v >= 2**32 and (v & (v - 1)) == 0:
            return f"2^{v.bit_length() - 1}"  # seeds: < 2^63, not a 19-digit number
        return f"{v:g}" if isinstance(v, float) else str(v)

    return " and ".join(f"{signs[k]} {number(v)}" for k, v in bounds.items())


def check_options(config) -> None:
    """Every `option` field of `config` finite (ints within 64 bits), in its range and among its choices,
    else ConfigError."""
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None or isinstance(value, bool):
            continue
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds") or {}
        if choices is not None and value not in choices:
            raise ConfigError(f.name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        if not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")
        low_ok = value >= bounds.get("at_least", -math.inf) and value > bounds.get("above", -math.inf)
        high_ok = value <= bounds.get("at_most", math.inf) and value < bounds.get("below", math.inf)
        if not (low_ok and high_ok):
            raise ConfigError(f.name, f"must be {range_text(bounds)}, got {value}")
        if isinstance(value, int) and not -2**63 <= value < 2**63:  # past what a tensor or a C int holds
            raise ConfigError(f.name, f"must be < 2^63, got {value}")


def option_default(f):
    """The default of a dataclass field (its factory's product for mutable defaults)."""
    return f.default if f.default is not MISSING else f.default_factory()


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 256
    context_len: int = 512
    mlp_hidden: int = 768  # gated MLP width; ~8/3 d_model rounded to a multiple of 64 (LLaMA)
    vocab_size: int = VOCAB_SIZE
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("head size must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # for tests: trains in seconds
    "tiny": ModelConfig(n_layer=2, n_head=2, d_model=32, context_len=64, mlp_hidden=96),
    # ~0.9M parameters: quick CPU runs
    "mini": ModelConfig(n_layer=4, n_head=4, d_model=128, context_len=256, mlp_hidden=384),
    # the shape of the project's original design: d_model 256, 6 layers, 8 heads, context 512
    "small": ModelConfig(n_layer=6, n_head=8, d_model=256, context_len=512, mlp_hidden=768),
    # ~27M parameters: for a GPU
    "base": ModelConfig(n_layer=8, n_head=8, d_model=512, context_len=1024, mlp_hidden=1536),
}
