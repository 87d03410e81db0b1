"""Every file format of the package, written atomically as safetensors (never pickle) or JSON.

Every file is written to a temporary name in the same folder, flushed and fsynced, then moved over the
old one with `os.replace`, so a kill at any moment leaves the previous file whole. A checkpoint folder:

* `model.safetensors`: the weights, with metadata `format`, `config` (the ModelConfig as JSON),
  `tokenizer` and `fingerprint`, enough for `load_model` to rebuild the model alone. A quantized
  model (h2q/quant.py) is the same file with canonical integer buffers and `quant`, its scheme as
  JSON, and the fingerprint of the float model it was made from (`save_quantized`);
* `train_state.safetensors` (training runs only): model weights *and* optimizer state and RNG states
  in one file, with the step and data position in its metadata, so resume reads one consistent state.

Every safetensors file records `content_sha256` in its metadata: sha256 over its metadata, tensor
names, dtypes, shapes and bytes. `read_tensors` recomputes it, so flipped bits, a header edited to
another dtype or shape, or a half-copied file are caught on load (files written before the hash
existed load without the check). Loaded weights are also checked against what their config needs:
the same keys, shapes and dtypes, and finite values.

An output folder is locked while a run writes it (`FolderLock`: OUT/.lock, an flock, so a killed
holder frees it), and our own temporary files left there by a kill are removed under that lock
(`remove_stale_temps`): `.NAME.<12 hex>.tmp` from `atomic_write`, `.tmpXXXXXX` from safetensors'
writer; a folder the lock made is removed again if the run left it empty. JSON-lines logs
(`metrics.jsonl`) are appended one whole line at a time and read back with a torn last line left
out (`read_jsonl_lines`).

A LoRA adapter folder (h2q/lora.py), in PEFT's layout: `adapter_model.safetensors` (keys
`layers.0.attn.q_proj.lora_A` / `.lora_B`) and `adapter_config.json` (r, lora_alpha, target_modules,
lora_dropout, use_rslora, plus base_fingerprint and base_model_config, checked by `load_adapter`);
the weights' metadata holds `config_sha256`, the hash of that JSON, so an edited config is caught too.

This module imports the model and the compression modules to rebuild what it reads; they never import
it. Anything wrong with a file the user points at raises `FileFormatError` with one line that says
what to do.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from h2q import quant, tokenizer
from h2q.config import ModelConfig
from h2q.errors import FileFormatError, H2QError
from h2q.kvcache import cache_from_state
from h2q.lora import LoraAdapter, LoraConfig
from h2q.model import Transformer

try:
    import fcntl
except ImportError:  # Windows: FolderLock locks nothing
    fcntl = None

FORMAT = "h2q-model-v1"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
ADAPTER_FORMAT = "h2q-lora-v1"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
CONTENT_HASH = "content_sha256"  # metadata key of the content hash every save_tensors file carries
CONFIG_HASH = "config_sha256"  # in adapter_model.safetensors: the json_hash of its adapter_config.json
LOCK_FILE = ".lock"
# what atomic_write (".NAME.<12 hex>.tmp") and safetensors' own writer (".tmpXXXXXX") leave after a kill
STALE_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp|\.tmp[A-Za-z0-9]{6}")


def _new_temp_file(path: Path) -> tuple[Path, int]:
    """A new empty file beside `path` and its permission bits: 0666 less the process umask, as open()
    makes files. The umask is thus applied by the OS, never read (reading it means setting it)."""
    while True:
        tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp, os.stat(tmp).st_mode & 0o777
        except FileExistsError:  # another writer drew the same name: draw again
            continue


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically. A write that fails (disk
    full, no permission) is a H2QError naming `path`; the previous file stays as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, mode = _new_temp_file(path)
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # writers may replace the file (safetensors makes it 0600)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise H2QError(f"cannot write {path} ({_reason(e)}); {_write_fix(e)} (the previous file, if any, is "
                       f"unchanged)") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _reason(e: Exception) -> str:
    """An OSError's own words ('No space left on device'), or safetensors' message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return "No space left on device" if "StorageFull" in text or "os error 28" in text else text


