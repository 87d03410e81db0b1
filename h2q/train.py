"""The training loop: base model pre-training, or adapter-only fine-tuning of a frozen base.

A flat loop in nanoGPT `train.py`'s shape (batch, eval, lr schedule, micro-steps, clip, step, one log
line), but importable and testable: `train(TrainConfig(...))` runs it, `python train.py` maps flags
onto the same dataclass. The recipe is tuned for short CPU budgets (the sweep behind the defaults is
scripts/sweep_train.py, its table in the README): Muon (Jordan et al. 2024, torch.optim.Muon) on the
blocks' weight matrices with AdamW on the embedding and norms, as in modded-nanogpt; a
warmup-stable-decay schedule; gradient clipping at 1.0; bf16 autocast with fp32 master weights where
a probe at start finds bf16 steps faster (always on CUDA), fp32 elsewhere; torch's CPU thread count
measured as h2q/perf.py's ThreadPolicy does.

Stopping rule: `--steps`, else `--epochs` (passes over the train bytes), else `--time-budget` minutes
of wall-clock, counted from the process start and ending with the final evaluation and save: the
schedule is keyed to the elapsed fraction of the budget, and the run stops when one more step would
not leave the final evaluation and save inside it (`TimeBudget`). Checkpoints (h2q/checkpoint.py)
every `--save-every` steps, at the end and on Ctrl-C; `--resume` restores weights, optimizer, RNG and
data-sampler states and the autocast dtype the run chose. A --steps or --epochs run then continues
exactly where it was: the resumed run equals the uninterrupted one bit for bit (at a fixed thread
count: --threads N or OMP_NUM_THREADS). A --time-budget run resumes with the time it had left and its
place in the schedule; how many steps that time holds depends on the machine's speed then, so it is
not the uninterrupted run bit for bit. Under `torchrun` it runs data-parallel (DDP): every rank
samples its own batches, rank 0 alone writes, and rank 0's clock and dtype probe decide for all.

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
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from h2q import checkpoint, data, distill, lora
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, flag_name, resolve_device, run_main
from h2q.config import PRESETS, check_options, option
from h2q.errors import ConfigError, FileFormatError, H2QError
from h2q.model import Transformer
from h2q.monitor import SAMPLE_PROMPT, Monitor, log_training_eval, sample_text
from h2q.optim import Optimizers, torch_state_from_tensors, torch_state_to_tensors
from h2q.perf import ThreadPolicy, device_memory


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
    batch_size: int = option(32, "sequences per micro-step", at_least=1)
    block_size: int = option(64, "sequence length (0 = the model's context length)", at_least=0)
    grad_accum: int = option(1, "micro-steps per optimizer step", at_least=1)
    lr: float = option(2e-3, "peak learning rate of AdamW", above=0, at_most=10)
    min_lr_frac: float = option(0.1, "the schedule decays to its peak * this", at_least=0, at_most=1)
    warmup: int = option(50, "linear warmup steps", at_least=0)
    decay_frac: float = option(0.3, "the last part of the run (of its steps, or of its time budget) in which the "
                               "learning rate decays linearly", at_least=0, at_most=1)
    optimizer: str = option("muon", "muon: Muon on the blocks' weight matrices, AdamW on the rest; adamw: AdamW on "
                            "all (adapter runs always use AdamW)", choices=["muon", "adamw"])
    muon_lr: float = option(0.02, "peak learning rate of Muon", above=0, at_most=10)
    weight_decay: float = option(0.1, "AdamW decay on the weight matrices it steps", at_least=0)
    beta2: float = option(0.99, "AdamW beta2 (0.99 suits small batches)", at_least=0, below=1)
    grad_clip: float = option(1.0, "clip gradient norm to this (0 = off)", at_least=0)
    eval_every: int = option(100, "evaluate every N steps", at_least=1)
    eval_batches: int = option(16, "validation batches per evaluation", at_least=1)
    save_every: int = option(200, "checkpoint every N steps", at_least=1)
    device: str = option("auto", "auto, cpu or cuda")
    dtype: str = option("auto", "autocast dtype: auto (bf16 on CUDA; on CPU bf16 where a probe at start finds its "
                        "steps faster, else fp32), float32 or bfloat16", choices=["auto", "float32", "bfloat16"])
    threads: str = option("auto", "torch CPU threads: N, or auto (1 or all cores, whichever a probe finds faster, "
                          "measured again every 30 s; OMP_NUM_THREADS counts as N)", metavar="N|auto")
    compile: bool = option(False, "torch.compile the model")
    seed: int = option(1337, "random seed", at_least=0, below=2**63)
    resume: bool = option(False, "continue the run saved in --out")
    init_from: str | None = option(None, "base checkpoint to fine-tune an adapter on (with --lora-rank)")
    lora_rank: int = option(0, "train only a LoRA adapter of this rank on a frozen --init-from base (0 = off)",
                            at_least=0)
    lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha/r)", above=0)
    lora_dropout: float = option(0.0, "dropout on the adapter's input while training (PEFT's lora_dropout)", at_least=0,
                                 below=1)
    lora_targets: str = option(",".join(lora.LINEARS), "comma-separated linears the adapter adapts (PEFT's "
                                                       "target_modules, in h2q's names)")
    teacher: str | None = option(None, "distil from this trained checkpoint (frozen, may be quantized): the loss "
                                 "mixes cross-entropy with KL to its softened next-byte distribution")
    distill_alpha: float = option(0.5, "with --teacher: weight of the KL term (the data's cross-entropy gets "
                                  "1 - alpha)", at_least=0, at_most=1)
    distill_temperature: float = option(1.0, "with --teacher: softmax temperature T of both distributions (the KL "
                                        "term is scaled by T^2)", above=0)
    tensorboard: str | None = option(None, "write TensorBoard event files into this folder (needs the "
                                     "[monitor] extra: pip install tensorboard)")
    progress: bool = option(True, "show the progress bar")

    def __post_init__(self):
        check_options(self)
        try:
            lora.LoraConfig(targets=self.lora_targets)
        except ConfigError as e:
            raise ConfigError("lora_targets", e.problem) from None
        if self.threads != "auto" and not (self.threads.isdigit() and int(self.threads) > 0):
            raise ConfigError("threads", f"must be a positive number or auto, got {self.threads!r}")
        if self.steps and self.epochs:
            raise ConfigError("epochs", f"{self.epochs:g} and --steps {self.steps} both set the run's length; give one")


def pick_preset(device: torch.device) -> str:
    """The preset that learns most in the budget, by scripts/bench_train.py: on CUDA the `base` model;
    on CPU `mini`. Measured on 2 cores with a 5-minute budget: mini 1.85 vs small 2.56 val bits per
    byte (mini runs 5x the tokens per second); a 15-minute budget gives mini ~16 tokens per parameter,
    small ~0.5, so small only pays off after hours (pass --preset small for such runs)."""
    return "base" if device.type == "cuda" else "mini"


# -- the learning-rate schedule ------------------------------------------------------------------
def lr_factor(step: int, progress: float, cfg: TrainConfig, warmup: int) -> float:
    """The multiplier of each group's peak learning rate: warmup-stable-decay (WSD; Hu et al. 2024,
    MiniCPM): linear warmup over `warmup` steps, the peak, then a linear decay to min_lr_frac over the
    last decay_frac of the run. `progress` in [0, 1] is how much of the run is done: the step fraction
    of a --steps or --epochs run, the elapsed fraction of a --time-budget run."""
    if step < warmup:
        return (step + 1) / warmup
    decayed = (min(max(progress, 0.0), 1.0) - (1 - cfg.decay_frac)) / cfg.decay_frac if cfg.decay_frac else 0.0
    return 1 - (1 - cfg.min_lr_frac) * min(max(decayed, 0.0), 1.0)


def step_warmup(cfg: TrainConfig, max_steps: int) -> int:
    """Warmup steps: --warmup, at most a tenth of a run of known length."""
    return min(cfg.warmup, max(max_steps // 10, 1)) if max_steps else cfg.warmup


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """AdamW's learning rate at `step` of a `max_steps` run (the schedule keyed to steps)."""
    return cfg.lr * lr_factor(step, step / max_steps, cfg, step_warmup(cfg, max_steps))


