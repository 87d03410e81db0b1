"""See a run: PNG figures and one self-contained `report.html` for a training run, an evolve run, or a
folder of evolve runs in arms (scripts/bench_evolve.py's OUT/ARM/seed-K).

`write_report(run_dir, out_dir=None)` tells the kind by the files in it, draws its figures into
`out_dir` (default RUN_DIR/report/) and writes `report.html` there with every figure embedded as a
base64 data URI (and linked to its PNG beside it), so the page opens offline with nothing external.
Each page opens with a headline of the few numbers that matter, and labels every figure in words.

* training run (metrics.jsonl of evaluations, training_log.json, samples.jsonl): headline val bits
  per byte and tokens/s; train/val bits per byte (= loss / ln 2, so loss is not drawn again) against
  steps and wall-clock; the learning rate (the schedule of `h2q.train.lr_at` and the logged values)
  and throughput; sample text at a few checkpoints; an adapter fine-tune's adapter heatmap.
* evolve run (notes/evolve_format.md, read through h2q/evolve/records.py, so a live run shows its
  committed cycles only): headline best / median % of the oracle, cycles, wall-clock; fitness per
  cycle against the oracle and random levels; a table of the agents (the ids `/adapter a0011`
  takes); diversity, deaths, food; time split into living and evaluating; the actions taken per
  cycle; the world (cycle_NNN/world.json) with one agent's trajectory and every agent's visits; the
  lineage tree labelled with agent ids; each agent's update norm ||s B@A||_F per layer and module.
  A social run (`--env social`, `_social_sections`) draws instead of the world: engagement, fluency,
  topic accuracy, diversity, the network's density and clustering and the readers against their
  baselines per cycle; the follow graph of the first and the newest cycle (cycle_NNN/network.json);
  and sample posts of both cycles beside the base model's, on the same held-out prompts.
* arms (a folder whose subfolders are evolve runs, or folders of them, one per seed): the IQM of the
  normalised score (`normalised` in a run's heldout.jsonl, as scripts/bench_evolve.py scores it, or
  in its metrics: 0 = random, 1 = oracle, one value per held-out world seed) against cycles, one line per arm with its 95 % stratified-bootstrap band (rliable's method,
  h2q/evolve/stats.py), and a table of the arms.

Matplotlib is an optional extra (`pip install -e .[plot]`), imported only inside the functions that
draw, so this module imports without it. It draws on the Agg canvas directly (no pyplot): no GUI
backend, no global figure state, safe to call at the end of another program's run.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import numpy as np

from h2q.checkpoint import ADAPTER_CONFIG_FILE as CONFIG_FILE
from h2q.checkpoint import ADAPTER_FILE, STATE_FILE, atomic_write, atomic_write_text, ensure_folder, read_tensors
from h2q.errors import FileFormatError, H2QError
from h2q.evolve import records, stats
from h2q.evolve.records import read_json, read_jsonl
from h2q.lora import LINEARS, LoraConfig
from h2q.train import TrainConfig, lr_at

INSTALL_HINT = "the report draws with matplotlib, which is not installed; install it with: pip install -e .[plot]"
DPI = 110
LN2 = math.log(2)
ACTION_NAMES = {"N": "N: move north", "S": "S: move south", "E": "E: move east", "W": "W: move west",
                "P": "P: pick up food", "D": "D: drop food at home", "F": "F: eat carried food", "Z": "Z: wait"}
WORLD_FILE, SAMPLES_FILE, NETWORK_FILE = "world.json", "samples.jsonl", "network.json"
HELDOUT = "heldout.jsonl"  # written by scripts/bench_evolve.py into each run it scores
SAMPLE_STEPS = 4  # checkpoints whose samples the training report shows


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise H2QError(INSTALL_HINT) from None


def _figure(nrows: int, ncols: int, width: float, height: float):
    """A constrained-layout figure on the Agg canvas and its (nrows, ncols) axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def _integer_axis(ax, *axes: str) -> None:
    from matplotlib.ticker import MaxNLocator
    for name in axes or ("x",):
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.1f} s"


