"""The interactive side of infer.py: the chat REPL and the guided demo, both over h2q.session's
`Session` (weights, adapter, thread count) and `Conversation` (the running text and its persistent KV
cache), and a look at evolved agents' decisions (`AgentProbe`).

The REPL reads a line at a time (with readline's editing and history where the standard library has
it): a `/command` changes a setting and answers in one line, anything else is a turn whose reply
streams byte by byte through the incremental UTF-8 decoder. A line joins the text with a newline; a
line ending in `\\` joins it without one, so the model goes on within the line (`def main(\\`). The
thread count is re-checked (h2q.perf.ThreadPolicy) before each reply. Ctrl-C stops a reply, Ctrl-D
leaves. An evolve agent's adapter is not a text writer: it answers an observation of its world with
one action byte, and `/observe` shows that decision. The demo is a fixed-seed tour for a newcomer: a
few continuations, then one prompt under every weight quantization and KV-cache policy with a small
table of speed and memory, then two evolved agents acting on the same observations of their world.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from h2q.errors import ConfigError, H2QError
from h2q.evolve import ACTIONS, World, WorldConfig, agent, obs_len, records, same_view_planner
from h2q.evolve.render import render_text
from h2q.generate import stream_to
from h2q.kvcache import policies
from h2q.lora import AdapterBank
from h2q.quant import model_bytes
from h2q.session import NEWLINE, Conversation, InferConfig, Session

# -- evolved agents ------------------------------------------------------------------------------------
ACTION_NAMES = dict(zip(ACTIONS.decode(), ["north", "south", "east", "west", "pick up", "drop", "eat", "wait"]))
CONTINUE = "\\"  # a line ending in it is sent without its newline


def agent_run(folder: Path | None) -> Path | None:
    """The evolve run an adapter folder belongs to (RUN/cycle_NNN/agent_NN), else None."""
    if folder is None or not records.AGENT_DIR.fullmatch(folder.name) or \
            not records.CYCLE_DIR.fullmatch(folder.parent.name):
        return None
    run = folder.parent.parent
    return run if records.is_run(run) else None


def run_world(run: Path) -> WorldConfig:
    """The world a run's agents live in, from its config.json: `world` names the level (a run
    written before there were levels has none: hinted) and `window` the view level's window; a
    `world` holding WorldConfig's fields is read as those."""
    config = records.read_config(run)
    world = config.get("world") or "hinted"
    settings = dict(world) if isinstance(world, dict) else {"level": world, "window": config.get("window", 5)}
    known = {f.name for f in dataclasses.fields(WorldConfig)}
    try:
        return WorldConfig(**{k: v for k, v in settings.items() if k in known})
    except (H2QError, TypeError, ValueError) as e:
        raise H2QError(f"{run / records.CONFIG}: its world settings do not make a world ({e})") from None


def world_scene(cfg: WorldConfig, n_agents: int, seed: int, ticks: int):
    """A world of `cfg`'s level after `ticks` ticks of the level's planner (agents spread out, some
    carrying food): observations an evolved agent could meet. -> (world, the planner, ready for
    the next tick)."""
    world = World(cfg, n_agents, seed)
    planner = same_view_planner(cfg, seed)
    planner.reset(n_agents)
    for _ in range(ticks):
        world.step(planner.act(world.observe(), world.alive))
    return world, planner


class AgentProbe:
    """An evolve agent's adapter as h2q.evolve's AgentPolicy sees it: the run's world and prefix, the
    agents' sampling temperature, and the distribution over the 8 action bytes for any observation."""

    def __init__(self, model, adapter, run: Path):
        config = records.read_config(run)
        self.run, self.world = run, run_world(run)
        self.memory = int(config.get("memory") or 0)
        # the instruction the run's agents were prefixed with: per level once agent.py has PREFIXES
        prefix = getattr(agent, "PREFIXES", {}).get(self.world.level, agent.PREFIX)
        cfg = agent.AgentConfig(rank=adapter.config.r, alpha=adapter.config.alpha,
                                temperature=float(config.get("temperature", 1.0)))
        self.policy = agent.AgentPolicy(model, AdapterBank.from_adapters([adapter]), cfg, prefix)
        self.obs_len = obs_len(self.world)

    def probabilities(self, observations: np.ndarray) -> np.ndarray:
        """(B, L) uint8 observations -> (B, 8) probabilities of the action bytes, as the agent samples."""
        ids = torch.as_tensor(observations.astype(np.int64))  # (B, L)
        with torch.inference_mode():
            logits = self.policy.action_logits(ids, [0] * len(ids))  # (B, 8)
            return self.policy.log_probs(logits).exp().cpu().numpy()


