"""Benchmark the social env: hybrid (learning + evolution) against gradient (learning, no evolution) over
several run seeds, through the evolve runner, on the held-out evaluation episode of every cycle.

    python scripts/bench_social.py --base checkpoints/base          # 20 cycles x 3 seeds x hybrid/gradient
    python scripts/bench_social.py --quick                          # smoke run: tiny untrained base

Per run it prints every cycle's held-out figures (as metrics.jsonl records them): post fluency (bits/byte
under the base), topic accuracy, distinct-2, likes per post, follow density, fitness, wall time. The cycle-0
population (the runner's initial adapters, before any life) is evaluated on the same episode first. Then:
* per strategy, the last cycle against cycle 0 and the targets: fluency better than cycle 0, topic
  accuracy >= 80 %, distinct-2 >= 0.5 x the base model's;
* engagement (likes per post, last cycle): hybrid vs gradient, the mean over run seeds with a 95 %
  stratified-bootstrap interval, and P(hybrid > gradient) with its interval (h2q/evolve/stats.py);
* seconds per cycle, measured in these runs (with --threads and whatever else the machine runs), against
  the 90 s target for 2 cores.
Every figure is measured in this run. Results are also written to OUT/bench_social.json after every run,
so an interrupted bench still leaves its partial table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from h2q.checkpoint import atomic_write_json, resolve_model_file  # noqa: E402
from h2q.evolve import run  # noqa: E402
from h2q.evolve.evolution import BreedConfig, Population  # noqa: E402
from h2q.evolve.social_env import SocialConfig, SocialEnv, SocialRenderer  # noqa: E402
from h2q.evolve.stats import improvement_ci, stratified_bootstrap_ci  # noqa: E402
from h2q.evolve.text_env import TextConfig  # noqa: E402
from h2q.lora import LoraConfig  # noqa: E402

FIGURES = ("post_bpb", "topic_acc", "distinct2", "likes_per_post", "follow_density", "clustering", "mean")
REGISTERED = "social" in [c for f in run.EvolveConfig.__dataclass_fields__.values() if f.name == "env"
                          for c in f.metadata["choices"]]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="checkpoints/base", help="trained base checkpoint folder")
    p.add_argument("--strategies", default="hybrid,gradient")
    p.add_argument("--seeds", default="0,1,2", help="run seeds")
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--steps", type=int, default=16, help="ticks per life")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one, removed)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny untrained base, 2 cycles, 2 seeds, 6 agents")
    args = p.parse_args(argv)
    if args.quick:
        args.base, args.cycles, args.agents, args.steps, args.seeds = "random", 2, 6, 2, "0,1"
    return args


def social_config(quick: bool) -> SocialConfig:
    return SocialConfig(post_bytes=16, prompt_bytes=8, eval_ticks=2, feed_size=3, feed_random=1) if quick \
        else SocialConfig()


def patch_runner(social: SocialConfig) -> None:
    """Until h2q/evolve/run.py registers `--env social`: the runner's env factory and summary line,
    here only (the runs' config.json then says env "text")."""
    def make_env(self, text):
        render = SocialRenderer() if self.cfg.render and self.lead else None
        return SocialEnv(self.model, self.local, social, self.cfg.temperature, self.lo, render)

    run.Runner._make_env = make_env
    run.summary_line = lambda record, cycles: (f"cycle {record['cycle']}/{cycles} | best {record['best']:.3f} | "
                                               f"median {record['median']:.3f} | {record['wall_s']:.1f} s")


def evolve_config(args, base: str, out: Path, seed: int) -> run.EvolveConfig:
    return run.EvolveConfig(base=base, preset="tiny" if args.quick else "mini", out=str(out), cycles=args.cycles,
                            agents=args.agents, steps=args.steps, env="social" if REGISTERED else "text",
                            seed=seed, device="cpu", threads=args.threads, keep_cycles=1, progress=False)


def cycle_zero(cfg: run.EvolveConfig, breed: BreedConfig, social: SocialConfig) -> dict:
    """The held-out figures of the runner's initial population (its init seed), before any life."""
    model = run.load_base(cfg, torch.device("cpu"))
    init = torch.Generator().manual_seed(run.seed_for(cfg.seed, 0, "init"))
    pop = Population.initial(model.config, LoraConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha), cfg.agents,
                             breed.bank_rank(cfg.lora_rank), cfg.lr, cfg.temperature, breed.mutation_rate, init)
    env = SocialEnv(model, pop.bank, social, cfg.temperature)
    ev = env.evaluate(pop.agents, run.seed_for(cfg.seed, 0, "eval"), lambda: None)
    return {**ev.references, "mean": float(ev.fitness.mean())}


