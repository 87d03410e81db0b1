"""World rules (walls, pick/drop/eat, energy and death, determinism), the observation format, and the
oracle/random scale."""
from dataclasses import replace

import numpy as np
import pytest

from h2q.evolve import (ACTIONS, OBS_LEN, OraclePolicy, RandomPolicy, World, WorldConfig, evaluate_policy,
                        run_episode)
from h2q.evolve.world import DROP, EAT, MOVE_E, MOVE_N, MOVE_S, MOVE_W, PICK, WAIT, render_text

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