def _write_fix(e: Exception) -> str:
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space" in _reason(e):
        return "free some disk space and run again"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "fix the folder's permissions or choose another one"
    return "check the path"


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic `safetensors.save_file` with the content hash in the metadata; tensors are made
    contiguous CPU copies, ties are untied."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {k: v for k, v in metadata.items() if k != CONTENT_HASH}
    metadata[CONTENT_HASH] = content_hash(flat, metadata)
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata (less the hash itself), then every tensor's name, dtype, shape and
    bytes, in name order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != CONTENT_HASH}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\n{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return h.hexdigest()


def _check_readable(path: Path, what: str, missing: str | None = None) -> None:
    """A missing (message `missing`), unreadable or non-regular file is a FileFormatError that says
    which."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb"):
                return
    except (FileNotFoundError, NotADirectoryError):
        raise FileFormatError(missing or f"{what} not found: {path}") from None
    except PermissionError:
        raise FileFormatError(f"{what} {path} is not readable (permission denied); fix its permissions "
                              f"(chmod u+r)") from None
    except OSError as e:
        raise FileFormatError(f"{what} {path} is unreadable ({e.strerror}); restore it") from None
    raise FileFormatError(f"{what} {path} is not a file; give the file itself")


def read_metadata(path: str | Path, what: str = "checkpoint", fix: str = "restore it or retrain") -> dict:
    """A safetensors file's metadata alone (its tensors are neither read nor verified); `fix` ends the
    error line of an unreadable file."""
    path = Path(path)
    _check_readable(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{what} {path} is unreadable or corrupt ({e}); {fix}") from None


def read_tensors(path: str | Path, what: str = "checkpoint", fix: str = "restore it from a copy or retrain",
                 require_hash: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file and verify its content hash (when it has one; with `require_hash` a
    file without one is refused too); a missing, truncated, corrupt or altered file is a
    FileFormatError whose line ends in `fix`."""
    path = Path(path)
    metadata = read_metadata(path, what, fix)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{what} {path} is unreadable or corrupt ({e}); {fix}") from None
    if require_hash and CONTENT_HASH not in metadata:
        raise FileFormatError(f"{what} {path} carries no content hash ({CONTENT_HASH}), so it cannot be "
                              f"verified; {fix}")
    if CONTENT_HASH in metadata and content_hash(tensors, metadata) != metadata[CONTENT_HASH]:
        raise FileFormatError(f"{what} {path} is corrupt: its content does not match the hash it was saved "
                              f"with; {fix}")
    return tensors, metadata


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path, fix: str,
                  finite: bool = True) -> None:
    """`tensors` must have exactly `expected`'s keys, shapes and dtypes (and, with `finite`, finite
    float values), else a FileFormatError naming `path` and ending in `fix` (what to do)."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise FileFormatError(f"{path} does not match what it should hold (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); {fix}")
    for k, want in expected.items():
        got = tensors[k]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise FileFormatError(f"{path}: {k} is {str(got.dtype).removeprefix('torch.')} {tuple(got.shape)}, "
                                  f"it should be {str(want.dtype).removeprefix('torch.')} {tuple(want.shape)}; {fix}")
        # a float64 sum of float32/bf16 values cannot overflow: it is finite iff every value is
        if finite and got.is_floating_point() and not bool(torch.isfinite(got.sum(dtype=torch.float64))):
            raise FileFormatError(f"{path}: {k} holds nan or inf values; {fix}")


# -- output folders: one writer at a time, no stale temporary files ------------------------------------
def ensure_folder(folder: str | Path, flag: str) -> Path:
    """`folder`, made if missing; a file in its place, or a path that cannot be made, is a H2QError
    naming `flag` (the option the user gave it with)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise H2QError(f"{flag} {folder} is a file, not a folder; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise H2QError(f"{flag} {folder} cannot be made ({e.strerror}); choose a folder you can write") from None
    return folder


class FolderLock:
    """An exclusive lock on an output folder while one run writes it: OUT/.lock, locked with flock
    and holding the holder's pid. A second run gets a H2QError naming that pid (or, with wait=True,
    waits its turn). The OS frees the lock of a killed holder, so a stale lock file is simply taken
    over. Released (and the file removed) by `release()` or at the end of a `with` block; a folder
    the lock made is removed too if the run left it empty (a run refused at its start leaves no trace).
    On a system without fcntl (Windows) nothing is locked."""

    def __init__(self, folder: str | Path, flag: str, wait: bool = False):
        self.made = not Path(folder).exists()
        self.folder = ensure_folder(folder, flag)
        self.path, self.fd = self.folder / LOCK_FILE, None
        if fcntl is None:
            return
        while self.fd is None:
            ensure_folder(self.folder, flag)  # a holder that made it may have removed it, empty, on release
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise H2QError(f"{flag} {self.folder} is not writable ({e.strerror}); choose a folder you can "
                               f"write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise H2QError(f"{flag} {self.folder} is in use by another run (pid {holder}); wait for it to "
                               f"finish or choose another {flag}") from None
            try:  # the last holder may have removed the file after we opened it: lock the one in place
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter then sees another file
            if self.made:
                with contextlib.suppress(OSError):  # not empty: the run wrote something
                    self.folder.rmdir()
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def remove_stale_temps(folder: str | Path) -> list[str]:
    """Remove our temporary files that a killed writer left in `folder` (call it holding the
    folder's lock, so no live writer owns them); returns their names."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if STALE_TEMP.fullmatch(p.name) and p.is_file()] if folder.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return [p.name for p in found]


# -- JSON-lines logs ------------------------------------------------------------------------------------
def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON object as one line, written in one call (a kill or a full disk can tear only
    the last line, which `read_jsonl_lines` leaves out)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise H2QError(f"cannot write {path} ({_reason(e)}); {_write_fix(e)}") from None


def read_jsonl_lines(path: str | Path) -> list[tuple[str, dict]]:
    """(line, record) of a JSON-lines log. A last line without its newline is a record still being
    appended (by a live or killed run) and is left out; any other broken line is a H2QError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise H2QError(f"{path} is unreadable ({e}); restore it or delete it") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise H2QError(f"{path} line {number} is not JSON; repair or delete that line") from None
        if not isinstance(record, dict):
            raise H2QError(f"{path} line {number} is not a JSON object; repair or delete that line")
        records.append((line, record))
    return records


# -- models ------------------------------------------------------------------------------------------
def model_metadata(config: ModelConfig, **extra: str) -> dict[str, str]:
    return {"format": FORMAT, "config": json.dumps(config.to_dict()), "tokenizer": tokenizer.NAME, **extra}


def config_from_metadata(metadata: dict, path) -> ModelConfig:
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise FileFormatError(f"{path} is not an h2q model checkpoint (no '{FORMAT}' metadata)")
    if metadata.get("tokenizer", tokenizer.NAME) != tokenizer.NAME:
        raise FileFormatError(f"{path} uses tokenizer {metadata['tokenizer']!r}, this h2q reads {tokenizer.NAME!r}")
    try:
        return ModelConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError) as e:
        raise FileFormatError(f"{path} has an invalid model config: {e}") from None


