"""Does evolution help? Arms x run seeds of evolve.py on the grid's view level, scored on held-out world
seeds with the statistics rliable reports (Agarwal et al. 2021).

    python scripts/bench_evolve.py --base checkpoints/base              # 5 arms x 5 seeds x 20 cycles
    python scripts/bench_evolve.py --base checkpoints/base --table      # the table of what has finished
    python scripts/bench_evolve.py --quick                              # smoke run on a tiny random base

Arms: `hybrid` (learning in life + selection and crossover), `gradient` (learning only), `evolution`
(the evolution strategy alone, no gradients), `hybrid-no-crossover` (children are mutated copies of
the fitter parent), `hybrid-random-parents` (no selection: elites and parents drawn at random);
`meta` and `hybrid-memory` (KV memory of 4 lines) on request. Each run is OUT/ARM/seed-S, a normal
evolve run folder; every worker process runs one at a time with one torch thread, niced, and resumes a
run that was killed (evolve --resume), so the whole bench resumes after a kill: run the same command.

Scoring, after every cycle, on `--heldout` world seeds that no life was lived on: the cycle's deployed
agent (the one its evaluation ranked first) alone in each held-out world, and every `--crowd-every`
cycles the whole population together in `--crowd-seeds` worlds. Normalised per world seed as Atari and
Melting Pot do, (agent - random) / (same-view planner - random), with each baseline scored the same
way: alone for the deployed agent, as 20 copies for the crowd, so crowding never lifts a score.

The table, per arm: the IQM of the normalised score at the last cycle and its area under the curve
(the mean over cycles 1..C), each with a 95% stratified bootstrap CI over runs; the probability that
hybrid improves on the arm (on the per-task area under the curve) with its CI; the crowd's median agent
at the last crowd cycle; seconds per cycle (live and evaluation). It writes OUT/iqm_vs_cycle.png (IQM
vs cycle, one line per arm, CI bands) when matplotlib is installed, and OUT/table.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from h2q import checkpoint
from h2q.evolve import RandomPolicy, WorldConfig, records, same_view_planner, stats
from h2q.evolve.agent import PREFIXES, AgentConfig, AgentPolicy
from h2q.evolve.evolution import BreedConfig
from h2q.evolve.grid_env import heldout_food_rates
from h2q.evolve.run import EvolveConfig, evolve, load_base
from h2q.evolve.text_env import TextConfig
from h2q.evolve.world import obs_len
from h2q.lora import AdapterBank

ARMS = {  # arm -> (BreedConfig changes, EvolveConfig changes)
    "hybrid": ({}, {}),
    "gradient": ({"strategy": "gradient"}, {}),
    "evolution": ({"strategy": "evolution"}, {}),
    "hybrid-no-crossover": ({"crossover": "none"}, {}),
    "hybrid-random-parents": ({"selection": "random"}, {}),
    "meta": ({"strategy": "meta"}, {}),
    "hybrid-memory": ({}, {"memory": 4}),
}
DEFAULT_ARMS = "hybrid,gradient,evolution,hybrid-no-crossover,hybrid-random-parents"
HELDOUT_FROM = 10_000  # held-out world seeds are drawn from here on; lives use 63-bit hashed seeds


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="checkpoints/base", help="the trained base (or 'random' with --preset)")
    p.add_argument("--preset", default="tiny", help="model size of --base random")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=5, help="run seeds per arm")
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--steps", type=int, default=200, help="world ticks per life")
    p.add_argument("--eval-episodes", type=int, default=2)
    p.add_argument("--world", default="view", choices=["view", "hinted"])
    p.add_argument("--fitness", default="food", choices=["food", "return"], help="what selection ranks by")
    p.add_argument("--heldout", type=int, default=32, help="held-out world seeds the deployed agent is scored on")
    p.add_argument("--crowd-seeds", type=int, default=8, help="held-out worlds the whole population is scored in")
    p.add_argument("--crowd-every", type=int, default=5, help="score the crowd every N cycles (and the last)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    p.add_argument("--out", default="checkpoints/bench_evolve")
    p.add_argument("--table", action="store_true", help="print the table of the runs on disk, run nothing")
    p.add_argument("--score", action="store_true", help="with --table: first score the committed cycles of every "
                   "run on disk not scored yet, finished or not (then --cycles K tables the first K cycles)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random base, 2 arms x 2 seeds x 2 cycles")
    p.add_argument("--worker", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.base, args.preset, args.arms, args.seeds, args.cycles = "random", "tiny", "hybrid,evolution", 2, 2
        args.agents, args.steps, args.eval_episodes, args.heldout, args.crowd_seeds = 4, 20, 1, 4, 2
        args.out = args.out if args.out != "checkpoints/bench_evolve" else "checkpoints/bench_evolve_quick"
    args.arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arm_names if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    return args


def world_config(args) -> WorldConfig:
    return WorldConfig(steps=args.steps, level=args.world)


def run_dir(args, arm: str, seed: int) -> Path:
    return Path(args.out) / arm / f"seed-{seed}"


# -- baselines on the held-out seeds -------------------------------------------------------------------
def baseline_rates(world: WorldConfig, seeds, agents: int) -> dict[str, list[float]]:
    """Per world seed, each baseline's mean food per agent and step, `agents` copies in the world; each
    seed on its own with a policy seeded by it, so a seed's figure never depends on the others."""
    out = {"same_view": [], "random": []}
    for seed in seeds:
        for name, policy in (("same_view", same_view_planner(world, seed)), ("random", RandomPolicy(seed))):
            rates = heldout_food_rates(lambda rows: policy, world, [seed], list(range(agents)), crowd=True)
            out[name].append(float(rates.mean()))
    return out


