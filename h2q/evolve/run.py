"""evolve.py: self-evolution of the agents' LoRA adapters over one frozen base, one generation per cycle.

Cycle c (`Runner.cycle`):
1. live: the agents act in the grid world for `--steps` ticks with online learning on (strategies
   hybrid, gradient, meta), or fine-tune for `--steps` batched steps on text (`--env text`), or write,
   read, like and follow for `--steps` ticks in a social network (`--env social`, h2q/evolve/social_env.py);
2. evaluate: every agent on fresh world seeds with learning off, beside the oracle and random policies
   on the same seeds (fitness = food delivered per step + a small survival term, h2q/evolve/world.py),
   or on fixed held-out text (fitness = -bits per byte), or in the social network's held-out episode
   (fitness = the quality of its posts + the agreement of its choices with the quality signal);
3. record: OUT/cycle_NNN/agent_MM/ adapters, population.json (lineage), metrics.jsonl, evolution_stats.json
   (the run folder format of notes/evolve_format.md, written by h2q/evolve/records.py);
4. breed: h2q/evolve/evolution.py `next_generation` (elites pass on, the rest are children);
5. save the resume state (records.py: the learner state of every process, then the main state, the
   cycle's commit point).

Determinism: every random stream of cycle c (world seeds, policy sampling, batches, selection, mutation)
is seeded afresh from (seed, c, purpose, process) with numpy's SeedSequence, so the random state at a
cycle boundary is the cycle number itself, and `--resume` replays the rest of an interrupted run exactly
as if it had never stopped. A kill or Ctrl-C mid-cycle loses that cycle only: on resume, records past
the saved cycle are dropped and the cycle is run again.

Under `torchrun --nproc_per_node K` (gloo on CPU) each process owns a contiguous share of the agents
and a world of its own for them: it copies their slots out of the shared bank, lives and evaluates
them, and the slots and figures are summed back over processes (all_reduce of zero-filled tensors);
rank 0 alone records, selects and breeds, then broadcasts the bank and the lineage (JSON as bytes).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from h2q import checkpoint, quant
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, resolve_device, run_main
from h2q.config import PRESETS, check_options, option
from h2q.errors import ConfigError, H2QError
from h2q.evolve import board, records
from h2q.evolve.evolution import LEARNS, BreedConfig, Evaluation, Population, diversity, next_generation
from h2q.evolve.grid_env import FITNESS, AgentKnobs, GridEnv
from h2q.evolve.render import Renderer
from h2q.evolve.social_env import SocialConfig, SocialEnv
from h2q.evolve.text_env import TextConfig, TextEnv
from h2q.evolve.world import WorldConfig
from h2q.lora import LINEARS, AdapterBank, LoraConfig, check_rank, freeze_base, target_shapes
from h2q.model import Transformer
from h2q.monitor import Monitor
from h2q.perf import ThreadPolicy, device_memory

PURPOSES = {"init": 1, "live": 2, "eval": 3, "breed": 4}
DEFAULT_STEPS = {"grid": 200, "text": 20, "social": 8}
# flags that may change between a run and its --resume
RESUMABLE = {"cycles", "resume", "report", "render", "progress", "device", "out", "keep_cycles", "threads",
             "tensorboard"}


@dataclass
class EvolveConfig:
    base: str = option("checkpoints/base", "base checkpoint folder; 'random' = an untrained base of --preset")
    preset: str = option("mini", "model size of --base random", choices=list(PRESETS))
    out: str | None = option(None, "run folder (default checkpoints/evolve/run-NNN, the next free number; "
                             "with --resume the newest)")
    cycles: int = option(10, "generations to run in all (with --resume: up to this many)", at_least=1)
    agents: int = option(20, "population size", at_least=2)
    steps: int = option(0, "per cycle: world ticks of life (grid, social) or fine-tuning steps (text); "
                        "0 = 200 / 20 / 8", at_least=0)
    eval_episodes: int = option(2, "grid: fresh world seeds each agent is scored on per cycle", at_least=1)
    env: str = option("grid", "grid world, text self-evolution on --data-dir, or a social network where agents "
                      "write, read, like and follow", choices=["grid", "text", "social"])
    lora_rank: int = option(8, "adapter rank (the starting rank with --adaptive-rank)", at_least=1)
    lora_alpha: float = option(16.0, "LoRA alpha (update scale alpha/r)", above=0)
    lr: float = option(2e-3, "learning rate of the adapters (each agent's starting one under --pbt)", above=0,
                       at_most=10)
    temperature: float = option(1.0, "grid, social: the agents' sampling temperature (one for all)", above=0, at_most=100)
    world: str = option("hinted", "grid: the world level: hinted (the next step is in the text) or view (an "
                        "egocentric window and a home compass, no path: agents must learn to see)",
                        choices=["hinted", "view"])
    window: int = option(5, "grid, view level: the side of each agent's window of cells (odd)", at_least=3, at_most=9)
    fitness: str = option("food", "grid: what selection ranks agents by: food (delivered per step, plus a small "
                          "survival term) or return (the shaped reward of learning)", choices=list(FITNESS))
    quant: str = option("none", "quantize the base in memory", choices=["none", "int8", "int4"])
    memory: int = option(0, "grid: past (observation, action) lines each agent keeps in its KV cache", at_least=0)
    kv: str = option("window", "grid: KV-cache policy of that memory", choices=["window", "full", "int8"])
    seed: int = option(0, "random seed: the same seed gives the same run", at_least=0, below=2**63)
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, "torch CPU threads; 0 = measured: all cores, or one where a short probe finds one "
                             "faster (a busy CPU), re-measured every 30 s", at_least=0)
    render: bool = option(False, "draw the world (grid) or the network (social) in the terminal while the agents "
                          "live and are evaluated (rank 0)")
    tensorboard: str | None = option(None, "write TensorBoard event files into this folder: fitness, diversity, "
                                     "deaths, adapter norms, the world map (needs the [monitor] extra)")
    resume: bool = option(False, "continue the run in --out from its last completed cycle")
    report: bool = option(False, "write OUT/report/report.html at the end (needs matplotlib)")
    keep_cycles: int = option(0, "keep only the newest K cycle_NNN adapter folders (0 = all)", at_least=0)
    progress: bool = option(True, "show a progress bar per cycle")

    def __post_init__(self):
        check_options(self)

    @property
    def life_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.env]


def seed_for(seed: int, cycle: int, purpose: str, rank: int = 0) -> int:
    """A 63-bit seed for one random stream of one cycle (see the module docstring)."""
    state = np.random.SeedSequence([seed, cycle, PURPOSES[purpose], rank]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


class Group:
    """This process's place among the torchrun processes (a group of 1 without torchrun)."""

    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = device if device.type == "cuda" else torch.device("cpu")  # where collectives' tensors live
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def share(self, n: int) -> tuple[int, int]:
        """This rank's agent slots [lo, hi): contiguous, sizes differing by at most one."""
        if n < self.size:
            raise H2QError(f"--agents {n} is fewer than the {self.size} processes; use at least one agent each")
        bounds = np.linspace(0, n, self.size + 1).round().astype(int)
        return int(bounds[self.rank]), int(bounds[self.rank + 1])

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def broadcast_json(self, obj):
        """Rank 0's JSON-able object on every rank (sent as UTF-8 bytes, never pickled)."""
        if self.size == 1:
            return obj
        payload = json.dumps(obj).encode() if self.rank == 0 else b""
        length = torch.tensor([len(payload)], device=self.device)
        dist.broadcast(length, 0)
        buf = torch.tensor(list(payload), dtype=torch.uint8, device=self.device) if self.rank == 0 else \
            torch.empty(int(length), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, 0)
        return json.loads(bytes(buf.tolist()).decode())

    def barrier(self):
        if self.size > 1:
            dist.barrier()


