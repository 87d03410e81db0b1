"""The interactive side of infer.py: the chat REPL and the guided demo, both over h2q.session's
`Session` (weights, adapter) and `Conversation` (the running text and its persistent KV cache).

The REPL reads a line at a time (with readline's editing and history where the standard library has
it): a `/command` changes a setting and answers in one line, anything else is a turn whose reply
streams byte by byte through the incremental UTF-8 decoder. Ctrl-C stops a reply, Ctrl-D leaves. The
demo is a fixed-seed tour for a newcomer: a few continuations, then one prompt under every weight
quantization and KV-cache policy with a small table of speed and memory, then two evolved agents.
"""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

from h2q.errors import ConfigError, H2QError
from h2q.evolve import records
from h2q.generate import stream_to
from h2q.kvcache import policies
from h2q.quant import model_bytes
from h2q.session import NEWLINE, Conversation, InferConfig, Session

# -- the REPL ------------------------------------------------------------------------------------------
PROMPT = "> "
COMMANDS = {  # name -> (argument, what it does)
    "/temp": ("X", "sampling temperature (0 = greedy)"),
    "/topk": ("K", "sample among the K most likely bytes (0 = off)"),
    "/topp": ("P", "nucleus sampling mass in (0, 1] (1 = off)"),
    "/max": ("N", "bytes per reply at most"),
    "/seed": ("N", "restart the random stream from seed N"),
    "/adapter": ("AGENT_ID|SLOT|PATH|none", "LoRA adapter: an evolve agent, a folder, or none"),
    "/quant": ("none|int8|int4", "weights: float, or quantized from the kept float weights"),
    "/kv": ("full|int8|int4|window|h2o", "KV-cache policy"),
    "/reset": ("", "start a new conversation"),
    "/stats": ("", "speed of the last reply, model and KV memory, adapter in use"),
    "/help": ("", "this list"),
    "/quit": ("", "leave (Ctrl-D works too)"),
}
SETTINGS = {"/temp": ("temperature", float), "/topk": ("top_k", int), "/topp": ("top_p", float),
            "/max": ("max_new_tokens", int), "/seed": ("seed", int)}


