"""Measured hardware figures the benchmarks compare against: the matmul peak of this device.

MFU (PaLM, Chowdhery et al. 2022) divides a model's FLOPs per second by the hardware's peak; here the
peak is measured, not taken from a data sheet, so a figure means "of what this machine really does".
The same peak bounds what batching can win: a forward of F FLOPs takes at least F / peak seconds, so
no batched forward beats that however its calls are arranged.
"""
from __future__ import annotations

import statistics
import time

import torch


def matmul_peak_gflops(device, dtype=torch.float32, n: int = 2048, repeats: int = 15, warmup_s: float = 1.0) -> float:
    """Median GFLOP/s of an n x n x n matmul over `repeats`, after `warmup_s` seconds of the same work
    (a cold thread pool or a clock still ramping up otherwise halves the figure now and then)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def one() -> float:
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        one()
    return 2 * n**3 / statistics.median(one() for _ in range(repeats)) / 1e9