def load_base(cfg: EvolveConfig, device: torch.device) -> Transformer:
    """The frozen base: a checkpoint (float or quantized) or, for --base random, an untrained model;
    quantized in memory by --quant."""
    if cfg.base == "random":
        torch.manual_seed(cfg.seed)
        model = Transformer(PRESETS[cfg.preset]).to(device)
    else:
        path = checkpoint.resolve_model_file(cfg.base)
        if not path.exists():
            raise H2QError(f"no base model at {path}: run `python train.py` first (or try --base random "
                            f"--preset tiny|mini|small for a quick untrained run)")
        model, _ = checkpoint.load_model(cfg.base, device)
    model.fingerprint = model.base_fingerprint()  # the base stays frozen for the run: name it once
    if cfg.quant != "none":
        scheme = model.quant_scheme
        if scheme is None:
            sizes = (model.config.d_model, model.config.mlp_hidden)
            group = next((g for g in (64, 32) if all(s % g == 0 for s in sizes)), None)
            if cfg.quant == "int4" and group is None:
                raise H2QError(f"--quant int4 needs widths divisible by 32, this base has {sizes}; use --quant int8")
            quant.quantize(model, cfg.quant, group_size=group or 64)
        elif scheme.mode != cfg.quant:
            raise H2QError(f"{cfg.base} is already quantized as {scheme.mode}; pass --quant {scheme.mode} or none")
    return freeze_base(model).eval()


