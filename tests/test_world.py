"""World rules (walls, pick/drop/eat, energy and death, determinism), both levels' observation formats
(the view level's has no path in it), and the baselines that give scores their scale."""
from dataclasses import replace

import numpy as np
import pytest

from h2q.errors import ConfigError
from h2q.evolve import (
    ACTIONS,
    OBS_LEN,
    FullMapPlanner,
    OraclePolicy,
    RandomPolicy,
    ViewPlanner,
    World,
    WorldConfig,
    WorldEnv,
    evaluate_policy,
    run_episode,
    same_view_planner,
    score_baselines,
)
from h2q.evolve.planners import BASELINES
from h2q.evolve.render import render_text
from h2q.evolve.stats import normalise
from h2q.evolve.world import DROP, EAT, MOVE_E, MOVE_N, MOVE_S, MOVE_W, PICK, WAIT, obs_len

CFG = WorldConfig(size=10, n_food=8, steps=60)


def open_world(n_agents=1, **kw):
    """A world with only border walls, no food, home at (1, 1), agents at (3, 3)."""
    w = World(replace(CFG, wall_density=0.0, **kw), n_agents, seed=0)
    w.food[:] = False
    w.home = np.array([1, 1])
    w.free = ~w.walls
    w.free[1, 1] = False
    w.pos[:] = [3, 3]
    home_cell = np.zeros_like(w.walls)
    home_cell[1, 1] = True
    w.home_dist, _ = w._distance_field(home_cell)
    return w


def test_walls_block_and_moves():
    w = open_world()
    w.step(np.array([MOVE_N]))
    assert w.pos[0].tolist() == [3, 2]
    w.step(np.array([MOVE_E]))
    assert w.pos[0].tolist() == [4, 2]
    w.pos[:] = [1, 3]
    w.step(np.array([MOVE_W]))  # border wall
    assert w.pos[0].tolist() == [1, 3]
    w.walls[4, 1] = True
    w.step(np.array([MOVE_S]))  # interior wall
    assert w.pos[0].tolist() == [1, 3]
    assert w.energy[0] == pytest.approx(w.cfg.start_energy - 4 * w.cfg.move_cost)


def test_pick_drop_eat():
    w = open_world(food_regrow=0.0)
    w.food[3, 3] = True
    r = w.step(np.array([PICK]))
    assert w.carrying[0] and not w.food[3, 3] and w.picked[0] == 1 and r[0] == pytest.approx(w.cfg.pick_reward)
    r = w.step(np.array([DROP]))  # not at home: nothing happens
    assert w.carrying[0] and w.delivered[0] == 0 and r[0] == 0
    w.pos[:] = [1, 1]
    r = w.step(np.array([DROP]))
    assert not w.carrying[0] and w.delivered[0] == 1 and r[0] == pytest.approx(w.cfg.deliver_reward)
    w.food[1, 2] = True
    w.pos[:] = [2, 1]
    w.energy[:] = 50
    w.step(np.array([PICK]))
    w.step(np.array([EAT]))
    assert not w.carrying[0] and w.eaten[0] == 1
    assert w.energy[0] == pytest.approx(50 - 2 * w.cfg.wait_cost + w.cfg.food_energy)
    w.step(np.array([EAT]))  # nothing to eat
    assert w.eaten[0] == 1


def test_pick_conflict_has_one_winner():
    w = open_world(n_agents=3, food_regrow=0.0)
    w.food[3, 3] = True
    w.step(np.array([PICK, PICK, PICK]))
    assert w.carrying.sum() == 1 and not w.food[3, 3]


def test_energy_death_and_dead_stay_dead():
    w = open_world(n_agents=2, food_regrow=0.0)
    w.energy[:] = [w.cfg.move_cost, 10.0]
    w.carrying[0] = True
    r = w.step(np.array([MOVE_N, WAIT]))
    assert not w.alive[0] and w.alive[1] and w.energy[0] == 0
    assert r[0] < 0 and w.food[2, 3]  # the death penalty; the carried food is dropped
    pos = w.pos[0].copy()
    w.step(np.array([MOVE_S, WAIT]))
    assert (w.pos[0] == pos).all() and w.ticks_alive.tolist() == [1, 2]
    assert w.energy[1] == pytest.approx(10 - 2 * w.cfg.wait_cost)


