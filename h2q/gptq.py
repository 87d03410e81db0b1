"""GPTQ: quantize each linear while compensating its rounding error with the weights not yet rounded.

Frantar et al. 2022 ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), the layer-wise OBQ update: with H = sum x x^T over calibration inputs of a linear,
columns (input features) are rounded one at a time and each column's error, scaled by the inverse
Hessian's Cholesky factor, is pushed onto the columns still to come, so the layer's *output* on real
data moves less than with plain rounding. Blocks run in order on hidden states that already went
through the quantized blocks before them ("sequential"), as in the reference implementation.

Grids come from h2q/quant.py: int8 takes its per-channel grid (with clip search) from the whole
weight before the pass; int4 fits each group's grid (with clip search) when the pass reaches the
group's first column, on the weights as compensated so far (GPTQ's group-wise variant). The result is
ordinary Int8Linear / Int4Linear modules, the same format as without GPTQ. `quantize` is the entry,
the data-aware twin of h2q.quant.quantize (this module imports quant; quant never imports it).
"""
from __future__ import annotations

import torch
from torch import nn

from h2q.quant import INT4_GRID, INT8_GRID, Int4Linear, Int8Linear, QuantScheme, fit_rows, grid_codes, quantize_with

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it, for a stable Cholesky (as GPTQ)


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme):
    """weight (N, K), hessian (K, K) -> codes (N, K) float, scales (N, G), zeros (N, G) (G = 1 for int8)."""
    W = weight.detach().float().clone()
    H = hessian.double().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0  # inputs never active in calibration: any value does, make it 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads over columns i..K-1
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    grid = INT8_GRID if scheme.mode == "int8" else INT4_GRID
    group = K if scheme.mode == "int8" else scheme.group_size
    codes = torch.empty_like(W)
    scales, zeros = [], []
    for i in range(K):
        if i % group == 0:
            _, s, z = fit_rows(W[:, i:i + group], grid, scheme.clip_search)  # (N, 1) each
            scales.append(s)
            zeros.append(z)
        w = W[:, i:i + 1]  # (N, 1)
        q = grid_codes(w, s, z, grid)
        codes[:, i:i + 1] = q
        err = (w - ((q - grid.offset) * s + z)) / U[i, i]  # (N, 1)
        W[:, i + 1:] -= err * U[i:i + 1, i + 1:]
    return codes, torch.cat(scales, 1), torch.cat(zeros, 1)


def quantized_module(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme) -> nn.Module:
    codes, scales, zeros = gptq_weight(weight, hessian, scheme)
    if scheme.mode == "int8":
        return Int8Linear.from_codes(codes.to(torch.int8), scales.squeeze(1))
    return Int4Linear.from_codes(codes.to(torch.uint8), scales.bfloat16(), zeros.bfloat16(), scheme.group_size)


def _hessians(block: nn.Module, run_block) -> dict[str, torch.Tensor]:
    """sum x x^T of every linear's inputs in `block` while `run_block()` feeds it the calibration data."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}

    def hook(name):
        def accumulate(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (B*T, K)
            hessians[name] += x.t() @ x
        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        run_block()
    finally:
        for h in handles:
            h.remove()
    return hessians


def quantize(model: nn.Module, calibration: list[torch.Tensor], mode: str = "int8", group_size: int = 64,
             clip_search: bool = True, embedding: bool = False) -> nn.Module:
    """h2q.quant.quantize with GPTQ error compensation, in place. calibration: token batches (B, T),
    T <= context_len, of the kind of text the model will see."""
    scheme = QuantScheme(mode, group_size, clip_search, embedding, gptq=True)
    return quantize_with(model, scheme, lambda: gptq_linears(model, scheme, calibration))


@torch.no_grad()
def gptq_linears(model: nn.Module, scheme: QuantScheme, calibration: list[torch.Tensor]) -> None:
    """Swap every linear of `model` (an h2q Transformer, on CPU) for its GPTQ-quantized module."""
    T = calibration[0].shape[1]
    cos_sin = model.rotary.cos_sin(torch.arange(T))
    hidden = [model.embed(ids) for ids in calibration]  # (B, T, C) each
    for block in model.layers:
        run = lambda: [block(h, model.rotary, cos_sin, None, None) for h in hidden]
        for name, H in _hessians(block, run).items():
            parent, _, child = name.rpartition(".")
            linear = getattr(block.get_submodule(parent), child)
            setattr(block.get_submodule(parent), child, quantized_module(linear.weight, H, scheme))
        hidden = run()  # the next block sees this block's quantized outputs
