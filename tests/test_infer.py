"""infer.py: reproducible one-shot output, the REPL driven through a pipe, a conversation that keeps its
KV cache across turns (and trims or streams when full), streaming that never splits a character, the
demo, agents of committed cycles only, clear errors, the air gap, and imports in one direction. Also:
the thread count chosen by an injected probe before one-shot and every reply, the figures line, a
trailing backslash, /observe and the demo's agents, NaN weights and infinite temperatures refused."""
import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_base_with_adapters

from h2q import chat, generate, infer
from h2q.checkpoint import save_model, save_tensors
from h2q.cli import run_main
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.evolve import records
from h2q.evolve.records import resolve_adapter
from h2q.generate import stream_to
from h2q.infer import one_shot
from h2q.model import Transformer
from h2q.perf import ThreadPolicy
from h2q.session import Conversation, InferConfig, Session
from h2q.tokenizer import EOT, encode

ROOT = Path(__file__).resolve().parents[1]
MULTIBYTE = "héllo wörld, 世界 🙂!\n\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny base model and, beside it, an adapter folder and an evolve run with two agents."""
    root = tmp_path_factory.mktemp("infer")
    tiny_base_with_adapters(root, [root / "adapter", root / "run" / "cycle_002" / "agent_00",
                                   root / "run" / "cycle_002" / "agent_01"], b_seed=10)
    (root / "run" / "cycle_001").mkdir()
    agents = [{"id": "a0003", "slot": 1, "rank": 2, "fitness": [-1.0, -2.5]},
              {"id": "a0007", "slot": 0, "rank": 2, "fitness": [-1.5]}]
    (root / "run" / "population.json").write_text(json.dumps({"cycle": 2, "agents": agents, "history": agents}))
    (root / "run" / "metrics.jsonl").write_text(json.dumps({"cycle": 2, "best": -1.0, "oracle": 0.05,
                                                            "best_pct_oracle": 40.0, "median_pct_oracle": 20.0}) + "\n")
    commit(root / "run", 2)
    return root


def commit(run: Path, cycle: int):
    """The commit point of an evolve run (notes/evolve_format.md): the main state naming `cycle`."""
    save_tensors(run / records.STATE_DIR / records.STATE_FILE, {}, {"cycle": str(cycle), "history": "[]"})


def run_infer(*args, stdin: str | bytes = b"", script=("infer.py",)):
    """Run a script; stdout and stderr come back decoded (odd bytes as U+FFFD)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run([sys.executable, *script, *args], input=data, capture_output=True, cwd=ROOT,
                            env=env, timeout=120)
    result.stdout, result.stderr = (b.decode("utf-8", "replace") for b in (result.stdout, result.stderr))
    return result


def session(ckpt, threads=None, **kw):
    return Session(InferConfig(ckpt=str(ckpt / "base"), device="cpu", **{"seed": 0, **kw}), resolve_adapter,
                   threads or ThreadPolicy(1))


def scripted_sampler(text: str):
    """A fake sample_next that ignores the logits and emits `text`'s bytes one at a time, then EOT."""
    script = iter(list(text.encode()) + [EOT] * 1000)
    seen = []

    def sample(logits, *args, **kwargs):
        seen.append(logits.detach().clone())
        return torch.full(logits.shape[:-1], next(script), dtype=torch.long)
    sample.seen = seen
    return sample


class Chunks:
    """A stream that records every write."""

    def __init__(self):
        self.chunks = []

    def write(self, text):
        self.chunks.append(text)

    def flush(self):
        pass

    def isatty(self):
        return False

    @property
    def text(self):
        return "".join(self.chunks)


@pytest.mark.slow
def test_one_shot_is_reproducible_with_a_seed(ckpt):
    args = ("--ckpt", str(ckpt / "base"), "--prompt", "The ", "--max-new-tokens", "24", "--seed", "7",
            "--top-k", "50", "--device", "cpu")
    first = run_infer(*args)
    second = run_infer(*args[:2], "--prompt", "-", *args[4:], stdin="The ")  # the same prompt from stdin
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout
    assert "bytes/s" in first.stderr and "bytes/s" not in first.stdout  # figures on stderr only


