"""h2q.evolve: the worlds, the agents that act in them and learn online, and the episode loop that
joins them.

Every world is a plug-in behind one interface (h2q/evolve/env.py, PettingZoo's parallel API in
array form): `reset(seed) -> obs`, `step(actions) -> (obs, rewards, dones, info)`, `agents`, the
action bytes, `fitness()`. The grid world (world.py) has two levels: `hinted`, whose observation
names the next step, and `view`, a window of cells with no path in it. The runner also drives text self-evolution (text_env.py)
and a social network whose agents write, read, like and follow (social_env.py, scored by the
grounded quality signal of quality.py). A policy is anything with
`reset(n_agents)` and `act(obs, alive) -> actions`: `obs` the env's (n, obs_len) uint8 array,
`alive` the (n,) mask of agents not done, actions (n,) indices into the action bytes. The baselines
(planners.py) give scores their scale, statistics over runs are in stats.py, `AgentPolicy`
(agent.py) is the 20 LoRA agents on one base, and a learner (learner.py) is fed every transition by
`run_episode` and updates the adapters as it goes.

    freeze_base(model)                                     # h2q/lora.py: learning needs a frozen base
    bank = make_bank(model, 20, AgentConfig())             # h2q/evolve/agent.py
    policy = AgentPolicy(model, bank, AgentConfig())       # agent i acts with bank slot policy.slots[i]
    learner = Learner(policy, LearnerConfig())             # h2q/evolve/learner.py
    stats = run_episode(World(WorldConfig(), 20, seed), policy, learner=learner)
    result = evaluate_policy(policy, WorldConfig(), seeds=[100, 101], n_agents=20)
    oracle = evaluate_policy(OraclePolicy(), WorldConfig(), seeds=[100, 101], n_agents=20)
    result.percent_of(oracle)                              # per agent, % of the oracle's food rate

    env = WorldConfig(level="view").make_env(20)          # any ByteEnv works the same way
    env.reset(seed=7)
    stats = run_episode(env, ViewPlanner())

When evolution writes a new adapter into slot i (`bank.set_adapter(i, child)`), it calls
`learner.reset_agent(i)` so the newcomer starts with fresh experience and optimizer moments.
"""
from __future__ import annotations

from h2q.evolve.env import ByteEnv, EpisodeStats, EvalResult, LineEnv, StackedEnv, evaluate_policy, run_episode
from h2q.evolve.planners import (
                                 FullMapPlanner,
                                 OraclePolicy,
                                 RandomPolicy,
                                 ViewPlanner,
                                 same_view_planner,
                                 score_baselines,
)
from h2q.evolve.render import Renderer
from h2q.evolve.world import ACTIONS, OBS_LEN, World, WorldConfig, WorldEnv, obs_len

__all__ = ["ACTIONS", "OBS_LEN", "ByteEnv", "EpisodeStats", "EvalResult", "FullMapPlanner", "LineEnv",
           "OraclePolicy", "RandomPolicy", "Renderer", "StackedEnv", "ViewPlanner", "World", "WorldConfig", "WorldEnv",
           "evaluate_policy", "obs_len", "run_episode", "same_view_planner", "score_baselines"]
