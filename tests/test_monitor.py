"""Live monitoring (h2q/monitor.py, h2q/evolve/board.py, --tensorboard on train.py and evolve.py): the
events read back with TensorBoard's own reader, purged on resume, and one line without the package."""
import gc
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_config

from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.evolve.board import update_norms, world_image, world_text
from h2q.evolve.evolution import BreedConfig
from h2q.evolve.run import EvolveConfig, evolve
from h2q.evolve.text_env import TextConfig
from h2q.lora import AdapterBank, LoraConfig
from h2q.monitor import Monitor
from h2q.train import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="the [monitor] extra (tensorboard) is not installed")


def events(folder):
    """TensorBoard's reader over `folder`, every event kept."""
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={k: 0 for k in (
        "scalars", "histograms", "images", "tensors")})
    return acc.Reload()


def tiny_config(text_dir, out, **kw):
    return tiny_train_config(text_dir, out, **{**dict(steps=8, block_size=32, eval_every=4, save_every=4, warmup=2), **kw})


def test_without_the_package_the_flag_is_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(H2QError, match=r"pip install 'h2q\[monitor\]'"):
        Monitor(str(tmp_path / "tb"))
    code = ("import sys; sys.modules['torch.utils.tensorboard'] = None\n"
            "from h2q.cli import run_main; from h2q.evolve.run import main\n"
            f"sys.exit(run_main(main, ['--base', 'random', '--preset', 'tiny', '--out', {str(tmp_path / 'run')!r}, "
            f"'--tensorboard', {str(tmp_path / 'tb')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "pip install 'h2q[monitor]'" in run.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()  # nothing made before the error


def test_the_switched_off_monitor_does_nothing(tmp_path):
    monitor = Monitor(None)
    monitor.scalars(1, {"a": 1.0})
    monitor.histogram("h", [1.0], 1)
    monitor.image("i", np.zeros((2, 2, 3), np.uint8), 1)
    monitor.text("t", "x", 1)
    monitor.flush()
    assert not monitor.on


def test_update_norms_match_the_naive_updates():
    bank = AdapterBank(PRESETS["tiny"], LoraConfig(r=2, alpha=4.0), 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for B in bank.lora_B:
            B.normal_(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        naive = [float(torch.stack([bank.adapter(i).delta(k).norm() for k in bank.shapes]).norm()) for i in range(3)]
    np.testing.assert_allclose(update_norms(bank), naive, rtol=1e-6)


def test_world_image_and_text():
    walls = np.zeros((5, 5), int)
    walls[0, :] = walls[-1, :] = walls[:, 0] = walls[:, -1] = 1
    visits = np.zeros((5, 5), int)
    visits[2, 1] = 3
    world = {"walls": walls.tolist(), "home": [3, 3], "food": [[2, 1]], "visits": visits.tolist(), "seed": 7,
             "level": "hinted", "trajectory": {"agent": 4, "positions": [[1, 2], [2, 2]], "carrying": [0, 1]}}
    img = world_image(world, cell=4)
    assert img.shape == (20, 20, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (120, 120, 120)  # wall
    assert tuple(img[3 * 4, 3 * 4]) == (245, 200, 40)  # home (cell corner: outside the path inset)
    assert tuple(img[1 * 4, 2 * 4]) == (40, 200, 70)  # food
    assert tuple(img[2 * 4 + 2, 1 * 4 + 2]) == (255, 255, 255)  # the path's start
    assert tuple(img[2 * 4 + 2, 2 * 4 + 2]) == (220, 60, 220)  # on the path, carrying
    assert img[2 * 4, 1 * 4, 2] > img[2 * 4, 2 * 4, 2]  # visited ground is bluer
    lines = world_text(world).splitlines()
    assert lines[:5] == ["##########", "## . * .##", "## o o .##", "## . .HH##", "##########"]
    assert "agent 4's path" in lines[-1]


@needs_tensorboard
def test_train_events_read_back(text_dir, tmp_path):
    """Scalars per step and per evaluation, a text sample, adapter norms; a resume purges what a
    killed run wrote past its last checkpoint, so every step has one loss."""
    tb = tmp_path / "tb"
    train(tiny_config(text_dir, tmp_path / "base", tensorboard=str(tmp_path / "tb-base")))
    acc = events(tmp_path / "tb-base")
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/bits_per_byte", "val/loss",
            "val/bits_per_byte"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("val/bits_per_byte")] == [4, 8]
    assert "sample/text_summary" in tags["tensors"]

    class Killed(Exception):
        pass

    def kill_at_6(step, loss):
        if step == 6:
            raise Killed  # no checkpoint at 6 (unlike Ctrl-C): the state is step 4's

    flags = dict(init_from=str(tmp_path / "base"), lora_rank=2, teacher=str(tmp_path / "base"), tensorboard=str(tb))
    with pytest.raises(Killed):
        train(tiny_config(text_dir, tmp_path / "lora", **flags), on_step=kill_at_6)
    gc.collect()  # the killed run's writer closes, as at a process's exit: steps 1..6 are on disk
    assert [e.step for e in events(tb).Scalars("train/loss")] == list(range(1, 7))
    train(tiny_config(text_dir, tmp_path / "lora", resume=True, **flags))
    acc = events(tb)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert {"distill/train_ce", "distill/train_kl"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Histograms("adapter/update_norms")] == [4, 8]


@needs_tensorboard
def test_evolve_events_read_back(tmp_path):
    cfg = EvolveConfig(base="random", preset="tiny", out=str(tmp_path / "run"), cycles=2, agents=4, steps=12,
                       eval_episodes=1, lora_rank=2, device="cpu", threads=1, progress=False,
                       tensorboard=str(tmp_path / "tb"))
    evolve(cfg, BreedConfig(), TextConfig())
    acc = events(tmp_path / "tb")
    tags = acc.Tags()
    for tag in ("fitness/best", "fitness_pct_of_oracle/best_pct_oracle", "fitness_normalised/median_normalised",
                "population/diversity", "population/deaths", "seconds/wall_s"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
    assert [e.step for e in acc.Histograms("adapters/update_norms")] == [1, 2]
    images = acc.Images("world/map")
    assert [e.step for e in images] == [1, 2] and images[0].width == images[0].height == 16 * 12
    assert "sample/text_summary" in tags["tensors"]


@needs_tensorboard
def test_text_env_events_have_bits_per_byte_and_a_sample(text_dir, tmp_path):
    cfg = EvolveConfig(base="random", preset="tiny", out=str(tmp_path / "run"), cycles=1, agents=2, steps=2,
                       env="text", lora_rank=2, device="cpu", threads=1, progress=False,
                       tensorboard=str(tmp_path / "tb"))
    evolve(cfg, BreedConfig(), TextConfig(data_dir=str(text_dir), data_root=str(tmp_path / "prepared"),
                                          text_block=32, eval_windows=4))
    acc = events(tmp_path / "tb")
    assert {"bits_per_byte/best_bpb", "bits_per_byte/base_bpb"} <= set(acc.Tags()["scalars"])
    assert "sample/text_summary" in acc.Tags()["tensors"]
    assert "world/map" not in acc.Tags()["images"]
