"""Offline data pipeline: a folder of text (or the local Python installation) -> two memory-mapped
byte arrays, `train.bin` and `val.bin` -> random training windows and fixed evaluation windows.

Follows nanoGPT's `prepare.py` + `get_batch`: the corpus is prepared once into flat uint8 files that
training maps with `np.memmap` and samples windows from at random offsets. Because the tokenizer is
byte-level, preparing is just selecting and joining bytes:

* Documents are the text files under the data folder in sorted relative-path order (hidden entries
  such as `.git` are left out). A file holding a NUL byte, or mostly undecodable bytes, is binary and
  skipped (counted in the log); other odd or invalid UTF-8 bytes are kept as they are.
* Documents are joined with one NUL byte. Text never holds NUL (such files are binary), so NUL marks
  a document boundary, and `get_batch` turns it into the tokenizer's EOT id.
* Split by document: a document whose path hashes (sha256) below `VAL_FRACTION` is validation, so the
  split is deterministic, never overlaps and is stable when files are added. A corpus of fewer than
  `MIN_DOCS_FOR_DOC_SPLIT` documents (say one `input.txt`) holds out the tail of each file instead.
* Without a data folder the default corpus is built from the local Python installation: the help
  texts of `pydoc_data.topics` and the standard library's `.py` sources (tests included; site-packages,
  the duplicated pydoc_data module and the generated codec tables of `encodings` are left out). Nothing
  is downloaded.

A prepared folder holds `train.bin`, `val.bin` and `manifest.json` (documents with sizes, sha256 and
split; sha256 and size of both .bin files; totals). It is reused while it verifies and, for a data
folder, while the source files' paths, sizes and mtimes are unchanged; otherwise it is rebuilt. Every
file is written atomically and the manifest last, so an interrupted build is simply redone. The
prepared folder is locked while it is checked or built (h2q.checkpoint.FolderLock: a second run
waits for the first to finish the build, then reuses it), and the temporary files of a build that was
killed are removed first.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from h2q import tokenizer
from h2q.checkpoint import FolderLock, atomic_write, atomic_write_json, ensure_folder, remove_stale_temps
from h2q.errors import H2QError

FORMAT = "h2q-corpus-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SEPARATOR = b"\x00"
VAL_FRACTION = 0.05
MIN_DOCS_FOR_DOC_SPLIT = 20
MIN_VAL_BYTES = 2048  # hold out at least this much when the corpus allows: one context of every preset
NEWLINE_SNAP = 256  # a held-out tail starts at a line start if one is this close
BINARY_SAMPLE = 1 << 16
MAX_UNDECODABLE = 0.3  # share of bytes in the sample that are not UTF-8 above which a file is binary
DEFAULT_NAME = "default"
HASH_CHUNK = 1 << 20  # bytes read per step when hashing a file
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"}


@dataclass
class Document:
    name: str  # relative path: the sort key and the input of the split hash
    read: Callable[[], bytes]


@dataclass
class Corpus:
    train: np.ndarray  # uint8, memory-mapped
    val: np.ndarray  # uint8, memory-mapped
    folder: Path
    manifest: dict


def is_binary(data: bytes) -> bool:
    """NUL anywhere, or mostly bytes that are not UTF-8 in the first 64 KiB."""
    if SEPARATOR in data:
        return True
    sample = data[:BINARY_SAMPLE]
    if sample.isascii():
        return False
    undecodable = len(sample) - len(sample.decode("utf-8", errors="ignore").encode("utf-8"))
    return undecodable > MAX_UNDECODABLE * len(sample)


def val_score(name: str) -> float:
    """Deterministic position of a document in [0, 1): below VAL_FRACTION means validation."""
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_val_documents(sizes: dict[str, int]) -> set[str]:
    """Documents scoring below VAL_FRACTION, topped up in score order while validation is shorter
    than MIN_VAL_BYTES (so a small corpus still has an evaluable split), never more than half."""
    val, val_bytes = set(), 0
    for name in sorted(sizes, key=val_score)[: len(sizes) // 2]:
        if val_score(name) >= VAL_FRACTION and val_bytes >= MIN_VAL_BYTES:
            break
        val.add(name)
        val_bytes += sizes[name]
    return val


def tail_split_point(data: bytes) -> int:
    """Where a document's held-out tail starts: ~VAL_FRACTION of it (at least MIN_VAL_BYTES, at most
    half), moved back to a line start when one is near."""
    tail = min(max(math.ceil(VAL_FRACTION * len(data)), MIN_VAL_BYTES), len(data) // 2)
    split = len(data) - tail
    if tail:
        newline = data.rfind(b"\n", max(split - NEWLINE_SNAP, 0), split)
        split = newline + 1 if newline >= 0 else split
    return split


def write_corpus(folder: Path, documents: list[Document], source: dict, log=print,
                 unreadable: list[str] = ()) -> dict:
    """Classify, split and write `documents` into folder/{train,val}.bin + manifest.json; `source`
    (what the corpus was made from) is copied into the manifest."""
    sizes, skipped = {}, {"binary": [], "empty": [], "unreadable": list(unreadable)}
    for doc in documents:
        try:
            data = doc.read()
        except OSError:
            skipped["unreadable"].append(doc.name)
            continue
        kind = "empty" if not data else "binary" if is_binary(data) else None
        if kind:
            skipped[kind].append(doc.name)
        else:
            sizes[doc.name] = len(data)
    if not sizes:
        raise H2QError(f"no text files in {source['source']} ({len(skipped['binary'])} binary files "
                        "skipped); put .txt/.md/.py or other text files there")
    mode = "documents" if len(sizes) >= MIN_DOCS_FOR_DOC_SPLIT else "tail"
    val_names = choose_val_documents(sizes) if mode == "documents" else set()
    entries = []

    def write_both(train_tmp, val_tmp):
        with open(train_tmp, "wb") as train_out, open(val_tmp, "wb") as val_out:
            outs = {"train": train_out, "val": val_out}
            for doc in documents:
                if doc.name not in sizes:
                    continue
                data = doc.read()
                if mode == "tail":
                    cut = tail_split_point(data)
                    parts = {"train": data[:cut], "val": data[cut:]}
                else:
                    parts = {"val" if doc.name in val_names else "train": data}
                for split, part in parts.items():
                    if part and outs[split].tell():
                        outs[split].write(SEPARATOR)
                    outs[split].write(part)
                entries.append({"name": doc.name, "bytes": len(data), "sha256": sha256_bytes(data),
                                **{f"{s}_bytes": len(p) for s, p in parts.items()}})

    # nested so that both files are complete before either replaces an old one
    atomic_write(folder / "train.bin", lambda t: atomic_write(folder / "val.bin", lambda v: write_both(t, v)))
    files = {f"{s}.bin": {"bytes": (folder / f"{s}.bin").stat().st_size,
                          "sha256": sha256_file(folder / f"{s}.bin")} for s in SPLITS}
    manifest = {
        "format": FORMAT, **source, "split_mode": mode, "val_fraction": VAL_FRACTION,
        "separator": "NUL (0x00) between documents; get_batch maps it to EOT", "files": files,
        "documents": entries, "skipped": skipped,
        "totals": {"documents": len(entries), "bytes": sum(e["bytes"] for e in entries),
                   "val_documents": len(val_names) if mode == "documents" else 0,
                   **{f"{s}_bytes": files[f"{s}.bin"]["bytes"] for s in SPLITS},
                   **{f"skipped_{k}": len(v) for k, v in skipped.items()}},
    }
    atomic_write_json(folder / MANIFEST, manifest)
    log(f"prepared {folder}: {summary(manifest)}")
    return manifest


def summary(manifest: dict) -> str:
    t = manifest["totals"]
    return (f"{t['documents']} documents ({manifest['split_mode']} split), train {t['train_bytes']:,} bytes, "
            f"val {t['val_bytes']:,} bytes, skipped {t['skipped_binary']} binary, "
            f"{t['skipped_empty']} empty, {t['skipped_unreadable']} unreadable files")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The file's sha256, read in chunks (hashlib.file_digest would need Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> tuple[dict | None, str]:
    """(manifest, "") when folder holds a complete, uncorrupted corpus, else (None, why not)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            return None, f"format is not {FORMAT}"
        for name, expected in manifest["files"].items():
            path = folder / name
            if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
                return None, f"{name} does not match its manifest"
        return manifest, ""
    except FileNotFoundError as e:
        return None, f"{Path(e.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"manifest unreadable ({e})"


