"""See a run: PNG figures and one self-contained `report.html` for a training run, an evolve run, or a
folder of evolve runs in arms (scripts/bench_evolve.py's OUT/ARM/seed-K).

`write_report(run_dir, out_dir=None)` tells the kind by the files in it, draws its figures into
`out_dir` (default RUN_DIR/report/) and writes `report.html` there with every figure embedded as a
base64 data URI (and linked to its PNG beside it), so the page opens offline with nothing external.
Each page opens with a headline of the few numbers that matter, and labels every figure in words.
Each kind's sections are drawn by its own module, whose docstring says what it shows:

* a training run: training.py;
* an evolve run: evolve.py, with the env's own part from grid.py (the grid world) or social.py
  (the social env);
* arms (a folder whose subfolders are evolve runs, or folders of them, one per seed): bench.py.

They share common.py (figures, the page's HTML), which imports none of them.

Matplotlib is an optional extra (`pip install -e .[plot]`), imported only inside the functions that
draw, so this package imports without it. It draws on the Agg canvas directly (no pyplot): no GUI
backend, no global figure state, safe to call at the end of another program's run.
"""
from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path

from h2q.checkpoint import STATE_FILE, atomic_write_text, ensure_folder
from h2q.errors import H2QError
from h2q.evolve import records
from h2q.evolve.records import read_jsonl
from h2q.report.bench import _arms_sections, arms, normalised_scores
from h2q.report.common import INSTALL_HINT, STYLE, _require_matplotlib, adapter_norms
from h2q.report.evolve import _evolve_sections
from h2q.report.grid import read_world
from h2q.report.training import _training_sections, read_samples

__all__ = ["INSTALL_HINT", "adapter_norms", "arms", "detect_kind", "normalised_scores", "read_jsonl", "read_samples",
           "read_world", "write_report"]


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
