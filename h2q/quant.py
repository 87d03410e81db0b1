"""Weight-only quantization of our own: int8 per output channel and int4 group-wise, as a module swap.

Layered like gpt-fast's quantize.py: pure functions (fit a grid, quantize, dequantize, pack, unpack) ->
Linear replacements holding integer buffers and scales (`Int8Linear`, `Int4Linear`) -> a recursive
swap (`quantize`; GPTQ's data-aware swap is h2q/gptq.py, which builds on this module, never the other
way). The model file knows nothing of it: swapped modules keep their names, so adapter keys and LoRA
over a quantized base (QLoRA, Dettmers et al. 2023: float adapters over frozen low-bit weights) work
unchanged. Quantized tensors are buffers, never parameters, so nothing trains them. The model's
declared `quant_scheme` says how it was quantized; its `fingerprint` stays the float model's.

Schemes (`QuantScheme`, stored as JSON with format `h2q-quant-v1`):
* int8: symmetric, one fp32 scale per output channel: w ~ q * s, q in [-127, 127].
* int4: asymmetric, one (scale, zero) per group of `group_size` inputs of an output channel:
  w ~ (q - 8) * s + z, q in [0, 15], the float-zero form of tinygemm and torch's int4 kernels. Scales
  and zeros are bf16 (llama.cpp keeps fp16 ones), 4 bytes per group. Packed two codes per byte, along
  the input: element 2j in the low nibble, 2j+1 in the high one.
* Every grid rounds to nearest, so a weight inside its grid's range [code 0, code max] is rebuilt
  within s/2; a weight outside is clipped to the nearest end. Clip search (on by default) gives each
  row / group the grid, among ranges shrunk by CLIP_RATIOS, with the least squared error (AWQ's
  auto-clip, llama.cpp's make_qx_quants), then refits scale (and zero) to the rounded codes by least
  squares while that lowers the error (make_qkx2_quants). Small models are fragile; this is cheap.
* The embedding, tied to the output head, stays float unless asked (`embedding=True`: int8 per row).

Kernels (torch 2.13, measured on this CPU): `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`
take fp32 activations only through a slow reference path but bf16 ones through a fast vectorised one,
so on CPU activations go in as bf16 and results come back in x's dtype. Elsewhere (CUDA's tinygemm
path is untested here) a layer dequantizes and calls F.linear. The int4 CPU kernel wants its own
ISA-dependent layout: a layer converts to it when its weights arrive (quantize, load) or move, and
drops the canonical buffers, so one copy is held; `forward` only reads. `state_dict()` and device
moves recover the canonical codes exactly by running the kernel on an identity matrix with scale 1
and zero 8 (codes are small integers).

Files are h2q/checkpoint.py's: `save_quantized` writes the canonical buffers with the scheme, and
`load_model` calls `prepare_quantized` to swap in empty quantized modules before loading them.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from h2q.config import option
from h2q.errors import ConfigError, H2QError

FORMAT = "h2q-quant-v1"
MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
CLIP_RATIOS = torch.linspace(1.0, 0.5, 26).tolist()  # range kept around the centre, 2% steps
REFIT_STEPS = 4
TINY_SCALE = 1e-12  # scale of an all-constant row / group: any positive value rebuilds it


# -- pure functions: grids, quantize / dequantize, pack / unpack --------------------------------------
@dataclass(frozen=True)
class Grid:
    """Integer codes [qmin, qmax] read as w ~ (q - offset) * s + z; symmetric grids keep z = 0."""
    qmin: int
    qmax: int
    offset: int
    symmetric: bool
    param_dtype: torch.dtype  # what scales (and zeros) are stored in; the fit measures error in it


INT8_GRID = Grid(-127, 127, 0, True, torch.float32)
INT4_GRID = Grid(0, 15, 8, False, torch.bfloat16)


def grid_codes(w, s, z, grid: Grid):
    return torch.clamp(torch.round((w - z) / s) + grid.offset, grid.qmin, grid.qmax)


def _stored(t, grid: Grid):
    """Round a scale / zero to its storage dtype, compute on in fp32."""
    return t.to(grid.param_dtype).float()


def _grid_for_range(lo, hi, grid: Grid):
    """(s, z) of the grid spanning [lo, hi] (symmetric: [-max|.|, max|.|])."""
    if grid.symmetric:
        s = torch.maximum(-lo, hi) / grid.qmax
        return _stored(s.clamp_min(TINY_SCALE), grid), torch.zeros_like(s)
    s = _stored(((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(TINY_SCALE), grid)
    return s, _stored(lo + (grid.offset - grid.qmin) * s, grid)


def _refit(w, q, s, z, grid: Grid):
    """Least-squares (s, z) for fixed codes q; rows where that is degenerate keep (s, z)."""
    a = q - grid.offset
    if grid.symmetric:
        new_s, new_z = (a * w).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True), z
    else:
        a_c, w_c = a - a.mean(-1, keepdim=True), w - w.mean(-1, keepdim=True)
        new_s = (a_c * w_c).sum(-1, keepdim=True) / (a_c * a_c).sum(-1, keepdim=True)
        new_z = w.mean(-1, keepdim=True) - new_s * a.mean(-1, keepdim=True)
    ok = torch.isfinite(new_s) & (new_s > TINY_SCALE)
    return torch.where(ok, _stored(new_s, grid), s), torch.where(ok, _stored(new_z, grid), z)


def _try(w, s, z, grid: Grid):
    """Codes of w on grid (s, z) and each row's squared reconstruction error."""
    q = grid_codes(w, s, z, grid)
    return q, s, z, ((q - grid.offset) * s + z - w).square().sum(-1, keepdim=True)