def reuse_or_build(folder: Path, source: dict, documents: Callable[[], list[Document]], log=print,
                   unreadable: list[str] = ()) -> dict:
    """The manifest of folder when it verifies and has the same source signature, else a rebuild's
    (under the folder's lock, stale temporary files removed first)."""
    ensure_folder(folder.parent, "--data-root")
    with FolderLock(folder, "--data-root", wait=True):
        remove_stale_temps(folder)
        manifest, why = read_manifest(folder)
        if manifest is not None and manifest.get("signature") == source.get("signature"):
            log(f"using corpus {folder}: {summary(manifest)}")
            return manifest
        if (folder / MANIFEST).exists():
            log(f"rebuilding {folder}: {why or 'source files changed'}")
        return write_corpus(folder, documents(), source, log, unreadable)


def prepare_default_corpus(root: str | Path = "data", log=print) -> tuple[Path, dict]:
    """root/default from the local Python installation; rebuilt only when missing or corrupt."""
    folder = Path(root) / DEFAULT_NAME
    source = {"source": "python-installation", "python": sys.version.split()[0]}
    return folder, reuse_or_build(folder, source, default_documents, log)


def build_default_corpus(root: str | Path = "data", log=print) -> Path:
    return prepare_default_corpus(root, log)[0]


def default_documents() -> list[Document]:
    """pydoc's help topics and the stdlib sources, sorted by name."""
    from pydoc_data.topics import topics

    docs = [Document(f"pydoc_topics/{key}.txt", lambda text=text: text.encode("utf-8", "surrogatepass"))
            for key, text in topics.items()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        docs += [Document(f"stdlib/{(Path(dirpath) / f).relative_to(stdlib).as_posix()}",
                          (Path(dirpath) / f).read_bytes) for f in filenames if f.endswith(".py")]
    return sorted(docs, key=lambda d: d.name)


def prepare_data_dir(data_dir: str | Path, root: str | Path = "data", log=print) -> tuple[Path, dict]:
    """The prepared folder for `data_dir` under root, rebuilt when its files changed."""
    top = Path(data_dir).expanduser().resolve()
    if not top.exists():
        raise H2QError(f"data folder {data_dir} does not exist; check the --data-dir path")
    if not top.is_dir():
        raise H2QError(f"--data-dir {data_dir} is a file; put it in a folder of its own and pass the folder")
    try:
        os.scandir(top).close()
    except OSError as e:
        raise H2QError(f"data folder {data_dir} is unreadable ({e.strerror}); fix its permissions") from None
    cache_root = Path(root).resolve()
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", top.name) or "root"
    folder = cache_root / f"{tag}-{sha256_bytes(str(top).encode('utf-8', 'surrogateescape'))[:8]}"
    files, unreadable = walk_text_candidates(top, exclude=cache_root)
    signature = hashlib.sha256(json.dumps([[rel, st.st_size, st.st_mtime_ns] for rel, _, st in files]
                                          + [unreadable]).encode()).hexdigest()
    source = {"source": str(top), "signature": signature}
    return folder, reuse_or_build(folder, source, lambda: [Document(rel, path.read_bytes) for rel, path, _ in files],
                                  log, unreadable)


def walk_text_candidates(top: Path, exclude: Path) -> tuple[list[tuple[str, Path, os.stat_result]], list[str]]:
    """Regular files under top, not hidden and not inside `exclude`, sorted by relative path; plus the
    relative paths that could not be listed or stat'ed."""
    found, unreadable = [], []

    def note_error(e: OSError):
        unreadable.append(Path(e.filename).relative_to(top).as_posix())

    for dirpath, dirnames, filenames in os.walk(top, onerror=note_error):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (here / d).resolve() != exclude]
        for name in filenames:
            if name.startswith("."):
                continue
            path = here / name
            rel = path.relative_to(top).as_posix()
            try:
                st = path.stat()
            except OSError:
                unreadable.append(rel)
                continue
            if stat.S_ISREG(st.st_mode):  # never open fifos or devices
                found.append((rel, path, st))
    return sorted(found, key=lambda f: f[0]), sorted(unreadable)


