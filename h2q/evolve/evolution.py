"""Evolution of the agents' LoRA adapters: the population (one AdapterBank plus every agent's lineage
record), selection, breeding, the genetic operators (mutation, layer crossover), and the strategies
that decide what happens between cycles. Generic adapter arithmetic (merges, averages) is h2q/lora.py's.

A generational genetic algorithm with elitism (De Jong 1975) over adapters, run after each cycle's
evaluation (`next_generation`):

* Elites: the top ceil(elite_frac * n) agents by fitness pass on unchanged, bit for bit (their bank
  slots are never written), with their ids, so their fitness history continues.
* Parents: tournament selection (the fittest of `tournament` agents drawn at random, Goldberg & Deb
  1991), or fitness-proportional (roulette) on shifted fitness; two distinct parents per child.
  `random` is the no-selection ablation: elites and parents drawn uniformly, fitness ignored.
* Crossover, with w = f1' / (f1' + f2') the parents' share by shifted fitness f' = f - min(f) +
  0.1 * (max(f) - min(f)) (so the population's worst still weighs a little and the sign of f does not
  matter): `merge` (default) is the fitness-weighted merge of the parents' *updates*,
  `lora.merge_product_space([p1, p2], [w, 1 - w])`, the best rank-r approximation of w dW1 + (1-w) dW2;
  `factors` is the original design's child = p1 * w + p2 * (1 - w) on A and B separately
  (`lora.average_factors`, cross terms included, see h2q/lora.py); `layer` takes whole layers from
  either parent (`layer_crossover`); `none` is the no-crossover ablation (the child is the fitter
  parent, mutated).
* Mutation: `mutate`, Gaussian noise of std = mutation_rate * RMS of each tensor.

Strategies (`--strategy`): `hybrid` breeds as above over agents that also learn by gradient in life
(the runner turns online learning on): selection and crossover over learners, as ERL (Khadka & Tumer
2018) combines a GA with gradient learning; `evolution` learns without gradients, by the evolution
strategy of h2q/evolve/es.py (OpenAI-ES in a random subspace of the adapters, with the 1/5th rule on
its step size; online learning off); `gradient` breeds nothing; `meta` is Reptile (Nichol et al. 2018)
across generations: a meta adapter theta moves toward the elites after every cycle, theta += eps *
(mean(elites) - theta) factor-wise (the elites descend from theta, so they share A closely and factor
averaging is the parameter-space step Reptile takes), and the non-elites restart from mutate(theta),
so each generation starts where learning went well: the population learns to learn.

PBT (`--pbt`, Jaderberg et al. 2017): every agent carries its own learning rate and sampling
temperature. Children inherit the fitter parent's (exploit) and multiply each by pbt_factor or its
inverse at random (explore); the temperature only where the environment samples agents at their own
(`temperatures=True`). Under `gradient`, which breeds nothing, --pbt is plain PBT truncation:
the bottom elite_frac copy the adapter and hyperparameters of a random top-elite_frac agent, then explore.

Adaptive rank (`--adaptive-rank`, the original design's adaptive compression): every agent has its own
rank in [min_rank, max_rank]. The bank is allocated at max_rank (one batched forward for all); an agent
of rank r sits in it zero-padded, re-factorised by `lora.merge_product_space(..., rank=max_rank)` so its
update (scale alpha/r) is exactly kept under the bank's alpha/max_rank. Zero directions of both A and B
get zero gradient and zero AdamW decay, so learning keeps the rank. A child's rank is its fitter
parent's, grown by rank_step when that parent is an elite and shrunk by rank_step otherwise; the child
is merged straight at that rank (growing keeps more of the parents' combined update, shrinking is an
SVD truncation) and mutated at that rank before it is padded. Saved adapters have their own rank.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from h2q import lora
from h2q.config import ModelConfig, check_options, option
from h2q.errors import ConfigError
from h2q.evolve.es import EvolutionStrategy, make_strategy
from h2q.lora import AdapterBank, LoraAdapter, LoraConfig

STRATEGIES = ("hybrid", "evolution", "gradient", "meta")
LEARNS = {"hybrid": True, "evolution": False, "gradient": True, "meta": True}  # online learning in life
CROSSOVERS = ("merge", "factors", "layer", "none")
SELECTIONS = ("tournament", "proportional", "random")
FLOOR_SHARE = 0.1  # the worst agent's shifted fitness, as a share of the population's fitness spread
LR_RANGE, TEMPERATURE_RANGE = (1e-6, 1.0), (0.05, 5.0)  # PBT keeps hyperparameters inside these
# mutation noise scale for a tensor that is all zero and has no nonzero partner to borrow a scale from
MUTATION_FLOOR = 1e-3


@dataclass
class BreedConfig:
    strategy: str = option("hybrid", "hybrid: learning in life + selection; evolution: selection only; gradient: "
                           "learning only; meta: Reptile toward the elites", choices=STRATEGIES)
    elite_frac: float = option(0.2, "share of agents that pass on unchanged (top by fitness)", above=0, below=1)
    mutation_rate: float = option(0.05, "Gaussian mutation: noise std as a share of each tensor's RMS", at_least=0,
                                  at_most=10)
    selection: str = option("tournament", "how parents are chosen", choices=SELECTIONS)
    tournament: int = option(3, "tournament size", at_least=1)
    crossover: str = option("merge", "merge: fitness-weighted merge of the parents' updates (SVD); factors: "
                            "p1*w + p2*(1-w) on A and B; layer: whole layers from either parent", choices=CROSSOVERS)
    meta_step: float = option(0.5, "meta: Reptile step of the meta adapter toward the elites' mean", above=0,
                              at_most=1)
    pbt: bool = option(False, "PBT: per-agent learning rate and temperature, inherited and perturbed")
    pbt_factor: float = option(1.25, "PBT explore: multiply a hyperparameter by this or its inverse", at_least=1,
                               at_most=100)
    adaptive_rank: bool = option(False, "evolve each agent's adapter rank (elites' children grow, others shrink)")
    min_rank: int = option(2, "adaptive rank: the smallest rank", at_least=1)
    max_rank: int = option(0, "adaptive rank: the largest rank, the bank's (0 = 2 x the starting rank)", at_least=0)
    rank_step: int = option(2, "adaptive rank: how much a child's rank grows or shrinks", at_least=1)
    es_dim: int = option(64, "evolution: dimension of the random subspace of the adapters' B factors searched",
                         at_least=1, at_most=4096)
    es_sigma: float = option(0.5, "evolution: the starting step size of the search (in subspace units)",
                             above=0, at_most=10)
    es_lr: float = option(0.2, "evolution: Adam's learning rate on the search distribution's centre", above=0,
                          at_most=10)

    def __post_init__(self):
        check_options(self)
        if self.adaptive_rank and self.strategy != "hybrid":
            raise ConfigError("adaptive_rank", f"evolves ranks through breeding: use it with strategy hybrid, "
                                               f"not {self.strategy}")
        if self.adaptive_rank and self.crossover != "merge":
            raise ConfigError("adaptive_rank", f"breeds children of a new rank, which only crossover merge can "
                                               f"make (not {self.crossover})")

    def bank_rank(self, lora_rank: int) -> int:
        """The rank the bank is allocated at."""
        if not self.adaptive_rank:
            return lora_rank
        top = self.max_rank or 2 * lora_rank
        if not self.min_rank <= lora_rank <= top:
            raise ConfigError("lora_rank", f"{lora_rank} must lie in [min_rank {self.min_rank}, max_rank {top}] "
                                           f"with adaptive rank")
        return top


@dataclass
class Evaluation:
    """What an environment reports about its agents after a cycle (one process's agents)."""
    fitness: np.ndarray  # (n,), higher is better
    per_agent: dict[str, np.ndarray]  # other (n,) figures, e.g. pct_oracle, bpb
    totals: dict[str, float]  # counts summed over agents, e.g. food_delivered, deaths
    references: dict[str, float]  # per-agent reference levels, e.g. oracle, random, base_bpb
    figures: dict = field(default_factory=dict)  # JSON-able figures for the metrics record, e.g. action counts
    files: dict = field(default_factory=dict)  # name -> JSON-able object for the cycle folder, e.g. world.json


@dataclass
class Agent:
    """One agent's lineage record (the population.json fields)."""
    id: str
    slot: int
    parents: list[str]
    birth_cycle: int
    rank: int
    lr: float
    temperature: float
    fitness: list[float] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)  # per cycle: the env's per-agent figures

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Agent:
        return cls(**d)