def fit_rows(w: torch.Tensor, grid: Grid, clip_search: bool = True):
    """Quantize each row of w (R, n) on its own grid -> codes (R, n) float, s (R, 1), z (R, 1).
    (Measured on a trained mini model: clip search lowers the layers' output error on real inputs by
    12-16% against plain round-to-nearest for int4; weighting the error by |w| as llama.cpp does, no.)"""
    w = w.float()
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = None
    for ratio in CLIP_RATIOS if clip_search else [1.0]:
        if grid.symmetric:  # shrink towards zero, which the grid keeps exact
            s, z = _grid_for_range(lo * ratio, hi * ratio, grid)
        else:  # shrink towards the centre
            s, z = _grid_for_range(mid - ratio * half, mid + ratio * half, grid)
        candidate = _try(w, s, z, grid)
        best = candidate if best is None else _keep_better(best, candidate)
    for _ in range(REFIT_STEPS if clip_search else 0):
        q, s, z, _ = best
        best = _keep_better(best, _try(w, *_refit(w, q, s, z, grid), grid))
    return best[:3]


def _keep_better(best, candidate):
    better = candidate[3] < best[3]  # (R, 1)
    return tuple(torch.where(better, c, b) for b, c in zip(best, candidate))


def quantize_int8(w: torch.Tensor, clip_search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> codes int8 (N, K), scales fp32 (N,): one symmetric grid per output channel."""
    q, s, _ = fit_rows(w, INT8_GRID, clip_search)
    return q.to(torch.int8), s.squeeze(1)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float().unsqueeze(1)  # (N, K)


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError("group_size", f"{group_size} is not one of {', '.join(map(str, GROUP_SIZES))} (int4)")
    if in_features % group_size:
        fits = [str(g) for g in GROUP_SIZES if in_features % g == 0] or ["none (use int8)"]
        raise ConfigError("group_size", f"{group_size} does not divide the input size {in_features} of "
                                        f"{name}; use {' or '.join(fits)}")


def quantize_int4(w: torch.Tensor, group_size: int = 64, clip_search: bool = True):
    """w (N, K) -> codes uint8 (N, K) in [0, 15], scales and zeros bf16 (N, K / group_size)."""
    N, K = w.shape
    check_group_size(K, group_size)
    q, s, z = fit_rows(w.reshape(-1, group_size), INT4_GRID, clip_search)  # rows are groups: (N*G, g)
    G = K // group_size
    return q.to(torch.uint8).view(N, K), s.view(N, G).bfloat16(), z.view(N, G).bfloat16()


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    groups = q.view(N, K // group_size, group_size).float() - INT4_GRID.offset  # (N, G, g)
    return (groups * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).view(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 (N, K) in [0, 15] -> (N, K/2): element 2j in the low nibble, 2j+1 in the high."""
    assert q.shape[-1] % 2 == 0 and q.dtype == torch.uint8
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    pairs = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # (N, K/2, 2)
    return pairs.view(*packed.shape[:-1], packed.shape[-1] * 2)  # (N, K)


# -- kernels ------------------------------------------------------------------------------------------
_KERNEL_ERRORS = (AttributeError, RuntimeError, NotImplementedError)


@functools.cache
def _int8_kernel_ok(out_features: int, in_features: int) -> bool:
    """Does this torch's CPU int8 weight-only kernel take this shape? Probed once per shape."""
    try:
        torch._weight_int8pack_mm(torch.zeros(1, in_features, dtype=torch.bfloat16),
                                  torch.zeros(out_features, in_features, dtype=torch.int8),
                                  torch.ones(out_features, dtype=torch.bfloat16))
        return True
    except _KERNEL_ERRORS:
        return False


@functools.cache
def _int4_kernel_ok(out_features: int, in_features: int, group_size: int) -> bool:
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(
            torch.zeros(out_features, in_features, dtype=torch.int32), 1)
        scales_zeros = torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16)
        torch._weight_int4pack_mm_for_cpu(torch.zeros(1, in_features, dtype=torch.bfloat16), packed, group_size,
                                          scales_zeros)
        return True
    except _KERNEL_ERRORS:
        return False