def action_line(probs: np.ndarray) -> str:
    """'E 61% (N 20%, S 9%)': the likeliest action byte, then the next two."""
    order = np.argsort(-probs)
    top = [f"{chr(ACTIONS[k])} {probs[k]:.0%}" for k in order[:3]]
    return f"{top[0]} ({', '.join(top[1:])})"


# -- the REPL ------------------------------------------------------------------------------------------
PROMPT = "> "
COMMANDS = {  # name -> (argument, what it does)
    "/temp": ("X", "sampling temperature (0 = greedy)"),
    "/topk": ("K", "sample among the K most likely bytes (0 = off)"),
    "/topp": ("P", "nucleus sampling mass in (0, 1] (1 = off)"),
    "/minp": ("P", "drop bytes less likely than P times the likeliest (0 = off)"),
    "/repeat": ("P [N]", "repetition penalty P (1 = off) over the last N bytes (llama.cpp's; -1 = all the text)"),
    "/max": ("N", "bytes per reply at most"),
    "/seed": ("N", "restart the random stream from seed N"),
    "/adapter": ("AGENT_ID|SLOT|PATH|none", "LoRA adapter: an evolve agent, a folder, or none"),
    "/task": ("NAME|auto", "with --specialists: the specialist that answers, or auto (routed by bits/byte)"),
    "/observe": ("[TEXT]", ("agent adapters: feed an observation (default: a fresh one of the agent's world) "
                            "and show the action distribution")),
    "/quant": ("none|int8|int4", "weights: float, or quantized from the kept float weights"),
    "/kv": ("full|int8|int4|window|h2o", "KV-cache policy"),
    "/reset": ("", "start a new conversation"),
    "/save": ("NAME", "save the conversation and its KV cache to NAME (.safetensors added when it has no suffix)"),
    "/load": ("NAME", "continue a conversation saved by /save, with the weights and adapter it was saved with"),
    "/stats": ("", "speed of the last reply, model and KV memory, adapter, threads"),
    "/help": ("", "this list"),
    "/quit": ("", "leave (Ctrl-D works too)"),
}
SETTINGS = {"/temp": ("temperature", float), "/topk": ("top_k", int), "/topp": ("top_p", float),
            "/minp": ("min_p", float), "/max": ("max_new_tokens", int), "/seed": ("seed", int)}
FIELD_COMMANDS = {**{attr: name for name, (attr, _) in SETTINGS.items()}, "repeat_penalty": "/repeat",
                  "repeat_last_n": "/repeat"}  # a ConfigError's field -> the command that sets it