class TimeBudget:
    """The clock of a --time-budget run: its elapsed fraction (which keys the schedule) and when to
    stop, so that the last step, the final evaluation and the final save end inside the budget.

    The budget counts from `started` (the process start, for the CLI), so start-up, probes and
    evaluations are part of it. A step's cost is the median of the last few iterations less the
    evaluations and saves inside them (one stalled iteration on a busy machine does not move it);
    the final evaluation and save are reserved at what the last ones took (estimated from the step
    time until one has run). `spent` is the time a resumed run had used before."""

    RECENT = 5  # iterations whose median is the step estimate
    EXIT_S = 2.0  # kept for what follows the final save and cannot be timed: the summary, the process's exit

    def __init__(self, seconds: float, started: float, clock=time.monotonic, spent: float = 0.0):
        self.seconds, self.clock = seconds, clock
        self.origin = started - spent  # the clock value at which the budget began
        self.recent: list[float] = []
        self.iteration_start, self.overhead = clock(), 0.0
        self.first = True  # the first iteration carries one-off costs; it is not a step estimate
        self.eval_s: float | None = None
        self.save_s: float | None = None

    def elapsed(self) -> float:
        return self.clock() - self.origin

    def step_s(self) -> float:
        return statistics.median(self.recent) if self.recent else 0.0

    def reserve(self, eval_batches: int) -> float:
        """Seconds kept for the final evaluation and save."""
        step = self.step_s()
        eval_s = self.eval_s if self.eval_s is not None else eval_batches * step / 3  # a forward: ~1/3 of a step
        return eval_s + (self.save_s if self.save_s is not None else step) + self.EXIT_S

    def fraction(self, eval_batches: int) -> float:
        """How much of the budget's training time is gone, in [0, 1]."""
        return min(self.elapsed() / max(self.seconds - self.reserve(eval_batches), 1e-9), 1.0)

    def step_done(self) -> None:
        """Record the iteration that ends now (less its evaluations and saves)."""
        now = self.clock()
        if not self.first:
            self.recent = [*self.recent, now - self.iteration_start - self.overhead][-self.RECENT:]
        self.first, self.iteration_start, self.overhead = False, now, 0.0

    def out_of_time(self, eval_batches: int) -> bool:
        """True when one more step would not leave the final evaluation and save inside the budget."""
        return self.elapsed() + self.step_s() + self.reserve(eval_batches) >= self.seconds

    def timed(self, kind: str, work):
        """Run `work()` (an evaluation or a save), record how long it took, return its result."""
        start = self.clock()
        result = work()
        took = self.clock() - start
        self.overhead += took
        setattr(self, f"{kind}_s", took)
        return result


