"""Export an h2q model to the Hugging Face LLaMA layout, or an h2q adapter to a PEFT LoRA folder.

    python scripts/export.py --format hf --ckpt checkpoints/base --out export/base-hf
    python scripts/export.py --format peft --adapter checkpoints/adapters/lora --ckpt checkpoints/base \\
        --base-model export/base-hf --out export/lora-peft

--format hf writes model.safetensors (HF names, tied head), config.json (LlamaConfig), generation_config.json
and a README.md with the byte-level token rule, for `LlamaForCausalLM.from_pretrained(OUT)`. A quantized
checkpoint is refused: export the float checkpoint it was made from.

--format peft writes adapter_model.safetensors (PEFT key names) and adapter_config.json for
`PeftModel.from_pretrained(model, OUT)`. --adapter is any h2q adapter folder, also an evolved agent's
(an evolve run's cycle_NNN/agent_MM/); --ckpt is the base it was trained on (checked by fingerprint).
--base-model is written as base_model_name_or_path: the folder of the base's --format hf export (checked to
be that base) or a name. The mapping lives in h2q/hf_format.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h2q import hf_format
from h2q.checkpoint import load_adapter, load_model
from h2q.cli import Parser, run_main
from h2q.errors import H2QError


def export_hf(args) -> None:
    model, metadata = load_model(args.ckpt, "cpu")
    hf_format.check_exportable(metadata, args.ckpt)
    out = hf_format.check_output(args.out, [args.ckpt], hf_format.HF_FILES, args.overwrite)
    hf_format.export_hf(model, out)
    print(f"{args.ckpt} -> {out}: LlamaForCausalLM folder ({', '.join(hf_format.HF_FILES)}), "
          f"{model.num_params():,} parameters, fingerprint {model.base_fingerprint()} recorded")


def export_peft(args) -> None:
    if args.adapter is None:
        raise H2QError("--format peft needs --adapter (an adapter folder, e.g. an evolve run's cycle_NNN/agent_MM)")
    base, _ = load_model(args.ckpt, "cpu")
    adapter = load_adapter(args.adapter, base)  # refuses an adapter made for another base
    if args.base_model and Path(args.base_model).is_dir():
        exported = hf_format.exported_fingerprint(args.base_model)
        if exported != base.base_fingerprint():
            held = f"base {exported}" if exported else "no h2q export"
            raise H2QError(f"--base-model {args.base_model} holds {held}, "
                           f"not this adapter's base {base.base_fingerprint()}; export the base with --format hf first")
    out = hf_format.check_output(args.out, [args.adapter, args.ckpt], hf_format.PEFT_FILES, args.overwrite)
    hf_format.export_peft(adapter, base, out, args.base_model)
    c = adapter.config
    print(f"{args.adapter} -> {out}: PEFT LoRA r={c.r} alpha={c.alpha:g}{' rslora' if c.rslora else ''} on "
          f"{','.join(c.target_names)}, base {base.base_fingerprint()} recorded"
          + ("" if args.base_model else "; base_model_name_or_path is null: pass --base-model for AutoPeftModel"))


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=("hf", "peft"),
                        help="hf: a transformers LLaMA folder; peft: a PEFT LoRA adapter folder")
    parser.add_argument("--ckpt", default="checkpoints/base",
                        help="h2q checkpoint: the model to export (hf) or the adapter's base (peft) "
                             "(default: checkpoints/base)")
    parser.add_argument("--adapter", default=None, help="h2q adapter folder to export (peft)")
    parser.add_argument("--base-model", default=None,
                        help="base_model_name_or_path for the PEFT config: the base's --format hf export folder "
                             "or a name (peft)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out (never an input)")
    args = parser.parse_args(argv)
    if args.format == "hf" and (args.adapter or args.base_model):
        raise H2QError("--adapter and --base-model belong to --format peft")
    export_hf(args) if args.format == "hf" else export_peft(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