def show(label: str, cycle: int, r: dict) -> None:
    print(f"{label} cycle {cycle:2d}: bpb {r['post_bpb']:.3f} | topic {100 * r['topic_acc']:5.1f} % | distinct-2 "
          f"{r['distinct2']:.3f} | likes/post {r['likes_per_post']:.3f} | density {r['follow_density']:.3f} | "
          f"fitness mean {r['mean']:.3f} | {r.get('wall_s', 0):.1f} s", flush=True)


def ci_text(values: np.ndarray) -> str:
    point, low, high = stratified_bootstrap_ci(values[:, None], statistic=lambda s: s.mean(axis=(-2, -1)))
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print("command: python " + " ".join(shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *sys.argv[1:]]))
    if args.base != "random" and not resolve_model_file(args.base).exists():
        print(f"error: no trained base at {args.base}; train one with `python train.py` or pass --base")
        return 2
    social = social_config(args.quick)
    if not REGISTERED:
        print("note: run.py does not register --env social yet; the runner's env factory is patched here")
        patch_runner(social)
    strategies, seeds = args.strategies.split(","), [int(s) for s in args.seeds.split(",")]
    results: dict = {"config": vars(args), "social": social.__dict__, "runs": {}, "cycle0": {}}
    with tempfile.TemporaryDirectory(prefix="bench_social_") as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            zero = cycle_zero(evolve_config(args, args.base, root / "cycle0", seed), BreedConfig(), social)
            results["cycle0"][seed] = zero
            show(f"seed {seed} cycle-0 population", 0, zero)
            for strategy in strategies:
                label = f"seed {seed} {strategy:8s}"
                cfg = evolve_config(args, args.base, root / f"{strategy}-s{seed}", seed)
                records = []

                def on_cycle(cycle, record, label=label):
                    records.append(record)
                    show(label, cycle, record)

                extra = {"social": social} if REGISTERED else {}
                run.evolve(cfg, BreedConfig(strategy=strategy), TextConfig(), on_cycle=on_cycle, **extra)
                results["runs"][f"{strategy}-s{seed}"] = records
                atomic_write_json(root / "bench_social.json", results)
        report(results, strategies, seeds, args.cycles)
        if args.out:
            print(f"runs and bench_social.json in {root}")
    return 0


def report(results: dict, strategies: list[str], seeds: list[int], cycles: int) -> None:
    zero = results["cycle0"]
    print(f"\n{'strategy':9s} | {'cycles':>6s} | {'bpb c0 -> last':>16s} | {'topic % (>= 80)':>15s} | "
          f"{'distinct-2 / base (>= 0.5)':>26s} | {'likes/post':>10s} | {'fitness':>7s} | {'s/cycle':>7s}")
    engagement = {}
    for strategy in strategies:
        runs = [(seed, results["runs"].get(f"{strategy}-s{seed}", [])) for seed in seeds]
        runs = [(seed, recs) for seed, recs in runs if recs]
        if not runs:
            continue
        last = [recs[-1] for _, recs in runs]
        c0 = np.mean([zero[seed]["post_bpb"] for seed, _ in runs])
        bpb = np.mean([r["post_bpb"] for r in last])
        ratio = np.mean([r["distinct2"] / r["base_distinct2"] if r["base_distinct2"] else np.nan for r in last])
        engagement[strategy] = np.array([r["likes_per_post"] for r in last])
        done = min(len(recs) for _, recs in runs)
        print(f"{strategy:9s} | {done:6d} | {c0:7.3f} -> {bpb:6.3f} | {100 * np.mean([r['topic_acc'] for r in last]):15.1f} | "
              f"{ratio:26.3f} | {engagement[strategy].mean():10.3f} | {np.mean([r['mean'] for r in last]):7.3f} | "
              f"{np.mean([r['wall_s'] for _, recs in runs for r in recs]):7.1f}")
    base = next(iter(zero.values()))
    print(f"base model, no adapters (same episode): bpb {base['base_post_bpb']:.3f}, topic "
          f"{100 * base['base_topic_acc']:.1f} %, distinct-2 {base['base_distinct2']:.3f}, likes/post "
          f"{base['base_likes_per_post']:.3f}; topic classifier on held-out text {100 * base['classifier_acc']:.1f} %")
    print(f"readers (cycle 0): random {base['random_reader']:.3f}, scripted upper bound {base['scripted_reader']:.3f} "
          f"reward per choice")
    if {"hybrid", "gradient"} <= engagement.keys() and len(engagement["hybrid"]) == len(engagement["gradient"]) > 1:
        h, g = engagement["hybrid"], engagement["gradient"]
        p, low, high = improvement_ci(h[:, None], g[:, None])
        print(f"engagement, likes per post at the last cycle (mean over {len(h)} seeds, 95 % bootstrap CI): hybrid "
              f"{ci_text(h)}, gradient {ci_text(g)}; P(hybrid > gradient) = {p:.2f} [{low:.2f}, {high:.2f}]")
    print(f"(s/cycle: measured here, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
          f"target <= 90 s on 2 cores)")


if __name__ == "__main__":
    sys.exit(main())