# -- reading a run (an evolve run's folder: h2q/evolve/records.py) ---------------------------------
def arms(folder: Path) -> dict[str, list[Path]]:
    """The arms of a benchmark folder: each subfolder that is an evolve run (an arm of one run) or
    holds evolve runs (one per seed), by name; {} when there are none."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        runs = [sub] if records.is_run(sub) else sorted(p for p in sub.iterdir() if p.is_dir() and records.is_run(p))
        if runs:
            found[sub.name] = runs
    return found


def detect_kind(run_dir: Path) -> str:
    """'train', 'evolve' or 'arms', from the files present (a bare metrics.jsonl: from its first record)."""
    if not run_dir.is_dir():
        raise H2QError(f"run folder {run_dir} does not exist; give a training run (e.g. checkpoints/base) "
                        f"or an evolve run (e.g. checkpoints/evolve/RUN)")
    if records.is_run(run_dir):
        return "evolve"
    if any((run_dir / n).is_file() for n in ("training_log.json", STATE_FILE)):
        return "train"
    metrics = run_dir / "metrics.jsonl"
    first = read_jsonl(metrics)[:1] if metrics.is_file() else []
    if first and "cycle" in first[0]:
        return "evolve"
    if first and "val_loss" in first[0]:
        return "train"
    if arms(run_dir):
        return "arms"
    raise H2QError(f"{run_dir} holds neither a training run (metrics.jsonl, training_log.json) nor an evolve "
                    f"run (metrics.jsonl, population.json, cycle_NNN/) nor folders of evolve runs; point at the "
                    f"run's own folder")


def _metrics(run_dir: Path, x_key: str) -> list[dict]:
    """A training run's evaluations (x_key 'step') or an evolve run's committed cycles ('cycle')."""
    path = run_dir / "metrics.jsonl"
    if x_key == "cycle":
        found = records.read_metrics(run_dir)
    else:
        found = [r for r in read_jsonl(path) if isinstance(r.get(x_key), (int, float))] if path.is_file() else []
    if not found:
        raise H2QError(f"nothing to report yet: {path} holds no records with '{x_key}'"
                        f"{' of a committed cycle' if x_key == 'cycle' else ''}; "
                        f"wait for the run's first {'evaluation' if x_key == 'step' else 'cycle'}")
    return found


def _series(rows: list[dict], x_key: str, key: str, scale: float = 1.0) -> tuple[list, list]:
    """(x, y) over the records that hold a number under `key`."""
    pairs = [(r[x_key], r[key] * scale) for r in rows if isinstance(r.get(key), (int, float))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def read_world(path: Path) -> dict:
    """A cycle's world.json (the map at an episode's start, one agent's trajectory, every agent's
    visits), checked; a file that does not fit is a FileFormatError naming it."""
    world = read_json(path)
    try:
        size = int(world["size"])
        walls, visits = np.asarray(world["walls"], dtype=bool), np.asarray(world["visits"], dtype=np.float64)
        trajectory = world["trajectory"]
        positions = np.asarray(trajectory["positions"], dtype=np.int64).reshape(-1, 2)  # (ticks, 2) as (x, y)
        carrying = np.asarray(trajectory.get("carrying", [0] * len(positions)), dtype=bool)
        food = np.asarray(world.get("food", []), dtype=np.int64).reshape(-1, 2)
        home = [int(v) for v in world["home"]]
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path} is not a world picture ({type(e).__name__}: {e}); re-run the cycle or "
                              f"delete the file") from None
    if walls.shape != (size, size) or visits.shape != (size, size) or len(carrying) != len(positions) \
            or len(home) != 2:
        raise FileFormatError(f"{path} is not a world picture: walls and visits must be {size}x{size}, carrying as "
                              f"long as positions; re-run the cycle or delete the file")
    return {"level": world.get("level", "?"), "size": size, "walls": walls, "visits": visits, "home": home,
            "food": food, "seed": world.get("seed"), "agent": trajectory.get("agent", "?"),
            "slot": trajectory.get("slot"), "positions": positions, "carrying": carrying}


def read_samples(run_dir: Path) -> dict[int, list[dict]]:
    """samples.jsonl of a training run by step: [{"prompt", "text"}, ...]; {} when there is none."""
    path = run_dir / SAMPLES_FILE
    by_step: dict[int, list[dict]] = {}
    for r in read_jsonl(path) if path.is_file() else []:
        if isinstance(r.get("step"), int) and isinstance(r.get("text"), str):
            by_step.setdefault(r["step"], []).append({"prompt": str(r.get("prompt", "")), "text": r["text"]})
    return dict(sorted(by_step.items()))


def adapter_norms(adapter_dir: Path) -> dict[str, float]:
    """Module key -> ||s B@A||_F, the size of the update the adapter in `adapter_dir` adds there."""
    config = read_json(adapter_dir / CONFIG_FILE)
    try:
        scaling = LoraConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                             rslora=bool(config.get("use_rslora", False))).scaling
    except (KeyError, TypeError, ValueError) as e:
        raise H2QError(f"{adapter_dir / CONFIG_FILE} is not an h2q adapter config ({e}); re-save the adapter") from None
    tensors, _ = read_tensors(adapter_dir / ADAPTER_FILE, "adapter weights")
    norms = {}
    for name, A in tensors.items():
        if name.endswith(".lora_A"):
            key = name[: -len(".lora_A")]
            if key + ".lora_B" not in tensors:
                raise H2QError(f"{adapter_dir / ADAPTER_FILE} has {name} without its lora_B; re-save the adapter")
            A, B = A.double(), tensors[key + ".lora_B"].double()  # (r, in), (out, r)
            # ||B A||_F^2 = trace(A^T B^T B A) = <B^T B, A A^T>: two (r, r) products, no (out, in) delta
            squared = ((B.T @ B) * (A @ A.T)).sum().clamp(min=0)
            norms[key] = abs(scaling) * math.sqrt(squared.item())
    return norms


def _column_order(key: str):
    """'layers.3.mlp.up_proj' sorts by layer, then in the model's linear order."""
    parts = key.split(".")
    layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    names = list(LINEARS)
    return layer, names.index(parts[-1]) if parts[-1] in names else len(names), key


def _scored(run: Path) -> list[dict]:
    """A run's held-out scores: scripts/bench_evolve.py's heldout.jsonl where it scored the run, else
    the metrics records."""
    path = run / HELDOUT
    return records.read_jsonl(path) if path.is_file() else records.read_metrics(run)


def normalised_scores(runs: list[Path]) -> tuple[list[int], np.ndarray] | None:
    """(cycles, scores (cycles, runs, tasks)) of the `normalised` lists (one per held-out world seed)
    over the cycles every run has them for, with one length; None when no cycle is common to all."""
    per_run = [{r["cycle"]: r["normalised"] for r in _scored(run) if isinstance(r.get("normalised"), list)}
               for run in runs]
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    lengths = {len(p[c]) for p in per_run for c in common}
    if not common or len(lengths) != 1 or 0 in lengths:
        return None
    return common, np.array([[p[c] for p in per_run] for c in common], dtype=np.float64)  # (C, R, T)


# -- training figures ------------------------------------------------------------------------------
def _time_axis(seconds: list[float]) -> tuple[list[float], str]:
    top = max(seconds, default=0.0)
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if top >= 2 * size:
            return [s / size for s in seconds], f"wall-clock ({unit})"
    return seconds, "wall-clock (s)"


