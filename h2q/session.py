"""The model in use and a conversation with it over a persistent KV cache: what infer.py's one-shot
mode and h2q/chat.py's REPL and demo share.

* `InferConfig`: every infer.py flag, made of four groups (`OPTION_GROUPS`: model, generation,
  sampling, run) that --help shows as its sections.
* `Session`: the checkpoint's float weights, loaded once, checked finite once and kept; the variant
  in use (the float model, or an int8/int4 copy quantized from the kept weights by h2q/quant.py, made
  once per mode, so `/quant` never re-reads the disk); the LoRA adapter on top (h2q/lora.py, applied
  unmerged, so it also runs over a quantized base as in QLoRA); torch's thread count (h2q.perf's
  `ThreadPolicy`: measured unless --threads fixes it, checked again before each generation). An
  adapter is a folder, or an agent of an evolve run named by id (`a0013`) or slot number, taken from
  the run's newest committed cycle of `--run` or of the newest run under checkpoints/evolve/
  (h2q/evolve/records.py reads the run folder; the apps hand its `resolve_adapter` to the session,
  which itself knows only folders). `--compile` covers float and quantized weights alike.
* `Conversation`: a byte-level base model continues text, it was never taught to chat, so a
  conversation is one running document: EOT (a document starts), then per turn the user's line and a
  newline (left out on request: the model then goes on within the line), then the model's
  continuation up to a blank line (or /max bytes, or EOT). `reply` prefills only the new bytes into
  the cache it keeps and runs h2q.generate's decode loop over it (the repetition penalty looks back
  over the conversation's text), so earlier turns are never recomputed. When a slot cache
  (full/int8/int4) has no room for the next turn plus a reply, the oldest turns are dropped and the
  rest is re-read, said once; the evicting policies (window, h2o) stream on. New weights (/quant,
  /adapter), a new policy, a Ctrl-C in mid-forward or a library error make the next reply rebuild the
  cache from the text. With specialists (`--specialists DIR`, h2q/router.py) each reply is first
  routed on the text so far, or goes to `--task NAME`; a reply by another specialist than the one
  whose keys and values the cache holds rebuilds it. `save(path)` / `restore(path)` keep the
  conversation in one file (h2q.checkpoint.save_cache: the text, the cache, and where the conversation
  stands, random stream included), so a restored conversation's next logits, and with the same
  settings its next reply, are the uninterrupted one's.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from h2q.checkpoint import load_adapter, load_cache, load_model, read_cache_file, save_cache
from h2q.config import check_options, option
from h2q.errors import ConfigError, FileFormatError, H2QError
from h2q.generate import check_sampling, compiled_decoder, decode
from h2q.kvcache import make_cache, policies, prefill
from h2q.lora import count_bytes
from h2q.perf import ThreadPolicy, resolve_device
from h2q.quant import describe, model_bytes, quant_scheme, quantize
from h2q.router import Decision, Router
from h2q.tokenizer import EOT, encode

QUANT_MODES = ("none", "int8", "int4")
CONVERSATION_FORMAT = "h2q-conversation-v1"  # Conversation.save's `extra`, beside the cache file's own format
CONVERSATION_KEYS = {"format", "cached", "turns", "seed", "generator", "policy", "max_len", "quant", "group_size",
                     "task", "adapter", "specialists"}
NEWLINE = 10
STOP = [NEWLINE, NEWLINE]  # a blank line ends a reply


@dataclass
class ModelOptions:
    ckpt: str = option("checkpoints/base", "model checkpoint folder (or model.safetensors file)")
    adapter: str = option("none", "LoRA adapter: a folder, an agent id (a0013) or slot number of an evolve run, "
                                  "or none")
    run: str | None = option(None, "evolve run folder for agent ids; none = the newest under checkpoints/evolve")
    quant: str = option("none", "weight quantization applied after loading", choices=list(QUANT_MODES))
    group_size: int = option(64, "int4 group size", choices=[32, 64, 128])
    specialists: str | None = option(None, "folder of LoRA specialists, one adapter folder per task named by it "
                                           "(h2q/router.py); each reply is routed to one of them", metavar="DIR")
    task: str = option("auto", "with --specialists: the task whose specialist answers, or auto (the one with the "
                               "lowest bits/byte on the text so far)", metavar="NAME")


@dataclass
class GenerationOptions:
    prompt: str | None = option(None, "one-shot: continue TEXT ('-' reads stdin); stdout gets only the new text",
                                metavar="TEXT")
    interactive: bool = option(False, "open the chat REPL")
    mode: str = option("auto", "auto: one-shot with --prompt, else the REPL; demo: a scripted tour",
                      choices=["auto", "chat", "demo"])
    max_new_tokens: int = option(200, "bytes to generate at most (per reply in the REPL)", at_least=1)
    kv: str = option("full", "KV-cache policy", choices=list(policies()))
    session: str | None = option(None, "REPL: resume the conversation saved in FILE (/save writes one) if it "
                                       "exists, and save it there after every reply", metavar="FILE")


@dataclass
class SamplingOptions:
    """The sampler's settings (h2q.generate.sample_next); the defaults are the choice of
    scripts/sweep_sampling.py (the README has its table and when it was measured)."""
    temperature: float = option(0.8, "sampling temperature (0 = greedy)", at_least=0, at_most=100)
    top_k: int = option(0, "keep the k most likely bytes (0 = off)", at_least=0)
    top_p: float = option(0.95, "nucleus sampling mass (1 = off)", above=0, at_most=1)
    min_p: float = option(0.05, "drop bytes less likely than MIN_P times the likeliest (0 = off)", at_least=0,
                          at_most=1)
    repeat_penalty: float = option(1.3, "llama.cpp's repetition penalty on the bytes of the last --repeat-last-n "
                                        "(1 = off)", above=0, at_most=10)
    repeat_last_n: int = option(16, "bytes the repetition penalty looks back over (0 = off, -1 = all the text)",
                                at_least=-1)
    seed: int | None = option(None, "random seed, the same seed gives the same text; none = a fresh one, "
                                    "printed so that it can be given again", at_least=0, below=2**63)


@dataclass
class RunOptions:
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, "torch CPU threads; 0 = chosen by a short measured probe (all cores, or one when "
                             "a busy machine makes one faster), measured again before a reply at most once a minute",
                          at_least=0)
    compile: bool = option(False, "torch.compile the decode steps: a one-time compile per KV policy and adapter "
                                  "shape, then faster decoding (scripts/bench_kv.py measures it)")


OPTION_GROUPS = {"model": ModelOptions, "generation": GenerationOptions, "sampling": SamplingOptions,
                 "run": RunOptions}  # the --help sections of infer.py


@dataclass
class InferConfig(RunOptions, SamplingOptions, GenerationOptions, ModelOptions):
    """Every infer.py flag (the fields of OPTION_GROUPS' classes)."""

    def __post_init__(self):
        check_options(self)

    def sampling(self) -> dict:
        """Keyword arguments for h2q.generate (after checking them)."""
        check_options(self)
        top_k, top_p = self.top_k or None, (self.top_p if self.top_p < 1 else None)
        check_sampling(self.temperature, top_k, top_p, self.min_p or None, self.repeat_penalty, self.repeat_last_n)
        return dict(temperature=self.temperature, top_k=top_k, top_p=top_p, min_p=self.min_p or None,
                    repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n)


def resolved_folder(folder: str | None) -> Path | None:
    return Path(folder).resolve() if folder is not None else None


def fresh_seed() -> int:
    """A random seed for a run given none (31 bits: short to retype)."""
    return int.from_bytes(os.urandom(4), "little") >> 1


# -- adapters by folder ---------------------------------------------------------------------------------
def adapter_folder(spec: str, run: str | None = None) -> tuple[Path, str] | None:
    """'none' -> None; a folder -> (folder, its name). The default resolver of `Session`: the apps
    (infer.py, chat.py) pass h2q.evolve.records.resolve_adapter, which also finds evolved agents."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return None
    if not Path(spec).is_dir():
        raise H2QError(f"{spec!r} is not an adapter folder")
    return Path(spec), spec


# -- the model in use ----------------------------------------------------------------------------------
# A reply waits on the thread probe: three interleaved rounds (not five), at most once a minute, since
# on a loaded machine the probe at all cores takes a second or more.
PROBE_EVERY_S = 60.0
PROBE_ROUNDS = 3


class Session:
    """Float weights loaded once; the variant in use (`model`), derived from them; the adapter, or the
    specialists (`router`) and the task that answers; the torch thread count (`threads`, an
    h2q.perf.ThreadPolicy: check it before each generation)."""

    def __init__(self, cfg: InferConfig, resolve=adapter_folder, threads: ThreadPolicy | None = None):
        self.cfg, self.resolve = cfg, resolve  # resolve(spec, run) -> (adapter folder, label) or None
        self.device = resolve_device(cfg.device)
        self.threads = threads or ThreadPolicy(cfg.threads, every_s=PROBE_EVERY_S, rounds=PROBE_ROUNDS)
        self.float_model, self.metadata = load_model(cfg.ckpt, self.device)
        self.model = self.float_model
        self.quantized = {}  # (mode, group size) -> a copy quantized from the float weights, made once
        self.adapter, self.adapter_label, self.adapter_dir = None, "none", None
        self.router: Router | None = None
        self.set_quant(cfg.quant)
        self.set_adapter(cfg.adapter)
        if cfg.specialists is None and cfg.task != "auto":
            raise ConfigError("task", f"{cfg.task!r} names a specialist: give --specialists DIR as well")
        if cfg.specialists is not None:
            if self.adapter is not None:
                raise ConfigError("specialists", "and --adapter exclude each other: the specialists are the adapters")
            self.router = Router.from_folder(cfg.specialists, self.float_model, self.device)
            self.set_task(cfg.task)

    @property
    def config(self):
        return self.float_model.config

    @property
    def compiled(self) -> bool:
        return self.cfg.compile

    @property
    def decoder(self):
        """What decode steps call: the model in use, compiled when `compiled`."""
        return compiled_decoder(self.model) if self.compiled else self.model

    def set_quant(self, mode: str) -> None:
        if mode not in QUANT_MODES:
            raise H2QError(f"quantization {mode!r} is not one of {', '.join(QUANT_MODES)}")
        if quant_scheme(self.float_model) is not None:
            if mode != "none":
                raise H2QError(f"{self.cfg.ckpt} is already quantized ({describe(self.float_model)}); "
                                f"load the float checkpoint to choose another quantization")
            return
        key = (mode, self.cfg.group_size if mode == "int4" else None)
        if mode == "none":
            self.model = self.float_model
        elif key in self.quantized:
            self.model = self.quantized[key]
        else:
            self.model = self.quantized[key] = quantize(copy.deepcopy(self.float_model), mode, self.cfg.group_size)
        self.cfg.quant = mode

    def set_adapter(self, spec: str) -> None:
        if self.router is not None:
            raise H2QError(f"the specialists of {self.cfg.specialists} answer here: /task NAME picks one "
                           f"({', '.join(self.router.tasks)}), /task auto routes")
        found = self.resolve(spec, self.cfg.run)
        if found is None:
            self.adapter, self.adapter_label, self.adapter_dir = None, "none", None
        else:  # fitted against the float base: a quantized copy keeps its fingerprint
            adapter = load_adapter(found[0], self.float_model, self.device).eval()
            self.adapter, self.adapter_label, self.adapter_dir = adapter, found[1], Path(found[0])

    def set_task(self, task: str) -> None:
        if self.router is None:
            raise H2QError("no specialists are loaded; start infer.py with --specialists DIR")
        if task != "auto" and task not in self.router.tasks:
            raise H2QError(f"no specialist {task!r} in {self.cfg.specialists}; choose one of "
                           f"{', '.join(self.router.tasks)}, or auto")
        self.cfg.task = task

    def route(self, ids: list[int]) -> Decision | None:
        """Which specialist answers a text `ids` (None without specialists)."""
        if self.router is None:
            return None
        return self.router.route(ids, None if self.cfg.task == "auto" else self.cfg.task)

    def adapters_for(self, task: str | None):
        """What a forward runs with: `task`'s specialist, or (task None) the session's adapter."""
        return self.adapter if task is None else self.router.adapters(task)

    def weights_label(self) -> str:
        compiled = ", decode compiled" if self.compiled else ""
        return f"{describe(self.model)}, {model_bytes(self.model) / 1e6:.2f} MB{compiled}"

    def adapter_text(self) -> str:
        if self.router is not None:
            return (f"specialists {self.cfg.specialists} ({', '.join(self.router.tasks)}), task {self.cfg.task}, "
                    f"rank {self.router.bank.config.r}")
        if self.adapter is None:
            return "none"
        return f"{self.adapter_label}, rank {self.adapter.config.r}, {count_bytes(self.adapter) / 1e6:.3f} MB"


# -- the conversation ---------------------------------------------------------------------------------
@dataclass
class Reply:
    ids: list[int]  # the bytes the model wrote (EOT excluded)
    prefill_tokens: int
    prefill_s: float
    decode_s: float
    ended: str  # blank line | max | end of text | context full | stopped
    route: Decision | None = None  # which specialist answered (with --specialists)

    @property
    def bytes_per_s(self) -> float:
        return len(self.ids) / max(self.decode_s, 1e-9)


class Conversation:
    """The running document, the cache holding it, and the sampling state."""

    def __init__(self, session: Session, policy: str = "full", max_len: int | None = None):
        self.session, self.max_len = session, max_len or session.config.context_len
        self.set_policy(policy)
        seed = session.cfg.seed
        self.set_seed(seed if seed is not None else fresh_seed())
        self.notices: set[str] = set()
        self.last: Reply | None = None
        self.reset()

    def reset(self) -> None:
        self.tokens = [EOT]  # the document so far
        self.turns: list[int] = []  # where each user turn starts in `tokens`
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the cache (new weights, new policy, or a forward cut short); the text stays."""
        self.cache, self.cached = None, 0  # tokens[:cached] are in the cache
        self.cache_task: str | None = None  # the specialist whose keys and values the cache holds

    def set_policy(self, policy: str) -> None:
        if policy not in policies():
            raise H2QError(f"KV policy {policy!r} is not one of {', '.join(policies())}")
        self.policy, self.evicts = policy, policies()[policy].evicts
        self.invalidate()

    def set_seed(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator(self.session.device).manual_seed(seed)

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def _notice(self, key: str, text: str, say) -> None:
        if key not in self.notices:
            self.notices.add(key)
            say(text)

    def _frame(self, text: bytes, newline: bool = True) -> list[int]:
        """The user's line as ids, after a blank line if the previous reply did not end with one, and
        ended by a newline unless `newline` is False (the model then goes on within the line)."""
        if self.tokens[-1] == EOT or self.tokens[-2:] == STOP:
            sep = []
        else:
            sep = [NEWLINE] if self.tokens[-1] == NEWLINE else STOP
        return sep + encode(text) + [NEWLINE] * newline

    def _fit(self, turn: list[int], say) -> list[int]:
        """Slot caches: make room for `turn` and a reply by dropping the oldest turns, or, when the
        newest turn alone is too long, by keeping only the newest bytes of the text (and of `turn`).
        The cache is then rebuilt from the text at this reply."""
        reserve = min(self.session.cfg.max_new_tokens, self.max_len // 2)
        turn = turn[-(self.max_len - reserve - 1):]
        room = self.max_len - reserve - len(turn)  # tokens of the text that may stay
        if len(self.tokens) <= room:
            return turn
        start = next((s for s in self.turns if 1 + len(self.tokens) - s <= room), None)
        if start is not None:  # whole turns, after a fresh document start
            self.tokens, self.turns = [EOT] + self.tokens[start:], [s - start + 1 for s in self.turns if s >= start]
        else:  # the middle of a long text goes on from its newest bytes
            cut = len(self.tokens) - room
            self.tokens, self.turns = self.tokens[cut:], [s - cut for s in self.turns if s >= cut]
        self.invalidate()
        self._notice("trim", f"[the conversation outgrew the {self.max_len}-byte context: the oldest text is "
                     f"dropped and the rest re-read (said once; /kv window streams on instead)]", say)
        return turn

    def reply(self, text: bytes | None, on_token, say=print, newline: bool = True) -> Reply:
        """Add the user's line (None: let the model go on where it stopped; `newline` False: without
        the newline that ends it) and generate the answer, streaming each byte to on_token. Ctrl-C
        ends it early (ended='stopped'); a library error forgets the cache and is raised."""
        cfg, session = self.session.cfg, self.session
        sampling = cfg.sampling()
        turn = [] if text is None else self._frame(text, newline)
        if not self.evicts:
            turn = self._fit(turn, say)
        elif len(self.tokens) + len(turn) > self.max_len:
            self._notice("stream", f"[past the {self.max_len}-byte cache: {self.policy} keeps streaming and "
                         f"forgets the oldest bytes]", say)
        if text is not None:  # the turn starts after its separator
            self.turns.append(len(self.tokens) + max(0, len(turn) - len(text) - newline))
        self.tokens += turn
        new, ended, prefill_s, start = [], "stopped", 0.0, time.perf_counter()
        pending, decision = [], None
        try:
            with torch.inference_mode():
                decision = session.route(self.tokens)
                task = decision.tasks[0] if decision is not None else None
                if decision is not None:
                    say(decision.describe())
                if task != self.cache_task:  # another specialist: its keys and values differ
                    self.invalidate()
                if self.cache is None:
                    weight = session.float_model.embed.weight
                    self.cache = make_cache(self.policy, session.config, 1, self.max_len, session.device, weight.dtype)
                    self.cached = max(0, len(self.tokens) - self.max_len) if self.evicts else 0
                    self.cache_task = task
                adapters = session.adapters_for(task)
                pending = self.tokens[self.cached:]
                logits = prefill(session.model, self.cache, [pending], adapters)  # (1, V)
                self.cached = len(self.tokens)
                prefill_s = time.perf_counter() - start
                start = time.perf_counter()
                ended = self._decode(logits, new, on_token, sampling, adapters)
        except KeyboardInterrupt:
            self.invalidate()  # a forward may have stopped halfway through the layers
        except H2QError:
            self.invalidate()
            raise
        self.last = Reply(new, len(pending), prefill_s, time.perf_counter() - start, ended, decision)
        return self.last

    def _decode(self, logits, new: list[int], on_token, sampling: dict, adapters) -> str:
        """Sample until the reply ends; each byte joins the text, and the cache when the loop asks
        for the next one (so a reply's last byte waits in the text for the next prefill)."""
        session, max_new = self.session, self.session.cfg.max_new_tokens
        for tokens in decode(session.decoder, self.cache, logits, adapters=adapters,
                             history=[self.tokens], generator=self.generator, **sampling):
            token = int(tokens)
            self.tokens.append(token)
            if token == EOT:
                return "end of text"
            new.append(token)
            on_token(token)
            if new[-2:] == STOP:
                return "blank line"
            if len(new) >= max_new:
                return "max"
            if not self.evicts and self.cached >= self.max_len:
                return "context full"
            self.cached += 1  # resuming the loop feeds `token` through the cache

    # -- saving and restoring (h2q.checkpoint's cache files) ---------------------------------------
    def save(self, path: str | Path) -> Path:
        """The conversation as one file (h2q.checkpoint.save_cache): its text, its cache (or none,
        when it is to be rebuilt), and in `extra` where it stands (cached, turns, the random stream)
        and what it was made with (weights, adapter or specialist, KV policy)."""
        s = self.session
        extra = {"format": CONVERSATION_FORMAT, "cached": self.cached, "turns": self.turns, "seed": self.seed,
                 "generator": self.generator.get_state(), "policy": self.policy, "max_len": self.max_len,
                 "quant": s.cfg.quant, "group_size": s.cfg.group_size, "task": self.cache_task,
                 "adapter": str(s.adapter_dir) if s.adapter_dir is not None else "none",
                 "specialists": s.cfg.specialists}
        try:
            return save_cache(path, self.cache, s.model, text_ids=self.tokens,
                              adapters=s.adapters_for(self.cache_task), extra=extra)
        except OSError as e:
            raise H2QError(f"cannot write {path} ({e.strerror or e}); give a path in a writable folder") from None

    def restore(self, path: str | Path) -> None:
        """Continue the conversation saved in `path`: the session first takes the weights and the
        adapter it was saved with, then the cache is checked against them (h2q.checkpoint.load_cache),
        so the next logits are the uninterrupted conversation's. Any failure changes nothing."""
        s, path = self.session, Path(path)
        extra = read_cache_file(path)[1]["extra"]
        if extra.get("format") != CONVERSATION_FORMAT or not CONVERSATION_KEYS <= extra.keys():
            raise FileFormatError(f"{path} is a KV cache file but not a conversation saved by infer.py (/save)")
        kept = (s.model, s.cfg.quant, s.cfg.group_size, s.adapter, s.adapter_label, s.adapter_dir)
        try:
            if resolved_folder(extra["specialists"]) != resolved_folder(s.cfg.specialists):
                raise H2QError(f"{path} was saved with --specialists {extra['specialists']}, this session has "
                               f"{s.cfg.specialists}; start infer.py with the same")
            s.cfg.group_size = extra["group_size"]
            s.set_quant(extra["quant"])
            if s.router is None:
                s.set_adapter(extra["adapter"])
            cache, ids, meta = load_cache(path, s.model, s.adapters_for(extra["task"]), s.device)
            policy_fits = extra["policy"] in policies() and (cache is None or meta["policy"] == extra["policy"])
            if not 0 <= extra["cached"] <= len(ids) or not policy_fits:
                raise FileFormatError(f"{path} holds a conversation whose cache does not match its text; save it again")
            generator = torch.Generator(s.device)
            generator.set_state(extra["generator"])
        except (H2QError, TypeError, ValueError, KeyError, RuntimeError) as e:
            s.model, s.cfg.quant, s.cfg.group_size, s.adapter, s.adapter_label, s.adapter_dir = kept
            if isinstance(e, H2QError):
                raise
            raise FileFormatError(f"{path} holds unreadable conversation settings ({e}); save it again") from None
        self.set_policy(extra["policy"])
        self.max_len, self.tokens, self.turns = extra["max_len"], ids, list(extra["turns"])
        self.cache, self.cached = cache, extra["cached"] if cache is not None else 0
        self.cache_task = extra["task"] if cache is not None else None
        self.seed, self.generator, self.last = extra["seed"], generator, None
