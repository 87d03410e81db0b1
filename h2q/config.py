"""Model configuration: one typed dataclass and a small dict of named presets.

Follows gpt-fast's `ModelArgs` + `transformer_configs`: a checkpoint stores `asdict(config)` in its
metadata, so `ModelConfig.from_dict` rebuilds the model without any other input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from h2q.tokenizer import VOCAB_SIZE


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
    def from_dict(cls, d: dict) -> "ModelConfig":
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
