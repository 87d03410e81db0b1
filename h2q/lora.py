"""LoRA adapters of our own: one adapter, a stacked bank of many, and the arithmetic on them.

Low-rank adaptation (Hu et al. 2021, "LoRA"): a frozen linear W gets a trainable update
`y = W x + s * B A x` with A (r, in), B (out, r) and s = alpha / r, or alpha / sqrt(r) with rsLoRA
(Kalajdzievski 2023). A is Kaiming-uniform and B zero, as in loralib / litgpt's LoRALinear, so a fresh
adapter changes nothing. Adapters never touch the model's modules: they plug into `Transformer.forward`
through the adapter protocol `adapters(key, x, y) -> y + delta` (h2q/model.py), and never read
`module.weight` there, so they work unchanged over a quantized base (h2q/quant.py).

* `LoraAdapter`: one adapter, an nn.Module whose `parameters()` are exactly its A and B tensors.
  `merge(model)` / `unmerge()` fold it into a float base for zero-overhead inference; explicit,
  idempotent and tracked, never a side effect of train()/eval() (unlike loralib).
* `AdapterBank`: N adapters stacked per target, A (N, r, in) and B (N, out, r). `bank.bind(index)`
  is the `adapters` callable for a batch whose row b uses adapter index[b] (-1: base only), computed
  in one pass as gathers and batched matmuls, the idea of Punica / S-LoRA's BGMV kernel. One
  optimizer over the bank trains all N adapters in one backward; rows only reach their own adapter.
* Arithmetic, every result a new adapter sharing no storage with its inputs: `linear_combination`,
  `average_factors`, `add`, `difference` (task vectors, Ilharco et al. 2023) act on A and B separately;
  `merge_product_space` merges the actual updates s*B@A exactly and re-factorises to rank r. Evolution's
  own operators (mutation, crossover) are in h2q/evolve/evolution.py; the adapter files (PEFT's
  layout) are in h2q/checkpoint.py (`save_adapter`, `load_adapter`).

Averaging factors is not averaging updates: mean(B) @ mean(A) adds cross terms B_i A_j, so two adapters
trained apart average to something neither learned. Evolution therefore merges parents with
`merge_product_space` by default: it is exact up to the rank cut and cheap here (QR of the stacked
factors, then an SVD of a small (k r, k r) core, never of a full (out, in) matrix). `average_factors` is
the fast approximation for close relatives (a child and its recent ancestors share A almost exactly).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from h2q.config import ModelConfig, check_options, option
from h2q.errors import ConfigError, H2QError
from h2q.model import Transformer

# target name -> (block part, input width, output width) as ModelConfig field names
LINEARS = {
    "q_proj": ("attn", "d_model", "d_model"), "k_proj": ("attn", "d_model", "d_model"),
    "v_proj": ("attn", "d_model", "d_model"), "o_proj": ("attn", "d_model", "d_model"),
    "gate_proj": ("mlp", "d_model", "mlp_hidden"), "up_proj": ("mlp", "d_model", "mlp_hidden"),
    "down_proj": ("mlp", "mlp_hidden", "d_model"),
}


@dataclass(frozen=True)
class LoraConfig:
    r: int = option(8, "LoRA rank", at_least=1)
    alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)", above=0)
    dropout: float = option(0.0, "dropout on the adapter's input while training", at_least=0, below=1)
    targets: str = option(",".join(LINEARS), "comma-separated linear names to adapt")
    rslora: bool = option(False, "rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023)")

    def __post_init__(self):
        names = self.targets.split(",") if isinstance(self.targets, str) else list(self.targets)
        names = [n.strip() for n in names if n.strip()]
        unknown = sorted(set(names) - set(LINEARS))
        if unknown or not names:
            raise ConfigError("targets", f"{unknown or 'none'} are not linears of this model; choose from "
                              f"{','.join(LINEARS)}")
        object.__setattr__(self, "targets", ",".join(n for n in LINEARS if n in names))  # model order
        check_options(self)

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(self.targets.split(","))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def target_shapes(cfg: ModelConfig, targets) -> dict[str, tuple[int, int]]:
    """Module key -> (in_features, out_features) for every targeted linear, in model order. Taken from
    the config, not from the modules, so quantized modules need no particular attributes."""
    shapes = {}
    for layer in range(cfg.n_layer):
        for name, (part, fan_in, fan_out) in LINEARS.items():
            if name in targets:
                shapes[f"layers.{layer}.{part}.{name}"] = (getattr(cfg, fan_in), getattr(cfg, fan_out))
    return shapes


def check_rank(cfg: ModelConfig, r: int, targets=tuple(LINEARS), field: str = "lora_rank") -> None:
    """A rank above the narrowest adapted linear (min of its in and out features) adds parameters and
    memory but no rank: refused, naming `field` (the flag that set it)."""
    limit = min(min(shape) for shape in target_shapes(cfg, targets).values())
    if r > limit:
        raise ConfigError(field, f"must be at most {limit} for this model (the narrowest adapted linear's width; "
                                 f"a higher rank adds no rank), got {r}")


class _LoraFactors(nn.Module):
    """Storage shared by one adapter (lead=()) and a bank (lead=(N,)): per target key, A (*lead, r, in)
    and B (*lead, out, r) in two ParameterLists, so `parameters()` is exactly the adapter tensors."""

    def __init__(self, base: Transformer | ModelConfig, config: LoraConfig, lead: tuple[int, ...],
                 generator: torch.Generator | None, init: bool):
        super().__init__()
        self.config = config
        self.base_config = base if isinstance(base, ModelConfig) else base.config
        self.shapes = target_shapes(self.base_config, config.target_names)
        if isinstance(base, Transformer):
            missing = sorted(set(self.shapes) - dict(base.named_modules()).keys())
            assert not missing, f"model lacks the linears {missing[:3]}"
        self.slot = {key: i for i, key in enumerate(self.shapes)}
        r = config.r
        A = [torch.zeros(*lead, r, fan_in) for fan_in, _ in self.shapes.values()]
        B = [torch.zeros(*lead, fan_out, r) for _, fan_out in self.shapes.values()]
        if init:
            for a in A:
                for one in a.view(-1, r, a.shape[-1]):  # (r, in) per adapter: fan_in must be `in`
                    nn.init.kaiming_uniform_(one, a=math.sqrt(5), generator=generator)
        device = base.embed.weight.device if isinstance(base, Transformer) else None
        self.lora_A = nn.ParameterList(nn.Parameter(a.to(device)) for a in A)
        self.lora_B = nn.ParameterList(nn.Parameter(b.to(device)) for b in B)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def _dropout(self, x):
        return F.dropout(x, self.config.dropout, self.training) if self.config.dropout else x


class LoraAdapter(_LoraFactors):
    """One adapter; `model(ids, adapters=adapter)` runs the base with it. `base` is the model (the
    adapter is put on its device and checked against its modules) or just its ModelConfig. init=False
    leaves A zero too, for tensors about to be filled in (loading, arithmetic)."""

    def __init__(self, base: Transformer | ModelConfig, config: LoraConfig = LoraConfig(),
                 generator: torch.Generator | None = None, init: bool = True):
        super().__init__(base, config, (), generator, init)
        self._merged_into = None  # weakref to the model this adapter is folded into
        self._unmerged_fingerprint = None  # that model's fingerprint before the merge
        self._merged_versions: list[int] = []  # its weights' version counters right after the merge

    def forward(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        i = self.slot.get(key)
        if i is None or self._merged_into is not None:  # merged: W already holds the update
            return y
        h = F.linear(self._dropout(x), self.lora_A[i].to(x.dtype)) * self.scaling  # (..., r)
        return y.add_(F.linear(h, self.lora_B[i].to(h.dtype)))  # in place: see BoundBank

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys, e.g. 'layers.0.attn.q_proj.lora_A'."""
        out = {}
        for key, i in self.slot.items():
            out[f"{key}.lora_A"], out[f"{key}.lora_B"] = self.lora_A[i], self.lora_B[i]
        return out

    def delta(self, key: str) -> torch.Tensor:
        """The update this adapter adds to linear `key`'s weight: s * B @ A, (out, in), fp32."""
        i = self.slot[key]
        return self.scaling * (self.lora_B[i].float() @ self.lora_A[i].float())

    def clone(self) -> LoraAdapter:
        child = LoraAdapter(self.base_config, self.config, init=False).to(self.lora_A[0].device)
        with torch.no_grad():
            for mine, theirs in zip(child.parameters(), self.parameters()):
                mine.copy_(theirs)
        return child

    # -- merge --------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged_into is not None

    def merge(self, model: Transformer) -> None:
        """Add s*B@A into `model`'s float weights; merging again is a no-op. While merged, calling the
        adapter adds nothing (the weights hold it), and its tensors must not be changed. The model is
        another base now: its recorded fingerprint is cleared (computed from the merged weights)."""
        if self._merged_into is not None:
            if self._merged_into() is not model:
                raise ValueError("adapter is merged into another model; unmerge it first")
            return
        weights = self._float_weights(model)
        with torch.no_grad():
            for key, w in weights.items():
                w.add_(self.delta(key).to(w.device, w.dtype))
        self._merged_into = weakref.ref(model)
        self._unmerged_fingerprint = model.fingerprint
        model.fingerprint = None
        self._merged_versions = _weight_versions(model)

    def unmerge(self) -> None:
        """Subtract the update again (equal to the original weights up to float rounding); a no-op
        when not merged. The model gets its fingerprint from before the merge back, unless something
        else (another merge, an optimizer step) changed its weights in the meantime."""
        model = self._merged_into() if self._merged_into is not None else None
        if model is not None:
            untouched = _weight_versions(model) == self._merged_versions
            with torch.no_grad():
                for key, w in self._float_weights(model).items():
                    w.sub_(self.delta(key).to(w.device, w.dtype))
            model.fingerprint = self._unmerged_fingerprint if untouched else None
        self._merged_into = None

    def _float_weights(self, model: Transformer) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        weights = {}
        for key in self.slot:  # check every module before changing any
            module = modules.get(key)
            if not isinstance(module, nn.Linear) or not module.weight.is_floating_point():
                raise H2QError(f"cannot merge a LoRA adapter into {key} ({type(module).__name__}): it has no "
                                f"float weight (a quantized base?); run the adapter unmerged via "
                                f"model(ids, adapters=adapter), or merge into the float base")
            weights[key] = module.weight
        return weights


