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

Observation: fixed-width text, `OBS_LEN` = 19 bytes, one row of a (n_agents, 19) uint8 array built
without a Python loop over agents, e.g. `E80 +N..W hSW fNE>S`:

    E80    energy, 2 digits, rounded up and capped at 99
    +      carrying food (`-` empty-handed)
    N..W   adjacent walls in the order N S E W (the letter = wall that way, `.` = open)
    hSW    direction to home: main axis first, then the other axis (`.` when aligned); `**` = here
    fNE    direction to the nearest food within `view` (Chebyshev); `--` = none visible
    >S     the current target, home when carrying, else the nearest visible food: the main axis
           of its direction, `*` = standing on food (pick it up), `@` = home with food (drop it),
           `?` = no food in view

The target is last, and its byte alone names the right action most of the time (copy a direction,
`P` on `*`, `D` on `@`): the byte right before the action is what a frozen random-init base passes
to the head most directly, so the adapter learns this mapping first; the walls and the second axis
refine it. There is no "Action:" cue: the observation's last byte is where the action follows,
which keeps the 20-row decision forward short. Directions are compass letters; y grows south.

Reward (for learning; shaped, documented): +`deliver_reward` per food dropped at home,
+`pick_reward` per food picked up, +`shaping` per cell moved closer (Manhattan) to the target held
before the move (-`shaping` per cell farther, so it cannot be farmed), -`death_penalty` on death.

Fitness (for comparing policies, unshaped): food delivered per step plus a small survival term,
`delivered / steps + survival_weight * (ticks alive / steps)`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

ACTIONS = b"NSEWPDFZ"
N_ACTIONS = len(ACTIONS)
MOVE_N, MOVE_S, MOVE_E, MOVE_W, PICK, DROP, EAT, WAIT = range(N_ACTIONS)
MOVES = np.array([[0, -1], [0, 1], [1, 0], [-1, 0]], dtype=np.int64)  # (dx, dy) for N S E W
OBS_LEN = 19
# byte columns of the observation
COL_ENERGY, COL_CARRY, COL_WALLS, COL_HOME, COL_FOOD, COL_TARGET = 1, 4, 5, 11, 15, 18