def test_food_regrows():
    w = open_world(food_regrow=1.0)
    w.step(np.array([WAIT]))
    assert w.food.sum() == w.cfg.n_food and not w.food[1, 1] and not (w.food & w.walls).any()


def test_shaping_rewards_moving_closer_to_target():
    w = open_world(food_regrow=0.0)
    w.food[3, 5] = True  # food 2 east of the agent at (3, 3)
    assert w.step(np.array([MOVE_E]))[0] == pytest.approx(w.cfg.shaping)
    assert w.step(np.array([MOVE_W]))[0] == pytest.approx(-w.cfg.shaping)
    w.food[:] = False  # nothing in view: a move that gets somewhere earns the exploration reward
    assert w.step(np.array([MOVE_N]))[0] == pytest.approx(w.cfg.explore_reward)
    w.pos[:] = [1, 3]
    assert w.step(np.array([MOVE_W]))[0] == 0  # into the border wall
    assert w.step(np.array([WAIT]))[0] == 0


def test_target_step_walks_around_walls():
    w = open_world(food_regrow=0.0)
    w.walls[2:5, 4] = True  # a wall at x=4, y=2..4 between the agent at (3, 3) and the food
    w.food[3, 6] = True
    assert bytes(w.observe()[0]) == b"E99-..E.hNWfE.>N"  # food due east, the walk starts north
    assert w.step(np.array([MOVE_E]))[0] == 0  # into the wall: no progress
    assert w.step(np.array([MOVE_N]))[0] == pytest.approx(w.cfg.shaping)  # 7 steps to go, then 6


def test_observation_format():
    w = open_world(food_regrow=0.0)
    w.food[1, 5] = True  # food at (5, 1): dx=+2, dy=-2 -> N first (ties go vertical)
    obs = w.observe()
    assert obs.shape == (1, OBS_LEN) and obs.dtype == np.uint8
    assert bytes(obs[0]) == b"E99-....hNWfNE>N"
    w.pos[:] = [1, 2]
    w.carrying[0] = True
    w.energy[:] = 7.2
    assert bytes(w.observe()[0]) == b"E08+...WhN.fEN>N"
    w.pos[:] = [1, 1]
    assert bytes(w.observe()[0]) == b"E08+N..Wh**fE.>@"
    w.carrying[0] = False
    w.pos[:] = [5, 1]
    assert bytes(w.observe()[0]) == b"E08-N...hW.f**>*"


def test_deterministic_under_seed():
    def run(seed):
        w = World(CFG, 5, seed)
        stats = run_episode(w, RandomPolicy(seed=3))
        return w.walls.copy(), w.food.copy(), w.pos.copy(), stats.delivered, stats.picked, w.energy.copy()

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_every_open_cell_is_reachable_from_home():
    w = World(replace(CFG, wall_density=0.3), 4, seed=5)
    reached = {tuple(w.home)}
    frontier = [tuple(w.home)]
    while frontier:
        x, y = frontier.pop()
        for dx, dy in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            if not w.walls[y + dy, x + dx] and (x + dx, y + dy) not in reached:
                reached.add((x + dx, y + dy))
                frontier.append((x + dx, y + dy))
    assert len(reached) == (~w.walls).sum()


def test_oracle_beats_random():
    seeds = range(20, 24)
    oracle = evaluate_policy(OraclePolicy(seed=0), CFG, seeds, n_agents=6)
    rand = evaluate_policy(RandomPolicy(seed=0), CFG, seeds, n_agents=6)
    assert oracle.food_rate.mean() > 0.01
    assert oracle.food_rate.mean() > 5 * rand.food_rate.mean()
    assert oracle.fitness.mean() > rand.fitness.mean()
    assert oracle.percent_of(oracle).mean() == pytest.approx(100.0)


def test_render_draws_everything():
    w = World(CFG, 3, seed=1)
    text = render_text(w)
    assert "H" in text and "#" in text and "*" in text and "t=0" in text
    assert all(ch in text for ch in "012")
    assert set(ACTIONS) == set(b"NSEWPDFZ")


