"""Atomic safetensors I/O for models and training state; never pickle.

Every file is written to a temporary name in the same folder, flushed and fsynced, then moved over the
old one with `os.replace`, so a kill at any moment leaves the previous file whole. A checkpoint folder:

* `model.safetensors`: the weights, with metadata `format`, `config` (the ModelConfig as JSON) and
  `tokenizer`, enough for `load_model` to rebuild the model alone;
* `train_state.safetensors` (training runs only): model weights *and* optimizer state and RNG states
  in one file, with the step and data position in its metadata, so resume reads one consistent state.

Anything wrong with a file the user points at raises `H2QError` with one line that says what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from h2q import tokenizer
from h2q.config import ModelConfig
from h2q.errors import H2QError
from h2q.model import Transformer

FORMAT = "h2q-model-v1"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic `safetensors.save_file`; tensors are made contiguous CPU copies, ties are untied."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def read_tensors(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file; a missing, truncated or corrupt file is a H2QError."""
    path = Path(path)
    if not path.is_file():
        raise H2QError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise H2QError(f"{what} {path} is unreadable or corrupt ({e}); restore it or retrain") from None


def model_metadata(config: ModelConfig, **extra: str) -> dict[str, str]:
    return {"format": FORMAT, "config": json.dumps(config.to_dict()), "tokenizer": tokenizer.NAME, **extra}


def config_from_metadata(metadata: dict, path) -> ModelConfig:
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise H2QError(f"{path} is not an h2q model checkpoint (no '{FORMAT}' metadata)")
    if metadata.get("tokenizer", tokenizer.NAME) != tokenizer.NAME:
        raise H2QError(f"{path} uses tokenizer {metadata['tokenizer']!r}, this h2q reads {tokenizer.NAME!r}")
    try:
        return ModelConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError) as e:
        raise H2QError(f"{path} has an invalid model config: {e}") from None


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def fingerprint(model: Transformer) -> str:
    """Identity of a base model: sha256 over its config and float weights, 16 hex digits. Adapters
    record it; a quantized copy keeps the fingerprint of the float model it was made from."""
    if getattr(model, "fingerprint", None):
        return model.fingerprint
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(ckpt_dir: str | Path, model: Transformer, **extra_metadata: str) -> Path:
    path = Path(ckpt_dir) / MODEL_FILE
    model.fingerprint = None  # weights may have changed since the last save
    model.fingerprint = fingerprint(model)
    meta = model_metadata(model.config, fingerprint=model.fingerprint, **extra_metadata)
    save_tensors(path, model_state(model), meta)
    return path


def resolve_model_file(ckpt: str | Path) -> Path:
    """A checkpoint folder or a .safetensors file -> the model file inside."""
    ckpt = Path(ckpt)
    return ckpt / MODEL_FILE if ckpt.is_dir() or not ckpt.suffix else ckpt


def load_model(ckpt: str | Path, device="cpu") -> tuple[Transformer, dict]:
    """Rebuild the model from a checkpoint folder (or model file) alone; returns (model, metadata)."""
    path = resolve_model_file(ckpt)
    if not path.exists():
        raise H2QError(f"no model checkpoint at {path}; run `python train.py` first")
    tensors, metadata = read_tensors(path, "model checkpoint")
    model = Transformer(config_from_metadata(metadata, path))
    if "quant" in metadata:  # a quantized checkpoint: swap in empty quantized modules (lazy: quant imports us)
        from h2q.quant import prepare_quantized
        prepare_quantized(model, metadata["quant"], path)
    load_weights(model, tensors, path)
    model.fingerprint = metadata.get("fingerprint")
    return model.to(device).eval(), metadata


def load_weights(model: Transformer, tensors: dict[str, torch.Tensor], path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise H2QError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise H2QError(f"{path}: tensor {k} has shape {tuple(v.shape)}, config needs {tuple(expected[k].shape)}")
    model.load_state_dict(tensors)