@pytest.mark.slow
def test_repl_through_a_pipe(ckpt):
    commands = ["/help", "hello there", "/temp 0.5", "/temp abc", "/topk -3", "/topp 2", "/max 12", "/seed 3",
                "/frobnicate", "/quant int8", "and again", "/quant int4", "/kv window", "", "/kv nope",
                f"/adapter {ckpt / 'adapter'}", "with an adapter", "/adapter a0003", "/adapter 0",
                "/adapter a9999", "/adapter none", "/stats", "/reset", "/quit now", "é\udcff odd bytes"]
    result = run_infer("--ckpt", str(ckpt / "base"), "--interactive", "--max-new-tokens", "20", "--seed", "1",
                       "--group-size", "32", "--run", str(ckpt / "run"), "--device", "cpu",
                       stdin="\n".join(commands).encode("utf-8", "surrogateescape"))
    out = result.stdout
    assert result.returncode == 0, result.stderr  # EOF ends it without /quit
    assert "Traceback" not in out + result.stderr
    assert "text continuer" in out  # the banner says what the model is
    assert all(name in out for name in ("/temp X", "/adapter AGENT_ID", "/kv full|int8|int4|window|h2o"))
    assert "temperature 0.5" in out and "usage: /temp X" in out
    assert "error: /topk must be >= 0, got -3" in out and "error: /topp must be > 0 and <= 1, got 2.0" in out
    assert "max_new_tokens 12" in out and "seed 3" in out
    assert "unknown command /frobnicate" in out
    assert "weights int8" in out and "weights int4" in out and "kv window" in out
    assert "error: KV policy 'nope'" in out
    assert f"adapter {ckpt / 'adapter'}, rank 2" in out
    assert "adapter a0003 (slot 1, cycle_002" in out and "adapter a0007 (slot 0, cycle_002" in out
    assert "'a9999' is neither an adapter folder nor a living agent" in out
    assert "adapter none" in out and "kv cache: window" in out and "[new conversation]" in out
    assert "usage: /quit (no argument)" in out


def test_conversation_keeps_its_cache_across_turns(ckpt, monkeypatch):
    """Each turn prefills only its new bytes, and every step's logits equal a fresh forward over the
    whole text (so the kept cache holds exactly the conversation)."""
    s = session(ckpt, max_new_tokens=8)
    chat = Conversation(s, "full")
    sampler = scripted_sampler("ab\n\nxyz")  # reply 1 ends at a blank line, reply 2 at EOT
    monkeypatch.setattr(generate, "sample_next", sampler)
    first = chat.reply(b"hi", lambda t: None)
    assert first.ended == "blank line" and first.prefill_tokens == 1 + len(b"hi\n")
    second = chat.reply(b"yo", lambda t: None)
    assert second.prefill_tokens == 1 + len(b"yo\n")  # the last sampled byte, then the new turn only
    assert bytes(second.ids) == b"xyz" and second.ended == "end of text"
    text = [EOT, *encode("hi\nab\n\nyo\nxyz")]
    steps = [len(encode("hi\n")), len(encode("hi\na")), len(encode("hi\nab")), len(encode("hi\nab\n")),
             len(encode("hi\nab\n\nyo\n")), len(encode("hi\nab\n\nyo\nx")), len(encode("hi\nab\n\nyo\nxy")),
             len(encode("hi\nab\n\nyo\nxyz"))]
    with torch.no_grad():
        for seen, n in zip(sampler.seen, steps):
            expected = s.model(torch.tensor([text[:n + 1]]))[:, -1]
            assert torch.allclose(seen[:, :256], expected[:, :256], atol=1e-4)


