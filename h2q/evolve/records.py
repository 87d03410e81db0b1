"""The evolve run folder (notes/evolve_format.md): the per-cycle records and the resume state, written
and read back. Rank 0 writes everything except each process's own learner state. Every reader of a
run (resume, infer.py's agents, the chat demo, h2q/report/) goes through this file.

Crash safety: every file is written atomically (h2q.checkpoint), and a cycle's files go in the order
adapters (cycle_NNN/) -> population.json -> metrics.jsonl -> evolution_stats.json -> per-process
learner states (state/env_cNNN_rK.safetensors) -> the main state (state/evolve_state.safetensors: bank,
meta adapter; cycle, lineage and best-fitness history in its metadata). The main state is the commit
point: resume reads the cycle it names, drops metrics records and cycle folders past it, and loads
the learner states of that very cycle (older ones are removed only after the main state is written).
Readers see the committed cycles only: cycle folders and metrics records up to the cycle the main
state names, population.json while it describes that cycle, statistics from its history.

One run writes a folder at a time: `RunLock` (rank 0) holds OUT/.lock (h2q.checkpoint.FolderLock)
from start to end, removes the temporary files a killed writer left, and on release removes what an
uncommitted cycle left (cycle folders and learner states past the commit point), so a run that
stops on an error (a full disk) leaves the folder as its last commit.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from h2q import checkpoint
from h2q.errors import FileFormatError, H2QError
from h2q.evolve.evolution import Evaluation, Population

RUN_ROOT = Path("checkpoints/evolve")
STATE_DIR, STATE_FILE = "state", "evolve_state.safetensors"
CONFIG, POPULATION, METRICS, STATS = "config.json", "population.json", "metrics.jsonl", "evolution_stats.json"
CYCLE_DIR, AGENT_DIR = re.compile(r"cycle_(\d+)"), re.compile(r"agent_(\d+)")


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


def agent_dir(cycle_folder: Path, slot: int) -> Path:
    """The adapter folder (h2q/lora.py's format) of population slot `slot` in a cycle folder."""
    return cycle_folder / f"agent_{slot:02d}"


def cycle_dirs(out: Path) -> dict[int, Path]:
    """Every cycle_NNN folder on disk by cycle number, committed or not (readers: `committed_cycles`)."""
    found = {int(m.group(1)): p for p in out.iterdir() if p.is_dir() and (m := CYCLE_DIR.fullmatch(p.name))} \
        if out.is_dir() else {}
    return dict(sorted(found.items()))


def agent_dirs(cycle_folder: Path) -> dict[int, Path]:
    """The agent_MM folders of a cycle folder by slot."""
    found = {int(m.group(1)): p for p in cycle_folder.iterdir() if p.is_dir() and (m := AGENT_DIR.fullmatch(p.name))}
    return dict(sorted(found.items()))


class RunLock:
    """Rank 0's hold on a run folder for the length of a run (see the module docstring)."""

    def __init__(self, out: Path, resume: bool):
        if resume and not (out / STATE_DIR / STATE_FILE).is_file():
            raise H2QError(f"--resume: no evolve state in {out}; start without --resume")
        self.out, self.lock = out, checkpoint.FolderLock(out, "--out")
        folders = [out, out / STATE_DIR]
        for cycle in cycle_dirs(out).values():
            folders += [cycle, *agent_dirs(cycle).values()]
        for folder in folders:
            checkpoint.remove_stale_temps(folder)

    def release(self) -> None:
        try:
            drop_uncommitted(self.out)
        except H2QError:  # an unreadable main state: leave everything for --resume to judge
            pass
        finally:
            self.lock.release()


def drop_uncommitted(out: Path) -> None:
    """Remove the cycle folders and learner states newer than the committed cycle (deleting only:
    this works on a full disk)."""
    last, _ = committed(out)
    for number, folder in cycle_dirs(out).items():
        if number > last:
            shutil.rmtree(folder, ignore_errors=True)
    for path in (out / STATE_DIR).glob("env_c*_r*.safetensors"):
        if _env_cycle(path) > last:
            path.unlink(missing_ok=True)


def _env_cycle(path: Path) -> int:
    return int(path.name[len("env_c"):].split("_")[0])


OTHER_KINDS = (checkpoint.MODEL_FILE, checkpoint.STATE_FILE, checkpoint.ADAPTER_FILE, "training_log.json")


def start_fresh(out: Path, config: dict) -> None:
    if (out / STATE_DIR / STATE_FILE).exists():
        raise H2QError(f"{out} already holds an evolve run; continue it with --resume or choose another --out")
    other = [name for name in OTHER_KINDS if (out / name).exists()]
    if other:
        raise H2QError(f"--out {out} holds {other[0]} of a model or training run, not an evolve run; choose "
                       f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).unlink(missing_ok=True)
    checkpoint.atomic_write_json(out / CONFIG, config)


def check_resumable(out: Path, config: dict, may_change: set[str]) -> None:
    """The saved run's settings must hold every key of `config` and equal it except the keys in
    `may_change`."""
    if not (out / STATE_DIR / STATE_FILE).exists() or not (out / CONFIG).exists():
        raise H2QError(f"--resume: no evolve state in {out}; start without --resume")
    try:
        saved = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise H2QError(f"--resume: {out / CONFIG} is unreadable ({e}); restore it or start a new run") from None
    if not isinstance(saved, dict):
        raise H2QError(f"--resume: {out / CONFIG} holds a JSON {type(saved).__name__}, not the run's settings; "
                       f"restore it or start a new run")
    missing = sorted(config.keys() - saved.keys())
    if missing:
        raise H2QError(f"--resume: {out / CONFIG} lacks {', '.join(missing[:4])} (damaged, or written by another "
                       f"version); restore it or start a new run")
    changed = sorted(k for k in config if k not in may_change and saved.get(k) != config[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {config[k]!r}" for k in changed[:4])
        raise H2QError(f"--resume: settings differ from the run in {out} ({diffs}); resume with the same flags")


def save_cycle(out: Path, cycle: int, population: Population, model) -> None:
    """cycle_NNN/agent_MM/ adapters (each at its agent's rank) and population.json, as evaluated."""
    folder = cycle_dir(out, cycle)
    for slot in range(population.n):
        checkpoint.save_adapter(agent_dir(folder, slot), population.adapter(slot), model)
    checkpoint.atomic_write_json(out / POPULATION, population.to_json(cycle))


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
    checkpoint.append_jsonl(out / METRICS, record)


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


def save_state(out: Path, cycle: int, population: Population, history: list[dict], world_size: int,
               keep_cycles: int = 0) -> None:
    """The commit point of a cycle (after every process saved its learner state). Only then are older
    learner states and, with `keep_cycles` K, the cycle folders older than the newest K removed, so a
    kill at any point leaves the last committed cycle's folder in place."""
    folder = out / STATE_DIR
    meta = {"cycle": str(cycle), "world_size": str(world_size), "history": json.dumps(history),
            "lineage": json.dumps(population.lineage_state())}
    checkpoint.save_tensors(folder / STATE_FILE, population.tensors(), meta)
    for old in folder.glob("env_c*_r*.safetensors"):
        if _env_cycle(old) < cycle:
            old.unlink(missing_ok=True)
    if keep_cycles:
        for number, old in cycle_dirs(out).items():
            if number <= cycle - keep_cycles:
                shutil.rmtree(old, ignore_errors=True)


STATE_KEYS = ("cycle", "world_size", "history", "lineage")


def read_state(out: Path, rank: int, world_size: int, population: dict[str, torch.Tensor],
               learner: dict[str, torch.Tensor]):
    """-> (cycle, lineage, population tensors, history, this rank's learner tensors), each checked
    against what this run holds now (`population`: Population.tensors(), `learner`: the env's
    state_tensors()): keys, shapes, dtypes; the adapters finite."""
    path = out / STATE_DIR / STATE_FILE
    tensors, meta = checkpoint.read_tensors(path, "evolve state")
    fix = "restore it, or start a new run in another --out"
    missing = [k for k in STATE_KEYS if k not in meta]
    if missing:
        kind = " (it is a model checkpoint)" if meta.get("format") == checkpoint.FORMAT else ""
        raise FileFormatError(f"{path} is not an evolve state{kind}: no {', '.join(missing)} in its metadata; {fix}")
    try:
        cycle, saved_size = int(meta["cycle"]), int(meta["world_size"])
        lineage, history = json.loads(meta["lineage"]), json.loads(meta["history"])
        if not (isinstance(lineage, dict) and {"agents", "dead", "next_id"} <= lineage.keys()
                and isinstance(history, list)):
            raise ValueError("lineage or history of the wrong shape")
    except ValueError as e:
        raise FileFormatError(f"{path} has unreadable metadata ({e}); {fix}") from None
    if saved_size != world_size:
        raise H2QError(f"--resume: the run used {saved_size} processes; resume with as many")
    checkpoint.check_tensors(tensors, population, path, f"it does not fit this run's population; {fix}")
    env_path = out / STATE_DIR / f"env_c{cycle:03d}_r{rank}.safetensors"
    env, _ = checkpoint.read_tensors(env_path, "learner state")
    checkpoint.check_tensors(env, learner, env_path, f"it does not fit this run's learner; {fix}", finite=False)
    return cycle, lineage, tensors, history, env


def drop_after(out: Path, cycle: int) -> None:
    """Forget what an interrupted cycle after `cycle` left: its metrics records and adapter folders."""
    metrics = out / METRICS
    kept = [line for line, record in checkpoint.read_jsonl_lines(metrics)
            if not isinstance(record.get("cycle"), (int, float)) or record["cycle"] <= cycle] if metrics.exists() else []
    checkpoint.atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    for number, folder in cycle_dirs(out).items():
        if number > cycle:
            shutil.rmtree(folder, ignore_errors=True)


# -- reading a run: the committed cycles only ----------------------------------------------------------
def is_run(folder: Path) -> bool:
    """Whether `folder` holds files that only an evolve run writes."""
    return (any((folder / name).is_file() for name in (POPULATION, STATS, f"{STATE_DIR}/{STATE_FILE}"))
            or bool(cycle_dirs(folder)))


def committed(out: Path) -> tuple[int, list[dict]]:
    """(the newest committed cycle, the per-cycle bests up to it) from the main state; (0, []) before
    the first commit."""
    path = out / STATE_DIR / STATE_FILE
    if not path.is_file():
        return 0, []
    meta = checkpoint.read_metadata(path, "evolve state")  # readers need the commit point, not the tensors
    try:
        return int(meta["cycle"]), json.loads(meta.get("history", "[]"))
    except (KeyError, ValueError) as e:
        raise H2QError(f"{path} is not an evolve state (metadata: {e}); restore it or start a new run") from None


def committed_cycles(out: Path) -> dict[int, Path]:
    """The cycle folders of committed cycles (--keep-cycles may have removed older ones)."""
    last, _ = committed(out)
    return {number: folder for number, folder in cycle_dirs(out).items() if number <= last}


def newest_run(root: Path = RUN_ROOT) -> Path | None:
    """The run under `root` that committed a cycle last, or None."""
    states = [d / STATE_DIR / STATE_FILE for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    states = [s for s in states if s.is_file()]
    return max(states, key=lambda s: s.stat().st_mtime).parent.parent if states else None


def newest_cycle(out: Path) -> Path:
    """The folder of the newest committed cycle."""
    cycles = committed_cycles(out)
    if not cycles:
        raise H2QError(f"evolve run {out} has no committed cycle_NNN folder yet; let `python evolve.py` "
                        f"finish a cycle")
    return cycles[max(cycles)]


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise H2QError(f"{path} is unreadable ({e}); restore it or re-run") from None


def read_population(out: Path) -> dict:
    """population.json (living agents, every agent ever) while it describes the newest committed
    cycle; {} when it is missing or already describes a cycle still being written."""
    path = out / POPULATION
    if not path.is_file():
        return {}
    population = read_json(path)
    last, _ = committed(out)
    return population if isinstance(population, dict) and population.get("cycle") == last else {}


def population(out: Path) -> list[dict]:
    """The living agents of the newest committed cycle; [] when population.json has none to give."""
    try:
        return read_population(out).get("agents", [])
    except H2QError:
        return []


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log (an evolve run's metrics.jsonl, or a training run's)."""
    return [record for _, record in checkpoint.read_jsonl_lines(path)]


def read_metrics(out: Path) -> list[dict]:
    """The metrics records of the committed cycles, in cycle order."""
    path, (last, _) = out / METRICS, committed(out)
    found = read_jsonl(path) if path.is_file() else []
    return sorted((r for r in found if isinstance(r.get("cycle"), (int, float)) and r["cycle"] <= last),
                  key=lambda r: r["cycle"])


def read_stats(out: Path) -> dict:
    """evolution_stats.json's figures over the committed cycles (from the main state's history)."""
    last, history = committed(out)
    return evolution_stats(history) if last else {}


def read_config(out: Path) -> dict:
    """The run's settings (config.json), {} when missing."""
    return read_json(out / CONFIG) if (out / CONFIG).is_file() else {}


def resolve_adapter(spec: str, run: str | None = None) -> tuple[Path, str] | None:
    """'none' -> None; a folder -> (folder, its name); an agent id or slot -> (its adapter folder in the
    newest committed cycle, 'a0013 (slot 5, cycle_012 of RUN)')."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return None
    if Path(spec).is_dir():
        return Path(spec), spec
    run_dir = Path(run) if run else newest_run()
    if run_dir is None or not run_dir.is_dir():
        where = run or f"{RUN_ROOT}/"
        raise H2QError(f"{spec!r} is not an adapter folder, and there is no evolve run in {where} to find an "
                        f"agent in; give a folder, or run `python evolve.py` first")
    cycle = newest_cycle(run_dir)
    agents = population(run_dir)
    if spec.isdigit():
        slot = int(spec)
        agent_id = next((a.get("id") for a in agents if a.get("slot") == slot), None)
    else:
        agent_id = spec.lower()
        slot = next((a.get("slot") for a in agents if str(a.get("id", "")).lower() == agent_id), None)
        if slot is None:
            alive = ", ".join(sorted(str(a.get("id")) for a in agents)[:20]) or "none listed"
            raise H2QError(f"{spec!r} is neither an adapter folder nor a living agent of {run_dir} "
                            f"(agents: {alive}); use an id, a slot number or a folder")
    folder = agent_dir(cycle, int(slot))
    if not folder.is_dir():
        raise H2QError(f"no adapter for slot {slot} in {cycle}; slots there: "
                        f"{', '.join(f'{s:02d}' for s in agent_dirs(cycle))}")
    return folder, f"{agent_id or 'agent'} (slot {slot}, {cycle.name} of {run_dir})"