def save_model(ckpt_dir: str | Path, model: Transformer, **extra_metadata: str) -> Path:
    """Write ckpt_dir/model.safetensors for a float model and record its (fresh) fingerprint."""
    assert model.quant_scheme is None, "a quantized model is written by save_quantized"
    path = Path(ckpt_dir) / MODEL_FILE
    model.fingerprint = None  # weights may have changed since the last save
    model.fingerprint = model.base_fingerprint()
    save_tensors(path, model.state_dict(), model_metadata(model.config, fingerprint=model.fingerprint,
                                                          **extra_metadata))
    return path


def save_quantized(out_dir: str | Path, model: Transformer, base_metadata: dict | None = None) -> Path:
    """Write out_dir/model.safetensors for a model from h2q.quant.quantize (or h2q.gptq.quantize):
    canonical quantized tensors; the float checkpoint's metadata (format, config, tokenizer,
    fingerprint, ...) plus `quant`."""
    assert model.quant_scheme is not None, "save_quantized needs a quantized model"
    meta = {**(base_metadata or {}), **model_metadata(model.config, fingerprint=model.base_fingerprint()),
            "quant": model.quant_scheme.to_json()}
    path = Path(out_dir) / MODEL_FILE
    save_tensors(path, model.state_dict(), meta)
    return path