def test_full_context_trims_oldest_turns_once_and_window_streams_on(ckpt, monkeypatch):
    said = []
    s = session(ckpt, max_new_tokens=10)
    monkeypatch.setattr(generate, "sample_next", scripted_sampler("0123456789" * 100))
    chat = Conversation(s, "full")
    for i in range(8):
        reply = chat.reply(f"turn {i}".encode(), lambda t: None, said.append)
        assert len(reply.ids) == 10 and len(chat.tokens) <= s.config.context_len
    assert len(said) == 1 and "oldest text is dropped" in said[0]
    assert chat.tokens[:2] == [EOT, ord("t")] and b"turn 7" in bytes(t for t in chat.tokens if t < 256)
    for _ in range(6):  # an empty line: the model goes on from the newest bytes, past the context
        before = list(chat.tokens)
        assert len(chat.reply(None, lambda t: None, said.append).ids) == 10
        kept = chat.tokens[:-10]
        kept = kept[1:] if kept[0] == EOT else kept  # whole turns restart the document
        assert kept == before[len(before) - len(kept):] and len(chat.tokens) <= s.config.context_len
    said.clear()
    chat = Conversation(s, "window", max_len=32)
    for i in range(8):
        assert len(chat.reply(f"turn {i}".encode(), lambda t: None, said.append).ids) == 10
    assert len(said) == 1 and "keeps streaming" in said[0] and len(chat.tokens) > 32


def test_streaming_never_splits_a_character(ckpt, monkeypatch):
    s = session(ckpt, max_new_tokens=40)
    repl_out = Chunks()
    monkeypatch.setattr(generate, "sample_next", scripted_sampler(MULTIBYTE))
    Conversation(s, "full").reply(b"go", stream_to(repl_out))
    oneshot_out = Chunks()
    monkeypatch.setattr(generate, "sample_next", scripted_sampler(MULTIBYTE))
    s.cfg.prompt = "go"
    one_shot(s, out=oneshot_out, err=Chunks())
    for out in (repl_out, oneshot_out):
        assert "".join(out.chunks) == MULTIBYTE
        assert all("\ufffd" not in c for c in out.chunks)
        assert len(out.chunks) == len(MULTIBYTE)  # one write per character, as soon as it is whole


def test_adapter_resolution(ckpt):
    assert resolve_adapter("none") is None
    folder, label = resolve_adapter("A0007", str(ckpt / "run"))
    assert folder == ckpt / "run" / "cycle_002" / "agent_00" and label.startswith("a0007 (slot 0")
    assert resolve_adapter("1", str(ckpt / "run"))[0].name == "agent_01"


def test_agents_come_from_the_newest_committed_cycle(ckpt, tmp_path):
    """A cycle written but not yet committed (adapters and population.json come before the commit
    point) is invisible until the main state names it; the newest run is the one that committed last."""
    run = tmp_path / "run"
    shutil.copytree(ckpt / "run", run)
    shutil.copytree(run / "cycle_002", run / "cycle_003")
    population = json.loads((run / "population.json").read_text())
    (run / "population.json").write_text(json.dumps({**population, "cycle": 3,
                                                     "agents": [{"id": "a0009", "slot": 1, "fitness": [-1.0]}]}))
    folder, label = resolve_adapter("1", str(run))
    assert folder == run / "cycle_002" / "agent_01" and label.startswith("agent (slot 1, cycle_002")
    with pytest.raises(H2QError, match="'a0009' is neither"):
        resolve_adapter("a0009", str(run))
    commit(run, 3)
    folder, label = resolve_adapter("a0009", str(run))
    assert folder == run / "cycle_003" / "agent_01" and label.startswith("a0009 (slot 1, cycle_003")
    (run / records.STATE_DIR / records.STATE_FILE).unlink()
    with pytest.raises(H2QError, match="no committed cycle"):
        resolve_adapter("0", str(run))
    assert records.newest_run(tmp_path) is None  # no run has committed a cycle
    other = tmp_path / "other"
    shutil.copytree(ckpt / "run", other)
    assert records.newest_run(tmp_path) == other
    commit(run, 3)
    os.utime(other / records.STATE_DIR / records.STATE_FILE, (1, 1))  # committed long ago
    assert records.newest_run(tmp_path) == run


