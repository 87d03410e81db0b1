"""`--env grid`: the evolve runner's view of the grid world. One process's agents (a bank of n slots)
live one episode with online learning, then are scored on fresh world seeds with learning off, next to
the scripted oracle and the random policy on the same seeds (h2q/evolve/world.py gives fitness its
scale: food delivered per step plus a small survival term).

The policy and the learner are h2q/evolve/agent.py's and learner.py's, built in `make_agents` and
kept across cycles (Adam moments and experience carry over; a replaced agent's are reset). Per cycle
the runner sets each agent's learning rate (PBT), reseeds the sampling and replay generators, and
saves the learner's `state_dict()` for resume. The policy has one temperature for all agents, so PBT
here explores learning rates only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from h2q.errors import ConfigError
from h2q.evolve import RandomPolicy, StackedEnv, World, WorldConfig, WorldEnv, evaluate_policy, run_episode
from h2q.evolve.agent import PREFIXES, AgentConfig, AgentPolicy
from h2q.evolve.evolution import Agent, Evaluation
from h2q.evolve.learner import Learner, LearnerConfig
from h2q.evolve.planners import same_view_planner
from h2q.evolve.world import ACTIONS, obs_len
from h2q.lora import AdapterBank

FITNESS = ("food", "return")  # what selection ranks agents by: the world's fitness, or the shaped return


@dataclass
class AgentKnobs:
    """How the runner sets up the agents (its flags)."""
    lr: float
    temperature: float
    memory: int
    kv: str
    fitness: str = "food"


def make_agents(model, bank: AdapterBank, knobs: AgentKnobs, world: WorldConfig) -> tuple[AgentPolicy, Learner]:
    """(policy, learner) for the agents of `bank` (slot i = agent i) in worlds of `world`'s level,
    learning at knobs.lr."""
    config = AgentConfig(rank=bank.config.r, alpha=bank.config.alpha, temperature=knobs.temperature,
                         memory=knobs.memory, kv=knobs.kv)
    policy = AgentPolicy(model, bank, config, prefix=PREFIXES[world.level], obs_len=obs_len(world))
    return policy, Learner(policy, LearnerConfig(lr=knobs.lr))


def heldout_food_rates(policy_for, world: WorldConfig, seeds, slots, crowd: bool) -> np.ndarray:
    """Food delivered per step on held-out world seeds, learning off, every world of the batch decided
    in one forward per tick (StackedEnv): -> (len(slots), len(seeds)). crowd=False puts each agent of
    `slots` alone in each world; crowd=True puts them all together in each world (then a baseline
    needs as many copies). `policy_for(rows)` makes the policy whose row r acts as agent rows[r] (a
    bank slot of AgentPolicy, or ignored by a baseline)."""
    seeds, slots = list(seeds), list(slots)
    rows = slots * len(seeds)  # world-major: world k holds rows k*len(slots) .. (k+1)*len(slots)-1
    if crowd:
        env = StackedEnv([WorldEnv(world, len(slots)) for _ in seeds], seeds)
    else:
        env = StackedEnv([WorldEnv(world, 1) for _ in seeds for _ in slots], [s for s in seeds for _ in slots])
    env.reset()
    stats = run_episode(env, policy_for(rows))
    rate = stats.food_rate  # (len(seeds) * len(slots),), world-major
    return rate.reshape(len(seeds), len(slots)).T  # (slots, seeds)


class Tracer:
    """What the report draws of one evaluation episode: every agent's cells and carried flag per tick,
    the visit counts of all agents, and how often each action was taken."""

    def __init__(self, policy):
        self.policy, self.positions, self.carrying, self.world = policy, [], [], None
        self.actions = np.zeros(len(ACTIONS), dtype=np.int64)

    def reset(self, n_agents: int) -> None:
        self.policy.reset(n_agents)

    def act(self, obs, alive):
        actions = self.policy.act(obs, alive)
        self.actions += np.bincount(actions[alive], minlength=len(ACTIONS))
        return actions

    def after_tick(self, env) -> None:
        w = env.world
        if self.world is None:
            self.world = {"walls": w.walls.astype(int).tolist(), "home": w.home.tolist(),
                          "food": np.argwhere(w.food)[:, ::-1].tolist()}
        self.positions.append(w.pos.copy())
        self.carrying.append(w.carrying.copy())

    def record(self, cfg: WorldConfig, seed: int, agent: Agent, row: int) -> dict:
        """cycle_NNN/world.json: the map at the episode start, the trajectory of `agent` (row `row` of
        this process's agents), all visits."""
        pos = np.stack(self.positions)  # (T, n, 2) as (x, y)
        visits = np.zeros((cfg.size, cfg.size), dtype=np.int64)
        np.add.at(visits, (pos[..., 1].ravel(), pos[..., 0].ravel()), 1)
        return {"level": cfg.level, "size": cfg.size, **self.world, "seed": int(seed),
                "trajectory": {"agent": agent.id, "slot": agent.slot, "positions": pos[:, row].tolist(),
                               "carrying": np.stack(self.carrying)[:, row].astype(int).tolist()},
                "visits": visits.tolist()}


class GridEnv:
    """The grid world of one process: its agents' policy and learner, and the baselines."""

    per_agent_temperature = False  # AgentPolicy samples all agents at one temperature

    def __init__(self, model, bank: AdapterBank, world: WorldConfig, eval_episodes: int, knobs: AgentKnobs,
                 render=None):
        if eval_episodes < 1:
            raise ConfigError("eval_episodes", f"must be >= 1, got {eval_episodes}")
        if knobs.fitness not in FITNESS:
            raise ConfigError("fitness", f"must be one of {', '.join(FITNESS)}, got {knobs.fitness!r}")
        self.bank, self.world, self.eval_episodes, self.render, self.knobs = bank, world, eval_episodes, render, knobs
        self.policy, self.learner = make_agents(model, bank, knobs, world)

    def ticks(self, steps: int, learns: bool) -> int:
        return steps * learns + steps * self.eval_episodes

    def live(self, agents: list[Agent], steps: int, seed: int, tick) -> dict[str, np.ndarray]:
        """One episode of `steps` ticks with online learning; -> per-agent delivered, died, reward."""
        self._reseed(agents, seed)
        world = World(self.world, self.bank.n, seed)

        def after_tick(w):
            tick()
            if self.render is not None:
                self.render(w)

        self.bank.train()
        stats = run_episode(world, self.policy, steps, learner=self.learner, render=after_tick)
        self.bank.eval()
        return {"delivered": stats.delivered, "died": stats.died, "reward": stats.reward}

    def evaluate(self, agents: list[Agent], seed: int, tick) -> Evaluation:
        """Each agent on `eval_episodes` fresh world seeds (from `seed`), learning off, beside the
        level's oracle (the planner that reads the same bytes) and the random policy on the same seeds
        with as many agents. Per seed, an agent's normalised score is (agent - random) / (oracle -
        random) in food delivered per step (Atari's and Melting Pot's normalisation), averaged over
        the seeds. Fitness, what selection ranks by, is the world's (`food`) or the shaped episode
        return (`return`, denser: it also rewards getting closer to food and picking it up)."""
        self._reseed(agents, seed)
        seeds = np.random.SeedSequence(seed).generate_state(self.eval_episodes).tolist()
        n, steps = self.bank.n, self.world.steps
        tracer = Tracer(self.policy)
        first = []

        def after_tick(env):
            tick()
            if self.render is not None:
                self.render(env)
            if not first or first[0] is env.world:
                first[:1] = [env.world]
                tracer.after_tick(env)

        result = evaluate_policy(tracer, self.world, seeds, n, steps, render=after_tick)
        oracle = evaluate_policy(same_view_planner(self.world, seed % 2**32), self.world, seeds, n, steps)
        rand = evaluate_policy(RandomPolicy(seed=seed % 2**32), self.world, seeds, n, steps)
        gaps = [max(o.food_rate.mean() - r.food_rate.mean(), 1e-9) for o, r in zip(oracle.episodes, rand.episodes)]
        normalised = np.mean([(e.food_rate - r.food_rate.mean()) / gap
                              for e, r, gap in zip(result.episodes, rand.episodes, gaps)], axis=0)
        fitness = result.fitness if self.knobs.fitness == "food" else np.mean([e.reward for e in result.episodes], 0)
        best = int(np.argmax(fitness))
        return Evaluation(
            fitness=fitness, per_agent={"pct_oracle": result.percent_of(oracle), "normalised": normalised},
            totals={"food_delivered": float(sum(e.delivered.sum() for e in result.episodes)),
                    "deaths": float(sum(e.died.sum() for e in result.episodes))},
            references={"oracle": float(oracle.fitness.mean()), "random": float(rand.fitness.mean()),
                        "oracle_food_rate": float(oracle.food_rate.mean())},
            figures={"actions": {chr(a): int(c) for a, c in zip(ACTIONS, tracer.actions)}},
            files={"world.json": tracer.record(self.world, seeds[0], agents[best], best)})

    def _reseed(self, agents: list[Agent], seed: int) -> None:
        self.policy.generator.manual_seed(seed)
        self.learner.reseed(seed)
        self.learner.set_lr([a.lr for a in agents])

    def reset_slots(self, slots) -> None:
        for slot in slots:
            self.learner.reset_agent(slot)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.learner.state_dict()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.learner.load_state_dict(tensors)