def prepare_corpus(data_dir: str | Path | None, root: str | Path = "data", log=print) -> tuple[Path, dict]:
    """(folder, manifest) of the prepared corpus: data_dir's, or the default one when it is None."""
    return prepare_default_corpus(root, log) if data_dir is None else prepare_data_dir(data_dir, root, log)


def load_corpus(data_dir: str | None, block_size: int, root: str | Path = "data", log=print) -> Corpus:
    """Prepare (or reuse) the corpus and map both splits; each must hold one window of block_size + 1."""
    folder, manifest = prepare_corpus(data_dir, root, log)
    for split in SPLITS:
        size = manifest["files"][f"{split}.bin"]["bytes"]
        if size < block_size + 1:
            raise H2QError(f"the {split} split of {manifest['source']} has {size} bytes, fewer than one "
                            f"context window + 1 ({block_size + 1}); add more text or use a shorter context")
    arrays = {s: np.memmap(folder / f"{s}.bin", dtype=np.uint8, mode="r") for s in SPLITS}
    return Corpus(train=arrays["train"], val=arrays["val"], folder=folder, manifest=manifest)


def windows_to_batch(data: np.ndarray, starts: np.ndarray, block_size: int, device="cpu"):
    """Windows of block_size + 1 bytes at `starts` -> (x, y) int64 (B, T), NUL mapped to EOT."""
    index = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
    window = torch.from_numpy(data[index].astype(np.int64))  # (B, T+1)
    window[window == 0] = tokenizer.EOT
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) each
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows; offsets come from `generator`, so its saved state replays the same batch."""
    assert len(data) > block_size, "load_corpus guarantees a window of block_size + 1"
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    return windows_to_batch(data, starts, block_size, device)


def eval_window_starts(n_bytes: int, block_size: int, count: int) -> np.ndarray:
    """Offsets (int64) of up to `count` windows of block_size + 1 bytes in an array of n_bytes, evenly
    spaced from its start to its end (the last window ends at the last byte), each rounded to the
    nearest byte: the held-out windows every evaluation scores."""
    last = n_bytes - block_size - 1
    if last < 0:
        raise H2QError(f"{n_bytes} bytes hold no window of {block_size + 1}; add text or use a shorter context")
    return np.linspace(0, last, min(count, last + 1)).round().astype(np.int64)


def iter_eval_batches(data: np.ndarray, batch_size: int, block_size: int, max_batches: int,
                      device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to max_batches batches of the evaluation windows (`eval_window_starts`)."""
    starts = eval_window_starts(len(data), block_size, batch_size * max_batches)
    for i in range(0, len(starts), batch_size):
        yield windows_to_batch(data, starts[i:i + batch_size], block_size, device)