def _flag(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class WorldConfig:
    size: int = _flag(16, "grid side, border walls included")
    wall_density: float = _flag(0.08, "fraction of interior cells that are walls")
    n_food: int = _flag(32, "food items on the map at start (and at most)")
    food_regrow: float = _flag(0.1, "per tick, chance that each missing food item regrows")
    start_energy: float = _flag(100.0, "energy at the start of an episode")
    max_energy: float = _flag(100.0, "eating never raises energy above this")
    move_cost: float = _flag(0.5, "energy per move")
    wait_cost: float = _flag(0.3, "energy per non-move tick")
    food_energy: float = _flag(30.0, "energy from eating one food")
    view: int = _flag(4, "food is visible within this Chebyshev distance")
    steps: int = _flag(200, "ticks per episode")
    seed: int = _flag(0, "world seed (map, spawns, regrowth)")
    deliver_reward: float = _flag(1.0, "reward per food delivered home")
    pick_reward: float = _flag(0.3, "shaping reward per food picked up")
    shaping: float = _flag(0.1, "shaping reward per cell moved closer to the target")
    death_penalty: float = _flag(1.0, "reward lost on dying")
    survival_weight: float = _flag(0.01, "fitness term per fraction of the episode survived")

    def __post_init__(self):
        if self.size < 5:
            raise ValueError(f"world size {self.size} < 5")
        if not 0 <= self.wall_density < 0.5:
            raise ValueError(f"wall_density {self.wall_density} not in [0, 0.5)")


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

    # ---- observation ----------------------------------------------------------------------------
    def nearest_food(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (offsets (n, 2) to the nearest visible food as (dx, dy), visible (n,) bool).
        Nearest by Manhattan distance among food within `view` (Chebyshev); ties by map order."""
        fy, fx = np.nonzero(self.food)
        if len(fx) == 0:
            return np.zeros((self.n, 2), dtype=np.int64), np.zeros(self.n, dtype=bool)
        dx = fx[None, :] - self.pos[:, :1]  # (n, n_food)
        dy = fy[None, :] - self.pos[:, 1:]  # (n, n_food)
        seen = np.maximum(np.abs(dx), np.abs(dy)) <= self.cfg.view
        dist = np.where(seen, np.abs(dx) + np.abs(dy), np.iinfo(np.int64).max)
        j = dist.argmin(axis=1)
        rows = np.arange(self.n)
        return np.stack([dx[rows, j], dy[rows, j]], axis=1), seen[rows, j]

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (target cell (n, 2) as (x, y), has_target (n,)): home when carrying, else the nearest
        visible food."""
        food_off, visible = self.nearest_food()
        target = np.where(self.carrying[:, None], self.home[None, :], self.pos + food_off)
        return target, self.carrying | visible

    def observe(self) -> np.ndarray:
        """-> (n, OBS_LEN) uint8, the observation format of the module docstring."""
        obs = np.empty((self.n, OBS_LEN), dtype=np.uint8)
        obs[:] = np.frombuffer(b"E00 -.... h** f-->?", dtype=np.uint8)
        energy = np.minimum(np.ceil(self.energy), 99).astype(np.int64)
        obs[:, COL_ENERGY] = ord("0") + energy // 10
        obs[:, COL_ENERGY + 1] = ord("0") + energy % 10
        obs[self.carrying, COL_CARRY] = ord("+")
        for d in range(4):
            nxt = self.pos + MOVES[d]
            blocked = self.walls[nxt[:, 1], nxt[:, 0]]
            obs[blocked, COL_WALLS + d] = ACTIONS[d]
        home_off = self.home[None, :] - self.pos  # (n, 2)
        obs[:, COL_HOME:COL_HOME + 2] = _compass(home_off[:, 0], home_off[:, 1])
        food_off, visible = self.nearest_food()
        obs[visible, COL_FOOD:COL_FOOD + 2] = _compass(food_off[visible, 0], food_off[visible, 1])
        target_cols = np.where(self.carrying[:, None], obs[:, COL_HOME:COL_HOME + 2], obs[:, COL_FOOD:COL_FOOD + 2])
        has_target = self.carrying | visible
        obs[has_target, COL_TARGET] = target_cols[has_target, 0]
        on_target = has_target & (obs[:, COL_TARGET] == ord("*"))
        obs[on_target & self.carrying, COL_TARGET] = ord("@")
        return obs

    # ---- dynamics -------------------------------------------------------------------------------
    def step(self, actions: np.ndarray) -> np.ndarray:
        """Apply one action index per agent (dead agents' are ignored); -> shaped rewards (n,)."""
        cfg = self.cfg
        actions = np.asarray(actions, dtype=np.int64)
        assert actions.shape == (self.n,), f"need {self.n} actions, got shape {actions.shape}"
        live = self.alive.copy()
        rewards = np.zeros(self.n, dtype=np.float64)
        target, has_target = self.targets()
        dist_before = np.abs(target - self.pos).sum(axis=1)

        moving = live & (actions < 4)
        step = MOVES[np.where(moving, actions, 0)] * moving[:, None]  # (n, 2)
        nxt = self.pos + step
        open_ = ~self.walls[nxt[:, 1], nxt[:, 0]]
        self.pos = np.where(open_[:, None], nxt, self.pos)
        shaped = moving & has_target
        rewards += np.where(shaped, cfg.shaping * (dist_before - np.abs(target - self.pos).sum(axis=1)), 0.0)

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

    @property
    def done(self) -> bool:
        return self.t >= self.cfg.steps or not self.alive.any()

    def fitness(self, steps: int | None = None) -> np.ndarray:
        """Per-agent fitness over an episode of `steps` ticks (default: the ticks run so far), see
        the module docstring; an episode cut short by death still counts its full length."""
        steps = max(steps or self.t, 1)
        return self.delivered / steps + self.cfg.survival_weight * self.ticks_alive / steps


# ---- baselines: they give fitness its scale ------------------------------------------------------
class RandomPolicy:
    """Uniform over the 8 actions."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, n_agents: int) -> None:
        pass

    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        return self.rng.integers(N_ACTIONS, size=len(obs))


class OraclePolicy:
    """Scripted greedy policy that reads only the observation bytes: drop on `@`, pick up on `*`,
    eat when low, else step along the target's main axis, its other axis when walled, a random open
    side step when both are walled, and a random open direction when nothing is in view."""

    def __init__(self, seed: int = 0, eat_below: int = 20):
        self.rng = np.random.default_rng(seed)
        self.eat_below = eat_below

    def reset(self, n_agents: int) -> None:
        pass

    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        n = len(obs)
        energy = (obs[:, COL_ENERGY].astype(np.int64) - ord("0")) * 10 + obs[:, COL_ENERGY + 1] - ord("0")
        carrying = obs[:, COL_CARRY] == ord("+")
        open_ = obs[:, COL_WALLS:COL_WALLS + 4] == ord(".")  # (n, 4) in N S E W order
        target = obs[:, COL_TARGET]
        compass = np.where(carrying[:, None], obs[:, COL_HOME:COL_HOME + 2], obs[:, COL_FOOD:COL_FOOD + 2])
        letter_to_move = np.full(256, -1, dtype=np.int64)
        letter_to_move[list(ACTIONS[:4])] = np.arange(4)
        first, second = letter_to_move[compass[:, 0]], letter_to_move[compass[:, 1]]
        rows = np.arange(n)
        # random open direction: argmax of random keys over open moves (any move if boxed in)
        keys = self.rng.random((n, 4)) + open_
        actions = keys.argmax(axis=1)
        second_ok = (second >= 0) & open_[rows, np.maximum(second, 0)]
        actions = np.where(second_ok, second, actions)
        first_ok = (first >= 0) & open_[rows, np.maximum(first, 0)]
        actions = np.where(first_ok, first, actions)
        actions = np.where(carrying & (energy < self.eat_below), EAT, actions)
        actions = np.where(target == ord("*"), PICK, actions)
        actions = np.where(target == ord("@"), DROP, actions)
        return actions


# ---- terminal view -------------------------------------------------------------------------------
AGENT_GLYPHS = "0123456789abcdefghijklmnopqrstuvwxyz"


def render_text(world: World) -> str:
    """The map (`#` wall, `*` food, `H` home, agents by id, `@` beyond 36) and one status line per
    few agents (id, energy, `+` when carrying, `x` when dead)."""
    grid = np.where(world.walls, "#", " ").astype("<U1")
    grid[world.food] = "*"
    grid[world.home[1], world.home[0]] = "H"
    for i in np.flatnonzero(world.alive):
        grid[world.pos[i, 1], world.pos[i, 0]] = AGENT_GLYPHS[i] if i < len(AGENT_GLYPHS) else "@"
    lines = ["".join(row) for row in grid]
    lines.append(f"t={world.t}  delivered={int(world.delivered.sum())}  alive={int(world.alive.sum())}/{world.n}")
    status = [f"{AGENT_GLYPHS[i] if i < len(AGENT_GLYPHS) else '@'}:"
              + (f"{int(np.ceil(world.energy[i])):3d}{'+' if world.carrying[i] else ' '}" if world.alive[i] else "  x ")
              for i in range(world.n)]
    lines += ["  ".join(status[k:k + 8]) for k in range(0, len(status), 8)]
    return "\n".join(lines)


class Renderer:
    """Redraws the world in place (ANSI home + clear) at most `fps` times a second. Built only for
    `--render`; the episode loop calls nothing when there is none."""

    def __init__(self, fps: float = 8.0, stream=None):
        self.interval = 1.0 / fps if fps > 0 else 0.0
        self.stream = stream or sys.stdout
        self._last = 0.0

    def __call__(self, world: World) -> None:
        wait = self._last + self.interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self.stream.write("\x1b[H\x1b[2J" + render_text(world) + "\n")
        self.stream.flush()
        self._last = time.perf_counter()
