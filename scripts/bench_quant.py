"""Benchmark weight quantization: `python scripts/bench_quant.py [--ckpt CKPT | --random --preset small] [--quick]`.

For the float model and each setting (int8, int4 with group 32/64/128, each with and without clip search,
optionally the int8 embedding and GPTQ), on the validation split: bytes of all weights held, validation
bits per byte and its change against fp32, and greedy decode tokens/s at batch 1 and batch 20 (best of 3; with
h2q/kvcache.py's full cache; without it, each step recomputes the window). Two more rows turn the CPU
kernels off (dequantize + F.linear) to show what they buy. Targets are printed beside the measurements.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from h2q import checkpoint, data, gptq, quant
from h2q.cli import resolve_device, run_main
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.model import Transformer
from h2q.train import TrainConfig, evaluate

try:
    from h2q.kvcache import make_cache
except ImportError:
    make_cache = None

INT8_MAX_BPB, INT8_MIN_RATIO = 0.5, 3.9  # % worse, times smaller
INT4_MAX_BPB, INT4_MIN_RATIO = 3.0, 6.0


def settings(group_sizes, with_gptq: bool):
    """(label, quantize kwargs or None for fp32, kernels on)."""
    rows = [("fp32", None, True),
            ("int8 rtn", dict(mode="int8", clip_search=False), True),
            ("int8", dict(mode="int8"), True),
            ("int8 +emb", dict(mode="int8", embedding=True), True)]
    for g in group_sizes:
        rows += [(f"int4 g{g} rtn", dict(mode="int4", group_size=g, clip_search=False), True),
                 (f"int4 g{g}", dict(mode="int4", group_size=g), True)]
    main_group = 64 if 64 in group_sizes else group_sizes[0]
    rows += [(f"int4 g{main_group} +emb", dict(mode="int4", group_size=main_group, embedding=True), True)]
    if with_gptq:
        rows += [("int8 gptq", dict(mode="int8", gptq=True), True)]
        rows += [(f"int4 g{g} gptq", dict(mode="int4", group_size=g, gptq=True), True) for g in group_sizes]
    rows += [("int8 no-kernel", dict(mode="int8"), False),
             (f"int4 g{main_group} no-kernel", dict(mode="int4", group_size=main_group), False)]
    return rows


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> float:
    """Greedy decode of `new_tokens` after `prompt` (B, P), the best of `repeats` runs (the cores are
    shared); the prefill is not timed."""
    return max(_decode_once(model, prompt, new_tokens) for _ in range(repeats))


def _decode_once(model, prompt: torch.Tensor, new_tokens: int) -> float:
    B, P = prompt.shape
    cfg = model.config
    with torch.inference_mode():
        cache = make_cache("full", cfg, B, P + new_tokens, prompt.device, torch.float32) if make_cache else None
        ids = prompt
        logits = model(prompt, cache=cache)[:, -1]  # (B, V)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = logits.argmax(-1, keepdim=True)  # (B, 1)
            if cache is not None:
                logits = model(token, cache=cache)[:, -1]
            else:
                ids = torch.cat((ids, token), 1)[:, -cfg.context_len:]  # (B, <= context)
                logits = model(ids)[:, -1]
        return B * new_tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="checkpoints/base", help="float checkpoint (default: checkpoints/base)")
    parser.add_argument("--random", action="store_true", help="benchmark an untrained model of --preset instead")
    parser.add_argument("--preset", default="small", choices=list(PRESETS),
                        help="preset for --random (default: small)")
    parser.add_argument("--data-dir", default=None, help="text folder (default: the default corpus)")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per validation batch (default: 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timing (default: 64)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt bytes before decoding (default: 32)")
    parser.add_argument("--gptq", action="store_true", help="add GPTQ rows (calibrated on the train split)")
    parser.add_argument("--calib-batches", type=int, default=8, help="GPTQ calibration batches (default: 8)")
    parser.add_argument("--quick", action="store_true", help="2 validation batches of 4, 8 decoded tokens")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)
    if args.quick:
        args.eval_batches, args.batch_size, args.new_tokens, args.calib_batches = 2, 4, 8, 2
    device = resolve_device(args.device)

    if args.random:
        torch.manual_seed(0)
        base = Transformer(PRESETS[args.preset]).eval()
        print(f"untrained random {args.preset} model: its numbers say nothing about a trained model's sensitivity")
    else:
        if not checkpoint.resolve_model_file(args.ckpt).exists():
            raise H2QError(f"no checkpoint at {args.ckpt}; train one (python train.py) "
                            f"or pass --random --preset small")
        base, _ = checkpoint.load_model(args.ckpt)
        if quant.quant_scheme(base) is not None:
            raise H2QError(f"{args.ckpt} is already quantized; point --ckpt at the float model")
    cfg = base.config
    corpus = data.load_corpus(args.data_dir, cfg.context_len, log=lambda *a: None)
    eval_cfg = TrainConfig(batch_size=args.batch_size, eval_batches=args.eval_batches)
    prompt = torch.as_tensor(corpus.val[:args.prompt_len].astype("int64")).unsqueeze(0)  # (1, P)
    prompt = prompt.masked_fill(prompt == 0, 256).to(device)  # NUL separates documents: EOT
    calibration = None
    if args.gptq:
        generator = torch.Generator().manual_seed(0)
        calibration = [data.get_batch(corpus.train, args.batch_size, cfg.context_len, generator)[0]
                       for _ in range(args.calib_batches)]
    group_sizes = [g for g in quant.GROUP_SIZES if all(
        m.in_features % g == 0 for m in base.modules() if isinstance(m, torch.nn.Linear))]
    if not group_sizes:
        raise H2QError(f"no int4 group size of {quant.GROUP_SIZES} divides this model's layers")
    decode = "KV cache" if make_cache else "no KV cache"
    print(f"{args.ckpt if not args.random else 'random ' + args.preset}: {base.num_params():,} parameters, "
          f"val {args.eval_batches}x{args.batch_size}x{cfg.context_len} bytes, decode {args.new_tokens} tokens "
          f"({decode}), {torch.get_num_threads()} threads, {device}")
    print(f"{'setting':<20}{'MB':>8}{'smaller':>9}{'val bpb':>10}{'change':>9}{'tok/s b1':>10}{'tok/s b20':>11}"
          f"{'quantize s':>12}")
    results = {}
    for label, kwargs, kernels in settings(group_sizes, args.gptq):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if kwargs is not None:
            kwargs = dict(kwargs)
            if kwargs.pop("gptq", False):
                gptq.quantize(model, calibration, **kwargs)
            else:
                quant.quantize(model, **kwargs)
            quant.use_kernels(model, kernels)
        seconds = time.perf_counter() - start
        model = model.to(device)
        bpb = evaluate(model, corpus.val, eval_cfg, cfg.context_len, device, contextlib.nullcontext()) / math.log(2)
        speeds = [decode_tokens_per_s(model, prompt.expand(B, -1), args.new_tokens) for B in (1, 20)]
        size = quant.model_bytes(model)
        fp32 = results.get("fp32", dict(bytes=size, bpb=bpb))
        change = 100 * (bpb / fp32["bpb"] - 1)
        results[label] = dict(bytes=size, bpb=bpb, change=change, ratio=fp32["bytes"] / size, speeds=speeds)
        print(f"{label:<20}{size / 1e6:>8.2f}{fp32['bytes'] / size:>8.2f}x{bpb:>10.4f}{change:>+8.2f}%"
              f"{speeds[0]:>10.1f}{speeds[1]:>11.1f}{seconds:>12.1f}", flush=True)
    report_targets(results)
    return 0


def report_targets(results: dict) -> None:
    def line(what, measured, ok):
        print(f"  {what:<52}{measured:<32}{'ok' if ok else 'MISS'}")

    print("targets (measured):")
    fp32, int8 = results["fp32"], results["int8"]
    line(f"int8: val bpb <= +{INT8_MAX_BPB}%", f"{int8['change']:+.2f}%", int8["change"] <= INT8_MAX_BPB)
    line(f"int8: weights >= {INT8_MIN_RATIO}x smaller", f"{int8['ratio']:.2f}x (+emb "
         f"{results['int8 +emb']['ratio']:.2f}x)", int8["ratio"] >= INT8_MIN_RATIO)
    for i, B in enumerate((1, 20)):
        line(f"int8: decode at batch {B} no slower than fp32",
             f"{int8['speeds'][i]:.1f} vs {fp32['speeds'][i]:.1f} tok/s", int8["speeds"][i] >= fp32["speeds"][i])
    int4 = {k: v for k, v in results.items() if k.startswith("int4") and "no-kernel" not in k}
    for label, r in int4.items():
        line(f"{label}: bpb <= +{INT4_MAX_BPB}%, >= {INT4_MIN_RATIO}x", f"{r['change']:+.2f}%, {r['ratio']:.2f}x",
             r["change"] <= INT4_MAX_BPB and r["ratio"] >= INT4_MIN_RATIO)
    small_enough = [k for k in int4 if int4[k]["ratio"] >= INT4_MIN_RATIO] or list(int4)
    best = min(small_enough, key=lambda k: int4[k]["change"])
    line(f"best int4 ({best}): bpb <= +{INT4_MAX_BPB}%, >= {INT4_MIN_RATIO}x",
         f"{int4[best]['change']:+.2f}%, {int4[best]['ratio']:.2f}x",
         int4[best]["change"] <= INT4_MAX_BPB and int4[best]["ratio"] >= INT4_MIN_RATIO)


if __name__ == "__main__":
    sys.exit(run_main(main))
