"""The training run's part of the report (h2q/report/__init__.py): metrics.jsonl of evaluations,
training_log.json, samples.jsonl. Headline val bits per byte and tokens/s; train/val bits per byte
(= loss / ln 2, so loss is not drawn again) against steps and wall-clock; the learning rate (the
schedule of `h2q.train.lr_at` and the logged values) and throughput; sample text at a few checkpoints;
an adapter fine-tune's adapter heatmap.
"""
from __future__ import annotations

import html
from dataclasses import fields
from pathlib import Path

from h2q.checkpoint import ADAPTER_FILE
from h2q.evolve.records import read_json, read_jsonl
from h2q.report.common import (
    LABELS,
    LN2,
    _duration,
    _figure,
    _figure_html,
    _headline,
    _in_words,
    _metrics,
    _note,
    _plot_adapter_heatmap,
    _save,
    _series,
    _table,
    adapter_norms,
)
from h2q.train import TrainConfig, lr_at

SAMPLES_FILE = "samples.jsonl"
SAMPLE_STEPS = 4  # checkpoints whose samples the training report shows


def read_samples(run_dir: Path) -> dict[int, list[dict]]:
    """samples.jsonl of a training run by step: [{"prompt", "text"}, ...]; {} when there is none."""
    path = run_dir / SAMPLES_FILE
    by_step: dict[int, list[dict]] = {}
    for r in read_jsonl(path) if path.is_file() else []:
        if isinstance(r.get("step"), int) and isinstance(r.get("text"), str):
            by_step.setdefault(r["step"], []).append({"prompt": str(r.get("prompt", "")), "text": r["text"]})
    return dict(sorted(by_step.items()))


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