@functools.cache
def _unit_scales(n: int) -> torch.Tensor:
    """Ones for the int8 kernel's bf16 scales, one CPU tensor per width shared by every layer."""
    return torch.ones(n, dtype=torch.bfloat16)


class _KernelLinear(torch.autograd.Function):
    """The kernel forward with a backward to the input only (the weights are frozen codes), so
    training adapters over a quantized base sees exactly the forward that inference sees."""

    @staticmethod
    def forward(ctx, x2d, layer):
        ctx.layer = layer
        return layer.kernel_matmul(x2d)

    @staticmethod
    def backward(ctx, grad_out):
        return (grad_out.float() @ ctx.layer.dequantize()).to(grad_out.dtype), None


def _run_kernel(layer, x):
    """x (..., K) -> (..., N) in x's dtype through `layer.kernel_matmul`."""
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    y = _KernelLinear.apply(x2d, layer) if torch.is_grad_enabled() and x.requires_grad else layer.kernel_matmul(x2d)
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., N)


# -- modules ------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """Bias-free linear with int8 weights, one fp32 scale per output channel. `use_kernel`: run the CPU
    kernel (where this torch has it for this shape) rather than dequantize + F.linear."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        # the kernel's bf16 scales, all 1: a plain attribute (no bytes of the model's own), not made in
        # forward, where torch.compile would trace a fresh tensor that its lowering of the kernel refuses
        self.unit_scales = _unit_scales(out_features)
        self.set_kernel(True)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor) -> Int8Linear:
        """codes int8 (N, K), scales fp32 (N,)."""
        layer = cls(codes.shape[1], codes.shape[0], device=codes.device)
        layer.qweight, layer.scales = codes, scales
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, clip_search: bool = True) -> Int8Linear:
        return cls.from_codes(*quantize_int8(linear.weight.detach(), clip_search))

    def set_kernel(self, enabled: bool) -> None:
        self.use_kernel = enabled and _int8_kernel_ok(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def kernel_matmul(self, x2d):
        """(M, K) -> (M, N) by the bf16 kernel on unit scales; the fp32 scales are applied after."""
        y = torch._weight_int8pack_mm(x2d.bfloat16(), self.qweight, self.unit_scales)
        return (y * self.scales).to(x2d.dtype)  # bf16 * fp32 -> fp32

    def forward(self, x):
        if self.use_kernel and x.device.type == "cpu":
            return _run_kernel(self, x)
        return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """Bias-free linear with int4 weights packed two per byte, bf16 scale and zero per input group.

    Canonical buffers: qweight uint8 (N, K/2), scales and zeros bf16 (N, K/g). While the CPU kernel is
    in use (`use_kernel`, weights on CPU, a kernel for this shape in this torch) they are replaced by
    kernel_qweight (the kernel's layout, same bytes) and kernel_scales_zeros bf16 (K/g, N, 2), so one
    copy is held. The layout is set when the weights arrive (`from_codes`, `load_state_dict`), on
    device moves and by `set_kernel`, never by `forward`; `canonical()` rebuilds the canonical buffers
    from either. An empty module (from the constructor, to be loaded) holds canonical zeros."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 64, device=None):
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("kernel_qweight", None, persistent=False)
        self.register_buffer("kernel_scales_zeros", None, persistent=False)
        self.use_kernel = True

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> Int4Linear:
        """codes uint8 (N, K) in [0, 15], scales and zeros bf16 (N, K / group_size)."""
        layer = cls(codes.shape[1], codes.shape[0], group_size, device=codes.device)
        layer.qweight, layer.scales, layer.zeros = pack_int4(codes), scales, zeros
        layer._set_layout()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 64, clip_search: bool = True) -> Int4Linear:
        return cls.from_codes(*quantize_int4(linear.weight.detach(), group_size, clip_search), group_size)

    def set_kernel(self, enabled: bool) -> None:
        self.use_kernel = enabled
        self._set_layout()

    def _set_layout(self):
        """The kernel layout exactly while the kernel can run, the canonical one otherwise."""
        weights = self.qweight if self.kernel_qweight is None else self.kernel_qweight
        if (self.use_kernel and weights.device.type == "cpu"
                and _int4_kernel_ok(self.out_features, self.in_features, self.group_size)):
            self.to_kernel_layout()
        else:
            self.to_canonical_layout()

    def _codes_scales_zeros(self):
        if self.kernel_qweight is None:
            return unpack_int4(self.qweight), self.scales, self.zeros
        K, N, g = self.in_features, self.out_features, self.group_size
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(K // g, N, 2).contiguous()  # (q-8)*1+8 = q
        eye = torch.eye(K, dtype=torch.bfloat16)
        codes = torch._weight_int4pack_mm_for_cpu(eye, self.kernel_qweight, g, unit).t().to(torch.uint8)  # (N, K)
        sz = self.kernel_scales_zeros
        return codes, sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()

    def canonical(self) -> dict[str, torch.Tensor]:
        codes, scales, zeros = self._codes_scales_zeros()
        return {"qweight": pack_int4(codes) if self.kernel_qweight is not None else self.qweight,
                "scales": scales, "zeros": zeros}

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(*self._codes_scales_zeros(), self.group_size)

    def to_kernel_layout(self):
        if self.kernel_qweight is not None:
            return
        codes = unpack_int4(self.qweight).to(torch.int32)  # (N, K)
        self.kernel_qweight = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.kernel_scales_zeros = torch.stack((self.scales.t(), self.zeros.t()), -1).bfloat16().contiguous()
        self.qweight = self.scales = self.zeros = None

    def to_canonical_layout(self):
        if self.kernel_qweight is not None:
            state = self.canonical()
            self.kernel_qweight = self.kernel_scales_zeros = None
            self.qweight, self.scales, self.zeros = state["qweight"], state["scales"], state["zeros"]

    def kernel_matmul(self, x2d):
        return torch._weight_int4pack_mm_for_cpu(x2d.bfloat16(), self.kernel_qweight, self.group_size,
                                                 self.kernel_scales_zeros).to(x2d.dtype)

    def forward(self, x):
        if self.kernel_qweight is not None:
            return _run_kernel(self, x)
        return F.linear(x, self.dequantize().to(x.dtype))

    # the kernel layout is an in-memory detail: files and device moves see the canonical form
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.canonical().items():
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.to_canonical_layout()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._set_layout()

    def _apply(self, fn, recurse=True):
        self.to_canonical_layout()
        out = super()._apply(fn, recurse)
        self._set_layout()  # the kernel layout is the CPU kernel's: derived again where the weights went
        return out

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


class Int8Embedding(nn.Module):
    """Token embedding with int8 rows and one fp32 scale per row. `weight` dequantizes the table, so
    the tied output head (`F.linear(x, model.embed.weight)`) works unchanged."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Embedding, clip_search: bool = True) -> Int8Embedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device=embedding.weight.device)
        layer.qweight, layer.scales = quantize_int8(embedding.weight.detach(), clip_search)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, ids):
        return self.qweight[ids].float() * self.scales[ids].unsqueeze(-1)  # (B, T, C)


