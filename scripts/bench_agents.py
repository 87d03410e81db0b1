"""Benchmark of the agents in the grid world: how well 20 LoRA agents do after T ticks of online
learning (no evolution), against the uniform random and the greedy oracle policies on held-out world
seeds; the batched decision step against 20 separate ones; the whole loop's ticks per second with
learning on; and the bytes held (base, adapters, optimizer, caches, buffers).

    python scripts/bench_agents.py --base random --preset small          # the full run (T = 2000)
    python scripts/bench_agents.py --base checkpoints/base --steps 2000
    python scripts/bench_agents.py --quick                                 # tiny base, seconds

Every number is measured in this run; `--json PATH` also writes them to a file.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from h2q.checkpoint import atomic_write_json, load_model
from h2q.cli import resolve_device, run_main
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.evolve import OraclePolicy, RandomPolicy, World, WorldConfig, evaluate_policy, run_episode
from h2q.evolve.agent import KV_POLICIES, AgentConfig, AgentPolicy, make_bank
from h2q.evolve.learner import Learner, LearnerConfig
from h2q.evolve.render import Renderer
from h2q.lora import freeze_base
from h2q.model import Transformer
from h2q.perf import matmul_peak_gflops, weight_matmul_seconds


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="random", help="checkpoint folder, or 'random' for a random-init base of --preset")
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="shape of a --base random model")
    p.add_argument("--agents", type=int, default=20, help="agents sharing the world")
    p.add_argument("--steps", type=int, default=2000, help="world ticks of online learning (T)")
    p.add_argument("--eval-seeds", type=int, default=4, help="held-out worlds each policy is scored on")
    p.add_argument("--memory", type=int, default=0, help="memory lines per agent (0 = none)")
    p.add_argument("--kv", default="window", choices=list(KV_POLICIES), help="cache policy of the memory")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the agents")
    p.add_argument("--lr", type=float, default=LearnerConfig.lr, help="Adam learning rate of the adapters")
    p.add_argument("--latency-reps", type=int, default=10, help="repeats of each latency measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the frozen base's weights and caches (bfloat16 is faster on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", action="store_true", help="draw the world while the agents learn")
    p.add_argument("--quick", action="store_true", help="tiny base, 2 episodes of learning: a smoke run")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.base, args.preset, args.eval_seeds, args.latency_reps = "random", "tiny", 2, 3
        args.steps = min(args.steps, 400)
    if args.agents < 1 or args.steps < 0 or args.eval_seeds < 1:
        raise H2QError("--agents and --eval-seeds must be >= 1 and --steps >= 0")
    return args


def load_base(args, device) -> tuple[Transformer, str]:
    dtype = getattr(torch, args.dtype)
    if args.base == "random":
        torch.manual_seed(args.seed)
        model, name = Transformer(PRESETS[args.preset]).to(device, dtype), f"random-init {args.preset} ({args.dtype})"
    else:
        model, _ = load_model(args.base, device)
        model, name = model.to(dtype=dtype), f"checkpoint {args.base} ({args.dtype})"
    return freeze_base(model).eval(), name


def summary(result, oracle) -> dict:
    pct = result.percent_of(oracle)
    return {"food_per_agent_step": float(result.food_rate.mean()),
            "median_agent_food_per_step": float(np.median(result.food_rate)),
            "median_pct_of_oracle": float(np.median(pct)), "mean_pct_of_oracle": float(pct.mean()),
            "fitness": float(result.fitness.mean()), "died": float(result.died.mean())}


def decision_latency(policy: AgentPolicy, obs: np.ndarray, reps: int) -> tuple[float, float]:
    """Median seconds of one batched decision for all agents, and of all agents decided one by one."""
    n = policy.n
    everyone = np.ones(n, dtype=bool)
    alone = np.eye(n, dtype=bool)
    policy.reset(n)
    policy.act(obs, everyone)  # warm-up
    batched, separate = [], []
    for _ in range(reps):
        start = time.perf_counter()
        policy.act(obs, everyone)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(n):
            policy.act(obs, alone[i])
        separate.append(time.perf_counter() - start)
    return statistics.median(batched), statistics.median(separate)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, base_name = load_base(args, device)
    world_cfg = WorldConfig(seed=args.seed)
    agent_cfg = AgentConfig(temperature=args.temperature, memory=args.memory, kv=args.kv, seed=args.seed)
    learner_cfg = LearnerConfig(lr=args.lr, seed=args.seed)
    n = args.agents
    eval_seeds = [10_000 + args.seed * 100 + i for i in range(args.eval_seeds)]  # never trained on
    print(f"base: {base_name} ({model.num_params() / 1e6:.2f}M params), {n} agents, device {device}, "
          f"torch threads {torch.get_num_threads()}, world {world_cfg.size}x{world_cfg.size}, "
          f"{world_cfg.steps}-tick episodes, eval seeds {eval_seeds[0]}..{eval_seeds[-1]}")

    oracle = evaluate_policy(OraclePolicy(args.seed), world_cfg, eval_seeds, n)
    rand = evaluate_policy(RandomPolicy(args.seed), world_cfg, eval_seeds, n)
    policy = AgentPolicy(model, make_bank(model, n, agent_cfg), agent_cfg)
    before = evaluate_policy(policy, world_cfg, eval_seeds, n)

    obs = World(world_cfg, n, eval_seeds[0]).observe()
    t_batched, t_separate = decision_latency(policy, obs, args.latency_reps)
    # a batched decision cannot beat its FLOPs at the matmul peak: that caps what batching can win
    peak = matmul_peak_gflops(device) * 1e9
    decision_flops = n * obs.shape[1] * model.flops_per_token(policy.prefix_len + obs.shape[1], training=False)
    with torch.no_grad():
        t_matmuls = weight_matmul_seconds(model, n * obs.shape[1], args.latency_reps)

    learner = Learner(policy, learner_cfg)
    render = Renderer() if args.render else None
    say = render.log if render is not None else print
    ticks, episode, start = 0, 0, time.perf_counter()
    while ticks < args.steps:
        steps = min(world_cfg.steps, args.steps - ticks)
        stats = run_episode(World(world_cfg, n, args.seed * 1_000_000 + episode), policy, steps, learner, render)
        ticks += steps
        episode += 1
        say(f"  learning: tick {ticks:5d}  episode food/agent/step {stats.food_rate.mean():.4f} "
              f"({100 * stats.food_rate.mean() / max(oracle.food_rate.mean(), 1e-12):.0f}% of oracle)  "
              f"updates {learner.updates}  skipped {learner.skipped}  restored {learner.restored}  "
              f"{ticks / (time.perf_counter() - start):.2f} ticks/s")
    if render is not None:
        render.close()
    loop_tps = ticks / max(time.perf_counter() - start, 1e-9)
    after = evaluate_policy(policy, world_cfg, eval_seeds, n)

    bytes_held = {**policy.nbytes(), **learner.nbytes()}
    results = {
        "base": base_name, "agents": n, "learning_ticks": ticks, "eval_seeds": eval_seeds,
        "world": asdict(world_cfg), "agent": asdict(agent_cfg), "learner": asdict(learner_cfg),
        "oracle": summary(oracle, oracle), "random": summary(rand, oracle),
        "agents_before": summary(before, oracle), "agents_after": summary(after, oracle),
        "decision_batched_ms": 1e3 * t_batched, "decision_separate_ms": 1e3 * t_separate,
        "batched_speedup": t_separate / t_batched, "loop_ticks_per_s": loop_tps,
        "matmul_peak_gflops": peak / 1e9, "decision_gflop": decision_flops / 1e9,
        "batched_speedup_bound": t_separate / (decision_flops / peak),
        "decision_weight_matmuls_ms": 1e3 * t_matmuls, "batched_speedup_bound_measured": t_separate / t_matmuls,
        "updates": learner.updates, "skipped": learner.skipped, "restored": learner.restored,
        "bytes": {**bytes_held, "total": sum(bytes_held.values())},
    }
    print(f"\n{'policy':<22}{'food/agent/step':>16}{'median agent':>14}{'median % oracle':>17}{'died':>7}")
    for name in ("oracle", "random", "agents_before", "agents_after"):
        r = results[name]
        print(f"{name:<22}{r['food_per_agent_step']:>16.4f}{r['median_agent_food_per_step']:>14.4f}"
              f"{r['median_pct_of_oracle']:>16.1f}%{r['died']:>7.2f}")
    print(f"\ndecision step, {n} agents: batched {results['decision_batched_ms']:.1f} ms, one by one "
          f"{results['decision_separate_ms']:.1f} ms -> {results['batched_speedup']:.1f}x")
    print(f"  bound: the batched step is {results['decision_gflop']:.2f} GFLOP, >= {1e3 * decision_flops / peak:.1f} ms "
          f"at the {peak / 1e9:.0f} GFLOP/s matmul peak, so batching wins at most "
          f"{results['batched_speedup_bound']:.1f}x here")
    print(f"  measured: its weight matmuls alone ({n * obs.shape[1]} rows through every weight matrix) take "
          f"{results['decision_weight_matmuls_ms']:.1f} ms, so batching wins at most "
          f"{results['batched_speedup_bound_measured']:.1f}x here")
    print(f"whole loop with learning: {loop_tps:.2f} ticks/s ({learner.updates} updates, "
          f"{learner.skipped} skipped, {learner.restored} restored)")
    print("bytes held: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in results["bytes"].items()))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
