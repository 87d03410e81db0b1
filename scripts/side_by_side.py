"""Side-by-side training runs for scripts/bench_train.py --vs-nanogpt: h2q's train.py against a nanoGPT
checkout (karpathy/nanoGPT, kept outside this repository; none of its code is copied here), on one
single-file text, with one wall-clock budget, scored on one held-out slice.

* The text: about 1 MB of ASCII English built from this machine's own Python documentation (the
  pydoc help topics, then the docstrings of the top-level standard-library modules in name order),
  so a byte is a character. Its final 10% is the held-out slice; neither run trains on it.
* Training bytes: h2q's train.py gets a folder holding only the first 90% as one file; h2q's data
  pipeline keeps that file's tail as its own validation split. nanoGPT gets exactly the same train
  and validation bytes (as its uint16 train.bin / val.bin with a meta.pkl of vocab_size 256), so both
  models learn from identical bytes.
* Concurrency: the two runs start together as subprocesses with one thread each
  (OMP_NUM_THREADS=MKL_NUM_THREADS=1), so drift of the machine's speed hits both alike.
* nanoGPT has no time budget: a short probe (both programs running concurrently, as in the real run)
  times its iterations and evaluations, and its max_iters (= lr_decay_iters, so its cosine schedule
  ends with the budget) is the largest that fits. `always_save_checkpoint=True` makes its last
  evaluation, at max_iters, save the final weights (its default saves only when its val loss
  improves, which would pick a checkpoint by validation). Both runs get SIGINT at the budget plus a
  grace period if they are still going; nanoGPT's latest checkpoint is then what is scored.
* Scoring: each model's own context length, non-overlapping windows over the held-out slice, every
  position counted, the last partial window included, so both predict exactly the same bytes; the
  figure is the mean cross-entropy in nats per byte. nanoGPT's ckpt.pt is read with
  torch.load(weights_only=True) by a scoring subprocess that imports nanoGPT's own model.py.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEXT_BYTES = 1_000_000
HELD_OUT_FRACTION = 0.1
MIN_DOCSTRING = 200  # shorter docstrings are mostly one-line summaries
# nanoGPT README, "I only have a macbook": config/train_shakespeare_char.py plus these overrides
NANOGPT_CPU_RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                      "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
NANOGPT_EVAL_INTERVAL = 250  # its config's eval_interval
NANOGPT_TOKENS_PER_ITER = 12 * 64


def bench_text() -> bytes:
    """The bench text, the same on every machine with the same Python: pydoc's help topics, then
    standard-library module docstrings, folded to ASCII and cut at a line end near TEXT_BYTES."""
    from pydoc_data.topics import topics
    parts = [topics[k] for k in sorted(topics)]
    size = sum(map(len, parts))
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size > 1.1 * TEXT_BYTES:
            break
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING:
                    parts.append(doc)
                    size += len(doc)
    text = unicodedata.normalize("NFKD", "\n\n".join(parts)).encode("ascii", "ignore")
    return text[: text.rindex(b"\n", 0, TEXT_BYTES) + 1]


@dataclass
class BenchData:
    work: Path
    text: Path  # the whole file
    held_out: Path  # its final 10%
    h2q_dir: Path  # --data-dir for h2q: the first 90% as one file
    h2q_root: Path  # --data-root for h2q: where its prepared corpus is cached
    nanogpt_dir: Path  # --dataset for nanoGPT: train.bin, val.bin, meta.pkl
    train_bytes: int
    val_bytes: int


def prepare_data(work: Path) -> BenchData:
    """Write the text, its held-out tail, h2q's folder and nanoGPT's files under work/ (idempotent)."""
    sys.path.insert(0, str(REPO))
    from h2q import data
    from h2q.checkpoint import atomic_write

    text = bench_text()
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    work = work.resolve()
    d = BenchData(work, work / "bench.txt", work / "held_out.txt", work / "h2q_text", work / "h2q_data",
                  work / "nanogpt_data", 0, 0)
    for path, content in [(d.text, text), (d.held_out, text[cut:]), (d.h2q_dir / "bench_first90.txt", text[:cut])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != content:
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(content))
    corpus = data.load_corpus(str(d.h2q_dir), 1, root=d.h2q_root, log=lambda *a: None)
    d.nanogpt_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        ids = np.asarray(getattr(corpus, split))
        assert ids.min() > 0, "one ASCII document: no NUL separators"
        atomic_write(d.nanogpt_dir / f"{split}.bin", lambda tmp: ids.astype(np.uint16).tofile(tmp))
    # nanoGPT's own format: it reads vocab_size
    atomic_write(d.nanogpt_dir / "meta.pkl", lambda tmp: Path(tmp).write_bytes(pickle.dumps({"vocab_size": 256})))
    d.train_bytes, d.val_bytes = len(corpus.train), len(corpus.val)
    return d


def one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Job:
    """One subprocess with its log: `wall_s` from start to exit, `cpu_s` its user + system time (the
    share of a core it got is cpu_s / wall_s: other work on the machine shows there)."""
    name: str
    cmd: list[str]
    cwd: Path
    log: Path
    proc: subprocess.Popen | None = None
    start: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    interrupted: bool = False

    def launch(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.start = time.time()
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=one_thread_env(), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def reap(self) -> bool:
        """True once the process has exited (its wall and CPU time are then recorded)."""
        if self.proc.returncode is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid == 0:
                return False
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.wall_s, self.cpu_s = time.time() - self.start, usage.ru_utime + usage.ru_stime
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_concurrently(jobs: list[Job], deadline_s: float | None = None, kill_after_s: float = 60.0):
    """Start all jobs together; SIGINT any still running at deadline_s, SIGKILL kill_after_s later."""
    for job in jobs:
        job.launch()
    t0 = time.time()
    while not all(job.reap() for job in jobs):
        late = deadline_s is not None and time.time() - t0 > deadline_s
        for job in jobs:
            if late and job.proc.returncode is None:
                if not job.interrupted:
                    job.interrupted = True
                    os.killpg(job.proc.pid, signal.SIGINT)
                elif time.time() - t0 > deadline_s + kill_after_s:
                    os.killpg(job.proc.pid, signal.SIGKILL)
        time.sleep(0.1)


# -- nanoGPT -------------------------------------------------------------------------------------
def nanogpt_job(path: Path, d: BenchData, out: Path, max_iters: int, eval_interval: int, name="nanoGPT") -> Job:
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU_RECIPE,
           f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", f"--eval_interval={eval_interval}",
           "--always_save_checkpoint=True", f"--dataset={d.nanogpt_dir}", f"--out_dir={out}"]
    return Job(name, cmd, path, out.with_suffix(".log"))


def nanogpt_iter_times(log: str) -> dict[int, float]:
    """iter -> seconds, from nanoGPT's 'iter N: loss L, time T ms' lines."""
    return {int(m[1]): float(m[2]) / 1000 for m in re.finditer(r"^iter (\d+): loss \S+, time ([\d.]+)ms", log, re.MULTILINE)}


