"""Data pipeline: selection of text files, deterministic disjoint splits, caching, batches."""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from h2q import data, kvbench
from h2q.errors import H2QError
from h2q.tokenizer import EOT

REPO = Path(__file__).resolve().parent.parent


def make_doc(i: int, size: int = 400) -> bytes:
    line = f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}\n".encode()
    return (line * (size // len(line) + 1))[:size]


def write_docs(folder: Path, n: int, size: int = 400) -> dict[str, bytes]:
    docs = {}
    for i in range(n):
        rel = f"sub{i % 3}/doc{i:03d}.{'txt' if i % 2 else 'md'}"
        docs[rel] = make_doc(i, size)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(docs[rel])
    return docs


def split_docs(array: np.ndarray) -> list[bytes]:
    return bytes(array).split(b"\x00") if len(array) else []


def quiet(_):
    pass


def test_document_split_is_deterministic_and_disjoint(tmp_path):
    src = tmp_path / "src"
    docs = write_docs(src, 60)
    a = data.load_corpus(str(src), block_size=32, root=tmp_path / "a", log=quiet)
    b = data.load_corpus(str(src), block_size=32, root=tmp_path / "b", log=quiet)
    assert a.manifest["split_mode"] == "documents"
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.dtype == np.uint8 and isinstance(a.train, np.memmap)

    entries = a.manifest["documents"]
    assert [e["name"] for e in entries] == sorted(docs)  # sorted relative paths
    val_names = [e["name"] for e in entries if e.get("val_bytes")]
    train_names = [e["name"] for e in entries if e.get("train_bytes")]
    assert val_names and train_names and not set(val_names) & set(train_names)
    assert set(val_names) | set(train_names) == set(docs)
    assert all(name in val_names for name in docs if data.val_score(name) < data.VAL_FRACTION)
    # the .bin files are exactly the documents, in order, joined by NUL
    assert split_docs(a.train) == [docs[n] for n in train_names]
    assert split_docs(a.val) == [docs[n] for n in val_names]
    assert a.manifest["totals"]["val_bytes"] >= data.MIN_VAL_BYTES


def test_val_documents_follow_the_path_hash():
    names = {f"f{i}.txt": 10_000 for i in range(1000)}
    val = data.choose_val_documents(names)
    assert val == {n for n in names if data.val_score(n) < data.VAL_FRACTION}
    assert 20 < len(val) < 80  # ~5%
    small = {f"f{i}.txt": 10 for i in range(20)}
    assert 1 <= len(data.choose_val_documents(small)) <= 10  # topped up, never more than half


def test_single_file_holds_out_its_tail(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    text = b"".join(f"line {i} of the only file, with some words in it\n".encode() for i in range(2000))
    (src / "input.txt").write_bytes(text)
    corpus = data.load_corpus(str(src), block_size=64, root=tmp_path / "cache", log=quiet)
    assert corpus.manifest["split_mode"] == "tail"
    train, val = bytes(corpus.train), bytes(corpus.val)
    assert train + val == text  # disjoint, nothing lost, no separator inside one file
    assert 0.04 * len(text) <= len(val) <= 0.07 * len(text)
    assert train.endswith(b"\n") and val.startswith(b"line ")  # cut at a line start
    again = data.load_corpus(str(src), block_size=64, root=tmp_path / "again", log=quiet)
    assert bytes(again.val) == val


def test_few_files_each_give_their_tail(tmp_path):
    src = tmp_path / "src"
    docs = write_docs(src, 3, size=50_000)
    corpus = data.load_corpus(str(src), block_size=64, root=tmp_path / "cache", log=quiet)
    assert corpus.manifest["split_mode"] == "tail"
    heads, tails = split_docs(corpus.train), split_docs(corpus.val)
    assert len(heads) == len(tails) == 3
    for (name, content), head, tail in zip(sorted(docs.items()), heads, tails):
        assert head + tail == content and len(tail) >= data.MIN_VAL_BYTES


def test_binary_files_skipped_and_counted_odd_bytes_kept(tmp_path):
    src = tmp_path / "src"
    docs = write_docs(src, 25)
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "noise.bin").write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(5000)))
    (src / "nul.txt").write_bytes(b"text with a \x00 inside")
    latin1 = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve text in Latin-1\n".encode("latin-1") * 20
    (src / "latin1.txt").write_bytes(latin1)
    (src / "empty.txt").write_bytes(b"")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    lines = []
    corpus = data.load_corpus(str(src), block_size=32, root=tmp_path / "cache", log=lines.append)
    skipped = corpus.manifest["skipped"]
    assert sorted(skipped["binary"]) == ["image.png", "noise.bin", "nul.txt"]
    assert skipped["empty"] == ["empty.txt"]
    assert corpus.manifest["totals"]["skipped_binary"] == 3
    assert "skipped 3 binary" in "\n".join(lines)
    names = [e["name"] for e in corpus.manifest["documents"]]
    assert names == sorted([*docs, "latin1.txt"])  # hidden .git left out
    all_bytes = bytes(corpus.train) + bytes(corpus.val)
    assert latin1 in all_bytes  # invalid UTF-8 kept as raw bytes


