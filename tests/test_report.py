"""scripts/report.py: figures and report.html for a real tiny training run and for a synthetic evolve run
written exactly as notes/evolve_format.md says (committed cycles only), the adapter norms it shows, clear
errors, and the one-line install hint without matplotlib."""
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from h2q import lora
from h2q.checkpoint import atomic_write_json, save_adapter, save_tensors
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.evolve import records as run_records
from h2q.evolve.evolution import mutate
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


def make_evolve_run(out: Path, env: str = "grid") -> dict[str, lora.LoraAdapter]:
    """2 cycles, 4 agents: in cycle 2 agent a0003 (slot 3) is replaced by a0004, child of a0000 and
    a0001. Returns the last cycle's adapters by folder name."""
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
                          food_delivered=10 * cycle, deaths=3 - cycle)
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
    assert "Training config" in page and "val_bpb" in page


@pytest.mark.slow
@pytest.mark.parametrize("env", ["grid", "text"])
def test_evolve_run_report(tmp_path, env):
    make_evolve_run(tmp_path / "evolve", env)
    assert detect_kind(tmp_path / "evolve") == "evolve"
    report = write_report(tmp_path / "evolve", tmp_path / "out")
    assert report == tmp_path / "out" / "report.html"
    check_report(report, {"evolve_fitness.png", "evolve_population.png", "evolve_lineage.png", "adapter_norms.png"})
    page = report.read_text(encoding="utf-8")
    assert "cycle_002" in page and "Run config" in page and "best_agent" in page


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
    assert "cycle_002" in page and "cycle_003" not in page and "<th>last cycle best</th><td>9</td>" not in page
    assert "<th>cycles completed</th><td>2</td>" in page and "<th>total_evolution_cycles</th><td>2</td>" in page
    commit(run, 3, [{"cycle": c, "best": 0.1 * c, "agent": "a0004"} for c in (1, 2, 3)])
    page = write_report(run, tmp_path / "out").read_text(encoding="utf-8")
    assert "cycle_003" in page and "<th>cycles completed</th><td>3</td>" in page
    assert "<th>last cycle best</th><td>9</td>" in page
    assert "<th>total_evolution_cycles</th><td>3</td>" in page


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
