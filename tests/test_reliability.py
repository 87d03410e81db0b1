"""The reliability suite (issue 21): every bad input a careless or unlucky user gives an entry point
ends in one clear line and exit code 2, and damages nothing.

`CASES` is the campaign as a table, one row per case: bad flag values, paths that are files or
cannot be made, outputs that would overwrite inputs or files of another kind, corrupt, truncated,
bit-flipped and retyped safetensors, valid files of the wrong kind, mismatched presets and bases,
a run holding the output folder's lock, and a disk that fills up (ENOSPC injected into the writers).
Each row runs in-process through `h2q.cli.run_main` in a fresh copy of a small set of runs made once
per session (`assets`, by scripts/fuzz_cli.py's `make_assets`, which fuzzes the same entry points at
random), and asserts: exit code 2, no traceback, at most 3 lines on stderr, the flag or
file named, every file that was there before byte-identical afterwards (a few rows name the files a
failing cycle may legitimately leave appended), and no lock, temporary file or empty folder left behind.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors import SafetensorError

from h2q import checkpoint, data
from h2q.cli import run_main
from h2q.config import PRESETS
from h2q.evolve import records
from h2q.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"h2q_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = load_script("fuzz_cli")  # owns the runs every case starts from (make_assets) and the base flags
MAINS = FUZZ.entry_points()
TRAIN, EVOLVE, train_args = FUZZ.TRAIN, FUZZ.EVOLVE, FUZZ.train_args


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    return FUZZ.make_assets(tmp_path_factory.mktemp("assets") / "runs")


# -- damaging files ------------------------------------------------------------------------------------
header_end = FUZZ.header_end


def cut(name: str, where: str) -> Callable[[Path], None]:
    """Truncate a file: to 0 bytes, inside the length prefix, inside the header, right after it, in
    the middle of the data, or one byte short."""
    def damage(root: Path):
        path = root / name
        data = path.read_bytes()
        end = header_end(data)
        at = {"empty": 0, "prefix": 5, "header": end // 2, "header_end": end, "data": (end + len(data)) // 2,
              "last_byte": len(data) - 1}[where]
        path.write_bytes(data[:at])
    return damage


def flip(name: str, where: str, count: int = 1) -> Callable[[Path], None]:
    """Flip bits of `count` bytes of the tensor data (first, middle, last, or spread at random)."""
    def damage(root: Path):
        path = root / name
        data = bytearray(path.read_bytes())
        start = header_end(data)
        if where == "random":
            spots = random.Random(0).sample(range(start, len(data)), count)
        else:
            spots = [{"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 1}[where]]
        for i in spots:
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    return damage


def edit_header(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the JSON header with `change` applied, padded to its old length (the layout stays valid)."""
    def damage(root: Path):
        path = root / name
        data = path.read_bytes()
        end = header_end(data)
        header = json.loads(data[8:end])
        change(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= end - 8
        path.write_bytes(data[:8] + text.ljust(end - 8) + data[end:])
    return damage


def tensor_entries(header: dict) -> list[dict]:
    return [v for k, v in sorted(header.items()) if k != "__metadata__"]


def retype(header: dict) -> None:
    """The first float32 tensor declared int32 (same size)."""
    next(v for v in tensor_entries(header) if v["dtype"] == "F32")["dtype"] = "I32"


def swap_shape(header: dict) -> None:
    """The first non-square matrix declared transposed (same size)."""
    entry = next(v for v in tensor_entries(header) if len(v["shape"]) == 2 and v["shape"][0] != v["shape"][1])
    entry["shape"] = entry["shape"][::-1]


def garbage(name: str) -> Callable[[Path], None]:
    def damage(root: Path):
        (root / name).write_bytes(os.urandom(4096))
    return damage


def copy_over(source: str, target: str) -> Callable[[Path], None]:
    def damage(root: Path):
        shutil.copyfile(root / source, root / target)
    return damage


def edit_json(name: str, change: Callable) -> Callable[[Path], None]:
    """Rewrite a JSON file as `change` of its value."""
    def damage(root: Path):
        (root / name).write_text(json.dumps(change(json.loads((root / name).read_text()))))
    return damage


def write(name: str, text: str) -> Callable[[Path], None]:
    def damage(root: Path):
        (root / name).write_text(text)
    return damage


# -- holding a lock, filling the disk -----------------------------------------------------------------
HELD: list[checkpoint.FolderLock] = []


def held_lock(folder: str):
    """Another run holding `folder`'s lock while the case runs: a FolderLock of this process (flock
    locks of two open files conflict, so it is a holder like any other)."""
    def inject(root: Path, monkeypatch):
        HELD.append(checkpoint.FolderLock(root / folder, "--out"))
    return inject


def release_held():
    while HELD:
        HELD.pop().release()


def disk_full(when: Callable[[str], bool] = lambda path: True, appends: bool = True):
    """ENOSPC from the writers: safetensors' (half a file written, then its error) for the paths
    `when` accepts, and (with `appends`) every file checkpoint opens for writing or appending."""
    def inject(root: Path, monkeypatch):
        real_save = checkpoint.save_file

        def save_file(tensors, path, metadata=None):
            if not when(str(path)):
                return real_save(tensors, path, metadata=metadata)
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')

        def full_open(path, mode="r", *args, **kwargs):
            if any(c in mode for c in "wa+") and when(str(path)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
        if appends:
            monkeypatch.setattr(checkpoint, "open", full_open, raising=False)
    return inject


# -- the table -------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    entry: str
    argv: list[str]
    names: str  # what the error line must name: a flag or a file
    setup: Callable[[Path], None] | None = None  # damage made before the "before" snapshot
    inject: Callable | None = None  # (root, monkeypatch): a held lock, a full disk
    may_grow: tuple[str, ...] = ()  # files a failing run may append to or rewrite before its commit
    slow: bool = False


def train_flag(flag: str, value: str | None = None, names: str | None = None) -> Case:
    extra = [flag] if value is None else [flag, value]
    return Case(f"train {flag} {value}", "train", train_args("fresh", 2, *extra), names or flag.split("=")[0])


def evolve_flag(flag: str, value: str) -> Case:
    return Case(f"evolve {flag} {value}", "evolve", ["--base", "base", "--cycles", "1", "--out", "fresh", *EVOLVE,
                                                       flag, value], flag)


def quantize_flag(*extra: str, names: str) -> Case:
    return Case(f"quantize {' '.join(extra)}", "quantize", ["--ckpt", "base", "--out", "q", *extra], names)


RESUME_HALF = train_args("half", 4, "--resume")
RESUME_EV = ["--base", "base", "--cycles", "2", "--out", "ev", "--resume", *EVOLVE]
QUANTIZE_BASE = ["--ckpt", "base", "--out", "q"]
INFER_LORA = ["--ckpt", "base", "--adapter", "lora", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
UNWRITABLE = "/proc/h2q-reliability/out"  # a folder nobody can make, root included (chmod does not stop root)
CUTS = ["empty", "prefix", "header", "header_end", "data", "last_byte"]
FLIPS = [("first", 1), ("middle", 1), ("last", 1), ("random", 4000)]

CASES = [
    # bad values (train)
    *[train_flag(f, v) for f, v in [
        ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--steps", "-5"), ("--time-budget", "-1"),
        ("--time-budget", "nan"), ("--epochs", "nan"), ("--epochs", "-1"), ("--warmup", "-10"), ("--batch-size", "0"),
        ("--batch-size", "-1"), ("--batch-size", "100000000"), ("--block-size", "-3"), ("--block-size", "65"),
        ("--save-every", "0"), ("--eval-every", "0"), ("--eval-batches", "0"), ("--grad-accum", "0"),
        ("--beta2", "2"), ("--beta2", "nan"), ("--seed", "99999999999999999999999"), ("--seed", "-1"),
        ("--lora-rank", "-2"), ("--min-lr-frac", "2"), ("--weight-decay", "-1"), ("--grad-clip", "nan"),
        ("--lora-alpha", "0"), ("--epochs", "1"), ("--steps", "abc"), ("--preset", "huge"), ("--dtype", "int8")]],
    train_flag("--bogus-flag", names="--bogus-flag"),
    Case("train --lora-rank without --init-from", "train", train_args("fresh", 2, "--lora-rank", "4"), "--init-from"),
    Case("train --init-from without --lora-rank", "train", train_args("fresh", 2, "--init-from", "base"), "--lora-rank"),
    Case("train --init-from its own --out", "train", train_args("base", 2, "--init-from", "base", "--lora-rank", "4"),
         "--out"),
    # bad values (evolve, quantize)
    *[evolve_flag(f, v) for f, v in [
        ("--temperature", "inf"), ("--temperature", "nan"), ("--lr", "nan"), ("--mutation-rate", "nan"),
        ("--agents", "1"), ("--cycles", "0"), ("--lora-rank", "0"), ("--seed", "-1"), ("--eval-episodes", "0"),
        ("--elite-frac", "1"), ("--pbt-factor", "nan"), ("--keep-cycles", "-1"), ("--quant", "int3"),
        ("--lora-rank", "99999999999999999999999"), ("--lora-rank", "33"), ("--lora-rank", "1000000000"),
        ("--agents", "1000000000"), ("--agents", str(2**62))]],
    Case("train --lora-rank above the model's width", "train",
         train_args("fresh", 2, "--init-from", "base", "--lora-rank", "1000000000"), "--lora-rank"),
    Case("evolve --max-rank above the model's width", "evolve", ["--base", "base", "--cycles", "1", "--out", "fresh",
                                                                  *EVOLVE, "--adaptive-rank", "--max-rank", "64"],
         "--max-rank"),
    quantize_flag("--gptq", "--calib-len", "-5", names="--calib-len"),
    quantize_flag("--gptq", "--calib-batches", "0", names="--calib-batches"),
    quantize_flag("--gptq", "--calib-batches", "100000000000", "--calib-len", "64", names="--calib-batches"),
    quantize_flag("--seed", "99999999999999999999", names="--seed"),
    quantize_flag("--mode", "int3", names="--mode"),
    quantize_flag("--group-size", "7", names="--group-size"),
    # paths that are files or cannot be made
    Case("train --out FILE", "train", train_args("afile"), "--out"),
    Case("train --out FILE/sub", "train", train_args("afile/sub"), "--out"),
    Case("train --data-root FILE", "train", [*train_args("fresh"), "--data-root", "afile"], "--data-root"),
    Case("train --data-root FILE/sub", "train", [*train_args("fresh"), "--data-root", "afile/sub"], "--data-root"),
    Case("train --data-dir FILE", "train", [*train_args("fresh"), "--data-dir", "afile"], "--data-dir"),
    Case("train --data-dir missing", "train", [*train_args("fresh"), "--data-dir", "nowhere"], "nowhere"),
    Case("evolve --out FILE", "evolve", ["--base", "base", "--cycles", "1", "--out", "afile", *EVOLVE], "--out"),
    Case("evolve --base missing", "evolve", ["--base", "nowhere", "--cycles", "1", "--out", "fresh", *EVOLVE],
         "nowhere"),
    Case("report --out FILE", "report", ["base", "--out", "afile"], "--out"),
    Case("report RUN_DIR FILE", "report", ["afile"], "afile"),
    Case("prepare --data-root FILE", "prepare", ["--data-dir", "corpus", "--data-root", "afile"], "--data-root"),
    Case("quantize --out FILE", "quantize", ["--ckpt", "base", "--out", "afile"], "--out"),
    Case("train --out unwritable", "train", train_args(UNWRITABLE), "--out"),
    Case("train --data-root unwritable", "train", [*train_args("fresh"), "--data-root", UNWRITABLE], "--data-root"),
    Case("evolve --out unwritable", "evolve", ["--base", "base", "--cycles", "1", "--out", UNWRITABLE, *EVOLVE],
         "--out"),
    Case("report --out unwritable", "report", ["base", "--out", UNWRITABLE], "--out"),
    Case("quantize --out unwritable", "quantize", ["--ckpt", "base", "--out", UNWRITABLE], "--out"),
    Case("export --out FILE", "export", ["--format", "hf", "--ckpt", "base", "--out", "afile"], "--out"),
    Case("export --out unwritable", "export", ["--format", "hf", "--ckpt", "base", "--out", UNWRITABLE], "--out"),
    Case("export --out its input", "export", ["--format", "hf", "--ckpt", "base", "--out", "base"], "--out"),
    Case("import --src not an export", "import", ["--format", "hf", "--src", "base", "--out", "fresh"], "base"),
    # outputs that would overwrite inputs or files of another kind
    Case("quantize --out the float checkpoint's folder", "quantize",
         ["--ckpt", "base/model.safetensors", "--out", "base"], "--out"),
    Case("quantize --out another float model", "quantize", ["--ckpt", "base", "--out", "base2"], "--out"),
    Case("quantize --out a training run", "quantize", ["--ckpt", "base", "--out", "half"], "--out"),
    Case("quantize --out an evolve run", "quantize", ["--ckpt", "base", "--out", "ev"], "--out"),
    Case("train LoRA --out a model folder", "train", train_args("base2", 2, "--init-from", "base", "--lora-rank", "4"),
         "--out"),
    Case("train base --out an adapter folder", "train", train_args("lora"), "--out"),
    Case("train --out an evolve run", "train", train_args("ev"), "--out"),
    Case("evolve --out a training run", "evolve", ["--base", "base", "--cycles", "1", "--out", "half", *EVOLVE],
         "--out"),
    # resume: another base, preset, kind, or run-shaping flags
    Case("train LoRA --resume on another base", "train",
         train_args("lora", 2, "--init-from", "base2", "--lora-rank", "4", "--resume"), "--init-from"),
    Case("train LoRA --resume on another preset", "train",
         train_args("lora", 2, "--init-from", "mini", "--lora-rank", "4", "--resume"), "--init-from"),
    Case("train base state --resume as LoRA", "train",
         train_args("half", 4, "--init-from", "base", "--lora-rank", "4", "--resume"), "half"),
    Case("train LoRA state --resume as base", "train", train_args("lora", 2, "--resume"), "--init-from"),
    Case("train --resume --steps 60 on a finished run", "train", train_args("base", 60, "--resume"), "--steps"),
    Case("train --resume changed --batch-size", "train", [*RESUME_HALF, "--batch-size", "4"], "--batch-size"),
    Case("train --resume changed --lr", "train", [*RESUME_HALF, "--lr", "0.01"], "--lr"),
    Case("train --resume changed --preset", "train", [*RESUME_HALF, "--preset", "mini"], "--preset"),
    Case("train --resume nothing there", "train", train_args("fresh", 4, "--resume"), "--resume"),
    Case("evolve --resume changed --agents", "evolve", [*RESUME_EV, "--agents", "3"], "agents"),
    Case("evolve --resume on another base", "evolve", [*RESUME_EV, "--base", "base2"], "base"),
    Case("evolve --resume nothing there", "evolve", [*RESUME_EV[:5], "fresh", *RESUME_EV[6:]], "--resume"),
    # valid files of the wrong kind
    Case("model file as train_state", "train", RESUME_HALF, "train_state.safetensors",
         copy_over("base/model.safetensors", "half/train_state.safetensors")),
    Case("model file as evolve_state", "evolve", RESUME_EV, "evolve_state.safetensors",
         copy_over("base/model.safetensors", "ev/state/evolve_state.safetensors")),
    Case("adapter as learner state", "evolve", RESUME_EV, "env_c001_r0.safetensors",
         copy_over("ev/cycle_001/agent_00/adapter_model.safetensors", "ev/state/env_c001_r0.safetensors")),
    Case("another run's train_state", "train", RESUME_HALF, "half",
         copy_over("lora/train_state.safetensors", "half/train_state.safetensors")),
    Case("config.json holding []", "evolve", RESUME_EV, "config.json", write("ev/config.json", "[]")),
    Case("config.json missing a key", "evolve", RESUME_EV, "config.json",
         edit_json("ev/config.json", lambda c: {k: v for k, v in c.items() if k != "threads"})),
    Case("config.json garbage", "evolve", RESUME_EV, "config.json", write("ev/config.json", "{not json")),
    Case("metrics.jsonl broken mid-file", "evolve", RESUME_EV, "metrics.jsonl",
         write("ev/metrics.jsonl", '{"cycle": 1}\n{broken\n{"cycle": 1}\n')),
    Case("NaN weights: quantize", "quantize", ["--ckpt", "nanbase", "--out", "q"], "nanbase"),
    Case("NaN weights: train --init-from", "train", train_args("fresh", 2, "--init-from", "nanbase", "--lora-rank", "4"),
         "nanbase"),
    Case("NaN weights: infer", "infer", ["--ckpt", "nanbase", *INFER_LORA[4:]], "nanbase"),
    Case("NaN weights: evolve --base", "evolve", ["--base", "nanbase", "--cycles", "1", "--out", "fresh", *EVOLVE],
         "nanbase"),
    # corrupt, truncated, bit-flipped, retyped files
    *[Case(f"model cut {w}", "quantize", QUANTIZE_BASE, "model.safetensors", cut("base/model.safetensors", w))
      for w in CUTS],
    *[Case(f"model flip {w} x{n}", "quantize", QUANTIZE_BASE, "model.safetensors", flip("base/model.safetensors", w, n))
      for w, n in FLIPS],
    Case("model garbage", "quantize", QUANTIZE_BASE, "model.safetensors", garbage("base/model.safetensors")),
    Case("model dtype F32 -> I32", "quantize", QUANTIZE_BASE, "model.safetensors",
         edit_header("base/model.safetensors", retype)),
    Case("model shape swapped", "quantize", QUANTIZE_BASE, "model.safetensors",
         edit_header("base/model.safetensors", swap_shape)),
    Case("model flip: evolve --base", "evolve", ["--base", "base", "--cycles", "1", "--out", "fresh", *EVOLVE],
         "model.safetensors", flip("base/model.safetensors", "middle")),
    Case("model flip: train --init-from", "train", train_args("fresh", 2, "--init-from", "base", "--lora-rank", "4"),
         "model.safetensors", flip("base/model.safetensors", "middle")),
    *[Case(f"train_state cut {w}", "train", RESUME_HALF, "train_state.safetensors",
           cut("half/train_state.safetensors", w)) for w in CUTS],
    *[Case(f"train_state flip {w} x{n}", "train", RESUME_HALF, "train_state.safetensors",
           flip("half/train_state.safetensors", w, n)) for w, n in FLIPS],
    Case("train_state dtype F32 -> I32", "train", RESUME_HALF, "train_state.safetensors",
         edit_header("half/train_state.safetensors", retype)),
    Case("train_state garbage", "train", RESUME_HALF, "train_state.safetensors",
         garbage("half/train_state.safetensors")),
    *[Case(f"evolve_state cut {w}", "evolve", RESUME_EV, "evolve_state.safetensors",
           cut("ev/state/evolve_state.safetensors", w)) for w in ("empty", "header", "data")],
    Case("evolve_state flip", "evolve", RESUME_EV, "evolve_state.safetensors",
         flip("ev/state/evolve_state.safetensors", "middle")),
    Case("learner state cut", "evolve", RESUME_EV, "env_c001_r0.safetensors", cut("ev/state/env_c001_r0.safetensors",
                                                                                  "data")),
    Case("learner state flip", "evolve", RESUME_EV, "env_c001_r0.safetensors",
         flip("ev/state/env_c001_r0.safetensors", "last")),
    Case("learner state missing", "evolve", RESUME_EV, "env_c001_r0.safetensors",
         lambda root: (root / "ev/state/env_c001_r0.safetensors").unlink()),
    *[Case(f"adapter_config.json {what}", "infer", INFER_LORA, "adapter_config.json",
           edit_json("lora/adapter_config.json", change))
      for what, change in [("lora_alpha edited", lambda c: {**c, "lora_alpha": 1}),
                           ("use_rslora as a string", lambda c: {**c, "use_rslora": "false"}),
                           ("r deleted", lambda c: {k: v for k, v in c.items() if k != "r"}),
                           ("holding []", lambda c: [])]],
    Case("adapter weights flipped", "infer", INFER_LORA, "adapter_model.safetensors",
         flip("lora/adapter_model.safetensors", "middle")),
    Case("adapter on another base", "infer", [*INFER_LORA, "--ckpt", "base2"], "base"),
    # a second run on a held folder
    Case("train while another holds --out", "train", RESUME_HALF, "pid", inject=held_lock("half")),
    Case("train fresh while another holds --out", "train", train_args("fresh"), "pid", inject=held_lock("fresh")),
    Case("evolve while another holds --out", "evolve", RESUME_EV, "pid", inject=held_lock("ev")),
    Case("quantize while another holds --out", "quantize", QUANTIZE_BASE, "pid", inject=held_lock("q")),
    # a disk that fills up
    Case("train disk full from the start", "train", RESUME_HALF, "No space left", inject=disk_full()),
    Case("train disk full at the checkpoint", "train", RESUME_HALF, "train_state.safetensors",
         inject=disk_full(appends=False), may_grow=("half/metrics.jsonl", "half/samples.jsonl")),
    Case("evolve disk full at the first adapter", "evolve", RESUME_EV, "cycle_002",
         inject=disk_full(lambda path: "cycle_002" in path)),
    Case("evolve disk full at the learner state", "evolve", RESUME_EV, "env_c002",
         inject=disk_full(lambda path: "env_c002" in path),
         may_grow=("ev/population.json", "ev/metrics.jsonl", "ev/evolution_stats.json")),
    Case("quantize disk full", "quantize", QUANTIZE_BASE, "No space left", inject=disk_full()),
    Case("train diverges (--lr 10)", "train",
         train_args("fresh", 20, "--lr", "10", "--grad-clip", "0", "--optimizer", "adamw", "--beta2", "0.5",
                    "--dtype", "float32"),
         "diverged"),  # AdamW on every matrix (Muon's orthogonalised steps stay bounded), a short second moment
]


snapshot = FUZZ.snapshot


@dataclass
class Outcome:
    code: int | str  # the exit code, or "traceback" when an exception escaped run_main
    err: str
    damaged: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # lock or temporary files or empty folders left behind


def run_case(case: Case, root: Path, monkeypatch, capsys) -> Outcome:
    """Run one row in `root` (a fresh copy of the assets) and report what happened."""
    monkeypatch.chdir(root)
    if case.setup:
        case.setup(root)
    before, before_folders = snapshot(root), FUZZ.folders(root)
    if case.inject:
        case.inject(root, monkeypatch)
    capsys.readouterr()
    try:
        code = run_main(MAINS[case.entry], case.argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # what a user would see as a traceback
        code = f"traceback: {type(e).__name__}: {e}"
    finally:
        monkeypatch.undo()
        release_held()
    err = capsys.readouterr().err
    after = snapshot(root)
    damaged = [name for name, data in before.items() if after.get(name) != data
               and not (name in case.may_grow and name in after)]
    return Outcome(code, err, damaged, FUZZ.left_behind(root, before, before_folders))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_is_one_clear_line_and_damages_nothing(case, assets, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    shutil.copytree(assets, root)
    outcome = run_case(case, root, monkeypatch, capsys)
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    assert outcome.code == 2, (outcome.code, outcome.err[-2000:])
    assert "Traceback" not in outcome.err
    assert 1 <= len(lines) <= 3, lines
    assert case.names in lines[-1], lines
    assert not outcome.damaged, outcome.damaged
    assert not outcome.left, outcome.left


# -- what the table's rows leave room for: recovery after the failure ----------------------------------
def test_after_a_full_disk_the_run_resumes(assets, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    shutil.copytree(assets, root)
    for case in (c for c in CASES if c.id.startswith(("train disk full at", "evolve disk full at the learner"))):
        assert run_case(case, root, monkeypatch, capsys).code == 2
        monkeypatch.chdir(root)
        assert run_main(MAINS[case.entry], case.argv) == 0
    assert [r["step"] for _, r in checkpoint.read_jsonl_lines(root / "half" / "metrics.jsonl")] == [2, 4]
    assert [r["cycle"] for r in records.read_metrics(root / "ev")] == [1, 2]
    assert sorted(p.name for p in (root / "ev" / "state").iterdir()) == ["env_c002_r0.safetensors",
                                                                          "evolve_state.safetensors"]


def test_resume_of_a_finished_run_keeps_its_files(assets, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    shutil.copytree(assets, root)
    monkeypatch.chdir(root)
    before = snapshot(root / "base")
    assert run_main(MAINS['train'], train_args("base", 4, "--resume")) == 0
    assert snapshot(root / "base") == before
    assert json.loads((root / "base" / "training_log.json").read_text())["final"]["step"] == 4
    assert "nothing to train" in capsys.readouterr().out


def test_a_stale_lock_and_stale_temp_files_are_taken_over(assets, tmp_path, monkeypatch):
    """A lock file whose holder died (no flock on it) and the temporary files of a killed save or
    corpus preparation: the next run takes the folder and removes them; readers never read them."""
    root = tmp_path / "runs"
    shutil.copytree(assets, root)
    monkeypatch.chdir(root)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (root / "half" / checkpoint.LOCK_FILE).write_text(dead.stdout)
    corpus = str((root / "corpus").resolve()).encode()
    prepared = root / "prep" / f"corpus-{data.sha256_bytes(corpus)[:8]}"  # where this copy's corpus is prepared
    stale = [root / "half" / ".train_state.safetensors.0123456789ab.tmp", root / "half" / ".tmpAb12Cd",
             root / "ev" / "state" / ".evolve_state.safetensors.ba9876543210.tmp",
             root / "ev" / "cycle_001" / "agent_00" / ".tmpZz99Yy",
             prepared / ".train.bin.0123456789ab.tmp"]  # a kill while preparing the corpus
    prepared.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_bytes(b"half a file")
    assert run_main(MAINS['train'], RESUME_HALF) == 0
    assert run_main(MAINS['evolve'], RESUME_EV) == 0
    assert not any(p.exists() for p in stale)
    assert not (root / "half" / checkpoint.LOCK_FILE).exists()


def test_readers_see_committed_cycles_only(assets, tmp_path):
    """What a kill in the middle of cycle 2 leaves (its adapters, population.json, a metrics line):
    the agent lookup of infer.py still finds cycle 1's adapter."""
    run = tmp_path / "ev"
    shutil.copytree(assets / "ev", run)
    shutil.copytree(run / "cycle_001", run / "cycle_002")
    population = json.loads((run / "population.json").read_text())
    (run / "population.json").write_text(json.dumps({**population, "cycle": 2}))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"cycle": 2, "best": 9.0}\n{"cycle": 3, "be')
    folder, label = records.resolve_adapter("0", str(run))
    assert folder == run / "cycle_001" / "agent_00" and "cycle_001" in label
    assert [r["cycle"] for r in records.read_metrics(run)] == [1]


def test_a_torn_last_metrics_line_does_not_stop_resume(assets, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(assets, root)
    monkeypatch.chdir(root)
    with open(root / "ev" / "metrics.jsonl", "a") as f:
        f.write('{"cycle": 2, "be')
    assert run_main(MAINS['evolve'], RESUME_EV) == 0
    assert [r["cycle"] for _, r in checkpoint.read_jsonl_lines(root / "ev" / "metrics.jsonl")] == [1, 2]


def test_content_hash_covers_dtype_shape_and_metadata(tmp_path):
    model = Transformer(PRESETS["tiny"])
    path = checkpoint.save_model(tmp_path, model)
    tensors, meta = checkpoint.read_tensors(path)
    assert meta[checkpoint.CONTENT_HASH] == checkpoint.content_hash(tensors, meta)
    for changed_meta, changed in [({**meta, "step": "9"}, tensors),
                                  (meta, {**tensors, "norm.weight": tensors["norm.weight"].double()}),
                                  (meta, {**tensors, "embed.weight": tensors["embed.weight"].t().contiguous()})]:
        assert checkpoint.content_hash(changed, changed_meta) != meta[checkpoint.CONTENT_HASH]
    old_style = tmp_path / "old"  # written before the hash existed: loads, unverified
    from safetensors.torch import save_file
    old_style.mkdir()
    save_file(tensors, str(old_style / checkpoint.MODEL_FILE), {k: v for k, v in meta.items()
                                                                if k != checkpoint.CONTENT_HASH})
    checkpoint.load_model(old_style)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_adapter_says_permission(assets, tmp_path):
    adapter = tmp_path / "lora"
    shutil.copytree(assets / "lora", adapter)
    (adapter / checkpoint.ADAPTER_CONFIG_FILE).chmod(0)
    model, _ = checkpoint.load_model(assets / "base")
    with pytest.raises(checkpoint.FileFormatError, match="permission denied"):
        checkpoint.load_adapter(adapter, model)
