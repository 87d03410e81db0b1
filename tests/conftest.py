"""Shared test fixtures: keep torch single-threaded-friendly and give every test a tiny corpus."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it: tiny matmuls and byte-at-a-time decoding only
    wait on a second thread, above all on a shared CPU. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_dir(tmp_path):
    """A small folder of text documents (about 40 KB), enough for tiny-preset training."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "agents", "evolve", "adapters"]
    for i in range(24):
        body = " ".join(words[(i + j) % len(words)] for j in range(300))
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n{body}\n", encoding="utf-8")
    return folder


def tiny_train_config(text_dir, out, **kw):
    """A TrainConfig of a tiny-preset run of 20 steps on `text_dir`, one thread (a measured thread
    choice could change between a run and its resume, and with it the floating-point sums)."""
    from h2q.train import TrainConfig

    base = dict(data_dir=str(text_dir), data_root=str(out.parent / "prepared"), out=str(out), preset="tiny",
                steps=20, batch_size=4, eval_every=10, eval_batches=2, save_every=10, warmup=5,
                device="cpu", threads="1", progress=False)
    return TrainConfig(**{**base, **kw})


def interrupted_and_resumed(config, resume_config, stop_at: int) -> tuple[list[float], dict]:
    """Train `config` until a Ctrl-C right after step `stop_at`, then `resume_config` to its end; ->
    the losses of every step in order, and the interrupted run's summary."""
    from h2q.train import train

    losses = []

    def interrupt(step, loss):
        losses.append(loss)
        if step == stop_at:
            raise KeyboardInterrupt

    summary = train(config, on_step=interrupt)
    train(resume_config, on_step=lambda step, loss: losses.append(loss))
    return losses, summary


def tiny_base_with_adapters(root, adapter_dirs, b_seed: int):
    """A tiny base (seed 0) saved in root/base and, in each folder of `adapter_dirs`, an adapter of rank
    2 whose B is N(0, 0.5) (seeded b_seed + its index), so that every adapter changes the output."""
    from h2q.checkpoint import save_adapter, save_model
    from h2q.config import PRESETS
    from h2q.lora import LoraAdapter, LoraConfig
    from h2q.model import Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"]).eval()
    save_model(root / "base", model)
    for i, folder in enumerate(adapter_dirs):
        adapter = LoraAdapter(model, LoraConfig(r=2), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            for b in adapter.lora_B:
                b.normal_(0, 0.5, generator=torch.Generator().manual_seed(b_seed + i))
        save_adapter(folder, adapter, model)
    return model
