"""`--env text`: the original design's offline self-evolution over a local knowledge base. Every agent's
adapter fine-tunes for a cycle on passages of `--data-dir` (h2q.data.load_corpus / get_batch), and its
fitness is minus its bits per byte on held-out text.

All agents train in one batched forward/backward: a batch holds `batch` windows per agent, row b bound
to bank slot b // batch (AdapterBank.bind, BGMV-style), and the loss is the sum over agents of each
agent's mean cross-entropy, so a slot's gradient is exactly that of its own loss. The optimizer is
h2q/optim.py's `BankAdamW` over the bank: every slot steps at its agent's own learning rate, which PBT
changes between cycles, and a replaced agent's moments and step count start over.

Evaluation uses fixed held-out windows (evenly spaced over the validation split, the same every cycle),
each replicated once per agent, so agents compare on identical text; the base alone (slot -1) gives
the reference `base_bpb`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from h2q import data
from h2q.config import check_options, option
from h2q.errors import H2QError
from h2q.evolve.evolution import Agent, Evaluation
from h2q.lora import AdapterBank
from h2q.optim import BankAdamW

EVAL_CHUNK = 4  # held-out windows per forward (times the number of agents in rows)


@dataclass
class TextConfig:
    data_dir: str | None = option(None, "text env: folder of text (none = the default corpus of this Python installation)")
    data_root: str = option("data", "text env: where prepared corpora are cached")
    text_batch: int = option(2, "text env: passages per agent per step", at_least=1)
    text_block: int = option(128, "text env: passage length in bytes", at_least=1)
    eval_windows: int = option(16, "text env: held-out passages every agent is scored on", at_least=1)
    weight_decay: float = option(0.0, "text env: AdamW decoupled weight decay of the adapters", at_least=0)

    def __post_init__(self):
        check_options(self)


class TextEnv:
    """The text environment of one process over its bank of agents: corpus, optimizer, fixed
    held-out windows and the base's own score."""

    per_agent_temperature = False  # nothing is sampled: PBT explores learning rates only

    def __init__(self, model, bank: AdapterBank, cfg: TextConfig, device, log=print):
        if cfg.text_batch < 1 or cfg.eval_windows < 1:
            raise H2QError("--text-batch and --eval-windows must be >= 1")
        self.model, self.bank, self.cfg, self.device = model, bank, cfg, device
        self.block = min(cfg.text_block, model.config.context_len)
        self.corpus = data.load_corpus(cfg.data_dir, self.block, root=cfg.data_root, log=log)
        self.optimizer = BankAdamW(bank.parameters(), betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.eval_count = min(EVAL_CHUNK * math.ceil(cfg.eval_windows / EVAL_CHUNK), len(self.corpus.val) - self.block)
        self.base_bpb = float(self._bpb(None, 1)[0])

    def ticks(self, steps: int, learns: bool) -> int:
        """Progress units of one cycle: optimizer steps plus evaluation forwards."""
        return steps * learns + math.ceil(self.eval_count / EVAL_CHUNK)

    def live(self, agents: list[Agent], steps: int, seed: int, tick) -> dict[str, np.ndarray]:
        """`steps` batched AdamW steps for every agent, each at its own lr; -> mean training loss
        (nats per byte) per agent."""
        bank, b = self.bank, self.cfg.text_batch
        n = bank.n
        generator = torch.Generator().manual_seed(seed)
        index = torch.arange(n, device=self.device).repeat_interleave(b)  # (n * b,): row -> slot
        lrs = torch.tensor([a.lr for a in agents], dtype=torch.float32)
        total = torch.zeros(n, dtype=torch.float64)
        bank.train()
        for _ in range(steps):
            x, y = data.get_batch(self.corpus.train, n * b, self.block, generator, self.device)  # (n*b, T)
            logits = self.model(x, adapters=bank.bind(index))  # (n*b, T, V)
            per_row = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            per_agent = per_row.view(n, b * self.block).mean(1)  # (n,)
            per_agent.sum().backward()
            self.optimizer.step(lrs)
            self.optimizer.zero_grad()
            total += per_agent.detach().double().cpu()
            tick()
        bank.eval()
        return {"train_loss": (total / max(steps, 1)).numpy()}

    def evaluate(self, agents: list[Agent], seed: int, tick) -> Evaluation:
        """Fitness = minus held-out bits per byte, on the same windows for every agent and cycle."""
        bpb = self._bpb(self.bank, self.bank.n, tick)
        return Evaluation(fitness=-bpb, per_agent={"bpb": bpb}, totals={}, references={"base_bpb": self.base_bpb})

    @torch.no_grad()
    def _bpb(self, bank: AdapterBank | None, n: int, tick=None) -> np.ndarray:
        """Bits per byte of every slot of `bank` (or of the base alone, n = 1) on the held-out windows."""
        nats = torch.zeros(n, dtype=torch.float64)
        count = 0
        starts = data.eval_window_starts(len(self.corpus.val), self.block, self.eval_count)
        for i in range(0, self.eval_count, EVAL_CHUNK):
            x, y = data.windows_to_batch(self.corpus.val, starts[i:i + EVAL_CHUNK], self.block, self.device)  # (w, T)
            w = x.shape[0]
            x, y = x.repeat(n, 1), y.repeat(n, 1)  # (n * w, T): agent-major
            slots = torch.arange(n, device=self.device).repeat_interleave(w)
            logits = self.model(x, adapters=bank.bind(slots) if bank is not None else None)  # (n * w, T, V)
            per_row = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nats += per_row.view(n, w * self.block).sum(1).double().cpu()  # (n,)
            count += w * self.block
            if tick is not None:
                tick()
        return (nats / count / math.log(2)).numpy()

    def reset_slots(self, slots) -> None:
        self.optimizer.reset(slots)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state_dict()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(tensors)
