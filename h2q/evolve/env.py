"""The environment interface of h2q.evolve: what a world must offer for the agents to live in it.

Names follow PettingZoo's parallel API (Terry et al. 2021) without depending on it, with one array
row per agent instead of one dict entry, because the agents decide in one batched forward:

* `possible_agents`: the ids 0..n-1 (row i of every array is agent i); `agents`: the ids not done yet.
* `action_space(agent)` -> `ByteActions`: action index k means byte `actions[k]` (the LoRA agents
  score exactly these bytes at their head); `env.action_bytes` is the same bytes.
* `observation_space(agent)` -> `ByteObservations`: one row of `length` bytes; `env.obs_len`.
* `reset(seed) -> obs`: a new episode, (n, obs_len) uint8.
* `step(actions) -> (obs, rewards, dones, info)`: actions (n,) indices into the action bytes (a done
  agent's are ignored), obs (n, obs_len) uint8, rewards (n,) float, dones (n,) bool, info a dict.
  Done is PettingZoo's termination or truncation: an agent is done once it is out (died) or the
  episode is over, and stays done until the next reset.
* `fitness() -> (n,)`: each agent's unshaped score of the episode so far (what evolution selects
  on, while rewards may be shaped for learning).
* `max_steps`: the episode length when it is fixed (None when only the world knows when it ends).

A world subclasses `ByteEnv`, sets `action_bytes`, `obs_len`, `possible_agents` (and `max_steps`),
and writes `_reset(seed) -> obs`, `_step(actions) -> (obs, rewards, dones, info)` and `fitness()`.
`ByteEnv.reset` and `ByteEnv.step` check every array's shape and type, so a plug-in's slip is one
clear error, and keep `obs` (the latest observation) and `dones` (sticky) for the episode loop.
`LineEnv` below is a complete world in 50 lines; the grid world's adapter is
`h2q.evolve.world.WorldEnv`.

The episode loop (`run_episode`, `evaluate_policy`) drives any such env with any policy: an object
with `reset(n_agents)` and `act(obs, alive) -> (n,) action indices`, `alive` the (n,) mask of agents
not done (h2q/evolve/planners.py has the grid's baselines, h2q/evolve/agent.py the LoRA agents).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from h2q.errors import H2QError


@dataclass(frozen=True)
class ByteActions:
    """A discrete action space whose index k is the byte `actions[k]`."""
    actions: bytes

    @property
    def n(self) -> int:
        return len(self.actions)


@dataclass(frozen=True)
class ByteObservations:
    """A fixed-width text observation: `length` bytes (uint8) per agent."""
    length: int


class ByteEnv:
    """Base of every world: the checks and bookkeeping of reset/step around a world's own rules."""

    action_bytes: bytes
    obs_len: int
    possible_agents: list[int]
    max_steps: int | None = None

    # ---- what a world writes ----------------------------------------------------------------------
    def _reset(self, seed: int | None) -> np.ndarray:
        raise NotImplementedError

    def _step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        raise NotImplementedError

    def fitness(self) -> np.ndarray:
        raise NotImplementedError

    # ---- the interface ------------------------------------------------------------------------------
    @property
    def num_agents(self) -> int:
        return len(self.possible_agents)

    @property
    def agents(self) -> list[int]:
        return [a for a, done in zip(self.possible_agents, self.dones) if not done]

    def action_space(self, agent: int) -> ByteActions:
        return ByteActions(self.action_bytes)

    def observation_space(self, agent: int) -> ByteObservations:
        return ByteObservations(self.obs_len)

    def reset(self, seed: int | None = None) -> np.ndarray:
        self.dones = np.zeros(self.num_agents, dtype=bool)  # `_reset` may mark agents absent from the start
        self.obs = self._check_obs(self._reset(seed))
        return self.obs

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        n = self.num_agents
        actions = np.asarray(actions)
        if actions.shape != (n,) or actions.dtype.kind not in "iu" or not (
                (actions >= 0) & (actions < len(self.action_bytes))).all():
            raise H2QError(f"{type(self).__name__}.step needs ({n},) action indices in 0..{len(self.action_bytes) - 1}, "
                           f"got {actions.dtype} {actions.shape}")
        obs, rewards, dones, info = self._step(actions.astype(np.int64))
        self.obs = self._check_obs(obs)
        rewards, dones = np.asarray(rewards, dtype=np.float64), np.asarray(dones)
        if rewards.shape != (n,) or dones.shape != (n,) or dones.dtype != bool or not isinstance(info, dict):
            raise H2QError(f"{type(self).__name__}._step must return rewards ({n},), dones ({n},) bool and an "
                           f"info dict; got rewards {rewards.shape}, dones {dones.dtype} {dones.shape}, "
                           f"info {type(info).__name__}")
        self.dones = self.dones | dones
        return self.obs, rewards, self.dones.copy(), info

    def _check_obs(self, obs) -> np.ndarray:
        shape = (self.num_agents, self.obs_len)
        if not isinstance(obs, np.ndarray) or obs.dtype != np.uint8 or obs.shape != shape:
            got = f"{obs.dtype} {obs.shape}" if isinstance(obs, np.ndarray) else type(obs).__name__
            raise H2QError(f"{type(self).__name__} must observe a {shape} uint8 array, got {got}")
        return obs