# ---- the view level ------------------------------------------------------------------------------
VIEW = replace(CFG, level="view")


def open_view_world(n_agents=1, **kw):
    """The open world above on the view level (5x5 window)."""
    return open_world(n_agents, level="view", **kw)


def window_rows(obs_row: bytes, side: int = 5) -> list[str]:
    return [obs_row[3 + i * side:3 + (i + 1) * side].decode() for i in range(side)]


def test_obs_len_per_level():
    assert obs_len(CFG) == OBS_LEN == 16 and World(CFG, 2).obs_len == 16
    assert obs_len(VIEW) == 33 and World(VIEW, 2).observe().shape == (2, 33)
    assert obs_len(replace(VIEW, window=3)) == 17 and obs_len(replace(VIEW, window=7)) == 57
    with pytest.raises(ConfigError, match="window must be odd"):
        replace(VIEW, window=4)


def test_view_observation_format():
    w = open_view_world(n_agents=2, food_regrow=0.0)
    w.food[2, 5] = True  # (5, 2): the window's second row, east edge
    w.food[6, 3] = True  # (3, 6): 3 south, outside the 5x5 window
    w.walls[4, 2] = True  # (2, 4)
    w.pos[1] = [4, 5]  # the other agent, in the bottom row
    row = bytes(w.observe()[0])
    assert row == b"E99" + b"h...." + b"....f" + b"..@.." + b".#..." + b"...a." + b"hNW-."
    assert window_rows(row) == ["h....", "....f", "..@..", ".#...", "...a."]
    w.pos[0] = [1, 8]  # the south-west corner: the border walls, then off the map
    w.carrying[0] = True
    w.energy[0] = 7.2
    assert window_rows(bytes(w.observe()[0])) == ["~#..f", "~#...", "~#@..", "~####", "~~~~~"]
    assert bytes(w.observe()[0])[-5:] == b"hN.+."
    w.pos[0] = [1, 1]
    assert bytes(w.observe()[0]) == b"E08" + b"~~~~~" + b"~####" + b"~#@.." + b"~#..." + b"~#..." + b"h**+h"
    w.carrying[0] = False
    w.pos[0] = [5, 2]
    assert bytes(w.observe()[0])[-5:] == b"hWN-f"  # standing on food: the last byte says so


