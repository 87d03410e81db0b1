"""scripts/report.py: figures and report.html for a real tiny training run and for a synthetic evolve run
written exactly as notes/evolve_format.md says (committed cycles only), the adapter norms it shows, clear
errors, and the one-line install hint without matplotlib; the panels that explain (headline, agent table,
world picture, actions, time split, "no deaths", final figures in words, lineage ids, arms compared by
IQM, training samples) on run files written by hand, and each one's absence said in words."""
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from h2q import lora
from h2q.checkpoint import atomic_write_json, save_adapter, save_tensors
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.evolve import records as run_records
from h2q.evolve.evolution import mutate
from h2q.evolve.planners import OraclePolicy
from h2q.evolve.world import World, WorldConfig
from h2q.model import Transformer
from h2q.report import adapter_norms, detect_kind, read_jsonl, write_report
from h2q.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_report(report: Path, expected_figures: set[str]):
    """Every expected figure is a PNG that decodes, and the page embeds and links each one."""
    import matplotlib.image
    page = report.read_text(encoding="utf-8")
    assert {p.name for p in report.parent.glob("*.png")} == expected_figures
    for name in expected_figures:
        data = (report.parent / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(report.parent / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200
        assert f'href="{name}"' in page
        assert f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"' in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def agent_record(i, slot, parents, birth, fitness):
    return {"id": f"a{i:04d}", "slot": slot, "parents": parents, "birth_cycle": birth, "fitness": fitness,
            "rank": 2, "lr": 0.002, "temperature": 1.0}


def world_picture(seed: int, agent: str, slot: int, ticks: int = 60) -> dict:
    """cycle_NNN/world.json as the runner writes it: the map at the start of an episode of 4 oracle
    agents on the hinted level, agent `slot`'s path and the visits of all."""
    cfg = WorldConfig(size=10, n_food=8, steps=ticks)
    world, policy = World(cfg, 4, seed), OraclePolicy(seed=seed)
    picture = {"level": cfg.level, "size": cfg.size, "walls": world.walls.astype(int).tolist(),
               "home": world.home.tolist(), "food": np.argwhere(world.food)[:, ::-1].tolist(), "seed": seed}
    positions, carrying, visits = [world.pos[slot].tolist()], [0], np.zeros((cfg.size, cfg.size), dtype=int)
    np.add.at(visits, (world.pos[:, 1], world.pos[:, 0]), 1)
    for _ in range(ticks):
        world.step(policy.act(world.observe(), world.alive))
        positions.append(world.pos[slot].tolist())
        carrying.append(int(world.carrying[slot]))
        np.add.at(visits, (world.pos[world.alive, 1], world.pos[world.alive, 0]), 1)
    return {**picture, "trajectory": {"agent": agent, "slot": slot, "positions": positions, "carrying": carrying},
            "visits": visits.tolist()}


def make_evolve_run(out: Path, env: str = "grid") -> dict[str, lora.LoraAdapter]:
    """2 cycles, 4 agents: in cycle 2 agent a0003 (slot 3) is replaced by a0004, child of a0000 and
    a0001. The grid run also has each cycle's world.json, action counts and normalised scores. Returns
    the last cycle's adapters by folder name."""
    base = Transformer(PRESETS["tiny"])
    generator = torch.Generator().manual_seed(0)
    atomic_write_json(out / "config.json", {"strategy": "merge", "agents": 4, "cycles": 2, "env": env,
                                            "lora_rank": 2, "seed": 0, "base": "checkpoints/base"})
    level = 0.0 if env == "grid" else -5.0  # text fitness is -(bits per byte)
    first = [agent_record(i, i, [], 1, [level + 0.1 * (i + 1)]) for i in range(4)]
    second = [{**a, "fitness": a["fitness"] + [level + 0.1 * (i + 2)]} for i, a in enumerate(first[:3])]
    second.append(agent_record(4, 3, ["a0000", "a0001"], 2, [level + 0.45]))
    atomic_write_json(out / "population.json", {"cycle": 2, "agents": second, "history": second + first[3:]})
    records = []
    for cycle, agents in ((1, first), (2, second)):
        fitness = sorted(a["fitness"][-1] for a in agents)
        record = {"cycle": cycle, "best": fitness[-1], "median": (fitness[1] + fitness[2]) / 2,
                  "mean": sum(fitness) / 4, "worst": fitness[0], "diversity": 1.5 - 0.2 * cycle,
                  "improvement": 0.05 * cycle, "wall_s": 3.0 + cycle, "strategy": "merge", "env": env}
        if env == "grid":
            record.update(oracle=0.6, random=0.05, best_pct_oracle=100 * fitness[-1] / 0.6,
                          median_pct_oracle=100 * record["median"] / 0.6, mean_pct_oracle=100 * record["mean"] / 0.6,
                          food_delivered=10 * cycle, deaths=3 - cycle, live_s=1.0 + cycle, eval_s=1.5,
                          actions={"N": 40, "S": 30, "E": 35, "W": 25, "P": 10 * cycle, "D": 5 * cycle, "F": 2, "Z": 20},
                          normalised=[0.2 * cycle, 0.3 * cycle])
            atomic_write_json(out / f"cycle_{cycle:03d}" / "world.json", world_picture(cycle, agents[-1]["id"], 3))
        else:
            record.update(best_bpb=-fitness[-1], median_bpb=-record["median"])
        records.append(record)
        last = {}
        for agent in agents:
            adapter = lora.LoraAdapter(base, lora.LoraConfig(r=2, alpha=4.0), generator=generator)
            adapter = mutate(adapter, 0.5, generator)
            with torch.no_grad():  # each agent leans on one module, as specialists would
                adapter.lora_B[agent["slot"] * 3].mul_(20.0)
            name = f"agent_{agent['slot']:02d}"
            save_adapter(out / f"cycle_{cycle:03d}" / name, adapter, base)
            last[name] = adapter
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    atomic_write_json(out / "evolution_stats.json", {"total_evolution_cycles": 2, "successful_cycles": 2,
                                                     "failed_cycles": 0, "average_improvement": 0.075,
                                                     "best_fitness": 0.45, "best_agent": "a0004"})
    history = [{"cycle": r["cycle"], "best": r["best"], "agent": a} for r, a in zip(records, ("a0003", "a0004"))]
    commit(out, 2, history)
    return last


def commit(out: Path, cycle: int, history: list[dict]):
    """The commit point: the main state naming the cycle (its tensors do not matter to a reader)."""
    save_tensors(out / run_records.STATE_DIR / run_records.STATE_FILE, {},
                 {"cycle": str(cycle), "history": json.dumps(history)})


def run_script(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_training_run_report(text_dir, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(data_dir=str(text_dir), data_root=str(tmp_path / "prepared"), out=str(run), preset="tiny",
                      steps=6, batch_size=4, eval_every=2, eval_batches=2, save_every=100, warmup=2,
                      device="cpu", progress=False))
    assert detect_kind(run) == "train"
    report = write_report(run)
    assert report == run / "report" / "report.html"
    check_report(report, {"training_curves.png", "training_schedule.png"})
    page = report.read_text(encoding="utf-8")
    assert "Training config" in page and "best val bits/byte" in page and "tokens/s (mean over the run)" in page


@pytest.mark.slow
@pytest.mark.parametrize("env", ["grid", "text"])
def test_evolve_run_report(tmp_path, env):
    make_evolve_run(tmp_path / "evolve", env)
    assert detect_kind(tmp_path / "evolve") == "evolve"
    report = write_report(tmp_path / "evolve", tmp_path / "out")
    assert report == tmp_path / "out" / "report.html"
    grid_only = {"evolve_actions.png", "evolve_world.png"} if env == "grid" else set()
    check_report(report, {"evolve_fitness.png", "evolve_population.png", "evolve_time.png", "evolve_lineage.png",
                          "adapter_norms.png", *grid_only})
    page = report.read_text(encoding="utf-8")
    assert "cycle_002" in page and "Run config" in page and "<th>the agent that had it</th><td>a0004</td>" in page
    # the per-agent table, best first, with the ids /adapter takes and their parents
    fitness = 0.45 if env == "grid" else -4.55
    assert f"<td>a0004</td><td>3</td><td>a0000, a0001</td><td>2</td><td>{fitness:.5g}</td>" in page
    if env == "grid":
        assert "fitness as % of the oracle&#x27;s" in page and "<td>75</td>" in page
        assert '<div class="value">75 %</div><div class="label">best agent, % of the oracle (cycle 2)</div>' in page
        assert '<div class="value">58 %</div><div class="label">median agent, % of the oracle</div>' in page
        assert "9.0 s (56 % living, 33 % evaluating)" in page
    else:
        assert "<th>bits/byte (held-out)</th>" in page and "no action histogram" not in page
        assert '<div class="label">best agent, bits/byte (cycle 2)</div>' in page


@pytest.mark.slow
def test_evolve_report_shows_committed_cycles_only(tmp_path):
    """What a run leaves while it writes cycle 3 (its adapters, population.json, a metrics record, all
    before the commit point) stays out of the report; once committed, cycle 3 is in."""
    run = tmp_path / "evolve"
    make_evolve_run(run)
    population = json.loads((run / "population.json").read_text())
    shutil.copytree(run / "cycle_002", run / "cycle_003")  # cycle 3's adapters
    atomic_write_json(run / "population.json", {**population, "cycle": 3})
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"cycle": 3, "best": 9.0, "median": 9.0, "mean": 9.0, "worst": 9.0}) + "\n")
    assert [r["cycle"] for r in run_records.read_metrics(run)] == [1, 2]
    assert run_records.read_population(run) == {} and run_records.newest_cycle(run).name == "cycle_002"
    page = write_report(run, tmp_path / "out").read_text(encoding="utf-8")
    assert "cycle_002" in page and "cycle_003" not in page and "Cycle 3 (the last)" not in page
    assert "<th>cycles committed</th><td>2</td>" in page
    commit(run, 3, [{"cycle": c, "best": 0.1 * c, "agent": "a0004"} for c in (1, 2, 3)])
    page = write_report(run, tmp_path / "out").read_text(encoding="utf-8")
    assert "cycle_003" in page and "<th>cycles committed</th><td>3</td>" in page
    assert "Cycle 3 (the last)" in page and "<th>best agent&#x27;s fitness</th><td>9</td>" in page


