"""infer.py: one-shot generation and the command line that opens the REPL or the demo.

`python infer.py --prompt TEXT` streams the continuation of TEXT to stdout (figures go to stderr);
`--interactive` opens the REPL and `--mode demo` a guided tour (both in h2q/chat.py). Every mode runs
over an h2q.session `Session` (weights, quantization, adapter) made from the flags (`InferConfig`);
one-shot calls h2q.generate.generate with a fresh cache, the REPL keeps a `Conversation` and its cache.
"""
from __future__ import annotations

import os
import sys
import time

from h2q.chat import demo, repl
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, run_main
from h2q.errors import H2QError
from h2q.evolve import records
from h2q.generate import generate, stream_to
from h2q.session import InferConfig, Session


def read_prompt(prompt: str) -> bytes:
    """--prompt TEXT as the bytes the user typed (odd bytes survive via os.fsencode); '-' reads stdin."""
    data = sys.stdin.buffer.read() if prompt == "-" else os.fsencode(prompt)
    if not data:
        raise H2QError("the prompt is empty; give --prompt TEXT (or pipe text into --prompt -)")
    return data


def one_shot(session: Session, out=None, err=None) -> list[int]:
    """Stream the continuation of cfg.prompt to `out` (stdout); one line of figures to `err`."""
    out, err, cfg = out or sys.stdout, err or sys.stderr, session.cfg
    streamer = stream_to(out)
    start = time.perf_counter()
    ids = generate(session.model, read_prompt(cfg.prompt), cfg.max_new_tokens, on_token=streamer,
                   seed=cfg.seed, cache_policy=cfg.kv, adapters=session.adapter, compile=session.compiled,
                   **cfg.sampling())
    seconds = time.perf_counter() - start
    streamer.close()
    if out.isatty():
        out.write("\n")
    out.flush()
    print(f"[h2q] {len(ids)} bytes in {seconds:.2f} s ({len(ids) / max(seconds, 1e-9):.1f} bytes/s, prefill "
          f"included) | weights {session.weights_label()} | kv {cfg.kv} | adapter {session.adapter_text()} "
          f"| seed {cfg.seed}", file=err)
    return ids


def main(argv=None) -> int:
    parser = Parser(prog="infer.py", description="Generate with the byte-level model: "
                                     "one-shot (--prompt), interactive (--interactive) or a demo (--mode demo).")
    add_dataclass_flags(parser, InferConfig)
    cfg = dataclass_from_args(InferConfig, parser.parse_args(argv))
    cfg.sampling()  # check the flags before the model loads
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?'
    if cfg.mode == "demo":
        return demo(cfg)
    if cfg.prompt is not None and not cfg.interactive and cfg.mode == "auto":
        one_shot(Session(cfg, records.resolve_adapter))
        return 0
    return repl(Session(cfg, records.resolve_adapter))


def cli():
    sys.exit(run_main(main))
