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

Guards (the "output folder and resume" section): rank 0 holds OUT's lock for the run and removes the
temporary files a killed writer left; OUT never holds files of another kind (a LoRA run does not
write into a model folder, nor a base run into an adapter folder or an evolve run). `--resume` checks
the saved state before it loads it: a training state (not another file), the same model shape, the
same base (its fingerprint) for an adapter, and the same run-shaping flags (`RESUME_MAY_CHANGE` lists
the ones that may differ); it drops metrics records a kill left past the saved step, and a finished
run resumes to nothing, its files untouched. A loss that goes non-finite stops the run with one line,
and no weights that are not finite are ever saved, so OUT keeps the last finite checkpoint. A batch
whose logits alone would not fit in memory is refused before anything is allocated.
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
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, flag_name, resolve_device, run_main
from h2q.config import PRESETS, check_options, option
from h2q.errors import ConfigError, FileFormatError, H2QError
from h2q.model import Transformer
from h2q.optim import torch_state_from_tensors, torch_state_to_tensors
from h2q.perf import device_memory


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
        if self.steps and self.epochs:
            raise ConfigError("epochs", f"{self.epochs:g} and --steps {self.steps} both set the run's length; give one")


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
        self.out = output_folder(cfg)
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
        check_memory(cfg, self.block_size, self.model.config.vocab_size, self.device)
        self.corpus = data.load_corpus(cfg.data_dir, self.block_size, root=cfg.data_root,
                                       log=print if rank == 0 else (lambda *a, **k: None))
        self.optimizer = make_optimizer(list(self.trainable.named_parameters()), cfg, self.device)
        self.sampler = torch.Generator().manual_seed(cfg.seed + rank)
        self.step, self.max_steps, self.tokens_seen, self.elapsed = 0, 0, 0, 0.0
        self.saved_step = 0  # the step of the checkpoint in OUT (0: none yet)

    def _init_adapter(self):
        from h2q import lora
        cfg = self.cfg
        if not cfg.init_from:
            raise H2QError("--lora-rank trains an adapter on a frozen base: also give --init-from checkpoints/base")
        if self.out.resolve() == checkpoint.resolve_model_file(cfg.init_from).parent.resolve():
            raise H2QError("--out must differ from the --init-from base folder (e.g. checkpoints/adapters/NAME)")
        self.model, _ = checkpoint.load_model(cfg.init_from, self.device)
        lora.check_rank(self.model.config, cfg.lora_rank)
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
        if not all(bool(torch.isfinite(p.sum(dtype=torch.float64))) for p in self.trainable.parameters()):
            raise self.diverged("the weights are no longer finite")
        tensors, param_groups = self.state_tensors(states)
        meta = {"step": str(self.step), "max_steps": str(self.max_steps), "tokens_seen": str(self.tokens_seen),
                "elapsed": repr(self.elapsed), "world_size": str(self.world_size),
                "param_groups": param_groups, "train_config": json.dumps(asdict(self.cfg)),
                "model_config": json.dumps(self.model.config.to_dict())}
        if self.adapter is not None:
            meta["base_fingerprint"] = self.model.base_fingerprint()
        checkpoint.save_tensors(self.out / checkpoint.STATE_FILE, tensors, meta)
        if self.adapter is not None:
            checkpoint.save_adapter(self.out, self.adapter, self.model)
        else:
            checkpoint.save_model(self.out, self.model, step=str(self.step))
        self.saved_step = self.step

    def diverged(self, what: str) -> H2QError:
        kept = f"{self.out} keeps the checkpoint of step {self.saved_step}" if self.saved_step else "nothing was saved"
        return H2QError(f"training diverged at step {self.step}: {what} (try a lower --lr than {self.cfg.lr:g}); "
                        f"{kept}")

    def load(self):
        path = self.out / checkpoint.STATE_FILE
        tensors, meta = checkpoint.read_tensors(path, "training state")
        check_resumable(self, path, meta)
        own = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        fix = "restore it, or start without --resume in another --out"
        checkpoint.check_tensors(own, self.trainable.state_dict(), path, fix)
        self.trainable.load_state_dict(own)
        optim = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        try:
            self.optimizer.load_state_dict(torch_state_from_tensors(optim, meta["param_groups"]))
            torch.set_rng_state(tensors["rng.torch"])
            self.sampler.set_state(tensors[f"rng.sampler.{self.rank}"])
            self.step, self.max_steps = int(meta["step"]), int(meta["max_steps"])
            self.tokens_seen, self.elapsed = int(meta["tokens_seen"]), float(meta["elapsed"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise FileFormatError(f"{path}: its optimizer, random or step state is unusable ({e}); {fix}") from None
        self.saved_step = self.step

    def log_metrics(self, record: dict):
        if self.rank == 0:
            checkpoint.append_jsonl(self.out / "metrics.jsonl", record)

    def drop_metrics_after_step(self):
        """Forget the metrics records (and a torn last line) that a kill left past the saved step."""
        path = self.out / "metrics.jsonl"
        if self.rank == 0 and path.exists():
            kept = [line for line, record in checkpoint.read_jsonl_lines(path)
                    if not isinstance(record.get("step"), (int, float)) or record["step"] <= self.step]
            checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))