class Repl:
    def __init__(self, session: Session, out):
        self.session, self.out = session, out
        self.chat = Conversation(session, session.cfg.kv)
        self.color = out.isatty()

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def banner(self) -> None:
        s, cfg = self.session, self.session.config
        self.say(f"h2q chat | {s.cfg.ckpt}: {s.float_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} "
                 f"layers, context {cfg.context_len} bytes | {s.device} | weights {s.weights_label()} | "
                 f"kv {self.chat.policy} | adapter {s.adapter_text()}")
        self.say("This is a byte-level base model: a text continuer, not a chat assistant. Each line you type "
                 "joins the running text with a newline and the model writes on until a blank line or /max "
                 "bytes; an empty line lets it go on. Try the start of something it has read, e.g. `def main(`.")
        self.say("/help lists the commands; Ctrl-C stops a reply, Ctrl-D exits.")

    def help(self) -> None:
        for name, (arg, text) in COMMANDS.items():
            self.say(f"  {(name + ' ' + arg).ljust(34)} {text}")

    def usage(self, name: str) -> None:
        arg, text = COMMANDS[name]
        self.say(f"usage: {name} {arg or '(no argument)'}: {text}")

    def command(self, line: str) -> bool:
        """Run one /command; False means quit. Bad input gets one line, never a traceback."""
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name not in COMMANDS:
            self.say(f"unknown command {name}; try one of {' '.join(COMMANDS)} (/help explains them)")
            return True
        try:
            return self._run(name, arg)
        except ValueError:
            self.usage(name)
        except ConfigError as e:  # a setting out of range: name the command that sets it
            command = next((c for c, (attr, _) in SETTINGS.items() if attr == e.field), e.field)
            self.say(f"error: {command} {e.problem}")
        except H2QError as e:
            self.say(f"error: {e}")
        return True

    def _run(self, name: str, arg: str) -> bool:
        s, chat, cfg = self.session, self.chat, self.session.cfg
        if arg and not COMMANDS[name][0]:
            raise ValueError(f"{name} takes no argument")
        if name in SETTINGS:
            attr, kind = SETTINGS[name]
            if arg:
                value = kind(arg)
                InferConfig(**{**vars(cfg), attr: value}).sampling()  # check before changing anything
                setattr(cfg, attr, value)
                if attr == "seed":
                    chat.set_seed(value)
            self.say(f"{attr} {chat.seed if attr == 'seed' else getattr(cfg, attr)}")
        elif name == "/adapter":
            if arg:
                s.set_adapter(arg)
                chat.invalidate()  # keys and values depend on the adapter
            self.say(f"adapter {s.adapter_text()}")
        elif name == "/quant":
            if arg:
                s.set_quant(arg.lower())
                chat.invalidate()
            self.say(f"weights {s.weights_label()}")
        elif name == "/kv":
            if arg:
                chat.set_policy(arg.lower())
            self.say(f"kv {chat.policy}")
        elif name == "/reset":
            chat.reset()
            self.say("[new conversation]")
        elif name == "/stats":
            self.stats()
        elif name == "/help":
            self.help()
        elif name == "/quit":
            return False
        return True

    def stats(self) -> None:
        s, chat, cfg, last = self.session, self.chat, self.session.cfg, self.chat.last
        if last is None:
            self.say("last reply: none yet")
        else:
            self.say(f"last reply: {len(last.ids)} bytes in {last.decode_s:.2f} s = {last.bytes_per_s:.1f} bytes/s "
                     f"(ended: {last.ended}); prefill {last.prefill_tokens} bytes in {last.prefill_s:.3f} s")
        kept = "" if s.model is s.float_model else f"; float weights kept: {model_bytes(s.float_model) / 1e6:.2f} MB"
        self.say(f"weights: {s.weights_label()}{kept}")
        self.say(f"kv cache: {chat.policy}, {chat.max_len} slots, {chat.kv_bytes / 1e6:.3f} MB; "
                 f"conversation {len(chat.tokens)} bytes")
        self.say(f"adapter: {s.adapter_text()}")
        self.say(f"sampling: temperature {cfg.temperature}, top-k {cfg.top_k or 'off'}, top-p "
                 f"{cfg.top_p if cfg.top_p < 1 else 'off'}, max {cfg.max_new_tokens} bytes, seed {chat.seed}")

    def turn(self, line: str) -> None:
        text = line.encode("utf-8", errors="surrogateescape")  # odd bytes typed in stay those bytes
        if self.color:
            self.out.write("\033[36m")
        streamer = stream_to(self.out)
        reply = self.chat.reply(text or None, streamer, self.say)
        streamer.close()
        if self.color:
            self.out.write("\033[0m")
        if reply.ids[-1:] != [NEWLINE]:
            self.out.write("\n")
        notes = {"max": f"[/max {self.session.cfg.max_new_tokens} bytes reached; an empty line goes on]",
                 "stopped": "[stopped]", "end of text": "[end of text]", "context full": "[context full]"}
        if reply.ended in notes:
            self.say(notes[reply.ended])
        self.out.flush()