class StackedEnv(ByteEnv):
    """Worlds side by side as one env: agent rows are the first world's agents, then the second's, and
    so on, and each world keeps its own seed (`seeds`, used by every reset). One batched forward then
    decides for all of them, e.g. one agent in each of 32 held-out worlds (Gymnasium's vector
    environments, here along the agent axis). `info` holds the entries every world reports, joined."""

    def __init__(self, envs: list[ByteEnv], seeds):
        assert envs and len(envs) == len(seeds), "one seed per world"
        self.envs, self.seeds = envs, list(seeds)
        self.action_bytes, self.obs_len, self.max_steps = envs[0].action_bytes, envs[0].obs_len, envs[0].max_steps
        assert all(e.action_bytes == self.action_bytes and e.obs_len == self.obs_len for e in envs), "alike worlds"
        self.bounds = np.cumsum([0] + [e.num_agents for e in envs])
        self.possible_agents = list(range(int(self.bounds[-1])))

    def _reset(self, seed):
        obs = [env.reset(s) for env, s in zip(self.envs, self.seeds)]
        self.dones = np.concatenate([env.dones for env in self.envs])
        return np.concatenate(obs)

    def _step(self, actions):
        parts = [env.step(actions[lo:hi]) for env, lo, hi in zip(self.envs, self.bounds[:-1], self.bounds[1:])]
        keys = set.intersection(*(set(p[3]) for p in parts))
        info = {k: np.concatenate([p[3][k] for p in parts]) for k in sorted(keys)}
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), info)

    def fitness(self) -> np.ndarray:
        return np.concatenate([env.fitness() for env in self.envs])


# ---- the episode loop --------------------------------------------------------------------------------
@dataclass
class EpisodeStats:
    """One episode: its length, each agent's shaped reward sum and fitness, (n,) each, and the env's
    info after the last tick; every info entry reads as an attribute too (the grid's `delivered`,
    `picked`, `eaten`, `died`, `ticks_alive`)."""
    steps: int
    reward: np.ndarray
    fitness: np.ndarray
    info: dict

    def __getattr__(self, name):
        info = self.__dict__.get("info", {})
        if name in info:
            return info[name]
        raise AttributeError(f"EpisodeStats has no {name!r} (the env's info holds {sorted(info)})")

    @property
    def food_rate(self) -> np.ndarray:
        """The grid's food delivered per agent per step."""
        return self.info["delivered"] / self.steps


def as_env(world, steps: int | None = None) -> ByteEnv:
    """A ByteEnv as it is, or the env view of a world object that offers `as_env(steps)` (the grid's
    World), taking it from where it stands."""
    return world if isinstance(world, ByteEnv) else world.as_env(steps)


