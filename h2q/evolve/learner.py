"""Online learning from reward: every agent's experience buffer, policy-gradient updates of all adapters
in one batched backward over the AdapterBank, and the guard rails that keep a run alive.

The update is REINFORCE with a baseline (Williams 1992) in PPO's clipped form (Schulman et al. 2017):

* Each agent keeps its last `buffer` transitions: the context bytes it decided on (its observation,
  plus its memory lines), the action, the shaped reward (h2q/evolve/world.py), the behaviour
  log-prob. Returns are discounted (`gamma`) and stop at the agent's death or the episode's end.
* Every `update_every` ticks, each agent trains on the transitions that just became `lag` ticks old
  (their returns have seen `lag` later rewards; gamma**lag of the tail is missing) plus `replay`
  random older ones. Advantages are the returns normalised per agent over its batch (mean baseline,
  unit scale). Loss per agent: mean over its rows of -min(ratio * A, clip(ratio, 1 +- clip) * A)
  - entropy * H(pi), ratio = pi_now / pi_behaviour, so replayed samples that the adapter has moved
  away from stop pushing. Losses are summed over agents; since row b only reaches adapter index[b]
  and the base is frozen, each agent's gradient comes from its own experience alone.
* `BankAdamW` (h2q/optim.py) steps the stacked adapter tensors with per-agent step counts and
  learning rates and a per-agent mask; the gradient-norm clip is per agent too, so nothing couples
  agents (a global clip would).
* Each agent's step size adapts to how far its policy moves (PPO's adaptive-KL rule, here on the
  learning rate, per agent): KL(behaviour || now) on the fresh rows, `target_kl`, at most its `lr`.
* Guard rails: a non-finite reward drops its transition; an agent whose loss or gradient is not
  finite skips that update (weights and Adam moments untouched); an agent whose weights come out
  non-finite is restored from its last good copy and its moments are reset; each is logged.
* Agent i's learning rate is its own peak rate `lr[i]` (the config's `lr` unless `set_lr` gives one
  per agent, as PBT does), warmed up linearly over `warmup` updates and decayed as 1/sqrt(updates)
  after `decay` updates, times its adaptive-KL scale.
* `state_dict()` holds everything the learner carries from one episode to the next, as tensors;
  the settings (config, per-agent `lr`) and the replay generator (`reseed`) are the caller's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from h2q.config import check_options, option
from h2q.errors import ConfigError, H2QError
from h2q.evolve.agent import AgentPolicy
from h2q.optim import BankAdamW, check_state
from h2q.tokenizer import PAD

log = logging.getLogger("h2q.evolve")


@dataclass
class LearnerConfig:
    lr: float = option(2e-3, "peak Adam learning rate of the adapters", above=0, at_most=10)
    warmup: int = option(10, "updates of linear learning-rate warmup", at_least=0)
    decay: int = option(50, "after this many updates the learning rate decays as 1/sqrt(updates) (0 = never)", at_least=0)
    update_every: int = option(8, "ticks between updates", at_least=1)
    lag: int = option(8, "a transition is trained on once this many later rewards are in its return", at_least=0)
    replay: int = option(4, "older transitions replayed per agent and update", at_least=0)
    buffer: int = option(256, "transitions kept per agent", at_least=1)
    gamma: float = option(0.5, "discount of returns", at_least=0, at_most=1)
    clip: float = option(0.2, "PPO ratio clip", above=0)
    entropy: float = option(0.01, "entropy bonus weight", at_least=0)
    target_kl: float = option(0.02, "per-agent KL per update the learning rate adapts to (0 = fixed lr)", at_least=0)
    grad_clip: float = option(1.0, "per-agent gradient norm clip (0 = off)", at_least=0)
    seed: int = option(0, "seed of replay sampling", at_least=0, below=2**63)

    def __post_init__(self):
        check_options(self)
        if self.buffer < self.update_every + self.lag:
            raise ConfigError("buffer", f"must be >= update_every + lag ({self.update_every + self.lag}), got {self.buffer}")


@dataclass
class Batch:
    """Rows of one update: buffer slot and agent of each row, its return, normalised advantage, and
    whether it is fresh (first time trained on) rather than replayed."""
    slot: np.ndarray
    agent: np.ndarray
    ret: np.ndarray
    adv: np.ndarray
    fresh: np.ndarray


BUFFERS = ("context", "action", "reward", "logprob", "valid", "done")  # the experience arrays, (buffer, n, ...)


class Learner:
    """Feeds on `run_episode`'s transitions and updates `policy.bank` in place."""

    def __init__(self, policy: AgentPolicy, cfg: LearnerConfig = LearnerConfig()):
        if policy.cfg.temperature <= 0:
            raise H2QError("learning needs a sampling policy: temperature > 0")
        if any(p.requires_grad for p in policy.model.parameters()):
            raise H2QError("the base model has trainable weights; freeze it first (h2q.lora.freeze_base(model)), "
                           "so updates reach the adapters only")
        self.policy, self.cfg, self.n = policy, cfg, policy.n
        cap, n = cfg.buffer, self.n
        self.context = np.full((cap, n, policy.context_width), PAD, dtype=np.int16)
        self.action = np.zeros((cap, n), dtype=np.int64)
        self.reward = np.zeros((cap, n))
        self.logprob = np.zeros((cap, n))
        self.valid = np.zeros((cap, n), dtype=bool)
        self.done = np.zeros((cap, n), dtype=bool)
        self.t = 0  # transitions recorded
        self.params = list(policy.bank.parameters())
        self.opt = BankAdamW(self.params)
        self.good = [p.detach().clone() for p in self.params]
        self.rng = np.random.default_rng(cfg.seed)
        self.updates = self.skipped = self.restored = 0
        self.last: dict = {}
        device = self.params[0].device
        self.lr = torch.full((self.n,), cfg.lr, device=device)  # per agent peak rate, `set_lr`
        self.lr_scale = torch.ones(self.n, device=device)  # per agent, adapted to target_kl
        self.kl = torch.full((self.n,), float("nan"), device=device)

    # ---- settings --------------------------------------------------------------------------------
    def set_lr(self, lrs) -> None:
        """Agent i's peak learning rate becomes lrs[i] (a float sets all)."""
        self.lr = torch.as_tensor(lrs, dtype=torch.float32, device=self.lr.device).expand(self.n).clone()

    def reseed(self, seed: int) -> None:
        """Restart the generator of replay sampling from `seed`."""
        self.rng = np.random.default_rng(seed)

    # ---- experience ------------------------------------------------------------------------------
    def record(self, obs, actions, rewards, alive, done) -> None:
        """One tick for all agents (the episode loop's learner protocol); updates when due."""
        i = self.t % self.cfg.buffer
        finite = np.isfinite(rewards)
        if not finite[alive].all():
            log.warning("tick %d: non-finite reward for agents %s; those transitions are dropped",
                        self.t, np.flatnonzero(alive & ~finite).tolist())
        self.context[i] = self.policy.last_context
        self.action[i], self.reward[i], self.logprob[i] = actions, np.where(finite, rewards, 0.0), self.policy.last_logprob
        self.valid[i] = alive & finite & np.isfinite(self.policy.last_logprob)
        self.done[i] = done
        self.t += 1
        if self.t % self.cfg.update_every == 0 and self.t >= self.cfg.lag + self.cfg.update_every:
            self.update()

    def reset_agent(self, agent: int) -> None:
        """Agent `agent` got a new adapter (e.g. from evolution): forget its experience and moments,
        and take its current weights as its good copy."""
        self.valid[:, agent] = False
        self.opt.reset([agent])
        self.lr_scale[agent], self.kl[agent] = 1.0, float("nan")
        with torch.no_grad():
            for p, good in zip(self.params, self.good):
                good[agent] = p[agent]

    def select(self) -> Batch | None:
        """This update's rows: per agent the transitions `lag` ticks old plus `replay` older ones."""
        cfg = self.cfg
        L = min(self.t, cfg.buffer)
        order = (self.t - L + np.arange(L)) % cfg.buffer  # buffer slots, oldest first
        returns = np.zeros((L, self.n))
        running = np.zeros(self.n)
        for k in range(L - 1, -1, -1):
            s = order[k]
            running = self.reward[s] + cfg.gamma * running * ~self.done[s]
            returns[k] = running
        age = L - 1 - np.arange(L)  # (L,)
        valid = self.valid[order]  # (L, n)
        fresh = valid & ((age >= cfg.lag) & (age < cfg.lag + cfg.update_every))[:, None]
        older = valid & (age >= cfg.lag + cfg.update_every)[:, None]
        keys = np.where(older, self.rng.random(older.shape), np.inf)  # (L, n)
        picks = np.argsort(keys, axis=0)[:cfg.replay]  # (replay, n) time indices, random among older
        replayed = np.zeros_like(older)
        np.put_along_axis(replayed, picks, True, axis=0)
        chosen = fresh | (replayed & older)
        k_idx, agent = np.nonzero(chosen)
        if len(agent) == 0:
            return None
        ret = returns[k_idx, agent]
        count = np.bincount(agent, minlength=self.n)
        mean = np.bincount(agent, ret, minlength=self.n) / np.maximum(count, 1)
        var = np.bincount(agent, (ret - mean[agent]) ** 2, minlength=self.n) / np.maximum(count, 1)
        adv = (ret - mean[agent]) / (np.sqrt(var[agent]) + 1e-6)
        return Batch(slot=order[k_idx], agent=agent, ret=ret, adv=adv, fresh=fresh[k_idx, agent])

    # ---- the update ------------------------------------------------------------------------------
    def agent_losses(self, batch: Batch) -> torch.Tensor:
        """Per-agent loss (n,) of a batch, in one forward over all rows; 0 for agents without rows."""
        policy, cfg = self.policy, self.cfg
        ids = self.context[batch.slot, batch.agent].astype(np.int64)  # (M, W)
        real = ids != PAD
        ids = ids[:, real.any(0).argmax():]  # drop columns that are padding in every row
        ids_t = torch.as_tensor(ids, device=policy.device)
        valid = ids_t != PAD
        logp_all = policy.log_probs(policy.action_logits(ids_t, batch.agent, valid))  # (M, 8)
        dev = logp_all.device
        taken = torch.as_tensor(self.action[batch.slot, batch.agent], device=dev)
        logp = logp_all.gather(1, taken[:, None]).squeeze(1)
        ratio = (logp - torch.as_tensor(self.logprob[batch.slot, batch.agent], device=dev, dtype=torch.float32)).exp()
        adv = torch.as_tensor(batch.adv, device=dev, dtype=torch.float32)
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        agent = torch.as_tensor(batch.agent, device=dev)
        count = torch.bincount(agent, minlength=self.n).clamp(min=1).float()
        per_row = -(surrogate + cfg.entropy * entropy) / count[agent]
        self._measure_kl(log_ratio=(ratio.detach().log()), agent=agent, fresh=batch.fresh)
        self.last = {"entropy": float(entropy.detach().mean()), "rows": len(batch.agent)}
        return torch.zeros(self.n, device=dev).index_add(0, agent, per_row)

    def _measure_kl(self, log_ratio: torch.Tensor, agent: torch.Tensor, fresh: np.ndarray) -> None:
        """Per-agent KL(behaviour || now) over the fresh rows, k3 estimator E[r - 1 - log r]
        (Schulman 2020): how far ~1-2 updates moved each policy where it acted."""
        on = torch.as_tensor(fresh, device=agent.device) & torch.isfinite(log_ratio)
        k3 = torch.where(on, log_ratio.exp() - 1 - log_ratio, torch.zeros_like(log_ratio))
        count = torch.zeros(self.n, device=agent.device).index_add(0, agent, on.float())
        kl = torch.zeros(self.n, device=agent.device).index_add(0, agent, k3) / count.clamp(min=1)
        self.kl = torch.where(count > 0, kl, torch.full_like(kl, float("nan")))

    def update(self) -> None:
        batch = self.select()
        if batch is None:
            return
        losses = self.agent_losses(batch)
        self.apply(losses, has_rows=np.bincount(batch.agent, minlength=self.n) > 0)

    def apply(self, losses: torch.Tensor, has_rows: np.ndarray) -> None:
        """Backward of the per-agent losses and one guarded optimizer step."""
        cfg = self.cfg
        dev = losses.device
        finite_loss = torch.isfinite(losses)
        self.opt.zero_grad()
        torch.where(finite_loss, losses, torch.zeros_like(losses)).sum().backward()
        sq = torch.zeros(self.n, device=dev)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            sq += p.grad.float().pow(2).flatten(1).sum(1)
        norm = sq.sqrt()
        active = finite_loss & torch.isfinite(norm) & torch.as_tensor(has_rows, device=dev)
        bad = (~(finite_loss & torch.isfinite(norm)) & torch.as_tensor(has_rows, device=dev)).nonzero().flatten()
        if len(bad):
            self.skipped += len(bad)
            log.warning("update %d: non-finite loss or gradient for agents %s; their update is skipped",
                        self.updates, bad.tolist())
        scale = (cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0) if cfg.grad_clip > 0 else torch.ones_like(norm)
        scale = torch.where(active, scale, torch.zeros_like(scale))
        with torch.no_grad():
            for p in self.params:
                p.grad = torch.nan_to_num(p.grad) * scale.view((-1,) + (1,) * (p.dim() - 1))
        self._adapt_lr()
        lr = self.scheduled_lr()
        self.opt.step(lr, active)
        self._restore_non_finite(active)
        self.updates += 1
        self.last.update(loss=float(torch.where(finite_loss, losses, 0).detach().sum()), lr=float(lr.mean()),
                         active=int(active.sum()),
                         grad_norm=float(norm[active].mean()) if bool(active.any()) else float("nan"))

    def scheduled_lr(self) -> torch.Tensor:
        """Per agent (n,): its peak `lr` with linear warmup over `warmup` updates, then 1/sqrt decay after
        `decay` updates (early updates learn fast, later ones settle instead of random-walking at full
        size), times its adaptive-KL scale."""
        cfg, u = self.cfg, self.updates + 1
        schedule = min(1.0, u / max(cfg.warmup, 1))
        if cfg.decay > 0:
            schedule *= min(1.0, (cfg.decay / u) ** 0.5)
        return self.lr * schedule * self.lr_scale

    def _adapt_lr(self) -> None:
        """Adaptive-KL rule of PPO (Schulman et al. 2017), per agent: an agent whose policy moved more
        than 2x target_kl steps at 1/1.5 the rate, less than target_kl/2 at 1.5x, never above `lr`.
        It keeps a large step from tipping a policy into an input-blind one (a constant logit shift
        that swamps the small residual stream of a random-init base)."""
        if self.cfg.target_kl <= 0:
            return
        kl, target = self.kl, self.cfg.target_kl
        known = torch.isfinite(kl)
        self.lr_scale = torch.where(known & (kl > 2 * target), self.lr_scale / 1.5, self.lr_scale)
        self.lr_scale = torch.where(known & (kl < target / 2), (self.lr_scale * 1.5).clamp(max=1.0), self.lr_scale)
        self.lr_scale = self.lr_scale.clamp(min=1e-3)

    @torch.no_grad()
    def _restore_non_finite(self, active: torch.Tensor) -> None:
        ok = torch.ones(self.n, dtype=torch.bool, device=active.device)
        for p in self.params:
            ok &= torch.isfinite(p).flatten(1).all(1)
        for agent in (~ok).nonzero().flatten().tolist():
            for p, good in zip(self.params, self.good):
                p[agent] = good[agent]
            self.opt.reset([agent])
            self.restored += 1
            log.warning("update %d: adapter %d had non-finite weights; restored its last good copy", self.updates, agent)
        keep = (ok & active).view(-1)
        for p, good in zip(self.params, self.good):
            good[keep] = p[keep]
        self.opt.zero_grad()

    # ---- state -----------------------------------------------------------------------------------
    def _own_state(self) -> dict[str, torch.Tensor]:
        """The learner's state besides the optimizer's, as live tensors (the buffers are views of its
        numpy arrays, so copying into them loads them)."""
        out = {f"good.{i}": good for i, good in enumerate(self.good)}
        out.update({f"buffer.{name}": torch.from_numpy(getattr(self, name)) for name in BUFFERS})
        out.update({"agent.lr_scale": self.lr_scale, "agent.kl": self.kl,
                    "counters": torch.tensor([self.t, self.updates, self.skipped, self.restored])})
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the learner's state: the optimizer's ("adam.*"), the last good weights, the
        experience buffers, the per-agent adaptive-step state and the counters."""
        own = {k: t.detach().clone() for k, t in self._own_state().items()}
        return {**{f"adam.{k}": t for k, t in self.opt.state_dict().items()}, **own}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a `state_dict()` (all checked before anything is changed)."""
        own = self._own_state()
        check_state({k: t for k, t in tensors.items() if not k.startswith("adam.")}, own, "learner")
        self.opt.load_state_dict({k[len("adam."):]: t for k, t in tensors.items() if k.startswith("adam.")})
        for k, t in own.items():
            if k != "counters":
                t.copy_(tensors[k])
        self.t, self.updates, self.skipped, self.restored = (int(x) for x in tensors["counters"])

    def nbytes(self) -> dict[str, int]:
        """Bytes of the optimizer state (moments, good copies) and the experience buffers."""
        buffers = sum(a.nbytes for a in (self.context, self.action, self.reward, self.logprob, self.valid, self.done))
        good = sum(t.numel() * t.element_size() for t in self.good)
        return {"optimizer": self.opt.nbytes() + good, "buffers": buffers}
