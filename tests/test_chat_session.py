"""Conversations kept in files and specialists that answer: a saved conversation, restored in a fresh
session (its weights and adapter taken from the file), gives the uninterrupted conversation's next
logits and reply bit for bit; /save, /load and --session in the REPL, with one-line errors that lose
nothing; --specialists routes every reply (or --task / /task names one) and shows the decision, a
switch of specialist rebuilds the cache, and one-shot says the route on stderr."""
import io
import sys

import pytest
import torch
from conftest import tiny_base_with_adapters

from h2q import chat, generate, infer
from h2q.cli import run_main
from h2q.evolve.records import resolve_adapter
from h2q.generate import generate as generate_text
from h2q.infer import one_shot
from h2q.perf import ThreadPolicy
from h2q.session import Conversation, InferConfig, Session

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny base, an adapter folder, and a specialists folder with two adapters (alpha, beta)."""
    root = tmp_path_factory.mktemp("chat_session")
    tiny_base_with_adapters(root, [root / "adapter", root / "specialists" / "alpha", root / "specialists" / "beta"],
                            b_seed=20)
    return root


def session(folder, **kw):
    cfg = InferConfig(ckpt=str(folder / "base"), device="cpu", **{"seed": 3, "max_new_tokens": 8, **kw})
    return Session(cfg, resolve_adapter, ThreadPolicy(1))


class Chunks(io.StringIO):
    def isatty(self):
        return False


def recording(monkeypatch):
    """The real sampler, recording the logits of every draw."""
    seen, real = [], generate.sample_next

    def sample(logits, *args, **kwargs):
        seen.append(logits.detach().clone())
        return real(logits, *args, **kwargs)
    monkeypatch.setattr(generate, "sample_next", sample)
    return seen


@pytest.mark.parametrize("policy, quant, adapter", [("full", "none", "none"), ("int8", "int8", "adapter"),
                                                    ("window", "none", "adapter")])
def test_a_restored_conversation_continues_as_the_uninterrupted_one(folder, tmp_path, monkeypatch,
                                                                    policy, quant, adapter):
    adapter = str(folder / adapter) if adapter != "none" else "none"
    talk = Conversation(session(folder, quant=quant, adapter=adapter), policy)
    talk.reply(b"hello there", lambda t: None)
    talk.reply(b"and more", lambda t: None)
    path = talk.save(tmp_path / "talk.safetensors")
    seen = recording(monkeypatch)
    uninterrupted = talk.reply(b"go on", lambda t: None).ids
    expected, seen[:] = list(seen), []
    fresh = session(folder)  # float weights, no adapter: the file says what it was made with
    again = Conversation(fresh, "full")
    again.restore(path)
    assert (again.policy, fresh.cfg.quant, str(fresh.adapter_dir or "none")) == (policy, quant, adapter)
    assert again.reply(b"go on", lambda t: None).ids == uninterrupted
    assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_save_and_load_in_the_repl_and_errors_that_lose_nothing(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = session(folder)
    out = Chunks()
    repl = chat.Repl(s, out)
    repl.turn("first line")
    text = list(repl.chat.tokens)
    repl.command("/save mine")
    assert (tmp_path / "mine.safetensors").is_file() and "[saved " in out.getvalue()
    repl.command("/reset")
    for bad in ("/load nowhere", f"/load {folder / 'base' / 'model.safetensors'}", "/load"):
        before = list(repl.chat.tokens)
        repl.command(bad)
        assert repl.chat.tokens == before
    said = out.getvalue().splitlines()
    assert sum(line.startswith("error: ") for line in said) == 2 and "usage: /load NAME: " in out.getvalue()
    assert any("model.safetensors is not an h2q KV cache file" in line for line in said)
    repl.command("/load mine")
    assert repl.chat.tokens == text and "[loaded mine.safetensors: " in out.getvalue()
    repl.command("/save mine.safetensors/x")  # a folder that is a file
    assert "error: " in out.getvalue().splitlines()[-1] and repl.chat.tokens == text


def run_repl(s, lines: str, monkeypatch) -> str:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    out = Chunks()
    assert chat.repl(s, out) == 0
    return out.getvalue()


def test_session_file_is_continued_and_rewritten_after_every_reply(folder, tmp_path, monkeypatch):
    keep = tmp_path / "chat.safetensors"
    said = run_repl(session(folder, session=str(keep)), "hello\n", monkeypatch)
    assert "new, saved after every reply" in said and keep.is_file()
    first = session(folder)
    talk = Conversation(first, "full")
    talk.restore(keep)
    text = list(talk.tokens)
    assert bytes(t for t in text if t < 256).startswith(b"hello\n")
    said = run_repl(session(folder, session=str(keep)), "again\n", monkeypatch)
    assert f"[session {keep}: {len(text)} bytes of text" in said
    talk.restore(keep)
    assert talk.tokens[:len(text)] == text and bytes(talk.tokens[len(text):]).lstrip(b"\n").startswith(b"again\n")
    keep.write_bytes(b"not a conversation")
    assert run_main(infer.main, ["--ckpt", str(folder / "base"), "--interactive", "--session", str(keep)]) == 2
    assert keep.read_bytes() == b"not a conversation"  # refused before anything starts, left as it was


def test_specialists_answer_each_reply_and_show_the_route(folder, monkeypatch):
    s = session(folder, specialists=str(folder / "specialists"))
    out = Chunks()
    repl = chat.Repl(s, out)
    repl.turn("abc")
    assert "[route: " in out.getvalue() and "(auto: " in out.getvalue() and repl.chat.last.route.how == "auto"
    for task in ("alpha", "beta"):  # a switch of specialist rebuilds the cache under the new one
        repl.command(f"/task {task}")
        seen = recording(monkeypatch)
        repl.turn("x")
        assert f"[route: {task} (tag)]" in out.getvalue()
        last, tokens = repl.chat.last, repl.chat.tokens
        prompt = tokens[:len(tokens) - len(last.ids) - (last.ended == "end of text")]
        assert bytes(prompt[-2:]) == b"x\n"
        with torch.no_grad():  # the first draw saw the whole text under this specialist
            full = s.model(torch.tensor([prompt]), adapters=s.router.adapters(task))[:, -1]
        assert torch.allclose(seen[0][:, :256], full[:, :256], atol=1e-4)
    for bad in ("/task gamma", "/adapter none"):
        repl.command(bad)
    said = out.getvalue().splitlines()
    assert "error: no specialist 'gamma' in " in said[-2] and said[-2].endswith("choose one of alpha, beta, or auto")
    assert said[-1].startswith("error: the specialists of ") and s.cfg.task == "beta"
    plain = chat.Repl(session(folder), Chunks())
    plain.command("/task alpha")
    assert plain.out.getvalue() == "error: no specialists are loaded; start infer.py with --specialists DIR\n"


def test_one_shot_routes_and_says_so_on_stderr(folder, capsys):
    s = session(folder, specialists=str(folder / "specialists"), task="beta", prompt="def ")
    out, err = Chunks(), Chunks()
    ids = one_shot(s, out=out, err=err)
    assert err.getvalue().startswith("[route: beta (tag)]\n")
    expected = generate_text(s.model, b"def ", 8, seed=3, adapters=s.router.adapters("beta"), **s.cfg.sampling())
    assert ids == expected
    base = ["--ckpt", str(folder / "base"), "--prompt", "hi"]
    for extra, message in ((["--specialists", str(folder / "specialists"), "--adapter", str(folder / "adapter")],
                            "error: --specialists and --adapter exclude each other"),
                           (["--session", "x.safetensors"], "error: --session keeps a REPL conversation"),
                           (["--task", "beta"], "error: --task 'beta' names a specialist: give --specialists DIR"),
                           (["--specialists", str(folder / "adapter")], "holds no adapter folders")):
        assert run_main(infer.main, base + extra) == 2
        got = capsys.readouterr()
        assert got.out == "" and got.err.count("\n") == 1 and message in got.err, got.err


def test_commands_are_listed_in_help(folder):
    out = Chunks()
    chat.Repl(session(folder), out).help()
    for name in ("/save NAME", "/load NAME", "/task NAME|auto", "/observe [TEXT]", "/repeat P [N]", "/minp P"):
        assert name in out.getvalue()
