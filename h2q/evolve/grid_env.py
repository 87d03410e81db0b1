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
from h2q.evolve import OraclePolicy, RandomPolicy, World, WorldConfig, evaluate_policy, run_episode
from h2q.evolve.agent import AgentConfig, AgentPolicy
from h2q.evolve.evolution import Agent, Evaluation
from h2q.evolve.learner import Learner, LearnerConfig
from h2q.lora import AdapterBank


@dataclass
class AgentKnobs:
    """How the runner sets up the agents (its flags)."""
    lr: float
    temperature: float
    memory: int
    kv: str


def make_agents(model, bank: AdapterBank, knobs: AgentKnobs) -> tuple[AgentPolicy, Learner]:
    """(policy, learner) for the agents of `bank` (slot i = agent i), learning at knobs.lr."""
    config = AgentConfig(rank=bank.config.r, alpha=bank.config.alpha, temperature=knobs.temperature,
                         memory=knobs.memory, kv=knobs.kv)
    policy = AgentPolicy(model, bank, config)
    return policy, Learner(policy, LearnerConfig(lr=knobs.lr))


class GridEnv:
    """The grid world of one process: its agents' policy and learner, and the baselines."""

    per_agent_temperature = False  # AgentPolicy samples all agents at one temperature

    def __init__(self, model, bank: AdapterBank, world: WorldConfig, eval_episodes: int, knobs: AgentKnobs,
                 render=None):
        if eval_episodes < 1:
            raise ConfigError("eval_episodes", f"must be >= 1, got {eval_episodes}")
        self.bank, self.world, self.eval_episodes, self.render = bank, world, eval_episodes, render
        self.policy, self.learner = make_agents(model, bank, knobs)

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
        """Each agent on `eval_episodes` fresh world seeds (from `seed`), learning off, beside the oracle
        and random policies on the same seeds with as many agents."""
        self._reseed(agents, seed)
        seeds = np.random.SeedSequence(seed).generate_state(self.eval_episodes).tolist()
        n, steps = self.bank.n, self.world.steps
        result = evaluate_policy(self.policy, self.world, seeds, n, steps, render=lambda w: tick())
        oracle = evaluate_policy(OraclePolicy(seed=seed % 2**32), self.world, seeds, n, steps)
        rand = evaluate_policy(RandomPolicy(seed=seed % 2**32), self.world, seeds, n, steps)
        return Evaluation(
            fitness=result.fitness, per_agent={"pct_oracle": result.percent_of(oracle)},
            totals={"food_delivered": float(sum(e.delivered.sum() for e in result.episodes)),
                    "deaths": float(sum(e.died.sum() for e in result.episodes))},
            references={"oracle": float(oracle.fitness.mean()), "random": float(rand.fitness.mean())})

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
