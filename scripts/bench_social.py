"""Benchmark the social env: hybrid (learning + evolution) against gradient (learning, no evolution) over
several run seeds, each run an ordinary `evolve.py --env social` run, scored on the held-out episode of
every cycle (held-out prompts, the feeds built from their posts).

    python scripts/bench_social.py --base checkpoints/base --out OUT     # 20 cycles x seeds 0,1,2 x 2 strategies
    python scripts/bench_social.py --out OUT --table                     # the table of what OUT holds so far
    python scripts/bench_social.py --quick                               # smoke run: tiny untrained base
    python scripts/bench_social.py --base B --out OUT --social "--drafts 4 --own-weight 5"   # other env flags

Every run (OUT/STRATEGY-sSEED, its log beside it) and, per seed, the held-out figures of the runner's
initial population before any life (OUT/cycle0-sSEED.json, the "cycle-0 population") is a child process
of its own (niced, --threads torch threads each), all started at once so they advance together: a
bench stopped at --deadline (or by Ctrl-C) leaves every run at about the same cycle, and running the
same command again resumes them (`evolve.py --resume`) up to --cycles. The table compares the
strategies at the last cycle every run has finished (it says which), per strategy:
* fluency (bits/byte of the posts under the base) at that cycle against the cycle-0 population's,
  topic accuracy (>= 80 %), distinct-2 against the base model's (>= 0.5 x);
* engagement, likes per post: the mean over seeds with a 95 % bootstrap interval, the hybrid - gradient
  difference (paired by seed: both start from the same initial population) with its interval, and
  P(hybrid > gradient) (h2q/evolve/stats.py); the same for the likes the posts deserve, those the
  scripted reader would give on the same feeds (what the writers earn if the readers were perfect);
* the base model without adapters, random readers and the scripted reader (the signal applied
  directly, the upper bound) on the same episodes;
* seconds per cycle as the runs measured them (wall time, while the other runs and whatever else the
  machine runs share its cores: an upper bound on a cycle alone) against the 90 s target.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from h2q.checkpoint import atomic_write_json, resolve_model_file
from h2q.evolve import records, run
from h2q.evolve.evolution import BreedConfig, Population
from h2q.evolve.social_env import SocialConfig, SocialEnv
from h2q.evolve.stats import improvement_ci, stratified_bootstrap_ci
from h2q.lora import LoraConfig

QUICK_SOCIAL = ["--post-bytes", "16", "--prompt-bytes", "8", "--eval-ticks", "2", "--feed-size", "3", "--feed-random", "1"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="checkpoints/base", help="trained base checkpoint folder")
    p.add_argument("--out", default="checkpoints/bench_social", help="folder of the runs (kept: rerun to resume)")
    p.add_argument("--strategies", default="hybrid,gradient")
    p.add_argument("--seeds", default="0,1,2", help="run seeds")
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--steps", type=int, default=0, help="ticks per life (0 = evolve.py's default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--social", default="", help="more social-env flags for every run, e.g. '--drafts 4 --own-weight 5'")
    p.add_argument("--deadline", default=None, help="HH:MM (local time): stop the runs then and print the table")
    p.add_argument("--table", action="store_true", help="print the table of what --out holds; run nothing")
    p.add_argument("--cycle0", type=int, default=None, help=argparse.SUPPRESS)  # child: one seed's cycle-0 figures
    p.add_argument("--quick", action="store_true", help="smoke run: tiny untrained base, 2 cycles, 2 seeds, 6 agents")
    args = p.parse_args(argv)
    if args.quick:
        args.base, args.cycles, args.agents, args.steps, args.seeds = "random", 2, 6, 2, "0,1"
    return args


def evolve_argv(args, strategy: str, seed: int, out: Path) -> list[str]:
    argv = ["--env", "social", "--base", args.base, "--out", str(out), "--cycles", str(args.cycles), "--agents",
            str(args.agents), "--steps", str(args.steps), "--seed", str(seed), "--strategy", strategy, "--threads",
            str(args.threads), "--device", "cpu", "--no-progress"]
    if args.quick:
        argv += ["--preset", "tiny", *QUICK_SOCIAL]
    argv += shlex.split(args.social)
    if (out / records.STATE_DIR / records.STATE_FILE).is_file():
        argv.append("--resume")
    return argv


def cycle_zero(args, seed: int) -> dict:
    """The held-out figures of a run's initial population (the runner's init seed), before any life:
    the same base, adapters, episode and evaluation seed as the run's cycle 1 would use."""
    argv = evolve_argv(args, "hybrid", seed, Path(args.out) / "unused")
    parser = run.Parser(prog="evolve.py")
    run.add_dataclass_flags(parser, run.EvolveConfig)
    run.add_dataclass_flags(parser, BreedConfig)
    run.add_dataclass_flags(parser, SocialConfig)
    ns = parser.parse_args(argv)
    cfg, breed, social = (run.dataclass_from_args(c, ns) for c in (run.EvolveConfig, BreedConfig, SocialConfig))
    torch.set_num_threads(args.threads)
    model = run.load_base(cfg, torch.device("cpu"))
    init = torch.Generator().manual_seed(run.seed_for(cfg.seed, 0, "init"))
    pop = Population.initial(model.config, LoraConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha), cfg.agents,
                             breed.bank_rank(cfg.lora_rank), cfg.lr, cfg.temperature, breed.mutation_rate, init)
    env = SocialEnv(model, pop.bank, social, cfg.temperature)
    ev = env.evaluate(pop.agents, run.seed_for(cfg.seed, 1, "eval"), lambda: None)
    return {**ev.references, "mean": float(ev.fitness.mean()), "best": float(ev.fitness.max())}


