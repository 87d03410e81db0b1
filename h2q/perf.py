"""Measured hardware figures the benchmarks compare against: the matmul peak of this device, and how
long a model's weight matmuls alone take at a given number of rows.

MFU (PaLM, Chowdhery et al. 2022) divides a model's FLOPs per second by the hardware's peak; here the
peak is measured, not taken from a data sheet, so a figure means "of what this machine really does".
The same peak bounds what batching can win: a forward of F FLOPs takes at least F / peak seconds, so
no batched forward beats that however its calls are arranged. At small row counts the real matmul
kernels fall well short of that peak; `weight_matmul_seconds` times them at the shapes a forward
really runs, a tighter floor for the same argument.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def median_seconds(work, device, repeats: int, warmup_s: float) -> float:
    """Median wall seconds of `work()` over `repeats`, after `warmup_s` seconds of the same work
    (a cold thread pool or a clock still ramping up otherwise halves a figure now and then)."""
    def one() -> float:
        t = time.perf_counter()
        work()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        one()
    return statistics.median(one() for _ in range(repeats))


def matmul_peak_gflops(device, dtype=torch.float32, n: int = 2048, repeats: int = 15, warmup_s: float = 1.0) -> float:
    """GFLOP/s of an n x n x n matmul (median over `repeats`, after `warmup_s` of warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats, warmup_s) / 1e9


def weight_matmul_seconds(model, rows: int, repeats: int = 10, warmup_s: float = 0.5) -> float:
    """Median seconds of F.linear over every weight matrix of `model` (each nn.Linear and the tied
    output head) with `rows` input rows: the part of a forward of `rows` tokens that no arrangement
    of the rest (attention, norms, adapters, Python) can remove."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model.embed.weight]
    device = weights[0].device
    inputs = {k: torch.randn(rows, k, device=device, dtype=w.dtype) for w in weights for k in [w.shape[1]]}
    return median_seconds(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], device, repeats, warmup_s)
