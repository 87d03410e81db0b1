"""`--env grid`: the evolve runner's view of the grid world. One process's agents (a bank of n slots)
live one episode with online learning, then are scored on fresh world seeds with learning off, next to
the scripted oracle and the random policy on the same seeds (h2q/evolve/world.py gives fitness its
scale: food delivered per step plus a small survival term).

The policy and the learner are the agents engineer's (h2q/evolve/agent.py, learner.py); `make_agents`
is the one place that builds them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from h2q.evolve import OraclePolicy, RandomPolicy, World, WorldConfig, evaluate_policy, run_episode
from h2q.evolve.evolution import Agent, Evaluation
from h2q.evolve.world import ACTIONS
from h2q.lora import AdapterBank


class StandInPolicy:
    """Placeholder until agent.py lands: next-byte logits over the action bytes after the observation."""

    def __init__(self, model, bank: AdapterBank, generator: torch.Generator):
        self.model, self.bank, self.generator = model, bank, generator
        self.temperature = torch.ones(bank.n)
        self.action_ids = torch.tensor(list(ACTIONS))

    def reset(self, n_agents: int) -> None:
        assert n_agents == self.bank.n

    def logits(self, obs: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(obs.astype(np.int64))  # (n, OBS_LEN)
        out = self.model(ids, adapters=self.bank.bind(torch.arange(len(obs)) % self.bank.n))  # (n, T, V)
        return out[:, -1, self.action_ids]  # (n, 8)

    @torch.no_grad()
    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        probs = F.softmax(self.logits(obs) / self.temperature[:, None], -1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1).numpy()


class StandInLearner:
    """Placeholder until learner.py lands: REINFORCE on the shaped reward with a running baseline."""

    def __init__(self, policy: StandInPolicy, every: int = 8):
        self.policy, self.every = policy, every
        self.optimizer = torch.optim.Adam(policy.bank.parameters(), lr=1.0)
        self.lr = torch.full((policy.bank.n,), 1e-3)
        self.baseline = torch.zeros(policy.bank.n)
        self.buffer = []

    def record(self, obs, actions, rewards, alive, done) -> None:
        self.buffer.append((obs, actions, rewards, alive))
        if len(self.buffer) >= self.every or done.all():
            self._update()

    def _update(self) -> None:
        obs = np.concatenate([b[0] for b in self.buffer])
        actions = torch.from_numpy(np.concatenate([b[1] for b in self.buffer]))
        rewards = torch.from_numpy(np.stack([b[2] for b in self.buffer])).float()  # (k, n)
        alive = torch.from_numpy(np.stack([b[3] for b in self.buffer])).float()  # (k, n)
        self.buffer = []
        advantage = (rewards - self.baseline) * alive  # (k, n)
        self.baseline = 0.9 * self.baseline + 0.1 * (rewards * alive).sum(0) / alive.sum(0).clamp(min=1)
        logp = F.log_softmax(self.policy.logits(obs), -1).gather(1, actions[:, None]).squeeze(1)  # (k*n,)
        (-(advantage.flatten() * logp).sum()).backward()
        params = list(self.policy.bank.parameters())
        before = [p.detach().clone() for p in params]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(old + (p - old) * self.lr.view(-1, *[1] * (p.dim() - 1)))

    def reset_slots(self, slots) -> None:
        for p in self.policy.bank.parameters():
            for value in self.optimizer.state.get(p, {}).values():
                if value.dim():
                    value[list(slots)] = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"baseline": self.baseline}
        for i, p in enumerate(self.policy.bank.parameters()):
            out.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in self.optimizer.state.get(p, {}).items()})
        return out

    def load_state_tensors(self, tensors) -> None:
        self.baseline = tensors["baseline"].clone()
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})


def make_agents(model, bank: AdapterBank, generator: torch.Generator, kv: str):
    """(policy, learner) for the agents of `bank` (slot i = agent i)."""
    policy = StandInPolicy(model, bank, generator)
    return policy, StandInLearner(policy)


def set_knobs(policy, learner, agents: list[Agent]) -> None:
    """Each agent's temperature and learning rate (PBT changes them between cycles)."""
    policy.temperature = torch.tensor([a.temperature for a in agents], dtype=torch.float32)
    learner.lr = torch.tensor([a.lr for a in agents], dtype=torch.float32)


class GridEnv:
    """The grid world of one process: its agents' policy and learner, and the baselines."""

    def __init__(self, model, bank: AdapterBank, world: WorldConfig, eval_episodes: int, kv: str = "full",
                 render=None):
        if eval_episodes < 1:
            from h2q.cli import UserError
            raise UserError(f"--eval-episodes must be >= 1, got {eval_episodes}")
        self.bank, self.world, self.eval_episodes, self.render = bank, world, eval_episodes, render
        self.generator = torch.Generator()
        self.policy, self.learner = make_agents(model, bank, self.generator, kv)

    def ticks(self, steps: int, learns: bool) -> int:
        return steps * learns + steps * self.eval_episodes

    def live(self, agents: list[Agent], steps: int, seed: int, tick) -> dict[str, np.ndarray]:
        """One episode of `steps` ticks with online learning; -> per-agent delivered, died, reward."""
        set_knobs(self.policy, self.learner, agents)
        self.generator.manual_seed(seed)
        world = World(self.world, self.bank.n, seed)

        def after_tick(w):
            tick()
            if self.render is not None:
                self.render(w)

        self.bank.train()
        stats = run_episode(world, self.policy, steps, learner=self.learner, render=after_tick)
        self.bank.eval()
        return {"delivered": stats.delivered, "died": stats.died, "reward": stats.reward}

    def evaluate(self, agents: list[Agent], seed: int, tick) -> Evaluation:
        """Each agent on `eval_episodes` fresh world seeds (from `seed`), learning off, beside the oracle
        and random policies on the same seeds with as many agents."""
        set_knobs(self.policy, self.learner, agents)
        self.generator.manual_seed(seed)
        seeds = np.random.SeedSequence(seed).generate_state(self.eval_episodes).tolist()
        n, steps = self.bank.n, self.world.steps
        result = evaluate_policy(self.policy, self.world, seeds, n, steps, render=lambda w: tick())
        oracle = evaluate_policy(OraclePolicy(seed=seed % 2**32), self.world, seeds, n, steps)
        rand = evaluate_policy(RandomPolicy(seed=seed % 2**32), self.world, seeds, n, steps)
        return Evaluation(
            fitness=result.fitness, per_agent={"pct_oracle": result.percent_of(oracle)},
            totals={"food_delivered": float(sum(e.delivered.sum() for e in result.episodes)),
                    "deaths": float(sum(e.died.sum() for e in result.episodes))},
            references={"oracle": float(oracle.fitness.mean()), "random": float(rand.fitness.mean())})

    def reset_slots(self, slots) -> None:
        self.learner.reset_slots(slots)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.learner.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.learner.load_state_tensors(tensors)
