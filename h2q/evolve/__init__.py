"""h2q.evolve: the grid world, the agents that act in it and learn online, and the episode loop that
joins them.

A policy is anything with `reset(n_agents)` and `act(obs, alive) -> actions`: `obs` is the world's
(n, OBS_LEN) uint8 observation array, `alive` the (n,) mask of agents whose action counts, actions
are (n,) indices into `world.ACTIONS`. `RandomPolicy` and `OraclePolicy` (world.py) are the scale,
`AgentPolicy` (agent.py) is the 20 LoRA agents on one base. A learner (learner.py) is fed every
transition by `run_episode` and updates the adapters as it goes.

    bank = make_bank(model, 20, AgentConfig())             # h2q/evolve/agent.py
    policy = AgentPolicy(model, bank, AgentConfig())       # agent i acts with bank slot policy.slots[i]
    learner = Learner(policy, LearnerConfig())             # h2q/evolve/learner.py
    stats = run_episode(World(WorldConfig(), 20, seed), policy, learner=learner)
    result = evaluate_policy(policy, WorldConfig(), seeds=[100, 101], n_agents=20)
    oracle = evaluate_policy(OraclePolicy(), WorldConfig(), seeds=[100, 101], n_agents=20)
    result.percent_of(oracle)                              # per agent, % of the oracle's food rate

When evolution writes a new adapter into slot i (`bank.set_adapter(i, child)`), it calls
`learner.reset_agent(i)` so the newcomer starts with fresh experience and optimizer moments.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from h2q.evolve.world import ACTIONS, OBS_LEN, OraclePolicy, RandomPolicy, Renderer, World, WorldConfig


@dataclass
class EpisodeStats:
    """Per-agent results of one episode (arrays of shape (n_agents,))."""
    steps: int
    delivered: np.ndarray
    picked: np.ndarray
    eaten: np.ndarray
    died: np.ndarray
    ticks_alive: np.ndarray
    reward: np.ndarray  # shaped reward summed over the episode
    fitness: np.ndarray

    @property
    def food_rate(self) -> np.ndarray:
        """Food delivered per agent per step."""
        return self.delivered / self.steps


def run_episode(world: World, policy, steps: int | None = None, learner=None, render=None) -> EpisodeStats:
    """Run `world` for `steps` ticks (default its config's) or until all agents are dead. Every
    transition goes to `learner.record(obs, actions, rewards, alive, done)`; `render(world)` is
    called after every tick when given."""
    steps = steps or world.cfg.steps
    policy.reset(world.n)
    reward = np.zeros(world.n)
    obs = world.observe()
    for _ in range(steps):
        alive = world.alive.copy()
        actions = policy.act(obs, alive)
        rewards = world.step(actions)
        reward += rewards
        last = world.t >= steps
        if learner is not None:
            learner.record(obs, actions, rewards, alive, ~world.alive | last)
        if render is not None:
            render(world)
        if not world.alive.any():
            break
        obs = world.observe()
    return EpisodeStats(steps=steps, delivered=world.delivered.copy(), picked=world.picked.copy(),
                        eaten=world.eaten.copy(), died=~world.alive, ticks_alive=world.ticks_alive.copy(),
                        reward=reward, fitness=world.fitness(steps))


@dataclass
class EvalResult:
    """Per-agent means over the evaluated seeds."""
    food_rate: np.ndarray
    fitness: np.ndarray
    died: np.ndarray  # fraction of episodes each agent died in
    episodes: list[EpisodeStats]

    def percent_of(self, reference: "EvalResult") -> np.ndarray:
        """Each agent's food rate as % of the reference's mean food rate per agent (e.g. the oracle)."""
        return 100.0 * self.food_rate / max(float(reference.food_rate.mean()), 1e-12)


def evaluate_policy(policy, cfg: WorldConfig, seeds, n_agents: int, steps: int | None = None,
                    learner=None, render=None) -> EvalResult:
    """Run one episode per world seed (all agents of `policy` together in each world)."""
    episodes = [run_episode(World(cfg, n_agents, seed), policy, steps, learner, render) for seed in seeds]
    return EvalResult(food_rate=np.mean([e.food_rate for e in episodes], axis=0),
                      fitness=np.mean([e.fitness for e in episodes], axis=0),
                      died=np.mean([e.died for e in episodes], axis=0), episodes=episodes)


__all__ = ["ACTIONS", "OBS_LEN", "EpisodeStats", "EvalResult", "OraclePolicy", "RandomPolicy", "Renderer",
           "World", "WorldConfig", "evaluate_policy", "run_episode"]