def resolve_model_file(ckpt: str | Path) -> Path:
    """A checkpoint folder or a .safetensors file -> the model file inside."""
    ckpt = Path(ckpt)
    return ckpt / MODEL_FILE if ckpt.is_dir() or not ckpt.suffix else ckpt


def load_model(ckpt: str | Path, device="cpu") -> tuple[Transformer, dict]:
    """Rebuild the model from a checkpoint folder (or model file) alone, float or quantized, on
    `device` (int4 weights come in the CPU kernel's layout there); returns (model, metadata)."""
    path = resolve_model_file(ckpt)
    if not path.exists():
        raise FileFormatError(f"no model checkpoint at {path}; run `python train.py` first")
    tensors, metadata = read_tensors(path, "model checkpoint")
    model = Transformer(config_from_metadata(metadata, path))
    if "quant" in metadata:  # empty quantized modules to load into
        quant.prepare_quantized(model, quant.QuantScheme.from_json(metadata["quant"], path))
    model.to(device)  # before loading: quantized modules take their layout for this device as they load
    load_weights(model, tensors, path)
    model.fingerprint = metadata.get("fingerprint")
    return model.eval(), metadata


def load_weights(model: Transformer, tensors: dict[str, torch.Tensor], path) -> None:
    """Load `tensors` into `model` once they are what its config needs: keys, shapes, dtypes, finite."""
    check_tensors(tensors, model.state_dict(), path, "restore it from a copy or retrain")
    model.load_state_dict(tensors)


# -- LoRA adapters -----------------------------------------------------------------------------------
def save_adapter(out_dir: str | Path, adapter: LoraAdapter, base_model: Transformer) -> Path:
    """Write adapter_model.safetensors and adapter_config.json into `out_dir` (atomically each),
    recording `base_model`'s fingerprint and config."""
    if adapter.merged:
        raise ValueError("unmerge the adapter before saving it (the base weights hold it now)")
    out_dir = Path(out_dir)
    base_fp = base_model.base_fingerprint()
    config = adapter.config
    config_json = {"format": ADAPTER_FORMAT, "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha,
                   "target_modules": list(config.target_names), "lora_dropout": config.dropout,
                   "use_rslora": config.rslora, "base_fingerprint": base_fp,
                   "base_model_config": adapter.base_config.to_dict()}
    save_tensors(out_dir / ADAPTER_FILE, adapter.tensors(), {"format": ADAPTER_FORMAT, "base_fingerprint": base_fp,
                                                             CONFIG_HASH: json_hash(config_json)})
    atomic_write_json(out_dir / ADAPTER_CONFIG_FILE, config_json)
    return out_dir


def json_hash(obj) -> str:
    """sha256 of a JSON value as canonical text (sorted keys): equal for equal values, whatever the layout."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def load_adapter(adapter_dir: str | Path, base_model: Transformer, device=None,
                 check_fingerprint: bool = True) -> LoraAdapter:
    """Read an adapter saved by `save_adapter` for `base_model` (put on `device`, default the
    model's). A base of another shape always fails; another fingerprint fails unless
    check_fingerprint=False (e.g. fine-tuning on a copy whose weights were changed on purpose)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    _check_readable(config_path, "adapter config", missing=f"no LoRA adapter in {adapter_dir} (missing "
                    f"{ADAPTER_CONFIG_FILE}); train one with --lora-rank")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"it holds a JSON {type(meta).__name__}, not an object")
        config = LoraConfig(r=int(meta["r"]), alpha=float(meta["lora_alpha"]), dropout=float(meta["lora_dropout"]),
                            targets=",".join(meta["target_modules"]), rslora=bool(meta["use_rslora"]))
        base_config = ModelConfig.from_dict(meta["base_model_config"])
    except KeyError as e:
        raise FileFormatError(f"{config_path} is not a valid h2q adapter config (no {e} key); re-save the "
                              f"adapter") from None
    except (ValueError, TypeError, AttributeError, H2QError) as e:
        raise FileFormatError(f"{config_path} is not a valid h2q adapter config ({e}); re-save the adapter") from None
    tensors, weights_meta = read_tensors(adapter_dir / ADAPTER_FILE, "adapter weights")
    if CONFIG_HASH in weights_meta and weights_meta[CONFIG_HASH] != json_hash(meta):
        raise FileFormatError(f"{config_path} is not the config {ADAPTER_FILE} was saved with (edited or damaged); "
                              f"restore it from a copy or re-save the adapter")
    if base_config != base_model.config:
        diff = ", ".join(f"{k} {v} vs {getattr(base_model.config, k)}" for k, v in base_config.to_dict().items()
                         if getattr(base_model.config, k) != v)
        raise FileFormatError(f"adapter {adapter_dir} was made for another base shape ({diff}); "
                              f"load it onto its own base")
    if check_fingerprint and meta.get("base_fingerprint") != base_model.base_fingerprint():
        raise FileFormatError(f"adapter {adapter_dir} was trained on base {meta.get('base_fingerprint')}, not this "
                              f"base {base_model.base_fingerprint()}; load it with the base it was trained on")
    adapter = LoraAdapter(base_model.config, config, init=False)
    expected = adapter.tensors()
    check_tensors(tensors, expected, adapter_dir / ADAPTER_FILE, "re-save or retrain the adapter")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k])
    return adapter.to(device if device is not None else base_model.embed.weight.device)