def check_population_memory(config, agents: int, rank: int, device: torch.device) -> None:
    """Refuse a population whose adapter bank alone (float32 A and B of every agent) exceeds the
    device's memory: a floor under its real use (gradients, optimizer states, children come on top)."""
    floor = 4 * agents * sum(rank * (fan_in + fan_out) for fan_in, fan_out in target_shapes(config, LINEARS).values())
    have = device_memory(device)
    if have is not None and floor > have:
        raise ConfigError("agents", f"{agents}: adapters of rank {rank} need over {floor / 2**30:,.1f} GiB for their "
                                    f"bank alone, this {device.type} has {have / 2**30:,.1f} GiB; use fewer "
                                    f"agents or a lower --lora-rank")


class Runner:
    """One evolve run in one process: base, population, this process's environment, records."""

    def __init__(self, cfg: EvolveConfig, breed: BreedConfig, text: TextConfig, social: SocialConfig | None = None):
        self.cfg, self.breed, self.social = cfg, breed, social or SocialConfig()
        self.device = resolve_device(cfg.device)
        # a second busy process collapses torch's spinning OpenMP threads: choose by measurement
        self.threads = ThreadPolicy(cfg.threads) if self.device.type == "cpu" else None
        self.group = Group(self.device)
        self.lead = self.group.rank == 0
        self.monitor = Monitor(cfg.tensorboard if self.lead else None, resumed=cfg.resume)
        self.model = load_base(cfg, self.device)
        check_rank(self.model.config, cfg.lora_rank)
        if breed.adaptive_rank:  # the bank holds the highest rank a child may reach
            check_rank(self.model.config, breed.bank_rank(cfg.lora_rank), field="max_rank")
        check_population_memory(self.model.config, cfg.agents, breed.bank_rank(cfg.lora_rank), self.device)
        self.out = Path(self.group.broadcast_json(str(records.resolve_out(cfg.out, cfg.resume))))
        lora_config = LoraConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha)
        init = torch.Generator().manual_seed(seed_for(cfg.seed, 0, "init"))
        self.population = Population.initial(self.model.config, lora_config, cfg.agents, breed.bank_rank(cfg.lora_rank),
                                             cfg.lr, cfg.temperature, breed.mutation_rate, init,
                                             meta=breed.strategy == "meta", es=self._es_options()).to(self.device)
        self.lo, self.hi = self.group.share(cfg.agents)
        bank = self.population.bank
        self.local = bank if self.group.size == 1 else \
            AdapterBank(self.model.config, bank.config, self.hi - self.lo, init=False).to(self.device)
        self.render = Renderer() if cfg.render and self.lead and cfg.env in ("grid", "social") else None
        self.env = self._make_env(text)
        self.config = {**asdict(cfg), **asdict(breed), **({"text": asdict(text)} if cfg.env == "text" else {}),
                       **({"social": asdict(self.social)} if cfg.env == "social" else {}),
                       "steps": cfg.life_steps, "bank_rank": bank.config.r, "model_config": self.model.config.to_dict(),
                       "base_fingerprint": self.model.fingerprint, "world_size": self.group.size}
        self.history: list[dict] = []  # per cycle: best fitness and its agent
        self.done = 0
        self.lock = records.RunLock(self.out, cfg.resume) if self.lead else None
        try:
            if cfg.resume:
                self._load_state()
            elif self.lead:
                records.start_fresh(self.out, self.config)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the run folder (rank 0), leaving it as its last committed cycle."""
        if self.lock is not None:
            self.lock.release()

    def _es_options(self) -> dict | None:
        b = self.breed
        if b.strategy != "evolution":
            return None
        return {"dim": b.es_dim, "sigma": b.es_sigma, "lr": b.es_lr, "seed": seed_for(self.cfg.seed, 0, "init")}

    def _make_env(self, text: TextConfig):
        if self.cfg.env == "text":
            return TextEnv(self.model, self.local, text, self.device, log=print if self.lead else (lambda *a, **k: None))
        cfg = self.cfg
        if cfg.env == "social":
            return SocialEnv(self.model, self.local, self.social, cfg.temperature, offset=self.lo, render=self.render)
        knobs = AgentKnobs(lr=cfg.lr, temperature=cfg.temperature, memory=cfg.memory, kv=cfg.kv, fitness=cfg.fitness)
        world = WorldConfig(steps=cfg.life_steps, level=cfg.world, window=cfg.window)
        return GridEnv(self.model, self.local, world, cfg.eval_episodes, knobs, self.render)

    # -- moving agents between the shared bank and this process's ------------------------------------
    def _pull(self) -> None:
        if self.local is not self.population.bank:
            with torch.no_grad():
                for mine, shared in zip(self.local.parameters(), self.population.bank.parameters()):
                    mine.copy_(shared[self.lo:self.hi])

    def _push(self) -> None:
        if self.local is not self.population.bank:
            with torch.no_grad():
                for mine, shared in zip(self.local.parameters(), self.population.bank.parameters()):
                    full = torch.zeros_like(shared)
                    full[self.lo:self.hi] = mine
                    shared.copy_(self.group.sum_(full))

    def _gather(self, values) -> np.ndarray:
        full = torch.zeros(self.cfg.agents, dtype=torch.float64, device=self.group.device)
        full[self.lo:self.hi] = torch.as_tensor(np.asarray(values, dtype=np.float64))
        return self.group.sum_(full).cpu().numpy()

    def _gather_evaluation(self, ev: Evaluation) -> Evaluation:
        share = (self.hi - self.lo) / self.cfg.agents
        def total(value: float) -> float:
            return float(self.group.sum_(torch.tensor(value, dtype=torch.float64, device=self.group.device)))

        totals = {k: total(v) for k, v in ev.totals.items()}
        refs = {k: total(v * share) for k, v in ev.references.items()}
        per_agent = {k: self._gather(v) for k, v in ev.per_agent.items()}
        # figures and files stay this process's own (the lead's: its share of the agents)
        return Evaluation(self._gather(ev.fitness), per_agent, totals, refs, ev.figures, ev.files)

    # -- one cycle -------------------------------------------------------------------------------------
    def _ticker(self, bar):
        """The per-tick callback: the progress bar, and the thread choice re-measured when due."""
        if self.threads is None:
            return bar.update

        def tick(n: int = 1) -> None:
            bar.update(n)
            self.threads.check()
        return tick

    def cycle(self, c: int) -> dict | None:
        cfg, pop, rank = self.cfg, self.population, self.group.rank
        start = time.perf_counter()
        learns = LEARNS[self.breed.strategy]
        agents = pop.agents[self.lo:self.hi]
        self._pull()
        with tqdm(total=self.env.ticks(cfg.life_steps, learns), desc=f"cycle {c}/{cfg.cycles}", unit="tick",
                  leave=False, dynamic_ncols=True, disable=not (self.lead and cfg.progress and not cfg.render)) as bar:
            if self.render is not None and learns:
                self.render.phase(cycle=c, cycles=cfg.cycles, phase="live")
            tick = self._ticker(bar)
            life = self.env.live(agents, cfg.life_steps, seed_for(cfg.seed, c, "live", rank), tick) if learns else {}
            self._push()
            lived = time.perf_counter()
            if self.render is not None:
                self.render.phase(cycle=c, cycles=cfg.cycles, phase="eval", episodes=self.env.eval_episodes)
            ev = self._gather_evaluation(self.env.evaluate(agents, seed_for(cfg.seed, c, "eval", rank), tick))
        phases = {"live_s": round(lived - start, 3), "eval_s": round(time.perf_counter() - lived, 3)}
        life = {k: self._gather(v) for k, v in life.items()}
        record, replaced = None, []
        if self.lead:
            pop.record_fitness(ev.fitness, ev.per_agent)
            records.save_cycle(self.out, c, pop, self.model)
            for name, content in ev.files.items():
                checkpoint.atomic_write_json(records.cycle_dir(self.out, c) / name, content)
            spread = diversity(pop.bank)
            previous = self.history[-1]["best"] if self.history else None
            best_slot = int(np.argmax(ev.fitness))
            self.history.append({"cycle": c, "best": float(ev.fitness.max()), "agent": pop.agents[best_slot].id})
            breeding = torch.Generator().manual_seed(seed_for(cfg.seed, c, "breed"))
            rng = np.random.default_rng(seed_for(cfg.seed, c, "breed"))
            replaced = next_generation(pop, ev.fitness, self.breed, c, breeding, rng, self.env.per_agent_temperature)
            record = records.metrics_record(c, ev, life, previous, diversity=spread,
                                            mean_rank=float(np.mean([a.rank for a in pop.agents])), **phases,
                                            wall_s=round(time.perf_counter() - start, 3),
                                            strategy=self.breed.strategy, env=cfg.env, best_slot=best_slot,
                                            threads=self.threads.threads if self.threads is not None else None,
                                            best_agent=self.history[-1]["agent"], **ev.figures,
                                            **(pop.es.last if pop.es is not None else {}))
            records.append_metrics(self.out, record)
            checkpoint.atomic_write_json(self.out / "evolution_stats.json", records.evolution_stats(self.history))
            board.log_cycle(self.monitor, c, record, ev, pop, self.model)
        self._share_population(replaced)
        self.env.reset_slots([s - self.lo for s in replaced if self.lo <= s < self.hi])
        self._save_state(c)
        return record

    def _share_population(self, replaced: list[int]) -> list[int]:
        """Rank 0's bank, meta adapter and lineage on every rank."""
        if self.group.size == 1:
            return replaced
        pop = self.population
        with torch.no_grad():
            for p in [*pop.bank.parameters(), *(pop.meta.parameters() if pop.meta is not None else [])]:
                dist.broadcast(p.data, 0)
        shared = self.group.broadcast_json({"lineage": pop.lineage_state(), "replaced": replaced})
        pop.load(shared["lineage"])
        replaced[:] = shared["replaced"]
        return replaced

    # -- resume ----------------------------------------------------------------------------------------
    def _save_state(self, c: int) -> None:
        records.save_env_state(self.out, c, self.group.rank, self.env.state_tensors())
        self.group.barrier()
        if self.lead:
            records.save_state(self.out, c, self.population, self.history, self.group.size, self.cfg.keep_cycles)
        self.group.barrier()
        self.done = c

    def _load_state(self) -> None:
        records.check_resumable(self.out, self.config, RESUMABLE)
        c, lineage, tensors, self.history, env_state = records.read_state(
            self.out, self.group.rank, self.group.size, self.population.tensors(), self.env.state_tensors())
        self.population.load(lineage, {k: v.to(self.device) for k, v in tensors.items()})
        self.env.load_state_tensors(env_state)
        self.done = c
        self.group.barrier()
        if self.lead:
            records.drop_after(self.out, c)
        self.group.barrier()


