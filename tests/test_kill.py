"""kill -9 at seeded moments: train.py and evolve.py (tiny) are killed again and again mid-run; after
each kill the last state loads, at most one save interval (train) or the cycle in progress (evolve)
is lost, and `--resume` continues; the run finally completes with the very records and weights of an
uninterrupted run, and no temporary file is left. H2Q_KILLS (default 3) sets the kills per entry point.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from h2q import checkpoint
from h2q.evolve import records

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("H2Q_KILLS", "3"))
pytestmark = pytest.mark.slow

SAVE_EVERY = 5
STEPS = SAVE_EVERY * (2 * KILLS + 2)  # each kill comes one or two intervals after the last save
TRAIN = ["--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--block-size", "32", "--eval-batches",
         "1", "--eval-every", str(SAVE_EVERY), "--save-every", str(SAVE_EVERY), "--warmup", "2", "--device", "cpu",
         "--no-progress"]
CYCLES = 2 * KILLS + 2
EVOLVE = ["--base", "random", "--preset", "tiny", "--agents", "4", "--steps", "6", "--eval-episodes", "1",
          "--lora-rank", "2", "--device", "cpu", "--threads", "1", "--no-progress", "--cycles", str(CYCLES)]


class Process:
    """A script in a subprocess whose stdout lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 300) -> bool:
        """Wait until a stdout line matches `pattern`; False if the process ended first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return True
            if self.proc.poll() is not None:
                self.reader.join(5)
                return any(re.search(pattern, line) for line in self.lines)
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in {timeout} s: {self.lines[-5:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(5)

    def finish(self, timeout: float = 600) -> str:
        _, err = self.proc.communicate(timeout=timeout)
        self.reader.join(5)
        assert self.proc.returncode == 0, err[-3000:]
        return err

    def last(self, pattern: str) -> int:
        """The number of the last stdout line matching `pattern` (with one group), 0 when none."""
        found = [int(m.group(1)) for line in self.lines if (m := re.search(pattern, line))]
        return found[-1] if found else 0


def stale_temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if checkpoint.STALE_TEMP.fullmatch(p.name)]


def test_train_survives_kill_9(text_dir, tmp_path):
    rng = random.Random(1234)
    common = [str(ROOT / "train.py"), "--data-dir", str(text_dir), "--data-root", str(tmp_path / "prep"), *TRAIN]
    Process([*common, "--out", str(tmp_path / "straight")], tmp_path).finish()
    out = tmp_path / "killed"
    resumes = 0
    for kill in range(KILLS):
        state = out / checkpoint.STATE_FILE
        saved = int(checkpoint.read_metadata(state)["step"]) if state.exists() else 0
        run = Process([*common, "--out", str(out), *(["--resume"] if state.exists() else [])], tmp_path)
        # the kill comes at a seeded moment: just after a seeded eval line, up to a step or so later
        target = min(saved + SAVE_EVERY * rng.choice([1, 2]), STEPS - SAVE_EVERY)
        assert run.wait_for(rf"^step {target}:"), run.proc.communicate()[1][-2000:]
        time.sleep(rng.uniform(0.0, 0.2))
        run.kill()
        logged = run.last(r"^step (\d+):")  # eval lines; a save follows each of them
        if not state.exists():
            assert logged <= SAVE_EVERY, f"kill {kill}: no state, the run had logged step {logged}"
            continue
        _, meta = checkpoint.read_tensors(state, "training state")  # verified whole
        checkpoint.load_model(out)
        assert int(meta["step"]) >= logged - SAVE_EVERY, f"kill {kill}: saved {meta['step']}, logged {logged}"
        resumes += 1
    Process([*common, "--out", str(out), "--resume"], tmp_path).finish()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))  # nothing repeated, nothing missing
    straight = checkpoint.read_tensors(tmp_path / "straight" / checkpoint.MODEL_FILE)[0]
    killed = checkpoint.read_tensors(out / checkpoint.MODEL_FILE)[0]
    assert all(torch.equal(straight[k], killed[k]) for k in straight)
    assert not stale_temps(out) and not stale_temps(tmp_path / "prep")
    assert not (out / checkpoint.LOCK_FILE).exists()
    assert resumes >= 1


def test_evolve_survives_kill_9(tmp_path):
    rng = random.Random(4321)
    Process([str(ROOT / "evolve.py"), *EVOLVE, "--out", str(tmp_path / "straight")], tmp_path).finish()
    # a tiny cycle takes a fraction of a second: the kill's moment is a fraction of the quickest one, so
    # that it lands inside the cycle after the target on a fast machine too
    cycle_s = min(json.loads(line)["wall_s"] for line in (tmp_path / "straight" / "metrics.jsonl").open())
    out = tmp_path / "killed"
    resumes = 0
    for kill in range(KILLS):
        done, _ = records.committed(out)
        if done >= CYCLES - 1:
            break  # nothing left to kill in: the final resume below finishes the run
        run = Process([str(ROOT / "evolve.py"), *EVOLVE, "--out", str(out), *(["--resume"] if done else [])],
                      tmp_path)
        target = min(done + rng.choice([1, 2]), CYCLES - 1)  # killed in cycle target + 1, a seeded moment into it
        assert run.wait_for(rf"^cycle {target}/"), run.proc.communicate()[1][-2000:]
        time.sleep(rng.uniform(0.0, 0.9) * cycle_s)
        run.kill()
        printed = run.last(r"^cycle (\d+)/")  # printed after the cycle's commit
        cycle, _ = records.committed(out)
        assert cycle >= printed, f"kill {kill}: committed cycle {cycle}, the run had printed cycle {printed}"
        records.read_state(out, 0, 1, checkpoint.read_tensors(out / "state" / records.STATE_FILE)[0],
                           checkpoint.read_tensors(out / "state" / f"env_c{cycle:03d}_r0.safetensors")[0])
        folder, _ = records.resolve_adapter("0", str(out))  # infer.py's agent lookup right after the kill
        assert folder.parent.name == f"cycle_{cycle:03d}"
        checkpoint.read_tensors(folder / checkpoint.ADAPTER_FILE)
        resumes += 1
    assert records.committed(out)[0]
    Process([str(ROOT / "evolve.py"), *EVOLVE, "--out", str(out), "--resume"], tmp_path).finish()

    def metrics(run: Path):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert metrics(out) == metrics(tmp_path / "straight")
    assert sorted(p.name for p in (out / "state").iterdir()) == [f"env_c{CYCLES:03d}_r0.safetensors",
                                                                  records.STATE_FILE]
    assert not stale_temps(out) and not (out / checkpoint.LOCK_FILE).exists()
    assert resumes >= 1