def _weight_versions(model: Transformer) -> list[int]:
    """Every parameter's in-place version counter: equal lists mean no weight changed in between."""
    return [p._version for p in model.parameters()]


def freeze_base(model: Transformer) -> Transformer:
    """Stop gradients into every base weight, so a backward only reaches adapter tensors."""
    return model.requires_grad_(False)


def count_bytes(adapter: nn.Module) -> int:
    """Bytes of an adapter's (or a bank's) tensors."""
    return sum(p.numel() * p.element_size() for p in adapter.parameters())


class AdapterBank(_LoraFactors):
    """N adapters stacked per target: lora_A[j] is (N, r, in), lora_B[j] is (N, out, r) for key j."""

    def __init__(self, base: Transformer | ModelConfig, config: LoraConfig, n: int,
                 generator: torch.Generator | None = None, init: bool = True):
        if n < 1:
            raise ValueError(f"a bank holds at least one adapter, got n={n}")
        super().__init__(base, config, (n,), generator, init)
        self.n = n

    def __len__(self) -> int:
        return self.n

    @classmethod
    def from_adapters(cls, adapters: list[LoraAdapter]) -> AdapterBank:
        check_compatible(adapters)
        bank = cls(adapters[0].base_config, adapters[0].config, len(adapters), init=False)
        bank = bank.to(adapters[0].lora_A[0].device)
        with torch.no_grad():
            for i, adapter in enumerate(adapters):
                bank.set_adapter(i, adapter)
        return bank

    def adapter(self, i: int) -> LoraAdapter:
        """A copy of slot i as a single adapter."""
        one = LoraAdapter(self.base_config, self.config, init=False).to(self.lora_A[0].device)
        with torch.no_grad():
            for mine, stacked in zip(one.parameters(), self.parameters()):
                mine.copy_(stacked[i])
        return one

    def set_adapter(self, i: int, adapter: LoraAdapter) -> None:
        """Write a single adapter's tensors into slot i (in place; the bank's optimizer state for that
        slot is the caller's to reset)."""
        check_compatible([self, adapter])
        with torch.no_grad():
            for stacked, theirs in zip(self.parameters(), adapter.parameters()):
                stacked[i].copy_(theirs)

    def bind(self, index) -> BoundBank:
        """The `adapters` callable for a batch: row b uses slot index[b], -1 = the base alone."""
        return BoundBank(self, index)


