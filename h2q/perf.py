"""The hardware a run uses: the device (`resolve_device`) and its memory (`device_memory`), torch's CPU
thread count (`ThreadPolicy`), and the measured figures the benchmarks compare against: the matmul
peak of this device, and how long a model's weight matmuls alone take at a given number of rows.

MFU (PaLM, Chowdhery et al. 2022) divides a model's FLOPs per second by the hardware's peak; here the
peak is measured, not taken from a data sheet, so a figure means "of what this machine really does".
The same peak bounds what batching can win: a forward of F FLOPs takes at least F / peak seconds, so
no batched forward beats that however its calls are arranged. At small row counts the real matmul
kernels fall well short of that peak; `weight_matmul_seconds` times them at the shapes a forward
really runs, a tighter floor for the same argument.

`ThreadPolicy` picks torch's CPU thread count by measurement. torch's OpenMP threads spin while they
wait for each other, so when another busy process holds one of the cores, every parallel region waits
for the thread that lost its core and a 2-thread run can fall far below a 1-thread one (see the README's
busy-machine table). Waiting passively instead (OMP_WAIT_POLICY) avoids the collapse but slows the idle
case, so neither fixed setting is right on a shared machine: the policy times a small matmul at the
full thread count and at one thread, interleaved, keeps the faster by the median of the rounds, and
measures again every `every_s` seconds of the caller's loop, so a job that starts or ends beside it is
noticed. The median, not the best: one probe lasts about one scheduler time slice, so now and then a
2-thread probe lands in a slice where the busy neighbour is off its core and looks fast, while the
run that follows meets the neighbour all the time.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from h2q.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable explicit choice is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError("device", f"{name!r} is not one of auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but torch sees no CUDA device; use cpu")
    return torch.device(name)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (a GPU's total, or the machine's RAM for cpu); None where the OS
    gives no figure. The size checks compare floors of a run's use against it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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


def probe_seconds(threads: int) -> float:
    """Seconds of a fixed decode-sized matmul workload at `threads` torch threads: small enough to run
    often (milliseconds), big enough to use two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x, w = torch.randn(64, 256), torch.randn(768, 256)
    try:
        start = time.perf_counter()
        for _ in range(40):
            F.linear(x, w)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


class ThreadPolicy:
    """torch's CPU thread count: `requested` > 0 fixes it; 0 chooses by measurement (see the module
    docstring) between all cores and one, again whenever `check()` finds `every_s` seconds passed. An
    OMP_NUM_THREADS set in `env` counts as requested. `probe(threads) -> seconds` and `clock` are
    injectable for tests."""

    MARGIN = 0.9  # one thread must be this much faster to be chosen: idle machines keep all cores

    def __init__(self, requested: int = 0, every_s: float = 30.0, probe=probe_seconds, clock=time.monotonic,
                 env=os.environ, rounds: int = 5):
        if requested == 0 and env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
            requested = int(env["OMP_NUM_THREADS"])
        self.requested, self.every_s, self.probe, self.clock = requested, every_s, probe, clock
        self.rounds = rounds  # interleaved (all cores, one) probe pairs per measurement
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.most = max(cores, torch.get_num_threads()) if requested == 0 else requested
        self.threads, self.last_probe, self.probes = self.most, None, 0
        torch.set_num_threads(self.threads)
        self.check()

    def check(self) -> int:
        """Re-measure when due (auto mode only); returns the thread count now in use."""
        if self.requested or self.most == 1:
            return self.threads
        now = self.clock()
        if self.last_probe is not None and now - self.last_probe < self.every_s:
            return self.threads
        pairs = [(self.probe(self.most), self.probe(1)) for _ in range(self.rounds)]  # interleaved: drift hits both
        many, one = (statistics.median(times) for times in zip(*pairs))
        self.threads = 1 if one < self.MARGIN * many else self.most
        torch.set_num_threads(self.threads)
        self.last_probe, self.probes = self.clock(), self.probes + 1
        return self.threads

    def describe(self) -> str:
        return f"{self.threads} (fixed)" if self.requested else f"{self.threads} of {self.most} (measured)"
