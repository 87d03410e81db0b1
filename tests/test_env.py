"""The env interface (h2q/evolve/env.py): the example world and both grid levels through reset/step/
agents/spaces/fitness, the shape checks a plug-in gets, and the episode loop on the interface."""
from dataclasses import replace

import numpy as np
import pytest

from h2q.errors import H2QError
from h2q.evolve import (
    ByteEnv,
    FullMapPlanner,
    LineEnv,
    OraclePolicy,
    RandomPolicy,
    ViewPlanner,
    World,
    WorldConfig,
    WorldEnv,
    evaluate_policy,
    obs_len,
    run_episode,
)
from h2q.evolve.world import ACTIONS

GRID = WorldConfig(size=10, n_food=8, steps=40)


class LinePolicy:
    """The example world's script: eat on the berry, else walk to it."""

    def reset(self, n_agents):
        pass

    def act(self, obs, alive):
        me = np.argmax((obs == ord("@")) | (obs == ord("*")), axis=1)
        berry = np.argmax((obs == ord("b")) | (obs == ord("*")), axis=1)
        return np.where(me == berry, 2, np.where(berry < me, 0, 1))


def test_line_env_through_the_interface():
    env = LineEnv(n_agents=3, width=7, steps=5)
    assert env.possible_agents == [0, 1, 2] and env.num_agents == 3
    assert env.action_space(0).actions == b"<>EZ" and env.action_space(0).n == 4
    assert env.observation_space(2).length == 7 == env.obs_len
    obs = env.reset(seed=1)
    assert obs.shape == (3, 7) and obs.dtype == np.uint8 and env.agents == [0, 1, 2]
    assert all(sum(row.count(c) for c in b"@*") == 1 for row in map(bytes, obs))
    again = env.reset(seed=1)
    assert np.array_equal(obs, again)
    for t in range(5):
        obs, rewards, dones, _ = env.step(np.array([3, 3, 3]))  # wait
        assert rewards.shape == (3,) and dones.dtype == bool and not rewards.any()
        assert dones.all() == (t == 4)
    assert env.agents == [] and env.fitness().tolist() == [0, 0, 0]


def test_policies_run_on_the_example_world():
    env = LineEnv(n_agents=4, width=9, steps=40)
    scripted = evaluate_policy(LinePolicy(), env, seeds=[0, 1, 2])
    rand = evaluate_policy(RandomPolicy(seed=0, n_actions=4), env, seeds=[0, 1, 2])
    assert scripted.fitness.shape == (4,) and len(scripted.episodes) == 3
    assert scripted.fitness.min() > 0.1 > rand.fitness.mean()  # a berry every few steps vs chance
    stats = scripted.episodes[0]
    assert stats.steps == 40 and stats.eaten.tolist() == pytest.approx(40 * stats.fitness)


def test_lora_agents_live_and_learn_on_the_example_world():
    """The 20-agent machinery is not the grid's: LoRA agents on a tiny base act on the example world's
    bytes and its own action bytes, and the learner updates their adapters from its rewards."""
    import torch

    from h2q.config import PRESETS
    from h2q.evolve.agent import AgentConfig, AgentPolicy, make_bank
    from h2q.evolve.learner import Learner, LearnerConfig
    from h2q.lora import freeze_base
    from h2q.model import Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    freeze_base(model)
    env = LineEnv(n_agents=4, width=9, steps=40)
    bank = make_bank(model, env.num_agents, AgentConfig(rank=2))
    policy = AgentPolicy(model, bank, AgentConfig(rank=2), prefix=b"<> walk E eat:\n", obs_len=env.obs_len,
                         actions=env.action_bytes)
    learner = Learner(policy, LearnerConfig(update_every=4, lag=2, buffer=16, warmup=0))
    before = [p.detach().clone() for p in bank.parameters()]
    env.reset(seed=0)
    stats = run_episode(env, policy, learner=learner)
    assert stats.steps == 40 and stats.fitness.shape == (4,)
    assert learner.updates > 0 and any(not torch.equal(a, b) for a, b in zip(before, bank.parameters()))
    assert set(np.frombuffer(policy.prev_action.tobytes(), dtype=np.uint8)) <= set(env.action_bytes)