# -- KV caches: a conversation's text and the cache that holds it ------------------------------------
CACHE_FORMAT = "h2q-kvcache-v1"
_CACHE_FIX = "delete it and save the conversation again"


def adapter_fingerprint(adapters) -> str:
    """What `adapters` (h2q/lora.py) adds to the base, as 16 hex digits of sha256 over its config and
    tensors ('none' for None); a bound bank also by each row's slot (-1: the base alone)."""
    if adapters is None:
        return "none"
    module, rows = adapters, None
    if hasattr(adapters, "bank"):  # lora.BoundBank
        module = adapters.bank
        rows = torch.where(adapters.row_scale.view(-1) != 0, adapters.rows, -1).tolist()
    h = hashlib.sha256(json.dumps([repr(module.config), rows]).encode())
    for p in module.parameters():
        h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _weights_identity(model: Transformer) -> str:
    return model.quant_scheme.to_json() if model.quant_scheme is not None else "float"


def save_cache(path: str | Path, cache, model: Transformer, text_ids=None, adapters=None,
               extra: dict | None = None) -> Path:
    """Write a KV cache (h2q/kvbase.py `state_dict`; None: the text alone, for a conversation whose
    cache is to be rebuilt) as one safetensors file, atomically: tensors `cache.NAME`, `text_ids`
    (int32, the text the cache was made from, if given) and `extra.KEY` for tensor values of
    `extra`; metadata: the cache's policy, options, sizes and counters, the model's config, base
    fingerprint and weights (float or its quantization scheme), the identity of `adapters`
    (`adapter_fingerprint`) and the other `extra` values as JSON; `save_tensors` adds the content hash
    of it all, which `read_cache_file` requires."""
    if getattr(cache, "prefix", None) is not None:
        raise H2QError("this cache reads a shared prefix, which is not saved with it; save a cache of its own")
    state = cache.state_dict() if cache is not None else None
    tensors = {f"cache.{name}": t for name, t in state.pop("tensors").items()} if state is not None else {}
    if text_ids is not None:
        ids = tensors["text_ids"] = torch.as_tensor(list(text_ids), dtype=torch.int32)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) <= tokenizer.PAD:
            raise H2QError(f"text ids must be token ids 0..{tokenizer.PAD}")
    extra = dict(extra or {})
    tensors.update({f"extra.{key}": extra.pop(key) for key in [k for k, v in extra.items() if torch.is_tensor(v)]})
    try:
        extra_json = json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise H2QError(f"extra values of a saved cache must be JSON or tensors ({e})") from None
    metadata = {"format": CACHE_FORMAT, "cache": json.dumps(state), "config": json.dumps(model.config.to_dict()),
                "tokenizer": tokenizer.NAME, "base_fingerprint": model.base_fingerprint(),
                "weights": _weights_identity(model), "adapter": adapter_fingerprint(adapters), "extra": extra_json}
    path = Path(path)
    save_tensors(path, tensors, metadata)
    return path


