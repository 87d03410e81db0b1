"""Benchmark specialists and the router: `python scripts/bench_route.py --base DIR [--steps N]`.

1. Slices of this machine's own files, one per kind of text: `python` (the standard library's .py
   sources), `prose` (pydoc's help topics, pydoc_data.topics), `legal` (the LICENSE/COPYING/NOTICE
   files of the Python installation and its site-packages, and /usr/share/common-licenses), each
   document once (by content).
2. Held out: for python and prose the documents in the base's own validation split (h2q.data's hash
   split, so neither the base nor a specialist trained on them), for legal those of a hash split of
   its own; the rest is the specialist's slice.
3. One LoRA specialist per slice, fine-tuned on the frozen base with h2q.train (`--steps` each),
   saved as `OUT/specialists/KIND` (reused when present, unless --retrain), loaded by
   h2q.router.Router.from_folder into one AdapterBank.
4. A mixed held-out set: `--prompts` windows per kind of `--prompt-len` + `--continuation-len` bytes,
   evenly spaced over the held-out documents. What is scored: bits per byte of the continuation
   bytes, teacher-forced, each predicted from the prompt and the continuation before it. The
   router sees only the prompt (it scores the prompt's bytes under every specialist in one batched
   forward); the continuation is then scored under the choice.
It reports bits per byte for the base, each specialist, the best single adapter, the oracle (the
specialist of the prompt's kind), the automatic router (top-1, with its accuracy against the oracle
and its cost in ms per prompt) and the top-k Bayesian mixture, against the targets: the router within
2% of the oracle and below the best single adapter.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from h2q import checkpoint
from h2q.cli import run_main
from h2q.data import STDLIB_SKIP_DIRS, VAL_FRACTION, is_binary, val_score
from h2q.errors import H2QError
from h2q.router import Router, mixture_log2_probs
from h2q.train import TrainConfig, train

KINDS = ("legal", "prose", "python")  # sorted: the router's slot order
LICENSE_NAMES = ("license", "licence", "copying", "notice")
LEGAL_HELD_OUT = 0.2  # hash-split fraction of the legal documents held out
SLICE_BYTES = 2_000_000  # at most this much per slice: far more than a few hundred steps read


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="/work/scratch/base-mini", help="trained base checkpoint folder")
    p.add_argument("--out", default="checkpoints/route", help="slices, prepared data and specialists go here")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per specialist")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="fine-tuning peak learning rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--retrain", action="store_true", help="fine-tune again even if the specialists exist")
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts per kind")
    p.add_argument("--prompt-len", type=int, default=128, help="bytes the router sees")
    p.add_argument("--continuation-len", type=int, default=128, help="bytes scored after the prompt")
    p.add_argument("--top-k", type=int, default=2, help="specialists in the mixture")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


# -- the slices ---------------------------------------------------------------------------------------
def python_documents() -> dict[str, bytes]:
    """The standard library's .py files, named as h2q.data's default corpus names them."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                docs[f"stdlib/{path.relative_to(stdlib).as_posix()}"] = path.read_bytes()
    return docs


def prose_documents() -> dict[str, bytes]:
    from pydoc_data.topics import topics

    return {f"pydoc_topics/{key}.txt": text.encode("utf-8", "surrogatepass") for key, text in topics.items()}


def legal_documents() -> dict[str, bytes]:
    """License texts under the Python installation (its prefix and every site-packages folder) and
    /usr/share/common-licenses, text only, each distinct text once (the first path in sorted order)."""
    roots = {Path(sys.base_prefix), Path(sys.prefix), Path(sysconfig.get_paths()["purelib"]),
             Path("/usr/share/common-licenses")}
    found = {}
    for root in sorted(r for r in roots if r.is_dir()):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().startswith(LICENSE_NAMES):
                    path = Path(dirpath) / name
                    if path.is_file() and not path.is_symlink():
                        found.setdefault(str(path), path)
    docs, seen = {}, set()
    for name, path in sorted(found.items()):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if len(data) >= 200 and not is_binary(data) and digest not in seen:
            seen.add(digest)
            docs[f"licenses{name}"] = data
    return docs


