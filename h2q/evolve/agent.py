"""The agents' policy: n LoRA adapters (one `AdapterBank`) on one frozen byte-level base, deciding for
every living agent in one batched forward.

Decision path (`AgentPolicy.act`): the shared instruction (`PREFIXES`, one per world level) is run through the base once, into a
batch-1 KV cache that every forward reuses (kvcache prefix sharing; the prefix is the base's own
encoding, no adapter touches it, so one copy serves all agents and all adapter updates). Each agent's
observation bytes (fixed width per world level, h2q/evolve/world.py) are its row of one (n_alive, obs_len) forward;
row b runs with adapter `slots[agent b]` (the bank's per-row index, Punica-style), no Python loop
over agents. The last position's logits, restricted to the world's action bytes and divided by the
temperature, are sampled with `h2q.generate.sample_next`; temperature 0 acts greedily.

Memory (`memory=K`): each agent's recent history stays in its own KV cache, so a step feeds only
its new bytes: the previous action, a newline, the new observation. `kv` picks the cache policy:
`window` (StreamingLLM: the prefix as sinks plus exactly the last K lines, positions re-ranked) or
`full`/`int8` (KIVI int8 keys/values after each 32-token group, prefix shared): these keep between K
and 2K lines, and when full they are rewound and the last K lines fed again in one forward. Dead
agents ride along as PAD. History keys/values were computed at their own step, with that step's
adapter (and, for `window`, with older lines still in view); the learner recomputes each decision's
context from its bytes with the current adapter, and PPO's ratio absorbs the small difference.
Memories last one episode (`reset` empties them), so evolve's state at a cycle boundary holds none;
`state_dict()`/`load_state_dict()` snapshot an episode in progress, memory cache included.

Every decision leaves `last_context` (the exact bytes the row decided on after the prefix,
left-padded with PAD) and `last_logprob`, which the learner stores and trains on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from h2q.config import check_options, option
from h2q.errors import ConfigError, H2QError
from h2q.evolve.world import ACTIONS, OBS_LEN
from h2q.generate import sample_next
from h2q.kvcache import make_cache
from h2q.lora import AdapterBank, LoraConfig
from h2q.model import Transformer
from h2q.tokenizer import PAD

# the shared instruction per world level, short enough for the tiny preset's 64-byte context next to
# one observation of that level
PREFIXES = {"hinted": b"Grid: NSEW move P pick D drop F eat Z wait\n", "view": b"NSEW move P pick D drop:\n"}
PREFIX = PREFIXES["hinted"]
KV_POLICIES = ("full", "int8", "window")


@dataclass
class AgentConfig:
    rank: int = option(8, "LoRA rank of every agent's adapter (all linear layers)", at_least=1)
    alpha: float = option(16.0, "LoRA alpha (update scaled by alpha/rank)", above=0)
    temperature: float = option(1.0, "sampling temperature over the 8 action bytes (0 = greedy)", at_least=0,
                                at_most=100)
    memory: int = option(0, "past (observation, action) lines each agent keeps in its KV cache", at_least=0)
    kv: str = option("window", "cache policy of the memory", choices=list(KV_POLICIES))
    seed: int = option(0, "seed of the adapters' init and of action sampling", at_least=0, below=2**63)

    def __post_init__(self):
        check_options(self)

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.rank, alpha=self.alpha)


def make_bank(model: Transformer, n_agents: int, cfg: AgentConfig) -> AdapterBank:
    """A fresh bank of n adapters (B = 0: every agent starts as the base) on the model's device."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return AdapterBank(model, cfg.lora(), n_agents, generator=generator)


