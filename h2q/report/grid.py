"""The grid world's part of an evolve report (h2q/report/evolve.py): the actions taken per cycle, and
the world (cycle_NNN/world.json) with one agent's trajectory and every agent's visits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from h2q.errors import FileFormatError
from h2q.evolve.records import read_json
from h2q.report.common import _figure, _integer_axis, _save

ACTION_NAMES = {"N": "N: move north", "S": "S: move south", "E": "E: move east", "W": "W: move west",
                "P": "P: pick up food", "D": "D: drop food at home", "F": "F: eat carried food", "Z": "Z: wait"}
WORLD_FILE = "world.json"


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