def split(kind: str, docs: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(the specialist's slice, held-out documents)."""
    cut = LEGAL_HELD_OUT if kind == "legal" else VAL_FRACTION  # python, prose: the base's own val split
    held = {n: d for n, d in docs.items() if val_score(n) < cut}
    kept, size = {}, 0
    for name in sorted(set(docs) - set(held), key=val_score):  # a hash-ordered, size-capped subset
        if size + len(docs[name]) <= SLICE_BYTES:
            kept[name] = docs[name]
            size += len(docs[name])
    return kept, held


def write_slice(folder: Path, docs: dict[str, bytes]) -> None:
    """One file per document, named by a hash of its name (paths run long); files already holding
    the same bytes are left alone (h2q.data reuses a prepared corpus while its files' sizes and
    mtimes are unchanged)."""
    wanted = {folder / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.txt": data for name, data in docs.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for stale in set(folder.iterdir()) - set(wanted):
        stale.unlink()
    for path, data in wanted.items():
        if not path.is_file() or path.read_bytes() != data:
            checkpoint.atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))


def held_out_windows(docs: dict[str, bytes], n: int, length: int) -> list[list[int]]:
    """n windows of `length` bytes, evenly spaced over the held-out documents long enough to hold one."""
    places = [(name, start) for name, data in sorted(docs.items())
              for start in range(0, len(data) - length + 1, length)]
    if len(places) < n:
        raise H2QError(f"the held-out documents hold {len(places)} windows of {length} bytes, fewer than --prompts {n}")
    chosen = [places[round(i * (len(places) - 1) / max(n - 1, 1))] for i in range(n)]
    return [list(docs[name][start:start + length]) for name, start in chosen]


# -- the specialists ----------------------------------------------------------------------------------
def fine_tune(args, kind: str, slice_dir: Path, out: Path) -> float:
    """Train (or reuse) the specialist of `kind`; seconds spent training (0 when reused)."""
    if (out / checkpoint.ADAPTER_CONFIG_FILE).is_file() and not args.retrain:
        print(f"  {kind}: reusing {out}")
        return 0.0
    start = time.perf_counter()
    cfg = TrainConfig(init_from=args.base, lora_rank=args.lora_rank, data_dir=str(slice_dir),
                      data_root=str(Path(args.out) / "data"), out=str(out), steps=args.steps, lr=args.lr,
                      warmup=max(1, args.steps // 10), batch_size=args.batch_size, eval_every=args.steps,
                      eval_batches=8, save_every=args.steps, progress=False, device="cpu")
    result = train(cfg)
    seconds = time.perf_counter() - start
    final = result.get("final") or {}
    val = final.get("val_bpb", float("nan"))
    print(f"  {kind}: {args.steps} steps in {seconds:.0f} s, slice val {val:.3f} bits/byte")
    return seconds


# -- evaluation ---------------------------------------------------------------------------------------
def evaluate(args, router: Router, prompts: list[tuple[str, list[int]]]):
    """Per prompt: continuation bits per byte under the base and every specialist (one forward of
    1 + N rows), the router's top-1 and top-k decisions from the prompt alone, and its cost."""
    P, slots = args.prompt_len, [-1, *range(len(router.tasks))]
    rows, routing_ms, single_ms = [], [], []
    for kind, ids in prompts:
        log2_p = router.log2_probs(ids, slots)  # (1 + N, P + C - 1): row 0 the base
        continuation = -log2_p[:, P - 1:]  # bits of the continuation bytes, (1 + N, C)
        top1 = router.route(ids[:P])
        start = time.perf_counter()
        router.log2_probs(ids[:P], [router.slot[top1.tasks[0]]])  # what one row of the prompt costs
        single_ms.append(1e3 * (time.perf_counter() - start))
        mix = router.route(ids[:P], top_k=args.top_k)
        routing_ms.append(top1.ms)
        mixed = [router.slot[t] + 1 for t in mix.tasks]
        # the mixture's weights at the continuation are the posterior after the prompt: score the
        # whole window with the Bayesian mixture (uniform prior over the top k) and keep the continuation
        mix_bits = -mixture_log2_probs(log2_p[mixed])[P - 1:]
        rows.append({"kind": kind, "base": float(continuation[0].mean()),
                     **{t: float(continuation[1 + i].mean()) for i, t in enumerate(router.tasks)},
                     "route": top1.tasks[0], "mix": float(mix_bits.mean())})
    return rows, routing_ms, single_ms


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def report(args, router: Router, rows, routing_ms, single_ms) -> None:
    tasks = router.tasks
    kinds = sorted({r["kind"] for r in rows})

    def line(label, pick):
        per_kind = [mean(pick(r) for r in rows if r["kind"] == k) for k in kinds]
        overall = mean(pick(r) for r in rows)
        print(f"{label:<34} {overall:>8.4f} " + " ".join(f"{v:>8.4f}" for v in per_kind))
        return overall

    print(f"\nbits per byte of the {args.continuation_len}-byte continuations ({args.prompts} held-out prompts "
          f"per kind, {args.prompt_len}-byte prompts)")
    print(f"{'':<34} {'all':>8} " + " ".join(f"{k:>8}" for k in kinds))
    base = line("base", lambda r: r["base"])
    singles = {t: line(f"specialist {t} for every prompt", lambda r, t=t: r[t]) for t in tasks}
    best_single = min(singles, key=singles.get)
    oracle = line("oracle (the prompt's kind)", lambda r: r[r["kind"]])
    routed = line("router top-1 (auto)", lambda r: r[r["route"]])
    mixed = line(f"router top-{args.top_k} Bayesian mixture", lambda r: r["mix"])
    line("best per prompt in hindsight", lambda r: min(r[t] for t in tasks))
    accuracy = mean(r["route"] == r["kind"] for r in rows)
    per_kind = {k: mean(r["route"] == k for r in rows if r["kind"] == k) for k in kinds}
    print(f"\nrouter accuracy against the oracle: {100 * accuracy:.1f}% ("
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per_kind.items()) + ")")
    print(f"routing cost: median {statistics.median(routing_ms):.1f} ms, max {max(routing_ms):.1f} ms per prompt "
          f"({len(tasks)} rows x {args.prompt_len} bytes in one forward, {torch.get_num_threads()} threads); one row "
          f"of the prompt alone, timed right after each: median {statistics.median(single_ms):.1f} ms")
    print(f"base {base:.4f}; best single adapter: {best_single} {singles[best_single]:.4f}")
    print("\ntargets:")
    for label, value in (("top-1", routed), (f"top-{args.top_k} mixture", mixed)):
        gap = 100 * (value / oracle - 1)
        print(f"  router {label}: {value:.4f} bits/byte, {gap:+.2f}% vs the oracle {oracle:.4f} (target <= +2%) -> "
              f"{'met' if gap <= 2 else 'NOT met'}; vs the best single adapter {singles[best_single]:.4f} "
              f"(target below) -> {'met' if value < singles[best_single] else 'NOT met'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    for flag in ("steps", "lora_rank", "batch_size", "prompts", "prompt_len", "continuation_len", "top_k"):
        if getattr(args, flag) < 1:
            raise H2QError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = checkpoint.load_model(args.base)
    if args.prompt_len + args.continuation_len > model.config.context_len:
        raise H2QError(f"--prompt-len + --continuation-len must fit the base's context of {model.config.context_len}")
    if not 1 <= args.top_k <= len(KINDS):
        raise H2QError(f"--top-k must be in [1, {len(KINDS)}]")
    out = Path(args.out)
    sources = {"legal": legal_documents, "prose": prose_documents, "python": python_documents}
    prompts, trained_s = [], 0.0
    print(f"base {args.base} ({model.config}); specialists: rank {args.lora_rank}, {args.steps} steps of "
          f"{args.batch_size} x {model.config.context_len} bytes each, lr {args.lr}")
    for kind in KINDS:
        kept, held = split(kind, sources[kind]())
        print(f"  {kind}: slice {len(kept)} documents, {sum(map(len, kept.values())) / 1e3:.0f} KB; held out "
              f"{len(held)} documents, {sum(map(len, held.values())) / 1e3:.0f} KB")
        write_slice(out / "slices" / kind, kept)
        prompts += [(kind, w) for w in held_out_windows(held, args.prompts, args.prompt_len + args.continuation_len)]
    for kind in KINDS:
        trained_s += fine_tune(args, kind, out / "slices" / kind, out / "specialists" / kind)
    router = Router.from_folder(out / "specialists", model)
    assert router.tasks == list(KINDS), router.tasks
    start = time.perf_counter()
    rows, routing_ms, single_ms = evaluate(args, router, prompts)
    print(f"fine-tuning {trained_s:.0f} s in all; evaluation {time.perf_counter() - start:.0f} s")
    report(args, router, rows, routing_ms, single_ms)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
