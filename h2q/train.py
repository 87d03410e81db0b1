"""The training loop: base model pre-training, or adapter-only fine-tuning of a frozen base.

A flat loop in nanoGPT `train.py`'s shape (batch, eval, lr schedule, micro-steps, clip, step, one log
line), but importable and testable: `train(TrainConfig(...))` runs it, `python train.py` maps flags
onto the same dataclass. AdamW with decay on matrices only, linear warmup then cosine decay to 10%,
gradient clipping at 1.0, bf16 autocast on CUDA (fp32 on CPU, where bf16 matmul is far slower).

Stopping rule: `--steps`, else `--epochs` (passes over the train bytes), else `--time-budget` minutes:
the first steps are timed and the step count that fits the budget is fixed then, so the schedule (and
resume) stays deterministic. Checkpoints (h2q/checkpoint.py) every `--save-every` steps, at the end
and on Ctrl-C; `--resume` restores weights, optimizer, RNG and data-sampler states and continues
exactly where the saved run was. Under `torchrun` it runs data-parallel (DDP): every rank samples its
own batches, rank 0 alone writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from h2q import checkpoint, data
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, resolve_device, run_main
from h2q.config import PRESETS, check_options, option
from h2q.errors import H2QError
from h2q.model import Transformer
from h2q.optim import torch_state_from_tensors, torch_state_to_tensors


@dataclass
class TrainConfig:
    data_dir: str | None = option(None, "folder of text files; none = the default corpus built from this Python installation")
    data_root: str = option("data", "where prepared corpora are cached")
    out: str | None = option(None, "output folder (default checkpoints/base, or checkpoints/adapters/lora for --lora-rank)")
    preset: str = option("auto", "model size; auto: base on CUDA, mini on CPU (what learns most in a CPU budget)",
                         choices=["auto", *PRESETS])
    steps: int = option(0, "optimizer steps to run (0 = use --epochs or --time-budget)", at_least=0)
    epochs: float = option(0.0, "passes over the train split (0 = use --steps or --time-budget)", at_least=0)
    time_budget: float = option(15.0, "wall-clock minutes when neither --steps nor --epochs is set", above=0)
    batch_size: int = option(8, "sequences per micro-step", at_least=1)
    block_size: int = option(0, "sequence length (0 = the model's context length)", at_least=0)
    grad_accum: int = option(1, "micro-steps per optimizer step", at_least=1)
    lr: float = option(2e-3, "peak learning rate", above=0, at_most=10)
    min_lr_frac: float = option(0.1, "cosine decays to lr * this", at_least=0, at_most=1)
    warmup: int = option(50, "linear warmup steps", at_least=0)
    weight_decay: float = option(0.1, "AdamW decay on weight matrices only", at_least=0)
    beta2: float = option(0.99, "AdamW beta2 (0.99 suits small batches)", at_least=0, below=1)
    grad_clip: float = option(1.0, "clip gradient norm to this (0 = off)", at_least=0)
    eval_every: int = option(100, "evaluate every N steps", at_least=1)
    eval_batches: int = option(16, "validation batches per evaluation", at_least=1)
    save_every: int = option(200, "checkpoint every N steps", at_least=1)
    device: str = option("auto", "auto, cpu or cuda")
    dtype: str = option("auto", "autocast dtype: auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16",
                        choices=["auto", "float32", "bfloat16"])
    compile: bool = option(False, "torch.compile the model")
    seed: int = option(1337, "random seed", at_least=0, below=2**63)
    resume: bool = option(False, "continue the run saved in --out")
    init_from: str | None = option(None, "base checkpoint to fine-tune an adapter on (with --lora-rank)")
    lora_rank: int = option(0, "train only a LoRA adapter of this rank on a frozen --init-from base (0 = off)",
                            at_least=0)
    lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha/r)", above=0)
    progress: bool = option(True, "show the progress bar")

    def __post_init__(self):
        check_options(self)


def pick_preset(device: torch.device) -> str:
    """The preset that learns most in the budget, by scripts/bench_train.py: on CUDA the `base` model;
    on CPU `mini`. Measured on 2 cores with a 5-minute budget: mini 1.85 vs small 2.56 val bits per
    byte (mini runs 5x the tokens per second); a 15-minute budget gives mini ~16 tokens per parameter,
    small ~0.5, so small only pays off after hours (pass --preset small for such runs)."""
    return "base" if device.type == "cuda" else "mini"


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup, then cosine decay from lr to lr * min_lr_frac at max_steps."""
    warmup = min(cfg.warmup, max(max_steps // 10, 1))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, device) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


@torch.no_grad()
def evaluate(model, split, cfg: TrainConfig, block_size: int, device, autocast, adapters=None) -> float:
    """Mean cross-entropy (nats per byte) over evenly spaced validation windows."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in data.iter_eval_batches(split, cfg.batch_size, block_size, cfg.eval_batches):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x, adapters=adapters)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    model.train(was_training)
    return sum(losses) / len(losses)


class Run:
    """Everything a training run holds: the model (and adapter), optimizer, sampler, position."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.out = Path(cfg.out or ("checkpoints/adapters/lora" if cfg.lora_rank else "checkpoints/base"))
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and world_size > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
        torch.manual_seed(cfg.seed)
        self.adapter = None
        if cfg.lora_rank > 0:
            self._init_adapter()
        else:
            if cfg.init_from:
                raise H2QError("--init-from fine-tunes an adapter: also give --lora-rank R (e.g. 8)")
            preset = cfg.preset if cfg.preset != "auto" else pick_preset(self.device)
            self.model = Transformer(PRESETS[preset]).to(self.device)
            self.trainable = self.model
        self.block_size = cfg.block_size or self.model.config.context_len
        if self.block_size > self.model.config.context_len:
            raise H2QError(f"--block-size {self.block_size} exceeds the model's context {self.model.config.context_len}")
        self.corpus = data.load_corpus(cfg.data_dir, self.block_size, root=cfg.data_root,
                                       log=print if rank == 0 else (lambda *a, **k: None))
        self.optimizer = make_optimizer(list(self.trainable.named_parameters()), cfg, self.device)
        self.sampler = torch.Generator().manual_seed(cfg.seed + rank)
        self.step, self.max_steps, self.tokens_seen, self.elapsed = 0, 0, 0, 0.0

    def _init_adapter(self):
        from h2q import lora
        cfg = self.cfg
        if not cfg.init_from:
            raise H2QError("--lora-rank trains an adapter on a frozen base: also give --init-from checkpoints/base")
        if self.out.resolve() == checkpoint.resolve_model_file(cfg.init_from).parent.resolve():
            raise H2QError("--out must differ from the --init-from base folder (e.g. checkpoints/adapters/NAME)")
        self.model, _ = checkpoint.load_model(cfg.init_from, self.device)
        lora.freeze_base(self.model)
        self.adapter = lora.LoraAdapter(self.model, lora.LoraConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha)).to(self.device)
        self.trainable = self.adapter

    def forward_module(self):
        """What the loop calls: the (possibly DDP-wrapped, compiled) trainable forward."""
        model = torch.compile(self.model) if self.cfg.compile else self.model
        if self.world_size > 1 and self.adapter is None:
            from torch.nn.parallel import DistributedDataParallel
            return DistributedDataParallel(model)
        return model

    # -- checkpoints ------------------------------------------------------------------------------
    def state_tensors(self, sampler_states: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """The run's tensors for the training state file, and the optimizer's param groups as JSON."""
        tensors = {f"model.{k}": v for k, v in self.trainable.state_dict().items()}
        optim, param_groups = torch_state_to_tensors(self.optimizer.state_dict())
        tensors.update({f"optim.{k}": v for k, v in optim.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        for r, s in enumerate(sampler_states):
            tensors[f"rng.sampler.{r}"] = s
        return tensors, param_groups

    def save(self):
        states = [self.sampler.get_state()]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, self.sampler.get_state())
        if self.rank != 0:
            return
        tensors, param_groups = self.state_tensors(states)
        meta = {"step": str(self.step), "max_steps": str(self.max_steps), "tokens_seen": str(self.tokens_seen),
                "elapsed": repr(self.elapsed), "world_size": str(self.world_size),
                "param_groups": param_groups, "train_config": json.dumps(asdict(self.cfg)),
                "model_config": json.dumps(self.model.config.to_dict())}
        checkpoint.save_tensors(self.out / checkpoint.STATE_FILE, tensors, meta)
        if self.adapter is not None:
            checkpoint.save_adapter(self.out, self.adapter, self.model)
        else:
            checkpoint.save_model(self.out, self.model, step=str(self.step))

    def load(self):
        path = self.out / checkpoint.STATE_FILE
        if not path.exists():
            raise H2QError(f"--resume: no training state in {self.out}; start without --resume")
        tensors, meta = checkpoint.read_tensors(path, "training state")
        if json.loads(meta["model_config"]) != self.model.config.to_dict():
            raise H2QError(f"--resume: {path} holds a {meta['model_config']} model; pass the same --preset")
        if int(meta["world_size"]) != self.world_size:
            raise H2QError(f"--resume: the run used {meta['world_size']} processes; resume with as many")
        own = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.trainable.load_state_dict(own)
        optim = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        self.optimizer.load_state_dict(torch_state_from_tensors(optim, meta["param_groups"]))
        torch.set_rng_state(tensors["rng.torch"])
        self.sampler.set_state(tensors[f"rng.sampler.{self.rank}"])
        self.step, self.max_steps = int(meta["step"]), int(meta["max_steps"])
        self.tokens_seen, self.elapsed = int(meta["tokens_seen"]), float(meta["elapsed"])

    def log_metrics(self, record: dict):
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def fixed_max_steps(cfg: TrainConfig, train_bytes: int, tokens_per_step: int) -> int:
    """Steps from --steps or --epochs; 0 means 'decide from the time budget'."""
    if cfg.steps > 0:
        return cfg.steps
    if cfg.epochs > 0:
        return max(1, int(cfg.epochs * train_bytes / tokens_per_step))
    return 0


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Run training as configured; returns the run summary (also written to OUT/training_log.json).
    `on_step(step, loss)` is called after every optimizer step (tests use it to interrupt)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolve_device(cfg.device).type == "cuda" else "gloo")
    run = Run(cfg, rank, world_size)
    if cfg.resume:
        run.load()
    elif rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "metrics.jsonl").unlink(missing_ok=True)
    model = run.forward_module()
    run.trainable.train()
    tokens_per_step = cfg.batch_size * run.block_size * cfg.grad_accum * world_size
    run.max_steps = run.max_steps or fixed_max_steps(cfg, len(run.corpus.train), tokens_per_step)
    timing_steps = 5  # steps timed before a time budget is turned into a step count
    if rank == 0:
        n_params = run.model.num_params()
        what = f"adapter ({sum(p.numel() for p in run.trainable.parameters()):,} params) on" if run.adapter else "model"
        print(f"training {what} {n_params:,} params on {run.device} | {len(run.corpus.train):,} train bytes, "
              f"{len(run.corpus.val):,} val bytes | {tokens_per_step:,} tokens/step")
    bar = tqdm(total=run.max_steps or None, initial=run.step, disable=rank != 0 or not cfg.progress,
               unit="step", dynamic_ncols=True)
    t_start, t_last, loss_sum, loss_n, last_eval = time.time(), time.time(), 0.0, 0, None
    elapsed_at_start, interrupted = run.elapsed, False
    adapters = run.adapter
    try:
        while run.max_steps == 0 or run.step < run.max_steps:
            if run.max_steps == 0 and run.step >= timing_steps:
                per_step = (time.time() - t_start) / timing_steps
                budget_steps = int(cfg.time_budget * 60 / per_step)
                if world_size > 1:
                    shared = torch.tensor([budget_steps], device=run.device)
                    dist.broadcast(shared, 0)
                    budget_steps = int(shared.item())
                run.max_steps = max(budget_steps, run.step + 1)
                bar.total = run.max_steps
                bar.refresh()
            lr = lr_at(run.step, cfg, run.max_steps or 10 * cfg.warmup)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                x, y = data.get_batch(run.corpus.train, cfg.batch_size, run.block_size, run.sampler, run.device)
                sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                with (nullcontext() if sync else model.no_sync()), run.autocast:
                    logits = model(x, adapters=adapters)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / cfg.grad_accum).backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.trainable.parameters(), cfg.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.tokens_seen += tokens_per_step
            loss_value = loss.item()
            loss_sum, loss_n = loss_sum + loss_value, loss_n + 1
            now = time.time()
            run.elapsed = elapsed_at_start + now - t_start
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
            done = run.max_steps and run.step >= run.max_steps
            if run.step % cfg.eval_every == 0 or done:
                val_loss = evaluate(run.model, run.corpus.val, cfg, run.block_size, run.device, run.autocast, adapters)
                last_eval = {"step": run.step, "tokens": run.tokens_seen, "elapsed_s": round(run.elapsed, 2),
                             "lr": lr, "train_loss": loss_sum / loss_n, "val_loss": val_loss,
                             "val_bpb": val_loss / math.log(2), "val_ppl": math.exp(val_loss),
                             "tokens_per_s": run.tokens_seen / max(run.elapsed, 1e-9)}
                run.log_metrics(last_eval)
                loss_sum, loss_n = 0.0, 0
                if rank == 0:
                    bar.write(f"step {run.step}: train {last_eval['train_loss']:.4f} | val {val_loss:.4f} "
                              f"| {last_eval['val_bpb']:.4f} bits/byte | {last_eval['tokens_per_s']:,.0f} tok/s")
            if run.step % cfg.save_every == 0 and not done:
                run.save()
            if on_step is not None:
                on_step(run.step, loss_value)
    except KeyboardInterrupt:
        interrupted = True
        if rank == 0:
            bar.write(f"interrupted at step {run.step}: saving a checkpoint; continue with --resume")
    bar.close()
    run.save()
    summary = {"out": str(run.out), "interrupted": interrupted, "steps": run.step, "max_steps": run.max_steps,
               "tokens_seen": run.tokens_seen, "elapsed_s": round(run.elapsed, 2), "world_size": world_size,
               "params": run.model.num_params(), "model_config": run.model.config.to_dict(),
               "train_config": asdict(cfg), "device": str(run.device), "final": last_eval}
    if rank == 0:
        checkpoint.atomic_write_json(run.out / "training_log.json", summary)
    return summary


def main(argv=None) -> int:
    parser = Parser(prog="train.py", description="Train the byte-level base model, or a "
                                     "LoRA adapter on a frozen base (--init-from BASE --lora-rank R).")
    add_dataclass_flags(parser, TrainConfig)
    summary = train(dataclass_from_args(TrainConfig, parser.parse_args(argv)))
    if summary["final"]:
        print(f"done: {summary['steps']} steps, val {summary['final']['val_bpb']:.4f} bits/byte, saved to {summary['out']}")
    return 130 if summary["interrupted"] else 0


def cli():
    sys.exit(run_main(main))