class BoundBank:
    """Batched multi-adapter LoRA (BGMV-style): per linear, gather each row's A and B, then two bmm's,
    x (B, T, in) @ A^T (B, in, r) @ B^T (B, r, out), the second accumulating into y in place
    (baddbmm_). No per-row weight delta is formed. Rows with index -1 gather slot 0 and are scaled by exactly 0, so
    they add nothing and send no gradient to slot 0."""

    def __init__(self, bank: AdapterBank, index):
        index = torch.as_tensor(index, dtype=torch.long, device=bank.lora_A[0].device)
        if index.dim() != 1 or (index.numel() and not -1 <= int(index.min()) <= int(index.max()) < bank.n):
            raise ValueError(f"index must be a 1-D list of slots in [-1, {bank.n}), got {index.tolist()}")
        self.bank = bank
        self.rows = index.clamp(min=0)
        self.row_scale = ((index >= 0).float() * bank.scaling).view(-1, 1, 1)  # (B, 1, 1)

    def __call__(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        j = self.bank.slot.get(key)
        if j is None:
            return y
        assert x.shape[0] == self.rows.shape[0], f"batch of {x.shape[0]} rows bound to {self.rows.shape[0]} slots"
        A = self.bank.lora_A[j].index_select(0, self.rows).to(x.dtype)  # (B, r, in)
        B = self.bank.lora_B[j].index_select(0, self.rows)  # (B, out, r)
        h = torch.bmm(self.bank._dropout(x), A.transpose(1, 2)) * self.row_scale.to(x.dtype)  # (B, T, r)
        # accumulate into the linear's fresh output y rather than copy it (~8% of a `small` forward on
        # CPU); y's producer saves its input, not y, for backward (autograd would refuse otherwise).
        # y's dtype rules: under autocast y and h are bf16 while x and the factors are fp32
        return y.baddbmm_(h.to(y.dtype), B.to(y.dtype).transpose(1, 2))  # (B, T, out)


# -- arithmetic for evolution ------------------------------------------------------------------------
def check_compatible(adapters: list[_LoraFactors], same_rank: bool = True) -> None:
    if not adapters:
        raise ValueError("need at least one adapter")
    first = adapters[0]
    for other in adapters[1:]:
        if other.base_config != first.base_config or other.config.targets != first.config.targets:
            raise H2QError("adapters belong to different bases or target different linears; combine only siblings")
        if same_rank and (other.config.r, other.scaling) != (first.config.r, first.scaling):
            raise H2QError(f"adapters differ in rank/scaling (r={first.config.r} vs r={other.config.r}); "
                            f"combine them with merge_product_space")


def linear_combination(adapters: list[LoraAdapter], coefficients: list[float]) -> LoraAdapter:
    """Factor-wise sum: A = sum c_i A_i, B = sum c_i B_i (config and dropout of the first)."""
    check_compatible(adapters)
    if len(coefficients) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(coefficients)} coefficients")
    out = adapters[0].clone()
    with torch.no_grad():
        for params in zip(out.parameters(), *(a.parameters() for a in adapters)):
            params[0].copy_(sum(c * p for c, p in zip(coefficients, params[1:])))
    return out