def test_view_observation_has_no_path_hint():
    """Walls, food and other agents outside an agent's window leave its observation byte for byte
    the same, and the same walls change the walking distance home: nothing of a path is in it."""
    w = World(replace(VIEW, size=16, wall_density=0.1), 3, seed=4)
    before = w.observe()
    x, y = w.pos[0]
    far = np.ones_like(w.walls)
    far[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = False  # outside agent 0's window
    far[w.home[1], w.home[0]] = False
    far[w.pos[1:, 1], w.pos[1:, 0]] = False
    hidden = far & ~w.walls & (np.indices(w.walls.shape).sum(0) % 2 == 0)  # open cells to wall in
    w.walls |= hidden
    w.food[far & ~w.walls] = ~w.food[far & ~w.walls]
    assert bytes(w.observe()[0]) == bytes(before[0])
    home_cell = np.zeros_like(w.walls)
    home_cell[w.home[1], w.home[0]] = True
    assert not np.array_equal(w._distance_field(home_cell)[0], w.home_dist)  # the map did change


def test_view_shaping_counts_only_food_in_the_window():
    w = open_view_world(food_regrow=0.0)
    w.food[3, 6] = True  # 3 east of (3, 3): outside the window
    assert w.step(np.array([MOVE_E]))[0] == pytest.approx(w.cfg.explore_reward)  # nothing in sight yet
    assert w.step(np.array([MOVE_E]))[0] == pytest.approx(w.cfg.shaping)  # now 1 away, was 2: in sight


# ---- the baselines -------------------------------------------------------------------------------
def view_bytes(rows, compass="N.", carrying=False, under="."):
    """A view-level observation row from its parts (the format of world.py)."""
    return np.frombuffer(b"E99" + "".join(rows).encode() + f"h{compass}{'+' if carrying else '-'}{under}".encode(),
                         dtype=np.uint8)


def planner_action(rows, heading=0, carried=False, **kw):
    planner = ViewPlanner(seed=0)
    planner.reset(1)
    planner.heading[:], planner.carried[:] = heading, carried
    return int(planner.act(view_bytes(rows, **kw)[None], np.array([True]))[0])


OPEN = [".....", ".....", "..@..", ".....", "....."]


def test_view_planner_reads_the_bytes():
    assert planner_action([".....", ".....", "..@.f", ".....", "....."]) == MOVE_E  # the food in view
    assert planner_action(["..f..", "#####", "..@..", ".....", "..f.."]) == MOVE_S  # the reachable one
    assert planner_action(OPEN, under="f") == PICK
    assert planner_action(OPEN, under="f", carrying=True, compass="S.") == MOVE_S  # hands full: go home
    assert planner_action(OPEN, carrying=True, compass="SE", heading=MOVE_N) in (MOVE_S, MOVE_E)  # just picked up
    assert planner_action(OPEN, under="h", carrying=True, compass="**") == DROP
    # home in the window behind a wall: around it (N or S first), never into the wall
    assert planner_action([".....", ".....", "h#@..", ".....", "....."], carrying=True, compass="W.") in (MOVE_N, MOVE_S)
    # home out of view due north behind a wall: sideways, never north, and not back where it came from
    walled = [".....", ".###.", "..@..", ".....", "....."]
    assert planner_action(walled, carrying=True, carried=True, compass="N.", heading=MOVE_E) == MOVE_E
    assert planner_action(walled, carrying=True, carried=True, compass="N.", heading=MOVE_W) == MOVE_W
    # nothing to walk to: keep the heading while it is open, else turn, never into a wall
    assert planner_action(OPEN, heading=MOVE_S) == MOVE_S
    assert planner_action(["~~~~~", "~####", "~#@..", "~#...", "~#..."], heading=MOVE_N) in (MOVE_S, MOVE_E)


def test_view_planner_reads_only_the_observation():
    """Two worlds that differ only outside the windows give the same bytes, and the same planner acts
    the same in both; the full-map planner, which reads the world, does not."""
    envs = []
    for food in ((8, 5), (5, 8)):  # out of view east, or out of view south
        env = WorldEnv(replace(CFG, level="view", size=12, wall_density=0.0, food_regrow=0.0), 1)
        env.reset(0)
        w = env.world
        w.food[:] = False
        w.food[food[1], food[0]] = True
        w.pos[:] = [5, 5]
        envs.append(env)
    obs = [env.world.observe() for env in envs]
    assert np.array_equal(obs[0], obs[1])
    view = []
    for env, o in zip(envs, obs):
        planner = ViewPlanner(seed=4)
        planner.reset(1)
        view.append([int(planner.act(o, np.array([True]))[0]) for _ in range(3)])
    assert view[0] == view[1]
    full = [int(FullMapPlanner(env).act(o, np.array([True]))[0]) for env, o in zip(envs, obs)]
    assert full == [MOVE_E, MOVE_S]


@pytest.mark.slow
def test_planners_order_on_the_view_level():
    cfg = replace(VIEW, n_food=8, steps=80)
    scores = score_baselines(cfg, seeds=range(4), crowd=4, alone=2)
    food = {name: scores.food_rate[name] for name in BASELINES}
    assert food["same_view"]["alone"].mean() > 0.02 > food["random"]["alone"].mean()
    assert food["full_map"]["alone"].mean() > food["same_view"]["alone"].mean()
    assert food["same_view"]["crowd"].mean() > food["random"]["crowd"].mean()
    assert scores.fitness["same_view"]["crowd"].shape == (4,) and scores.crowd == 4
    score = normalise(food["same_view"]["crowd"], food["random"]["crowd"], food["same_view"]["crowd"])
    assert np.allclose(score, 1.0)
    assert same_view_planner(VIEW).__class__ is ViewPlanner and same_view_planner(CFG).__class__ is OraclePolicy
