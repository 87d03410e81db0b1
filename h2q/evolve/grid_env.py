"""`--env grid`: the evolve runner's view of the grid world. One process's agents (a bank of n slots)
live one episode with online learning, then are scored on fresh world seeds with learning off, next to
the scripted oracle and the random policy on the same seeds (h2q/evolve/world.py gives fitness its
scale: food delivered per step plus a small survival term).

The policy and the learner are h2q/evolve/agent.py's and learner.py's, built in `make_agents` and
kept across cycles (Adam moments and experience carry over; a replaced agent's are reset). Per cycle
the runner sets each agent's learning rate (PBT), reseeds the sampling and replay generators, and
saves the learner's state for resume (`learner_state`). The policy has one temperature for all
agents, so PBT here explores learning rates only.
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


BUFFERS = ("context", "action", "reward", "logprob", "valid", "done")  # the learner's experience arrays
PER_AGENT = ("lr_scale", "kl")  # the learner's per-agent adaptive-step tensors, where it has them


class PerAgentLr:
    """The learner's BankAdam with agent i stepping at lr * scale[i]: Adam's step is linear in the
    learning rate, so scaling each agent's change after a step at lr is exactly a step at lr * scale[i].
    With every scale 1 the step is left untouched, bit for bit."""

    def __init__(self, opt, n: int):
        self.opt, self.scale = opt, torch.ones(n)

    def step(self, active: torch.Tensor, lr: float) -> None:
        if bool((self.scale == 1).all()):
            return self.opt.step(active, lr)
        before = [p.detach().clone() for p in self.opt.params]
        self.opt.step(active, lr)
        with torch.no_grad():
            for p, old in zip(self.opt.params, before):
                scale = self.scale.to(p.device, p.dtype).view((-1,) + (1,) * (p.dim() - 1))  # (n, 1, ...)
                p.copy_(old + (p - old) * scale)

    def __getattr__(self, name):
        return getattr(self.opt, name)


def make_agents(model, bank: AdapterBank, knobs: AgentKnobs) -> tuple[AgentPolicy, Learner]:
    """(policy, learner) for the agents of `bank` (slot i = agent i), learning at knobs.lr."""
    config = AgentConfig(rank=bank.config.r, alpha=bank.config.alpha, temperature=knobs.temperature,
                         memory=knobs.memory, kv=knobs.kv)
    policy = AgentPolicy(model, bank, config)
    learner = Learner(policy, LearnerConfig(lr=knobs.lr))
    learner.opt = PerAgentLr(learner.opt, bank.n)
    return policy, learner


def learner_state(learner: Learner) -> dict[str, torch.Tensor]:
    """Everything a learner carries from one cycle to the next, as tensors: Adam moments and step
    counts, the last good weights, the experience buffers, the per-agent step-size state and the
    counters (its replay generator is reseeded every cycle, so it needs no saving)."""
    opt = learner.opt.opt
    out = {"adam.steps": opt.steps, "counters": torch.tensor([learner.t, learner.updates, learner.skipped,
                                                              learner.restored])}
    for i, (m, v, good) in enumerate(zip(opt.m, opt.v, learner.good)):
        out.update({f"adam.m.{i}": m, f"adam.v.{i}": v, f"good.{i}": good})
    out.update({f"buffer.{name}": torch.from_numpy(getattr(learner, name)) for name in BUFFERS})
    out.update({f"agent.{name}": getattr(learner, name) for name in PER_AGENT if hasattr(learner, name)})
    return out


def load_learner_state(learner: Learner, tensors: dict[str, torch.Tensor]) -> None:
    opt = learner.opt.opt
    with torch.no_grad():
        opt.steps.copy_(tensors["adam.steps"])
        for i, (m, v, good) in enumerate(zip(opt.m, opt.v, learner.good)):
            m.copy_(tensors[f"adam.m.{i}"])
            v.copy_(tensors[f"adam.v.{i}"])
            good.copy_(tensors[f"good.{i}"])
    for name in BUFFERS:
        getattr(learner, name)[...] = tensors[f"buffer.{name}"].numpy()
    for name in PER_AGENT:
        if hasattr(learner, name):
            setattr(learner, name, tensors[f"agent.{name}"].to(getattr(learner, name).device).clone())
    learner.t, learner.updates, learner.skipped, learner.restored = (int(x) for x in tensors["counters"])


class GridEnv:
    """The grid world of one process: its agents' policy and learner, and the baselines."""

    per_agent_temperature = False  # AgentPolicy samples all agents at one temperature

    def __init__(self, model, bank: AdapterBank, world: WorldConfig, eval_episodes: int, knobs: AgentKnobs,
                 render=None):
        if eval_episodes < 1:
            raise ConfigError("eval_episodes", f"must be >= 1, got {eval_episodes}")
        self.bank, self.world, self.eval_episodes, self.render, self.knobs = bank, world, eval_episodes, render, knobs
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
        self.learner.rng = np.random.default_rng(seed)
        self.learner.opt.scale = torch.tensor([a.lr / self.knobs.lr for a in agents])

    def reset_slots(self, slots) -> None:
        for slot in slots:
            self.learner.reset_agent(slot)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return learner_state(self.learner)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_learner_state(self.learner, tensors)