# -- optimizers and the autocast dtype -----------------------------------------------------------
def hidden_matrices(params: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """The names of the blocks' 2-D weights (attention and MLP projections): what Muon steps. The
    embedding (also the output head) and the norms stay with AdamW, as in modded-nanogpt."""
    return [name for name, p in params if name.startswith("layers.") and p.dim() == 2]


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, device, adapter: bool = False):
    """AdamW (decay on matrices only), or with --optimizer muon Muon on `hidden_matrices` and AdamW on
    the rest. Every group records its peak learning rate as "peak_lr" for the schedule to scale."""
    muon_names = set(hidden_matrices(params)) if cfg.optimizer == "muon" and not adapter else set()
    rest = [(n, p) for n, p in params if n not in muon_names]
    groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
              {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": cfg.lr}]
    kwargs = dict(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)
    try:
        adamw = torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        adamw = torch.optim.AdamW(groups, foreach=True, **kwargs)
    if not muon_names:
        return adamw
    hidden = [p for n, p in params if n in muon_names]
    muon = torch.optim.Muon([{"params": hidden, "peak_lr": cfg.muon_lr}], lr=cfg.muon_lr, weight_decay=0.0)
    return Optimizers([adamw, muon])


DTYPE_ROUNDS = 3  # interleaved timed steps per dtype, after one warm-up step each
DTYPE_MARGIN = 0.95  # bf16 must be this much faster: a near tie keeps fp32's precision


def choose_dtype(requested: str, device: torch.device, step_seconds=None) -> tuple[torch.dtype, str]:
    """The autocast dtype and why: --dtype when given; bf16 on CUDA; on CPU bf16 only where its
    training steps are faster than fp32's, by `step_seconds(dtype) -> seconds` (one timed step)
    alternating between the two so that drift of the machine's speed hits both alike."""
    if requested != "auto":
        return getattr(torch, requested), f"--dtype {requested}"
    if device.type == "cuda":
        return torch.bfloat16, "bf16 on CUDA"
    times = {torch.float32: [], torch.bfloat16: []}
    for dtype in times:
        step_seconds(dtype)  # warm-up: first calls allocate and pick kernels
    for _ in range(DTYPE_ROUNDS):
        for dtype, seen in times.items():
            seen.append(step_seconds(dtype))
    fp32, bf16 = (statistics.median(times[d]) for d in (torch.float32, torch.bfloat16))
    dtype = torch.bfloat16 if bf16 < DTYPE_MARGIN * fp32 else torch.float32
    return dtype, f"probe: a step takes {bf16 * 1000:,.0f} ms in bf16, {fp32 * 1000:,.0f} ms in fp32"


def autocast_for(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


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
        self.dtype, self.saved_dtype = torch.float32, None  # the autocast dtype: choose_autocast() sets it
        self.autocast = nullcontext()
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
        self.objective = distill.objective_for(cfg.teacher, cfg.distill_alpha, cfg.distill_temperature,
                                               self.model.config, self.block_size, self.device)
        self.corpus = data.load_corpus(cfg.data_dir, self.block_size, root=cfg.data_root,
                                       log=print if rank == 0 else (lambda *a, **k: None))
        self.optimizer = make_optimizer(list(self.trainable.named_parameters()), cfg, self.device,
                                        adapter=self.adapter is not None)
        self.sampler = torch.Generator().manual_seed(cfg.seed + rank)
        self.step, self.max_steps, self.tokens_seen, self.elapsed = 0, 0, 0, 0.0
        self.saved_step = 0  # the step of the checkpoint in OUT (0: none yet)

    def _init_adapter(self):
        cfg = self.cfg
        if not cfg.init_from:
            raise H2QError("--lora-rank trains an adapter on a frozen base: also give --init-from checkpoints/base")
        if self.out.resolve() == checkpoint.resolve_model_file(cfg.init_from).parent.resolve():
            raise H2QError("--out must differ from the --init-from base folder (e.g. checkpoints/adapters/NAME)")
        self.model, _ = checkpoint.load_model(cfg.init_from, self.device)
        lora.check_rank(self.model.config, cfg.lora_rank)
        lora.freeze_base(self.model)
        self.adapter = lora.LoraAdapter(self.model, lora.LoraConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)).to(self.device)
        self.trainable = self.adapter

    def forward_module(self):
        """What the loop calls: the (possibly DDP-wrapped, compiled) trainable forward."""
        model = torch.compile(self.model) if self.cfg.compile else self.model
        if self.world_size > 1 and self.adapter is None:
            from torch.nn.parallel import DistributedDataParallel
            return DistributedDataParallel(model)
        return model

    # -- the autocast dtype, the optimizer, agreement between processes -----------------------------
    def choose_autocast(self) -> str:
        """Set the autocast dtype (`choose_dtype`); returns why it was chosen. A resumed run keeps the
        dtype it chose (unless --dtype says otherwise), so a --steps run resumes bit for bit."""
        if self.cfg.dtype == "auto" and self.saved_dtype in ("float32", "bfloat16"):
            self.dtype, reason = getattr(torch, self.saved_dtype), "the resumed run's"
        else:
            self.dtype, reason = choose_dtype(self.cfg.dtype, self.device, self.time_step)
        if self.world_size > 1:  # every process trains in rank 0's choice
            self.dtype = torch.bfloat16 if self.agreed(float(self.dtype == torch.bfloat16)) else torch.float32
        self.autocast = autocast_for(self.device, self.dtype)
        return reason

    def time_step(self, dtype: torch.dtype) -> float:
        """Seconds of one forward and backward of a batch of zeros under `dtype` autocast. It leaves no
        gradient behind and draws no random numbers, so the run is the same as without it."""
        x = torch.zeros(self.cfg.batch_size, self.block_size, dtype=torch.long, device=self.device)
        start = time.perf_counter()
        with autocast_for(self.device, dtype):
            logits = self.model(x, adapters=self.adapter)
            loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
        loss.backward()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - start
        for p in self.trainable.parameters():
            p.grad = None
        return took

    def dtype_name(self) -> str:
        return "bf16 autocast" if self.dtype == torch.bfloat16 else "fp32"

    def optimizer_name(self) -> str:
        if isinstance(self.optimizer, Optimizers):
            return f"Muon on {len(hidden_matrices(list(self.trainable.named_parameters())))} hidden matrices + AdamW"
        return "AdamW"

    def agreed(self, value: float) -> float:
        """`value` as rank 0 has it: the processes of a data-parallel run take their decisions together."""
        if self.world_size == 1:
            return value
        shared = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, 0)
        return float(shared.item())

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
                "autocast_dtype": str(self.dtype).removeprefix("torch."),
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
            self.saved_dtype = meta.get("autocast_dtype")
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise FileFormatError(f"{path}: its optimizer, random or step state is unusable ({e}); {fix}") from None
        self.saved_step = self.step

    def log_metrics(self, record: dict):
        if self.rank == 0:
            checkpoint.append_jsonl(self.out / "metrics.jsonl", record)

    def drop_metrics_after_step(self):
        """Forget the metrics and sample records (and a torn last line) that a kill left past the saved
        step."""
        for path in (self.out / "metrics.jsonl", self.out / SAMPLES_FILE):
            if self.rank == 0 and path.exists():
                kept = [line for line, record in checkpoint.read_jsonl_lines(path)
                        if not isinstance(record.get("step"), (int, float)) or record["step"] <= self.step]
                checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log_sample(self, adapters) -> None:
        """OUT/samples.jsonl: what the model writes now after a fixed prompt and seed (the report shows
        them by step)."""
        if self.rank == 0:
            record = {"step": self.step, "prompt": SAMPLE_PROMPT, "text": sample_text(self.model, adapters, 120)}
            checkpoint.append_jsonl(self.out / SAMPLES_FILE, record)


