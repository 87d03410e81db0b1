"""The report of arms: a folder whose subfolders are evolve runs, or folders of them, one per seed
(scripts/bench_evolve.py's OUT/ARM/seed-K). The IQM of the normalised score (`normalised` in a run's
heldout.jsonl, as scripts/bench_evolve.py scores it, or in its metrics: 0 = random, 1 = oracle, one
value per held-out world seed) against cycles, one line per arm with its 95 % stratified-bootstrap band
(rliable's method, h2q/evolve/stats.py), and a table of the arms.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from h2q.evolve import records, stats
from h2q.report.common import _figure, _figure_html, _grid_table, _headline, _integer_axis, _note, _save

HELDOUT = "heldout.jsonl"  # written by scripts/bench_evolve.py into each run it scores


def arms(folder: Path) -> dict[str, list[Path]]:
    """The arms of a benchmark folder: each subfolder that is an evolve run (an arm of one run) or
    holds evolve runs (one per seed), by name; {} when there are none."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        runs = [sub] if records.is_run(sub) else sorted(p for p in sub.iterdir() if p.is_dir() and records.is_run(p))
        if runs:
            found[sub.name] = runs
    return found


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