QUANTIZED_TYPES = (Int8Linear, Int4Linear, Int8Embedding)


# -- the scheme and the swap --------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantScheme:
    mode: str = option("int8", "int8: per output channel; int4: group-wise, two per byte", choices=MODES)
    group_size: int = option(64, "int4 group along the input dimension", choices=GROUP_SIZES)
    clip_search: bool = option(True, "search each row's / group's clip range for the least error")
    embedding: bool = option(False, "also quantize the tied embedding / output head (int8 per row)")
    gptq: bool = option(False, "GPTQ error compensation from calibration batches of the training data")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError("mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "int8":
            object.__setattr__(self, "group_size", None)  # per channel: no groups
        elif self.group_size not in GROUP_SIZES:
            raise ConfigError("group_size", f"{self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))} (int4)")

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path="checkpoint") -> QuantScheme:
        try:
            d = json.loads(text)
            if d.pop("format", None) != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            return cls(**d)
        except (ValueError, TypeError, AttributeError, H2QError) as e:
            raise H2QError(f"{path} has a quantization scheme this h2q cannot read ({e}); "
                            f"re-run scripts/quantize.py on the float model") from None

    def describe(self) -> str:
        parts = [self.mode] + ([f"g{self.group_size}"] if self.mode == "int4" else [])
        parts += ["clip-search" if self.clip_search else "round-to-nearest"]
        parts += ["gptq"] * self.gptq + ["int8 embedding"] * self.embedding
        return " ".join(parts)