def summary_line(record: dict, cycles: int) -> str:
    if "best_pct_oracle" in record:
        score = (f"best {record['best']:.4f} ({record['best_pct_oracle']:.0f}% of oracle) | median "
                 f"{record['median']:.4f} ({record['median_pct_oracle']:.0f}%) | food {record['food_delivered']} "
                 f"| deaths {record['deaths']}")
    elif "likes_per_post" in record:
        score = (f"best {record['best']:.3f} | median {record['median']:.3f} | likes/post {record['likes_per_post']:.2f} "
                 f"| bits/byte {record['post_bpb']:.3f} | on topic {100 * record['topic_acc']:.0f}% | distinct-2 "
                 f"{record['distinct2']:.2f} | follow density {record['follow_density']:.3f}")
    else:
        score = f"best {record['best_bpb']:.4f} bits/byte | median {record['median_bpb']:.4f} | base {record['base_bpb']:.4f}"
    return (f"cycle {record['cycle']}/{cycles} | {score} | diversity {record['diversity']:.3g} | "
            f"{record['wall_s']:.1f} s")


def evolve(cfg: EvolveConfig, breed: BreedConfig, text: TextConfig, on_cycle=None,
           social: SocialConfig | None = None) -> dict:
    """Run (or resume) an evolve run; returns a summary. `on_cycle(cycle, record)` is called after
    each completed cycle (tests use it to interrupt)."""
    runner = Runner(cfg, breed, text, social)
    try:
        return run_cycles(runner, cfg, breed, on_cycle)
    finally:
        runner.release()


