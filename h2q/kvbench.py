"""Measurements behind scripts/bench_kv.py, reusable on their own: KV memory and bits per byte of
teacher-forced text through a cache policy, decode speed through `generate_batch`, the speed of a
sampler that recomputes the whole context every step (the minimal nanoGPT/minGPT way), memory
while streaming far past the context with `window`, and restoring a saved cache against recomputing it.

Every figure is measured, never derived: memory is the cache's `nbytes` after each forward divided by
the rows of the batch (every tensor a cache holds has a batch dimension), speeds are wall-clock.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from h2q.checkpoint import load_cache, save_cache
from h2q.data import eval_window_starts, windows_to_batch
from h2q.generate import generate_batch
from h2q.kvcache import make_cache, prefill


@dataclass
class CacheEval:
    bits_per_byte: float
    bytes_at_end: float  # per row, after the last token of a full context
    bytes_peak: float  # per row, the most held after any forward


def eval_windows(val: np.ndarray, ctx: int, n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation windows of the validation bytes (h2q.data.eval_window_starts, as training's
    evaluation cuts them) -> inputs and next-byte targets, (N, ctx) each, NUL separators as EOT."""
    return windows_to_batch(val, eval_window_starts(len(val), ctx, n_windows), ctx)


@torch.inference_mode()
def cache_bits_per_byte(model, policy: str, x: torch.Tensor, y: torch.Tensor, batch: int = 16,
                        chunk: int = 1, max_len: int | None = None, **opts) -> CacheEval:
    """Teacher-forced bits per byte with every token read through a cache of `policy` holding at most
    `max_len` tokens (default: the whole window), fed `chunk` tokens per forward (1 = as in decoding)."""
    weight = model.embed.weight
    nll, count, at_end, peak = 0.0, 0, 0.0, 0.0
    for first in range(0, x.shape[0], batch):
        xs, ys = x[first:first + batch].to(weight.device), y[first:first + batch].to(weight.device)
        rows, ctx = xs.shape
        cache = make_cache(policy, model.config, rows, max_len or ctx, weight.device, weight.dtype, **opts)
        for start in range(0, ctx, chunk):
            logits = model(xs[:, start:start + chunk], cache=cache)  # (rows, chunk, V)
            nll += F.cross_entropy(logits.flatten(0, 1).float(), ys[:, start:start + chunk].flatten(),
                                   reduction="sum").item()
            peak = max(peak, cache.nbytes / rows)
        count += ys.numel()
        at_end = cache.nbytes / rows
    return CacheEval(nll / count / math.log(2), at_end, peak)


def decode_tokens_per_s(model, policy: str, batch: int, prompt_len: int, new_tokens: int,
                        max_len: int | None = None, compile: bool = False, **opts) -> float:
    """Tokens per second of `generate_batch` after the prefill (prompts of slightly different
    lengths, so the ragged path is what gets timed), sampling at temperature 1, no stop; `max_len`
    is the cache size (default: what the generation needs, or the context for evicting policies).
    With `compile` the decode steps run compiled; an untimed first run pays for the compilation."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (max(1, prompt_len - row % 8),), generator=generator).tolist()
               for row in range(batch)]
    stamps = []

    def clock(row, token):
        if row == 0:
            stamps.append(time.perf_counter())

    for _ in range(2 if compile else 1):
        stamps.clear()
        generate_batch(model, prompts, new_tokens, temperature=1.0, seed=0, stop=(), cache_policy=policy,
                       cache_len=max_len, cache_opts=opts, on_token=clock, compile=compile)
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.inference_mode()
def recompute_tokens_per_s(model, batch: int, ctx: int, steps: int) -> float:
    """The no-cache sampler: every step runs the model over the last `ctx` tokens again."""
    weight = model.embed.weight
    ids = torch.randint(0, 256, (batch, ctx), generator=torch.Generator().manual_seed(0)).to(weight.device)
    model(ids[:, -ctx:])  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        next_ids = model(ids[:, -ctx:])[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat((ids[:, 1:], next_ids), 1)
    return batch * steps / (time.perf_counter() - start)


@dataclass
class StreamReport:
    tokens: int
    bytes_min: int  # after the window filled
    bytes_max: int
    tokens_per_s: float


def stream_window(model, tokens: int, capacity: int, **opts) -> StreamReport:
    """Generate `tokens` at batch 1 through a `window` cache of `capacity` and watch its memory."""
    weight = model.embed.weight
    cache = make_cache("window", model.config, 1, capacity, weight.device, weight.dtype, **opts)
    sizes, stamps = [], []

    def watch(row, token):
        sizes.append(cache.nbytes)
        stamps.append(time.perf_counter())

    generate_batch(model, [b"\n"], tokens, temperature=1.0, seed=0, stop=(), cache=cache, on_token=watch)
    filled = sizes[capacity:] or sizes[-1:]
    return StreamReport(len(sizes), min(filled), max(filled), (len(stamps) - 1) / (stamps[-1] - stamps[0]))


@torch.inference_mode()
def prefill_seconds(model, policy: str, ids: list[int], threads: int, max_len: int | None = None, **opts) -> float:
    """Wall-clock of `prefill` of one long prompt into a fresh cache of `policy` (max_len default: the
    model's context) at `threads` torch threads (restored afterwards)."""
    weight, before = model.embed.weight, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        cache = make_cache(policy, model.config, 1, max_len or model.config.context_len, weight.device,
                           weight.dtype, **opts)
        prefill(model, cache, [ids])
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


@dataclass
class PersistReport:
    tokens: int  # tokens of context fed
    held: int  # tokens the cache holds after them (at most its max_len)
    memory_bytes: int  # the cache's nbytes
    file_bytes: int  # the saved file on disk, metadata and text ids included
    prefill_s: float  # median: recompute the cache from the text
    save_s: float  # median: save_cache
    restore_s: float  # median: load_cache (read, content hash, identity checks, rebuild)
    exact: bool  # the restored cache's next logits equal the original's bit for bit


@torch.inference_mode()
def persist_costs(model, policy: str, ids: list[int], folder: Path, repeats: int = 5, max_len: int | None = None,
                  **opts) -> PersistReport:
    """Recompute (prefill `ids` into a fresh cache of `policy`, `max_len` default room for them and
    one more), save and restore (h2q.checkpoint) it, `repeats` times interleaved; medians, and
    whether the restored cache gives the original's next logits exactly."""
    weight = model.embed.weight
    path = Path(folder) / f"{policy}.safetensors"
    times = {"prefill": [], "save": [], "restore": []}
    for _ in range(repeats):
        start = time.perf_counter()
        cache = make_cache(policy, model.config, 1, max_len or len(ids) + 1, weight.device, weight.dtype, **opts)
        prefill(model, cache, [ids])
        times["prefill"].append(time.perf_counter() - start)
        start = time.perf_counter()
        save_cache(path, cache, model, text_ids=ids)
        times["save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        restored, _, _ = load_cache(path, model)
        times["restore"].append(time.perf_counter() - start)
    probe = torch.tensor([[ids[-1]]], device=weight.device)
    exact = torch.equal(model(probe, cache=restored), model(probe, cache=cache))
    median = {k: statistics.median(v) for k, v in times.items()}
    return PersistReport(len(ids), min(len(ids), cache.max_len), cache.nbytes, path.stat().st_size,
                         median["prefill"], median["save"], median["restore"], exact)