def read_cache_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A file of `save_cache`, checked (format, content hash, metadata, text ids) but not yet matched to a
    model -> (tensors, info: cache (the state without tensors, or None), config, tokenizer,
    base_fingerprint, weights, adapter, extra (JSON values and tensors), text_ids). A session may read
    `info` first to pick the adapter or quantization the cache was made with."""
    path = Path(path)
    if read_metadata(path, "KV cache file", _CACHE_FIX).get("format") != CACHE_FORMAT:
        raise FileFormatError(f"{path} is not an h2q KV cache file (no '{CACHE_FORMAT}' metadata); save one "
                              f"with checkpoint.save_cache (the REPL's /save)")
    tensors, metadata = read_tensors(path, "KV cache file", _CACHE_FIX, require_hash=True)
    try:
        info = {k: metadata[k] for k in ("tokenizer", "base_fingerprint", "weights", "adapter")}
        info.update({k: json.loads(metadata[k]) for k in ("cache", "config", "extra")})
        info["config"] = ModelConfig.from_dict(info["config"])
    except (KeyError, ValueError, TypeError, AttributeError, H2QError) as e:
        raise FileFormatError(f"KV cache file {path} has unreadable metadata ({e}); save it again") from None
    if not isinstance(info["cache"], (dict, type(None))) or not isinstance(info["extra"], dict):
        raise FileFormatError(f"KV cache file {path} has malformed metadata; save it again")
    ids = tensors.get("text_ids", torch.zeros(0, dtype=torch.int32))
    unknown = [k for k in tensors if not k.startswith(("cache.", "extra.")) and k != "text_ids"]
    in_range = ids.numel() == 0 or (0 <= int(ids.min()) and int(ids.max()) <= tokenizer.PAD)
    if unknown or ids.dim() != 1 or ids.dtype != torch.int32 or not in_range:
        raise FileFormatError(f"KV cache file {path} holds unexpected tensors or text ids; save it again")
    if info["cache"] is None and any(k.startswith("cache.") for k in tensors):
        raise FileFormatError(f"KV cache file {path} holds cache tensors but no cache state; save it again")
    info["extra"].update({k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")})
    info["text_ids"] = ids.tolist()
    return tensors, info


def load_cache(path: str | Path, model: Transformer, adapters=None, device=None) -> tuple[object, list[int], dict]:
    """Read a file of `save_cache` for `model` (with `adapters`, as when it was saved) -> (the cache on
    `device`, default the model's, or None if only the text was saved; the text ids; meta: policy,
    options, batch_size, max_len, dtype, counters (empty without a cache), adapter, extra). A file that
    is not such a cache, is corrupt, or was made on another base, other weights or another adapter
    raises FileFormatError naming it."""
    path = Path(path)
    tensors, info = read_cache_file(path)
    if info["config"] != model.config or info["tokenizer"] != tokenizer.NAME:
        raise FileFormatError(f"KV cache file {path} was made for another base shape ({info['config']}); "
                              f"load it with its own base")
    if info["base_fingerprint"] != model.base_fingerprint():
        raise FileFormatError(f"KV cache file {path} was made on base {info['base_fingerprint']}, not this "
                              f"base {model.base_fingerprint()}; load it with its own base")
    if info["weights"] != _weights_identity(model):
        raise FileFormatError(f"KV cache file {path} was made with other weights ({info['weights']}) than "
                              f"the model in use ({_weights_identity(model)}); use the same quantization")
    if info["adapter"] != adapter_fingerprint(adapters):
        raise FileFormatError(f"KV cache file {path} was made with adapter {info['adapter']}, the model "
                              f"in use has {adapter_fingerprint(adapters)}; load the same adapter first")
    state, cache = info["cache"], None
    if state is not None:
        state["tensors"] = {k.removeprefix("cache."): v for k, v in tensors.items() if k.startswith("cache.")}
        try:
            device = device if device is not None else model.embed.weight.device
            cache = cache_from_state(state, model.config, device)
        except H2QError as e:
            raise FileFormatError(f"KV cache file {path}: {e}") from None
    meta = {k: v for k, v in (state or {}).items() if k != "tensors"}
    return cache, info["text_ids"], {**meta, "adapter": info["adapter"], "extra": info["extra"]}