def run_cycles(runner: Runner, cfg: EvolveConfig, breed: BreedConfig, on_cycle=None) -> dict:
    interrupted = False
    if runner.lead:
        where = f"{runner.group.size} processes" if runner.group.size > 1 else str(runner.device)
        if runner.threads is not None:
            where += f", threads {runner.threads.describe()}"
        base = f"{cfg.base}{f' ({cfg.preset}, untrained)' if cfg.base == 'random' else ''}" + \
            (f", {cfg.quant}" if cfg.quant != "none" else "")
        todo = f"cycles {runner.done + 1}..{cfg.cycles}" if runner.done < cfg.cycles else \
            f"all {runner.done} cycles already done (raise --cycles to go on)"
        print(f"evolving {cfg.agents} agents ({breed.strategy}, env {cfg.env}) over base {base} on {where}: "
              f"{todo} into {runner.out}")
    say = runner.render.log if runner.render is not None else tqdm.write  # the alternate screen keeps its lines
    try:
        for c in range(runner.done + 1, cfg.cycles + 1):
            record = runner.cycle(c)
            if runner.lead:
                say(summary_line(record, cfg.cycles))
            if on_cycle is not None:
                on_cycle(c, record)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if runner.render is not None:
            runner.render.close()
    if interrupted and runner.lead:
        print(f"interrupted: cycles up to {runner.done} are saved in {runner.out}; continue with --resume")
    if runner.lead and cfg.report and not interrupted:
        write_report(runner.out)
    return {"out": str(runner.out), "cycles": runner.done, "interrupted": interrupted,
            **(records.evolution_stats(runner.history) if runner.lead else {})}


