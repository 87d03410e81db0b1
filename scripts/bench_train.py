"""Training benchmark: matmul peak, training tokens/s and MFU per preset, and val bits per byte after a
fixed wall-clock budget on the default corpus; or h2q against nanoGPT side by side. Prints measured
figures only.

    python scripts/bench_train.py                      # all of it (~20 min on 2 cores)
    python scripts/bench_train.py --budget-min 0       # throughput only (~2 min)
    python scripts/bench_train.py --vs-nanogpt PATH    # h2q and a nanoGPT checkout, 5 min each, concurrently

The side-by-side mode (how the text, split, budget and scoring are made equal: scripts/side_by_side.py)
prints the run table: recipe, wall-clock, bytes seen and val loss on the text's held-out last 10%.
"""
import argparse
import shlex
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


def vs_nanogpt(args) -> int:
    """h2q's train.py and nanoGPT's train.py concurrently at one budget, scored on one held-out slice."""
    import side_by_side as sbs

    nanogpt = Path(args.vs_nanogpt).resolve()
    if not (nanogpt / "train.py").exists() or not (nanogpt / "model.py").exists():
        print(f"error: {nanogpt} is not a nanoGPT checkout (no train.py and model.py)", file=sys.stderr)
        return 2
    h2q_root = Path(args.h2q_root).resolve()
    h2q_args = shlex.split(args.h2q_args)
    budget_s = args.budget_min * 60
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_vs_nanogpt_")).resolve()
    d = sbs.prepare_data(work)
    print(f"work folder {work}: text {d.text.stat().st_size:,} bytes, held-out last 10% "
          f"{d.held_out.stat().st_size:,} bytes; both train on the same {d.train_bytes:,} bytes "
          f"(validation {d.val_bytes:,}) of the first 90%")

    print(f"load average before the probe: {sbs.load_average()}")
    probe = sbs.nanogpt_job(nanogpt, d, work / "probe_nanogpt", args.probe_iters, args.probe_iters)
    load = sbs.h2q_job(h2q_root, d, work / "probe_h2q", 1, [*h2q_args, "--steps", "30", "--eval-every", "1000"])
    sbs.run_concurrently([probe, load])
    max_iters, interval, timing = sbs.fit_nanogpt_iters(probe, args.probe_iters, budget_s - args.margin_s)
    print(f"nanoGPT probe ({args.probe_iters} iters, h2q running alongside): {timing['step_s'] * 1000:.1f} ms/iter, "
          f"{timing['eval_s']:.2f} s per eval+save, {timing['fixed_s']:.1f} s startup -> max_iters {max_iters:,}, "
          f"eval_interval {interval}")

    print(f"load average before the runs: {sbs.load_average()}", flush=True)
    runs = [sbs.nanogpt_job(nanogpt, d, work / "nanogpt", max_iters, interval),
            sbs.h2q_job(h2q_root, d, work / "h2q", args.budget_min, h2q_args)]
    sbs.run_concurrently(runs, deadline_s=budget_s + args.grace_s)
    print(f"load average after the runs: {sbs.load_average()}")
    ng, h2q = sbs.score_nanogpt(nanogpt, work / "nanogpt", d), sbs.score_h2q(h2q_root, work / "h2q", d)
    assert ng["bytes_scored"] == h2q["bytes_scored"]
    rows = [("nanoGPT", sbs.nanogpt_recipe(max_iters, ng["steps"]), runs[0], ng),
            ("h2q", sbs.h2q_recipe(h2q["summary"], h2q_args, args.budget_min), runs[1], h2q)]
    print("\n| run | recipe | wall-clock | bytes seen | val loss on the file's last 10% |")
    print("|---|---|---|---|---|")
    for name, recipe, job, result in rows:
        late = " (stopped by SIGINT)" if job.interrupted else ""
        print(f"| {name} | {recipe} | {job.wall_s:.0f} s{late} | {result['bytes_seen'] / 1e6:.2f}M "
              f"| **{result['nats_per_byte']:.3f} nats/byte** |")
    print("\n" + ", ".join(f"{job.name} got {job.cpu_s / job.wall_s:.0%} of a core ({job.cpu_s:.0f} CPU s)"
                            for _, _, job, _ in rows))
    print(f"h2q - nanoGPT: {h2q['nats_per_byte'] - ng['nats_per_byte']:+.3f} nats/byte "
          f"({ng['bytes_scored']:,} held-out bytes scored, each model at its own context, 1 thread each)")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--presets", default="tiny,mini,small", help="presets for the throughput table")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the throughput table")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per preset")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--budget-min", type=float, default=5.0, help="wall-clock minutes per budget run (0 = skip)")
    p.add_argument("--budget-presets", default="mini,small")
    side = p.add_argument_group("side by side with nanoGPT")
    side.add_argument("--vs-nanogpt", metavar="PATH", help="a karpathy/nanoGPT checkout: run it and h2q concurrently")
    side.add_argument("--h2q-root", default=str(Path(__file__).resolve().parents[1]),
                      help="the h2q checkout whose train.py runs (default: this one)")
    side.add_argument("--h2q-args", default="", help="extra train.py flags, one string")
    side.add_argument("--work", help="folder for the text, logs and checkpoints (default: a new temporary one)")
    side.add_argument("--probe-iters", type=int, default=60, help="nanoGPT iterations timed to fit max_iters")
    side.add_argument("--margin-s", type=float, default=3.0, help="seconds of the budget nanoGPT's fit leaves free")
    side.add_argument("--grace-s", type=float, default=15.0, help="seconds past the budget before SIGINT")
    args = p.parse_args(argv)
    if args.vs_nanogpt:
        return vs_nanogpt(args)
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
                                        eval_every=10**9, progress=False))  # train.py's own recipe
        print(f"| {preset} | {args.budget_min:g} min | {summary['steps']} | {summary['tokens_seen']:,} "
              f"| {summary['final']['val_bpb']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
