"""See a run: PNG figures and one self-contained `report.html` for a training run or an evolve run.

`write_report(run_dir, out_dir=None)` tells the run's kind by the files in it, draws its figures into
`out_dir` (default RUN_DIR/report/) and writes `report.html` there with every figure embedded as a
base64 data URI (and linked to its PNG beside it), so the page opens offline with nothing external:
no CSS, scripts or fonts from elsewhere.

* training run (metrics.jsonl of evaluations, training_log.json): train/val loss and bits per byte
  against steps and against wall-clock, the learning rate (the schedule of `h2q.train.lr_at` plus the
  logged values) and throughput; an adapter fine-tune also gets its adapter heatmap.
* evolve run (notes/evolve_format.md, read through h2q/evolve/records.py, so a live run shows its
  committed cycles only): best / median / mean fitness per cycle against the oracle and random levels,
  % of oracle, diversity, deaths; the lineage tree; a heatmap of every agent's update norm ||s B@A||_F
  per layer and module in the last cycle, absolute and relative to each agent's largest, so
  specialisation shows.
* both: tables of the run's config and its final figures.

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
from h2q.checkpoint import ADAPTER_FILE, STATE_FILE, atomic_write, atomic_write_text, read_tensors
from h2q.errors import H2QError
from h2q.evolve import records
from h2q.evolve.records import read_json, read_jsonl
from h2q.lora import LINEARS, LoraConfig
from h2q.train import TrainConfig, lr_at

INSTALL_HINT = "the report draws with matplotlib, which is not installed; install it with: pip install -e .[plot]"
DPI = 110


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


# -- reading a run (an evolve run's folder: h2q/evolve/records.py) ---------------------------------
def detect_kind(run_dir: Path) -> str:
    """'train' or 'evolve', from the files present (a bare metrics.jsonl: from its first record)."""
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
    raise H2QError(f"{run_dir} holds neither a training run (metrics.jsonl, training_log.json) nor an evolve "
                    f"run (metrics.jsonl, population.json, cycle_NNN/); point at the run's own folder")


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


def _series(records: list[dict], x_key: str, key: str, scale: float = 1.0) -> tuple[list, list]:
    """(x, y) over the records that hold a number under `key`."""
    pairs = [(r[x_key], r[key] * scale) for r in records if isinstance(r.get(key), (int, float))]
    return [x for x, _ in pairs], [y for _, y in pairs]


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


# -- figures -----------------------------------------------------------------------------------------
def _time_axis(seconds: list[float]) -> tuple[list[float], str]:
    top = max(seconds, default=0.0)
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if top >= 2 * size:
            return [s / size for s in seconds], f"wall-clock ({unit})"
    return seconds, "wall-clock (s)"


def _plot_training_curves(records: list[dict], path: Path) -> Path:
    fig, axes = _figure(2, 2, 11, 7)
    timed = [r for r in records if isinstance(r.get("elapsed_s"), (int, float))]
    seconds, time_label = _time_axis([r["elapsed_s"] for r in timed])
    timed = [{**r, "wall": s} for r, s in zip(timed, seconds)]
    ln2 = 1 / math.log(2)
    panels = [("loss (nats/byte)", [("train_loss", 1.0, "train (mean since previous eval)"), ("val_loss", 1.0, "val")]),
              ("bits per byte", [("train_loss", ln2, "train (mean since previous eval)"), ("val_loss", ln2, "val")])]
    for row, (y_label, lines) in enumerate(panels):
        for col, (x_key, x_label, rows) in enumerate((("step", "optimizer step", records), ("wall", time_label, timed))):
            ax = axes[row][col]
            for key, scale, label in lines:
                ax.plot(*_series(rows, x_key, key, scale), marker="o", markersize=3, label=label)
            ax.set(xlabel=x_label, ylabel=y_label, title=f"{y_label.split(' (')[0]} vs {x_label.split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend()
    return _save(fig, path)


def _plot_schedule(records: list[dict], log: dict | None, path: Path) -> Path:
    fig, axes = _figure(1, 2, 11, 3.6)
    ax = axes[0][0]
    if log and log.get("max_steps") and log.get("train_config"):
        known = {f.name for f in fields(TrainConfig)}  # a log from another version may differ in flags
        cfg = TrainConfig(**{k: v for k, v in log["train_config"].items() if k in known})
        steps = int(log["max_steps"])
        ax.plot(range(1, steps + 1), [lr_at(s, cfg, steps) for s in range(steps)], label="schedule (warmup + cosine)")
    ax.plot(*_series(records, "step", "lr"), "o", markersize=4, label="logged at evaluations")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax = axes[0][1]
    ax.plot(*_series(records, "step", "tokens_per_s"), marker="o", markersize=3, label="mean since start")
    ax.set(xlabel="optimizer step", ylabel="tokens/s", title="training throughput")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _plot_fitness(records: list[dict], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator
    text_env = all(r.get("env") == "text" for r in records)
    second = ("% of oracle", "% of the oracle's level", "_pct_oracle") if any("best_pct_oracle" in r for r in records) else \
        ("bits per byte (held-out)", "bits/byte, lower is better", "_bpb") if any("best_bpb" in r for r in records) else None
    fig, axes = _figure(1, 2 if second else 1, 12 if second else 7, 4.2)
    ax = axes[0][0]
    cycles, worst = _series(records, "cycle", "worst")
    if worst:
        best = dict(zip(*_series(records, "cycle", "best")))
        ax.fill_between(cycles, worst, [best.get(c, math.nan) for c in cycles], alpha=0.15, label="worst to best")
    for key, style in (("best", "-"), ("median", "-"), ("mean", "-"), ("oracle", "--"), ("random", ":")):
        xs, ys = _series(records, "cycle", key)
        if ys:
            ax.plot(xs, ys, style, marker="o" if style == "-" else None, markersize=3, label=key)
    units = "\u2212bits/byte, higher is better" if text_env else "food delivered/step + survival"
    ax.set(xlabel="cycle", ylabel=f"fitness ({units})", title="population fitness per cycle")
    if second:
        title, unit, suffix = second
        ax2 = axes[0][1]
        for stat in ("best", "median", "mean"):
            xs, ys = _series(records, "cycle", stat + suffix)
            if ys:
                ax2.plot(xs, ys, marker="o", markersize=3, label=stat)
        if suffix == "_pct_oracle":
            ax2.axhline(100, color="k", linestyle="--", linewidth=1, label="oracle = 100 %")
        ax2.set(xlabel="cycle", ylabel=unit, title=title)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def _plot_population(records: list[dict], path: Path) -> Path | None:
    from matplotlib.ticker import MaxNLocator
    panels = [(key, label, title) for key, label, title in (
        ("diversity", "mean pairwise adapter distance", "diversity"),
        ("deaths", "agents died (count)", "deaths during evaluation"),
        ("food_delivered", "food delivered (items)", "food delivered during evaluation"),
        ("wall_s", "wall-clock (s)", "time per cycle")) if _series(records, "cycle", key)[1]]
    if not panels:
        return None
    fig, axes = _figure(1, len(panels), 3.6 * len(panels) + 1, 3.6)
    for ax, (key, label, title) in zip(axes[0], panels):
        xs, ys = _series(records, "cycle", key)
        if key in ("deaths", "food_delivered"):
            ax.bar(xs, ys)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.plot(xs, ys, marker="o", markersize=3)
        ax.set(xlabel="cycle", ylabel=label, title=title)  # one series per panel: the title names it
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _last_fitness(agent: dict) -> float:
    values = [v for v in agent.get("fitness") or [] if isinstance(v, (int, float))]
    return values[-1] if values else math.nan


def _plot_lineage(population: dict, path: Path) -> Path | None:
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    agents = {a["id"]: a for a in population.get("history", []) + population.get("agents", []) if "id" in a}
    if not agents:
        return None
    alive = {a.get("id") for a in population.get("agents", [])}
    place = {i: (a.get("birth_cycle", 0), a.get("slot", n)) for n, (i, a) in enumerate(agents.items())}
    slots = sorted({y for _, y in place.values()})
    fig, axes = _figure(1, 1, 11, max(3.5, 0.28 * len(slots) + 1.8))
    ax = axes[0][0]
    lifespans = [[place[i], (place[i][0] + max(len(a.get("fitness") or []) - 1, 0), place[i][1])] for i, a in agents.items()]
    ax.add_collection(LineCollection(lifespans, colors="0.8", linewidths=5, zorder=1))
    edges = [[place[p], place[i]] for i, a in agents.items() for p in a.get("parents") or [] if p in place]
    ax.add_collection(LineCollection(edges, colors="0.3", linewidths=0.8, alpha=0.6, zorder=2))
    ids = list(agents)
    points = ax.scatter([place[i][0] for i in ids], [place[i][1] for i in ids], c=[_last_fitness(agents[i]) for i in ids],
                        cmap="viridis", s=45, zorder=3, plotnonfinite=True,
                        edgecolors=["k" if i in alive else "none" for i in ids], linewidths=1.2)
    fig.colorbar(points, ax=ax, label="fitness at last evaluation")
    fig.legend(handles=[Line2D([], [], color="0.3", label="parent -> child"),
                        Line2D([], [], color="0.8", linewidth=5, label="lifespan (cycles evaluated)"),
                        Line2D([], [], marker="o", linestyle="", markeredgecolor="k", color="0.6", label="alive at the end"),
                        Line2D([], [], marker="o", linestyle="", color="0.6", label="dead or replaced")],
               fontsize="small", loc="outside lower center", ncol=4)
    ax.set(xlabel="birth cycle", ylabel="population slot", title=f"lineage of {len(agents)} agents")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.autoscale_view()
    ax.margins(0.04)
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


# -- the report ---------------------------------------------------------------------------------------
def _flatten(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return html.escape(json.dumps(value) if isinstance(value, (list, tuple)) else str(value))


def _table(title: str, rows: dict) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in rows.items())
    return f"<h3>{html.escape(title)}</h3><table>{body}</table>"


def _figure_html(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f'<figcaption><a href="{path.name}">{path.name}</a>: {html.escape(caption)}</figcaption></figure>')


def _training_sections(run_dir: Path, out_dir: Path) -> list[str]:
    records = _metrics(run_dir, "step")
    log = read_json(run_dir / "training_log.json") if (run_dir / "training_log.json").is_file() else None
    parts = ["<h2>Training</h2>",
             _figure_html(_plot_training_curves(records, out_dir / "training_curves.png"),
                          "train and validation loss (nats/byte) and bits per byte, against steps and wall-clock"),
             _figure_html(_plot_schedule(records, log, out_dir / "training_schedule.png"),
                          "learning rate and throughput")]
    if (run_dir / ADAPTER_FILE).is_file():
        parts.append(_figure_html(_plot_adapter_heatmap([("adapter", adapter_norms(run_dir))], "adapter",
                                                        out_dir / "adapter_norms.png"),
                                  "the trained adapter's update norm ||s B@A||_F per layer and module"))
    best = min(records, key=lambda r: r.get("val_bpb", math.inf))
    final = {"evaluations": len(records), **{f"last eval {k}": v for k, v in records[-1].items()},
             "best val_bpb": best.get("val_bpb"), "best val_bpb at step": best.get("step")}
    if log is None:
        parts += ["<p>No training_log.json yet (a run in progress?): figures are from metrics.jsonl alone.</p>",
                  _table("Final figures", final)]
        return parts
    summary = {k: v for k, v in log.items() if k not in ("model_config", "train_config", "final")}
    parts += [_table("Final figures", {**summary, **final}), _table("Model config", log.get("model_config") or {}),
              _table("Training config", log.get("train_config") or {})]
    return parts


def _evolve_sections(run_dir: Path, out_dir: Path) -> list[str]:
    cycle_records = _metrics(run_dir, "cycle")
    parts = ["<h2>Evolution</h2>",
             _figure_html(_plot_fitness(cycle_records, out_dir / "evolve_fitness.png"),
                          "best, median and mean fitness per cycle with the oracle and random levels")]
    population_plot = _plot_population(cycle_records, out_dir / "evolve_population.png")
    if population_plot:
        parts.append(_figure_html(population_plot, "diversity, deaths, food delivered and time per cycle"))
    population = records.read_population(run_dir)
    lineage = _plot_lineage(population, out_dir / "evolve_lineage.png")
    parts.append(_figure_html(lineage, "who descends from whom: x = birth cycle, colour = fitness")
                 if lineage else "<p>No population.json of the last committed cycle: no lineage tree.</p>")
    cycles = records.committed_cycles(run_dir)
    if cycles:
        last = max(cycles)
        by_slot = {a.get("slot"): a for a in population.get("agents", [])} if population.get("cycle") == last else {}
        rows = [(f"{by_slot.get(slot, {}).get('id', folder.name)} (slot {slot})", adapter_norms(folder))
                for slot, folder in records.agent_dirs(cycles[last]).items()]
        parts.append(_figure_html(_plot_adapter_heatmap(rows, f"adapters of cycle {last}", out_dir / "adapter_norms.png"),
                                  f"each agent's update norm ||s B@A||_F per layer and module in {cycles[last].name}"))
    else:
        parts.append("<p>No cycle_NNN/agent_MM adapters: no adapter heatmap.</p>")
    final = {"cycles completed": len(cycle_records), **{f"last cycle {k}": v for k, v in cycle_records[-1].items()},
             **records.read_stats(run_dir)}
    return parts + [_table("Final figures", final), _table("Run config", _flatten(records.read_config(run_dir)))]


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
         "table{border-collapse:collapse;font-size:.9em;margin-bottom:1.5em}"
         "th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Draw the run's figures into `out_dir` (default RUN_DIR/report/) and write report.html there;
    returns the path of report.html. A missing, empty or unknown run folder is a H2QError."""
    run_dir = Path(run_dir)
    kind = detect_kind(run_dir)
    _require_matplotlib()
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = (_training_sections if kind == "train" else _evolve_sections)(run_dir, out_dir)
    title = f"h2q {'training' if kind == 'train' else 'evolve'} run: {run_dir.resolve().name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(str(run_dir.resolve()))} &middot; generated {datetime.now():%Y-%m-%d %H:%M}</p>"
            + "\n".join(sections) + "</body></html>\n")
    report = out_dir / "report.html"
    atomic_write_text(report, page)
    return report