def write_report(out: Path) -> None:
    try:
        from h2q.report import write_report as report
    except ImportError:
        print("report: h2q.report is not available in this install; skipped")
        return
    try:
        print(f"report: {report(out)}")
    except H2QError as e:
        print(f"report: {e}")


EXAMPLES = [
    ("python evolve.py --cycles 10", "10 generations of 20 agents over checkpoints/base, into "
     "checkpoints/evolve/run-NNN"),
    ("python evolve.py --world view --cycles 20", "the level without the answer in the text: agents must learn "
     "to see"),
    ("python evolve.py --base random --preset tiny --agents 4 --steps 30 --cycles 2",
     "a quick smoke run, no trained base needed"),
    ("python evolve.py --render --cycles 3", "watch the world in the terminal while the agents live and are scored"),
    ("python evolve.py --env social --render --cycles 5", "20 agents who write, read, like and follow, "
     "watched as a network in the terminal"),
    ("python evolve.py --resume --cycles 20", "continue the newest run up to cycle 20"),
    ("python evolve.py --strategy evolution --report", "the evolution strategy alone, no gradients; write "
     "OUT/report/report.html at the end"),
    ("python scripts/report.py checkpoints/evolve/run-001", "the report of a run, at any time"),
]
GROUPS = {
    "run": ["base", "preset", "out", "cycles", "agents", "steps", "seed", "resume", "keep_cycles", "report"],
    "grid world (--env grid)": ["env", "world", "window", "eval_episodes", "fitness", "temperature", "memory", "kv"],
    "adapters and learning": ["lora_rank", "lora_alpha", "lr", "quant"],
    "hardware and display": ["device", "threads", "render", "progress", "tensorboard"],
}


def main(argv=None) -> int:
    parser = Parser(prog="evolve.py", description="Self-evolution of the agents' LoRA adapters: live (online "
                    "learning), evaluate, select and breed, once per cycle.", examples=EXAMPLES)
    add_dataclass_flags(parser, EvolveConfig, groups=GROUPS)
    add_dataclass_flags(parser, BreedConfig, "evolution")
    add_dataclass_flags(parser, TextConfig, "text env (--env text)")
    add_dataclass_flags(parser, SocialConfig, "social env (--env social)")
    args = parser.parse_args(argv)
    summary = evolve(dataclass_from_args(EvolveConfig, args), dataclass_from_args(BreedConfig, args),
                     dataclass_from_args(TextConfig, args), social=dataclass_from_args(SocialConfig, args))
    return 130 if summary["interrupted"] else 0


def cli():
    sys.exit(run_main(main))