def baselines(args) -> dict:
    """The held-out seeds and the baselines on them, alone and as crowds; made once, kept in OUT."""
    path = Path(args.out) / "baselines.json"
    if path.is_file():
        return json.loads(path.read_text())
    world, seeds, alone = world_config(args), [], {"same_view": [], "random": []}
    candidate = HELDOUT_FROM
    while len(seeds) < args.heldout:  # a seed counts where the planner beats random alone: a scale exists
        rates = baseline_rates(world, [candidate], 1)
        if rates["same_view"][0] > rates["random"][0]:
            seeds.append(candidate)
            for name in alone:
                alone[name] += rates[name]
        candidate += 1
    crowd_seeds = seeds[:args.crowd_seeds]
    out = {"world": world.level, "steps": world.steps, "seeds": seeds, "crowd_seeds": crowd_seeds, "alone": alone,
           "crowd": baseline_rates(world, crowd_seeds, args.agents)}
    checkpoint.atomic_write_json(path, out)
    return out


# -- one run: evolve, then score every committed cycle on the held-out seeds ----------------------------
def configs(args, arm: str, seed: int) -> tuple[EvolveConfig, BreedConfig]:
    breed, env = ARMS[arm]
    out = run_dir(args, arm, seed)
    resume = (out / records.STATE_DIR / records.STATE_FILE).is_file()
    cfg = EvolveConfig(base=args.base, preset=args.preset, out=str(out), cycles=args.cycles, agents=args.agents,
                       steps=args.steps, eval_episodes=args.eval_episodes, world=args.world, fitness=args.fitness,
                       seed=seed, threads=1, resume=resume, progress=False, **env)
    return cfg, BreedConfig(**breed)


def score_run(args, arm: str, seed: int, base: dict) -> None:
    """Append OUT/ARM/seed-S/heldout.jsonl records for the committed cycles not scored yet."""
    cfg, _ = configs(args, arm, seed)
    out = run_dir(args, arm, seed)
    path = out / "heldout.jsonl"
    done = {r["cycle"] for r in records.read_jsonl(path)} if path.is_file() else set()
    metrics = {r["cycle"]: r for r in records.read_metrics(out)}
    model = load_base(replace(cfg, resume=False), torch.device("cpu"))
    world = world_config(args)
    agent_cfg = AgentConfig(temperature=cfg.temperature, memory=cfg.memory, kv=cfg.kv, seed=seed)
    for cycle, folder in records.committed_cycles(out).items():
        if cycle in done or cycle not in metrics:
            continue
        slots = sorted(records.agent_dirs(folder))
        bank = AdapterBank.from_adapters([checkpoint.load_adapter(records.agent_dir(folder, s), model) for s in slots])

        def policy_for(rows):
            return AgentPolicy(model, bank, agent_cfg, PREFIXES[world.level], obs_len(world), slots=rows)

        best = metrics[cycle]["best_slot"]
        alone = heldout_food_rates(policy_for, world, base["seeds"], [best], crowd=False)[0]
        record = {"cycle": cycle, "deployed_slot": best,
                  "normalised": stats.normalise(alone, base["alone"]["random"], base["alone"]["same_view"]).tolist()}
        if cycle % args.crowd_every == 0 or cycle == args.cycles:
            crowd = heldout_food_rates(policy_for, world, base["crowd_seeds"], slots, crowd=True)  # (agents, seeds)
            norm = stats.normalise(crowd, base["crowd"]["random"], base["crowd"]["same_view"])
            record["crowd_median"] = float(np.median(norm.mean(1)))
            record["crowd_mean"] = float(norm.mean())
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def worker(args, arm: str, seed: int) -> None:
    torch.set_num_threads(1)
    base = baselines(args)
    cfg, breed = configs(args, arm, seed)
    if not (Path(cfg.out) / "metrics.jsonl").is_file() or len(records.read_metrics(Path(cfg.out))) < args.cycles:
        evolve(cfg, breed, TextConfig())
    score_run(args, arm, seed, base)


# -- the table -----------------------------------------------------------------------------------------
def collect(args) -> dict:
    """Per arm: normalised (runs, cycles, tasks) of the finished runs, crowd medians, times."""
    found = {}
    for arm in args.arm_names:
        curves, crowd, walls, lives, evals = [], [], [], [], []
        for seed in range(args.seeds):
            out = run_dir(args, arm, seed)
            path = out / "heldout.jsonl"
            scored = {r["cycle"]: r for r in records.read_jsonl(path)} if path.is_file() else {}
            if len(scored) < args.cycles:
                continue
            curves.append([scored[c]["normalised"] for c in range(1, args.cycles + 1)])
            crowd.append(scored[args.cycles].get("crowd_median", np.nan))
            metrics = records.read_metrics(out)
            walls += [m["wall_s"] for m in metrics]
            lives += [m["live_s"] for m in metrics]
            evals += [m["eval_s"] for m in metrics]
        if curves:
            found[arm] = {"curves": np.asarray(curves), "crowd": np.asarray(crowd), "wall": float(np.mean(walls)),
                          "live": float(np.mean(lives)), "eval": float(np.mean(evals))}
    return found


