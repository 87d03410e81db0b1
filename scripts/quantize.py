"""Quantize a float checkpoint: `python scripts/quantize.py --ckpt checkpoints/base --mode int4 --group-size 64
--out checkpoints/base-int4`.

Writes OUT/model.safetensors with the packed weights and scales; its metadata is the float model's
(config, tokenizer, fingerprint, ...) plus `quant`, the scheme. `h2q.checkpoint.load_model(OUT)` loads
it like any checkpoint. With --gptq, calibration batches come from the training split of --data-dir
(default: the default corpus). The work happens in h2q/quant.py (and h2q/gptq.py); h2q/checkpoint.py
writes the file.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from h2q import checkpoint, gptq, quant  # noqa: E402
from h2q.cli import Parser, add_dataclass_flags, dataclass_from_args, run_main  # noqa: E402
from h2q.errors import H2QError  # noqa: E402


def calibration_batches(data_dir, context_len: int, batches: int, batch_size: int, seq_len: int | None, seed: int):
    """`batches` random (batch_size, seq_len) windows of the training split, for GPTQ."""
    from h2q.data import get_batch, load_corpus
    seq_len = min(seq_len or context_len, context_len)
    corpus = load_corpus(data_dir, seq_len)
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(corpus.train, batch_size, seq_len, generator)[0] for _ in range(batches)]


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
    if Path(args.out).resolve() == Path(args.ckpt).resolve():
        raise H2QError(f"--out {args.out} is the float checkpoint itself; choose another folder")
    if args.calib_batches < 1 or args.calib_batch_size < 1:
        raise H2QError("--calib-batches and --calib-batch-size must be at least 1")

    model, metadata = checkpoint.load_model(args.ckpt, "cpu")
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
    path = checkpoint.save_quantized(args.out, model, metadata)
    size = quant.model_bytes(model)
    print(f"{args.ckpt} -> {path}: {quant.describe(model)}, {float_bytes / 1e6:.2f} MB -> {size / 1e6:.2f} MB "
          f"({float_bytes / size:.2f}x smaller) in {seconds:.1f} s; fingerprint {model.fingerprint} kept")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