def _swap_linears(module: nn.Module, make, prefix: str = "") -> None:
    """Replace every nn.Linear below `module` by make(path, linear), recursively."""
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, nn.Linear):
            setattr(module, name, make(path, child))
        else:
            _swap_linears(child, make, path + ".")


def _check_quantizable(model: nn.Module, scheme: QuantScheme) -> None:
    if model.quant_scheme is not None:
        raise H2QError(f"the model is already quantized ({model.quant_scheme.describe()}); start from the float model")
    if scheme.mode == "int4":
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                check_group_size(m.in_features, scheme.group_size, name)


def quantize_with(model: nn.Module, scheme: QuantScheme, swap_linears) -> nn.Module:
    """What every quantizer does around its own `swap_linears()` (which replaces the model's linears),
    in place: check the model, record the float model's fingerprint (adapters trained on it keep
    fitting), swap, quantize the embedding if the scheme says so, record the scheme."""
    _check_quantizable(model, scheme)
    model.fingerprint = model.base_fingerprint()
    swap_linears()
    if scheme.embedding:
        model.embed = Int8Embedding.from_float(model.embed, scheme.clip_search)
    model.quant_scheme = scheme
    return model


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 64, clip_search: bool = True,
             embedding: bool = False) -> nn.Module:
    """Swap an h2q Transformer's linears (and, if asked, its embedding) for quantized modules, in
    place, each weight rounded on its own grid. GPTQ, which uses calibration data, is h2q.gptq.quantize."""
    scheme = QuantScheme(mode, group_size, clip_search, embedding)
    if scheme.mode == "int8":
        make = lambda _, lin: Int8Linear.from_float(lin, clip_search)
    else:
        make = lambda _, lin: Int4Linear.from_float(lin, scheme.group_size, clip_search)
    return quantize_with(model, scheme, lambda: _swap_linears(model, make))


def prepare_quantized(model: nn.Module, scheme: QuantScheme) -> None:
    """Give a fresh float model the empty quantized modules of `scheme`, ready for load_state_dict
    (h2q.checkpoint.load_model does this for a quantized checkpoint)."""
    _check_quantizable(model, scheme)
    if scheme.mode == "int8":
        _swap_linears(model, lambda _, lin: Int8Linear(lin.in_features, lin.out_features))
    else:
        _swap_linears(model, lambda _, lin: Int4Linear(lin.in_features, lin.out_features, scheme.group_size))
    if scheme.embedding:
        model.embed = Int8Embedding(model.embed.num_embeddings, model.embed.embedding_dim)
    model.quant_scheme = scheme


def quant_scheme(model: nn.Module) -> QuantScheme | None:
    """The model's quantization scheme, None for a float model."""
    return model.quant_scheme


def describe(model: nn.Module) -> str:
    """One line for reports: the scheme, or the float dtype."""
    scheme = quant_scheme(model)
    return scheme.describe() if scheme else str(next(model.parameters()).dtype).replace("torch.", "")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds now (kernel layouts included)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def use_kernels(model: nn.Module, enabled: bool) -> None:
    """Turn the CPU kernels on or off (off: dequantize + F.linear everywhere, for comparisons)."""
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.set_kernel(enabled)
