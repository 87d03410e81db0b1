"""Benchmark LoRA serving and training: `python scripts/bench_lora.py [--ckpt checkpoints/base | --random]`.

N agents (default 20), each its own rank-8 adapter, each with one 64-byte sequence:
* one batched multi-adapter forward (AdapterBank.bind) vs N sequential single-adapter forwards, and vs
  the same batch with no adapters (the overhead of serving N agents at once);
* bytes per adapter, for all N, and base + N adapters with an fp32 base and an int8 base;
* one adapter-only training step (frozen base, one optimizer over the bank) vs a full-model step.
Timings are medians of --repeats runs after --warmup runs, the variants taking turns; forwards under
torch.inference_mode. On cores shared with other work, `--threads 1 --clock cpu` gives steadier figures
(oversubscribed OpenMP threads inflate the many small LoRA ops far more than the big matmuls).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from h2q import checkpoint, lora
from h2q.cli import run_main
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.model import Transformer
from h2q.perf import matmul_peak_gflops

MB = 1e6


def median_seconds(fns: dict, warmup: int, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median time of each function; the functions take turns, so load from other processes on
    shared cores falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def int8_base_bytes(model: Transformer) -> tuple[int, str]:
    """Size of the base with int8 linears: measured on h2q.quant's int8 model when that module exists,
    else by formula: 1 byte per linear weight + an fp32 scale per output channel, the rest fp32."""
    try:
        from h2q import quant
    except ImportError:
        quant = None
    if quant is not None:
        qmodel = quant.quantize(copy.deepcopy(model), "int8", clip_search=False)  # size needs no clip search
        return quant.model_bytes(qmodel), "measured: h2q.quant int8"
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() + 4 * module.out_features
        else:
            total += sum(4 * p.numel() for p in module.parameters(recurse=False))
    return total, "formula (no h2q.quant)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="checkpoints/base", help="base checkpoint (default: checkpoints/base)")
    parser.add_argument("--random", action="store_true", help="use a randomly initialised `small` base instead")
    parser.add_argument("--agents", type=int, default=20, help="adapters / sequences in the batch (default: 20)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="bytes per sequence (default: 64)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs, median reported (default: 15)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed runs: a smoke test")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (steadier on busy shared cores; with "
                             "--threads 1 it equals wall time on an idle machine) (default: wall)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.warmup, args.repeats = 1, 3
    if args.random:
        torch.manual_seed(0)
        model, source = Transformer(PRESETS["small"]).eval(), "random `small` base"
    else:
        if not checkpoint.resolve_model_file(args.ckpt).exists():
            raise H2QError(f"no base checkpoint at {args.ckpt}; train one (python train.py) or pass --random")
        model, _ = checkpoint.load_model(args.ckpt)
        source = f"base {args.ckpt}"
    lora.freeze_base(model)
    n, T = args.agents, args.seq_len
    cfg = lora.LoraConfig(r=args.rank)
    g = torch.Generator().manual_seed(0)
    bank = lora.AdapterBank(model, cfg, n, generator=g)
    with torch.no_grad():  # as if trained: a zero B would not change timings, but keep it honest
        for B in bank.lora_B:
            B.copy_(torch.randn(B.shape, generator=g) * 0.01)
    singles = [bank.adapter(i) for i in range(n)]
    ids = torch.randint(0, 256, (n, T + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]  # (n, T) each
    index = torch.arange(n)
    print(f"{source}: {model.config}; {n} adapters of rank {args.rank} over {','.join(cfg.target_names)}; "
          f"batch {n} x {T} bytes; {torch.get_num_threads()} threads; median {args.clock} time of {args.repeats}")

    with torch.inference_mode():
        secs = median_seconds({
            "plain": lambda: model(x),
            "batched": lambda: model(x, adapters=bank.bind(index)),
            "sequential": lambda: [model(x[i:i + 1], adapters=singles[i]) for i in range(n)],
        }, args.warmup, args.repeats, clock)

    def train_step(net, opt, adapters):
        loss = F.cross_entropy(net(x, adapters=adapters).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    bank.train()
    bank_opt = torch.optim.AdamW(bank.parameters(), lr=1e-3)
    full = copy.deepcopy(model).requires_grad_(True).train()
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-3)
    secs.update(median_seconds({
        "adapter_step": lambda: train_step(model, bank_opt, bank.bind(index)),
        "full_step": lambda: train_step(full, full_opt, None),
    }, args.warmup, args.repeats, clock))
    t_plain, t_batched, t_sequential = secs["plain"], secs["batched"], secs["sequential"]
    t_adapter_step, t_full_step = secs["adapter_step"], secs["full_step"]

    adapter_bytes = lora.count_bytes(singles[0])
    fp32_base = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    int8_base, int8_how = int8_base_bytes(model)
    speedup, overhead = t_sequential / t_batched, t_batched / t_plain - 1
    # the batched forward cannot beat its FLOPs at this machine's matmul peak: that caps the speedup
    peak = matmul_peak_gflops("cpu") * 1e9
    batched_flops = n * T * model.flops_per_token(T, training=False)
    fastest_batched = batched_flops / peak
    rows = [
        ("forward, no adapters", f"{t_plain * 1e3:.1f} ms", ""),
        (f"forward, {n} adapters batched", f"{t_batched * 1e3:.1f} ms", ""),
        (f"forward, {n} adapters one by one", f"{t_sequential * 1e3:.1f} ms", ""),
        ("batched vs one by one", f"{speedup:.1f}x faster", ">= 8x" + _ok(speedup >= 8)),
        (f"  bound: {batched_flops / 1e9:.1f} GFLOP at the {peak / 1e9:.0f} GFLOP/s matmul peak",
         f">= {fastest_batched * 1e3:.1f} ms", f"so at most {t_sequential / fastest_batched:.1f}x here"),
        ("batched overhead vs no adapters", f"{overhead * 100:+.1f}%", "<= 25%" + _ok(overhead <= 0.25)),
        ("bytes per adapter", f"{adapter_bytes / MB:.3f} MB", "<= 1 MB" + _ok(adapter_bytes <= MB)),
        (f"bytes for {n} adapters", f"{n * adapter_bytes / MB:.2f} MB", ""),
        (f"fp32 base + {n} adapters", f"{(fp32_base + n * adapter_bytes) / MB:.2f} MB", ""),
        (f"int8 base + {n} adapters", f"{(int8_base + n * adapter_bytes) / MB:.2f} MB",
         "<= 30 MB" + _ok(int8_base + n * adapter_bytes <= 30 * MB)),
        ("  int8 base alone", f"{int8_base / MB:.2f} MB", int8_how),
        (f"train step, {n} adapters (frozen base)", f"{t_adapter_step * 1e3:.1f} ms", ""),
        ("train step, full model", f"{t_full_step * 1e3:.1f} ms", ""),
        ("adapter step / full step", f"{t_adapter_step / t_full_step:.2f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'measured':>16}  target")
    for name, measured, target in rows:
        print(f"{name:<{width}}  {measured:>16}  {target}")
    return 0


def _ok(passed: bool) -> str:
    return "  ok" if passed else "  MISSED"


if __name__ == "__main__":
    sys.exit(run_main(main))
