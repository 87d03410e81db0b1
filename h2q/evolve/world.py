"""The grid world the 20 agents live in: walls, food that regrows, one home cell; rules vectorised
over agents with numpy, deterministic under a seed.

Rules (one `World.step` per tick, all agents at once):

* Actions are one byte each (`ACTIONS`): `N S E W` move, `P` pick up the food on this cell, `D` drop
  the carried food at home (delivered: the main reward), `F` eat the carried food (+`food_energy`,
  capped at `max_energy`), `Z` wait. An action that cannot apply (a move into a wall, `P` on an
  empty cell or with full hands, `D` away from home, `F` with nothing carried) wastes the tick.
* Every tick costs energy: `move_cost` for a move (bumping a wall included), `wait_cost` for the
  rest. At energy 0 an agent is dead for the rest of the episode and drops what it carried.
* Agents may share cells. When several pick up on one cell the winner is drawn at random.
* Food: `n_food` items at start on free cells; every tick each missing item regrows with
  probability `food_regrow` on a random free cell (not home, not under food).
* The map: a wall border, scattered interior walls (`wall_density`), a home cell; cells that cannot
  be reached from home are walled in, so all food is reachable.

Two levels (`level`) differ only in what an agent sees; both are fixed-width text, one row of a
(n_agents, obs_len) uint8 array built without a Python loop over agents (`obs_len(cfg)`). Directions
are compass letters; y grows south. There is no "Action:" cue and no space between fields: the action
follows the last byte, and the 20-row decision forward's cost grows with every byte.

`hinted`: the answer is in the text. `OBS_LEN` = 16 bytes, e.g. `E80+N..WhSWfNE>S`:

    E80    energy, 2 digits, rounded up and capped at 99
    +      carrying food (`-` empty-handed)
    N..W   adjacent walls in the order N S E W (the letter = wall that way, `.` = open)
    hSW    straight-line direction to home: main axis first, then the other axis (`.` when
           aligned); `**` = here
    fNE    straight-line direction to the nearest food by walking distance if it is within `view`
           steps (food in view); `--` = none in view
    >S     the current target, home when carrying, else that food: the first move of a shortest
           walk around the walls to it (the straight-line main axis when that is one of them),
           `*` = standing on food (pick it up), `@` = home with food (drop it), `?` = no food in view

The target is last, and its byte alone names the right action (copy a direction, `P` on `*`, `D` on
`@`, any open move on `?`, `F` when carrying and low on energy): the byte right before the action is
what a frozen random-init base passes to its head most directly, and a path step never leads into a
wall. A policy is a lookup of one byte: the level checks the machinery; it needs no learning.

`view`: what the agent sees, and no path, target or next step: walls are walked around by what is
seen. `window`^2 + 8 bytes (33 for the default 5x5), e.g. `E99h........f..@...#......a.hNW-.`:

    E99    energy, as above
    h....  the window: `window` rows of `window` cells, north row first, each west to east;
    ....f  `#` wall, `f` food, `h` home, `a` another agent, `.` open, `~` off the map, and `@`
    ..@..  the agent itself at the centre (what it stands on is the last byte); a cell shows
    .#...  the first of `#`, `h`, `f`, `a` that is there
    ...a.
    hNW    straight-line direction to home, as on the hinted level (`h**` = here): a direction
           only; how far, and which way around the walls, the agent must find out
    -      carrying food (`+`) or not
    .      what the agent stands on: `f` food, `h` home, `.` neither

The bytes that decide most actions come last: the carried flag and the footing (`-f` pick up, `+h`
drop), after the compass that leads home. Food out of the window is out of mind unless the agent
remembers it (`--memory`).

Why the view level has half the food by default (16, against 32 hinted, on the 16x16 map's roughly
180 free cells): a 5x5 window then holds about 2 food on average, so the planner that reads the
window has food to walk to most of the time, yet the window is often empty and food drops out of
view, so searching and memory matter and seeing the whole map is worth something (the full-map
planner is the upper bound); random agents still pick food up now and then (+`pick_reward`: a
learning signal), and 20 agents compete for it. With 32 the window is almost never empty; with 8 it
is empty about a third of the time and a crowd of 20 starves.

Reward (for learning; shaped, documented): +`deliver_reward` per food dropped at home,
+`pick_reward` per food picked up, +`shaping` per step of walking distance a move gains on the
target held before it (-`shaping` per step lost: potential-based, Ng et al. 1999, so it cannot be
farmed), +`explore_reward` per move that gets somewhere while nothing is in view (so searching
beats idling), -`death_penalty` on death. The target food is in view within `view` steps of walking
on the hinted level; on the view level when it lies inside the window. Rewards may use the whole
map (they are not observed).

Fitness (for comparing policies, unshaped): food delivered per step plus a small survival term,
`delivered / steps + survival_weight * (ticks alive / steps)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from h2q.config import check_options, option
from h2q.errors import ConfigError
from h2q.evolve.env import ByteEnv

ACTIONS = b"NSEWPDFZ"
N_ACTIONS = len(ACTIONS)
MOVE_N, MOVE_S, MOVE_E, MOVE_W, PICK, DROP, EAT, WAIT = range(N_ACTIONS)
MOVES = np.array([[0, -1], [0, 1], [1, 0], [-1, 0]], dtype=np.int64)  # (dx, dy) for N S E W
OBS_LEN = 16  # the hinted level's width; obs_len(cfg) is any level's
LEVELS = ("hinted", "view")
LEVEL_FOOD = {"hinted": 32, "view": 16}  # default n_food per level (the module docstring says why)
UNREACHED = 1 << 30  # walking distance of a cell no source reaches
_ALL = slice(None)
NEIGHBOURS = (((slice(1, None), _ALL), (slice(None, -1), _ALL)),  # [y, x] slices: a cell, its N neighbour
              ((slice(None, -1), _ALL), (slice(1, None), _ALL)),  # ... its S neighbour
              ((_ALL, slice(None, -1)), (_ALL, slice(1, None))),  # ... its E neighbour
              ((_ALL, slice(1, None)), (_ALL, slice(None, -1))))  # ... its W neighbour
# byte columns of the hinted observation
COL_ENERGY, COL_CARRY, COL_WALLS, COL_HOME, COL_FOOD, COL_TARGET = 1, 3, 4, 9, 12, 15
VIEW_WINDOW = 3  # view level: the window's first byte, after the energy


@dataclass
class WorldConfig:
    size: int = option(16, "grid side, border walls included", at_least=5, at_most=256)
    wall_density: float = option(0.08, "fraction of interior cells that are walls", at_least=0, below=0.5)
    n_food: int | None = option(None, "food items on the map at start (and at most); default 32 on the hinted "
                                "level, 16 on the view level", at_least=0)
    food_regrow: float = option(0.1, "per tick, chance that each missing food item regrows", at_least=0, at_most=1)
    start_energy: float = option(100.0, "energy at the start of an episode", above=0)
    max_energy: float = option(100.0, "eating never raises energy above this", above=0)
    move_cost: float = option(0.5, "energy per move", at_least=0)
    wait_cost: float = option(0.3, "energy per non-move tick", at_least=0)
    food_energy: float = option(30.0, "energy from eating one food", at_least=0)
    level: str = option("hinted", "observation: hinted (compass and path step to the target) or view (a window "
                        "of cells and the home compass, no path)", choices=LEVELS)
    view: int = option(8, "hinted level: food is in view within this many steps of walking", at_least=0)
    window: int = option(5, "view level: side of the square window of cells an agent sees (odd)", at_least=3,
                         at_most=15)
    steps: int = option(200, "ticks per episode", at_least=1)
    seed: int = option(0, "world seed (map, spawns, regrowth)", at_least=0, below=2**63)
    deliver_reward: float = option(1.0, "reward per food delivered home")
    pick_reward: float = option(0.3, "shaping reward per food picked up")
    shaping: float = option(0.1, "shaping reward per cell moved closer to the target")
    explore_reward: float = option(0.1, "shaping reward per move made while no target is in view")
    death_penalty: float = option(1.0, "reward lost on dying")
    survival_weight: float = option(0.01, "fitness term per fraction of the episode survived")

    def make_env(self, n_agents: int, steps: int | None = None) -> WorldEnv:
        """The env interface over worlds of this config for `n_agents` (episodes of `steps` ticks)."""
        return WorldEnv(self, n_agents, steps)

    def __post_init__(self):
        check_options(self)
        if self.n_food is None:  # resolved here, so records hold the number (replace() keeps it)
            self.n_food = LEVEL_FOOD[self.level]
        if self.window % 2 == 0:
            raise ConfigError("window", f"must be odd (the agent sits at its centre), got {self.window}")


def _compass(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Offsets (n,) -> (n, 2) bytes: main axis letter, then the other axis letter or '.';
    b'**' for (0, 0). Ties go to the vertical axis."""
    vert = np.where(dy < 0, ord("N"), ord("S"))
    horz = np.where(dx > 0, ord("E"), ord("W"))
    vertical_first = np.abs(dy) >= np.abs(dx)
    first = np.where(vertical_first, vert, horz)
    second = np.where(vertical_first, np.where(dx == 0, ord("."), horz), np.where(dy == 0, ord("."), vert))
    here = (dx == 0) & (dy == 0)
    out = np.stack([first, second], axis=1)  # (n, 2)
    out[here] = ord("*")
    return out.astype(np.uint8)


