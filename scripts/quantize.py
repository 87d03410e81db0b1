"""Quantize a float checkpoint: `python scripts/quantize.py --ckpt checkpoints/base --mode int4 --group-size 64
--out checkpoints/base-int4`.

Writes OUT/model.safetensors with the packed weights and scales; its metadata is the float model's
(config, tokenizer, fingerprint, ...) plus `quant`, the scheme. `h2q.checkpoint.load_model(OUT)` loads
it like any checkpoint. With --gptq, calibration batches come from the training split of --data-dir
(default: the default corpus). The work happens in h2q/quant.py (and h2q/gptq.py); h2q/checkpoint.py
writes the file.

OUT is locked while it is written and never replaces a file of another kind: the float checkpoint
itself (given as a folder or as its model.safetensors), a float model, a training or evolve run, or
a quantized model of another float model; a quantized model of the same float model is replaced.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from h2q import checkpoint, gptq, quant
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, run_main
from h2q.errors import ConfigError, FileFormatError, H2QError
from h2q.perf import device_memory


def calibration_batches(data_dir, context_len: int, batches: int, batch_size: int, seq_len: int | None, seed: int):
    """`batches` random (batch_size, seq_len) windows of the training split, for GPTQ."""
    from h2q.data import get_batch, load_corpus
    seq_len = min(seq_len or context_len, context_len)
    corpus = load_corpus(data_dir, seq_len)
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(corpus.train, batch_size, seq_len, generator)[0] for _ in range(batches)]


def check_calibration_flags(args) -> None:
    """Positive sizes, a 63-bit seed, and calibration windows that fit in memory."""
    for name in ("calib_batches", "calib_batch_size", "calib_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError("seed", f"must be >= 0 and < 2^63, got {args.seed}")
    window_bytes = args.calib_batches * args.calib_batch_size * (args.calib_len or 1) * 8  # int64 ids, all held
    memory = device_memory(torch.device("cpu"))  # the windows are held on the host
    if args.gptq and memory and window_bytes > memory:
        raise ConfigError("calib_batches", f"x --calib-batch-size x --calib-len needs {window_bytes / 2**30:,.1f} GiB "
                                           f"of windows, more than this machine's {memory / 2**30:,.1f} GiB; lower them")


def check_out(ckpt: Path, out: Path) -> dict:
    """Refuse an --out that would replace a file of another kind; returns the metadata of the quantized
    model it will replace ({} when there is none)."""
    source, target = checkpoint.resolve_model_file(ckpt), out / checkpoint.MODEL_FILE
    if out.exists() and not out.is_dir():
        raise H2QError(f"--out {out} is a file, not a folder; give a folder for the quantized checkpoint")
    if out.resolve() == source.parent.resolve() or (target.exists() and source.exists()
                                                    and os.path.samefile(target, source)):
        raise H2QError(f"--out {out} would overwrite the float checkpoint {source}; choose another folder")
    for name, what in ((checkpoint.STATE_FILE, "a training run"), (checkpoint.ADAPTER_FILE, "a LoRA adapter"),
                       ("state/evolve_state.safetensors", "an evolve run")):
        if (out / name).exists():
            raise H2QError(f"--out {out} holds {what}; choose another folder for the quantized checkpoint")
    if not target.exists():
        return {}
    try:
        existing = checkpoint.read_metadata(target, "model checkpoint")
    except FileFormatError:
        return {}  # an unreadable file of that name: replaced
    if "quant" not in existing:
        raise H2QError(f"--out {out} holds a float model checkpoint; choose another folder for the quantized one")
    return existing


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="checkpoints/base",
                        help="float checkpoint folder (default: checkpoints/base)")
    parser.add_argument("--out", required=True, help="folder for the quantized checkpoint")
    add_dataclass_flags(parser, quant.QuantScheme, "scheme")
    calib = parser.add_argument_group("GPTQ calibration (with --gptq)")
    calib.add_argument("--data-dir", default=None, help="text folder (default: the default corpus)")
    calib.add_argument("--calib-batches", type=int, default=16, help="calibration batches (default: 16)")
    calib.add_argument("--calib-batch-size", type=int, default=8, help="windows per batch (default: 8)")
    calib.add_argument("--calib-len", type=int, default=None, help="window length (default: the context)")
    calib.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    args = parser.parse_args(argv)
    scheme = dataclass_from_args(quant.QuantScheme, args)
    check_calibration_flags(args)
    replaced = check_out(Path(args.ckpt), Path(args.out))

    model, metadata = checkpoint.load_model(args.ckpt, "cpu")
    if replaced.get("fingerprint") not in (None, metadata.get("fingerprint")):
        raise H2QError(f"--out {args.out} holds a quantized model of another float model (fingerprint "
                       f"{replaced['fingerprint']}, --ckpt is {metadata.get('fingerprint')}); choose another folder")
    float_bytes = quant.model_bytes(model)
    calibration = None
    if scheme.gptq:
        calibration = calibration_batches(args.data_dir, model.config.context_len, args.calib_batches,
                                          args.calib_batch_size, args.calib_len, args.seed)
    start = time.perf_counter()
    options = dict(mode=scheme.mode, group_size=scheme.group_size, clip_search=scheme.clip_search,
                   embedding=scheme.embedding)
    if calibration is not None:
        gptq.quantize(model, calibration, **options)
    else:
        quant.quantize(model, **options)
    seconds = time.perf_counter() - start
    with checkpoint.FolderLock(args.out, "--out"):
        checkpoint.remove_stale_temps(args.out)
        path = checkpoint.save_quantized(args.out, model, metadata)
    size = quant.model_bytes(model)
    print(f"{args.ckpt} -> {path}: {quant.describe(model)}, {float_bytes / 1e6:.2f} MB -> {size / 1e6:.2f} MB "
          f"({float_bytes / size:.2f}x smaller) in {seconds:.1f} s; fingerprint {model.fingerprint} kept")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