class Population:
    """The agents: their adapters in one AdapterBank (slot i = agent i, allocated at the bank's rank),
    their lineage records, the dead ones, for `meta` the meta adapter, for `evolution` the search
    distribution (h2q/evolve/es.py)."""

    def __init__(self, bank: AdapterBank, agents: list[Agent], dead: list[Agent], next_id: int,
                 meta: LoraAdapter | None = None, es: EvolutionStrategy | None = None):
        assert [a.slot for a in agents] == list(range(bank.n)), "agent i lives in bank slot i"
        self.bank, self.agents, self.dead, self.next_id, self.meta, self.es = bank, agents, dead, next_id, meta, es

    @classmethod
    def initial(cls, base_config: ModelConfig, config: LoraConfig, n: int, bank_rank: int, lr: float,
                temperature: float, mutation_rate: float, generator: torch.Generator,
                meta: bool = False, es: dict | None = None) -> Population:
        """n mutations (at the mutation rate) of one fresh adapter of rank config.r (Kaiming A, zero B):
        generation 1 already differs, and every agent descends from one init, so merged parents share
        their A subspace (model soups and linear mode connectivity: weights fine-tuned from a shared
        init average well, ones from different inits do not). For meta that init is the meta adapter.
        With `es` (make_strategy's dim, sigma, lr, seed) the agents are the search distribution's
        first generation instead: its centre and antithetic pairs around it."""
        bank = AdapterBank(base_config, replace(config, r=bank_rank), n, init=False)
        agents = [Agent(f"a{i + 1:04d}", i, [], 1, config.r, lr, temperature) for i in range(n)]
        if es is not None:
            strategy = make_strategy(base_config, config, n, generator=generator, **es)
            population = cls(bank, agents, [], n, es=strategy)
            for slot, adapter in enumerate(strategy.ask(generator)):
                population.set(slot, adapter)
            return population
        init = LoraAdapter(base_config, config, generator=generator)
        population = cls(bank, agents, [], n, meta=init if meta else None)
        for slot in range(n):
            population.set(slot, mutate(init, mutation_rate, generator))
        return population

    def new_id(self) -> str:
        self.next_id += 1
        return f"a{self.next_id:04d}"

    @property
    def n(self) -> int:
        return self.bank.n

    def adapter(self, slot: int) -> LoraAdapter:
        """A copy of the agent in `slot` at its own rank."""
        full = self.bank.adapter(slot)
        rank = self.agents[slot].rank
        return full if rank == self.bank.config.r else lora.merge_product_space([full], rank=rank)

    def set(self, slot: int, adapter: LoraAdapter) -> None:
        """Write an adapter of the agent's rank into its slot, zero-padded to the bank's rank."""
        assert adapter.config.r == self.agents[slot].rank, "an adapter of the agent's own rank"
        if adapter.config.r != self.bank.config.r:
            adapter = lora.merge_product_space([adapter], rank=self.bank.config.r)
        self.bank.set_adapter(slot, adapter)

    def record_fitness(self, fitness, per_agent: dict | None = None) -> None:
        """Append this cycle's fitness, and the env's per-agent figures (e.g. % of the oracle), to
        every living agent's record."""
        for i, (agent, value) in enumerate(zip(self.agents, fitness)):
            agent.fitness.append(float(value))
            for name, values in (per_agent or {}).items():
                agent.scores.setdefault(name, []).append(float(values[i]))

    def to_json(self, cycle: int) -> dict:
        """The population.json object: the living agents and every agent ever (dead ones first)."""
        living = [a.to_dict() for a in self.agents]
        return {"cycle": cycle, "agents": living, "history": [a.to_dict() for a in self.dead] + living}

    def lineage_state(self) -> dict:
        """What resume needs besides the tensors (JSON)."""
        return {"agents": [a.to_dict() for a in self.agents], "dead": [a.to_dict() for a in self.dead],
                "next_id": self.next_id}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"bank.{k}": v for k, v in self.bank.state_dict().items()}
        if self.meta is not None:
            out.update({f"meta.{k}": v for k, v in self.meta.tensors().items()})
        if self.es is not None:
            out.update({f"es.{k}": v for k, v in self.es.state_dict().items()})
        return out

    def load(self, lineage: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Restore from `lineage_state()` and, when given, `tensors()` (resume, or a broadcast)."""
        self.agents = [Agent.from_dict(a) for a in lineage["agents"]]
        self.dead = [Agent.from_dict(a) for a in lineage["dead"]]
        self.next_id = int(lineage["next_id"])
        if tensors is None:
            return
        self.bank.load_state_dict({k[len("bank."):]: v for k, v in tensors.items() if k.startswith("bank.")})
        if self.meta is not None:
            with torch.no_grad():
                for k, t in self.meta.tensors().items():
                    t.copy_(tensors[f"meta.{k}"])
        if self.es is not None:
            self.es.load_state_dict({k[len("es."):]: v.cpu() for k, v in tensors.items() if k.startswith("es.")})

    def to(self, device) -> Population:
        self.bank.to(device)
        if self.meta is not None:
            self.meta.to(device)
        return self


# -- genetic operators -------------------------------------------------------------------------------
def _rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


def mutate(adapter: LoraAdapter, rate: float, generator: torch.Generator | None = None) -> LoraAdapter:
    """Gaussian mutation per tensor, into a new adapter: noise std = rate * RMS of that tensor. A B
    that is still zero (a fresh adapter) borrows the RMS of its own A, so noise of the same relative
    size opens the update; an all-zero A falls back to MUTATION_FLOOR."""
    out = adapter.clone()
    with torch.no_grad():
        for A, B in zip(out.lora_A, out.lora_B):
            a_scale = _rms(A) or MUTATION_FLOOR
            b_scale = _rms(B) or a_scale
            for t, scale in ((A, a_scale), (B, b_scale)):
                t.add_(torch.randn(t.shape, generator=generator).to(t.device, t.dtype) * (rate * scale))
    return out


def layer_crossover(a: LoraAdapter, b: LoraAdapter, generator: torch.Generator | None = None) -> LoraAdapter:
    """Uniform crossover by layer, into a new adapter: each layer's adapter tensors (all its targets,
    A and B together, so every update B@A stays one parent's) come from `a` or `b` with probability 1/2."""
    lora.check_compatible([a, b])
    from_b = (torch.rand(a.base_config.n_layer, generator=generator) < 0.5).tolist()
    out = a.clone()
    with torch.no_grad():
        for key, j in out.slot.items():
            if from_b[int(key.split(".")[1])]:
                out.lora_A[j].copy_(b.lora_A[j])
                out.lora_B[j].copy_(b.lora_B[j])
    return out


# -- the pieces --------------------------------------------------------------------------------------
def elite_count(n: int, elite_frac: float) -> int:
    return min(max(1, math.ceil(elite_frac * n - 1e-9)), n)


def ranking(fitness) -> np.ndarray:
    """Slots from fittest to least fit; ties keep slot order."""
    return np.argsort(-np.asarray(fitness, dtype=np.float64), kind="stable")


def shifted(fitness) -> np.ndarray:
    """Fitness made positive: f - min(f) + FLOOR_SHARE * spread (all 1 when every agent is equal)."""
    f = np.asarray(fitness, dtype=np.float64)
    spread = f.max() - f.min()
    return f - f.min() + FLOOR_SHARE * spread if spread > 0 else np.ones_like(f)


def pick_parent(fitness, cfg: BreedConfig, rng: np.random.Generator, exclude: int | None = None) -> int:
    """One parent slot by tournament, roulette or at random, never `exclude`."""
    n = len(fitness)
    pool = np.array([i for i in range(n) if i != exclude])
    if cfg.selection == "random":
        return int(rng.choice(pool))
    if cfg.selection == "tournament":
        entrants = rng.choice(pool, size=min(cfg.tournament, len(pool)), replace=False)
        return int(entrants[ranking(np.asarray(fitness)[entrants])[0]])
    weights = shifted(fitness)[pool]
    return int(rng.choice(pool, p=weights / weights.sum()))


def merge_weight(first: int, second: int, fitness) -> float:
    """Parent `first`'s share w of a child of slots `first` and `second`, from shifted fitness."""
    s = shifted(fitness)
    return float(s[first] / (s[first] + s[second]))


def breed(p1: LoraAdapter, p2: LoraAdapter, w: float, crossover: str, rank: int,
          generator: torch.Generator | None = None) -> LoraAdapter:
    """A child of rank `rank` before mutation. `merge` re-factorises at that rank; `factors` and
    `layer` need parents of that rank (BreedConfig allows only `merge` with adaptive rank)."""
    if crossover == "merge":
        return lora.merge_product_space([p1, p2], [w, 1.0 - w], rank=rank)
    if crossover == "none":
        return (p1 if w >= 0.5 else p2).clone()
    assert p1.config.r == p2.config.r == rank, "factor-wise crossover needs parents of the child's rank"
    if crossover == "factors":
        return lora.average_factors([p1, p2], [w, 1.0 - w])
    return layer_crossover(p1, p2, generator)


def child_rank(parent: Agent, parent_is_elite: bool, cfg: BreedConfig, bank_rank: int) -> int:
    if not cfg.adaptive_rank:
        return parent.rank
    step = cfg.rank_step if parent_is_elite else -cfg.rank_step
    return int(min(max(parent.rank + step, cfg.min_rank), bank_rank))


def explore(value: float, cfg: BreedConfig, rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """PBT explore: value times pbt_factor or 1/pbt_factor (coin flip), kept inside `bounds`."""
    if not cfg.pbt:
        return value
    factor = cfg.pbt_factor if rng.random() < 0.5 else 1.0 / cfg.pbt_factor
    return float(min(max(value * factor, bounds[0]), bounds[1]))


def reptile_step(meta: LoraAdapter, elites: list[LoraAdapter], step: float) -> LoraAdapter:
    """theta + step * (mean(elites) - theta), on A and B separately."""
    k = len(elites)
    return lora.linear_combination([meta, *elites], [1.0 - step] + [step / k] * k)


def diversity(bank: AdapterBank) -> float:
    """Mean pairwise distance between the agents' updates, sqrt(sum over linears ||dW_i - dW_j||_F^2),
    from r x r Gram products (no (out, in) matrix is formed): <B_i A_i, B_j A_j> = sum((B_i^T B_j) *
    (A_i A_j^T))."""
    n = bank.n
    if n < 2:
        return 0.0
    gram = torch.zeros(n, n, dtype=torch.float64)
    with torch.no_grad():
        for A, B in zip(bank.lora_A, bank.lora_B):
            a, b = A.detach().double().cpu(), B.detach().double().cpu()  # (n, r, in), (n, out, r)
            aa = torch.einsum("ikx,jlx->ijkl", a, a)  # (n, n, r, r): A_i A_j^T
            bb = torch.einsum("iok,jol->ijkl", b, b)  # (n, n, r, r): B_i^T B_j
            gram += (aa * bb).sum((2, 3))
    gram *= bank.scaling ** 2
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).sqrt()
    upper = torch.triu_indices(n, n, 1)
    return float(dist[upper[0], upper[1]].mean())


# -- one generation ----------------------------------------------------------------------------------
def next_generation(population: Population, fitness, cfg: BreedConfig, cycle: int, generator: torch.Generator,
                    rng: np.random.Generator, temperatures: bool = True) -> list[int]:
    """Replace the agents that do not pass on after cycle `cycle` was evaluated with `fitness` (one
    value per slot, higher is better). Children are born into cycle + 1. Returns the replaced slots
    (the caller resets their optimizer state). Every child is made before any slot is written, so a
    parent is always read as it was evaluated. temperatures=False: the environment samples every
    agent at one temperature, so PBT leaves it alone."""
    def hyper(parent: Agent) -> tuple[float, float]:
        temperature = explore(parent.temperature, cfg, rng, TEMPERATURE_RANGE) if temperatures else parent.temperature
        return explore(parent.lr, cfg, rng, LR_RANGE), temperature

    fitness = np.asarray(fitness, dtype=np.float64)
    n = population.n
    assert fitness.shape == (n,), f"one fitness per agent, got shape {fitness.shape}"
    order = rng.permutation(n) if cfg.selection == "random" else ranking(fitness)  # random: no selection
    n_elite = elite_count(n, cfg.elite_frac)
    elites = set(order[:n_elite].tolist())
    replaced = sorted(order[n_elite:].tolist())
    bank_rank = population.bank.config.r
    born: dict[int, tuple[Agent, LoraAdapter]] = {}
    if cfg.strategy == "evolution":
        population.es.tell(fitness)
        centre = population.agents[0]
        replaced = list(range(n))
        for slot, adapter in enumerate(population.es.ask(generator)):
            born[slot] = (Agent(population.new_id(), slot, [centre.id], cycle + 1, bank_rank, *hyper(centre)),
                          adapter)
    elif cfg.strategy == "gradient":
        if not cfg.pbt:
            return []
        replaced = sorted(order[n - n_elite:].tolist())
        for slot in replaced:
            source = population.agents[int(rng.choice(order[:n_elite]))]
            born[slot] = (Agent(population.new_id(), slot, [source.id], cycle + 1, source.rank, *hyper(source)),
                          population.adapter(source.slot))
    elif cfg.strategy == "meta":
        population.meta = reptile_step(population.meta, [population.bank.adapter(s) for s in order[:n_elite]],
                                       cfg.meta_step)
        best = population.agents[int(order[0])]
        for slot in replaced:
            born[slot] = (Agent(population.new_id(), slot, [population.agents[s].id for s in order[:n_elite]],
                                cycle + 1, bank_rank, *hyper(best)),
                          mutate(population.meta, cfg.mutation_rate, generator))
    else:
        for slot in replaced:
            first = pick_parent(fitness, cfg, rng)
            second = pick_parent(fitness, cfg, rng, exclude=first)
            fitter = population.agents[first if fitness[first] >= fitness[second] else second]
            rank = child_rank(fitter, fitter.slot in elites, cfg, bank_rank)
            w = merge_weight(first, second, fitness)
            child = breed(population.adapter(first), population.adapter(second), w, cfg.crossover, rank, generator)
            born[slot] = (Agent(population.new_id(), slot, [population.agents[first].id, population.agents[second].id],
                                cycle + 1, rank, *hyper(fitter)),
                          mutate(child, cfg.mutation_rate, generator))
    for slot, (agent, adapter) in born.items():
        population.dead.append(population.agents[slot])
        population.agents[slot] = agent
        population.set(slot, adapter)
    return replaced