def thread_policy(cfg: TrainConfig, device: torch.device) -> ThreadPolicy:
    """torch's CPU threads for the run (h2q/perf.py): measured between one and all cores on CPU
    with --threads auto, else fixed (on CUDA auto leaves torch's default)."""
    if cfg.threads == "auto":
        return ThreadPolicy(0 if device.type == "cpu" else torch.get_num_threads())
    return ThreadPolicy(int(cfg.threads))


def fixed_max_steps(cfg: TrainConfig, train_bytes: int, tokens_per_step: int) -> int:
    """Steps from --steps or --epochs; 0 means 'decide from the time budget'."""
    if cfg.steps > 0:
        return cfg.steps
    if cfg.epochs > 0:
        return max(1, int(cfg.epochs * train_bytes / tokens_per_step))
    return 0


def train(cfg: TrainConfig, on_step=None, clock=time.monotonic, started: float | None = None) -> dict:
    """Run training as configured; returns the run summary (also written to OUT/training_log.json).
    `on_step(step, loss)` is called after every optimizer step (tests use it to interrupt). A time
    budget counts from `started` on `clock` (default: now). Rank 0 holds OUT's lock throughout."""
    if int(os.environ.get("RANK", "0")) != 0:
        return run_training(cfg, on_step, clock, started)
    with open_output(cfg):
        try:
            return run_training(cfg, on_step, clock, started)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
                raise H2QError(f"out of memory at --batch-size {cfg.batch_size}: lower --batch-size or --block-size "
                               f"(--grad-accum N keeps the tokens per step)") from None
            raise


