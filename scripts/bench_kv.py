"""Benchmark KV-cache policies: `python scripts/bench_kv.py [--ckpt DIR | --preset small --random] [--quick]`.

For each policy (full, int8, int4, window, h2o): KV bytes per token and in total at the full context
(and the most held at any point on the way), validation bits per byte with every byte read through a
cache of that policy (teacher-forced, one token per forward unless --chunk), its change against
`full`, and decode tokens/s at batch 1 and batch 20 (eager). Then cached decoding (eager, and with
--compile also compiled) against a sampler that recomputes the whole context every step, at the
full context, and `window` streaming 8x the context.
The targets are printed beside the measurements. The measuring code is h2q/kvbench.py.

`--long-prompt N` times the prefill of one N-byte prompt (of the validation text) per evicting policy
at torch's thread count and at one thread, interleaved `--repeats` times (medians).

`--persist` measures saved caches instead: per policy, a `--persist-ctx` (512) byte context of the
validation text prefilled (recomputed), saved with h2q.checkpoint.save_cache and restored with
load_cache, interleaved `--repeats` times (medians); bytes on disk, and whether the restored cache's
next logits equal the original's bit for bit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from h2q import checkpoint, kvbench
from h2q.cli import resolve_device, run_main
from h2q.config import PRESETS
from h2q.data import load_corpus
from h2q.errors import H2QError
from h2q.kvcache import make_cache, policies
from h2q.model import Transformer

TARGETS = {"int8": (0.3, 3.5), "int4": (2.0, 6.0)}  # (max % worse bits per byte, min times less memory)
RECOMPUTE_REFERENCE = {1: (22.0, 20), 20: (25.0, 50)}  # batch: (reference tok/s, required speed-up)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="checkpoints/base", help="model checkpoint folder or file")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="with --random: the shape")
    p.add_argument("--random", action="store_true", help="benchmark an untrained random-init --preset model")
    p.add_argument("--text-file", help="validation text (default: the val split of the prepared corpus)")
    p.add_argument("--data-dir", default=None, help="corpus folder for h2q.data.load_corpus (default corpus)")
    p.add_argument("--policies", default=",".join(policies()), help="comma-separated subset")
    p.add_argument("--ctx", type=int, default=None, help="context to measure at (default: the model's)")
    p.add_argument("--windows", type=int, default=16, help="validation windows of ctx bytes")
    p.add_argument("--chunk", type=int, default=1, help="tokens per forward in the bits-per-byte run")
    p.add_argument("--group", type=int, default=32, help="int8/int4 group size and residual")
    p.add_argument("--window-len", type=int, default=None, help="window cache size (default ctx/2)")
    p.add_argument("--sinks", type=int, default=4, help="window attention sinks")
    p.add_argument("--h2o-len", type=int, default=None, help="h2o token budget (default ctx/2)")
    p.add_argument("--batch", type=int, default=20, help="the large decode batch")
    p.add_argument("--stream-factor", type=int, default=8, help="window streams this many contexts")
    p.add_argument("--compile", action="store_true",
                   help="also time cached decoding with torch.compile'd decode steps (h2q.generate)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: context 64, 2 windows, short decodes")
    p.add_argument("--long-prompt", type=int, default=None, help="time the prefill of one prompt of N bytes instead")
    p.add_argument("--persist", action="store_true", help="measure saving/restoring caches instead (see above)")
    p.add_argument("--persist-ctx", type=int, default=512, help="with --persist: bytes of context")
    p.add_argument("--repeats", type=int, default=5, help="with --persist: interleaved repeats")
    return p.parse_args(argv)


def load(args, device):
    if args.random:
        torch.manual_seed(0)
        print(f"UNTRAINED: random-init '{args.preset}' model; bits per byte say nothing about quality here")
        return Transformer(PRESETS[args.preset]).to(device).eval()
    model, _ = checkpoint.load_model(args.ckpt, device)
    return model


def validation_bytes(args, ctx) -> np.ndarray:
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise H2QError(f"--text-file {path} not found")
        return np.frombuffer(path.read_bytes(), dtype=np.uint8)
    return load_corpus(args.data_dir, ctx).val


def policy_options(args, ctx) -> dict[str, dict]:
    return {"full": {}, "int8": {"group": args.group}, "int4": {"group": args.group},
            "window": {"sinks": args.sinks, "max_len": args.window_len or ctx // 2},
            "h2o": {"max_len": args.h2o_len or ctx // 2}}


def check_flags(args, ctx: int) -> None:
    for flag in ("windows", "chunk", "group", "batch", "stream_factor", "threads", "ctx", "persist_ctx", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise H2QError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("window_len", "h2o_len"):
        value = getattr(args, flag)
        if value is not None and not args.sinks + 2 <= value <= ctx:
            raise H2QError(f"--{flag.replace('_', '-')} must be in [{args.sinks + 2}, {ctx}], got {value}")
    if args.sinks < 0 or args.sinks + 2 > ctx // 2:
        raise H2QError(f"--sinks must be in [0, {ctx // 2 - 2}], got {args.sinks}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load(args, device)
    if args.persist:
        return persist(args, model)
    if args.long_prompt is not None:
        return long_prompt(args, model)
    ctx = min(args.ctx or model.config.context_len, 64 if args.quick else model.config.context_len)
    check_flags(args, ctx)
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(chosen) - set(policies())
    if unknown or "full" not in chosen:
        raise H2QError(f"--policies must include 'full' and name only {', '.join(policies())}")
    val = validation_bytes(args, ctx)
    if len(val) < ctx + 1:
        raise H2QError(f"the validation text has {len(val)} bytes, fewer than one window of {ctx + 1}")
    x, y = kvbench.eval_windows(val, ctx, 2 if args.quick else args.windows)
    prompt_len, new_tokens = (ctx // 2, 16) if args.quick else (ctx // 2, ctx // 2)
    print(f"model {model.config}, {torch.get_num_threads()} threads, context {ctx}, {x.shape[0]} windows "
          f"({x.numel()} bytes), chunk {args.chunk}; decode {new_tokens} tokens after ~{prompt_len}")

    options, rows = policy_options(args, ctx), {}
    for policy in chosen:
        opts = dict(options[policy])
        budget = opts.pop("max_len", None)  # evicting policies: their token budget
        evaluation = kvbench.cache_bits_per_byte(model, policy, x, y, chunk=args.chunk, max_len=budget, **opts)
        speeds = [kvbench.decode_tokens_per_s(model, policy, b, prompt_len, new_tokens, max_len=budget, **opts)
                  for b in (1, args.batch)]
        rows[policy] = (budget or ctx, evaluation, speeds)
    print_table(rows, ctx, args.batch)
    print_targets(rows, model, ctx, args)
    return 0


def long_prompt(args, model) -> int:
    """The --long-prompt table: the evicting policies as infer.py --kv makes them (the model's context,
    default options); full/int8/int4 refuse a prompt longer than the context."""
    ctx = model.config.context_len
    check_flags(args, ctx)
    if args.long_prompt < 1:
        raise H2QError(f"--long-prompt must be >= 1, got {args.long_prompt}")
    val = validation_bytes(args, ctx)
    ids = [int(b) for b in (bytes(val) * (args.long_prompt // max(len(val), 1) + 1))[:args.long_prompt]]
    many = torch.get_num_threads()
    print(f"model {model.config}; one prompt of {len(ids)} bytes; {many} vs 1 threads interleaved, medians of "
          f"{args.repeats}")
    print(f"\n{'policy':<7} {'holds':>6} {'chunk':>6} {f'{many} threads s':>12} {'1 thread s':>11}")
    for policy in ("window", "h2o"):
        times = {many: [], 1: []}
        for _ in range(args.repeats):
            for threads in times:
                times[threads].append(kvbench.prefill_seconds(model, policy, ids, threads))
        chunk = make_cache(policy, model.config, 1).prefill_chunk
        print(f"{policy:<7} {ctx:>6} {chunk:>6} {statistics.median(times[many]):>12.2f} "
              f"{statistics.median(times[1]):>11.2f}")
    return 0


def persist(args, model) -> int:
    """The --persist table."""
    ctx = 64 if args.quick else args.persist_ctx
    check_flags(args, ctx)
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    if set(chosen) - set(policies()):
        raise H2QError(f"--policies must name only {', '.join(policies())}")
    val = validation_bytes(args, ctx)
    if len(val) < ctx:
        raise H2QError(f"the validation text has {len(val)} bytes, fewer than the context of {ctx}")
    ids = [int(b) for b in val[:ctx]]
    model.fingerprint = model.base_fingerprint()  # a random model's is computed once, as a loaded one's is read
    repeats = 2 if args.quick else args.repeats
    beyond = ctx > model.config.context_len
    print(f"model {model.config}, {torch.get_num_threads()} threads, {args.device}; context {ctx} bytes of "
          f"validation text{' (past the model context: positions untrained, timings only)' * beyond}; "
          f"medians of {repeats} interleaved repeats")
    print(f"\n{'policy':<7} {'holds':>6} {'KV memory':>10} {'file':>10} {'prefill ms':>11} {'save ms':>8} "
          f"{'restore ms':>11} {'restore vs prefill':>19} {'next logits':>12}")
    with tempfile.TemporaryDirectory() as folder:
        for policy in chosen:
            opts = dict(policy_options(args, ctx)[policy])
            report = kvbench.persist_costs(model, policy, ids, Path(folder), repeats, **opts)
            print(f"{policy:<7} {report.held:>6} {size(report.memory_bytes):>10} {size(report.file_bytes):>10} "
                  f"{1e3 * report.prefill_s:>11.1f} {1e3 * report.save_s:>8.1f} {1e3 * report.restore_s:>11.1f} "
                  f"{report.prefill_s / report.restore_s:>18.1f}x {'bit-exact' if report.exact else 'DIFFER':>12}")
    print("(restore = read the file, verify its content hash and base/weights/adapter identity, rebuild the cache; "
          "prefill = recompute the same cache from the text)")
    return 0


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def print_table(rows, ctx: int, batch: int) -> None:
    full = rows["full"][1]
    print(f"\n{'policy':<7} {'holds':>6} {'KV/token':>9} {f'KV @{ctx}':>10} {'peak':>10} {'vs fp32':>8} "
          f"{'val bpb':>8} {'change':>8} {'tok/s B=1':>10} {f'tok/s B={batch}':>11}")
    for policy, (max_len, ev, (speed_1, speed_n)) in rows.items():
        change = 100 * (ev.bits_per_byte / full.bits_per_byte - 1)
        print(f"{policy:<7} {min(max_len, ctx):>6} {size(ev.bytes_at_end / ctx):>9} {size(ev.bytes_at_end):>10} "
              f"{size(ev.bytes_peak):>10} {full.bytes_at_end / ev.bytes_at_end:>7.2f}x {ev.bits_per_byte:>8.4f} "
              f"{change:>+7.3f}% {speed_1:>10.0f} {speed_n:>11.0f}")
    print("(KV bytes are per row, bookkeeping included; 'peak' is the most held after any forward on the way, "
          "which for int8/int4 includes a part-filled full-precision residual)")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_targets(rows, model, ctx: int, args) -> None:
    print("\ntargets:")
    full = rows["full"][1]
    for policy, (max_worse, min_ratio) in TARGETS.items():
        if policy in rows:
            ev = rows[policy][1]
            worse, ratio = 100 * (ev.bits_per_byte / full.bits_per_byte - 1), full.bytes_at_end / ev.bytes_at_end
            peak_ratio = full.bytes_at_end / ev.bytes_peak
            print(f"  {policy}: bits per byte {worse:+.3f}% (target <= +{max_worse}%), KV memory {ratio:.2f}x "
                  f"less than fp32 at context {ctx} (target >= {min_ratio}x; at the peak {peak_ratio:.2f}x)"
                  f" -> {verdict(worse <= max_worse and ratio >= min_ratio)}")
    capacity = args.window_len or ctx // 2
    stream = kvbench.stream_window(model, args.stream_factor * ctx, capacity, sinks=args.sinks)
    print(f"  window: streamed {stream.tokens} tokens ({args.stream_factor}x the context of {ctx}) through a "
          f"{capacity}-token window at {stream.tokens_per_s:.0f} tok/s; bytes held once full: "
          f"{stream.bytes_min}..{stream.bytes_max} (target: flat) -> {verdict(stream.bytes_min == stream.bytes_max)}")
    new_tokens = 16 if args.quick else 64
    for batch in (1, args.batch):
        reference, factor = RECOMPUTE_REFERENCE[1 if batch == 1 else 20]
        recompute = kvbench.recompute_tokens_per_s(model, batch, ctx, steps=2 if args.quick or batch > 1 else 5)
        for compiled in (False, True) if args.compile else (False,):
            cached = kvbench.decode_tokens_per_s(model, "full", batch, ctx - new_tokens, new_tokens, compile=compiled)
            print(f"  batch {batch} at context {ctx}: cached decode {'compiled' if compiled else 'eager'} "
                  f"{cached:.0f} tok/s, recomputing the context every step (eager) {recompute:.1f} tok/s "
                  f"({cached / recompute:.1f}x); target >= {factor}x the reference {reference:.0f} tok/s = "
                  f"{factor * reference:.0f} tok/s -> {verdict(cached >= factor * reference)}")


if __name__ == "__main__":
    sys.exit(run_main(main))
