"""The pieces every part of the report shares: the matplotlib guard, figures on the Agg canvas and their
atomic save, a run's metrics records and the first and newest cycle's pictures, the adapters' update
norms and their heatmap (a training run's adapter, an evolve run's agents), and the page's HTML:
tables, headline cards, embedded figures, notes, the metrics keys in words, the style sheet. It
imports none of the report's other modules.

Matplotlib is imported only inside the functions that draw, so this module imports without it.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from h2q.checkpoint import ADAPTER_CONFIG_FILE as CONFIG_FILE
from h2q.checkpoint import ADAPTER_FILE, atomic_write, read_tensors
from h2q.errors import H2QError
from h2q.evolve import records
from h2q.evolve.records import read_json, read_jsonl
from h2q.lora import LINEARS, LoraConfig

INSTALL_HINT = "the report draws with matplotlib, which is not installed; install it with: pip install -e .[plot]"
DPI = 110
LN2 = math.log(2)


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


# -- reading a run: its metrics, its cycles' files, its adapters -----------------------------------
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


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
         "table{border-collapse:collapse;font-size:.9em;margin-bottom:1.5em}"
         "th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}"
         ".cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0 1.5em}"
         ".card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;background:#fafafa;min-width:9em}"
         ".value{font-size:1.5em;font-weight:bold}.label{color:#555;font-size:.85em}.note{color:#555}"
         ".sample{background:#f6f6f6;padding:.6em;white-space:pre-wrap;border-left:3px solid #aaa}")