def repl(session: Session, out=None) -> int:
    """Read lines until /quit or EOF: /commands change settings, other lines are turns."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    sys.stdin.reconfigure(errors="surrogateescape")
    r = Repl(session, out)
    r.banner()
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            r.say()
            return 0
        except KeyboardInterrupt:
            r.say()
            continue
        try:
            if line.strip().startswith("/"):
                if not r.command(line):
                    return 0
            else:
                r.turn(line)
        except KeyboardInterrupt:
            r.say("[cancelled]")


# -- the demo ------------------------------------------------------------------------------------------
DEMO_PROMPTS = ["def fibonacci(n):", "The ", "import os"]


def _snippet(ids: list[int], width: int = 36) -> str:
    """The start of a reply on one line, runs of whitespace shown as one space."""
    text = " ".join(bytes(ids).decode("utf-8", errors="replace").split()) or "(only whitespace)"
    return text[:width] + ("..." if len(text) > width else "")


def _measure(session: Session, label: str, prompt: str, policy: str, max_len: int | None = None) -> list[str]:
    """One reply to `prompt` from a fresh conversation -> a table row."""
    chat = Conversation(session, policy, max_len)
    reply = chat.reply(prompt.encode(), lambda token: None, lambda notice: None)
    return [label, f"{model_bytes(session.model) / 1e6:.3f}", f"{chat.kv_bytes / 1e6:.3f}",
            f"{reply.bytes_per_s:.0f}", _snippet(reply.ids)]


def _table(say, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        say("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _side_by_side(say, columns: list[tuple[str, str]], width: int = 38) -> None:
    wrapped = [[title[:width], "-" * min(width, len(title))] + textwrap.wrap(text.replace("\n", " / "), width)
               for title, text in columns]
    for i in range(max(map(len, wrapped))):
        say("  " + " | ".join((col[i] if i < len(col) else "").ljust(width) for col in wrapped).rstrip())


def demo(cfg: InferConfig, out=None) -> int:
    """A scripted tour: the base continuing prompts, weight and KV-cache variants side by side with
    their speed and memory, and two evolved agents' adapters if an evolve run exists."""
    out = out or sys.stdout
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    cfg.seed = 0 if cfg.seed is None else cfg.seed  # the tour is the same every time
    cfg.max_new_tokens = min(cfg.max_new_tokens, 120)
    session = Session(cfg, records.resolve_adapter)
    model_cfg = session.config
    say(f"h2q demo: a {session.float_model.num_params() / 1e6:.2f}M-parameter byte-level model from {cfg.ckpt} "
        f"({model_cfg.n_layer} layers, context {model_cfg.context_len} bytes, {session.device}), seed {cfg.seed}.")
    say("It is a base model, a text continuer: it writes on from the bytes it is given, one byte at a time.\n")
    say("1. A few prompts, continued up to a blank line:")
    for prompt in DEMO_PROMPTS:
        out.write(f"\n> {prompt}\n")
        streamer = stream_to(out)
        Conversation(session, cfg.kv).reply(prompt.encode(), streamer)
        streamer.close()
        say()
    prompt, header = DEMO_PROMPTS[0], ["variant", "weights MB", "KV MB", "bytes/s", "text"]
    say(f"\n2. The same prompt ({prompt!r}) with float, int8 and int4 weights (h2q/quant.py), "
        f"KV cache '{cfg.kv}':")
    rows, kept = [], cfg.quant
    for mode in ("none", "int8", "int4"):
        try:
            session.set_quant(mode)
        except H2QError as e:
            rows.append([mode, "-", "-", "-", f"skipped: {e}"[:60]])
            continue
        rows.append(_measure(session, "fp32" if mode == "none" else mode, prompt, cfg.kv))
    session.set_quant(kept)
    _table(say, header, rows)
    say("  (bytes/s: decoding speed of that one reply, measured now on this machine)")
    quarter = max(8, model_cfg.context_len // 4)
    say(f"\n3. The same prompt under each KV-cache policy (h2q/kvcache.py, h2q/kvcompress.py); window and h2o "
        f"get {quarter} slots, a quarter of the context, and stream on past it:")
    rows = []
    for policy, cls in policies().items():
        label = f"{policy} ({quarter} slots)" if cls.evicts else policy
        rows.append(_measure(session, label, prompt, policy, quarter if cls.evicts else None))
    _table(say, header, rows)
    _demo_agents(say, session, prompt)
    say("\nNext: `python infer.py --interactive` to talk to it (/help inside), or `--prompt TEXT` for one shot.")
    return 0


def _demo_agents(say, session: Session, prompt: str) -> None:
    run = Path(session.cfg.run) if session.cfg.run else records.newest_run()
    if run is None or not run.is_dir() or not records.committed_cycles(run):
        say("\n4. No evolve run yet: after `python evolve.py`, this tour shows two agents' adapters side by side.")
        return
    last_fitness = lambda agent: (agent.get("fitness") or [-math.inf])[-1]  # noqa: E731
    agents = sorted(records.population(run), key=last_fitness, reverse=True)
    picks = [agents[0], agents[-1]] if len(agents) > 1 else [{"slot": 0}, {"slot": 1}]
    say(f"\n4. Two agents of the evolve run {run} ({records.newest_cycle(run).name}), the fittest and the least fit, "
        f"continue the same prompt:")
    columns = []
    for agent in picks:
        title = f"{agent.get('id', 'agent')} (slot {agent['slot']}, fitness {last_fitness(agent):.4g})"
        try:
            session.set_adapter(str(agent["slot"]))
        except H2QError as e:
            columns.append((title, f"(cannot load: {e})"))
            continue
        reply = Conversation(session, "full").reply(prompt.encode(), lambda token: None, lambda notice: None)
        columns.append((title, bytes(reply.ids).decode("utf-8", errors="replace")))
    session.set_adapter(session.cfg.adapter)
    _side_by_side(say, columns)