def _plot_training_curves(rows: list[dict], path: Path) -> Path:
    fig, axes = _figure(1, 2, 11, 3.8)
    timed = [r for r in rows if isinstance(r.get("elapsed_s"), (int, float))]
    seconds, time_label = _time_axis([r["elapsed_s"] for r in timed])
    timed = [{**r, "wall": s} for r, s in zip(timed, seconds)]
    for ax, (x_key, x_label, data) in zip(axes[0], (("step", "optimizer step", rows), ("wall", time_label, timed))):
        for key, label in (("train_loss", "train (mean since previous eval)"), ("val_loss", "val")):
            ax.plot(*_series(data, x_key, key, 1 / LN2), marker="o", markersize=3, label=label)
        ax.set(xlabel=x_label, ylabel="bits per byte (loss / ln 2)", title=f"bits per byte vs {x_label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _plot_schedule(rows: list[dict], log: dict | None, path: Path) -> Path:
    fig, axes = _figure(1, 2, 11, 3.6)
    ax = axes[0][0]
    if log and log.get("max_steps") and log.get("train_config"):
        known = {f.name for f in fields(TrainConfig)}  # a log from another version may differ in flags
        cfg = TrainConfig(**{k: v for k, v in log["train_config"].items() if k in known})
        steps = int(log["max_steps"])
        ax.plot(range(1, steps + 1), [lr_at(s, cfg, steps) for s in range(steps)], label="schedule (warmup-stable-decay)")
    ax.plot(*_series(rows, "step", "lr"), "o", markersize=4, label="logged at evaluations")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax = axes[0][1]
    ax.plot(*_series(rows, "step", "tokens_per_s"), marker="o", markersize=3, label="mean since start")
    ax.set(xlabel="optimizer step", ylabel="tokens (bytes) per second", title="training throughput")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


# -- evolve figures --------------------------------------------------------------------------------
def _plot_fitness(rows: list[dict], path: Path) -> Path:
    text_env = all(r.get("env") == "text" for r in rows)
    second = ("% of oracle", "% of the oracle's food rate", "_pct_oracle") if any("best_pct_oracle" in r for r in rows) \
        else ("bits per byte (held-out)", "bits/byte, lower is better", "_bpb") if any("best_bpb" in r for r in rows) \
        else None
    fig, axes = _figure(1, 2 if second else 1, 12 if second else 7, 4.2)
    ax = axes[0][0]
    cycles, worst = _series(rows, "cycle", "worst")
    if worst:
        best = dict(zip(*_series(rows, "cycle", "best")))
        ax.fill_between(cycles, worst, [best.get(c, math.nan) for c in cycles], alpha=0.15, label="worst to best")
    for key, style in (("best", "-"), ("median", "-"), ("mean", "-"), ("oracle", "--"), ("random", ":")):
        xs, ys = _series(rows, "cycle", key)
        if ys:
            ax.plot(xs, ys, style, marker="o" if style == "-" else None, markersize=3, label=key)
    units = "\u2212bits/byte, higher is better" if text_env else "food delivered/step + survival"
    ax.set(xlabel="cycle", ylabel=f"fitness ({units})", title="population fitness per cycle")
    if second:
        title, unit, suffix = second
        ax2 = axes[0][1]
        for stat in ("best", "median", "mean"):
            xs, ys = _series(rows, "cycle", stat + suffix)
            if ys:
                ax2.plot(xs, ys, marker="o", markersize=3, label=stat)
        if suffix == "_pct_oracle":
            ax2.axhline(100, color="k", linestyle="--", linewidth=1, label="oracle = 100 %")
        ax2.set(xlabel="cycle", ylabel=unit, title=title)
    for ax in axes[0]:
        _integer_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def _plot_population(rows: list[dict], path: Path) -> Path | None:
    """Diversity, and the evaluation's deaths and food as bars; a count that is zero every cycle is a
    sentence in its panel ("no deaths"), not an empty plot."""
    panels = [(key, label, title, none) for key, label, title, none in (
        ("diversity", "mean pairwise adapter distance", "diversity of the adapters", None),
        ("deaths", "agents died (count)", "deaths during evaluation", "no deaths"),
        ("food_delivered", "food delivered (items)", "food delivered during evaluation", "no food delivered"))
        if _series(rows, "cycle", key)[1]]
    if not panels:
        return None
    fig, axes = _figure(1, len(panels), 3.8 * len(panels) + 1, 3.6)
    for ax, (key, label, title, none) in zip(axes[0], panels):
        xs, ys = _series(rows, "cycle", key)
        if none and not any(ys):
            ax.text(0.5, 0.5, f"{none} in {len(xs)} cycle{'s' * (len(xs) != 1)}", ha="center", va="center",
                    transform=ax.transAxes, fontsize=12, color="0.3")
            ax.set(xticks=[], yticks=[], title=title)
            continue
        if none:
            ax.bar(xs, ys)
            _integer_axis(ax, "y")
        else:
            ax.plot(xs, ys, marker="o", markersize=3)
        ax.set(xlabel="cycle", ylabel=label, title=title)
        _integer_axis(ax)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_time(rows: list[dict], path: Path) -> Path | None:
    """Each cycle's wall-clock as stacked bars: living, evaluating, the rest (records, breeding)."""
    timed = [r for r in rows if isinstance(r.get("wall_s"), (int, float))]
    if not timed:
        return None
    fig, axes = _figure(1, 1, 8, 3.6)
    ax = axes[0][0]
    cycles = [r["cycle"] for r in timed]
    bottom = np.zeros(len(timed))
    for key, label in (("live_s", "living (online learning)"), ("eval_s", "evaluating (learning off)")):
        part = np.array([r.get(key) or 0.0 for r in timed])
        if part.any():
            ax.bar(cycles, part, bottom=bottom, label=label)
            bottom += part
    rest = np.maximum(np.array([r["wall_s"] for r in timed]) - bottom, 0)
    ax.bar(cycles, rest, bottom=bottom, label="saving and breeding" if bottom.any() else "whole cycle", color="0.7")
    ax.set(xlabel="cycle", ylabel="wall-clock (s)", title="time per cycle")
    _integer_axis(ax)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def _plot_actions(rows: list[dict], path: Path) -> Path | None:
    """The share of each action among all the agents' actions of each cycle's evaluation."""
    counted = [r for r in rows if isinstance(r.get("actions"), dict) and sum(r["actions"].values()) > 0]
    if not counted:
        return None
    names = list(ACTION_NAMES) + sorted({a for r in counted for a in r["actions"]} - set(ACTION_NAMES))
    fig, axes = _figure(1, 1, 9, 3.8)
    ax = axes[0][0]
    cycles = [r["cycle"] for r in counted]
    totals = np.array([sum(r["actions"].values()) for r in counted], dtype=np.float64)
    bottom = np.zeros(len(counted))
    colours = [f"C{i}" for i in range(10)]
    for i, name in enumerate(names):
        share = np.array([r["actions"].get(name, 0) for r in counted]) / totals * 100
        ax.bar(cycles, share, bottom=bottom, label=ACTION_NAMES.get(name, name), color=colours[i % 10])
        bottom += share
    ax.set(xlabel="cycle", ylabel="% of actions", title="actions taken during each cycle's evaluation (all agents)",
           ylim=(0, 100))
    _integer_axis(ax)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def _draw_map(ax, world: dict) -> None:
    from matplotlib.colors import ListedColormap
    walls = np.ma.masked_where(~world["walls"], world["walls"])
    ax.imshow(walls, cmap=ListedColormap(["0.25"]), interpolation="nearest", zorder=2)
    hx, hy = world["home"]
    ax.plot(hx, hy, "s", color="gold", markeredgecolor="k", markersize=11, zorder=4)
    ax.annotate("home", (hx, hy), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8, zorder=5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlim(-0.5, world["size"] - 0.5)
    ax.set_ylim(world["size"] - 0.5, -0.5)


def _plot_world(worlds: list[tuple[int, dict]], path: Path) -> Path:
    """Per world picture: the map with the followed agent's trajectory (coloured by tick, thick while
    carrying food) beside the heatmap of all agents' visits."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import PowerNorm
    from matplotlib.lines import Line2D
    fig, axes = _figure(len(worlds), 2, 11, 5.2 * len(worlds))
    for (ax, heat), (cycle, w) in zip(axes, worlds):
        _draw_map(ax, w)
        if len(w["food"]):
            ax.plot(w["food"][:, 0], w["food"][:, 1], "o", color="tab:green", markersize=5, zorder=3)
        pos, carrying = w["positions"], w["carrying"]
        segments = np.stack([pos[:-1], pos[1:]], axis=1)  # (ticks - 1, 2 points, (x, y))
        lines = LineCollection(segments, cmap="plasma", linewidths=np.where(carrying[1:], 3.5, 1.5), zorder=3)
        lines.set_array(np.arange(len(segments)))
        ax.add_collection(lines)
        if len(pos):
            ax.plot(*pos[0], "o", color="k", markersize=7, zorder=5)
            ax.plot(*pos[-1], "X", color="k", markersize=8, zorder=5)
        picked = int((carrying[1:] & ~carrying[:-1]).sum())
        dropped = carrying[:-1] & ~carrying[1:] & (pos[1:] == w["home"]).all(axis=1)
        slot = f" (slot {w['slot']})" if w["slot"] is not None else ""
        ax.set_title(f"cycle {cycle}: agent {w['agent']}{slot}, {max(len(pos) - 1, 0)} ticks on world seed {w['seed']}\n"
                     f"picked up {picked}, delivered {int(dropped.sum())}", fontsize=10)
        fig.colorbar(lines, ax=ax, label="tick", shrink=0.8)
        visits = np.ma.masked_where(w["walls"], w["visits"])
        image = heat.imshow(visits, cmap="viridis", norm=PowerNorm(0.5, vmin=0), interpolation="nearest")
        _draw_map(heat, w)
        heat.set_title(f"cycle {cycle}: where all agents went ({w['level']} level)", fontsize=10)
        fig.colorbar(image, ax=heat, label="agent-ticks on the cell (square-root scale)", shrink=0.8)
    fig.legend(handles=[Line2D([], [], color="tab:purple", linewidth=1.5, label="path, empty-handed"),
                        Line2D([], [], color="tab:purple", linewidth=3.5, label="path, carrying food"),
                        Line2D([], [], marker="o", linestyle="", color="k", label="start"),
                        Line2D([], [], marker="X", linestyle="", color="k", label="end"),
                        Line2D([], [], marker="o", linestyle="", color="tab:green", label="food at the start"),
                        Line2D([], [], marker="s", linestyle="", color="0.25", label="wall")],
               fontsize="small", loc="outside lower center", ncol=6)
    return _save(fig, path)


def _last_fitness(agent: dict) -> float:
    values = [v for v in agent.get("fitness") or [] if isinstance(v, (int, float))]
    return values[-1] if values else math.nan


def _plot_lineage(population: dict, path: Path) -> Path | None:
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    agents = {a["id"]: a for a in population.get("history", []) + population.get("agents", []) if "id" in a}
    if not agents:
        return None
    alive = {a.get("id") for a in population.get("agents", [])}
    place = {i: (a.get("birth_cycle", 0), a.get("slot", n)) for n, (i, a) in enumerate(agents.items())}
    slots = sorted({y for _, y in place.values()})
    fig, axes = _figure(1, 1, 12, max(3.5, 0.34 * len(slots) + 1.8))
    ax = axes[0][0]
    lifespans = [[place[i], (place[i][0] + max(len(a.get("fitness") or []) - 1, 0), place[i][1])] for i, a in agents.items()]
    ax.add_collection(LineCollection(lifespans, colors="0.85", linewidths=5, zorder=1))
    edges = [[place[p], place[i]] for i, a in agents.items() for p in a.get("parents") or [] if p in place]
    ax.add_collection(LineCollection(edges, colors="0.3", linewidths=0.8, alpha=0.6, zorder=2))
    ids = list(agents)
    points = ax.scatter([place[i][0] for i in ids], [place[i][1] for i in ids], c=[_last_fitness(agents[i]) for i in ids],
                        cmap="viridis", s=45, zorder=3, plotnonfinite=True,
                        edgecolors=["k" if i in alive else "none" for i in ids], linewidths=1.2)
    for i in ids:
        ax.annotate(i, place[i], xytext=(4, 4), textcoords="offset points", fontsize=7,
                    fontweight="bold" if i in alive else "normal", zorder=4)
    fig.colorbar(points, ax=ax, label="fitness at last evaluation")
    fig.legend(handles=[Line2D([], [], color="0.3", label="parent -> child"),
                        Line2D([], [], color="0.85", linewidth=5, label="lifespan (cycles evaluated)"),
                        Line2D([], [], marker="o", linestyle="", markeredgecolor="k", color="0.6", label="alive at the end"),
                        Line2D([], [], marker="o", linestyle="", color="0.6", label="dead or replaced")],
               fontsize="small", loc="outside lower center", ncol=4)
    ax.set(xlabel="birth cycle", ylabel="population slot",
           title=f"lineage of {len(agents)} agents, labelled with their ids (infer.py --adapter ID)")
    _integer_axis(ax, "x", "y")
    ax.autoscale_view()
    ax.margins(0.06)
    return _save(fig, path)


def _plot_adapter_heatmap(rows: list[tuple[str, dict[str, float]]], title: str, path: Path) -> Path:
    """Rows = adapters, columns = layer.module, value = ||s B@A||_F; with several adapters a second
    panel divides each row by its largest value, so where each one specialises shows at any scale."""
    keys = sorted({k for _, norms in rows for k in norms}, key=_column_order)
    values = np.array([[norms.get(k, np.nan) for k in keys] for _, norms in rows])  # (agents, layer.module)
    panels = [(values, r"$\|s\,BA\|_F$", "update norm")]
    if len(rows) > 1:
        panels.append((values / np.maximum(np.nanmax(values, axis=1, keepdims=True), 1e-30),
                       "share of the row's largest", "relative to each agent's largest"))
    columns = [f"{k.split('.')[1]}.{k.split('.')[-1]}" if _column_order(k)[0] >= 0 else k for k in keys]
    panel_height = 0.3 * len(rows) + 1.8
    fig, axes = _figure(len(panels), 1, max(7.0, 0.24 * len(keys) + 3.5), len(panels) * panel_height + 0.4)
    for (ax,), (data, label, subtitle) in zip(axes, panels):
        image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=label)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
        ax.set(xlabel="layer.module", ylabel="agent", title=f"{title}: {subtitle}")
    return _save(fig, path)


def _plot_arms(curves: dict[str, tuple[list[int], np.ndarray, np.ndarray, np.ndarray, int]], path: Path) -> Path:
    fig, axes = _figure(1, 1, 9, 4.4)
    ax = axes[0][0]
    for i, (arm, (cycles, point, low, high, n_runs)) in enumerate(curves.items()):
        ax.plot(cycles, point, marker="o", markersize=3, color=f"C{i}", label=f"{arm} ({n_runs} run{'s' * (n_runs > 1)})")
        ax.fill_between(cycles, low, high, color=f"C{i}", alpha=0.2)
    ax.axhline(1, color="k", linestyle="--", linewidth=1, label="oracle = 1")
    ax.axhline(0, color="k", linestyle=":", linewidth=1, label="random = 0")
    ax.set(xlabel="cycle", ylabel="IQM of the normalised score",
           title="interquartile mean over runs x held-out seeds, 95 % stratified-bootstrap band")
    _integer_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


# -- the page --------------------------------------------------------------------------------------
LABELS = {  # metrics and statistics keys in words; keys not here are shown as they are
    "evaluations": "evaluations", "step": "optimizer step", "tokens": "tokens (bytes) seen by the last evaluation",
    "tokens_seen": "tokens (bytes) seen in all",
    "elapsed_s": "wall-clock (s)", "lr": "learning rate", "train_bpb": "train bits/byte",
    "val_bpb": "val bits/byte", "val_ppl": "val perplexity (per byte)", "tokens_per_s": "tokens/s (mean since start)",
    "steps": "steps run", "max_steps": "steps planned", "interrupted": "interrupted", "params": "parameters",
    "world_size": "processes", "device": "device", "out": "run folder",
    "best": "best agent's fitness", "median": "median fitness", "mean": "mean fitness", "worst": "worst fitness",
    "oracle": "scripted oracle's fitness (same seeds)", "random": "random policy's fitness (same seeds)",
    "best_pct_oracle": "best agent, % of the oracle's food rate", "median_pct_oracle": "median agent, % of the oracle",
    "mean_pct_oracle": "mean agent, % of the oracle", "best_bpb": "best agent's bits/byte (held-out)",
    "median_bpb": "median agent's bits/byte", "base_bpb": "base model's bits/byte (no adapter)",
    "food_delivered": "food delivered during evaluation", "deaths": "deaths during evaluation",
    "live_food_delivered": "food delivered while living (learning on)",
    "improvement": "best fitness minus the previous cycle's", "diversity": "diversity (mean pairwise adapter distance)",
    "mean_rank": "mean adapter rank", "live_s": "time living (s)", "eval_s": "time evaluating (s)",
    "wall_s": "time of the whole cycle (s)",
    "total_evolution_cycles": "cycles committed",
    "successful_cycles": "cycles whose best fitness beat the previous cycle's best",
    "failed_cycles": "cycles whose best did not (cycle 1 counts as neither)",
    "average_improvement": "mean change of the best fitness per cycle", "best_fitness": "best fitness of any cycle",
    "best_agent": "the agent that had it", "best_cycle": "in cycle",
}
# drawn, in the config, or shown as bits/byte instead
HIDDEN = {"cycle", "strategy", "env", "actions", "normalised", "train_loss", "val_loss"}


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.5g}"
    return html.escape(json.dumps(value) if isinstance(value, (list, tuple)) else str(value))


def _table(title: str, rows: dict, labels: dict | None = None) -> str:
    """Rows in words: keys named in `labels` come first, in its order, under its names."""
    labels = labels or {}
    order = {k: n for n, k in enumerate(labels)}
    rows = dict(sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order))))
    body = "".join(f"<tr><th>{html.escape(str(labels.get(k, k)))}</th><td>{_cell(v)}</td></tr>" for k, v in rows.items())
    return f"<h3>{html.escape(title)}</h3><table>{body}</table>"


def _grid_table(title: str, header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>"


def _headline(cards: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><div class="value">{html.escape(value)}</div>'
                                            f'<div class="label">{html.escape(label)}</div></div>'
                                            for label, value in cards) + "</div>"


def _figure_html(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f'<figcaption><a href="{path.name}">{path.name}</a>: {html.escape(caption)}</figcaption></figure>')


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _in_words(record: dict) -> dict:
    """A metrics record for a table: losses as bits/byte, lists and drawn keys left out."""
    shown = {k: v for k, v in record.items() if k not in HIDDEN and not isinstance(v, (list, dict))}
    for key in ("train_loss", "val_loss"):
        if isinstance(record.get(key), (int, float)) and key.replace("loss", "bpb") not in shown:
            shown[key.replace("loss", "bpb")] = record[key] / LN2
    return shown


def _samples_html(samples: dict[int, list[dict]]) -> str:
    steps = list(samples)
    picked = sorted({steps[round(k * (len(steps) - 1) / max(SAMPLE_STEPS - 1, 1))] for k in range(SAMPLE_STEPS)})
    parts = ["<h3>Samples at a few checkpoints</h3>",
             _note(f"the model's continuation (plain) of each prompt (bold), from {SAMPLES_FILE}; "
                   f"whitespace is kept as sampled")]
    for step in picked:
        parts.append(f"<h4>step {step}</h4>")
        parts += [f'<pre class="sample"><b>{html.escape(s["prompt"])}</b>{html.escape(s["text"])}</pre>'
                  for s in samples[step]]
    return "".join(parts)


def _training_sections(run_dir: Path, out_dir: Path) -> list[str]:
    rows = _metrics(run_dir, "step")
    log = read_json(run_dir / "training_log.json") if (run_dir / "training_log.json").is_file() else None
    with_bpb = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    best = min(with_bpb, key=lambda r: r["val_loss"]) if with_bpb else {}
    last = rows[-1]
    cards = [("best val bits/byte" + (f" (step {best['step']})" if best else ""),
              f"{best['val_loss'] / LN2:.4f}" if best else "n/a")]
    if isinstance(last.get("val_loss"), (int, float)):
        cards.append((f"last val bits/byte (step {last['step']})", f"{last['val_loss'] / LN2:.4f}"))
    if isinstance(last.get("tokens_per_s"), (int, float)):
        cards.append(("tokens/s (mean over the run)", f"{last['tokens_per_s']:,.0f}"))
    cards.append(("steps", f"{last['step']:,}" + (f" of {log['max_steps']:,}" if log and log.get("max_steps") else "")))
    if isinstance(last.get("elapsed_s"), (int, float)):
        cards.append(("wall-clock", _duration(last["elapsed_s"])))
    if log and log.get("params"):
        cards.append(("parameters", f"{log['params'] / 1e6:.2f} M"))
    parts = ["<h2>Training</h2>", _headline(cards),
             _figure_html(_plot_training_curves(rows, out_dir / "training_curves.png"),
                          "train and validation bits per byte (loss in nats / ln 2), against steps and wall-clock"),
             _figure_html(_plot_schedule(rows, log, out_dir / "training_schedule.png"), "learning rate and throughput")]
    samples = read_samples(run_dir)
    parts.append(_samples_html(samples) if samples else
                 _note(f"no {SAMPLES_FILE} in the run folder: no sample text (training writes it at evaluations)"))
    if (run_dir / ADAPTER_FILE).is_file():
        parts.append(_figure_html(_plot_adapter_heatmap([("adapter", adapter_norms(run_dir))], "adapter",
                                                        out_dir / "adapter_norms.png"),
                                  "the trained adapter's update norm ||s B@A||_F per layer and module"))
    final = {"evaluations": len(rows), **_in_words(last)}
    if log is None:
        return parts + [_note("No training_log.json yet (a run in progress?): figures are from metrics.jsonl alone."),
                        _table("Last evaluation", final, LABELS)]
    summary = {k: v for k, v in log.items() if k not in ("model_config", "train_config", "final")}
    return parts + [_table("Last evaluation and the run", {**final, **summary}, LABELS),
                    _table("Model config", log.get("model_config") or {}),
                    _table("Training config", log.get("train_config") or {})]


def _agent_score(agent: dict, column: str, oracle) -> float | None:
    if column == "bits/byte (held-out)":
        return -_last_fitness(agent)
    if column == "% of the oracle":
        value = (agent.get("scores") or {}).get("pct_oracle")
        return value[-1] if isinstance(value, list) and value else None
    return 100 * _last_fitness(agent) / oracle if oracle else None  # no per-agent food rates: fitness vs the oracle's


def _agent_rows(population: dict, last: dict, text_env: bool) -> tuple[list[str], list[list]]:
    """The per-agent table of the newest cycle, best first."""
    agents = sorted(population.get("agents", []), key=lambda a: -np.nan_to_num(_last_fitness(a), nan=-np.inf))
    column = "bits/byte (held-out)" if text_env else "% of the oracle" if any("pct_oracle" in (a.get("scores") or {}) for a in agents) \
        else "fitness as % of the oracle's"
    rows = [[a.get("id"), a.get("slot"), ", ".join(a.get("parents") or []) or "(first generation)",
             a.get("birth_cycle"), _last_fitness(a), _agent_score(a, column, last.get("oracle")), a.get("lr"),
             a.get("rank")] for a in agents]
    return ["agent", "slot", "parents", "born in cycle", "fitness", column, "learning rate", "rank"], rows


def _first_and_newest(cycles: dict[int, Path], name: str, read) -> tuple[list[tuple[int, dict]], list[str]]:
    """`read` of the first and the newest committed cycle's file `name` (when present), and notes on
    the bad ones."""
    found = [c for c, folder in cycles.items() if (folder / name).is_file()]
    pictures, notes = [], []
    for c in sorted({found[0], found[-1]}) if found else []:
        try:
            pictures.append((c, read(cycles[c] / name)))
        except H2QError as e:
            notes.append(str(e))
    return pictures, notes


def _evolve_sections(run_dir: Path, out_dir: Path) -> list[str]:
    rows = _metrics(run_dir, "cycle")
    population = records.read_population(run_dir)
    cycles = records.committed_cycles(run_dir)
    config = records.read_config(run_dir)
    last = rows[-1]
    text_env = last.get("env") == "text"
    wall = sum(r.get("wall_s") or 0.0 for r in rows)
    living, evaluating = (sum(r.get(k) or 0.0 for r in rows) for k in ("live_s", "eval_s"))
    agents = len(population.get("agents", [])) or config.get("agents")
    cards = [("cycles", f"{len(rows)}" + (f" of {config['cycles']}" if config.get("cycles") else "")),
             ("agents", str(agents or "?"))]
    if "best_pct_oracle" in last:
        top = max(rows, key=lambda r: r.get("best_pct_oracle", -math.inf))
        cards = [(f"best agent, % of the oracle (cycle {last['cycle']})", f"{last['best_pct_oracle']:.0f} %"),
                 ("median agent, % of the oracle", f"{last.get('median_pct_oracle', math.nan):.0f} %"),
                 (f"best of any cycle (cycle {top['cycle']})", f"{top['best_pct_oracle']:.0f} %"), *cards]
    elif "best_bpb" in last:
        cards = [(f"best agent, bits/byte (cycle {last['cycle']})", f"{last['best_bpb']:.4f}"),
                 ("median agent, bits/byte", f"{last.get('median_bpb', math.nan):.4f}"),
                 ("base model, bits/byte", f"{last.get('base_bpb', math.nan):.4f}"), *cards]
    cards.append(("wall-clock", _duration(wall) + (f" ({100 * living / wall:.0f} % living, {100 * evaluating / wall:.0f} "
                                                   f"% evaluating)" if wall and (living or evaluating) else "")))
    parts = ["<h2>Evolution</h2>", _headline(cards),
             _figure_html(_plot_fitness(rows, out_dir / "evolve_fitness.png"),
                          "best, median and mean fitness per cycle with the oracle and random levels")]
    if population:
        header, table = _agent_rows(population, last, text_env)
        parts += [_grid_table(f"The agents after cycle {population.get('cycle')}, best first", header, table),
                  _note("load one by its id: python infer.py --adapter a0011, or /adapter a0011 in the REPL")]
    else:
        parts.append(_note("No population.json of the last committed cycle: no table of agents, no lineage tree."))
    for plot, caption in ((_plot_population(rows, out_dir / "evolve_population.png"),
                           "diversity of the adapters, deaths and food delivered during each cycle's evaluation"),
                          (_plot_time(rows, out_dir / "evolve_time.png"),
                           "where each cycle's time went: living with online learning, evaluating, the rest")):
        if plot:
            parts.append(_figure_html(plot, caption))
    if last.get("env") == "social":
        parts += _social_sections(rows, cycles, out_dir)
    elif not text_env:
        actions = _plot_actions(rows, out_dir / "evolve_actions.png")
        parts.append(_figure_html(actions, "which actions the agents chose, as a share of all actions per cycle")
                     if actions else _note("metrics.jsonl has no action counts ('actions'): no action histogram."))
        worlds, notes = _first_and_newest(cycles, WORLD_FILE, read_world)
        if worlds:
            parts.append(_figure_html(_plot_world(worlds, out_dir / "evolve_world.png"),
                                      "left: the map and one agent's path through an evaluation episode; right: how "
                                      "often every cell was visited by all agents in that episode"))
        parts += [_note(n) for n in notes] or ([] if worlds else
                                               [_note(f"no cycle_NNN/{WORLD_FILE}: no picture of the world.")])
    lineage = _plot_lineage(population, out_dir / "evolve_lineage.png")
    if lineage:
        parts.append(_figure_html(lineage, "who descends from whom: x = birth cycle, colour = fitness, bold = alive"))
    if cycles:
        newest = max(cycles)
        by_slot = {a.get("slot"): a for a in population.get("agents", [])} if population.get("cycle") == newest else {}
        norm_rows = [(f"{by_slot.get(slot, {}).get('id', folder.name)} (slot {slot})", adapter_norms(folder))
                     for slot, folder in records.agent_dirs(cycles[newest]).items()]
        if norm_rows:
            parts.append(_figure_html(_plot_adapter_heatmap(norm_rows, f"adapters of cycle {newest}",
                                                            out_dir / "adapter_norms.png"),
                                      f"each agent's update norm ||s B@A||_F per layer and module in "
                                      f"{cycles[newest].name}"))
    else:
        parts.append(_note("No cycle_NNN/agent_MM adapters: no adapter heatmap."))
    return parts + [_table(f"Cycle {last['cycle']} (the last)", _in_words(last), LABELS),
                    _table("Over the run", records.read_stats(run_dir), LABELS),
                    _table("Run config", _flatten(config))]


# -- the social env ---------------------------------------------------------------------------------
SOCIAL_PANELS = (  # (title, y label, [(metrics key, label, style, colour)]): a dashed base line has its series' colour
    ("engagement", "per post", [("likes_per_post", "likes", "-", "C0"), ("follows_per_post", "new followers", "-", "C1"),
                                ("base_likes_per_post", "base model's likes", "--", "C0")]),
    ("fluency of the posts", "bits/byte under the base (lower = more fluent)",
     [("post_bpb", "agents", "-", "C0"), ("base_post_bpb", "base model", "--", "C0")]),
    ("on topic and diverse", "share", [("topic_acc", "topic accuracy", "-", "C0"), ("base_topic_acc", "base: topic", "--", "C0"),
                                       ("distinct2", "distinct-2", "-", "C1"), ("base_distinct2", "base: distinct-2", "--", "C1")]),
    ("the follow graph", "", [("follow_density", "density", "-", "C0"), ("clustering", "clustering", "-", "C1")]),
    ("readers: reward per choice", "agreement with the quality signal",
     [("reader", "agents", "-", "C0"), ("random_reader", "random readers", ":", "C1"),
      ("scripted_reader", "scripted (upper bound)", "--", "C2"), ("base_reader", "base model", "--", "C0")]),
    ("writers: quality of their posts", "quality for a reader of its topic",
     [("best_writer_score", "best agent", "-", "C0"), ("median_writer_score", "median agent", "-", "C1"),
      ("base_writer", "base model", "--", "C1")]),
)


def _plot_social(rows: list[dict], path: Path) -> Path:
    fig, axes = _figure(2, 3, 15, 7.5)
    for ax, (title, ylabel, series) in zip(axes.flat, SOCIAL_PANELS):
        for key, label, style, colour in series:
            xs, ys = _series(rows, "cycle", key)
            if ys:
                ax.plot(xs, ys, style, color=colour, marker="o" if style == "-" else None, markersize=3, label=label)
        if title == "on topic and diverse":
            ax.axhline(0.8, color="k", linestyle=":", linewidth=1, label="target: 80 % on topic")
        ax.set(xlabel="cycle", ylabel=ylabel, title=title)
        _integer_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def _read_network(path: Path) -> dict:
    network = read_json(path)
    try:
        users, topics = list(network["users"]), list(network["topics"])
        follows = np.asarray(network["follows"], dtype=np.int64).reshape(-1, 2)
        posts = list(network["posts"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path} is not a network picture ({type(e).__name__}: {e}); re-run the cycle or "
                              f"delete the file") from None
    if len(users) != len(topics) or (follows.size and not ((follows >= 0) & (follows < len(users))).all()):
        raise FileFormatError(f"{path} is not a network picture: users, topics and follows disagree; re-run the "
                              f"cycle or delete the file")
    return {"users": users, "topics": topics, "follows": follows, "posts": posts,
            "base_posts": list(network.get("base_posts", []))}


def _plot_follow_graphs(networks: list[tuple[int, dict]], path: Path) -> Path:
    """Each cycle's follow graph after its held-out episode: users on a circle grouped by topic (colour),
    an arrow from follower to followed, a user's size by its followers."""
    from matplotlib.patches import FancyArrowPatch
    fig, axes = _figure(1, len(networks), 6.5 * len(networks), 6.5)
    for ax, (cycle, net) in zip(axes[0], networks):
        n = len(net["users"])
        names = sorted(set(net["topics"]))
        order = sorted(range(n), key=lambda i: (net["topics"][i], i))
        angle = {i: 2 * np.pi * k / max(n, 1) for k, i in enumerate(order)}
        xy = {i: (np.cos(a), np.sin(a)) for i, a in angle.items()}
        followers = np.bincount(net["follows"][:, 1], minlength=n) if len(net["follows"]) else np.zeros(n, int)
        for a, b in net["follows"]:
            ax.add_patch(FancyArrowPatch(xy[a], xy[b], arrowstyle="-|>", mutation_scale=9, color="0.45", alpha=0.6,
                                         shrinkA=7, shrinkB=7, linewidth=0.8))
        colours = {t: f"C{k}" for k, t in enumerate(names)}
        for t in names:
            members = [i for i in range(n) if net["topics"][i] == t]
            ax.scatter([xy[i][0] for i in members], [xy[i][1] for i in members], s=[60 + 40 * followers[i] for i in members],
                       color=colours[t], edgecolor="k", zorder=3, label=t)
        for i in range(n):
            ax.annotate(net["users"][i], xy[i], xytext=(1.13 * xy[i][0], 1.13 * xy[i][1]), ha="center", va="center",
                        fontsize=7)
        density = len(net["follows"]) / (n * (n - 1)) if n > 1 else 0.0
        ax.set(title=f"cycle {cycle}: {len(net['follows'])} follows, density {density:.3f}", xlim=(-1.3, 1.3),
               ylim=(-1.3, 1.3), aspect="equal", xticks=[], yticks=[])
        ax.legend(fontsize="small", loc="lower left", title="interest")
    return _save(fig, path)


def _posts_side_by_side(networks: list[tuple[int, dict]], per_topic: int = 2) -> str:
    """A table of posts on the same held-out prompts: the base model's, then each cycle's."""
    def by_slot(posts: list[dict], users: list[str]) -> dict:
        return {p["slot"] if "slot" in p else users.index(p.get("author")) if p.get("author") in users else None: p
                for p in posts}

    first = networks[0][1]
    by_cycle = [(c, by_slot(net["posts"], net["users"])) for c, net in networks]
    base = by_slot(first["base_posts"], [f"{i:02d}" for i in range(len(first["users"]))])
    slots = [s for t in sorted(set(first["topics"]))
             for s in [i for i in range(len(first["users"])) if first["topics"][i] == t][:per_topic]]

    def cell(post: dict | None) -> str:
        if not post:
            return "<td>(no post)</td>"
        return (f'<td><pre class="sample">{html.escape(post.get("text", ""))}</pre>{html.escape(str(post.get("author")))}: '
                f'quality {_cell(post.get("quality"))}, {post.get("likes", 0)} likes, {post.get("follows", 0)} new '
                f'followers</td>')

    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["slot (interest)", "prompt", "base model, no adapter", *(f"cycle {c}" for c, _ in by_cycle)])
    body = ""
    for s in slots:
        prompt = next((posts[s].get("prompt", "") for _, posts in by_cycle if s in posts), "")
        body += (f"<tr><td>{s} ({html.escape(first['topics'][s])})</td><td><pre class=\"sample\">{html.escape(prompt)}"
                 f"</pre></td>{cell(base.get(s))}" + "".join(cell(posts.get(s)) for _, posts in by_cycle) + "</tr>")
    return (f"<h3>Sample posts, cycle {' vs '.join(str(c) for c, _ in by_cycle)}</h3>"
            + _note("the last tick of each cycle's held-out episode: every cycle continues the same prompts; quality "
                    "is the signal's worth of the post for a reader of its topic (h2q/evolve/quality.py)")
            + f"<table><tr>{head}</tr>{body}</table>")


def _social_sections(rows: list[dict], cycles: dict[int, Path], out_dir: Path) -> list[str]:
    """The social env's part of an evolve report (module docstring)."""
    last = rows[-1]
    cards = [(f"likes per post (cycle {last['cycle']})", f"{last.get('likes_per_post', math.nan):.2f}"),
             ("posts' bits/byte (base model's)", f"{last.get('post_bpb', math.nan):.3f} ({last.get('base_post_bpb', math.nan):.3f})"),
             ("on topic (base model's)", f"{100 * last.get('topic_acc', math.nan):.0f} % "
                                        f"({100 * last.get('base_topic_acc', math.nan):.0f} %)"),
             ("distinct-2 (base model's)", f"{last.get('distinct2', math.nan):.3f} ({last.get('base_distinct2', math.nan):.3f})"),
             ("follow density, clustering", f"{last.get('follow_density', math.nan):.3f}, {last.get('clustering', math.nan):.3f}"),
             ("users, posts (held-out episode)", f"{last.get('users', '?')}, {last.get('posts', '?')}")]
    parts = ["<h3>The social network</h3>", _headline(cards),
             _figure_html(_plot_social(rows, out_dir / "social_metrics.png"),
                          "per cycle, on each cycle's held-out episode: engagement, fluency, topic accuracy and "
                          "diversity, the follow graph, readers and writers against the base model (dashed) and "
                          "the reader baselines")]
    networks, notes = _first_and_newest(cycles, NETWORK_FILE, _read_network)
    if networks:
        parts += [_figure_html(_plot_follow_graphs(networks, out_dir / "social_graph.png"),
                               "who follows whom after the held-out episode (arrow: follower to followed; size: "
                               "followers; colour: interest)"), _posts_side_by_side(networks)]
    return parts + [_note(n) for n in notes] + ([] if networks or notes else [
        _note(f"no cycle_NNN/{NETWORK_FILE} (removed by --keep-cycles?): no follow graph, no sample posts.")])


def _flatten(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _arms_sections(run_dir: Path, out_dir: Path) -> list[str]:
    found = arms(run_dir)
    curves, table, missing = {}, [], []
    for arm, runs in found.items():
        finals = [rs[-1] for rs in (records.read_metrics(run) for run in runs) if rs]
        row = [arm, len(runs), max((f["cycle"] for f in finals), default=0),
               *(float(np.median([f[key] for f in finals])) if finals and all(key in f for f in finals) else None
                 for key in ("best_pct_oracle", "wall_s"))]
        scores = normalised_scores(runs)
        if scores is None:
            missing.append(arm)
            table.append(row + [None, None])
            continue
        cycle_list, s = scores  # s: (cycles, runs, tasks)
        point, low, high = stats.stratified_bootstrap_ci(s)
        area = stats.stratified_bootstrap_ci(s, lambda b, x=cycle_list: stats.area_under_curve(stats.iqm(b), x))
        curves[arm] = (cycle_list, point, low, high, len(runs))
        table.append(row + [f"{point[-1]:.3f} [{low[-1]:.3f}, {high[-1]:.3f}]",
                            f"{area[0]:.3f} [{area[1]:.3f}, {area[2]:.3f}]"])
    parts = [f"<h2>{len(found)} arms</h2>",
             _headline([("arms", str(len(found))), ("runs", str(sum(len(r) for r in found.values())))])]
    if curves:
        parts.append(_figure_html(_plot_arms(curves, out_dir / "arms_iqm.png"),
                                  "IQM of the normalised score (0 = random policy, 1 = scripted oracle, per held-out "
                                  "world seed) per cycle; the band is a 95 % stratified-bootstrap interval over runs"))
    if missing:
        parts.append(_note(f"no 'normalised' scores common to all runs in metrics.jsonl of: {', '.join(missing)}"))
    parts.append(_grid_table("The arms", ["arm", "runs", "last cycle", "best agent, % of the oracle (median over runs)",
                                          "time per cycle (s, median over runs)", "IQM at the last cycle [95 % CI]",
                                          "IQM averaged over cycles (area under the curve) [95 % CI]"], table))
    return parts + [_note(f"one run's own report: python scripts/report.py {next(iter(found.values()))[0]}")]


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
         "table{border-collapse:collapse;font-size:.9em;margin-bottom:1.5em}"
         "th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}"
         ".cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0 1.5em}"
         ".card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;background:#fafafa;min-width:9em}"
         ".value{font-size:1.5em;font-weight:bold}.label{color:#555;font-size:.85em}.note{color:#555}"
         ".sample{background:#f6f6f6;padding:.6em;white-space:pre-wrap;border-left:3px solid #aaa}")
SECTIONS = {"train": ("training", _training_sections), "evolve": ("evolve", _evolve_sections),
            "arms": ("evolve benchmark", _arms_sections)}


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Draw the run's figures into `out_dir` (default RUN_DIR/report/) and write report.html there;
    returns the path of report.html. A missing, empty or unknown run folder is a H2QError."""
    run_dir = Path(run_dir)
    kind = detect_kind(run_dir)
    _require_matplotlib()
    out_dir = ensure_folder(out_dir if out_dir is not None else run_dir / "report", "--out")
    name, sections = SECTIONS[kind]
    title = f"h2q {name} run: {run_dir.resolve().name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(str(run_dir.resolve()))} &middot; generated {datetime.now():%Y-%m-%d %H:%M}</p>"
            + "\n".join(sections(run_dir, out_dir)) + "</body></html>\n")
    report = out_dir / "report.html"
    atomic_write_text(report, page)
    return report
