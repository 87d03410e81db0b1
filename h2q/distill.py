"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):
a student learns from the data and from a frozen teacher's temperature-softened next-byte distribution.

    loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor keeps the soft term's gradients on the scale of the hard term's as T changes (the
paper's section 2). Both terms are means over predicted positions, so alpha = 0 is plain training.

`train.py --teacher CKPT` builds the objective here (`objective_for`); the training loop calls it
where it would compute cross-entropy: `loss = objective(logits, x, y)`. The teacher is any h2q
checkpoint with the student's tokenizer (float or quantized: h2q.checkpoint loads either), put in
eval mode with every parameter frozen and run under `torch.no_grad()`, so it costs one forward per
micro-step and no optimizer state. The student can be a base model or an adapter on one (`--init-from
--lora-rank`): the objective only sees the student's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from h2q import checkpoint
from h2q.errors import H2QError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) for logits (B, T, V) and targets (B, T); kl is the T^2-scaled soft term."""
    assert student_logits.shape == teacher_logits.shape, (student_logits.shape, teacher_logits.shape)
    student = student_logits.float().flatten(0, 1)  # (B*T, V)
    teacher = teacher_logits.float().flatten(0, 1)  # (B*T, V)
    ce = F.cross_entropy(student, targets.flatten())
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    # batchmean: the sum over the vocabulary, averaged over positions (the true KL per position)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature ** 2
    return (1 - alpha) * ce + alpha * kl, ce, kl


class CrossEntropy:
    """The plain objective: next-byte cross-entropy on the data."""

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def parts(self) -> dict[str, float]:
        return {}


class Distillation:
    """The distillation objective around a frozen teacher; keeps running means of its two terms
    for logging (`parts()` returns and resets them)."""

    def __init__(self, teacher: torch.nn.Module, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self._sums, self._count = None, 0  # (2,) on the loss's device: no host sync per step

    def __str__(self) -> str:
        return (f"a teacher of {self.teacher.num_params():,} params (alpha {self.alpha:g}, temperature "
                f"{self.temperature:g})")

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of the student's `logits` for windows x -> y (called under the loop's autocast,
        which the teacher's forward shares)."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)  # (B, T, V)
        loss, ce, kl = distillation_loss(logits, teacher_logits, y, self.alpha, self.temperature)
        terms = torch.stack([ce.detach(), kl.detach()])  # (2,)
        self._sums = terms if self._sums is None else self._sums + terms
        self._count += 1
        return loss

    def parts(self) -> dict[str, float]:
        """Mean cross-entropy and soft term (nats per byte) since the last call."""
        if not self._count:
            return {}
        ce, kl = (self._sums / self._count).tolist()
        self._sums, self._count = None, 0
        return {"train_ce": ce, "train_kl": kl}


def load_teacher(path: str, student_config, block_size: int, device) -> torch.nn.Module:
    """The teacher checkpoint at `path`, frozen and in eval mode, checked against the student: the
    same vocabulary, a context that holds the student's training windows."""
    if not checkpoint.resolve_model_file(path).exists():
        raise H2QError(f"--teacher {path}: no model checkpoint there; train one first (python train.py --out {path})")
    teacher, _ = checkpoint.load_model(path, device)
    config = teacher.config
    if config.vocab_size != student_config.vocab_size:
        raise H2QError(f"--teacher {path} predicts {config.vocab_size} ids, the student {student_config.vocab_size}: "
                       f"distil between models of one tokenizer")
    if config.context_len < block_size:
        raise H2QError(f"--teacher {path} has context {config.context_len}, shorter than the student's windows "
                       f"of {block_size}; pass --block-size {config.context_len} or less")
    teacher.requires_grad_(False)
    return teacher.eval()


def objective_for(teacher: str | None, alpha: float, temperature: float, student_config, block_size: int, device):
    """What the training loop minimises: CrossEntropy, or Distillation to the `teacher` checkpoint
    (alpha in [0, 1] and temperature > 0 are the run config's to check)."""
    if teacher is None:
        return CrossEntropy()
    return Distillation(load_teacher(teacher, student_config, block_size, device), alpha, temperature)
