"""Live monitoring: TensorBoard event files for `train.py --tensorboard DIR` and `evolve.py --tensorboard DIR`.

`Monitor` wraps `torch.utils.tensorboard.SummaryWriter` (the writer PyTorch ships; the `tensorboard`
package it needs is the optional extra `pip install 'h2q[monitor]'`, never a core dependency) behind
five calls: `scalars`, `histogram`, `image`, `text`, `flush`. `Monitor(None)` is the same object switched
off, every call a no-op, so the loops log unconditionally and never branch on the flag. Asking
for a monitor without the package installed is one error line that says how to install it.

The package is imported when the monitor is made, so a missing one stops the run before it starts; the
event file is opened at the first write. Steps are what the run counts (optimizer steps for training,
cycles for evolution). A resumed run (`resumed=True`) purges from its first written step on, so
TensorBoard drops the events a killed run wrote past its last checkpoint instead of drawing two lines
over the same steps. Watch a run with
`tensorboard --logdir DIR` (it serves on localhost only with its default flags).

Also here, because the training loop is not the place for it: `sample_text`, a short generation of the
model shown as the run's text sample.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from h2q import generate, tokenizer
from h2q.errors import H2QError

INSTALL_HINT = "pip install 'h2q[monitor]' (or pip install tensorboard)"


class Monitor:
    """A TensorBoard writer for one folder (`log_dir`), or for log_dir None the switched-off monitor."""

    def __init__(self, log_dir: str | None, resumed: bool = False):
        self.log_dir, self.resumed, self._writer = log_dir, resumed, None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise H2QError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}") \
                from None
        self._open = SummaryWriter

    @property
    def on(self) -> bool:
        return self.log_dir is not None

    def writer(self, step: int):
        """The SummaryWriter, opened at the first write (purging from `step` on for a resumed run)."""
        if self._writer is None:
            self._writer = self._open(self.log_dir, purge_step=step if self.resumed else None, flush_secs=10)
            weakref.finalize(self, self._writer.close)  # closed with the run's objects, or at exit
        return self._writer

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One scalar per finite number of `values`, tagged prefix + key."""
        if not self.on:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                self.writer(step).add_scalar(prefix + key, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.on:
            self.writer(step).add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture."""
        if self.on:
            assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8, (rgb.shape, rgb.dtype)
            self.writer(step).add_image(tag, rgb, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        """Plain text, shown verbatim (TensorBoard renders markdown: indenting makes it a code block)."""
        if self.on:
            self.writer(step).add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


SAMPLE_PROMPT = "\n"


@torch.no_grad()
def sample_text(model, adapters=None, max_new_tokens: int = 200, seed: int = 0, prompt: str = SAMPLE_PROMPT) -> str:
    """What the model writes after `prompt` (within its context): a fixed seed and top-k 40, so samples
    at successive steps differ by what the model learned, not by chance."""
    max_new_tokens = min(max_new_tokens, model.config.context_len - len(tokenizer.encode(prompt)))
    was_training = model.training
    model.eval()
    try:
        ids = generate.generate(model, prompt, max_new_tokens, temperature=0.8, top_k=40, seed=seed,
                                adapters=adapters)
    finally:
        model.train(was_training)
    return tokenizer.decode(ids)


def log_training_eval(monitor: Monitor, step: int, record: dict, model, adapter=None) -> None:
    """A training run's evaluation record (h2q/train.py's metrics.jsonl line) as scalars, the norms of
    the adapter's updates as a histogram, and a text sample."""
    if not monitor.on:
        return
    train_ce = record.get("train_ce", record["train_loss"])  # distillation: the data term alone
    monitor.scalars(step, {"val/loss": record["val_loss"], "val/bits_per_byte": record["val_bpb"],
                           "train/bits_per_byte": train_ce / math.log(2)})
    monitor.scalars(step, {k: v for k, v in record.items() if k in ("train_ce", "train_kl")}, "distill/")
    if adapter is not None:
        with torch.no_grad():
            norms = [float(adapter.delta(key).norm()) for key in adapter.shapes]
        monitor.histogram("adapter/update_norms", norms, step)
    monitor.text("sample", sample_text(model, adapter), step)
    monitor.flush()