@pytest.mark.slow
def test_demo_runs_and_shows_tables_and_agents(ckpt):
    result = run_infer("--ckpt", str(ckpt / "base"), "--mode", "demo", "--max-new-tokens", "12",
                       "--group-size", "32", "--run", str(ckpt / "run"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for row in ("fp32", "int8", "int4", "full", "window (16 slots)", "h2o (16 slots)"):
        assert row in out
    assert "a0003 (slot 1)" in out and "a0007 (slot 0)" in out and "of the oracle's" in out
    assert "Traceback" not in out + result.stderr


def test_no_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert run_main(infer.main, ["--ckpt", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "python train.py" in err


@pytest.mark.slow
def test_air_gapped_one_shot(ckpt):
    result = run_infer("infer.py", "--ckpt", str(ckpt / "base"), "--prompt", "air gap", "--max-new-tokens", "8",
                       "--seed", "0", "--kv", "int8", "--quant", "int8", "--device", "cpu",
                       script=("tests/airgap.py",))
    assert result.returncode == 0, result.stderr
    assert "bytes/s" in result.stderr


def test_quant_switches_come_from_the_kept_float_weights(ckpt, monkeypatch):
    s = session(ckpt, group_size=32)
    before = {k: v.clone() for k, v in s.float_model.state_dict().items()}
    monkeypatch.setattr("h2q.session.load_model", lambda *a, **k: pytest.fail("re-read the checkpoint"))
    s.set_quant("int4")
    int4 = s.model
    s.set_quant("int8")
    assert s.model is not s.float_model and "int8" in s.weights_label()
    s.set_quant("int4")
    assert s.model is int4  # quantized once per mode
    s.set_quant("none")
    assert s.model is s.float_model
    assert all(torch.equal(v, before[k]) for k, v in s.float_model.state_dict().items())


def test_compile_covers_quantized_weights_too(ckpt):
    s = session(ckpt, compile=True, group_size=32)
    assert s.compiled and s.decoder is not s.model and "decode compiled" in s.weights_label()
    for mode in ("int8", "int4"):  # test_generate checks that compiled int4 gives the eager bytes
        s.set_quant(mode)
        assert s.compiled and s.decoder is not s.model and "decode compiled" in s.weights_label()


def import_graph() -> dict[str, set[str]]:
    """h2q module -> the h2q modules it imports anywhere in its text (inside functions too, and the
    packages an import runs on the way, less the module's own packages: they are imported before it runs)."""
    package = ROOT / "h2q"
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}  # h2q.report for h2q.report.common
        targets |= {t.rsplit(".", k)[0] for t in set(targets) for k in range(1, t.count(".") + 1)} - own
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize("module", ["h2q.infer", "h2q.chat", "h2q.session", "h2q.generate", "h2q.kvcache",
                                    "h2q.kvbase", "h2q.kvcompress", "h2q.kvbench", "h2q.data", "h2q.report",
                                    "h2q.evolve.records"])
def test_no_import_cycle_through(module):
    graph = import_graph()
    assert "h2q.kvcompress" in graph["h2q.kvcache"] and "h2q.session" in graph["h2q.chat"]  # the walk sees imports
    back = sorted(m for m in reaches(graph, module) if module in reaches(graph, m))
    assert module not in reaches(graph, module), f"{module} is on an import cycle with {back}"


# -- threads, figures, the REPL's new lines, agents, broken inputs ------------------------------------
class FakeMachine:
    """A thread probe whose timings say whether another process holds a core, and a hand-moved clock."""

    def __init__(self, busy: bool):
        self.busy, self.now = busy, 0.0

    def probe(self, threads: int) -> float:
        return 1.0 if threads == 1 else (5.0 if self.busy else 0.6)

    def policy(self) -> ThreadPolicy:
        policy = ThreadPolicy(0, every_s=30.0, probe=self.probe, clock=lambda: self.now, env={})
        if policy.most == 1:
            pytest.skip("one core: nothing to choose")
        return policy


def threads_seen(monkeypatch):
    """Patch the sampler to record torch's thread count at each draw (and emit 'ok', then EOT)."""
    seen, sampler = [], scripted_sampler("ok")

    def sample(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return sampler(*args, **kwargs)
    monkeypatch.setattr(generate, "sample_next", sample)
    return seen


def test_one_shot_and_each_reply_check_the_thread_count_first(ckpt, monkeypatch):
    machine = FakeMachine(busy=False)
    s = session(ckpt, threads=machine.policy(), max_new_tokens=4)
    most, seen = s.threads.most, threads_seen(monkeypatch)
    s.cfg.prompt = "go"
    err = Chunks()
    one_shot(s, out=Chunks(), err=err)
    assert seen and set(seen) == {most} and f"threads {most} of {most} (measured)" in err.text
    machine.busy, machine.now = True, 31.0  # a job took a core since: measured again before drawing
    seen.clear()
    one_shot(s, out=Chunks(), err=err)
    assert set(seen) == {1} and s.threads.probes == 2
    repl = chat.Repl(s, Chunks())
    machine.busy, machine.now = False, 62.0
    seen.clear()
    repl.turn("hello")
    assert set(seen) == {most} and s.threads.probes == 3
    machine.busy, machine.now = True, 70.0  # not due yet: no probe, no change
    repl.turn("again")
    assert s.threads.probes == 3 and torch.get_num_threads() == most


def test_figures_line_follows_a_newline_on_stderr_with_the_seed_used(ckpt):
    s = session(ckpt, max_new_tokens=12, seed=None)
    s.cfg.prompt = "The "
    out, err = Chunks(), Chunks()
    ids = one_shot(s, out=out, err=err)
    assert out.text == bytes(ids).decode("utf-8", "replace")  # stdout: the new text only
    match = re.fullmatch(r"\n\[h2q\] (\d+) bytes in \d+\.\d\d s \(\d+\.\d bytes/s, prefill included\) \| weights float32, "
                         r"[\d.]+ MB \| kv full \| adapter none \| threads 1 \(fixed\) \| seed (\d+)\n", err.text)
    assert match, err.text
    assert int(match.group(1)) == len(ids) <= 12  # the random seed may draw the end of text before 12 bytes
    s.cfg.seed = int(match.group(2))  # the printed seed gives the same text again
    assert one_shot(s, out=Chunks(), err=Chunks()) == ids


def test_a_trailing_backslash_sends_the_line_without_its_newline(ckpt, monkeypatch):
    s = session(ckpt, max_new_tokens=6)
    sampler = scripted_sampler("):\n\n")
    monkeypatch.setattr(generate, "sample_next", sampler)
    out = Chunks()
    repl = chat.Repl(s, out)
    repl.banner()
    repl.help()
    assert "`def main(\\`" in out.text and "LINE\\" in out.text
    repl.turn("def main(\\")
    assert repl.chat.tokens == [EOT, *encode("def main():\n\n")]
    with torch.no_grad():  # the model was asked to go on right after the '('
        expected = s.model(torch.tensor([[EOT, *encode("def main(")]]))[:, -1]
    assert torch.allclose(sampler.seen[0][:, :256], expected[:, :256], atol=1e-4)
    monkeypatch.setattr(generate, "sample_next", scripted_sampler("x\n\n"))
    repl.turn("y")  # a plain line still ends with a newline
    assert bytes(t for t in repl.chat.tokens if t < 256).endswith(b"def main():\n\ny\nx\n\n")


def test_sampling_commands_check_their_ranges_and_keep_the_session(ckpt, monkeypatch):
    s = session(ckpt, max_new_tokens=4)
    out = Chunks()
    repl = chat.Repl(s, out)
    for line in ("/temp inf", "/temp 1e308", "/temp nan", "/minp 2", "/repeat 0", "/repeat 1.3 -5", "/repeat a",
                 "/repeat 1.2 8 9", "/minp 0.05", "/repeat 1.3 32"):
        assert repl.command(line)
    said = out.text
    assert "error: /temp must be a finite number, got inf" in said and "error: /temp must be >= 0 and <= 100" in said
    assert "error: /temp must be a finite number, got nan" in said and "error: /minp must be >= 0 and <= 1" in said
    assert "error: /repeat must be > 0 and <= 10, got 0.0" in said and "error: /repeat must be >= -1, got -5" in said
    assert said.count("usage: /repeat P [N]") == 2
    assert "min_p 0.05" in said and "repeat_penalty 1.3 over the last 32 bytes" in said
    assert (s.cfg.temperature, s.cfg.min_p, s.cfg.repeat_penalty, s.cfg.repeat_last_n) == (0.8, 0.05, 1.3, 32)
    monkeypatch.setattr(generate, "sample_next", scripted_sampler("fine"))
    repl.turn("still here")
    assert "fine" in out.text


def test_agent_adapters_say_what_they_answer_and_observe_shows_the_distribution(ckpt):
    s = session(ckpt, run=str(ckpt / "run"))
    out = Chunks()
    repl = chat.Repl(s, out)
    repl.command("/observe")
    assert "error: /observe needs an evolve agent's adapter" in out.text
    repl.command("/adapter a0003")
    assert "a0003 is an evolve agent: it answers an observation of its world (hinted level, 16 bytes) with one " \
           "action byte of NSEWPDFZ" in out.text
    out.chunks.clear()
    repl.command("/observe")
    lines = out.text.splitlines()
    assert lines[0].startswith("observation E") and "(hinted level, world seed 0, tick 0)" in lines[0]
    shares = [float(x) for x in re.findall(r"[NSEWPDFZ] +(\d+)%", lines[1])]
    assert len(shares) == 8 and 97 <= sum(shares) <= 103
    assert "likeliest" in lines[2] and "the level's planner would take" in lines[2]
    out.chunks.clear()
    repl.command("/observe E80-....hSWfNE>S")
    assert out.text.startswith("observation E80-....hSWfNE>S\n") and "planner" not in out.text
    out.chunks.clear()
    repl.command("/observe abc")
    assert "trained on 16-byte observations; this one has 3" in out.text


def test_the_world_level_comes_from_the_run_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert chat.run_world(run).level == "hinted"  # a run from before the levels: no config, no `world`
    (run / "config.json").write_text(json.dumps({"world": "view", "window": 7}))
    world = chat.run_world(run)
    assert (world.level, world.window) == ("view", 7)
    (run / "config.json").write_text(json.dumps({"world": {"level": "view", "window": 3, "n_food": 4}}))
    assert (chat.run_world(run).window, chat.run_world(run).n_food) == (3, 4)
    (run / "config.json").write_text(json.dumps({"world": "maze"}))
    with pytest.raises(H2QError, match="config.json: its world settings"):
        chat.run_world(run)


def test_demo_shows_agents_acting_a_world_frame_and_fitness_against_the_oracle(ckpt):
    s = session(ckpt, run=str(ckpt / "run"), max_new_tokens=8)
    said = []
    chat._demo_agents(said.append, s, "def fibonacci(n):")
    text = "\n".join(said)
    assert "does not write text" in text and "one action byte" in text
    assert "t=12" in text and "#" in text  # the frame: the world after the planner's ticks
    header = next(line for line in said if line.lstrip().startswith("agent  observation"))
    assert "planner" in header and "a0007 (slot 0)" in header and "a0003 (slot 1)" in header
    rows = [line for line in said if re.match(r"  [0-3]  +E\d\d", line)]
    assert len(rows) == chat.DEMO_AGENTS and all(re.search(r"[NSEWPDFZ] \d+% \(", r) for r in rows)
    assert "a0007 -1.5 = -3000% of the oracle's 0.05" in text.replace("\n   ", " ")
    assert "best agent reached 40% and the median 20%" in text.replace("\n   ", " ")
    assert s.adapter is None  # the tour puts the session's own adapter back


def test_nan_weights_and_infinite_temperature_are_one_line(ckpt, tmp_path, capsys):
    torch.manual_seed(0)
    broken = Transformer(PRESETS["tiny"]).eval()
    with torch.no_grad():
        broken.layers[1].mlp.up_proj.weight[3, 5] = float("nan")  # as a run with --lr inf once saved
    save_model(tmp_path / "nan", broken)
    assert run_main(infer.main, ["--ckpt", str(tmp_path / "nan"), "--prompt", "hi", "--threads", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "layers.1.mlp.up_proj.weight holds nan or inf" in err
    assert "probability tensor" not in err
    for value in ("inf", "1e308", "nan"):
        assert run_main(infer.main, ["--ckpt", str(ckpt / "base"), "--prompt", "hi", "--temperature", value]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("error: --temperature must be")


def test_help_is_grouped_with_examples_last_and_each_default_once():
    text = infer.make_parser().format_help()
    sections = [text.index(f"\n{name}:\n") for name in ("model", "generation", "sampling", "run", "examples")]
    assert sections == sorted(sections) and text.rstrip().endswith(infer.EXAMPLES.splitlines()[-1].strip())
    flags = re.split(r"\n  (?=--)", text[sections[0]:sections[-1]])[1:]
    assert len(flags) == len(dataclasses.fields(InferConfig)) and all(f.count("(default") <= 1 for f in flags)
    assert "--repeat-penalty" in text and "--min-p" in text and "--threads" in text
