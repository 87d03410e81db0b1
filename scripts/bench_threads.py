"""One-shot decoding speed, or one evolve cycle, by thread choice, on an idle machine and beside a busy
loop on one core.

torch's OpenMP threads spin while they wait for each other, so a second job on one of the cores can
make the default thread count far slower than one thread (issue 20's first point). This bench runs
`infer.py --prompt P --max-new-tokens N --seed S` as separate processes, one arm after the other in
each round (interleaved, so drift in the machine's other load hits every arm alike), under two
conditions: as the machine is, and with a `python -c 'while 1: pass'` loop (nice 0) beside it. Arms:

* `default`: infer.py as it is (--threads 0: chosen by h2q.perf.ThreadPolicy's probe);
* `--threads 1` and `OMP_NUM_THREADS=1`: one thread, fixed by the flag or by the environment;
* `before` (with --before ROOT): the infer.py of another checkout (e.g. one without the probe), run
  with its own defaults.

Each run's figures line gives bytes/s (generation, prefill included); the process's wall seconds
(start-up, loading and the probe included) and the 1-minute load average at its start are kept too.
The table prints the median over the rounds per condition and arm, and the ratio to `--threads 1`
measured in the same rounds.

`--entry evolve` runs `evolve.py --base CKPT --cycles 1 --steps S` (grid world, 20 agents, into a
temporary folder) instead and takes the cycle's own wall seconds from its cycle line (start-up left
out); the ratio is then the speed of one cycle against `--threads 1` (above 1: faster).

    python scripts/bench_threads.py --ckpt checkpoints/base --rounds 3 [--before ../other-checkout]
    python scripts/bench_threads.py --ckpt checkpoints/base --entry evolve --steps 100
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = re.compile(r"\[h2q\] (\d+) bytes in ([\d.]+) s \(([\d.]+) bytes/s(?:.*\| threads ([^|]+)\|)?")
CYCLE = re.compile(r"^cycle 1/1 .*\| ([\d.]+) s$", re.MULTILINE)
THREADS = re.compile(r"threads (.+?):")  # evolve.py's first line: "... on cpu, threads 1 of 2 (measured): cycles"


def arms(before: Path | None) -> dict[str, tuple[Path, list[str], dict]]:
    """name -> (checkout root, extra flags, extra environment)."""
    table = {"default": (ROOT, [], {}), "--threads 1": (ROOT, ["--threads", "1"], {}),
             "OMP_NUM_THREADS=1": (ROOT, [], {"OMP_NUM_THREADS": "1"})}
    if before is not None:
        table["before"] = (before, [], {})
    return table


def run_once(root: Path, flags: list[str], env: dict, args) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environ.update(env, PYTHONPATH=str(root))
    with tempfile.TemporaryDirectory() as out:
        if args.entry == "infer":
            cmd = [sys.executable, str(root / "infer.py"), "--ckpt", str(args.ckpt), "--prompt", args.prompt,
                   "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), *flags]
        else:
            cmd = [sys.executable, str(root / "evolve.py"), "--base", str(args.ckpt), "--cycles", "1", "--steps",
                   str(args.steps), "--seed", str(args.seed), "--out", str(Path(out) / "run"), "--no-progress", *flags]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=environ, timeout=3600, check=False)
        wall = time.perf_counter() - start
    if args.entry == "infer":
        match = FIGURES.search(done.stderr)
        speed = float(match.group(3)) if match else None
        threads = match and (match.group(4) or "torch's default").strip()
    else:
        match = CYCLE.search(done.stdout)
        speed = 1.0 / float(match.group(1)) if match else None  # cycles per second
        named = THREADS.search(done.stdout)
        threads = named.group(1) if named else "torch's default"
    if done.returncode != 0 or match is None:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return {"speed": speed, "wall_s": wall, "load": load, "threads": threads}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=ROOT / "checkpoints" / "base")
    parser.add_argument("--entry", choices=("infer", "evolve"), default="infer",
                        help="what is timed: one infer.py reply, or one evolve.py cycle (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="evolve: ticks of life in the cycle (default: %(default)s)")
    parser.add_argument("--prompt", default="import ")
    parser.add_argument("--max-new-tokens", type=int, default=150)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each arm per condition (default: %(default)s)")
    parser.add_argument("--before", type=Path, default=None, help="another checkout's root: its infer.py as arm 'before'")
    parser.add_argument("--conditions", default="as-is,busy", help="as-is (the machine as it is), busy (a busy loop beside), or both (default: %(default)s)")
    args = parser.parse_args(argv)
    args.ckpt = args.ckpt.resolve()
    table = arms(args.before.resolve() if args.before else None)
    what = (f"infer.py --prompt {args.prompt!r} --max-new-tokens {args.max_new_tokens} --seed {args.seed}"
            if args.entry == "infer" else f"evolve.py --cycles 1 --steps {args.steps} --seed {args.seed}")
    print(f"{args.ckpt}: {what}, {args.rounds} interleaved rounds per condition, {os.cpu_count()} CPUs")
    results = {}
    for condition in args.conditions.split(","):
        busy = None
        if condition == "busy":  # one more job holding a core
            busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"])  # at this process's own niceness
            time.sleep(1.0)
        try:
            for _ in range(args.rounds):
                for name, (root, flags, env) in table.items():
                    results.setdefault((condition, name), []).append(run_once(root, flags, env, args))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    unit = "bytes/s" if args.entry == "infer" else "cycle s"
    header = (f"{'condition':<9} {'arm':<18} {'threads':<20} {unit:>8} {'vs 1 thread':>11} {'wall s':>7} "
              f"{'load 1-min':>11}")
    print(header + "\n" + "-" * len(header))
    for (condition, name), runs in results.items():
        one = results[(condition, "--threads 1")]
        ratio = statistics.median(r["speed"] / o["speed"] for r, o in zip(runs, one))
        speed = statistics.median(r["speed"] for r in runs)
        loads = [r["load"] for r in runs]
        print(f"{condition:<9} {name:<18} {'/'.join(sorted({r['threads'] for r in runs})):<20} "
              f"{speed if args.entry == 'infer' else 1 / speed:8.1f} {ratio:10.2f}x "
              f"{statistics.median(r['wall_s'] for r in runs):7.1f} {min(loads):5.1f}-{max(loads):<5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