def run_training(cfg: TrainConfig, on_step=None, clock=time.monotonic, started: float | None = None) -> dict:
    started = clock() if started is None else started
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolve_device(cfg.device).type == "cuda" else "gloo")
    monitor = Monitor(cfg.tensorboard if rank == 0 else None, resumed=cfg.resume)
    run = Run(cfg, rank, world_size)
    if cfg.resume:
        run.load()
        if run.max_steps and run.step >= run.max_steps:
            return finished_run(run)
        run.drop_metrics_after_step()
    elif rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "metrics.jsonl").unlink(missing_ok=True)
        (run.out / SAMPLES_FILE).unlink(missing_ok=True)
    threads = thread_policy(cfg, run.device)
    dtype_reason = run.choose_autocast()
    model = run.forward_module()
    run.trainable.train()
    tokens_per_step = cfg.batch_size * run.block_size * cfg.grad_accum * world_size
    run.max_steps = run.max_steps or fixed_max_steps(cfg, len(run.corpus.train), tokens_per_step)
    budget = None if run.max_steps else TimeBudget(cfg.time_budget * 60, started, clock, spent=run.elapsed)
    if rank == 0:
        n_params = run.model.num_params()
        what = f"adapter ({sum(p.numel() for p in run.trainable.parameters()):,} params) on" if run.adapter else "model"
        print(f"training {what} {n_params:,} params on {run.device} | {len(run.corpus.train):,} train bytes, "
              f"{len(run.corpus.val):,} val bytes | {tokens_per_step:,} tokens/step")
        print(f"{run.optimizer_name()} | {run.dtype_name()} ({dtype_reason}) | threads {threads.describe()} | "
              + (f"{cfg.time_budget:g} min budget" if budget else f"{run.max_steps:,} steps"))
        if cfg.teacher:
            print(f"distilling from {cfg.teacher}: {run.objective}")
    bar = tqdm(total=run.max_steps or None, initial=run.step, disable=rank != 0 or not cfg.progress,
               unit="step", dynamic_ncols=True)
    t_last, loss_sum, loss_n, last_eval = clock(), 0.0, 0, None
    elapsed_at_start, interrupted = run.elapsed, False
    warmup = step_warmup(cfg, run.max_steps)
    adapters = run.adapter
    try:
        while budget is not None or run.step < run.max_steps:
            threads.check()
            progress = budget.fraction(cfg.eval_batches) if budget else run.step / run.max_steps
            factor = run.agreed(lr_factor(run.step, progress, cfg, warmup))
            for group in run.optimizer.param_groups:
                group["lr"] = factor * group["peak_lr"]
            lr = factor * cfg.lr
            for micro in range(cfg.grad_accum):
                x, y = data.get_batch(run.corpus.train, cfg.batch_size, run.block_size, run.sampler, run.device)
                sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                with (nullcontext() if sync else model.no_sync()), run.autocast:
                    logits = model(x, adapters=adapters)
                    loss = run.objective(logits, x, y)
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
            now = clock()
            run.elapsed = elapsed_at_start + now - started
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
            monitor.scalars(run.step, {"loss": loss_value, "lr": lr, "tokens_per_s": tok_s}, "train/")
            if budget:
                budget.step_done()
                if run.agreed(float(budget.out_of_time(cfg.eval_batches))):
                    run.max_steps = run.step  # the run's length, now known: a resume finds it finished
            done = run.step >= run.max_steps > 0
            if run.step % cfg.eval_every == 0 or done:
                def evaluate_now():
                    if done or run.step % cfg.save_every == 0:  # at each checkpoint: a sample for the report
                        run.log_sample(adapters)
                    return evaluate(run.model, run.corpus.val, cfg, run.block_size, run.device, run.autocast, adapters)
                val_loss = budget.timed("eval", evaluate_now) if budget else evaluate_now()
                if not val_loss < MAX_LOSS:  # nan included
                    raise run.diverged(f"the validation loss is {val_loss:g}")
                last_eval = {"step": run.step, "tokens": run.tokens_seen, "elapsed_s": round(run.elapsed, 2),
                             "lr": lr, "train_loss": loss_sum / loss_n, "val_loss": val_loss,
                             "val_bpb": val_loss / math.log(2), "val_ppl": math.exp(val_loss),
                             "tokens_per_s": run.tokens_seen / max(run.elapsed, 1e-9), **run.objective.parts()}
                run.log_metrics(last_eval)
                log_training_eval(monitor, run.step, last_eval, run.model, adapters)
                loss_sum, loss_n = 0.0, 0
                if rank == 0:
                    bar.write(f"step {run.step}: train {last_eval['train_loss']:.4f} | val {val_loss:.4f} "
                              f"| {last_eval['val_bpb']:.4f} bits/byte | {last_eval['tokens_per_s']:,.0f} tok/s")
            if run.step % cfg.save_every == 0 and not done:
                budget.timed("save", run.save) if budget else run.save()
            if on_step is not None:
                on_step(run.step, loss_value)
            if done:
                break
    except KeyboardInterrupt:
        interrupted = True
        if rank == 0:
            bar.write(f"interrupted at step {run.step}: saving a checkpoint; continue with --resume")
    bar.close()
    run.save()
    monitor.close()
    summary = run_summary(run, interrupted, last_eval)
    if rank == 0:
        checkpoint.atomic_write_json(run.out / "training_log.json", summary)
    return summary


