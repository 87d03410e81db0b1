"""The byte-level Transformer: decoder-only, pre-norm, written on torch primitives.

LLaMA-style blocks (RMSNorm, rotary position embeddings, a SiLU-gated MLP, no biases) with the token
embedding tied to the output head and GPT-2's residual-scaled init. Layout and naming follow nanoGPT
`model.py` and gpt-fast `model.py`.

`Transformer.forward(ids, cache=None, adapters=None)` is the one entry for training, prefill and
decode. The model knows nothing of how caches compress or how adapters are stored; it talks to them
through two small protocols:

* cache: `cache.update(layer, q, k, v, rotary) -> (q, k, v, attn_mask)` takes this step's queries,
  keys and values *before* rotary embedding, (B, nh, T, hs) each, and returns the rotated queries,
  every key/value the step attends to (rotated keys), and a boolean mask (True = attend)
  broadcastable to (B, nh, T, S), or None for "causal over all S". The cache owns positions, so a
  policy that evicts or moves tokens re-rotates keys by their new slots. After the last layer the
  model calls `cache.advance(T)`.
* adapters: `adapters(key, x, y) -> y'` returns the output `y` of linear module `key` (its path in
  `named_modules()`, e.g. "layers.0.attn.q_proj") on input `x` plus the adapter's contribution.

Under CPU autocast the causal attention of a training forward runs in float32 (`causal_attention`):
torch's bf16 attention backward on CPU is slower than float32, while the linears around it gain from
bf16 (measured in the README's training section), so autocast applies to the linears alone.

Quantization swaps `nn.Linear` modules for quantized ones from outside (h2q/quant.py); the names and
the adapter keys stay the same.

The base's identity is declared on the Transformer, never added ad hoc: `fingerprint` (the name of the
float weights that adapters record, `base_fingerprint()`) and `quant_scheme` (how h2q/quant.py
compressed them, None for a float model). Whoever changes the weights keeps them true: checkpoint
load/save and quantize set them, a LoRA merge clears the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from h2q.config import ModelConfig

SPLIT_ROWS = 4  # up to here the split wins; at 8+ rows F.linear's matrix-matrix kernels are as fast


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear without bias, with a faster path for decoding on CPU. For a few rows, MKL runs the
    product as matrix-vector kernels that read weights from memory at ~8 GB/s (measured on the small
    model's 20 MB of weights: 2.5 ms per token). Splitting the weight into two row blocks makes it a
    batched matmul that streams them ~2-3x faster, on one core or two (scripts/bench_kv.py times it)."""
    rows = x.numel() // x.shape[-1]
    if rows > SPLIT_ROWS or x.device.type != "cpu" or weight.shape[0] % 2:
        return F.linear(x, weight)
    blocks = weight.view(2, -1, weight.shape[1])  # (2, N/2, K)
    y = torch.bmm(blocks, x.reshape(rows, -1).T.expand(2, -1, -1))  # (2, N/2, rows)
    return y.permute(2, 0, 1).reshape(*x.shape[:-1], weight.shape[0])  # (..., N)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA over (B, nh, T, hs) tensors; in float32 under CPU autocast (module docstring)."""
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)