def _energy_digits(energy: np.ndarray) -> np.ndarray:
    """(n,) energy -> (n, 2) digit bytes, rounded up and capped at 99."""
    e = np.minimum(np.ceil(energy), 99).astype(np.int64)
    return np.stack([ord("0") + e // 10, ord("0") + e % 10], axis=1).astype(np.uint8)


def obs_len(cfg: WorldConfig) -> int:
    """Observation width of `cfg`'s level: OBS_LEN hinted, window^2 + 8 view."""
    return cfg.window ** 2 + 8 if cfg.level == "view" else OBS_LEN


class World:
    """One episode of the shared world for `n_agents`; `seed` (default cfg.seed) fixes everything."""

    def __init__(self, cfg: WorldConfig, n_agents: int, seed: int | None = None):
        self.cfg, self.n = cfg, n_agents
        self.seed = cfg.seed if seed is None else seed
        self.rng = np.random.default_rng(self.seed)
        self.walls = self._make_walls()
        free = np.argwhere(~self.walls)  # (n_free, 2) as (y, x)
        home_yx = free[self.rng.integers(len(free))]
        self.home = np.array([home_yx[1], home_yx[0]], dtype=np.int64)  # (x, y)
        self._wall_off_unreachable()
        self.free = ~self.walls
        self.free[self.home[1], self.home[0]] = False  # food never grows at home
        home_cell = np.zeros_like(self.walls)
        home_cell[self.home[1], self.home[0]] = True
        self.home_dist, _ = self._distance_field(home_cell)  # walking steps to home, [y, x]
        self.food = np.zeros_like(self.walls)
        self._grow(cfg.n_food)
        spawn = np.argwhere(~self.walls)[self.rng.integers(int((~self.walls).sum()), size=n_agents)]
        self.pos = spawn[:, ::-1].astype(np.int64)  # (n, 2) as (x, y)
        self.energy = np.full(n_agents, cfg.start_energy, dtype=np.float64)
        self.carrying = np.zeros(n_agents, dtype=bool)
        self.alive = np.ones(n_agents, dtype=bool)
        self.delivered = np.zeros(n_agents, dtype=np.int64)
        self.picked = np.zeros(n_agents, dtype=np.int64)
        self.eaten = np.zeros(n_agents, dtype=np.int64)
        self.ticks_alive = np.zeros(n_agents, dtype=np.int64)
        self.t = 0

    # ---- map ------------------------------------------------------------------------------------
    def _make_walls(self) -> np.ndarray:
        s = self.cfg.size
        walls = np.zeros((s, s), dtype=bool)  # indexed [y, x]
        walls[0, :] = walls[-1, :] = walls[:, 0] = walls[:, -1] = True
        interior = self.rng.random((s - 2, s - 2)) < self.cfg.wall_density
        walls[1:-1, 1:-1] = interior
        return walls

    def _wall_off_unreachable(self) -> None:
        """Flood fill from home over open cells; the rest becomes wall."""
        reached = np.zeros_like(self.walls)
        reached[self.home[1], self.home[0]] = True
        while True:
            grown = reached.copy()
            grown[1:, :] |= reached[:-1, :]
            grown[:-1, :] |= reached[1:, :]
            grown[:, 1:] |= reached[:, :-1]
            grown[:, :-1] |= reached[:, 1:]
            grown &= ~self.walls
            if (grown == reached).all():
                break
            reached = grown
        self.walls |= ~reached

    def _grow(self, k: int) -> None:
        empty = np.flatnonzero(self.free & ~self.food)
        k = min(k, len(empty))
        if k > 0:
            self.food.flat[self.rng.choice(empty, size=k, replace=False)] = True

    # ---- shortest paths ---------------------------------------------------------------------------
    def _distance_field(self, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Multi-source breadth-first search around walls, one whole-grid layer per step: -> (steps
        to the nearest source, UNREACHED where none; flat index of that source, -1 where none), both
        indexed [y, x]. A cell reached from several neighbours of the last layer takes the source of
        the first of them in N, S, E, W order."""
        s = self.cfg.size
        dist = np.where(sources, 0, UNREACHED)
        src = np.where(sources, np.arange(s * s).reshape(s, s), -1)
        open_ = ~self.walls
        layer, d = sources, 0
        while True:
            d += 1
            near = np.full((s, s), -1)  # per cell, the source of a neighbour in the last layer
            for here, there in reversed(NEIGHBOURS):  # later writes win: N has the last word
                near[here] = np.where(layer[there], src[there], near[here])
            layer = (near >= 0) & open_ & (dist == UNREACHED)
            if not layer.any():
                return dist, src
            dist[layer] = d
            src[layer] = near[layer]

    def targets(self, anywhere: bool = False) -> dict[str, np.ndarray]:
        """Each agent's target (home when carrying, else the nearest food by walking distance if it
        is in sight, or wherever it is when `anywhere`): `has` (n,), `cell` (n, 2) as (x, y), `dist`
        (n,) steps to it, and `step` (n,) the move (0..3) that starts a shortest path to it (-1 when
        on it or none), preferring the straight-line main axis among equally short ones. In sight:
        within `view` steps of walking on the hinted level, inside the window on the view level.
        Refreshes `food_dist` and `food_src`, the walking-distance field of the food as it is now."""
        self.food_dist, self.food_src = self._distance_field(self.food)
        x, y = self.pos[:, 0], self.pos[:, 1]
        c = self.carrying
        dist = np.where(c, self.home_dist[y, x], self.food_dist[y, x])
        src = self.food_src[y, x]
        cell = np.where(c[:, None], self.home[None, :], np.stack([src % self.cfg.size, src // self.cfg.size], 1))
        if anywhere:
            seen = dist < UNREACHED
        elif self.cfg.level == "view":
            seen = (np.abs(cell - self.pos) <= self.cfg.window // 2).all(axis=1) & (dist < UNREACHED)
        else:
            seen = dist <= self.cfg.view
        has = c | seen
        nxt = self.pos[:, None, :] + MOVES[None]  # (n, 4, 2)
        around = np.where(c[:, None], self.home_dist[nxt[..., 1], nxt[..., 0]],
                          self.food_dist[nxt[..., 1], nxt[..., 0]])  # (n, 4)
        shortest = (around == around.min(axis=1, keepdims=True)) & (around < dist[:, None])
        main = _compass(cell[:, 0] - x, cell[:, 1] - y)[:, 0]
        main_move = np.argmax(np.frombuffer(ACTIONS[:4], dtype=np.uint8)[None, :] == main[:, None], axis=1)
        rows = np.arange(self.n)
        step = np.where(shortest[rows, main_move], main_move, shortest.argmax(axis=1))
        step = np.where(has & shortest.any(axis=1), step, -1)
        return {"has": has, "cell": cell, "dist": dist, "step": step}

    # ---- observation ----------------------------------------------------------------------------
    @property
    def obs_len(self) -> int:
        return obs_len(self.cfg)

    def observe(self) -> np.ndarray:
        """-> (n, obs_len) uint8, the observation format of the module docstring for the level."""
        return self._observe_view() if self.cfg.level == "view" else self._observe_hinted()

    def _observe_view(self) -> np.ndarray:
        r, side = self.cfg.window // 2, self.cfg.window
        cells = np.full(self.walls.shape, ord("."), dtype=np.uint8)  # the map as view bytes, [y, x]
        others = np.zeros(self.walls.shape, dtype=np.int64)
        np.add.at(others, (self.pos[self.alive, 1], self.pos[self.alive, 0]), 1)
        cells[others > 0] = ord("a")
        cells[self.food] = ord("f")
        cells[self.home[1], self.home[0]] = ord("h")
        cells[self.walls] = ord("#")
        padded = np.pad(cells, r, constant_values=ord("~"))  # (s + 2r, s + 2r): map cell (x, y) at [y + r, x + r]
        rows = self.pos[:, 1, None] + np.arange(side)  # (n, side): padded rows y - r .. y + r
        cols = self.pos[:, 0, None] + np.arange(side)  # (n, side)
        window = padded[rows[:, :, None], cols[:, None, :]]  # (n, side, side)
        window[:, r, r] = ord("@")
        under = cells[self.pos[:, 1], self.pos[:, 0]]  # 'a' there is the agent itself (or company)
        home_off = self.home[None, :] - self.pos  # (n, 2)
        obs = np.empty((self.n, self.obs_len), dtype=np.uint8)
        obs[:, COL_ENERGY - 1] = ord("E")
        obs[:, COL_ENERGY:COL_ENERGY + 2] = _energy_digits(self.energy)
        obs[:, VIEW_WINDOW:VIEW_WINDOW + side * side] = window.reshape(self.n, side * side)  # row-major, north first
        obs[:, -5] = ord("h")
        obs[:, -4:-2] = _compass(home_off[:, 0], home_off[:, 1])
        obs[:, -2] = np.where(self.carrying, ord("+"), ord("-"))
        obs[:, -1] = np.where((under == ord("f")) | (under == ord("h")), under, ord("."))
        return obs

    def _observe_hinted(self) -> np.ndarray:
        obs = np.empty((self.n, OBS_LEN), dtype=np.uint8)
        obs[:] = np.frombuffer(b"E00-....h**f-->?", dtype=np.uint8)
        obs[:, COL_ENERGY:COL_ENERGY + 2] = _energy_digits(self.energy)
        obs[self.carrying, COL_CARRY] = ord("+")
        for d in range(4):
            nxt = self.pos + MOVES[d]
            blocked = self.walls[nxt[:, 1], nxt[:, 0]]
            obs[blocked, COL_WALLS + d] = ACTIONS[d]
        home_off = self.home[None, :] - self.pos  # (n, 2)
        obs[:, COL_HOME:COL_HOME + 2] = _compass(home_off[:, 0], home_off[:, 1])
        target = self.targets()
        x, y = self.pos[:, 0], self.pos[:, 1]
        food_seen = self.food_dist[y, x] <= self.cfg.view
        src = self.food_src[y, x]
        food_off = np.stack([src % self.cfg.size - x, src // self.cfg.size - y], axis=1)  # (n, 2)
        obs[food_seen, COL_FOOD:COL_FOOD + 2] = _compass(food_off[food_seen, 0], food_off[food_seen, 1])
        moving = target["step"] >= 0
        obs[moving, COL_TARGET] = np.frombuffer(ACTIONS, dtype=np.uint8)[target["step"][moving]]
        on_it = target["has"] & (target["dist"] == 0)
        obs[on_it, COL_TARGET] = np.where(self.carrying[on_it], ord("@"), ord("*"))
        return obs

    # ---- dynamics -------------------------------------------------------------------------------
    def step(self, actions: np.ndarray) -> np.ndarray:
        """Apply one action index per agent (dead agents' are ignored); -> shaped rewards (n,)."""
        cfg = self.cfg
        actions = np.asarray(actions, dtype=np.int64)
        assert actions.shape == (self.n,), f"need {self.n} actions, got shape {actions.shape}"
        live = self.alive.copy()
        rewards = np.zeros(self.n, dtype=np.float64)
        target = self.targets()
        has_target, carried = target["has"], self.carrying.copy()

        moving = live & (actions < 4)
        step = MOVES[np.where(moving, actions, 0)] * moving[:, None]  # (n, 2)
        nxt = self.pos + step
        open_ = ~self.walls[nxt[:, 1], nxt[:, 0]]
        self.pos = np.where(open_[:, None], nxt, self.pos)
        x, y = self.pos[:, 0], self.pos[:, 1]
        dist_after = np.where(carried, self.home_dist[y, x], self.food_dist[y, x])  # same fields as before
        rewards += np.where(moving & has_target, cfg.shaping * (target["dist"] - dist_after), 0.0)
        rewards += np.where(moving & ~has_target & open_, cfg.explore_reward, 0.0)

        on_food = self.food[self.pos[:, 1], self.pos[:, 0]]
        wants = np.flatnonzero(live & (actions == PICK) & ~self.carrying & on_food)
        if len(wants):
            wants = self.rng.permutation(wants)  # random winner per cell
            cells = self.pos[wants, 1] * cfg.size + self.pos[wants, 0]
            _, first = np.unique(cells, return_index=True)
            winners = wants[first]
            self.food[self.pos[winners, 1], self.pos[winners, 0]] = False
            self.carrying[winners] = True
            self.picked[winners] += 1
            rewards[winners] += cfg.pick_reward

        at_home = (self.pos == self.home).all(axis=1)
        drop = live & (actions == DROP) & self.carrying & at_home
        self.carrying[drop] = False
        self.delivered[drop] += 1
        rewards[drop] += cfg.deliver_reward

        eat = live & (actions == EAT) & self.carrying
        self.carrying[eat] = False
        self.eaten[eat] += 1
        self.energy[eat] = np.minimum(self.energy[eat] + cfg.food_energy, cfg.max_energy)

        self.energy[live] -= np.where(moving, cfg.move_cost, cfg.wait_cost)[live]
        died = live & (self.energy <= 0)
        self.energy[died] = 0.0
        self.alive[died] = False
        rewards[died] -= cfg.death_penalty
        dropped = died & self.carrying & ~at_home
        self.food[self.pos[dropped, 1], self.pos[dropped, 0]] = True
        self.carrying[died] = False
        self.ticks_alive[live] += 1

        missing = cfg.n_food - int(self.food.sum()) - int(self.carrying.sum())
        if missing > 0:
            self._grow(int(self.rng.binomial(missing, cfg.food_regrow)))
        self.t += 1
        return rewards

    def as_env(self, steps: int | None = None) -> WorldEnv:
        """This world, from where it stands, behind the env interface (episodes of `steps` ticks)."""
        return WorldEnv.around(self, steps)

    def fitness(self, steps: int | None = None) -> np.ndarray:
        """Per-agent fitness over an episode of `steps` ticks (default: the ticks run so far), see
        the module docstring; an episode cut short by death still counts its full length."""
        steps = max(steps or self.t, 1)
        return self.delivered / steps + self.cfg.survival_weight * self.ticks_alive / steps


# ---- the env interface (h2q/evolve/env.py) --------------------------------------------------------
class WorldEnv(ByteEnv):
    """The grid World (either level) behind the env interface: `reset(seed)` builds `self.world`,
    `step` applies the rules and observes, the episode lasts `steps` ticks (default cfg.steps), and
    info carries the per-agent counters (delivered, picked, eaten, died, ticks_alive). With `alone`
    = i only agent i lives in the world of n agents (the others are absent, done from the start):
    the same map, food and start as in the crowd, without the crowd."""

    action_bytes = ACTIONS

    def __init__(self, cfg: WorldConfig, n_agents: int, steps: int | None = None, alone: int | None = None):
        assert alone is None or 0 <= alone < n_agents, f"agent {alone} is not one of {n_agents}"
        self.cfg, self.possible_agents, self.alone = cfg, list(range(n_agents)), alone
        self.obs_len, self.max_steps = obs_len(cfg), steps or cfg.steps

    @classmethod
    def around(cls, world: World, steps: int | None = None) -> WorldEnv:
        """The env of a World already built (and maybe already stepped), taking it from where it stands."""
        env = cls(world.cfg, world.n, steps)
        env.world, env.obs, env.dones = world, world.observe(), ~world.alive | (world.t >= env.max_steps)
        return env

    def _reset(self, seed):
        self.world = w = World(self.cfg, self.num_agents, seed)
        if self.alone is not None:
            absent = np.arange(w.n) != self.alone
            w.alive[absent], w.energy[absent] = False, 0.0
            self.dones = absent
        return w.observe()

    def _step(self, actions):
        w = self.world
        rewards = w.step(actions)
        dones = ~w.alive | (w.t >= self.max_steps)
        info = {"delivered": w.delivered.copy(), "picked": w.picked.copy(), "eaten": w.eaten.copy(),
                "died": ~w.alive, "ticks_alive": w.ticks_alive.copy()}
        return w.observe(), rewards, dones, info

    def fitness(self) -> np.ndarray:
        w = self.world  # an episode all agents died in still counts its full length
        return w.fitness(w.t if w.alive.any() else self.max_steps)