class Repl:
    def __init__(self, session: Session, out):
        self.session, self.out = session, out
        self.chat = Conversation(session, session.cfg.kv)
        self.color = out.isatty()
        self.probe: AgentProbe | None = None  # made at the first /observe of an agent adapter
        self.observed = 0  # /observe's fresh worlds so far: the next one's seed

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def banner(self) -> None:
        s, cfg = self.session, self.session.config
        self.say(f"h2q chat | {s.cfg.ckpt}: {s.float_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} "
                 f"layers, context {cfg.context_len} bytes | {s.device}, threads {s.threads.describe()} | weights "
                 f"{s.weights_label()} | kv {self.chat.policy} | adapter {s.adapter_text()}")
        self.say("This is a byte-level base model: a text continuer, not a chat assistant. Each line you type "
                 "joins the running text with a newline and the model writes on until a blank line or /max "
                 f"bytes; an empty line lets it go on. End a line with {CONTINUE} to send it without the newline, "
                 f"so the model goes on within the line: try `def main({CONTINUE}`.")
        self.say("/help lists the commands; Ctrl-C stops a reply, Ctrl-D exits.")
        self.agent_notice()

    def agent_notice(self) -> None:
        """Say what an evolve agent's adapter answers, when one is in use."""
        run = agent_run(self.session.adapter_dir)
        if run is not None:
            world = run_world(run)
            self.say(f"[{self.session.adapter_label.split(' ')[0]} is an evolve agent: it answers an observation of "
                     f"its world ({world.level} level, {obs_len(world)} bytes) with one action byte of "
                     f"{ACTIONS.decode()}, not with text; /observe [TEXT] feeds it one and shows its choice]")

    def help(self) -> None:
        for name, (arg, text) in COMMANDS.items():
            self.say(f"  {(name + ' ' + arg).ljust(34)} {text}")
        self.say(f"  {'LINE'.ljust(34)} a turn: LINE and a newline join the text, the model writes on")
        self.say(f"  {('LINE' + CONTINUE).ljust(34)} a turn without the newline: the model goes on within LINE")

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
            self.say(f"error: {FIELD_COMMANDS.get(e.field, e.field)} {e.problem}")
        except H2QError as e:
            self.say(f"error: {e}")
        return True

    def _set(self, **values) -> None:
        """Change sampling settings after checking them all (InferConfig's ranges)."""
        cfg = self.session.cfg
        InferConfig(**{**vars(cfg), **values}).sampling()
        for attr, value in values.items():
            setattr(cfg, attr, value)

    def _run(self, name: str, arg: str) -> bool:
        s, chat, cfg = self.session, self.chat, self.session.cfg
        if arg and not COMMANDS[name][0]:
            raise ValueError(f"{name} takes no argument")
        if name in SETTINGS:
            attr, kind = SETTINGS[name]
            if arg:
                self._set(**{attr: kind(arg)})
                if attr == "seed":
                    chat.set_seed(cfg.seed)
            self.say(f"{attr} {chat.seed if attr == 'seed' else getattr(cfg, attr)}")
        elif name == "/repeat":
            if arg:
                penalty, *window = arg.split()
                if len(window) > 1:
                    raise ValueError("/repeat takes P and at most N")
                self._set(repeat_penalty=float(penalty), **({"repeat_last_n": int(window[0])} if window else {}))
            self.say(f"repeat_penalty {cfg.repeat_penalty} over the last {cfg.repeat_last_n} bytes")
        elif name == "/adapter":
            if arg:
                s.set_adapter(arg)
                chat.invalidate()  # keys and values depend on the adapter
                self.probe = None
            self.say(f"adapter {s.adapter_text()}")
            if arg:
                self.agent_notice()
        elif name == "/task":
            if arg:
                s.set_task(arg)
            elif s.router is None:
                s.set_task("auto")  # says that there are no specialists
            self.say(f"task {cfg.task} (specialists: {', '.join(s.router.tasks)})")
        elif name in ("/save", "/load"):
            if not arg:
                raise ValueError(f"{name} needs a NAME")
            path = conversation_path(arg)
            if name == "/save":
                chat.save(path)
                self.say(f"[saved {len(chat.tokens)} bytes of text and the {chat.policy} KV cache to {path}]")
            else:
                chat.restore(path)
                self.probe = None
                self.say(f"[loaded {path}: {self.restored_text()}]")
        elif name == "/observe":
            self.observe(arg)
        elif name == "/quant":
            if arg:
                s.set_quant(arg.lower())
                chat.invalidate()
                self.probe = None
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

    def observe(self, text: str) -> None:
        """/observe [TEXT]: the agent's action distribution for TEXT, or for a fresh observation of a
        world of its level (with the move the level's planner would make)."""
        s = self.session
        run = agent_run(s.adapter_dir)
        if run is None:
            raise H2QError("/observe needs an evolve agent's adapter: /adapter AGENT_ID or SLOT first")
        if self.probe is None:
            self.probe = AgentProbe(s.model, s.adapter, run)
        probe, planned, where = self.probe, None, ""
        if text:
            obs = np.frombuffer(text.encode("utf-8", errors="surrogateescape"), dtype=np.uint8)[None]  # (1, L)
            if obs.shape[1] != probe.obs_len:
                self.say(f"[the agent was trained on {probe.obs_len}-byte observations; this one has {obs.shape[1]}]")
        else:
            seed = self.chat.seed + self.observed
            self.observed += 1
            world, planner = world_scene(probe.world, 1, seed, ticks=seed % 40)
            obs = world.observe()  # (1, L)
            planned = chr(ACTIONS[int(planner.act(obs, world.alive)[0])])
            where = f" ({probe.world.level} level, world seed {seed}, tick {world.t})"
        probs = probe.probabilities(obs)[0]
        self.say(f"observation {bytes(obs[0]).decode('utf-8', errors='replace')}{where}")
        self.say("  " + "  ".join(f"{chr(a)} {p:4.0%}" for a, p in zip(ACTIONS, probs)))
        best = chr(ACTIONS[int(probs.argmax())])
        line = f"  likeliest {best} ({ACTION_NAMES[best]}), sampled at temperature {probe.policy.cfg.temperature:g}"
        if planned is not None:
            line += f"; the level's planner would take {planned} ({ACTION_NAMES[planned]})"
        if probe.memory:
            line += f"; the run's agents also remember {probe.memory} past lines, left out here"
        self.say(line)

    def restored_text(self) -> str:
        s, chat = self.session, self.chat
        cached = f"{chat.cached} of them in the {chat.policy} cache" if chat.cache is not None else \
            f"the {chat.policy} cache rebuilt at the next reply"
        return f"{len(chat.tokens)} bytes of text, {cached}; weights {s.weights_label()}; adapter {s.adapter_text()}"

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
        self.say(f"threads: {s.threads.describe()}")
        self.say(f"sampling: temperature {cfg.temperature}, top-k {cfg.top_k or 'off'}, top-p "
                 f"{cfg.top_p if cfg.top_p < 1 else 'off'}, min-p {cfg.min_p or 'off'}, repeat penalty "
                 f"{cfg.repeat_penalty if cfg.repeat_penalty != 1 else 'off'} over {cfg.repeat_last_n} bytes, "
                 f"max {cfg.max_new_tokens} bytes, seed {chat.seed}")

    def turn(self, line: str) -> None:
        """One typed line: joined with a newline, or without one when it ends in CONTINUE."""
        within = line.endswith(CONTINUE)
        text = (line[:-len(CONTINUE)] if within else line).encode("utf-8", errors="surrogateescape")
        self.session.threads.check()
        if self.color:
            self.out.write("\033[36m")
        streamer = stream_to(self.out)
        try:
            reply = self.chat.reply(text or None, streamer, self.say, newline=not within)
        finally:
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