def table(args) -> dict:
    found = collect(args)
    rows, summary = [], {}
    reference = found.get("hybrid")
    for arm, d in found.items():
        curves = d["curves"]  # (runs, cycles, tasks)
        last = curves[:, -1]  # (runs, tasks)
        auc = stats.area_under_curve(np.moveaxis(curves, 1, -1))  # (runs, tasks)
        _, lo, hi = stats.stratified_bootstrap_ci(last, seed=0)
        _, alo, ahi = stats.stratified_bootstrap_ci(auc, seed=0)
        row = {"runs": len(curves), "iqm_last": float(stats.iqm(last)), "iqm_last_ci": [float(lo), float(hi)],
               "auc": float(stats.iqm(auc)), "auc_ci": [float(alo), float(ahi)],
               "crowd_median": float(np.nanmean(d["crowd"])), "wall_s": d["wall"], "live_s": d["live"],
               "eval_s": d["eval"]}
        if reference is not None and arm != "hybrid":
            ref_auc = stats.area_under_curve(np.moveaxis(reference["curves"], 1, -1))
            p, plo, phi = stats.improvement_ci(ref_auc, auc, seed=0)
            row.update(p_hybrid_better=float(p), p_ci=[float(plo), float(phi)])
        summary[arm] = row
        p_text = f"{row['p_hybrid_better']:.2f} [{row['p_ci'][0]:.2f}, {row['p_ci'][1]:.2f}]" if "p_hybrid_better" in row else "-"
        rows.append([arm, f"{row['runs']}/{args.seeds}", f"{row['iqm_last']:.3f} [{lo:.3f}, {hi:.3f}]",
                     f"{row['auc']:.3f} [{alo:.3f}, {ahi:.3f}]", p_text, f"{row['crowd_median']:.3f}",
                     f"{d['wall']:.1f} ({d['live']:.1f} + {d['eval']:.1f})"])
    header = ["arm", "runs", f"IQM at cycle {args.cycles} [95% CI]", "IQM of AUC [95% CI]",
              "P(hybrid > arm) [95% CI]", "crowd median agent", "s/cycle (live + eval)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{args.world} level, {args.heldout} held-out world seeds, normalised (agent - random) / "
          f"(same-view planner - random):")
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    if not rows:
        print("(no finished run yet)")
    checkpoint.atomic_write_json(Path(args.out) / "table.json", summary)
    figure(args, found)
    return summary


def figure(args, found: dict) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    if not found:
        return
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cycles = np.arange(1, args.cycles + 1)
    for arm, d in found.items():
        curves = d["curves"]  # (runs, cycles, tasks)
        iqm = [stats.iqm(curves[:, c]) for c in range(args.cycles)]
        ci = np.array([stats.stratified_bootstrap_ci(curves[:, c], seed=0, reps=500)[1:] for c in range(args.cycles)])
        ax.plot(cycles, iqm, label=f"{arm} ({len(curves)} runs)")
        ax.fill_between(cycles, ci[:, 0], ci[:, 1], alpha=0.2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("cycle")
    ax.set_ylabel("IQM normalised score (95% CI)")
    ax.set_title(f"{args.world} level: deployed agent on {args.heldout} held-out worlds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(args.out) / "iqm_vs_cycle.png"
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"figure: {path}")


# -- the driver ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args, args.worker[0], int(args.worker[1]))
        return 0
    if args.table:
        if args.score:
            base = baselines(args)
            for arm in args.arm_names:
                for seed in range(args.seeds):
                    if (run_dir(args, arm, seed) / "metrics.jsonl").is_file():
                        score_run(args, arm, seed, base)
        table(args)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    baselines(args)
    todo = [(arm, seed) for seed in range(args.seeds) for arm in args.arm_names]  # seed-major: early tables span arms
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--table"]
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    start = time.time()
    while todo or running:
        while todo and len(running) < args.jobs:
            arm, seed = todo.pop(0)
            run_dir(args, arm, seed).parent.mkdir(parents=True, exist_ok=True)
            log = open(run_dir(args, arm, seed).parent / f"seed-{seed}.log", "a")
            cmd = ["nice", "-n", "10", sys.executable, __file__, *passthrough, "--worker", arm, str(seed)]
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), arm, seed, time.time()))
        time.sleep(5)
        for job in list(running):
            proc, arm, seed, began = job
            if proc.poll() is not None:
                running.remove(job)
                print(f"[{time.time() - start:7.0f} s] {arm} seed {seed}: exit {proc.returncode} "
                      f"after {time.time() - began:.0f} s", flush=True)
    table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
