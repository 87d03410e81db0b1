"""An evolve run's part of the report (notes/evolve_format.md, read through h2q/evolve/records.py, so
a live run shows its committed cycles only): headline best / median % of the oracle, cycles,
wall-clock; fitness per cycle against the oracle and random levels; a table of the agents (the ids
`/adapter a0011` takes); diversity, deaths, food; time split into living and evaluating; the lineage
tree labelled with agent ids; each agent's update norm ||s B@A||_F per layer and module. The env's
own part comes from its module: the grid world's actions and world pictures (grid.py), or the social
network (social.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from h2q.evolve import records
from h2q.report.common import (
    LABELS,
    _duration,
    _figure,
    _figure_html,
    _first_and_newest,
    _grid_table,
    _headline,
    _in_words,
    _integer_axis,
    _metrics,
    _note,
    _plot_adapter_heatmap,
    _save,
    _series,
    _table,
    adapter_norms,
)
from h2q.report.grid import WORLD_FILE, _plot_actions, _plot_world, read_world
from h2q.report.social import _social_sections


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


def _flatten(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


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
