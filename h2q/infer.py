"""infer.py: one-shot generation and the command line that opens the REPL or the demo.

`python infer.py --prompt TEXT` streams the continuation of TEXT to stdout; the figures follow on
stderr, on a line of their own, with the seed used (a fresh one when none was given), so a good sample
can be had again with `--seed`. `--interactive` opens the REPL and `--mode demo` a guided tour (both
in h2q/chat.py). Every mode runs over an h2q.session `Session` (weights, quantization, adapter, torch
thread count) made from the flags (`InferConfig`, shown in --help by its groups); one-shot calls
h2q.generate.generate with a fresh cache, the REPL keeps a `Conversation` and its cache. With
`--specialists DIR` the prompt is routed first (h2q/router.py) and the decision goes to stderr,
before the text.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from h2q.chat import demo, repl
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, run_main
from h2q.errors import ConfigError, H2QError
from h2q.evolve import records
from h2q.generate import generate, stream_to
from h2q.session import OPTION_GROUPS, InferConfig, Session, fresh_seed

EXAMPLES = """examples:
  python infer.py --prompt "def main():"             continue a prompt (figures and the seed on stderr)
  python infer.py --prompt "import " --seed 7        the same text again: give the seed a run printed
  python infer.py --interactive                      the REPL (/help inside; end a line with \\ to go on in it)
  python infer.py --interactive --adapter a0013      an evolved agent: /observe shows its actions
  python infer.py --mode demo                        a guided tour: text, quantization, KV caches, agents
  python infer.py --prompt - --quant int4 --kv h2o   stdin as the prompt, int4 weights, an evicting KV cache
  python infer.py --prompt "x" --threads 1           one torch thread, not measured
  python infer.py --interactive --session chat.safetensors   continue a saved conversation (/save NAME, /load NAME)
  python infer.py --specialists specialists --prompt "import "   routed to the specialist with the lowest bits/byte
  python infer.py --interactive --specialists specialists --task legal   one specialist answers (/task NAME|auto)
"""


def read_prompt(prompt: str) -> bytes:
    """--prompt TEXT as the bytes the user typed (odd bytes survive via os.fsencode); '-' reads stdin."""
    data = sys.stdin.buffer.read() if prompt == "-" else os.fsencode(prompt)
    if not data:
        raise H2QError("the prompt is empty; give --prompt TEXT (or pipe text into --prompt -)")
    return data


def figures_line(n_bytes: int, seconds: float, session: Session, seed: int) -> str:
    cfg = session.cfg
    return (f"[h2q] {n_bytes} bytes in {seconds:.2f} s ({n_bytes / max(seconds, 1e-9):.1f} bytes/s, prefill "
            f"included) | weights {session.weights_label()} | kv {cfg.kv} | adapter {session.adapter_text()} "
            f"| threads {session.threads.describe()} | seed {seed}")


def one_shot(session: Session, out=None, err=None) -> list[int]:
    """Stream the continuation of cfg.prompt to `out` (stdout: the new text only); then, after a
    newline, one line of figures to `err` (stderr)."""
    out, err, cfg = out or sys.stdout, err or sys.stderr, session.cfg
    seed = cfg.seed if cfg.seed is not None else fresh_seed()
    prompt = read_prompt(cfg.prompt)
    session.threads.check()
    decision = session.route(list(prompt))
    if decision is not None:
        err.write(decision.describe() + "\n")
        err.flush()
    adapters = session.adapters_for(decision.tasks[0] if decision is not None else None)
    streamer = stream_to(out)
    start = time.perf_counter()
    ids = generate(session.model, prompt, cfg.max_new_tokens, on_token=streamer, seed=seed, cache_policy=cfg.kv,
                   adapters=adapters, compile=session.compiled, **cfg.sampling())
    seconds = time.perf_counter() - start
    streamer.close()
    out.flush()
    err.write("\n" + figures_line(len(ids), seconds, session, seed) + "\n")
    err.flush()
    return ids


def make_parser() -> Parser:
    parser = Parser(prog="infer.py", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Generate with the byte-level model: one-shot (--prompt), interactive\n"
                                "(--interactive) or a guided demo (--mode demo).")
    for group, cls in OPTION_GROUPS.items():
        add_dataclass_flags(parser, cls, group)
    return parser


def main(argv=None) -> int:
    cfg = dataclass_from_args(InferConfig, make_parser().parse_args(argv))
    cfg.sampling()  # check the flags before the model loads
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?'
    if cfg.mode == "demo":
        return demo(cfg)
    if cfg.prompt is not None and not cfg.interactive and cfg.mode == "auto":
        if cfg.session is not None:
            raise ConfigError("session", "keeps a REPL conversation; add --interactive (one-shot keeps nothing)")
        one_shot(Session(cfg, records.resolve_adapter))
        return 0
    return repl(Session(cfg, records.resolve_adapter))


def cli():
    sys.exit(run_main(main))