class Linear(nn.Linear):
    """nn.Linear (no bias here) through `linear`; quantization swaps it like any nn.Linear."""

    def forward(self, x):
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), GPT-NeoX half-split layout, angles computed from
    positions on the fly, so any position (also per row, for ragged batches) is allowed."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, pos: torch.Tensor):
        """pos: (T,) or (B, T) integer positions -> cos, sin of shape (1 or B, 1, T, hs/2)."""
        angles = pos.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (..., T, hs/2)
        if angles.dim() == 2:
            angles = angles.unsqueeze(0)
        angles = angles.unsqueeze(1)  # (B, 1, T, hs/2)
        return angles.cos(), angles.sin()

    @staticmethod
    def rotate(x, cos, sin):
        """x: (B, nh, T, hs) -> x rotated by the angles in cos/sin (each (.., T, hs/2)).
        [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], written as x * [cos, cos] + roll(x) * [-sin, sin]:
        two fused multiplies over x instead of chunk/cat, about 2x faster forward and backward."""
        cos2 = torch.cat((cos, cos), dim=-1)  # (.., T, hs): tables are small next to x
        sin2 = torch.cat((-sin, sin), dim=-1)
        return (x * cos2 + x.roll(x.shape[-1] // 2, dims=-1) * sin2).type_as(x)

    def forward(self, x, pos):
        return self.rotate(x, *self.cos_sin(pos))


class AdaptedLinears(nn.Module):
    """A module whose linears may carry adapters: `_linear` runs one and lets `adapters` add to it."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix  # the linears' path in named_modules(), the adapters' key

    def _linear(self, name, x, adapters):
        y = getattr(self, name)(x)
        return y if adapters is None else adapters(self.prefix + name, x, y)


class Attention(AdaptedLinears):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(f"layers.{layer}.attn.")
        self.layer, self.n_head, self.head_dim = layer, cfg.n_head, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, rotary, cos_sin, cache, adapters):
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q = heads(self._linear("q_proj", x, adapters))
        k = heads(self._linear("k_proj", x, adapters))
        v = heads(self._linear("v_proj", x, adapters))
        if cache is None:
            q, k = rotary.rotate(q, *cos_sin), rotary.rotate(k, *cos_sin)
            y = causal_attention(q, k, v)
        else:
            q, k, v, mask = cache.update(self.layer, q, k, v, rotary)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self._linear("o_proj", y, adapters)


class MLP(AdaptedLinears):
    """SiLU-gated MLP (SwiGLU, Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(f"layers.{layer}.mlp.")
        self.gate_proj = Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x, adapters):
        h = F.silu(self._linear("gate_proj", x, adapters)) * self._linear("up_proj", x, adapters)
        return self._linear("down_proj", h, adapters)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x, rotary, cos_sin, cache, adapters):
        x = x + self.attn(self.attn_norm(x), rotary, cos_sin, cache, adapters)
        return x + self.mlp(self.mlp_norm(x), adapters)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        # identity of the base (see the module docstring): the recorded fingerprint of the float
        # weights, None = compute it from them; the h2q.quant.QuantScheme, None = float weights
        self.fingerprint: str | None = None
        self.quant_scheme = None
        self.reset_parameters()

    def reset_parameters(self):
        """N(0, 0.02) everywhere; the projections that write into the residual stream are scaled
        down by sqrt(2 * n_layer) so the stream's variance does not grow with depth (GPT-2)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * self.config.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, ids: torch.Tensor, cache=None, adapters=None) -> torch.Tensor:
        """ids: (B, T) token ids -> logits (B, T, vocab_size)."""
        B, T = ids.shape
        cos_sin = None
        if cache is None:
            assert T <= self.config.context_len, f"sequence of {T} > context {self.config.context_len}"
            cos_sin = self.rotary.cos_sin(torch.arange(T, device=ids.device))
        x = self.embed(ids)  # (B, T, C)
        for block in self.layers:
            x = block(x, self.rotary, cos_sin, cache, adapters)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return linear(x, self.embed.weight)  # tied output head, (B, T, vocab_size)

    def base_fingerprint(self) -> str:
        """The base's identity, which adapters record: the recorded `fingerprint` (a quantized model
        keeps its float model's), else sha256 over the config and the float weights, 16 hex digits.
        A computed one is not recorded, so weights that train on are hashed afresh each time."""
        if self.fingerprint is not None:
            return self.fingerprint
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 2 per weight and multiply-add forward, plus
        attention scores and weighted sum (2 * 2 * n_layer * T * d_model, causal halving ignored as
        in nanoGPT's MFU). Training counts forward + backward = 3x forward."""
        cfg = self.config
        T = seq_len or cfg.context_len
        n_matmul = self.num_params()  # embedding is used as the output head: a real matmul
        forward = 2 * n_matmul + 4 * cfg.n_layer * T * cfg.d_model
        return 3 * forward if training else forward
