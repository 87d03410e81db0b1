"""The sweep behind train.py's defaults: variants of the recipe (batch and block, optimizer, dtype,
learning rate, warmup, preset, --compile) trained side by side on the bench text of
scripts/side_by_side.py and scored on its held-out last 10%. Prints the table of every run recorded.

    python scripts/sweep_train.py --sweep optimizer --sweep lr     # run two sweeps, then print the table
    python scripts/sweep_train.py                                  # print the table of the recorded runs
    python scripts/sweep_train.py --step-times                     # why bf16 autocast keeps attention fp32

`--step-times` times, on one thread and interleaved, a `mini` training step (forward, backward) in fp32
and under bf16 autocast (as train.py runs it: attention in fp32, h2q/model.py), and the causal
attention alone (forward and backward) on bf16 and on fp32 tensors of the same shapes.

How a sweep runs: the variants of one sweep start together as subprocesses with one thread each, so
that what else the machine runs hits them alike; each differs from train.py's defaults by the flags
listed in SWEEPS. The budget is CPU seconds of each process (`--clock cpu`, the default: the process's
own CPU time since it started, start-up included, so a busy machine slows the sweep but does not
change its figures) or wall-clock seconds (`--clock wall`, as `train.py --time-budget` counts; used
for --compile, whose compile time is what is in question). Scoring is side_by_side's: every byte of
the held-out slice, each model at the context it trained.

Every run appends one JSON record to --records (default: sweep_train.jsonl in --work); the table lists
all of them, so records of earlier sweeps, or of runs measured the same way by other means, show up
next to new ones (a record's "source" says where it came from).
"""
import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import side_by_side as sbs

from h2q.train import preset_name

# sweep -> variants (label, train.py flags beyond the defaults); the defaults' own row is the one with no flags
SWEEPS = {
    "shape": [("batch 8 x block 256", "--batch-size 8 --block-size 256"), ("batch 12 x block 64", "--batch-size 12"),
              ("batch 32 x block 64", "")],
    "optimizer": [("AdamW", "--optimizer adamw"), ("Muon + AdamW", "")],
    "dtype": [("fp32", "--dtype float32"), ("bf16 autocast", "--dtype bfloat16")],
    "lr": [("lr 2e-3", ""), ("lr 4e-3", "--lr 4e-3")],
    "warmup": [("warmup 50", ""), ("warmup 200", "--warmup 200")],
    "preset": [("mini", ""), ("small", "--preset small")],
    "compile": [("eager", ""), ("--compile", "--compile")],
}
WALL_CLOCK_SWEEPS = {"compile"}  # compile time counts only on the wall clock

# train.py on a clock of the sweep's choice: the budget counts from the process start on that clock
TRAIN_ON_CLOCK = r'''
import sys, time
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, run_main
from h2q.train import TrainConfig, process_started, train

def main(argv=None):
    clock = {"cpu": time.process_time, "wall": time.monotonic}[sys.argv[1]]
    parser = Parser(prog="train.py")
    add_dataclass_flags(parser, TrainConfig)
    started = 0.0 if sys.argv[1] == "cpu" else process_started()  # process_time is 0 at the process start
    train(dataclass_from_args(TrainConfig, parser.parse_args(sys.argv[2:])), clock=clock, started=started)
    return 0

sys.exit(run_main(main))
'''


