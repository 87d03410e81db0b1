"""Evolution (elites, children, mutation scale, lineage, adaptive rank, Reptile, diversity) and evolve.py
end to end: every strategy and the text env through the air-gapped CLI, exact resume, two processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file, save

from h2q import checkpoint, lora
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.evolve.evolution import (
    Agent,
    BreedConfig,
    Population,
    diversity,
    elite_count,
    merge_weight,
    next_generation,
    ranking,
)
from h2q.evolve.grid_env import GridEnv
from h2q.evolve.run import EvolveConfig, evolve
from h2q.evolve.text_env import TextConfig, TextEnv
from h2q.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
CFG = PRESETS["tiny"]
FITNESS = np.array([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.05, 0.4, 0.6, 0.8])


pytestmark = pytest.mark.usefixtures("one_thread")


def population(n=10, rank=4, bank_rank=None, meta=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pop = Population.initial(CFG, lora.LoraConfig(r=rank), n, bank_rank or rank, 1e-3, 1.0, 0.5, gen, meta=meta)
    with torch.no_grad():  # give every B a distinct nonzero value, as learning would
        for B in pop.bank.lora_B:
            B.normal_(0, 0.05, generator=gen)
    return pop


def generation(pop, cfg, cycle=1, seed=1, fitness=FITNESS):
    return next_generation(pop, fitness, cfg, cycle, torch.Generator().manual_seed(seed), np.random.default_rng(seed))


def bank_copy(pop):
    return [p.detach().clone() for p in pop.bank.parameters()]


def test_elites_pass_bit_for_bit_and_children_are_weighted_merges():
    for crossover in ("factors", "merge"):
        pop = population()
        before, old = bank_copy(pop), [pop.adapter(s) for s in range(pop.n)]
        ids = [a.id for a in pop.agents]
        replaced = generation(pop, BreedConfig(crossover=crossover, mutation_rate=0.0))
        elites = ranking(FITNESS)[:elite_count(10, 0.2)].tolist()
        assert sorted(elites) == [1, 9] and replaced == sorted(set(range(10)) - set(elites))
        for slot in elites:
            assert pop.agents[slot].id == ids[slot]
            assert all(torch.equal(now[slot], then[slot]) for now, then in zip(pop.bank.parameters(), before))
        for slot in replaced:
            agent = pop.agents[slot]
            p1, p2 = (ids.index(p) for p in agent.parents)
            w = merge_weight(p1, p2, FITNESS)
            if crossover == "factors":  # the original design: child = p1 * w + p2 * (1 - w)
                expected = lora.linear_combination([old[p1], old[p2]], [w, 1 - w])
            else:
                expected = lora.merge_product_space([old[p1], old[p2]], [w, 1 - w])
            child = pop.adapter(slot)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(child.parameters(), expected.parameters()))
    w = merge_weight(1, 6, FITNESS)  # slot 1 is the fitter: it weighs more, never all or nothing
    assert 0.5 < w < 1 and w + merge_weight(6, 1, FITNESS) == pytest.approx(1)


@torch.no_grad()
def test_mutation_noise_has_the_requested_scale():
    plain, mutated = population(n=10, rank=8), population(n=10, rank=8)
    generation(plain, BreedConfig(crossover="factors", mutation_rate=0.0))
    replaced = generation(mutated, BreedConfig(crossover="factors", mutation_rate=0.1))
    for slot in replaced:
        for clean, noisy in zip(plain.adapter(slot).parameters(), mutated.adapter(slot).parameters()):
            rms = clean.pow(2).mean().sqrt()
            assert float((noisy - clean).std() / rms) == pytest.approx(0.1, rel=0.15)


def test_lineage_is_consistent_over_generations():
    pop = population(n=10)
    every = {a.id for a in pop.agents}
    for cycle in range(1, 4):
        pop.record_fitness(FITNESS[::-1] if cycle % 2 else FITNESS)
        generation(pop, BreedConfig(), cycle=cycle, seed=cycle)
        every |= {a.id for a in pop.agents}
    state = pop.to_json(3)
    history = {a["id"]: a for a in state["history"]}
    assert len(history) == len(state["history"]) == len(every)  # ids unique across the run
    assert [a["slot"] for a in state["agents"]] == list(range(10))
    for agent in history.values():
        assert agent["parents"] == [] or (len(agent["parents"]) == 2 and all(p in history for p in agent["parents"]))
        for p in agent["parents"]:
            assert history[p]["birth_cycle"] < agent["birth_cycle"]
        if agent["birth_cycle"] == 4:
            assert agent["fitness"] == []  # born after cycle 3, not evaluated yet
    assert sum(a.id in {x["id"] for x in state["agents"]} for a in pop.dead) == 0


def test_adaptive_rank_grows_elites_children_and_keeps_updates_exact():
    pop = population(n=10, rank=4, bank_rank=8)
    cfg = BreedConfig(adaptive_rank=True, min_rank=2, max_rank=8, rank_step=2)
    generation(pop, cfg)
    ranks = {a.rank for a in pop.agents}
    assert ranks <= {2, 4, 6} and 6 in ranks and 2 in ranks  # elites' children grew, the others' shrank
    padded = pop.bank.adapter(3)
    own = pop.adapter(3)
    assert own.config.r == pop.agents[3].rank
    for key in own.slot:  # the zero-padded copy in the bank does exactly the agent's own update
        assert torch.allclose(padded.delta(key), own.delta(key), atol=1e-6)
    for bad in (dict(strategy="meta"), dict(crossover="factors")):
        with pytest.raises(H2QError):
            BreedConfig(adaptive_rank=True, **bad)


def test_meta_moves_toward_the_elites_and_children_restart_from_it():
    pop = population(n=10, meta=True)
    theta = pop.meta.clone()
    elites = [pop.bank.adapter(s) for s in ranking(FITNESS)[:2]]
    generation(pop, BreedConfig(strategy="meta", meta_step=0.5, mutation_rate=0.0))
    target = lora.average_factors(elites)
    for now, then, goal in zip(pop.meta.parameters(), theta.parameters(), target.parameters()):
        assert torch.allclose(now, 0.5 * then + 0.5 * goal, atol=1e-6)
    child = pop.bank.adapter(0)  # slot 0 (fitness 0.3) is replaced by theta itself at mutation rate 0
    assert all(torch.equal(a, b) for a, b in zip(child.parameters(), pop.meta.parameters()))


def test_gradient_breeds_nothing_and_pbt_copies_the_best():
    pop = population()
    before = bank_copy(pop)
    assert generation(pop, BreedConfig(strategy="gradient")) == []
    assert all(torch.equal(a, b) for a, b in zip(pop.bank.parameters(), before))
    replaced = generation(pop, BreedConfig(strategy="gradient", pbt=True))
    assert replaced == [2, 6]  # the bottom 20%
    for slot in replaced:
        agent = pop.agents[slot]
        assert agent.lr in (pytest.approx(1e-3 * 1.25), pytest.approx(1e-3 / 1.25))
        source = next(a for a in pop.agents if a.id == agent.parents[0])
        assert source.slot in (1, 9)
        assert all(torch.equal(now[slot], then[source.slot]) for now, then in zip(pop.bank.parameters(), before))


@torch.no_grad()
def test_diversity_is_the_mean_pairwise_update_distance():
    pop = population(n=4)
    adapters = [pop.bank.adapter(i) for i in range(4)]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    brute = np.mean([sum((adapters[i].delta(k) - adapters[j].delta(k)).pow(2).sum() for k in adapters[0].slot).sqrt()
                     for i, j in pairs])
    assert diversity(pop.bank) == pytest.approx(float(brute), rel=1e-5)


# -- end to end --------------------------------------------------------------------------------------
TINY = ["--base", "random", "--preset", "tiny", "--agents", "4", "--steps", "6", "--eval-episodes", "1",
        "--lora-rank", "2", "--device", "cpu", "--no-progress"]


def run_script(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # tiny models: threads only add waiting
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check_run(out: Path, cycles: int, n: int, env: str = "grid"):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["cycle"] for r in records] == list(range(1, cycles + 1))
    assert all(r["env"] == env and r["best"] >= r["median"] >= r["worst"] for r in records)
    assert ("best_pct_oracle" in records[0]) == (env == "grid") and ("best_bpb" in records[0]) == (env == "text")
    pop = json.loads((out / "population.json").read_text())
    assert pop["cycle"] == cycles and len(pop["agents"]) == n
    stats = json.loads((out / "evolution_stats.json").read_text())
    assert stats["total_evolution_cycles"] == cycles and stats["successful_cycles"] + stats["failed_cycles"] == cycles - 1
    config = json.loads((out / "config.json").read_text())
    assert {"strategy", "agents", "cycles", "env", "lora_rank", "seed", "base"} <= config.keys()
    for slot in range(n):
        tensors = load_file(str(out / f"cycle_{cycles:03d}" / f"agent_{slot:02d}" / checkpoint.ADAPTER_FILE))
        assert tensors and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
    return records


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--strategy", "hybrid", "--adaptive-rank", "--pbt", "--quant", "int8"],
                                   ["--strategy", "evolution", "--crossover", "layer"],
                                   ["--strategy", "gradient", "--pbt"],
                                   ["--strategy", "meta", "--report"]], ids=lambda e: e[1])
def test_cli_every_strategy_air_gapped(tmp_path, extra):
    out = tmp_path / "run"
    result = run_script([str(ROOT / "tests" / "airgap.py"), str(ROOT / "evolve.py"), "--cycles", "2", "--out", str(out),
                         *TINY, *extra], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cycle 2/2" in result.stdout
    check_run(out, 2, 4)
    assert ("--report" in extra) == (out / "report" / "report.html").is_file()


@pytest.mark.slow
def test_cli_text_env(text_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script([str(ROOT / "evolve.py"), "--env", "text", "--data-dir", str(text_dir), "--data-root",
                         str(tmp_path / "prep"), "--cycles", "2", "--out", str(out), "--steps", "3", "--text-batch", "1",
                         "--text-block", "32", "--eval-windows", "4", *TINY[:6], "--lora-rank", "2", "--device", "cpu",
                         "--no-progress"],
                        tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = check_run(out, 2, 4, env="text")
    assert all(r["best"] == pytest.approx(-r["best_bpb"]) and r["base_bpb"] > 0 for r in records)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    result = run_script([str(ROOT / "evolve.py"), "--base", str(tmp_path / "none"), "--cycles", "1"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and "train.py" in result.stderr
    result = run_script([str(ROOT / "evolve.py"), *TINY, "--resume", "--out", str(tmp_path / "nothing")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("memory", [{}, {"memory": 1, "world": "view", "window": 3}])  # tiny: 64 bytes of context
def test_resume_equals_an_uninterrupted_run(memory, tmp_path, monkeypatch):
    """2 cycles straight == Ctrl-C in cycle 2 (after its life), plus what a kill while writing cycle 2's
    records would leave, then --resume: same records and adapters, also with agents' memories
    (--memory, their KV caches). Lives of 12 ticks: the learner first updates at tick 16, so cycle 2
    depends on its saved state."""
    def config(out, cycles, resume=False):
        return EvolveConfig(base="random", preset="tiny", out=str(out), cycles=cycles, agents=4, steps=12,
                            eval_episodes=1, lora_rank=2, device="cpu", threads=1, progress=False, resume=resume,
                            **memory)

    evolve(config(tmp_path / "a", 2), BreedConfig(pbt=True), TextConfig())
    evaluate = GridEnv.evaluate

    def ctrl_c_in_cycle_2(env, agents, seed, tick):
        if env.learner.t > 12:
            raise KeyboardInterrupt
        return evaluate(env, agents, seed, tick)

    monkeypatch.setattr(GridEnv, "evaluate", ctrl_c_in_cycle_2)
    summary = evolve(config(tmp_path / "b", 2), BreedConfig(pbt=True), TextConfig())
    assert summary["interrupted"] and summary["cycles"] == 1
    monkeypatch.undo()
    b = tmp_path / "b"
    with open(b / "metrics.jsonl", "a") as f:  # what a kill in the middle of cycle 2's records leaves
        f.write(json.dumps({"cycle": 2, "best": 9.0}) + "\n")
    (b / "cycle_002" / "agent_00").mkdir(parents=True)
    evolve(config(b, 2, resume=True), BreedConfig(pbt=True), TextConfig())

    def records(run):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert records(tmp_path / "a") == records(b)
    for name in ("population.json", "evolution_stats.json"):
        assert (tmp_path / "a" / name).read_text() == (b / name).read_text()
    for slot in range(4):  # bit for bit (the files' bytes are not: safetensors orders metadata by hash)
        name = Path("cycle_002") / f"agent_{slot:02d}" / checkpoint.ADAPTER_FILE
        straight, resumed = load_file(str(tmp_path / "a" / name)), load_file(str(b / name))
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_text_env_state_resumes_bit_for_bit(text_dir, tmp_path):
    """Text env: train, replace slot 1, save the optimizer state (through safetensors) and the adapters,
    load both into a fresh env: the next life trains the same bit for bit."""
    torch.manual_seed(0)
    model = lora.freeze_base(Transformer(CFG))
    cfg = TextConfig(data_dir=str(text_dir), data_root=str(tmp_path / "prep"), text_batch=1, text_block=32,
                     eval_windows=4, weight_decay=0.1)
    agents = [Agent(f"a{i}", i, [], 0, 2, lr, 1.0) for i, lr in enumerate([1e-2, 3e-3, 5e-3])]

    def env():
        bank = lora.AdapterBank(model, lora.LoraConfig(r=2), 3, generator=torch.Generator().manual_seed(1))
        return TextEnv(model, bank, cfg, torch.device("cpu"), log=lambda *a, **k: None)

    first, second = env(), env()
    first.live(agents, 3, seed=1, tick=lambda: None)
    first.reset_slots([1])
    with torch.no_grad():
        for p, q in zip(second.bank.parameters(), first.bank.parameters()):
            p.copy_(q)
    second.load_state_tensors(load(save(first.state_tensors())))
    for e in (first, second):
        e.live(agents, 3, seed=2, tick=lambda: None)
    assert all(torch.equal(p, q) for p, q in zip(first.bank.parameters(), second.bank.parameters()))
    assert first.state_tensors()["steps"].tolist() == [6, 3, 6]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    result = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "evolve.py"),
                         "--cycles", "2", "--out", str(out), *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(out, 2, 4)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "state").iterdir()) == ["env_c002_r0.safetensors", "env_c002_r1.safetensors",
                                                                  "evolve_state.safetensors"]


def test_keep_cycles_prunes_only_after_the_commit(tmp_path, monkeypatch):
    """--keep-cycles 1: a kill after cycle 2's folder is written but before its commit leaves cycle 1's
    folder (the committed one) for readers and resume; after a full run only the newest folder is left."""
    def config(out, cycles, resume=False):
        return EvolveConfig(base="random", preset="tiny", out=str(out), cycles=cycles, agents=4, steps=4,
                            eval_episodes=1, lora_rank=2, device="cpu", threads=1, progress=False,
                            keep_cycles=1, resume=resume)

    from h2q.evolve import records
    save_state = records.save_state

    def killed_at_commit_2(out, cycle, *args, **kwargs):
        if cycle == 2:
            raise KeyboardInterrupt
        return save_state(out, cycle, *args, **kwargs)

    monkeypatch.setattr(records, "save_state", killed_at_commit_2)
    assert evolve(config(tmp_path, 2), BreedConfig(), TextConfig())["interrupted"]
    monkeypatch.undo()
    assert records.committed(tmp_path)[0] == 1
    assert list(records.committed_cycles(tmp_path)) == [1]
    assert (tmp_path / "cycle_001" / "agent_00" / checkpoint.ADAPTER_FILE).is_file()
    evolve(config(tmp_path, 3, resume=True), BreedConfig(), TextConfig())
    assert sorted(records.cycle_dirs(tmp_path)) == [3]


def test_threads_are_measured_when_not_given(tmp_path, monkeypatch, capsys):
    """--threads 0: the runner takes h2q.perf's measured choice (here an injected probe that finds one
    thread faster, as on a busy CPU) and records it per cycle."""
    from h2q import perf
    from h2q.evolve import run

    class BusyMachine(perf.ThreadPolicy):
        def __init__(self, requested=0):
            super().__init__(requested, probe=lambda threads: 1.0 if threads == 1 else 3.0, env={})

    monkeypatch.setattr(run, "ThreadPolicy", BusyMachine)
    monkeypatch.setattr(perf.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cfg = EvolveConfig(base="random", preset="tiny", out=str(tmp_path), cycles=1, agents=2, steps=2,
                       eval_episodes=1, lora_rank=2, device="cpu", threads=0, progress=False)
    try:
        evolve(cfg, BreedConfig(), TextConfig())
    finally:
        torch.set_num_threads(1)
    assert "threads 1 of 2 (measured)" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["threads"] == 1
    agents = json.loads((tmp_path / "population.json").read_text())["agents"]
    assert all(set(a["scores"]) == {"pct_oracle", "normalised"} and len(a["scores"]["pct_oracle"]) == 1
               for a in agents)  # what the report's agent table shows
