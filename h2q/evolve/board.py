"""What one evolve cycle shows in TensorBoard (`evolve.py --tensorboard DIR`), written through h2q/monitor.py.

Per cycle c (the step of every event):
* scalars, from the cycle's metrics.jsonl record, grouped by what they measure: fitness (best, median,
  mean, the oracle's and the random policy's), fitness as % of the oracle, normalised fitness ((agent -
  random) / (oracle - random)), bits per byte (text env), the population (diversity, deaths, food), the
  actions taken, and seconds per phase;
* histograms: each agent's fitness, and the norm of each agent's update sqrt(sum over linears of
  ||s B A||_F^2), computed from r x r Gram products like `evolution.diversity`; the norms are of the
  bank at the end of the cycle, after breeding: the adapters cycle c + 1 starts from;
* an image of the world map of the best agent's evaluation episode (cycle_NNN/world.json): walls, home,
  food at the start, every agent's visits as a blue heat map, the best agent's path in red (magenta
  while it carries food), its start cell white;
* text: the same map as text (the terminal renderer's cell glyphs, `o` on the path) for the grid, or a
  sample written by the best agent's adapter for the text env (when the agent still holds its slot).
"""
from __future__ import annotations

import numpy as np
import torch

from h2q.evolve.render import FOOD, HOME_CELL, OPEN, WALL
from h2q.monitor import Monitor, sample_text

COLORS = {"open": (24, 24, 28), "wall": (120, 120, 120), "food": (40, 200, 70), "home": (245, 200, 40),
          "path": (225, 50, 50), "carrying": (220, 60, 220), "start": (255, 255, 255)}
FITNESS_KEYS = {"best", "median", "mean", "worst", "oracle", "random", "improvement", "oracle_food_rate"}
SKIPPED = {"cycle", "best_slot"}


def scalar_tag(key: str) -> str:
    if "pct_oracle" in key:
        return f"fitness_pct_of_oracle/{key}"
    if "normalised" in key:
        return f"fitness_normalised/{key}"
    if key in FITNESS_KEYS:
        return f"fitness/{key}"
    if key.endswith("_bpb"):
        return f"bits_per_byte/{key}"
    if key.endswith("_s"):
        return f"seconds/{key}"
    return f"population/{key}"


def cycle_scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their TensorBoard tags (one level of nested figures, e.g. actions/U)."""
    out = {}
    for key, value in record.items():
        if key in SKIPPED:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            out[scalar_tag(key)] = value
    return out


def update_norms(bank) -> np.ndarray:
    """(n,) Frobenius norm of each agent's whole update: ||s B A||_F^2 = s^2 sum((B^T B) * (A A^T))."""
    total = torch.zeros(bank.n, dtype=torch.float64)
    with torch.no_grad():
        for A, B in zip(bank.lora_A, bank.lora_B):
            a, b = A.detach().double().cpu(), B.detach().double().cpu()  # (n, r, in), (n, out, r)
            total += (torch.einsum("nkx,nlx->nkl", a, a) * torch.einsum("nok,nol->nkl", b, b)).sum((1, 2))
    return (total.clamp_min(0).sqrt() * bank.scaling).numpy()


def world_image(world: dict, cell: int = 12) -> np.ndarray:
    """(size * cell, size * cell, 3) uint8 picture of a world.json record (see the module docstring)."""
    walls = np.asarray(world["walls"], dtype=bool)  # [y, x]
    visits = np.asarray(world["visits"], dtype=np.float64)  # [y, x]
    rgb = np.empty((*walls.shape, 3), dtype=np.float64)
    rgb[:] = COLORS["open"]
    heat = np.log1p(visits) / max(np.log1p(visits.max()), 1e-9)  # 0..1
    rgb[..., 2] += heat * (200 - COLORS["open"][2])
    rgb[walls] = COLORS["wall"]
    for x, y in world["food"]:
        rgb[y, x] = COLORS["food"]
    hx, hy = world["home"]
    rgb[hy, hx] = COLORS["home"]
    img = np.repeat(np.repeat(rgb, cell, 0), cell, 1)  # (size * cell, size * cell, 3)
    trajectory = world["trajectory"]
    inset = cell // 4  # the path is drawn as a smaller square inside each cell it crosses
    for (x, y), carrying in zip(trajectory["positions"], trajectory["carrying"]):
        img[y * cell + inset:(y + 1) * cell - inset, x * cell + inset:(x + 1) * cell - inset] = \
            COLORS["carrying" if carrying else "path"]
    if trajectory["positions"]:
        x, y = trajectory["positions"][0]
        img[y * cell + inset:(y + 1) * cell - inset, x * cell + inset:(x + 1) * cell - inset] = COLORS["start"]
    return img.astype(np.uint8)


def world_text(world: dict) -> str:
    """The world.json map in the terminal renderer's glyphs, the best agent's path as ` o`."""
    cells = np.where(np.asarray(world["walls"], dtype=bool), WALL, OPEN).astype(object)  # [y, x]
    for x, y in world["food"]:
        cells[y, x] = FOOD
    for x, y in world["trajectory"]["positions"]:
        cells[y, x] = " o"
    cells[world["home"][1], world["home"][0]] = HOME_CELL
    agent = world["trajectory"]["agent"]
    return "\n".join(["".join(row) for row in cells] +
                     ["", f"agent {agent}'s path (o) on world seed {world['seed']}, {world['level']} level"])


def log_cycle(monitor: Monitor, cycle: int, record: dict, evaluation, population, model) -> None:
    """Everything of cycle `cycle` (rank 0's record and evaluation; the population after breeding)."""
    if not monitor.on:
        return
    monitor.scalars(cycle, cycle_scalars(record))
    monitor.histogram("fitness/per_agent", evaluation.fitness, cycle)
    monitor.histogram("adapters/update_norms", update_norms(population.bank), cycle)
    world = evaluation.files.get("world.json")
    if world is not None:
        monitor.image("world/map", world_image(world), cycle)
        monitor.text("sample", world_text(world), cycle)
    else:
        slot = record.get("best_slot")
        if slot is not None and population.agents[slot].id == record.get("best_agent"):
            monitor.text("sample", sample_text(model, population.bank.adapter(slot)), cycle)
    monitor.flush()
