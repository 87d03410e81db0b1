"""Distillation benchmark: a student's val bits/byte trained with and without a teacher (train.py
--teacher), at equal steps and at equal wall-clock, next to the teacher's own. Prints measured figures.

    python scripts/bench_distill.py --teacher checkpoints/base                  # student tiny, 1500 steps
    python scripts/bench_distill.py --teacher T --alphas 0.5,1.0 --seeds 1337,2,3   # the README's table
    python scripts/bench_distill.py --teacher T --alphas 0.5,0.9 --temperature 2    # its T = 2 rows

Runs on the default corpus (or --data-dir), scored on the same validation windows
at the student's block size:
1. the teacher alone (no training);
2. the student alone, --steps steps;
3. the student with the teacher, --steps steps, once per --alphas value (at --temperature);
4. the student alone for as many steps as fit in run 3's wall-clock: --steps times the measured cost
   ratio of a distillation step (teacher forward included) to a plain step. The ratio is timed here,
   the two kinds of step interleaved in one process at --threads threads, so load from other processes
   on the machine falls on both alike; the runs' own wall-clock is printed too, but on a shared
   machine it is noise.
Every training run repeats once per --seeds value (the seed sets the student's init and its batches;
a run with the teacher sees the same batches as the plain run of its seed).
"""
import argparse
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from h2q import checkpoint, data
from h2q.cli import resolve_device, run_main
from h2q.config import PRESETS
from h2q.distill import Distillation, load_teacher
from h2q.model import Transformer
from h2q.train import TrainConfig, evaluate, make_optimizer, train


def step_cost_ratio(student_preset: str, teacher, cfg: TrainConfig, corpus, device, reps: int) -> tuple[float, float]:
    """Median seconds of a plain training step and of a distillation step, interleaved rep by rep."""
    torch.manual_seed(0)
    model = Transformer(PRESETS[student_preset]).to(device)
    optimizer = make_optimizer(list(model.named_parameters()), cfg, device)
    objective = Distillation(teacher, cfg.distill_alpha, cfg.distill_temperature)
    plain = lambda logits, x, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    sampler = torch.Generator().manual_seed(0)
    times = {"plain": [], "distill": []}
    for rep in range(reps + 2):
        for name, loss_fn in (("plain", plain), ("distill", objective)):
            x, y = data.get_batch(corpus.train, cfg.batch_size, cfg.block_size, sampler, device)
            t = time.perf_counter()
            loss_fn(model(x), x, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= 2:  # the first two warm up
                times[name].append(time.perf_counter() - t)
    return statistics.median(times["plain"]), statistics.median(times["distill"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="a trained checkpoint folder (float or quantized)")
    p.add_argument("--student", default="tiny", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=1500, help="training steps of the equal-steps runs")
    p.add_argument("--alphas", default="0.5", help="comma-separated --distill-alpha values, one run each")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=0, help="0 = the student's context length")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--seeds", default="1337", help="comma-separated seeds: every training run once per seed "
                   "(init and batches differ by seed, so one seed's gap can be noise)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--data-root", default="data")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared CPU)")
    p.add_argument("--timing-reps", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", help="folder for the runs' checkpoints (default: a new temporary one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    alphas = [float(a) for a in args.alphas.split(",")]
    block = args.block_size or PRESETS[args.student].context_len
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_distill-"))

    seeds = [int(s) for s in args.seeds.split(",")]

    def config(name: str, steps: int, seed: int = seeds[0], **kw) -> TrainConfig:
        return TrainConfig(data_dir=args.data_dir, data_root=args.data_root, out=str(work / f"{name}-s{seed}"),
                           preset=args.student, steps=steps, batch_size=args.batch_size, block_size=block, lr=args.lr,
                           eval_every=max(steps, 1), eval_batches=args.eval_batches, save_every=max(steps, 1),
                           device=args.device, progress=False, distill_temperature=args.temperature, seed=seed, **kw)

    teacher = load_teacher(args.teacher, PRESETS[args.student], block, device)
    probe = config("probe", args.steps, teacher=args.teacher, distill_alpha=alphas[0])
    corpus = data.load_corpus(args.data_dir, block, root=args.data_root)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()  # train's
    teacher_bpb = evaluate(teacher, corpus.val, probe, block, device, autocast) / math.log(2)
    t_plain, t_distill = step_cost_ratio(args.student, teacher, probe, corpus, device, args.timing_reps)
    ratio = t_distill / t_plain
    equal_time_steps = round(args.steps * ratio)
    print(f"step cost ({args.threads} thread(s), {args.timing_reps} interleaved reps, median): plain "
          f"{t_plain * 1e3:.1f} ms, with teacher {t_distill * 1e3:.1f} ms, ratio {ratio:.2f}")

    student_params = f"{Transformer(PRESETS[args.student]).num_params():,}"
    teacher_step = checkpoint.read_metadata(checkpoint.resolve_model_file(args.teacher)).get("step", "?")
    rows = [("teacher alone", teacher_step, f"{teacher.num_params():,}", [], [teacher_bpb] * len(seeds))]
    runs = [("student alone, equal steps", "plain", args.steps, {})]
    runs += [(f"student + teacher (alpha {alpha:g}, T {args.temperature:g})", f"distill-{alpha:g}", args.steps,
              {"teacher": args.teacher, "distill_alpha": alpha}) for alpha in alphas]
    runs += [(f"student alone, equal wall-clock (x{ratio:.2f} steps)", "plain-equal-time", equal_time_steps, {})]
    for label, name, steps, flags in runs:
        walls, bpbs = [], []
        for seed in seeds:
            t = time.perf_counter()
            summary = train(config(name, steps, seed, **flags))
            walls.append(time.perf_counter() - t)
            bpbs.append(summary["final"]["val_bpb"])
            print(f"  {label}, seed {seed}: {bpbs[-1]:.4f} bits/byte")
        rows.append((label, steps, student_params, walls, bpbs))

    print(f"\nstudent {args.student}, teacher {args.teacher} ({teacher.config.n_layer} layers, d_model "
          f"{teacher.config.d_model}); block {block}, batch {args.batch_size}, lr {args.lr:g}; val bits/byte on "
          f"{args.eval_batches * args.batch_size} validation windows of {block} bytes")
    per_seed = " | ".join(f"seed {s}" for s in seeds)
    print(f"| run | steps | params | mean wall s (measured, noisy) | {per_seed} | mean |\n"
          f"|---|---:|---:|---:|{'---:|' * len(seeds)}---:|")
    for label, steps, params, walls, bpbs in rows:
        wall = f"{statistics.mean(walls):.0f}" if walls else ""
        print(f"| {label} | {steps} | {params} | {wall} | {' | '.join(f'{b:.4f}' for b in bpbs)} | "
              f"{statistics.mean(bpbs):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