def fit_nanogpt_iters(probe: Job, probe_iters: int, budget_s: float) -> tuple[int, int, dict]:
    """(max_iters, eval_interval, timing) that fit budget_s, from a probe run of probe_iters iterations
    with evaluations at 0 and probe_iters. Per iteration: the median step; per evaluation (and
    checkpoint save): the extra time of the steps that followed an evaluation; fixed: the rest."""
    times = nanogpt_iter_times(probe.output())
    if probe.proc.returncode != 0 or probe_iters not in times:
        raise RuntimeError(f"nanoGPT probe failed; see {probe.log}")
    step = statistics.median(times[i] for i in range(5, probe_iters))
    evaluation = max(times[probe_iters] - step, 0.0)
    fixed = probe.wall_s - sum(times.values()) + max(times[0] - step, 0.0)  # startup and the eval at 0
    iters = int((budget_s - fixed) / (step + evaluation / NANOGPT_EVAL_INTERVAL))
    evals = max(round(iters / NANOGPT_EVAL_INTERVAL), 1)
    interval = iters // evals
    timing = {"step_s": step, "eval_s": evaluation, "fixed_s": fixed}
    return interval * evals, interval, timing


# -- h2q -----------------------------------------------------------------------------------------
def h2q_job(root: Path, d: BenchData, out: Path, budget_min: float, args: list[str], name="h2q") -> Job:
    cmd = [sys.executable, "train.py", "--data-dir", str(d.h2q_dir), "--data-root", str(d.h2q_root),
           "--out", str(out), "--time-budget", f"{budget_min:g}", "--no-progress", *args]
    return Job(name, cmd, root, out.with_suffix(".log"))