def jobs(args) -> list[tuple[str, list[str], Path]]:
    """(label, argv, log) of every child not finished yet."""
    root, me = Path(args.out), [sys.executable, str(Path(__file__).resolve())]
    todo = []
    for seed in seeds_of(args):
        if not (root / f"cycle0-s{seed}.json").is_file():
            flags = ["--base", args.base, "--out", str(root), "--agents", str(args.agents), "--threads", str(args.threads),
                     "--social", args.social, "--cycle0", str(seed)] + (["--quick"] if args.quick else [])
            todo.append((f"cycle0-s{seed}", me + flags, root / f"cycle0-s{seed}.log"))
        for strategy in args.strategies.split(","):
            out = root / f"{strategy}-s{seed}"
            if committed(out) < args.cycles:
                todo.append((out.name, [sys.executable, str(ROOT / "evolve.py"), *evolve_argv(args, strategy, seed, out)],
                             root / f"{out.name}.log"))
    return todo


def seeds_of(args) -> list[int]:
    return [int(s) for s in args.seeds.split(",")]


def committed(out: Path) -> int:
    return records.committed(out)[0] if (out / records.STATE_DIR / records.STATE_FILE).is_file() else 0


def run_all(args) -> bool:
    """Start every unfinished child at once, niced; -> whether all finished (False: stopped at the deadline)."""
    deadline = None
    if args.deadline:
        hour, minute = map(int, args.deadline.split(":"))
        deadline = datetime.now().replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    children = []
    for label, argv, log in jobs(args):
        print(f"start {label}: {' '.join(shlex.quote(a) for a in argv)} > {log}", flush=True)
        with open(log, "a") as f:
            # SIGINT back to its default: a bench started in the background (`cmd &`) ignores it, and so would
            # the children, whom the deadline stops with it
            children.append((label, subprocess.Popen(["nice", "-n", "10", *argv], stdout=f, stderr=subprocess.STDOUT,
                                                     cwd=ROOT, env=env, preexec_fn=_default_sigint)))
    finished = True
    try:
        while any(p.poll() is None for _, p in children):
            if deadline is not None and time.time() > deadline:
                print(f"deadline {args.deadline}: stopping the runs (rerun the same command to resume them)", flush=True)
                finished = False
                break
            time.sleep(5)
    except KeyboardInterrupt:
        finished = False
    for _, p in children:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)  # evolve.py keeps its committed cycles
    for label, p in children:
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            p.kill()  # an evolve run loses only its uncommitted cycle
            p.wait()
            print(f"{label}: killed, 120 s after SIGINT", flush=True)
            continue
        if p.returncode not in (0, 130, -signal.SIGINT):
            print(f"{label} failed (exit {p.returncode}); see its log", flush=True)
            finished = False
    return finished


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ci_text(values: np.ndarray) -> str:
    point, low, high = stratified_bootstrap_ci(values[:, None], statistic=lambda s: s.mean(axis=(-2, -1)))
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def table(args) -> dict:
    """Print the comparison of what --out holds (module docstring); -> the figures, also written to
    OUT/bench_social.json."""
    root, seeds, strategies = Path(args.out), seeds_of(args), args.strategies.split(",")
    zero = {s: json.loads((root / f"cycle0-s{s}.json").read_text()) for s in seeds if (root / f"cycle0-s{s}.json").is_file()}
    runs = {(st, s): records.read_metrics(root / f"{st}-s{s}") if (root / f"{st}-s{s}").is_dir() else []
            for st in strategies for s in seeds}
    done = min((len(r) for r in runs.values()), default=0)
    result = {"cycle": done, "cycles_asked": args.cycles, "strategies": {}, "when": datetime.now().isoformat(timespec="minutes")}
    if not done or len(zero) < len(seeds):
        print(f"nothing to compare yet: every run needs one cycle and every seed its cycle-0 figures ({root})")
        return result
    print(f"\nat cycle {done} of {args.cycles} (the last cycle every run finished), seeds {args.seeds}, "
          f"{args.agents} agents; held-out episode of each cycle")
    print(f"{'strategy':9s} | {'bits/byte c0 -> now':>19s} | {'topic % c0 -> now (>= 80)':>25s} | "
          f"{'distinct-2 / base (>= 0.5)':>26s} | {'likes/post (95% CI)':>21s} | {'fitness':>7s} | {'s/cycle':>7s}")
    engagement, deserved = {}, {}
    for st in strategies:
        last = [runs[st, s][done - 1] for s in seeds]
        c0 = {k: np.mean([zero[s][k] for s in seeds]) for k in ("post_bpb", "topic_acc")}
        now = {k: float(np.mean([r[k] for r in last])) for k in ("post_bpb", "topic_acc", "mean", "follow_density")}
        ratio = float(np.mean([r["distinct2"] / r["base_distinct2"] for r in last]))
        engagement[st] = np.array([r["likes_per_post"] for r in last])
        deserved[st] = np.array([r["scripted_likes_per_post"] for r in last])
        wall = float(np.mean([r["wall_s"] for s in seeds for r in runs[st, s][:done]]))
        result["strategies"][st] = {**now, "cycle0_post_bpb": c0["post_bpb"], "cycle0_topic_acc": c0["topic_acc"],
                                    "distinct2_vs_base": ratio, "likes_per_post": engagement[st].tolist(),
                                    "deserved_likes_per_post": deserved[st].tolist(), "wall_s": wall}
        print(f"{st:9s} | {c0['post_bpb']:8.3f} -> {now['post_bpb']:6.3f} | {100 * c0['topic_acc']:12.1f} -> "
              f"{100 * now['topic_acc']:6.1f} | {ratio:26.3f} | {ci_text(engagement[st]):>21s} | {now['mean']:7.3f} | "
              f"{wall:7.1f}")
    base = runs[strategies[0], seeds[0]][done - 1]
    print(f"base model, no adapters (same held-out prompts): bits/byte {base['base_post_bpb']:.3f}, topic "
          f"{100 * base['base_topic_acc']:.1f} %, distinct-2 {base['base_distinct2']:.3f}, likes/post "
          f"{base['base_likes_per_post']:.3f}; the topic classifier on held-out text: {100 * base['classifier_acc']:.1f} %")
    readers = {k: float(np.mean([runs[st, s][done - 1][k] for st in strategies for s in seeds]))
               for k in ("reader", "random_reader", "scripted_reader")}
    print(f"readers' reward per choice at cycle {done}: agents {readers['reader']:.3f}, random {readers['random_reader']:.3f}, "
          f"scripted (the signal applied directly, upper bound) {readers['scripted_reader']:.3f}; the base model's "
          f"readers {base['base_reader']:.3f}")
    result["readers"] = readers
    if {"hybrid", "gradient"} <= engagement.keys() and len(seeds) > 1:
        for name, values in (("likes per post", engagement), ("deserved likes per post (scripted reader)", deserved)):
            h, g = values["hybrid"], values["gradient"]
            diff = ci_text(h - g)
            p, low, high = improvement_ci(h[:, None], g[:, None])
            print(f"{name}: hybrid {ci_text(h)}, gradient {ci_text(g)}; hybrid - gradient = {diff} (paired by "
                  f"seed, 95 % bootstrap CI over {len(seeds)} seeds); P(hybrid > gradient) = {p:.2f} [{low:.2f}, {high:.2f}]")
            result[f"hybrid_minus_gradient {name}"] = diff
    print(f"(s/cycle: wall time of each cycle as the runs recorded it, {len(runs)} runs sharing "
          f"{os.cpu_count()} CPUs with the rest of the machine; load average now {os.getloadavg()[0]:.1f}; "
          f"target <= 90 s on 2 cores)")
    atomic_write_json(root / "bench_social.json", result)
    return result


def main(argv=None) -> int:
    args = parse(argv)
    root = Path(args.out)
    if args.cycle0 is not None:
        atomic_write_json(root / f"cycle0-s{args.cycle0}.json", cycle_zero(args, args.cycle0))
        return 0
    print("command: python " + " ".join(shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *sys.argv[1:]]))
    if args.base != "random" and not resolve_model_file(args.base).exists():
        print(f"error: no trained base at {args.base}; train one with `python train.py` or pass --base")
        return 2
    root.mkdir(parents=True, exist_ok=True)
    finished = True if args.table else run_all(args)
    table(args)
    if not finished:
        print("partial: not every run reached --cycles; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