def run_sweep(name: str, d: sbs.BenchData, work: Path, budget_s: float, clock: str, records: Path) -> None:
    clock = "wall" if name in WALL_CLOCK_SWEEPS else clock
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    jobs, flags = [], []
    for i, (label, extra) in enumerate(SWEEPS[name]):
        out = work / "runs" / f"{name}-{int(time.time())}-{i}"
        args = ["--data-dir", str(d.h2q_dir), "--data-root", str(d.h2q_root), "--out", str(out),
                "--time-budget", f"{budget_s / 60:g}", "--no-progress", *shlex.split(extra)]
        jobs.append(sbs.Job(label, [sys.executable, "-c", TRAIN_ON_CLOCK, clock, *args], sbs.REPO,
                            out.with_suffix(".log")))
        flags.append(extra)
    load_start = sbs.load_average()
    sbs.run_concurrently(jobs)
    load_end = sbs.load_average()
    for job, extra in zip(jobs, flags):
        out = job.log.with_suffix("")
        if job.proc.returncode != 0:
            print(f"{name} / {job.name}: failed, see {job.log}", file=sys.stderr)
            continue
        result = sbs.score_h2q(sbs.REPO, out, d)
        summary = result.pop("summary")
        cfg = summary["train_config"]
        record = {"source": f"scripts/sweep_train.py, {stamp}", "sweep": name, "variant": job.name, "flags": extra,
                  "batch": cfg["batch_size"], "block": cfg["block_size"] or summary["model_config"]["context_len"],
                  "preset": preset_name(summary["model_config"]), "optimizer": cfg["optimizer"], "schedule": "wsd",
                  "dtype": summary.get("autocast_dtype", cfg["dtype"]), "lr": cfg["lr"], "warmup": cfg["warmup"],
                  "compile": cfg["compile"], "clock": clock, "budget_s": budget_s, "wall_s": round(job.wall_s, 1),
                  "cpu_s": round(job.cpu_s, 1), "steps": result["steps"], "bytes_seen": result["bytes_seen"],
                  "nats_per_byte": result["nats_per_byte"], "load": f"{load_start} -> {load_end}"}
        with open(records, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def print_table(records: Path) -> None:
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()] if records.exists() else []
    print("| sweep | variant | preset | batch x block | optimizer | schedule | dtype | lr | warmup | compile | budget "
          "| steps | bytes seen | val nats/byte (held-out 10%) | load 1-min start -> end | source |")
    print("|---" * 16 + "|")
    for r in rows:
        load = " -> ".join(part.split()[0] for part in r["load"].split(" -> "))
        print(f"| {r['sweep']} | {r['variant']} | {r['preset']} | {r['batch']} x {r['block']} | {r['optimizer']} "
              f"| {r['schedule']} | {r['dtype']} | {r['lr']:g} | {r['warmup']} | {'yes' if r['compile'] else 'no'} | {r['budget_s']:.0f} {r['clock']} s "
              f"| {r['steps']:,} | {r['bytes_seen'] / 1e6:.2f}M | {r['nats_per_byte']:.3f} | {load} | {r['source']} |")


def step_times(batch: int, block: int, rounds: int = 5) -> None:
    """Median seconds (thread CPU time) of interleaved training steps and attention passes."""
    import torch
    import torch.nn.functional as F

    from h2q.config import PRESETS
    from h2q.model import Transformer
    from h2q.train import autocast_for

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(PRESETS["mini"])
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (batch, block))
    qkv = {d: [torch.randn(batch, cfg.n_head, block, cfg.head_dim, dtype=d, requires_grad=True) for _ in range(3)]
           for d in (torch.float32, torch.bfloat16)}

    def train_step(dtype):
        with autocast_for(torch.device("cpu"), dtype):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def attention(dtype):
        F.scaled_dot_product_attention(*qkv[dtype], is_causal=True).float().sum().backward()

    work = {f"{what} {name}": (fn, dtype) for what, fn in (("training step", train_step), ("attention", attention))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    seconds = {k: [] for k in work}
    for _ in range(rounds + 1):  # the first round warms up
        for k, (fn, dtype) in work.items():
            start = time.thread_time()
            fn(dtype)
            seconds[k].append(time.thread_time() - start)
    print(f"mini, batch {batch} x block {block}, 1 thread, median of {rounds} interleaved (thread CPU time):")
    for k, s in seconds.items():
        print(f"  {k}: {statistics.median(s[1:]) * 1000:,.1f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="append", default=[], choices=sorted(SWEEPS), help="a sweep to run (repeatable)")
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds per run on --clock")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="what the budget counts (see above)")
    p.add_argument("--work", default="sweep_train", help="folder for the text, runs and records")
    p.add_argument("--records", help="the JSONL file of records (default: WORK/sweep_train.jsonl)")
    p.add_argument("--step-times", action="store_true", help="time fp32 and bf16 steps and attention (see above)")
    p.add_argument("--batch-block", default="32x64", help="--step-times shape, BATCHxBLOCK")
    args = p.parse_args(argv)
    if args.step_times:
        step_times(*map(int, args.batch_block.split("x")))
        return 0
    work = Path(args.work).resolve()
    records = Path(args.records) if args.records else work / "sweep_train.jsonl"
    if args.sweep:
        d = sbs.prepare_data(work)
        for name in args.sweep:
            run_sweep(name, d, work, args.budget_s, args.clock, records)
    print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