# -- scoring -------------------------------------------------------------------------------------
SCORE = r'''
import json, sys, torch, torch.nn.functional as F
torch.set_num_threads(1)

def score(forward, context, held_out):
    """Mean nats per byte over non-overlapping windows of `context`, every position, the last partial
    window too: the targets are held_out[1:], each predicted once."""
    ids = torch.tensor(list(open(held_out, "rb").read()), dtype=torch.long)
    targets = len(ids) - 1
    total, starts = 0.0, list(range(0, targets, context))
    full = [s for s in starts if s + context <= targets]
    batches = [full[i:i + 32] for i in range(0, len(full), 32)] + [[s] for s in starts if s + context > targets]
    with torch.no_grad():
        for batch in batches:
            T = min(context, targets - batch[0])
            x = torch.stack([ids[s:s + T] for s in batch])  # (B, T)
            y = torch.stack([ids[s + 1:s + T + 1] for s in batch])  # (B, T)
            logits = forward(x)  # (B, T, V)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
    print(json.dumps({"nats_per_byte": total / targets, "bytes_scored": targets}))
'''

SCORE_H2Q = SCORE + r'''
from h2q.checkpoint import load_model
model, _ = load_model(sys.argv[1])
score(model, int(sys.argv[3]), sys.argv[2])
'''

SCORE_NANOGPT = SCORE + r'''
sys.path.insert(0, sys.argv[3])
from model import GPT, GPTConfig  # nanoGPT's model.py, from its checkout
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
print(json.dumps({"iter_num": ckpt["iter_num"]}))
score(lambda x: model(x, x)[0], model.config.block_size, sys.argv[2])  # with targets it returns every position's logits
'''


def run_score(code: str, args: list, cwd: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=one_thread_env(),
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"scoring failed:\n{res.stderr[-2000:]}")
    result = {}
    for line in res.stdout.splitlines():  # nanoGPT's model prints its parameter count too
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


def score_h2q(root: Path, out: Path, d: BenchData) -> dict:
    """The context scored is the one trained (--block-size, else the model's): rotary positions past it
    were never seen."""
    summary = json.loads((out / "training_log.json").read_text())
    context = summary["train_config"]["block_size"] or summary["model_config"]["context_len"]
    result = run_score(SCORE_H2Q, [out.resolve(), d.held_out, context], root)
    return {**result, "bytes_seen": summary["tokens_seen"], "steps": summary["steps"], "summary": summary}


def score_nanogpt(path: Path, out: Path, d: BenchData) -> dict:
    result = run_score(SCORE_NANOGPT, [out.resolve() / "ckpt.pt", d.held_out, path], REPO)
    return {**result, "bytes_seen": result["iter_num"] * NANOGPT_TOKENS_PER_ITER, "steps": result["iter_num"]}


def h2q_recipe(summary: dict, args: list[str], budget_min: float) -> str:
    cfg, model = summary["train_config"], summary["model_config"]
    block = cfg["block_size"] or model["context_len"]
    flags = " ".join(args)
    return (f"`train.py --time-budget {budget_min:g}{' ' + flags if flags else ''}`: {model['n_layer']} layers, "
            f"{model['d_model']} wide, batch {cfg['batch_size']} x block {block}, lr {cfg['lr']:g}, "
            f"{summary['steps']:,} steps")


def nanogpt_recipe(max_iters: int, reached: int) -> str:
    stopped = "" if reached == max_iters else f", stopped at the budget after {reached:,}"
    return (f"its README's CPU recipe: 4 layers, 128 wide, block 64, batch 12, lr 1e-3, {max_iters:,} iters "
            f"(fit to the budget{stopped}), no dropout, no compile")
