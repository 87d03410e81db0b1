"""The evolve run folder (notes/evolve_format.md): the per-cycle records and the resume state, written
and read back. Rank 0 writes everything except each process's own learner state.

Crash safety: every file is written atomically (h2q.checkpoint), and a cycle's files go in the order
adapters (cycle_NNN/) -> population.json -> metrics.jsonl -> evolution_stats.json -> per-process
learner states (state/env_cNNN_rK.safetensors) -> the main state (state/evolve_state.safetensors: bank,
meta adapter; cycle, lineage and best-fitness history in its metadata). The main state is the commit
point: resume reads the cycle it names, drops metrics records and cycle folders past it, and loads
the learner states of that very cycle (older ones are removed only after the main state is written).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from h2q import checkpoint
from h2q.errors import H2QError
from h2q.evolve.evolution import Evaluation, Population

RUN_ROOT = Path("checkpoints/evolve")
STATE_DIR, STATE_FILE = "state", "evolve_state.safetensors"


def resolve_out(out: str | None, resume: bool) -> Path:
    """`out`, else checkpoints/evolve/run-NNN: the next free number (the newest when resuming)."""
    if out:
        return Path(out)
    numbers = [int(m.group(1)) for p in RUN_ROOT.glob("run-*") if (m := re.fullmatch(r"run-(\d+)", p.name))]
    if resume:
        if not numbers:
            raise H2QError(f"--resume: no run under {RUN_ROOT}/ to continue; start without --resume")
        return RUN_ROOT / f"run-{max(numbers):03d}"
    return RUN_ROOT / f"run-{max(numbers, default=0) + 1:03d}"


def cycle_dir(out: Path, cycle: int) -> Path:
    return out / f"cycle_{cycle:03d}"


def start_fresh(out: Path, config: dict) -> None:
    if (out / STATE_DIR / STATE_FILE).exists():
        raise H2QError(f"{out} already holds an evolve run; continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    checkpoint.atomic_write_json(out / "config.json", config)


def check_resumable(out: Path, config: dict, may_change: set[str]) -> None:
    """The saved run's settings must equal `config` except the keys in `may_change`."""
    if not (out / STATE_DIR / STATE_FILE).exists() or not (out / "config.json").exists():
        raise H2QError(f"--resume: no evolve state in {out}; start without --resume")
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise H2QError(f"--resume: {out / 'config.json'} is unreadable ({e}); start a new run") from None
    changed = sorted(k for k in config if k not in may_change and saved.get(k) != config[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {config[k]!r}" for k in changed[:4])
        raise H2QError(f"--resume: settings differ from the run in {out} ({diffs}); resume with the same flags")


def save_cycle(out: Path, cycle: int, population: Population, model, keep_cycles: int = 0) -> None:
    """cycle_NNN/agent_MM/ adapters (each at its agent's rank) and population.json, as evaluated."""
    folder = cycle_dir(out, cycle)
    for slot in range(population.n):
        population.adapter(slot).save(folder / f"agent_{slot:02d}", model)
    checkpoint.atomic_write_json(out / "population.json", population.to_json(cycle))
    if keep_cycles:
        for old in range(1, cycle - keep_cycles + 1):
            shutil.rmtree(cycle_dir(out, old), ignore_errors=True)


def metrics_record(cycle: int, ev: Evaluation, life: dict[str, np.ndarray], previous_best: float | None,
                   **extra) -> dict:
    """One metrics.jsonl object: fitness statistics, references, per-agent figures, totals, `extra`."""
    f = ev.fitness
    record = {"cycle": cycle, "best": float(f.max()), "median": float(np.median(f)), "mean": float(f.mean()),
              "worst": float(f.min()), **ev.references}
    for key, values in ev.per_agent.items():
        if key == "bpb":  # lower is better
            record.update(best_bpb=float(values.min()), median_bpb=float(np.median(values)))
        else:
            record.update({f"best_{key}": float(values.max()), f"median_{key}": float(np.median(values)),
                           f"mean_{key}": float(values.mean())})
    record.update({k: int(round(v)) for k, v in ev.totals.items()})
    if "delivered" in life:
        record["live_food_delivered"] = int(life["delivered"].sum())
    if "train_loss" in life:
        record["train_bpb"] = float(np.mean(life["train_loss"]) / np.log(2))
    record["improvement"] = 0.0 if previous_best is None else float(f.max()) - previous_best
    return {**record, **extra}


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def evolution_stats(history: list[dict]) -> dict:
    """evolution_stats.json from the per-cycle bests. Cycle 1 sets the first best and counts as
    neither success nor failure; after it a cycle succeeds when its best beats the previous cycle's
    best. average_improvement is the mean of that change over cycles 2.. (the net trend per cycle)."""
    bests = [h["best"] for h in history]
    changes = np.diff(bests) if len(bests) > 1 else np.zeros(0)
    top = max(history, key=lambda h: h["best"]) if history else {}
    return {"total_evolution_cycles": len(bests), "successful_cycles": int((changes > 0).sum()),
            "failed_cycles": int((changes <= 0).sum()),
            "average_improvement": float(changes.mean()) if len(changes) else 0.0,
            "best_fitness": top.get("best"), "best_agent": top.get("agent"), "best_cycle": top.get("cycle")}


def save_env_state(out: Path, cycle: int, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    checkpoint.save_tensors(out / STATE_DIR / f"env_c{cycle:03d}_r{rank}.safetensors", tensors, {"cycle": str(cycle)})


def save_state(out: Path, cycle: int, population: Population, history: list[dict], world_size: int) -> None:
    """The commit point of a cycle (after every process saved its learner state)."""
    folder = out / STATE_DIR
    meta = {"cycle": str(cycle), "world_size": str(world_size), "history": json.dumps(history),
            "lineage": json.dumps(population.lineage_state())}
    checkpoint.save_tensors(folder / STATE_FILE, population.tensors(), meta)
    for old in folder.glob("env_c*_r*.safetensors"):
        if int(old.name[len("env_c"):].split("_")[0]) < cycle:
            old.unlink(missing_ok=True)


def read_state(out: Path, rank: int, world_size: int):
    """-> (cycle, lineage, population tensors, history, this rank's learner tensors)."""
    tensors, meta = checkpoint.read_tensors(out / STATE_DIR / STATE_FILE, "evolve state")
    if int(meta["world_size"]) != world_size:
        raise H2QError(f"--resume: the run used {meta['world_size']} processes; resume with as many")
    cycle = int(meta["cycle"])
    env, _ = checkpoint.read_tensors(out / STATE_DIR / f"env_c{cycle:03d}_r{rank}.safetensors", "learner state")
    return cycle, json.loads(meta["lineage"]), tensors, json.loads(meta["history"]), env


def drop_after(out: Path, cycle: int) -> None:
    """Forget what an interrupted cycle after `cycle` left: its metrics records and adapter folders."""
    metrics = out / "metrics.jsonl"
    kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["cycle"] <= cycle] if metrics.exists() else []
    checkpoint.atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    for folder in out.glob("cycle_*"):
        if folder.name[6:].isdigit() and int(folder.name[6:]) > cycle:
            shutil.rmtree(folder, ignore_errors=True)