def _normalized(weights, k: int) -> list[float]:
    weights = [1.0] * k if weights is None else [float(w) for w in weights]
    total = sum(weights)
    if len(weights) != k or total <= 0:
        raise ValueError(f"need {k} weights with a positive sum, got {weights}")
    return [w / total for w in weights]


def average_factors(adapters: list[LoraAdapter], weights=None) -> LoraAdapter:
    """Weighted mean of A's and of B's separately (weights normalised to sum 1; default equal). Not the
    mean of the updates B@A: see the module docstring."""
    return linear_combination(adapters, _normalized(weights, len(adapters)))


def add(a: LoraAdapter, b: LoraAdapter, scale: float = 1.0) -> LoraAdapter:
    """a + scale * b, factor-wise (task-vector addition)."""
    return linear_combination([a, b], [1.0, scale])


def difference(a: LoraAdapter, b: LoraAdapter) -> LoraAdapter:
    """a - b, factor-wise (a task vector between two adapters)."""
    return linear_combination([a, b], [1.0, -1.0])


def merge_product_space(adapters: list[LoraAdapter], weights=None, rank: int | None = None) -> LoraAdapter:
    """One rank-`rank` adapter (default: the first's rank) whose update is the best rank-`rank`
    approximation (Eckart-Young) of sum_i w_i s_i B_i A_i, weights normalised to sum 1. Exact when the
    inputs' ranks add up to <= rank. The update is split evenly: B = U sqrt(S/s), A = sqrt(S/s) V^T.
    Directions beyond the inputs' combined rank are zero in both factors."""
    check_compatible(adapters, same_rank=False)
    weights = _normalized(weights, len(adapters))
    config = replace(adapters[0].config, r=rank or adapters[0].config.r)
    out = LoraAdapter(adapters[0].base_config, config, init=False).to(adapters[0].lora_A[0].device)
    r = config.r
    with torch.no_grad():
        for key, j in out.slot.items():
            # sum_i w_i s_i B_i A_i = Bcat @ Acat; QR both sides so only a (K, K) core gets an SVD
            Bcat = torch.cat([w * a.scaling * a.lora_B[j].double() for w, a in zip(weights, adapters)], 1)  # (out, K)
            Acat = torch.cat([a.lora_A[j].double() for a in adapters], 0)  # (K, in)
            Qb, Rb = torch.linalg.qr(Bcat)  # (out, K'), (K', K)
            Qa, Ra = torch.linalg.qr(Acat.T)  # (in, K''), (K'', K)
            U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (K', K'')
            k = min(r, S.numel())
            root = (S[:k] / config.scaling).sqrt()
            out.lora_B[j][:, :k] = (Qb @ U[:, :k] * root).to(out.lora_B[j].dtype)  # (out, k)
            out.lora_A[j][:k] = (root[:, None] * Vh[:k] @ Qa.T).to(out.lora_A[j].dtype)  # (k, in)
    return out
