"""Benchmark the evolve strategies: N cycles of each on held-out world seeds, from the trained base.

    python scripts/bench_evolve.py                 # 20 cycles x hybrid/evolution/gradient/meta, small base
    python scripts/bench_evolve.py --quick         # smoke run: 2 cycles, tiny random base, 4 agents

Prints per cycle the best and median agent's food rate as % of the scripted oracle on the same fresh
seeds, then a table: strategy | best % oracle | median % oracle | wall time per cycle, the time of one
life of 500 ticks x 20 agents with learning on (the original design expected 2-5 minutes; measured when
--steps is 500, else extrapolated from the measured life time per tick, and marked so), and the tensor
bytes of base + adapters (+ optimizer state, shown apart). Every figure is measured in this run.
Targets (2-core CPU): hybrid best >= 80 % and median >= 50 % of the oracle within 20 cycles, hybrid
ahead of evolution and gradient, one cycle <= 60 s, base (int8) + 20 adapters + caches <= 30 MB.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from h2q.checkpoint import resolve_model_file  # noqa: E402
from h2q.evolve.evolution import BreedConfig  # noqa: E402
from h2q.evolve.run import EvolveConfig, Runner, evolve  # noqa: E402
from h2q.evolve.text_env import TextConfig  # noqa: E402

MB = 1e6


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="checkpoints/base", help="trained base; falls back to an untrained "
                   "--preset base when missing")
    p.add_argument("--preset", default="small", help="model size of the untrained fallback")
    p.add_argument("--strategies", default="hybrid,evolution,gradient,meta")
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--steps", type=int, default=200, help="world ticks per life")
    p.add_argument("--eval-episodes", type=int, default=2)
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                   help="base weights of the runs (evolve.py's default: none); memory is also shown for int8")
    p.add_argument("--memory", type=int, default=0, help="past lines each agent keeps in its KV cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one, removed)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 cycles, tiny untrained base, 4 agents")
    args = p.parse_args(argv)
    if args.quick:
        args.base, args.preset, args.cycles, args.agents, args.steps, args.eval_episodes = "random", "tiny", 2, 4, 20, 1
        args.threads = args.threads or 1
    return args


def memory(cfg: EvolveConfig, breed: BreedConfig) -> dict[str, float]:
    """Tensor bytes (MB) the agents hold: the quantized base, the bank of adapters, the KV caches
    (shared prefix + memory), and apart from those the learner's optimizer state and buffers."""
    runner = Runner(cfg, breed, TextConfig())
    held = runner.env.policy.nbytes()
    learner = runner.env.learner.nbytes()
    return {"base": held["base"] / MB, "adapters": held["adapters"] / MB,
            "caches": (held["prefix_cache"] + held["memory_cache"]) / MB,
            "optimizer": learner["optimizer"] / MB, "buffers": learner["buffers"] / MB}


def main(argv=None) -> int:
    args = parse(argv)
    print("command: python " + " ".join(shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *sys.argv[1:]]))
    base = args.base
    if base != "random" and not resolve_model_file(base).exists():
        print(f"note: no trained base at {base}; using an untrained {args.preset} base (train one with `python train.py`)")
        base = "random"
    strategies = args.strategies.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_evolve_") as tmp:
        root = Path(args.out or tmp)
        rows = []
        for strategy in strategies:
            cfg = EvolveConfig(base=base, preset=args.preset, out=str(root / strategy), cycles=args.cycles,
                               agents=args.agents, steps=args.steps, eval_episodes=args.eval_episodes,
                               quant=args.quant, memory=args.memory, seed=args.seed, device="cpu",
                               threads=args.threads, keep_cycles=1, progress=False)
            records = []

            def show(cycle, record, strategy=strategy):
                records.append(record)
                print(f"{strategy:9s} cycle {cycle:3d}: best {record['best_pct_oracle']:6.1f} % | median "
                      f"{record['median_pct_oracle']:6.1f} % of oracle | {record['wall_s']:6.1f} s", flush=True)

            evolve(cfg, BreedConfig(strategy=strategy), TextConfig(), on_cycle=show)
            rows.append((strategy, records))
        first = rows[0][1][0]
        live_per_tick = np.mean([r["live_s"] for _, recs in rows for r in recs if r["strategy"] != "evolution"]
                                or [np.nan]) / args.steps
        mem = {}
        for quant in dict.fromkeys([args.quant, "int8"]):  # the runs' base, and the int8 one the target names
            cfg = EvolveConfig(base=base, preset=args.preset, out=str(root / f"memory-{quant}"), agents=args.agents,
                               quant=quant, memory=args.memory, device="cpu", progress=False)
            mem[quant] = memory(cfg, BreedConfig())
    print(f"\n{'strategy':10s} | {'best % oracle':>13s} | {'median % oracle':>15s} | {'peak best %':>11s} | "
          f"{'wall s/cycle':>12s} | {'live s':>6s} | {'eval s':>6s}")
    for strategy, recs in rows:
        last = recs[-1]
        peak = max(recs, key=lambda r: r["best_pct_oracle"])
        peak_text = f"{peak['best_pct_oracle']:.1f} (c{peak['cycle']})"
        mean = {k: np.mean([r[k] for r in recs]) for k in ("wall_s", "live_s", "eval_s")}
        print(f"{strategy:10s} | {last['best_pct_oracle']:13.1f} | {last['median_pct_oracle']:15.1f} | {peak_text:>11s} | "
              f"{mean['wall_s']:12.1f} | {mean['live_s']:6.1f} | {mean['eval_s']:6.1f}")
    print("(best / median % oracle: the last cycle's; peak best: the highest best over the cycles)")
    label = "measured" if args.steps == 500 else f"extrapolated from {args.steps}-tick lives"
    print(f"\none life of 500 ticks x {args.agents} agents, learning on: {live_per_tick * 500:.1f} s ({label}); "
          f"the original design expected 120-300 s")
    print(f"oracle fitness {first['oracle']:.4f}, random {first['random']:.4f} (cycle 1, per agent)")
    for quant, held in mem.items():
        total = held["base"] + held["adapters"] + held["caches"]
        print(f"tensors: base ({quant}) {held['base']:.2f} MB + {args.agents} adapters {held['adapters']:.2f} MB + caches "
              f"{held['caches']:.2f} MB = {total:.2f} MB (target, int8 base: <= 30 MB); apart: learner optimizer "
              f"state {held['optimizer']:.2f} MB, experience buffers {held['buffers']:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