def run_episode(world, policy, steps: int | None = None, learner=None, render=None) -> EpisodeStats:
    """Run `world` (a ByteEnv already reset, or a World just built) from where it stands for `steps`
    ticks (default `max_steps`) or until every agent is done. Every transition goes to
    `learner.record(obs, actions, rewards, alive, done)`; `render(world)` is called after every tick
    when given."""
    env = as_env(world, steps)
    steps = steps or env.max_steps
    policy.reset(env.num_agents)
    reward = np.zeros(env.num_agents)
    obs, info, t = env.obs, {}, 0
    while steps is None or t < steps:
        alive = ~env.dones
        actions = policy.act(obs, alive)
        next_obs, rewards, dones, info = env.step(actions)
        t += 1
        reward += rewards
        if learner is not None:
            learner.record(obs, actions, rewards, alive, dones | (t == steps))
        if render is not None:
            render(world)
        if dones.all():
            break
        obs = next_obs
    return EpisodeStats(steps=steps or t, reward=reward, fitness=env.fitness(), info=info)


@dataclass
class EvalResult:
    """Per-agent means over the evaluated seeds, and the episodes."""
    fitness: np.ndarray
    episodes: list[EpisodeStats]

    @property
    def food_rate(self) -> np.ndarray:
        return np.mean([e.food_rate for e in self.episodes], axis=0)

    @property
    def died(self) -> np.ndarray:
        """Fraction of the episodes each agent died in (the grid)."""
        return np.mean([e.died for e in self.episodes], axis=0)

    def percent_of(self, reference: EvalResult) -> np.ndarray:
        """Each agent's food rate as % of the reference's mean food rate per agent (e.g. the oracle)."""
        return 100.0 * self.food_rate / max(float(reference.food_rate.mean()), 1e-12)


def evaluate_policy(policy, world, seeds, n_agents: int | None = None, steps: int | None = None,
                    learner=None, render=None) -> EvalResult:
    """One episode per seed, all agents of `policy` together in each: `world` is a ByteEnv (reset
    to each seed) or a world config that offers `make_env(n_agents, steps)` (the grid's WorldConfig)."""
    env = world if isinstance(world, ByteEnv) else world.make_env(n_agents, steps)
    episodes = []
    for seed in seeds:
        env.reset(seed)
        episodes.append(run_episode(env, policy, steps, learner, render))
    return EvalResult(fitness=np.mean([e.fitness for e in episodes], axis=0), episodes=episodes)


# ---- the example plug-in --------------------------------------------------------------------------
class LineEnv(ByteEnv):
    """Each agent walks its own line of `width` cells to one berry. Observation: the line as text,
    `@` the agent, `b` the berry, `*` the agent on the berry, `.` open (e.g. `..@...b..`). Actions:
    `<` left, `>` right, `E` eat (reward 1 on the berry, which then grows again elsewhere), `Z`
    wait. Fitness: berries eaten per step."""

    action_bytes = b"<>EZ"

    def __init__(self, n_agents: int = 4, width: int = 9, steps: int = 40):
        self.possible_agents = list(range(n_agents))
        self.obs_len, self.width, self.max_steps = width, width, steps

    def _reset(self, seed):
        self.rng = np.random.default_rng(seed)
        self.pos = self.rng.integers(self.width, size=self.num_agents)
        self.berry = self.rng.integers(self.width, size=self.num_agents)
        self.eaten = np.zeros(self.num_agents)
        self.t = 0
        return self._observe()

    def _observe(self) -> np.ndarray:
        obs = np.full((self.num_agents, self.width), ord("."), dtype=np.uint8)  # (n, width)
        rows = np.arange(self.num_agents)
        obs[rows, self.berry] = ord("b")
        obs[rows, self.pos] = np.where(self.pos == self.berry, ord("*"), ord("@"))
        return obs

    def _step(self, actions):
        move = np.select([actions == 0, actions == 1], [-1, 1], 0)
        self.pos = np.clip(self.pos + move, 0, self.width - 1)
        eat = (actions == 2) & (self.pos == self.berry)
        self.eaten += eat
        self.berry = np.where(eat, self.rng.integers(self.width, size=self.num_agents), self.berry)
        self.t += 1
        dones = np.full(self.num_agents, self.t >= self.max_steps)
        return self._observe(), eat.astype(np.float64), dones, {"eaten": self.eaten.copy()}

    def fitness(self) -> np.ndarray:
        return self.eaten / max(self.t, 1)
