"""Sweep the sampler's settings and measure what infer.py's defaults are chosen from.

For every point of a grid of (temperature, top-p, min-p, repetition penalty and its window), the
same prompts are continued in one batch (h2q.generate.generate_batch, one seed per round) and two figures are taken:

* non-blank: the share of outputs that are not blank, blank meaning 80% or more whitespace bytes
  (an empty output counts as blank): the first-sample failure a byte model falls into, a run of
  spaces or newlines;
* bits/byte: of the sampled bytes under the plain model (temperature 1, nothing cut), pooled over
  all outputs: how plausible the model itself finds what was sampled. Lower is more conventional
  text; far below the held-out text's own figure (printed as the reference) means loops.

The prompts are line starts from the held-out split of the corpus (`data.load_corpus(...).val`, the
default corpus unless --data-dir): `count` lines spread evenly over it with at least 8 visible bytes,
each cut after its first few words (at most 24 bytes), as a user would type `def main(` or `for i in`.

The choice (printed last, `choose`): the highest non-blank share, ties broken by the lowest bits/byte
(the most conventional text among the points that are least often blank). Closeness to the held-out
text's own figure is no aim by itself: untruncated sampling at temperature 1 matches it by
construction (a model trained on cross-entropy is roughly calibrated), tail bytes and all. Greedy (temperature 0) points vary
the penalty only, since top-p and min-p do not change an argmax, and points without a penalty are
not repeated per window. Each round of sampling uses its own
seed for all points, so the points are compared on the same random numbers.

    python scripts/sweep_sampling.py --ckpt checkpoints/base            # a few minutes on 2 cores (mini)
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from h2q import data, tokenizer
from h2q.checkpoint import load_model
from h2q.cli import Parser, run_main
from h2q.generate import generate_batch
from h2q.perf import ThreadPolicy

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
BLANK_SHARE = 0.8
LINE_START = re.compile(rb"^\s*(?:\S+\s*){1,3}")  # indentation and the first (up to) three words


def held_out_prompts(val: np.ndarray, count: int, max_len: int = 24) -> tuple[list[bytes], list[bytes]]:
    """`count` line starts spread evenly over the held-out bytes -> (prompts, the text that really
    follows each, up to 256 bytes)."""
    text = bytes(val)
    starts = [0] + [m.end() for m in re.finditer(rb"\n", text)]
    lines = [s for s in starts if len(text[s:s + 80].split(b"\n")[0].strip()) >= 8]
    picks = [lines[i] for i in np.linspace(0, len(lines) - 1, count).round().astype(int)]
    prompts, follows = [], []
    for s in picks:
        line = text[s:s + 200].split(b"\n")[0]
        prompt = LINE_START.match(line).group(0)[:max_len].decode("utf-8", "ignore").encode()
        prompts.append(prompt)
        follows.append(text[s + len(prompt):s + len(prompt) + 256].split(b"\x00")[0])
    return prompts, follows


def is_blank(ids: list[int]) -> bool:
    return not ids or sum(i in WHITESPACE for i in ids) >= BLANK_SHARE * len(ids)


@torch.inference_mode()
def bits_per_byte(model, prompts: list[bytes], outputs: list[list[int]]) -> float:
    """Pooled bits/byte of each output after its prompt under the plain model (one forward, rows
    right-padded: a causal model's earlier positions never see the padding)."""
    rows = [list(p) + out for p, out in zip(prompts, outputs)]
    width = min(max(map(len, rows)), model.config.context_len)
    ids = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)  # (B, T)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)  # (B, T): positions holding sampled bytes
    for b, (row, prompt) in enumerate(zip(rows, prompts)):
        row = row[:width]
        ids[b, :len(row)] = torch.tensor(row)
        scored[b, len(prompt):len(row)] = True
    logits = model(ids[:, :-1].to(model.embed.weight.device)).float().cpu()  # (B, T-1, V)
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    mask = scored[:, 1:]
    return float(nll[mask].sum() / max(int(mask.sum()), 1) / math.log(2))


def grid(temperatures, top_ps, min_ps, penalties, windows):
    """Sweep points; greedy ones vary the penalty only, unpenalized ones take the first window."""
    for t, p, m, r, n in itertools.product(temperatures, top_ps, min_ps, penalties, windows):
        if (t == 0 and (p, m) != (top_ps[0], min_ps[0])) or (r == 1 and n != windows[0]):
            continue
        yield {"temperature": t, "top_p": p, "min_p": m, "repeat_penalty": r, "repeat_last_n": n}