def fixed_max_steps(cfg: TrainConfig, train_bytes: int, tokens_per_step: int) -> int:
    """Steps from --steps or --epochs; 0 means 'decide from the time budget'."""
    if cfg.steps > 0:
        return cfg.steps
    if cfg.epochs > 0:
        return max(1, int(cfg.epochs * train_bytes / tokens_per_step))
    return 0


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Run training as configured; returns the run summary (also written to OUT/training_log.json).
    `on_step(step, loss)` is called after every optimizer step (tests use it to interrupt). Rank 0
    holds OUT's lock throughout."""
    if int(os.environ.get("RANK", "0")) != 0:
        return run_training(cfg, on_step)
    with open_output(cfg):
        try:
            return run_training(cfg, on_step)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
                raise H2QError(f"out of memory at --batch-size {cfg.batch_size}: lower --batch-size or --block-size "
                               f"(--grad-accum N keeps the tokens per step)") from None
            raise


def run_training(cfg: TrainConfig, on_step=None) -> dict:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolve_device(cfg.device).type == "cuda" else "gloo")
    run = Run(cfg, rank, world_size)
    if cfg.resume:
        run.load()
        if run.max_steps and run.step >= run.max_steps:
            return finished_run(run)
        run.drop_metrics_after_step()
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
            if not math.isfinite(loss_value):
                raise run.diverged(f"the training loss is {loss_value}")
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
                if not val_loss < MAX_LOSS:  # nan included
                    raise run.diverged(f"the validation loss is {val_loss:g}")
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
    summary = run_summary(run, interrupted, last_eval)
    if rank == 0:
        checkpoint.atomic_write_json(run.out / "training_log.json", summary)
    return summary


def run_summary(run: Run, interrupted: bool, final: dict | None) -> dict:
    """What OUT/training_log.json holds."""
    return {"out": str(run.out), "interrupted": interrupted, "steps": run.step, "max_steps": run.max_steps,
            "tokens_seen": run.tokens_seen, "elapsed_s": round(run.elapsed, 2), "world_size": run.world_size,
            "params": run.model.num_params(), "model_config": run.model.config.to_dict(),
            "train_config": asdict(run.cfg), "device": str(run.device), "final": final}


# -- the output folder and resume (see the module docstring) ------------------------------------------
MAX_LOSS = 700.0  # nats: above it the perplexity exp(loss) overflows a float; the run has diverged
# flags that may differ on --resume: where things are and how the run is watched, not what it computes
RESUME_MAY_CHANGE = {"out", "data_root", "preset", "init_from", "device", "dtype", "compile", "resume",
                     "progress", "eval_every", "eval_batches", "save_every"}
STATE_KEYS = ("step", "max_steps", "tokens_seen", "elapsed", "world_size", "param_groups", "train_config",
              "model_config")


def output_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.out or ("checkpoints/adapters/lora" if cfg.lora_rank else "checkpoints/base"))


def open_output(cfg: TrainConfig) -> checkpoint.FolderLock:
    """Lock OUT (made if missing) and remove stale temporary files; a fresh run refuses a folder that
    holds files of another kind, a resume one without a training state."""
    out = output_folder(cfg)
    if cfg.resume and not (out / checkpoint.STATE_FILE).is_file():
        raise H2QError(f"--resume: no training state in {out}; start without --resume")
    lock = checkpoint.FolderLock(out, "--out")
    try:
        checkpoint.remove_stale_temps(out)
        if not cfg.resume:
            refuse_other_kinds(out, cfg)
    except BaseException:
        lock.release()
        raise
    return lock


def refuse_other_kinds(out: Path, cfg: TrainConfig) -> None:
    """A fresh run writes a model (base) or an adapter (LoRA) and a training state into OUT: refuse a
    folder holding the other one, a quantized model or an evolve run, which it would leave mixed."""
    kinds = {checkpoint.MODEL_FILE: "a model checkpoint", checkpoint.ADAPTER_FILE: "a LoRA adapter",
             "state/evolve_state.safetensors": "an evolve run"}
    del kinds[checkpoint.ADAPTER_FILE if cfg.lora_rank else checkpoint.MODEL_FILE]  # what this run writes
    other = [what for name, what in kinds.items() if (out / name).exists()]
    if not cfg.lora_rank and "quant" in existing_metadata(out / checkpoint.MODEL_FILE):
        other.append("a quantized model")
    if other:
        raise H2QError(f"--out {out} holds {other[0]}, which this run would mix with files of another kind; "
                       f"choose another --out")