@pytest.mark.parametrize("level", ["hinted", "view"])
def test_grid_world_through_the_interface(level):
    cfg = replace(GRID, level=level)
    env = cfg.make_env(3)
    assert isinstance(env, WorldEnv) and env.action_bytes == ACTIONS and env.max_steps == 40
    assert env.observation_space(0).length == obs_len(cfg) == env.obs_len
    obs = env.reset(seed=5)
    assert obs.shape == (3, obs_len(cfg)) and obs.dtype == np.uint8
    assert np.array_equal(obs, World(cfg, 3, seed=5).observe())
    obs, rewards, dones, info = env.step(np.array([0, 1, 7]))
    assert obs.shape == (3, env.obs_len) and rewards.shape == (3,) and not dones.any()
    assert set(info) == {"delivered", "picked", "eaten", "died", "ticks_alive"}
    env.world.energy[1] = 0.1  # agent 1 dies on its next tick and stays done
    _, _, dones, _ = env.step(np.array([0, 0, 0]))
    assert dones.tolist() == [False, True, False] and env.agents == [0, 2]
    _, _, dones, _ = env.step(np.array([0, 0, 0]))
    assert dones.tolist() == [False, True, False]


@pytest.mark.parametrize("level", ["hinted", "view"])
def test_episode_on_the_env_equals_the_episode_on_the_world(level):
    cfg = replace(GRID, level=level)
    planner = OraclePolicy if level == "hinted" else ViewPlanner
    by_world = run_episode(World(cfg, 4, seed=9), planner(seed=2))
    env = cfg.make_env(4)
    env.reset(seed=9)
    by_env = run_episode(env, planner(seed=2))
    assert by_world.delivered.sum() > 0
    for key in ("delivered", "picked", "died", "ticks_alive"):
        assert np.array_equal(by_world.info[key], by_env.info[key])
    assert np.array_equal(by_world.fitness, by_env.fitness) and np.array_equal(by_world.reward, by_env.reward)


def test_baselines_run_through_the_interface():
    cfg = replace(GRID, level="view")
    env = cfg.make_env(3)
    seeds = [1, 2, 3]
    for policy in (RandomPolicy(seed=0), ViewPlanner(seed=0), FullMapPlanner(env, seed=0)):
        result = evaluate_policy(policy, env, seeds)
        assert result.fitness.shape == (3,) and result.food_rate.shape == (3,) and len(result.episodes) == 3


def test_a_plugin_slip_is_one_clear_error():
    class Broken(LineEnv):
        def _observe(self):
            return super()._observe().astype(np.int64)

    with pytest.raises(H2QError, match=r"Broken must observe a \(2, 9\) uint8 array, got int64"):
        Broken(n_agents=2).reset(0)
    env = LineEnv(n_agents=2)
    env.reset(0)
    with pytest.raises(H2QError, match=r"needs \(2,\) action indices in 0..3"):
        env.step(np.array([0, 4]))
    with pytest.raises(H2QError, match="needs"):
        env.step(np.array([0.0, 1.0]))
    assert issubclass(LineEnv, ByteEnv) and issubclass(WorldEnv, ByteEnv)


def test_alone_is_the_crowds_world_without_the_crowd():
    crowd, solo = GRID.make_env(4), WorldEnv(GRID, 4, alone=2)
    crowd.reset(3)
    solo.reset(3)
    assert solo.dones.tolist() == [True, True, False, True] and solo.agents == [2]
    assert np.array_equal(crowd.world.walls, solo.world.walls) and np.array_equal(crowd.world.food, solo.world.food)
    assert np.array_equal(crowd.world.pos[2], solo.world.pos[2])
    stats = run_episode(solo, OraclePolicy(seed=0))
    assert stats.ticks_alive.tolist()[:2] == [0, 0] and stats.delivered[[0, 1, 3]].sum() == 0
    assert stats.delivered[2] > 0
