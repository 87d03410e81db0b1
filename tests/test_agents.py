"""The LoRA agents and their online learning: batched decisions equal per-agent ones, memory contexts
replay exactly, a single agent learns a rewarded action, per-agent gradient isolation, NaN guards."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.evolve import World, WorldConfig, run_episode
from h2q.evolve.agent import AgentConfig, AgentPolicy, make_bank
from h2q.evolve.learner import BUFFERS, Batch, Learner, LearnerConfig
from h2q.evolve.world import PICK
from h2q.lora import freeze_base
from h2q.model import Transformer
from h2q.tokenizer import PAD

TINY = replace(PRESETS["tiny"], context_len=256)  # room for memory lines next to the prefix
WORLD = WorldConfig(size=8, n_food=6, steps=24)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_policy(n=4, seed=0, **agent_kw):
    torch.manual_seed(seed)
    model = freeze_base(Transformer(TINY))
    cfg = AgentConfig(seed=seed, **agent_kw)
    bank = make_bank(model, n, cfg)
    with torch.no_grad():  # B = 0 would make every agent the base; give each its own update
        for B in bank.lora_B:
            B.normal_(0.0, 0.3)
    return AgentPolicy(model, bank, cfg)


def test_batched_decisions_equal_per_agent():
    policy = make_policy(n=5)
    obs = World(WORLD, 5, seed=3).observe()
    ids = torch.as_tensor(obs.astype(np.int64))
    with torch.no_grad():
        batched = policy.action_logits(ids, np.arange(5))
        single = torch.cat([policy.action_logits(ids[i:i + 1], [i]) for i in range(5)])
        alive = np.array([True, False, True, True, False])
        rows = np.flatnonzero(alive)
        subset = policy.action_logits(ids[rows], rows)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset, single[rows], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[2])  # the adapters do differ


def test_act_is_seeded_and_skips_the_dead():
    def actions(seed):
        policy = make_policy(n=4, seed=seed)
        world = World(WORLD, 4, seed=1)
        policy.reset(4)
        alive = np.array([True, True, False, True])
        return policy.act(world.observe(), alive), policy.last_logprob

    (a1, lp1), (a2, lp2) = actions(0), actions(0)
    assert np.array_equal(a1, a2) and np.allclose(lp1, lp2, equal_nan=True)
    assert np.isnan(lp1[2]) and np.isfinite(lp1[[0, 1, 3]]).all() and (lp1[[0, 1, 3]] <= 0).all()


@pytest.mark.parametrize("kv,tol", [("full", 1e-4), ("int8", 0.05), ("window", 0.3)])
def test_memory_contexts_replay_the_decision(kv, tol):
    """The learner recomputes a decision from `last_context`: exact for full, close for int8 (its
    quantization) and window (kept lines were encoded with older lines still in view)."""
    policy = make_policy(n=3, memory=2, kv=kv)
    world = World(WORLD, 3, seed=2)
    policy.reset(3)
    obs = world.observe()
    for t in range(8):
        alive = world.alive.copy()
        actions = policy.act(obs, alive)
        ids = torch.as_tensor(policy.last_context)
        with torch.no_grad():
            logp = policy.log_probs(policy.action_logits(ids, np.arange(3), ids != PAD))
        replayed = logp.gather(1, torch.as_tensor(actions)[:, None]).squeeze(1).numpy()
        np.testing.assert_allclose(replayed, policy.last_logprob, atol=tol)
        world.step(actions)
        obs = world.observe()
    assert policy.nbytes()["memory_cache"] > 0


@pytest.mark.parametrize("memory,kv", [(0, "window"), (2, "window"), (2, "full"), (2, "int8")])
def test_state_mid_episode_continues_as_the_uninterrupted_policy(memory, kv):
    """state_dict after 5 steps (through safetensors), loaded into a new policy made alike: the rest of
    the episode (past a full/int8 memory's rewind) has the same actions, log-probabilities and contexts
    bit for bit; a policy of another memory size refuses it, unchanged."""
    import copy

    policy, world = make_policy(n=3, memory=memory, kv=kv), World(WORLD, 3, seed=2)
    policy.reset(3)
    for _ in range(5):
        world.step(policy.act(world.observe(), world.alive.copy()))
    state = load(save(policy.state_dict()))
    other, other_world = make_policy(n=3, memory=memory, kv=kv), copy.deepcopy(world)
    other.reset(3)
    other.load_state_dict(state)
    for _ in range(9):
        actions = policy.act(world.observe(), world.alive.copy())
        assert np.array_equal(actions, other.act(other_world.observe(), other_world.alive.copy()))
        assert np.array_equal(policy.last_context, other.last_context)
        np.testing.assert_array_equal(policy.last_logprob, other.last_logprob)
        world.step(actions)
        other_world.step(actions)
    mismatched = make_policy(n=3, memory=memory + 1, kv=kv)
    mismatched.reset(3)
    before = mismatched.state_dict()
    with pytest.raises(H2QError, match="does not fit"):
        mismatched.load_state_dict(state)
    torch.testing.assert_close(mismatched.state_dict(), before, rtol=0, atol=0, equal_nan=True)


def test_single_agent_learns_a_rewarded_action():
    """One agent, one fixed observation, reward 1 for P (pick up) only. A random-init tiny base's tied
    head caps logit gaps near 1, so the policy samples at temperature 0.1 to be able to commit."""
    torch.manual_seed(0)
    model = freeze_base(Transformer(TINY))
    cfg = AgentConfig(temperature=0.1, seed=1)
    policy = AgentPolicy(model, make_bank(model, 1, cfg), cfg)
    learner = Learner(policy, LearnerConfig(lr=1e-2, warmup=1, update_every=4, lag=0, replay=4, buffer=32,
                                            gamma=0.0, entropy=0.0))
    world = World(WORLD, 1, seed=0)
    obs, alive = world.observe(), world.alive.copy()
    ids = torch.as_tensor(obs.astype(np.int64))

    def p_pick():
        with torch.no_grad():
            return float(policy.log_probs(policy.action_logits(ids, [0]))[0, PICK].exp())

    before = p_pick()
    policy.reset(1)
    while learner.updates < 60:
        actions = policy.act(obs, alive)
        learner.record(obs, actions, (actions == PICK).astype(float), alive, np.zeros(1, dtype=bool))
    assert before < 0.5 and p_pick() > 0.9


def gradients(learner, batch):
    for p in learner.params:
        p.grad = None
    learner.agent_losses(batch).sum().backward()
    return [p.grad.clone() for p in learner.params]


def test_gradients_are_isolated_per_agent():
    policy = make_policy(n=4)
    learner = Learner(policy, LearnerConfig(update_every=8, lag=0, buffer=32))
    world = World(WORLD, 4, seed=5)
    run_episode(world, policy, steps=8, learner=None)
    obs = world.observe()
    rng = np.random.default_rng(0)
    for _ in range(6):  # fill the buffer by hand: random rewards, no update yet
        alive = np.ones(4, dtype=bool)
        actions = policy.act(obs, alive)
        learner.record(obs, actions, rng.normal(size=4), alive, np.zeros(4, dtype=bool))
    slot = np.repeat(np.arange(6), 3)
    agent = np.tile([0, 1, 3], 6)  # agent 2 has no rows
    batch = Batch(slot=slot, agent=agent, ret=np.zeros(18), adv=rng.normal(size=18), fresh=np.ones(18, dtype=bool))
    together = gradients(learner, batch)
    for a in (0, 1, 3):
        mine = agent == a
        alone = gradients(learner, Batch(slot[mine], agent[mine], batch.ret[mine], batch.adv[mine], batch.fresh[mine]))
        for g_all, g_alone in zip(together, alone):
            torch.testing.assert_close(g_all[a], g_alone[a], rtol=1e-4, atol=1e-6)
            others = [i for i in range(4) if i != a]
            assert g_alone[others].abs().max() == 0
    assert all(g[2].abs().max() == 0 for g in together)


def test_nan_guards(caplog):
    policy = make_policy(n=3)
    learner = Learner(policy, LearnerConfig(update_every=4, lag=0, replay=2, buffer=16))
    world = World(WORLD, 3, seed=4)
    obs = world.observe()
    alive = np.ones(3, dtype=bool)
    no = np.zeros(3, dtype=bool)
    for t in range(4):  # agent 0 gets one NaN reward: that transition is dropped, nothing breaks
        actions = policy.act(obs, alive)
        learner.record(obs, actions, np.array([np.nan if t == 1 else 1.0, t, -t]), alive, no)
    assert learner.updates == 1 and learner.skipped == 0 and "non-finite reward" in caplog.text
    assert not learner.valid[1, 0] and learner.valid[1, 1:].all()
    assert all(torch.isfinite(p).all() for p in learner.params)
    before = [p.detach().clone() for p in learner.params]
    with torch.no_grad():
        learner.params[0][2] = float("inf")  # adapter 2 blows up: non-finite loss
    for t in range(4):
        actions = policy.act(obs, alive)
        learner.record(obs, actions, np.array([1.0, t, -t]), alive, no)
    assert learner.updates == 2 and learner.skipped == 1 and learner.restored == 1
    assert "skipped" in caplog.text and "restored" in caplog.text
    assert all(torch.equal(p[2], b[2]) for p, b in zip(learner.params, before))  # its last good copy
    assert any(not torch.equal(p[1], b[1]) for p, b in zip(learner.params, before))  # the others learn
    assert all(torch.isfinite(p).all() for p in learner.params)


@pytest.mark.parametrize("memory,kv", [(0, "window"), (2, "int8"), (2, "window")])
def test_episode_with_learning_runs(memory, kv):
    policy = make_policy(n=4, memory=memory, kv=kv)
    learner = Learner(policy, LearnerConfig(update_every=4, lag=2, replay=4, buffer=16))
    stats = run_episode(World(WORLD, 4, seed=6), policy, learner=learner)
    assert learner.updates >= 4 and learner.skipped == 0
    assert stats.fitness.shape == (4,) and np.isfinite(stats.fitness).all()
    assert all(torch.isfinite(p).all() for p in learner.params)


def test_policy_leaves_the_model_as_given_and_learning_needs_a_frozen_base():
    model = Transformer(TINY)
    cfg = AgentConfig()
    policy = AgentPolicy(model, make_bank(model, 2, cfg), cfg)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(H2QError, match="freeze_base"):
        Learner(policy)


def test_learner_state_dict_resumes_bit_for_bit():
    """Learn, save the learner's state (through safetensors) and the adapters, load both into a fresh
    policy and learner: the next episode of learning is the same bit for bit."""
    cfg = LearnerConfig(update_every=4, lag=2, replay=4, buffer=16)
    policy = make_policy(n=3)
    learner = Learner(policy, cfg)
    run_episode(World(WORLD, 3, seed=7), policy, steps=14, learner=learner)
    assert learner.updates >= 2
    state, adapters = load(save(learner.state_dict())), [p.detach().clone() for p in learner.params]
    n_tensors = len(learner.params)
    assert sorted(state) == sorted(["adam.steps", *[f"adam.{k}.{i}" for k in "mv" for i in range(n_tensors)],
                                    *[f"good.{i}" for i in range(n_tensors)], "agent.lr_scale", "agent.kl", "counters",
                                    *[f"buffer.{name}" for name in BUFFERS]])
    other_policy = make_policy(n=3)
    with torch.no_grad():
        for p, saved in zip(other_policy.bank.parameters(), adapters):
            p.copy_(saved)
    other = Learner(other_policy, cfg)
    other.load_state_dict(state)
    for pol, lrn in ((policy, learner), (other_policy, other)):
        pol.generator.manual_seed(11)
        lrn.reseed(11)
        lrn.set_lr([2e-3, 1e-3, 4e-3])
        run_episode(World(WORLD, 3, seed=8), pol, steps=14, learner=lrn)
    assert learner.updates == other.updates >= 5
    assert all(torch.equal(a, b) for a, b in zip(learner.params, other.params))
    mine, theirs = learner.state_dict(), other.state_dict()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0, equal_nan=True)