def test_adapter_norms_are_the_update_norms(tmp_path):
    """The heatmap's values: ||s B@A||_F of every module, as h2q.lora's own delta computes it."""
    adapters = make_evolve_run(tmp_path)
    for name, adapter in adapters.items():
        norms = adapter_norms(tmp_path / "cycle_002" / name)
        assert set(norms) == set(adapter.slot)
        for key, value in norms.items():
            assert value == pytest.approx(torch.linalg.matrix_norm(adapter.delta(key)).item(), rel=1e-5)


@pytest.mark.slow
def test_script_runs_air_gapped(tmp_path):
    make_evolve_run(tmp_path / "evolve")
    result = run_script([str(ROOT / "tests" / "airgap.py"), str(ROOT / "scripts" / "report.py"), str(tmp_path / "evolve")])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "evolve" / "report" / "report.html").is_file()
    assert str(tmp_path / "evolve" / "report" / "report.html") in result.stdout


@pytest.mark.slow
def test_without_matplotlib_one_line_install_hint(tmp_path):
    """h2q.report imports without matplotlib (else a traceback, exit 1) and the command says how to
    install it."""
    make_evolve_run(tmp_path / "evolve")
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['report.py', {str(tmp_path / 'evolve')!r}]; "
            f"runpy.run_path({str(ROOT / 'scripts' / 'report.py')!r}, run_name='__main__')")
    result = run_script(["-c", code])
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and "pip install -e .[plot]" in result.stderr


