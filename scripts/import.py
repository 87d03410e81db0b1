"""Import a Hugging Face LLaMA folder as an h2q checkpoint, or a PEFT LoRA folder as an h2q adapter.

    python scripts/import.py --format hf --src export/base-hf --out checkpoints/base-imported
    python scripts/import.py --format peft --src export/lora-peft --ckpt checkpoints/base \\
        --out checkpoints/adapters/lora-imported

--format hf reads config.json and model.safetensors (or its shards) of a byte-level LLaMA: an h2q export,
or one transformers saved after training it further. The checkpoint written gives the same logits;
its fingerprint equals the exported model's while the weights are unchanged.

--format peft reads adapter_config.json and adapter_model.safetensors onto the base --ckpt. An adapter
that records another base (an h2q export records the base's fingerprint) is refused. The h2q adapter
written is for that base: `python infer.py --ckpt BASE --adapter OUT`. The mapping lives in h2q/hf_format.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h2q import hf_format
from h2q.checkpoint import MODEL_FILE, load_model, save_adapter, save_model
from h2q.cli import Parser, run_main


def import_hf(args) -> None:
    model, exported_fp = hf_format.import_hf(args.src)
    out = hf_format.check_output(args.out, [args.src], [MODEL_FILE], args.overwrite)
    path = save_model(out, model, imported_from="llama")
    now = model.base_fingerprint()
    if exported_fp is None:
        origin = "not an h2q export"
    elif exported_fp == now:
        origin = "the exported model, unchanged"
    else:
        origin = f"exported from {exported_fp}, weights changed since"
    print(f"{args.src} -> {path}: {model.num_params():,} parameters, fingerprint {now} ({origin})")


def import_peft(args) -> None:
    base, _ = load_model(args.ckpt, "cpu")
    adapter, recorded_fp = hf_format.import_peft(args.src, base)
    # an h2q adapter folder uses PEFT's two file names
    out = hf_format.check_output(args.out, [args.src, args.ckpt], hf_format.PEFT_FILES, args.overwrite)
    save_adapter(out, adapter, base)
    c = adapter.config
    check = ("base checked by fingerprint" if recorded_fp else
             "no h2q base recorded: only its shape could be checked against --ckpt")
    print(f"{args.src} -> {out}: LoRA r={c.r} alpha={c.alpha:g}{' rslora' if c.rslora else ''} on "
          f"{','.join(c.target_names)} for base {base.base_fingerprint()} ({check})")


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=("hf", "peft"),
                        help="hf: a transformers LLaMA folder; peft: a PEFT LoRA adapter folder")
    parser.add_argument("--src", required=True, help="the folder to import")
    parser.add_argument("--ckpt", default="checkpoints/base",
                        help="h2q base checkpoint the adapter goes onto (peft) (default: checkpoints/base)")
    parser.add_argument("--out", required=True, help="folder for the h2q checkpoint (hf) or adapter (peft)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out (never an input)")
    args = parser.parse_args(argv)
    import_hf(args) if args.format == "hf" else import_peft(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