def choose(results: list[tuple]) -> tuple:
    """The chosen (point, non-blank, bits/byte, outputs) of `results` (see the module docstring)."""
    return min(results, key=lambda r: (-r[1], r[2]))


def numbers(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def main(argv=None) -> int:
    parser = Parser(prog="sweep_sampling.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/base", help="model checkpoint folder (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="corpus folder (default: the default corpus)")
    parser.add_argument("--data-root", default="data", help="where prepared corpora live (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=50, help="held-out line starts (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=120, help="bytes per output (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1, help="rounds of sampling, one seed each (default: %(default)s)")
    parser.add_argument("--temperatures", type=numbers(float), default=[0.0, 0.6, 0.8, 1.0])
    parser.add_argument("--top-ps", type=numbers(float), default=[0.95, 1.0])
    parser.add_argument("--min-ps", type=numbers(float), default=[0.0, 0.05])
    parser.add_argument("--repeat-penalties", type=numbers(float), default=[1.0, 1.1, 1.2, 1.3])
    parser.add_argument("--repeat-last-ns", type=numbers(int), default=[16, 64], help="the penalty's windows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, 0 = measured (default: %(default)s)")
    parser.add_argument("--show", type=int, default=3, help="outputs of the chosen point to print (default: %(default)s)")
    args = parser.parse_args(argv)
    threads = ThreadPolicy(args.threads)
    model, _ = load_model(args.ckpt)
    corpus = data.load_corpus(args.data_dir, 1, args.data_root, log=lambda *a: None)
    prompts, follows = held_out_prompts(corpus.val, args.prompts)
    room = model.config.context_len - max(map(len, prompts))
    new = min(args.max_new_tokens, room)
    reference = bits_per_byte(model, prompts, [list(f[:new]) for f in follows])
    print(f"{args.ckpt}: {len(prompts)} held-out line starts (e.g. {prompts[0]!r}, {prompts[1]!r}), {new} bytes each, "
          f"{args.seeds} seed(s) | threads {threads.describe()}")
    print(f"reference: the held-out text after the same prompts scores {reference:.3f} bits/byte\n")
    header = f"{'temp':>5} {'top-p':>5} {'min-p':>5} {'repeat':>6} {'last-n':>6} | {'non-blank':>9} {'bits/byte':>9} {'s':>5}"
    print(header)
    print("-" * len(header))
    results = []
    start_all = time.perf_counter()
    for point in grid(args.temperatures, args.top_ps, args.min_ps, args.repeat_penalties, args.repeat_last_ns):
        threads.check()
        start = time.perf_counter()
        outputs = []
        for seed in range(args.seeds):
            outputs += generate_batch(model, prompts, new, seed=seed, stop=(tokenizer.EOT,),
                                      top_p=point["top_p"] if point["top_p"] < 1 else None, min_p=point["min_p"] or None,
                                      temperature=point["temperature"], repeat_penalty=point["repeat_penalty"],
                                      repeat_last_n=point["repeat_last_n"])
        non_blank = 1 - sum(map(is_blank, outputs)) / len(outputs)
        bpb = bits_per_byte(model, prompts * args.seeds, outputs)
        results.append((point, non_blank, bpb, outputs))
        print(f"{point['temperature']:5.2f} {point['top_p']:5.2f} {point['min_p']:5.2f} {point['repeat_penalty']:6.2f} "
              f"{point['repeat_last_n'] if point['repeat_penalty'] != 1 else '-':>6} | "
              f"{non_blank:9.0%} {bpb:9.3f} {time.perf_counter() - start:5.1f}", flush=True)
    point, non_blank, bpb, outputs = choose(results)
    print(f"\n{len(results)} points in {time.perf_counter() - start_all:.0f} s. Chosen: temperature {point['temperature']:g}, "
          f"top-p {point['top_p']:g}, min-p {point['min_p']:g}, repeat penalty {point['repeat_penalty']:g} "
          f"over the last {point['repeat_last_n']} bytes: {non_blank:.0%} non-blank, {bpb:.3f} bits/byte (the held-out text: "
          f"{reference:.3f})")
    for prompt, out in list(zip(prompts, outputs))[:args.show]:
        print(f"  {prompt.decode('utf-8', 'replace')!r} -> {bytes(out).decode('utf-8', 'replace')[:100]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