def test_is_binary():
    assert data.is_binary(b"abc\x00def")
    assert data.is_binary(bytes(range(128, 256)) * 10)
    assert not data.is_binary("héllo wörld 中文 🙂".encode())
    assert not data.is_binary(b"mostly ascii with one bad byte \xff here")


def test_user_errors(tmp_path):
    with pytest.raises(H2QError, match="does not exist"):
        data.load_corpus(str(tmp_path / "missing"), 32, root=tmp_path / "cache", log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(H2QError, match="no text files"):
        data.load_corpus(str(empty), 32, root=tmp_path / "cache", log=quiet)
    (empty / "blob.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(H2QError, match=r"no text files .*1 binary"):
        data.load_corpus(str(empty), 32, root=tmp_path / "cache", log=quiet)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(H2QError, match="is a file"):
        data.load_corpus(str(tmp_path / "a.txt"), 32, root=tmp_path / "cache", log=quiet)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        with pytest.raises(H2QError, match="unreadable"):
            data.load_corpus(str(locked), 32, root=tmp_path / "cache", log=quiet)


def test_too_small_corpus_is_a_user_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "input.txt").write_bytes(make_doc(0, 100))
    with pytest.raises(H2QError, match="split .* fewer than one context window"):
        data.load_corpus(str(src), block_size=64, root=tmp_path / "cache", log=quiet)
    corpus = data.load_corpus(str(src), block_size=8, root=tmp_path / "cache", log=quiet)
    assert len(corpus.val) >= 9


def test_cache_reused_rebuilt_on_change_and_on_corruption(tmp_path):
    src = tmp_path / "src"
    docs = write_docs(src, 30)
    root = tmp_path / "cache"
    first = data.load_corpus(str(src), 32, root=root, log=quiet)
    assert first.folder.parent == root.resolve() and first.folder.name.startswith("src-")
    lines = []
    data.load_corpus(str(src), 32, root=root, log=lines.append)
    assert lines[0].startswith("using corpus")

    changed = sorted(docs)[0]
    (src / changed).write_bytes(b"new content " * 50)
    lines.clear()
    corpus = data.load_corpus(str(src), 32, root=root, log=lines.append)
    assert "source files changed" in lines[0] and lines[1].startswith("prepared")
    assert b"new content " * 50 in bytes(corpus.train) + bytes(corpus.val)

    expected_val = bytes(corpus.val)  # copied: the corruption below overwrites the mapped file in place
    (corpus.folder / "val.bin").write_bytes(b"garbage")
    lines.clear()
    rebuilt = data.load_corpus(str(src), 32, root=root, log=lines.append)
    assert "val.bin does not match" in lines[0]
    assert bytes(rebuilt.val) == expected_val


def test_cache_root_inside_data_dir_is_not_read(tmp_path):
    write_docs(tmp_path, 25)
    first = data.load_corpus(str(tmp_path), 32, root=tmp_path / "data", log=quiet)
    lines = []
    data.load_corpus(str(tmp_path), 32, root=tmp_path / "data", log=lines.append)
    assert lines[0].startswith("using corpus")  # its own output did not count as a change
    assert all(not e["name"].startswith("data/") for e in first.manifest["documents"])


def test_get_batch_reproducible_and_shifted():
    array = np.frombuffer(bytes(range(1, 256)) * 40, dtype=np.uint8)
    gen = torch.Generator().manual_seed(123)
    state = gen.get_state()
    x, y = data.get_batch(array, batch_size=8, block_size=16, generator=gen)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # every row is a real window of the (255-periodic) data
        start = row_x[0].item() - 1
        assert row_x.tolist() == array[start:start + 16].tolist()
        assert row_y.tolist() == array[start + 1:start + 17].tolist()
    gen.set_state(state)
    x2, y2 = data.get_batch(array, 8, 16, gen)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.get_batch(array, 8, 16, gen)
    assert not torch.equal(x, x3)


def test_get_batch_reaches_the_last_byte_and_maps_nul_to_eot():
    array = np.array([0, 1, 2, 0, 3], dtype=np.uint8)
    gen = torch.Generator().manual_seed(0)
    x, y = data.get_batch(array, batch_size=64, block_size=4, generator=gen)
    assert torch.equal(x[0], torch.tensor([EOT, 1, 2, EOT]))
    assert torch.equal(y[0], torch.tensor([1, 2, EOT, 3]))
    assert not (x == 0).any() and not (y == 0).any()


def test_eval_batches_deterministic_evenly_spaced():
    array = np.frombuffer(bytes(range(1, 201)) * 5, dtype=np.uint8)  # 1000 bytes
    batches = list(data.iter_eval_batches(array, batch_size=4, block_size=10, max_batches=3))
    assert len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    again = list(data.iter_eval_batches(array, 4, 10, 3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x[0].tolist() == array[:10].tolist() and y[-1].tolist() == array[-10:].tolist()
    tiny = np.arange(1, 14, dtype=np.uint8)  # only 3 windows of 10 + 1
    assert sum(len(x) for x, _ in data.iter_eval_batches(tiny, 2, 10, 5)) == 3


def test_eval_windows_are_one_computation():
    """Training's evaluation batches and the KV benchmark score the same windows, rounded to the
    nearest byte, the first at the start and the last at the end."""
    array = np.frombuffer(bytes(range(1, 201)) * 5, dtype=np.uint8)  # 1000 bytes
    starts = data.eval_window_starts(len(array), 10, 7)
    assert starts.tolist() == [0, 165, 330, 494, 659, 824, 989]  # 989 * k / 6, rounded
    batches = torch.cat([x for x, _ in data.iter_eval_batches(array, 4, 10, 2)])
    x, y = kvbench.eval_windows(array, 10, 8)
    first_bytes = torch.from_numpy(array[data.eval_window_starts(len(array), 10, 8)]).long()
    assert torch.equal(batches, x) and torch.equal(x[:, 0], first_bytes)
    assert len(data.eval_window_starts(13, 10, 5)) == 3  # only 3 windows of 10 + 1 fit
    with pytest.raises(H2QError, match="no window of 11"):
        data.eval_window_starts(10, 10, 1)


def test_file_hash_without_file_digest(tmp_path, monkeypatch):
    """sha256_file reads in chunks, so it works on Python 3.10 (no hashlib.file_digest)."""
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    payload = bytes(range(256)) * (3 * data.HASH_CHUNK // 256 + 7)  # several chunks and a partial one
    (tmp_path / "f.bin").write_bytes(payload)
    assert data.sha256_file(tmp_path / "f.bin") == hashlib.sha256(payload).hexdigest()


def test_default_corpus_builder(tmp_path):
    lines = []
    folder = data.build_default_corpus(tmp_path, log=lines.append)
    assert folder == tmp_path / "default" and lines[0].startswith("prepared")
    manifest = json.loads((folder / "manifest.json").read_text())
    names = [e["name"] for e in manifest["documents"]]
    assert names == sorted(names)
    assert any(n.startswith("pydoc_topics/") for n in names) and "stdlib/os.py" in names
    assert not any("site-packages" in n for n in names)
    assert manifest["totals"]["documents"] > 50 and manifest["split_mode"] == "documents"
    for split in data.SPLITS:
        entry = manifest["files"][f"{split}.bin"]
        assert entry["bytes"] == (folder / f"{split}.bin").stat().st_size > 0
        assert entry["sha256"] == data.sha256_file(folder / f"{split}.bin")
    first_train = (folder / "train.bin").read_bytes()

    lines.clear()
    corpus = data.load_corpus(None, 256, root=tmp_path, log=lines.append)
    assert lines[0].startswith("using corpus")
    assert corpus.manifest == manifest

    (folder / "train.bin").write_bytes(b"truncated")
    lines.clear()
    data.build_default_corpus(tmp_path, log=lines.append)
    assert "rebuilding" in lines[0]
    assert (folder / "train.bin").read_bytes() == first_train  # deterministic rebuild


def test_default_corpus_split_on_a_small_subset(tmp_path, monkeypatch):
    subset = [data.Document(f"stdlib/mod{i}.py", lambda i=i: make_doc(i, 3000)) for i in range(40)]
    monkeypatch.setattr(data, "default_documents", lambda: subset)
    corpus = data.load_corpus(None, 64, root=tmp_path, log=quiet)
    assert corpus.manifest["totals"]["documents"] == 40
    assert len(split_docs(corpus.train)) + len(split_docs(corpus.val)) == 40


@pytest.mark.slow
def test_prepare_script(tmp_path):
    src = tmp_path / "src"
    write_docs(src, 3, size=5000)
    script = REPO / "scripts" / "prepare_data.py"
    ok = subprocess.run([sys.executable, str(script), "--data-dir", str(src), "--root", str(tmp_path / "c")],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "3 documents" in ok.stdout and "val" in ok.stdout and "binary" in ok.stdout
    bad = subprocess.run([sys.executable, str(script), "--data-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