@pytest.mark.parametrize("layout", ["missing", "empty", "unknown", "no_records"])
def test_bad_run_folder_is_one_clear_line(tmp_path, layout):
    run = tmp_path / "run"
    if layout != "missing":
        run.mkdir()
    if layout == "unknown":
        (run / "notes.txt").write_text("hello", encoding="utf-8")
    if layout == "no_records":
        (run / "metrics.jsonl").write_text("", encoding="utf-8")
        (run / "training_log.json").write_text("{}", encoding="utf-8")
    with pytest.raises(H2QError, match="run folder|neither a training run|nothing to report"):
        write_report(run)


@pytest.mark.slow
def test_script_bad_folder_gives_one_line(tmp_path):
    result = run_script([str(ROOT / "scripts" / "report.py"), str(tmp_path / "nope")])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_metrics_of_a_live_run(tmp_path):
    """A last line still being appended is left out; a broken line elsewhere is a H2QError."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste', encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(H2QError, match="line 2"):
        read_jsonl(path)


# -- the panels that explain, on runs written without a model (metrics and lineage files only) ---------
def make_light_run(out: Path, cycles: int, normalised=None, deaths: int = 0, world: dict | None = None):
    """An evolve run of `cycles` committed cycles and 2 agents; `normalised(cycle)` -> the metrics'
    per-seed normalised scores (absent when None)."""
    agents = [agent_record(i, i, [], 1, [0.1 * (i + 1)] * cycles) for i in range(2)]
    atomic_write_json(out / "config.json", {"agents": 2, "cycles": cycles, "env": "grid"})
    atomic_write_json(out / "population.json", {"cycle": cycles, "agents": agents, "history": agents})
    lines = []
    for c in range(1, cycles + 1):
        record = {"cycle": c, "best": 0.2, "median": 0.15, "mean": 0.15, "worst": 0.1, "oracle": 0.4,
                  "random": 0.01, "best_pct_oracle": 50.0, "median_pct_oracle": 37.5, "food_delivered": 0,
                  "deaths": deaths, "diversity": 1.0, "wall_s": 2.0, "env": "grid"}
        if normalised is not None:
            record["normalised"] = normalised(c)
        lines.append(json.dumps(record) + "\n")
    (out / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    if world is not None:
        atomic_write_json(out / f"cycle_{cycles:03d}" / "world.json", world)
    commit(out, cycles, [{"cycle": c, "best": 0.2, "agent": "a0001"} for c in range(1, cycles + 1)])


def figure_texts(monkeypatch) -> dict[str, list[str]]:
    """Every text drawn in each figure the report saves (titles, labels, legends, annotations), by file name."""
    from h2q.report import bench, common, evolve, grid, social, training
    texts, save = {}, common._save

    def spy(fig, path):
        texts[path.name] = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        return save(fig, path)
    for module in (common, training, evolve, grid, social, bench):  # each module that draws saves through its own name
        monkeypatch.setattr(module, "_save", spy)
    return texts


def test_zero_deaths_say_so_and_final_figures_are_in_words(tmp_path, monkeypatch):
    texts = figure_texts(monkeypatch)
    make_light_run(tmp_path / "run", 3)
    page = write_report(tmp_path / "run", tmp_path / "out").read_text(encoding="utf-8")
    assert "no deaths in 3 cycles" in texts["evolve_population.png"]
    assert "no food delivered in 3 cycles" in texts["evolve_population.png"]
    for raw in ("successful_cycles", "failed_cycles", "total_evolution_cycles", "best_pct_oracle", "wall_s"):
        assert f"<th>{raw}</th>" not in page
    assert "<th>cycles whose best fitness beat the previous cycle&#x27;s best</th><td>0</td>" in page
    assert "<th>cycles whose best did not (cycle 1 counts as neither)</th><td>2</td>" in page
    assert "no action histogram" in page and "no cycle_NNN/world.json" in page  # absent data is said, not drawn


def test_lineage_nodes_carry_agent_ids(tmp_path, monkeypatch):
    texts = figure_texts(monkeypatch)
    make_evolve_run(tmp_path / "evolve")
    write_report(tmp_path / "evolve", tmp_path / "out")
    labels = texts["evolve_lineage.png"]
    assert {"a0000", "a0001", "a0002", "a0003", "a0004"} <= set(labels)
    world = texts["evolve_world.png"]
    assert any(t.startswith("cycle 2: agent a0004 (slot 3), 60 ticks on world seed 2") for t in world)
    assert "path, carrying food" in world and "agent-ticks on the cell (square-root scale)" in world


def test_world_picture_is_read_and_checked(tmp_path):
    from h2q.errors import FileFormatError
    from h2q.report import read_world
    picture = world_picture(5, "a0007", 1, ticks=10)
    atomic_write_json(tmp_path / "world.json", picture)
    world = read_world(tmp_path / "world.json")
    assert world["positions"].shape == (11, 2) and world["walls"].shape == (10, 10) and world["agent"] == "a0007"
    assert world["visits"].sum() == 4 * 11  # 4 agents x (start + 10 ticks), none died in 10 ticks
    atomic_write_json(tmp_path / "world.json", {**picture, "visits": [[0] * 3] * 3})
    with pytest.raises(FileFormatError, match="10x10"):
        read_world(tmp_path / "world.json")
    make_light_run(tmp_path / "run", 2, world={**picture, "walls": "broken"})
    page = write_report(tmp_path / "run", tmp_path / "out").read_text(encoding="utf-8")
    assert "is not a world picture" in page and not (tmp_path / "out" / "evolve_world.png").exists()


def test_arms_compare_the_iqm_of_the_normalised_score(tmp_path, monkeypatch):
    """OUT/ARM/seed-K runs: one line per arm, the point the IQM of runs x seeds per cycle, its band a
    bootstrap interval around it; an arm without normalised scores is named, not drawn."""
    from h2q.evolve.stats import iqm
    texts = figure_texts(monkeypatch)
    scores = {"hybrid": lambda seed: (lambda c: [0.1 * c + 0.05 * seed, 0.2 * c, 0.15 * c + 0.01 * seed]),
              "gradient": lambda seed: (lambda c: [0.05 * c, 0.02 * c * seed, 0.1])}
    for arm, per_seed in scores.items():
        for seed in range(3):
            make_light_run(tmp_path / "bench" / arm / f"seed-{seed}", 4, per_seed(seed))
    make_light_run(tmp_path / "bench" / "evolution" / "seed-0", 4)  # no normalised scores
    assert detect_kind(tmp_path / "bench") == "arms"
    report = write_report(tmp_path / "bench")
    check_report(report, {"arms_iqm.png"})
    page = report.read_text(encoding="utf-8")
    assert "hybrid (3 runs)" in texts["arms_iqm.png"] and "gradient (3 runs)" in texts["arms_iqm.png"]
    final = np.array([scores["hybrid"](seed)(4) for seed in range(3)])  # (runs, seeds) at cycle 4
    assert f"<td>{iqm(final):.3f} [" in page
    assert "no &#x27;normalised&#x27; scores common to all runs in metrics.jsonl of: evolution" in page
    assert "<td>evolution</td><td>1</td><td>4</td><td>50</td><td>2</td><td>n/a</td><td>n/a</td>" in page


def make_train_run(out: Path, samples: bool = True):
    """A training run's files as train.py writes them (evaluations every 10 steps) and samples.jsonl."""
    evals = [{"step": s, "tokens": 640 * s, "elapsed_s": 2.0 * s, "lr": 1e-3, "train_loss": 3.0 - 0.1 * s / 10,
              "val_loss": 3.1 - 0.1 * s / 10, "val_bpb": (3.1 - 0.1 * s / 10) / 0.6931471805599453,
              "val_ppl": 20.0, "tokens_per_s": 320.0} for s in range(10, 70, 10)]
    (out / "metrics.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals), encoding="utf-8")
    atomic_write_json(out / "training_log.json", {"steps": 60, "max_steps": 60, "elapsed_s": 120.0, "params": 123456,
                                                  "final": evals[-1], "model_config": {"d_model": 32},
                                                  "train_config": {"lr": 1e-3, "warmup": 5}})
    if samples:
        (out / "samples.jsonl").write_text("".join(
            json.dumps({"step": s, "prompt": p, "text": f"<{s} after {p}>"}) + "\n"
            for s in range(10, 70, 10) for p in ("def main():", "import ")), encoding="utf-8")


def test_training_report_headline_samples_and_one_curve(tmp_path, monkeypatch):
    texts = figure_texts(monkeypatch)
    make_train_run(tmp_path / "run")
    page = write_report(tmp_path / "run").read_text(encoding="utf-8")
    best = (3.1 - 0.6) / 0.6931471805599453
    assert f'<div class="value">{best:.4f}</div><div class="label">best val bits/byte (step 60)</div>' in page
    assert '<div class="value">320</div><div class="label">tokens/s (mean over the run)</div>' in page
    shown = [s for s in range(10, 70, 10) if f"&lt;{s} after def main():&gt;" in page]
    assert shown == [10, 30, 40, 60]  # 4 checkpoints, the first and the last among them
    assert "<b>import </b>&lt;60 after import &gt;" in page
    curves = texts["training_curves.png"]
    assert not any("nats" in t or t.startswith("loss") for t in curves)  # bits/byte is loss / ln 2: drawn once
    assert "bits per byte (loss / ln 2)" in curves
    assert "<th>val_loss</th>" not in page and "<th>val bits/byte</th>" in page


def test_training_report_without_samples_says_so(tmp_path):
    make_train_run(tmp_path / "run", samples=False)
    page = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "no samples.jsonl in the run folder" in page
