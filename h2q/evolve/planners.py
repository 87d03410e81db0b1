"""Baseline policies of the grid world: they give every score its scale, as random and human scores
do on Atari (Mnih et al. 2015) and the scripted bots do in Melting Pot (Leibo et al. 2021).

* `RandomPolicy`: uniform over the actions, the floor.
* `OraclePolicy`: the hinted level's greedy script. It copies the target byte (a path step, `*`
  pick up, `@` drop) that the hinted observation already holds.
* `ViewPlanner`: the view level's same-view planner, the oracle that normalised scores refer to.
  It reads exactly the observation bytes and nothing else: a breadth-first search over the open
  cells of its window from the centre; food in the window is walked to; with food in hand it walks
  to home when home is in the window, else to the window cell farthest along the home compass, so
  it walks around the walls it sees (on the way home it turns back only when nothing else gains);
  with nothing to walk to it explores: it keeps its heading until the next cell is blocked, then
  turns to a random open side rather than back. Equally good cells go to the one whose walk starts
  along the heading, so it does not dither.
* `FullMapPlanner`: reads the World itself and walks shortest paths on the whole map to the
  nearest food anywhere and home: an upper bound, not an oracle.

A policy is `reset(n_agents)` then `act(obs, alive) -> (n,) action indices` (h2q/evolve/__init__.py).
All four act for every agent at once with numpy. `same_view_planner(cfg)` names the level's oracle,
and `score_baselines` runs the three baselines of a level on world seeds both alone (one agent left
in the world) and as a crowd of copies, so that food the crowd takes from each other can never be
what lifts an agent above the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import isqrt

import numpy as np

from h2q.errors import H2QError
from h2q.evolve.env import run_episode
from h2q.evolve.world import (
    ACTIONS,
    COL_CARRY,
    COL_ENERGY,
    COL_TARGET,
    COL_WALLS,
    DROP,
    EAT,
    MOVES,
    N_ACTIONS,
    NEIGHBOURS,
    PICK,
    UNREACHED,
    VIEW_WINDOW,
    WorldConfig,
    WorldEnv,
)

LETTER_TO_MOVE = np.full(256, -1, dtype=np.int64)  # compass/path letter byte -> move index (N S E W)
LETTER_TO_MOVE[list(ACTIONS[:4])] = np.arange(4)
REVERSE = np.array([1, 0, 3, 2])  # N<->S, E<->W


def _energy(obs: np.ndarray) -> np.ndarray:
    return (obs[:, COL_ENERGY].astype(np.int64) - ord("0")) * 10 + obs[:, COL_ENERGY + 1] - ord("0")


class RandomPolicy:
    """Uniform over `n_actions` actions (the grid's 8 by default)."""

    def __init__(self, seed: int = 0, n_actions: int = N_ACTIONS):
        self.rng, self.n_actions = np.random.default_rng(seed), n_actions

    def reset(self, n_agents: int) -> None:
        pass

    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        return self.rng.integers(self.n_actions, size=len(obs))


class OraclePolicy:
    """Hinted level: drop on `@`, pick up on `*`, eat the carried food when energy is below
    `eat_below`, else take the path step the target byte names, and a random open direction when
    nothing is in view."""

    def __init__(self, seed: int = 0, eat_below: int = 20):
        self.rng = np.random.default_rng(seed)
        self.eat_below = eat_below

    def reset(self, n_agents: int) -> None:
        pass

    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        carrying = obs[:, COL_CARRY] == ord("+")
        open_ = obs[:, COL_WALLS:COL_WALLS + 4] == ord(".")  # (n, 4) in N S E W order
        target = obs[:, COL_TARGET]
        keys = self.rng.random(open_.shape) + open_  # random open direction (any move if boxed in)
        step = LETTER_TO_MOVE[target]
        actions = np.where(step >= 0, step, keys.argmax(axis=1))
        actions = np.where(carrying & (_energy(obs) < self.eat_below), EAT, actions)
        actions = np.where(target == ord("*"), PICK, actions)
        return np.where(target == ord("@"), DROP, actions)


def window_paths(window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breadth-first search from the centre of each (side, side) window over the cells that are
    neither wall `#` nor off the map `~`, one layer per step: (n, side, side) windows -> (steps from
    the centre, UNREACHED where none; first move 0..3 of a shortest walk, -1 at the centre and where
    unreached). A cell reached from several cells of the last layer takes the first move of the
    first of them in N, S, E, W order (as World's search does)."""
    r = window.shape[-1] // 2
    open_ = (window != ord("#")) & (window != ord("~"))
    dist = np.full(window.shape, UNREACHED, dtype=np.int64)
    first = np.full(window.shape, -1, dtype=np.int64)
    dist[:, r, r] = 0
    layer, d = dist == 0, 0
    while True:
        d += 1
        near = np.full(window.shape, -1, dtype=np.int64)  # per cell, the first move of a neighbour in the last layer
        for k in reversed(range(4)):  # later writes win: the N neighbour has the last word
            here, there = ((...,) + part for part in NEIGHBOURS[k])
            # the centre has no first move yet: the move into this cell is it (from the N neighbour: S)
            move = np.where(first[there] >= 0, first[there], REVERSE[k])
            near[here] = np.where(layer[there], move, near[here])
        layer = (near >= 0) & open_ & (dist == UNREACHED)
        if not layer.any():
            return dist, first
        dist[layer] = d
        first[layer] = near[layer]


class ViewPlanner:
    """The view level's same-view planner (see the module docstring); reads only `obs`. Its only
    state is its own random generator and, per agent, its last move (the heading) and whether it
    carried food at its last decision."""

    def __init__(self, seed: int = 0, eat_below: int = 20):
        self.rng = np.random.default_rng(seed)
        self.eat_below = eat_below

    def reset(self, n_agents: int) -> None:
        self.heading = self.rng.integers(4, size=n_agents)
        self.carried = np.zeros(n_agents, dtype=bool)

    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        n, width = obs.shape
        side = isqrt(width - 8)
        assert side * side + 8 == width and side % 2 == 1, f"not a view-level observation: {width} bytes"
        r = side // 2
        window = obs[:, VIEW_WINDOW:VIEW_WINDOW + side * side].reshape(n, side, side)  # row-major, north first
        carrying, under = obs[:, -2] == ord("+"), obs[:, -1]
        dist, first = window_paths(window)
        reached = dist < UNREACHED
        rows = np.arange(n)

        # where to walk: the nearest visible food, or home, or the farthest cell along the compass
        oy, ox = np.mgrid[-r:r + 1, -r:r + 1]  # (side, side) offsets from the centre
        letters = LETTER_TO_MOVE[obs[:, -4:-2]]  # (n, 2): the compass's main and other axis, -1 for '.' '*'
        axes = np.where(letters[..., None] >= 0, MOVES[letters], 0)  # (n, 2, 2) as (dx, dy), main axis first
        toward = 2 * axes[:, 0] + axes[:, 1]  # (n, 2): the main axis counts double
        progress = ox * toward[:, 0, None, None] + oy * toward[:, 1, None, None]  # (n, side, side)
        homing = carrying[:, None, None]
        home = homing & (window == ord("h")) & reached
        # on the way home, turning back is the last resort (no dithering in front of a wall)
        back = (first == REVERSE[self.heading][:, None, None]) & self.carried[:, None, None]
        goal_key = np.full(window.shape, -np.inf)  # (n, side, side): the best cell is the goal
        goal_key = np.where(~homing & (window == ord("f")) & reached, 1e6 - dist, goal_key)
        along = homing & reached & (progress > 0) & ~home.any(axis=(1, 2), keepdims=True)
        goal_key = np.where(along, 100 * progress - dist - 1000 * back, goal_key)
        goal_key = np.where(home, 1e6 - dist, goal_key)
        # equally good cells: the one whose walk starts along the heading (no dithering), else random
        goal_key = goal_key + 0.5 * (first == self.heading[:, None, None]) + 0.1 * self.rng.random(window.shape)
        goal_key = goal_key.reshape(n, -1)
        goal = goal_key.argmax(axis=1)  # (n,) flat window cell
        has_goal = np.isfinite(goal_key[rows, goal])
        step = first.reshape(n, -1)[rows, goal]
        has_goal &= step >= 0

        # explore: keep the heading while it is open, else turn to a random open side (not back)
        open4 = np.stack([window[:, r - 1, r], window[:, r + 1, r], window[:, r, r + 1], window[:, r, r - 1]], 1)
        open4 = (open4 != ord("#")) & (open4 != ord("~"))  # (n, 4) in N S E W order
        keep = open4[rows, self.heading]
        turn_key = 2 * open4 + (np.arange(4)[None] != REVERSE[self.heading][:, None]) + self.rng.random((n, 4))
        explore = np.where(keep, self.heading, turn_key.argmax(axis=1))

        actions = np.where(has_goal, step, explore)
        actions = np.where(carrying & (_energy(obs) < self.eat_below), EAT, actions)
        actions = np.where(~carrying & (under == ord("f")), PICK, actions)
        actions = np.where(carrying & (under == ord("h")), DROP, actions)
        self.heading = np.where(alive & (actions < 4), actions, self.heading)
        self.carried = np.where(alive, carrying, self.carried)
        return actions


class FullMapPlanner:
    """Reads `env.world` (not the observation): shortest walks on the whole map to the nearest food
    anywhere, then home; picks up, drops and eats (below `eat_below`) as the others do; a random move
    when there is no food on the map."""

    def __init__(self, env: WorldEnv, seed: int = 0, eat_below: int = 20):
        self.env, self.rng, self.eat_below = env, np.random.default_rng(seed), eat_below

    def reset(self, n_agents: int) -> None:
        pass

    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        w = self.env.world
        target = w.targets(anywhere=True)
        x, y = w.pos[:, 0], w.pos[:, 1]
        actions = np.where(target["step"] >= 0, target["step"], self.rng.integers(4, size=w.n))
        actions = np.where(w.carrying & (w.energy < self.eat_below), EAT, actions)
        actions = np.where(~w.carrying & w.food[y, x], PICK, actions)
        return np.where(w.carrying & (w.pos == w.home).all(axis=1), DROP, actions)


def same_view_planner(cfg: WorldConfig, seed: int = 0):
    """The level's oracle: the policy that reads the same bytes as the agents and plans on them."""
    return ViewPlanner(seed) if cfg.level == "view" else OraclePolicy(seed)


BASELINES = ("random", "same_view", "full_map")


def make_baseline(name: str, env: WorldEnv, seed: int = 0):
    """A fresh baseline (one of BASELINES) for the worlds of `env`."""
    if name == "random":
        return RandomPolicy(seed)
    if name == "same_view":
        return same_view_planner(env.cfg, seed)
    if name == "full_map":
        return FullMapPlanner(env, seed)
    raise H2QError(f"no baseline {name!r}: pick one of {', '.join(BASELINES)}")


@dataclass
class BaselineScores:
    """Per baseline, per world seed (arrays (n_seeds,)): the mean food delivered per agent per step
    and the mean fitness, as `crowd` copies in the world (`crowd`) and alone in it (`alone`)."""
    seeds: list[int]
    crowd: int
    food_rate: dict[str, dict[str, np.ndarray]]  # baseline -> {"alone", "crowd"} -> (n_seeds,)
    fitness: dict[str, dict[str, np.ndarray]]


def score_baselines(cfg: WorldConfig, seeds, crowd: int = 20, alone: int = 4, policy_seed: int = 0) -> BaselineScores:
    """Run random, the same-view planner and the full-map planner on each world seed of `cfg`'s
    level: once as `crowd` copies, and `alone` times alone, agent i = 0..alone-1 of the crowd's world
    left on its own (`WorldEnv(alone=i)`: the same map, food and start); `alone` scores are the mean
    of those lone agents."""
    if not 1 <= alone <= crowd:
        raise H2QError(f"alone must be 1..crowd ({crowd}) lone episodes per seed, got {alone}")
    seeds = list(seeds)
    food = {b: {"alone": [], "crowd": []} for b in BASELINES}
    fit = {b: {"alone": [], "crowd": []} for b in BASELINES}
    for seed in seeds:
        for name in BASELINES:
            env = WorldEnv(cfg, crowd)
            env.reset(seed)
            stats = run_episode(env, make_baseline(name, env, policy_seed))
            food[name]["crowd"].append(stats.food_rate.mean())
            fit[name]["crowd"].append(stats.fitness.mean())
            lone = []
            for i in range(alone):
                env = WorldEnv(cfg, crowd, alone=i)
                env.reset(seed)
                stats = run_episode(env, make_baseline(name, env, policy_seed))
                lone.append((stats.food_rate[i], stats.fitness[i]))
            food[name]["alone"].append(np.mean([f for f, _ in lone]))
            fit[name]["alone"].append(np.mean([f for _, f in lone]))
    arrays = lambda d: {b: {k: np.array(v) for k, v in d[b].items()} for b in d}
    return BaselineScores(seeds, crowd, arrays(food), arrays(fit))