def existing_metadata(path: Path) -> dict:
    """The metadata of a safetensors file about to be replaced; {} when it is missing or unreadable."""
    try:
        return checkpoint.read_metadata(path) if path.is_file() else {}
    except FileFormatError:
        return {}


def check_resumable(run: Run, path: Path, meta: dict) -> None:
    """The saved state in `path` is a training state of this very run: kind, model shape, base, flags."""
    fix = "resume with the run's settings, or start a new run in another --out"
    missing = [k for k in STATE_KEYS if k not in meta]
    if missing:
        kind = " (it is a model checkpoint)" if meta.get("format") == checkpoint.FORMAT else ""
        raise FileFormatError(f"{path} is not a training state{kind}: no {', '.join(missing)} in its metadata; "
                              f"restore it, or start without --resume")
    try:
        saved, model_config = json.loads(meta["train_config"]), json.loads(meta["model_config"])
        saved_rank = int(saved.get("lora_rank", 0)) if isinstance(saved, dict) else None
    except (ValueError, TypeError) as e:
        raise FileFormatError(f"{path} has unreadable metadata ({e}); restore it, or start without --resume") from None
    if saved_rank is None or not isinstance(model_config, dict):
        raise FileFormatError(f"{path} has metadata of the wrong shape; restore it, or start without --resume")
    lora = run.adapter is not None
    if bool(saved_rank) != lora:
        raise H2QError(f"--resume: {run.out} holds a LoRA adapter run; pass its --init-from and --lora-rank"
                       if saved_rank else f"--resume: {run.out} holds a base-model run, not a LoRA run; drop "
                       f"--init-from and --lora-rank, or choose another --out")
    if model_config != run.model.config.to_dict():
        if lora:
            raise H2QError(f"--resume: the adapter in {run.out} was trained on a base of another shape "
                           f"({preset_name(model_config)}); pass the --init-from it was trained on")
        raise H2QError(f"--resume: {run.out} holds a {preset_name(model_config)} model; pass --preset "
                       f"{preset_name(model_config)}")
    if lora:
        trained_on = meta.get("base_fingerprint") or adapter_base_fingerprint(run.out)
        if trained_on != run.model.base_fingerprint():
            raise H2QError(f"--resume: the adapter in {run.out} was trained on base {trained_on}, --init-from "
                           f"{run.cfg.init_from} is base {run.model.base_fingerprint()}; pass the --init-from it "
                           f"was trained on")
    if int(meta["world_size"]) != run.world_size:
        raise H2QError(f"--resume: the run used {meta['world_size']} processes; resume with as many")
    now = asdict(run.cfg)
    changed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if changed:
        diffs = ", ".join(f"{flag_name(k)} {now[k]} (the run's: {saved[k]})" for k in changed[:3])
        raise H2QError(f"--resume: {diffs} would change the run saved in {run.out}; {fix}")


def preset_name(model_config: dict) -> str:
    return next((name for name, c in PRESETS.items() if c.to_dict() == model_config), "custom-shape")


def adapter_base_fingerprint(out: Path) -> str | None:
    """The base fingerprint in OUT's adapter_config.json (states saved before they recorded it)."""
    try:
        return json.loads((out / checkpoint.ADAPTER_CONFIG_FILE).read_text(encoding="utf-8")).get("base_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def finished_run(run: Run) -> dict:
    """--resume of a run that reached its step count: nothing to train and nothing rewritten; the
    summary in training_log.json (written from metrics.jsonl if a kill came before it was)."""
    log = run.out / "training_log.json"
    try:
        summary = json.loads(log.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not (isinstance(summary, dict) and summary.get("steps") == run.step):
        metrics = run.out / "metrics.jsonl"
        evals = [r for _, r in checkpoint.read_jsonl_lines(metrics) if r.get("step") == run.step] \
            if metrics.exists() else []
        summary = run_summary(run, False, evals[-1] if evals else None)
        if run.rank == 0:
            checkpoint.atomic_write_json(log, summary)
    if run.rank == 0:
        print(f"{run.out} holds a finished run of {run.step} steps: nothing to train (start a new run to train "
              f"longer)")
    return summary


def check_memory(cfg: TrainConfig, block_size: int, vocab_size: int, device: torch.device) -> None:
    """Refuse a micro-step whose logits and their gradient (float32) and int64 windows alone exceed
    the device's memory: a floor under its real use, so nothing that could fit is refused."""
    tokens = cfg.batch_size * block_size
    floor = tokens * (2 * 4 * vocab_size + 4 * 8)
    have = device_memory(device)
    if have is not None and floor > have:
        raise ConfigError("batch_size", f"{cfg.batch_size} x block {block_size} needs over {floor / 2**30:,.1f} GiB "
                                        f"per micro-step, this {device.type} has {have / 2**30:,.1f} GiB; lower it "
                                        f"(--grad-accum N keeps the tokens per step)")


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