def run_summary(run: Run, interrupted: bool, final: dict | None) -> dict:
    """What OUT/training_log.json holds."""
    return {"out": str(run.out), "interrupted": interrupted, "steps": run.step, "max_steps": run.max_steps,
            "tokens_seen": run.tokens_seen, "elapsed_s": round(run.elapsed, 2), "world_size": run.world_size,
            "params": run.model.num_params(), "model_config": run.model.config.to_dict(),
            "train_config": asdict(run.cfg), "device": str(run.device),
            "autocast_dtype": str(run.dtype).removeprefix("torch."), "final": final}


# -- the output folder and resume (see the module docstring) ------------------------------------------
SAMPLES_FILE = "samples.jsonl"  # what the model writes at each checkpoint (h2q/report/training.py reads it)
MAX_LOSS = 700.0  # nats: above it the perplexity exp(loss) overflows a float; the run has diverged
# flags that may differ on --resume: where things are and how the run is watched, not what it computes
RESUME_MAY_CHANGE = {"out", "data_root", "preset", "init_from", "device", "dtype", "compile", "resume",
                     "progress", "eval_every", "eval_batches", "save_every", "threads", "tensorboard"}
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


def process_started(clock=time.monotonic) -> float:
    """The `clock` value at which this process started (Linux: /proc/self/stat), so that a budget
    includes the interpreter's and torch's start-up; now, where that is not known."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return clock() - max(age, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return clock()


HELP_GROUPS = {
    "data": ["data_dir", "data_root"],
    "how long": ["steps", "epochs", "time_budget"],
    "optimization": ["batch_size", "block_size", "grad_accum", "optimizer", "lr", "muon_lr", "min_lr_frac", "warmup",
                     "decay_frac", "weight_decay", "grad_clip"],
    "evaluation, checkpoints and monitoring": ["eval_every", "eval_batches", "save_every", "resume", "tensorboard",
                                               "progress"],
    "adapter fine-tuning (LoRA on a frozen base)": ["init_from", "lora_rank", "lora_alpha", "lora_dropout",
                                                    "lora_targets"],
    "distillation from a teacher": ["teacher", "distill_alpha", "distill_temperature"],
    "hardware": ["device", "dtype", "threads", "compile"],
}
HELP_EXAMPLES = [
    ("python train.py", "train the base model on the default corpus (this Python installation's own "
                        "documentation and sources) into checkpoints/base"),
    ("python train.py --preset tiny --steps 200", "a quick smoke run of a tiny model"),
    ("python train.py --resume", "continue the run saved in --out where it stopped"),
    ("python train.py --data-dir my_texts --time-budget 60", "train on your own text files for an hour"),
    ("python train.py --init-from checkpoints/base --lora-rank 8 --data-dir my_texts",
     "fine-tune a LoRA adapter on a frozen base (into checkpoints/adapters/lora)"),
    ("python train.py --preset tiny --teacher checkpoints/base", "distil the base into a smaller student"),
]


def main(argv=None) -> int:
    parser = Parser(prog="train.py", description="Train the byte-level base model, or a "
                                     "LoRA adapter on a frozen base (--init-from BASE --lora-rank R).",
                    examples=HELP_EXAMPLES)
    add_dataclass_flags(parser, TrainConfig, groups=HELP_GROUPS)
    summary = train(dataclass_from_args(TrainConfig, parser.parse_args(argv)), started=process_started())
    if summary["final"]:
        print(f"done: {summary['steps']} steps, val {summary['final']['val_bpb']:.4f} bits/byte, saved to {summary['out']}")
    return 130 if summary["interrupted"] else 0


def cli():
    sys.exit(run_main(main))