def conversation_path(name: str) -> Path:
    """/save and /load's NAME as a file: NAME itself, with .safetensors added when it has no suffix."""
    path = Path(name).expanduser()
    return path if path.suffix else path.with_name(path.name + ".safetensors")


def repl(session: Session, out=None) -> int:
    """Read lines until /quit or EOF: /commands change settings, other lines are turns. With
    --session FILE, the conversation in FILE is continued (when FILE exists) and FILE is rewritten
    after every reply."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    sys.stdin.reconfigure(errors="surrogateescape")
    r = Repl(session, out)
    keep = Path(session.cfg.session) if session.cfg.session else None
    if keep is not None and keep.exists():
        r.chat.restore(keep)  # a file that cannot be continued is a one-line error before anything starts
    r.banner()
    if keep is not None:
        r.say(f"[session {keep}: " + (r.restored_text() if keep.exists() else "new, saved after every reply") + "]")
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
                if keep is not None:
                    r.chat.save(keep)
        except KeyboardInterrupt:
            r.say("[cancelled]")
        except H2QError as e:  # e.g. an adapter whose outputs are NaN: the session goes on
            r.say(f"\nerror: {e}")


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


def wrapped(say, text: str, width: int = 100) -> None:
    """`text` in lines of at most `width` characters, continuation lines indented as its first."""
    indent = " " * (len(text.lstrip("\n")) - len(text.lstrip()))
    say(textwrap.fill(text, width, subsequent_indent=indent + " ", replace_whitespace=False))


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
    say = lambda text="": print(text, file=out, flush=True)
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


DEMO_TICKS, DEMO_AGENTS = 12, 4  # the agents' scene: a world after this many planner ticks, this many agents


def last_fitness(agent: dict) -> float:
    """An agent's fitness in the newest cycle it was scored in (population.json's list)."""
    return (agent.get("fitness") or [-math.inf])[-1]


def _demo_agents(say, session: Session, prompt: str) -> None:
    run = Path(session.cfg.run) if session.cfg.run else records.newest_run()
    if run is None or not run.is_dir() or not records.committed_cycles(run):
        say("\n4. No evolve run yet: after `python evolve.py`, this tour shows two agents deciding side by side.")
        return
    agents = sorted(records.population(run), key=last_fitness, reverse=True)
    picks = [agents[0], agents[-1]] if len(agents) > 1 else [{"slot": 0}, {"slot": 1}]
    cycle = records.newest_cycle(run)
    if records.read_config(run).get("env") == "text":  # text agents write text: they continue the prompt
        say(f"\n4. Two agents of the evolve run {run} ({cycle.name}), the fittest and the least fit, continue the "
            f"same prompt:")
        columns = []
        for pick in picks:
            title = f"{pick.get('id', 'agent')} (slot {pick['slot']}, fitness {last_fitness(pick):.4g})"
            try:
                session.set_adapter(str(pick["slot"]))
            except H2QError as e:
                columns.append((title, f"(cannot load: {e})"))
                continue
            reply = Conversation(session, "full").reply(prompt.encode(), lambda token: None, lambda notice: None)
            columns.append((title, bytes(reply.ids).decode("utf-8", errors="replace")))
        session.set_adapter(session.cfg.adapter)
        _side_by_side(say, columns)
        return
    _demo_grid_agents(say, session, run, cycle, picks)


def _demo_grid_agents(say, session: Session, run: Path, cycle: Path, picks: list[dict]) -> None:
    """Two grid agents on the same few observations of one world, the world's frame, their fitness."""
    world_cfg = run_world(run)
    world, planner = world_scene(world_cfg, DEMO_AGENTS, session.cfg.seed, DEMO_TICKS)
    obs = world.observe()  # (DEMO_AGENTS, L)
    planned = planner.act(obs, world.alive)
    legend = ", ".join(f"{a} {name}" for a, name in ACTION_NAMES.items())
    wrapped(say, f"\n4. Two agents of the evolve run {run} ({cycle.name}), the fittest and the least fit. An agent does "
        f"not write text: it reads one observation of its world ({world_cfg.level} level, {obs.shape[1]} bytes) and "
        f"answers with one action byte ({legend}). The world (seed {session.cfg.seed}) after {DEMO_TICKS} ticks of "
        f"the level's planner, agents 0-{DEMO_AGENTS - 1}:")
    for line in render_text(world).splitlines():
        say("    " + line)
    header, rows, columns = ["agent", "observation", "planner"], [], []
    for pick in picks:
        label = f"{pick.get('id', 'agent')} (slot {pick['slot']})"
        try:
            session.set_adapter(str(pick["slot"]))
            columns.append([action_line(p) for p in AgentProbe(session.model, session.adapter, run).probabilities(obs)])
        except H2QError as e:
            columns.append([f"(cannot load: {e})"[:40]] * len(obs))
        header.append(label)
    session.set_adapter(session.cfg.adapter)
    for i in range(len(obs)):
        rows.append([str(i), bytes(obs[i]).decode("utf-8", errors="replace"), chr(ACTIONS[planned[i]])]
                    + [column[i] for column in columns])
    say("\n  Each agent's likeliest action (and the next two) on the same observations, beside the planner's:")
    _table(say, header, rows)
    wrapped(say, "  " + _fitness_text(run, cycle, picks, world_cfg.survival_weight))


def _fitness_text(run: Path, cycle: Path, picks: list[dict], survival_weight: float) -> str:
    """The picked agents' fitness as % of the oracle's in the newest committed cycle's evaluation."""
    metrics = records.read_metrics(run)
    record = metrics[-1] if metrics else {}
    oracle = record.get("oracle")
    if not oracle:
        return "(no oracle figure in the run's metrics.jsonl: fitness " + ", ".join(
            f"{p.get('id', 'agent')} {last_fitness(p):.4g}" for p in picks) + ")"
    agents = "; ".join(f"{p.get('id', 'agent')} {last_fitness(p):.4g} = {last_fitness(p) / oracle:.0%} of the oracle's "
                       f"{oracle:.4g}" for p in picks)
    text = (f"Fitness in {cycle.name}'s evaluation (food delivered per step + {survival_weight:g} x the share of "
            f"the episode survived): {agents}")
    if "best_pct_oracle" in record:
        text += (f". The cycle's best agent reached {record['best_pct_oracle']:.0f}% and the median "
                 f"{record['median_pct_oracle']:.0f}% of the oracle's food rate")
    return text + "."