class AgentPolicy:
    """n agents: agent i acts with adapter `slots[i]` of `bank` on `model` (by default one agent per
    slot; `slots` may repeat one, e.g. one agent scored in 32 worlds at once). The model is used as it
    is given; to learn (learner.py) its weights must be frozen first (h2q.lora.freeze_base), as
    evolve's base is."""

    def __init__(self, model: Transformer, bank: AdapterBank, cfg: AgentConfig = AgentConfig(),
                 prefix: bytes = PREFIX, obs_len: int = OBS_LEN, slots=None, actions: bytes = ACTIONS):
        self.model = model
        weight = model.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.slots = torch.arange(bank.n, device=self.device) if slots is None else \
            torch.as_tensor(list(slots), device=self.device)
        self.bank, self.cfg, self.n = bank, cfg, len(self.slots)
        # any world's action bytes (env.action_bytes); the last one is the no-op the dead take, as the
        # grid's `Z` wait
        self.actions, self.idle = actions, len(actions) - 1
        self.action_ids = torch.tensor(list(actions), device=self.device)
        self.obs_len, self.step_len = obs_len, obs_len + 2  # a memory step: previous action, b"\n", observation
        self.prefix_len = len(prefix)
        self.prefix_ids = torch.tensor([list(prefix)], device=self.device)  # (1, P)
        self.prefix_cache = make_cache("full", model.config, 1, self.prefix_len, self.device, self.dtype)
        with torch.no_grad():
            model(self.prefix_ids, cache=self.prefix_cache)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        K = cfg.memory
        # bytes after the prefix a decision can see: window K past steps, full/int8 up to 2K
        self.context_width = obs_len if K == 0 else (K + 1 if cfg.kv == "window" else 2 * K + 1) * self.step_len
        if self.prefix_len + self.context_width > model.config.context_len:
            raise ConfigError("memory", f"of {K} lines ({self.context_width} bytes) and the prefix ({self.prefix_len}) "
                                        f"exceed the base's context of {model.config.context_len}; use fewer lines")
        self.reset(self.n)

    # ---- one forward for many rows ---------------------------------------------------------------
    def action_logits(self, ids: torch.Tensor, agents, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Context bytes after the prefix, (B, T) ids left-padded with PAD where `valid` (B, T) is
        False, for agents `agents` (B,) -> raw logits of the action bytes at the last position, (B, A).
        Differentiable in the bank's tensors."""
        B, T = ids.shape
        cache = make_cache("full", self.model.config, B, T, self.device, self.dtype, prefix=self.prefix_cache)
        cache.set_pad_mask(valid)
        rows = self.slots[torch.as_tensor(agents, device=self.device)]
        logits = self.model(ids.to(self.device), cache=cache, adapters=self.bank.bind(rows))  # (B, T, V)
        return logits[:, -1, self.action_ids].float()

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw action logits -> log-probabilities of the sampling policy (temperature applied)."""
        return F.log_softmax(logits / (self.cfg.temperature or 1.0), dim=-1)

    # ---- the policy protocol ---------------------------------------------------------------------
    def reset(self, n_agents: int) -> None:
        """Start an episode: forget every agent's history."""
        assert n_agents == self.n, f"policy holds {self.n} agents, the world has {n_agents}"
        self.t = 0
        self.inputs: list[np.ndarray] = []  # per step, what the memory cache was fed, (n, w) each
        self.ctx_start = 0  # first step whose input is in the memory context
        self.prev_action = np.full(self.n, self.actions[self.idle], dtype=np.uint8)
        self.last_context = np.full((self.n, self.context_width), PAD, dtype=np.int64)
        self.last_logprob = np.full(self.n, np.nan)
        self.memory_cache = None
        if self.cfg.memory:
            self.memory_cache = self._new_memory_cache()

    def act(self, obs: np.ndarray, alive: np.ndarray) -> np.ndarray:
        """(n, obs_len) observations, (n,) alive mask -> (n,) action indices (the no-op for the dead)."""
        rows = np.flatnonzero(alive)
        actions = np.full(self.n, self.idle, dtype=np.int64)
        self.last_logprob = np.full(self.n, np.nan)
        with torch.no_grad():
            if self.cfg.memory:
                logits = self._memory_step(obs, alive)[torch.as_tensor(rows, device=self.device)]
            else:
                self.last_context = obs.astype(np.int64)
                logits = self.action_logits(torch.as_tensor(self.last_context[rows]), rows) if len(rows) else None
            if len(rows):
                broken = ~torch.isfinite(logits).all(1)  # a blown-up adapter acts uniformly at random
                logits = logits.masked_fill(broken[:, None], 0.0)
                chosen = sample_next(logits, self.cfg.temperature, generator=self.generator)  # (B,)
                logprob = self.log_probs(logits).gather(1, chosen[:, None]).squeeze(1)
                logprob = logprob.masked_fill(broken, float("nan"))  # nothing to learn from those rows
                actions[rows] = chosen.cpu().numpy()
                self.last_logprob[rows] = 0.0 if self.cfg.temperature == 0 else logprob.cpu().numpy()
        self.prev_action = np.frombuffer(self.actions, dtype=np.uint8)[actions]
        self.t += 1
        return actions

    # ---- memory ----------------------------------------------------------------------------------
    def _new_memory_cache(self):
        cfg = self.model.config
        if self.cfg.kv == "window":
            cache = make_cache("window", cfg, self.n, self.prefix_len + self.context_width, self.device,
                               self.dtype, sinks=self.prefix_len)
            ids = self.prefix_ids.expand(self.n, -1)  # (n, P): the sinks, encoded by the base alone
            for start in range(0, self.prefix_len, cache.prefill_chunk):
                with torch.no_grad():
                    self.model(ids[:, start:start + cache.prefill_chunk], cache=cache)
            return cache
        return make_cache(self.cfg.kv, cfg, self.n, self.context_width, self.device, self.dtype,
                          prefix=self.prefix_cache)

    def _memory_step(self, obs: np.ndarray, alive: np.ndarray) -> torch.Tensor:
        """Feed this step's bytes to every row's memory cache -> raw action logits (n, A)."""
        K, cache = self.cfg.memory, self.memory_cache
        step_input = obs if self.t == 0 else np.concatenate(
            [self.prev_action[:, None], np.full((self.n, 1), ord("\n"), dtype=np.uint8), obs], axis=1)
        self.inputs.append(step_input)
        if self.cfg.kv == "window":
            self.ctx_start = max(0, self.t - K)  # the window holds exactly the last K steps' inputs
            feed = step_input
        elif cache.length + step_input.shape[1] > cache.max_len:
            cache.truncate(0)  # full: keep the last K lines only, fed again in one forward
            self.ctx_start = self.t - K
            feed = np.concatenate(self.inputs[self.ctx_start:], axis=1)
        else:
            feed = step_input
        context = np.concatenate(self.inputs[self.ctx_start:], axis=1)  # (n, w)
        self.last_context = np.full((self.n, self.context_width), PAD, dtype=np.int64)
        self.last_context[:, -context.shape[1]:] = context
        valid = torch.as_tensor(alive, device=self.device)[:, None].expand(self.n, feed.shape[1])  # (n, T)
        ids = torch.as_tensor(feed.astype(np.int64), device=self.device).masked_fill(~valid, PAD)
        cache.set_pad_mask(valid)
        logits = self.model(ids, cache=cache, adapters=self.bank.bind(self.slots))  # (n, T, V)
        return logits[:, -1, self.action_ids].float()

    # ---- state: an episode's memories, mid-episode ------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of what the policy carries between two `act` calls of an episode: the step counters,
        every input the memory was fed, the previous actions, the last decision's context and
        log-probabilities, the sampling generator and the memory cache (`memory.NAME`; its counters
        in `memory_counters`, sorted by name). `reset` empties all of it."""
        state = {"counters": torch.tensor([self.t, self.ctx_start]),
                 "inputs": torch.from_numpy(np.concatenate([np.zeros((self.n, 0), np.uint8), *self.inputs], axis=1)),
                 "prev_action": torch.from_numpy(self.prev_action.copy()),
                 "last_context": torch.from_numpy(self.last_context.copy()),
                 "last_logprob": torch.from_numpy(self.last_logprob.copy()),
                 "generator": self.generator.get_state()}
        if self.memory_cache is not None:
            cache = self.memory_cache.state_dict()
            state["memory_counters"] = torch.tensor([cache["counters"][k] for k in sorted(cache["counters"])])
            state.update({f"memory.{k}": t for k, t in cache["tensors"].items()})
        return state

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a `state_dict()` of a policy made alike (same agents, memory and cache policy); the
        policy continues the episode as the saved one would. H2QError, nothing changed, if it does
        not fit."""
        t, ctx_start = (int(x) for x in tensors.get("counters", torch.zeros(2)))
        width = 0 if not self.cfg.memory or t == 0 else self.obs_len + (t - 1) * self.step_len
        expected = {"counters": (2,), "inputs": (self.n, width), "prev_action": (self.n,),
                    "last_context": (self.n, self.context_width), "last_logprob": (self.n,),
                    "generator": tuple(self.generator.get_state().shape)}
        cache = self._new_memory_cache() if self.cfg.memory else None
        if cache is not None:
            fresh = cache.state_dict()
            counters = tensors.get("memory_counters", torch.zeros(0, dtype=torch.int64)).tolist()
            if len(counters) != len(fresh["counters"]):
                raise H2QError("agent policy state does not fit: its memory counters are not this cache's; "
                               "it was saved for another configuration")
            fresh["counters"] = dict(zip(sorted(fresh["counters"]), counters))
            fresh["tensors"] = {k.removeprefix("memory."): v for k, v in tensors.items() if k.startswith("memory.")}
            try:
                cache.load_state_dict(fresh)  # checks the counters, names, shapes and dtypes
            except H2QError as e:
                raise H2QError(f"agent policy state does not fit its memory ({e}); it was saved for another "
                               f"configuration") from None
            expected["memory_counters"] = (len(counters),)
        mine = {k: v for k, v in tensors.items() if not k.startswith("memory.")}
        if mine.keys() != expected.keys() or any(tuple(mine[k].shape) != shape for k, shape in expected.items()):
            raise H2QError(f"agent policy state does not fit (it holds {sorted(mine)} with shapes "
                           f"{[tuple(v.shape) for v in mine.values()]}); it was saved for another configuration")
        self.t, self.ctx_start, self.memory_cache = t, ctx_start, cache
        inputs = tensors["inputs"].numpy().astype(np.uint8)
        widths = [self.obs_len] + [self.step_len] * (t - 1) if width else []
        self.inputs = np.split(inputs, np.cumsum(widths)[:-1], axis=1) if widths else []
        self.prev_action = tensors["prev_action"].numpy().astype(np.uint8).copy()
        self.last_context = tensors["last_context"].numpy().astype(np.int64).copy()
        self.last_logprob = tensors["last_logprob"].numpy().astype(np.float64).copy()
        self.generator.set_state(tensors["generator"].to(torch.uint8).cpu())

    # ---- accounting ------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        """Bytes held: the base's weights, the adapters, the shared prefix cache, the memory caches."""
        base = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        bank = sum(p.numel() * p.element_size() for p in self.bank.parameters())
        memory = self.memory_cache.nbytes if self.memory_cache is not None else 0
        return {"base": base, "adapters": bank, "prefix_cache": self.prefix_cache.nbytes, "memory_cache": memory}
