"""Training benchmark: matmul peak, training tokens/s and MFU per preset, and val bits per byte after a
fixed wall-clock budget on the default corpus. Prints measured figures only.

    python scripts/bench_train.py                      # all of it (~20 min on 2 cores)
    python scripts/bench_train.py --budget-min 0       # throughput only (~2 min)
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from h2q import data
from h2q.cli import resolve_device, run_main
from h2q.config import PRESETS
from h2q.model import Transformer
from h2q.perf import matmul_peak_gflops
from h2q.train import TrainConfig, make_optimizer, train

REFERENCE_TOK_S = 1280  # a well-known minimal GPT trainer at the small shape on these 2 cores (issue #2)


def train_throughput(preset, batch_size, corpus, device, steps, compile_model) -> tuple[float, float]:
    """Median training tokens/s over `steps` timed steps (after two warm-up steps) and FLOPs per token."""
    torch.manual_seed(0)
    model = Transformer(PRESETS[preset]).to(device)
    T = model.config.context_len
    cfg = TrainConfig(batch_size=batch_size)
    optimizer = make_optimizer(list(model.named_parameters()), cfg, device)
    forward = torch.compile(model) if compile_model else model
    sampler = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        x, y = data.get_batch(corpus.train, batch_size, T, sampler, device)
        t = time.perf_counter()
        loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return batch_size * T / statistics.median(times), model.flops_per_token(T)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--presets", default="tiny,mini,small", help="presets for the throughput table")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per preset")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--budget-min", type=float, default=5.0, help="wall-clock minutes per budget run (0 = skip)")
    p.add_argument("--budget-presets", default="mini,small")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = matmul_peak_gflops(device, torch.float32)
    print(f"fp32 matmul peak: {peak:,.1f} GFLOP/s (2048^2, median of 15 after 1 s of warm-up)")
    if device.type == "cpu":
        print(f"bf16 matmul: {matmul_peak_gflops(device, torch.bfloat16, n=512, repeats=3):,.2f} GFLOP/s (512^2)")
    corpus = data.load_corpus(None, max(PRESETS[p].context_len for p in args.presets.split(",")))

    print(f"\n| preset | params | context | batch | compile | train tokens/s | MFU | vs reference {REFERENCE_TOK_S} tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for compiled in ([False, True] if args.compile else [False]):
            tok_s, flops = train_throughput(preset, args.batch_size, corpus, device, args.steps, compiled)
            mfu = tok_s * flops / (peak * 1e9)
            n = Transformer(PRESETS[preset]).num_params()
            print(f"| {preset} | {n/1e6:.2f}M | {PRESETS[preset].context_len} | {args.batch_size} | {compiled} "
                  f"| {tok_s:,.0f} | {mfu:.1%} | {tok_s / REFERENCE_TOK_S:.2f}x |", flush=True)
    if args.budget_min <= 0:
        return 0
    print("\n| preset | wall-clock budget | steps | tokens | val bits/byte |")
    print("|---|---|---|---|---|")
    for preset in args.budget_presets.split(","):
        with tempfile.TemporaryDirectory() as out:
            summary = train(TrainConfig(preset=preset, time_budget=args.budget_min, out=out, device=str(device),
                                        batch_size=args.batch_size, eval_every=10**9, progress=False))
        print(f"| {preset} | {args.budget_min:g} min | {summary['steps']} | {summary['tokens_seen']:,} "
              f"| {summary['final']['val_bpb']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
