"""The field's formats: an h2q model as a Hugging Face LLaMA folder, an h2q adapter as a PEFT LoRA folder,
and both back again. Written from transformers' and PEFT's published schemas; neither is imported.

h2q's Transformer (h2q/model.py) is LLaMA's architecture, so the weights move over by name alone:

* names: `embed` -> `model.embed_tokens`, `layers.N.attn` -> `model.layers.N.self_attn`, `attn_norm` ->
  `input_layernorm`, `mlp_norm` -> `post_attention_layernorm`, `norm` -> `model.norm`. The output head
  is the embedding (`tie_word_embeddings`), so there is no `lm_head.weight`, as transformers saves a
  tied model.
* rotary: h2q rotates in the GPT-NeoX half-split layout, x * [cos, cos] + rotate_half(x) * [sin, sin]
  with rotate_half([x1, x2]) = [-x2, x1] and inv_freq = base^(-2i/head_dim): transformers'
  LlamaRotaryEmbedding and apply_rotary_pos_emb. q_proj and k_proj are copied as they are; the
  permutation in transformers' convert_llama_weights_to_hf.py turns Meta's interleaved-pair layout
  into this one, and h2q never had the interleaved layout.
* RMSNorm (eps inside the root, weight after it), a SiLU-gated MLP, no biases, as many key/value heads
  as query heads: LlamaRMSNorm, LlamaMLP, `num_key_value_heads = num_attention_heads`.
* tokens: ids 0..255 are bytes, 256 = EOT (starts and ends a document: bos = eos), 257 = PAD.
* LoRA: PEFT's lora_A.weight is (r, in), lora_B.weight (out, r), the update scaled by lora_alpha / r, or
  lora_alpha / sqrt(r) with use_rslora: h2q's A, B and scaling exactly. Keys are
  `base_model.model.` + the HF module path + `.lora_A.weight`, as PEFT's save_pretrained writes them.

Identity: config.json and adapter_config.json hold only their schemas' fields (older PEFT versions refuse
an adapter_config.json with a key they do not know), so h2q's own identity rides in the safetensors
metadata, which both loaders ignore: `h2q_fingerprint` and `h2q_config` on exported weights,
`h2q_base_fingerprint` and `h2q_base_config` on an exported adapter. An adapter imported back is
checked against the base it is put on, as h2q checks its own adapters.

Quantized checkpoints are refused: the LLaMA layout has no place for h2q's int8/int4 codes and
dequantized copies would not be the float model their adapters were trained on; export the float
checkpoint the quantized one was made from.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from h2q import tokenizer
from h2q.checkpoint import atomic_write_json, atomic_write_text, ensure_folder, read_tensors, save_tensors
from h2q.config import ModelConfig
from h2q.errors import FileFormatError, H2QError
from h2q.lora import LINEARS, LoraAdapter, LoraConfig
from h2q.model import Transformer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"  # a sharded folder, as save_pretrained writes a large model
GENERATION_CONFIG = "generation_config.json"
README = "README.md"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LlamaForCausalLM as base_model.model
HF_FILES = (HF_WEIGHTS, HF_CONFIG, GENERATION_CONFIG, README)
PEFT_FILES = (PEFT_WEIGHTS, PEFT_CONFIG)
BLOCK_PARTS = {"attn": "self_attn", "attn_norm": "input_layernorm", "mlp": "mlp",
               "mlp_norm": "post_attention_layernorm"}
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_name(key: str) -> str:
    """h2q parameter or module path -> transformers' LlamaForCausalLM path: 'layers.0.attn.q_proj.weight'
    -> 'model.layers.0.self_attn.q_proj.weight', 'embed.weight' -> 'model.embed_tokens.weight'."""
    parts = key.split(".")
    if parts[0] == "embed":
        parts[0] = "embed_tokens"
    elif parts[0] == "layers":
        parts[2] = BLOCK_PARTS[parts[2]]
    return "model." + ".".join(parts)


def peft_key(module: str, factor: str) -> str:
    """('layers.0.attn.q_proj', 'lora_A') -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    return f"{PEFT_PREFIX}{hf_name(module)}.{factor}.weight"


def _number(x: float):
    """16.0 -> 16 in JSON, as the field writes lora_alpha; other values as they are."""
    return int(x) if float(x).is_integer() else x


# -- the Hugging Face LLaMA folder -----------------------------------------------------------------
def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json: LlamaConfig's fields for this model. The rope base is written both as transformers 4
    reads it (rope_theta, rope_scaling) and as transformers 5 does (rope_parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.context_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tokenizer.EOT, "eos_token_id": tokenizer.EOT, "pad_token_id": tokenizer.PAD,
        "torch_dtype": DTYPES[dtype],
    }


def generation_config() -> dict:
    """generation_config.json: the special ids, PAD never generated (h2q's samplers mask it too). No
    max_length: transformers warns when a call's max_new_tokens meets one."""
    return {"bos_token_id": tokenizer.EOT, "eos_token_id": tokenizer.EOT, "pad_token_id": tokenizer.PAD,
            "suppress_tokens": [tokenizer.PAD]}


def tokenizer_readme(cfg: ModelConfig, base_fingerprint: str) -> str:
    """README.md of an exported folder: there is no tokenizer file to load, only this rule."""
    eot, pad = tokenizer.EOT, tokenizer.PAD
    return (
        "# h2q byte-level model in the LLaMA layout\n\n"
        f"Exported by h2q (`scripts/export.py`) from the model with fingerprint `{base_fingerprint}`: "
        f"{cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, context {cfg.context_len}.\n\n"
        "## Tokens\n\n"
        f"There is no tokenizer file: the token ids are the bytes of UTF-8 text (0..255), {eot} = EOT "
        f"(end of text; a document also starts with it, so it is both bos and eos) and {pad} = PAD "
        "(filler, never generated). Encode and decode in Python:\n\n"
        "```python\n"
        f"ids = [{eot}] + list(text.encode(\"utf-8\"))\n"
        "text = bytes(i for i in ids if i < 256).decode(\"utf-8\", errors=\"replace\")\n"
        "```\n\n"
        "## Generate with transformers\n\n"
        "```python\n"
        "import torch\n"
        "from transformers import LlamaForCausalLM\n\n"
        "model = LlamaForCausalLM.from_pretrained(\"path/to/this/folder\")\n"
        f"ids = torch.tensor([[{eot}] + list(\"Once upon a time\".encode(\"utf-8\"))])\n"
        "out = model.generate(ids, max_new_tokens=200, do_sample=True, temperature=0.8, top_p=0.95)\n"
        "print(bytes(i for i in out[0].tolist() if i < 256).decode(\"utf-8\", errors=\"replace\"))\n"
        "```\n"
    )


def check_exportable(metadata: dict, path) -> None:
    """A quantized checkpoint is refused (see the module docstring)."""
    if "quant" in metadata:
        raise H2QError(f"{path} is a quantized checkpoint; the LLaMA layout has no place for its codes: export "
                       f"the float checkpoint it was made from (same fingerprint {metadata.get('fingerprint')})")


def export_hf(model: Transformer, out_dir: str | Path) -> Path:
    """Write OUT/model.safetensors, config.json, generation_config.json and README.md for a float model."""
    out_dir = Path(out_dir)
    state = model.state_dict()
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise H2QError(f"only float models export (found {sorted(map(str, dtypes))}); export the float checkpoint")
    base_fp = model.base_fingerprint()
    save_tensors(out_dir / HF_WEIGHTS, {hf_name(k): v for k, v in state.items()},
                 {"format": "pt", "h2q_fingerprint": base_fp, "h2q_config": json.dumps(model.config.to_dict()),
                  "h2q_tokenizer": tokenizer.NAME})
    atomic_write_json(out_dir / HF_CONFIG, hf_config(model.config, next(iter(dtypes))))
    atomic_write_json(out_dir / GENERATION_CONFIG, generation_config())
    atomic_write_text(out_dir / README, tokenizer_readme(model.config, base_fp))
    return out_dir


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileFormatError(f"no {what} at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} is not a JSON object")
    return data


def config_from_hf(hf: dict, path) -> ModelConfig:
    """A LlamaConfig dict -> ModelConfig; anything h2q's model cannot run is a FileFormatError."""
    def need(ok: bool, what: str):
        if not ok:
            raise FileFormatError(f"{path}: {what}; h2q reads only byte-level LLaMA models of its own shape")
    try:
        d_model, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        need(hf.get("model_type") == "llama", f"model_type is {hf.get('model_type')!r}, not 'llama'")
        need(int(hf["vocab_size"]) == tokenizer.VOCAB_SIZE,
             f"vocab_size is {hf['vocab_size']}, not {tokenizer.VOCAB_SIZE} (bytes, EOT, PAD)")
        need(hf.get("hidden_act", "silu") == "silu", f"hidden_act is {hf.get('hidden_act')!r}, not 'silu'")
        need(int(hf.get("num_key_value_heads") or n_head) == n_head,
             "grouped key/value heads (num_key_value_heads < num_attention_heads)")
        need(int(hf.get("head_dim") or d_model // n_head) * n_head == d_model,
             "head_dim * num_attention_heads != hidden_size")
        need(not hf.get("attention_bias") and not hf.get("mlp_bias"), "the linears have biases")
        rope = hf.get("rope_parameters") or {}
        need(hf.get("rope_scaling") is None and rope.get("rope_type", "default") == "default", "rotary scaling is set")
        return ModelConfig(n_layer=int(hf["num_hidden_layers"]), n_head=n_head, d_model=d_model,
                           context_len=int(hf["max_position_embeddings"]), mlp_hidden=int(hf["intermediate_size"]),
                           rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                           norm_eps=float(hf["rms_norm_eps"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path} is not a LlamaConfig h2q can read ({type(e).__name__}: {e})") from None


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    index = folder / HF_INDEX
    if not (folder / HF_WEIGHTS).is_file() and index.is_file():
        weight_map = _read_json(index, "weight index").get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_tensors(folder / shard, "weight shard")[0])
        return tensors
    return read_tensors(folder / HF_WEIGHTS, "LLaMA weights")[0]


def import_hf(folder: str | Path) -> tuple[Transformer, str | None]:
    """A LLaMA folder (an h2q export, or one saved by transformers) -> (float32 h2q model, the h2q
    fingerprint its weights were exported with, or None for a folder h2q did not write)."""
    folder = Path(folder)
    hf = _read_json(folder / HF_CONFIG, "LLaMA config (config.json)")
    model = Transformer(config_from_hf(hf, folder / HF_CONFIG))
    tensors = _read_hf_weights(folder)
    expected = {hf_name(k): (k, v.shape) for k, v in model.state_dict().items()}
    head = tensors.pop("lm_head.weight", None)  # an untied save: fine only if it is the embedding
    if head is None and not hf.get("tie_word_embeddings", False):  # LlamaConfig's default is untied
        raise FileFormatError(f"{folder / HF_CONFIG} unties the output head, but there is no lm_head.weight")
    if head is not None and not torch.equal(head, tensors.get("model.embed_tokens.weight", head[:0])):
        raise FileFormatError(f"{folder}: lm_head.weight differs from the embedding; h2q's output head is tied to it")
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise FileFormatError(f"{folder} does not hold the weights its config.json describes "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    state = {}
    for name, (key, shape) in expected.items():
        if tensors[name].shape != shape:
            raise FileFormatError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json needs {tuple(shape)}")
        state[key] = tensors[name].to(torch.float32)
    model.load_state_dict(state)
    return model.eval(), exported_fingerprint(folder)


def exported_fingerprint(folder: str | Path) -> str | None:
    """The h2q fingerprint recorded in an exported LLaMA folder's weights; None when there is none."""
    return _metadata(Path(folder) / HF_WEIGHTS).get("h2q_fingerprint")


def _metadata(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise FileFormatError(f"{path} is unreadable or corrupt ({e})") from None


# -- the PEFT LoRA folder --------------------------------------------------------------------------
def peft_config(config: LoraConfig, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json: LoraConfig's fields, each known to PEFT since 0.7 (use_rslora)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": config.r, "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout, "target_modules": list(config.target_names), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": config.rslora, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def export_peft(adapter: LoraAdapter, base: Transformer, out_dir: str | Path,
                base_model_name_or_path: str | None = None) -> Path:
    """Write OUT/adapter_model.safetensors and adapter_config.json for `adapter` on `base`."""
    if adapter.merged:
        raise H2QError("unmerge the adapter before exporting it (the base weights hold it now)")
    out_dir = Path(out_dir)
    tensors = {}
    for key, t in adapter.tensors().items():
        module, factor = key.rsplit(".", 1)  # 'layers.0.attn.q_proj', 'lora_A'
        tensors[peft_key(module, factor)] = t
    save_tensors(out_dir / PEFT_WEIGHTS, tensors, {
        "format": "pt", "h2q_base_fingerprint": base.base_fingerprint(),
        "h2q_base_config": json.dumps(adapter.base_config.to_dict())})
    atomic_write_json(out_dir / PEFT_CONFIG, peft_config(adapter.config, base_model_name_or_path))
    return out_dir


# PEFT options that change what a LoRA computes beyond W x + s B A x on whole linears: each must be unset
BEYOND_PLAIN_LORA = ("use_dora", "use_qalora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                     "rank_pattern", "alpha_pattern", "trainable_token_indices", "layer_replication",
                     "target_parameters", "alora_invocation_tokens", "arrow_config")


def _lora_config_from_peft(peft: dict, path) -> LoraConfig:
    used = [k for k in BEYOND_PLAIN_LORA if peft.get(k)]
    used += ["peft_type"] * (peft.get("peft_type") != "LORA") + ["bias"] * (peft.get("bias", "none") != "none")
    if used:
        raise FileFormatError(f"{path}: {', '.join(f'{k}={peft.get(k)!r}' for k in used)} is beyond a plain LoRA on "
                              f"the linears, which is all h2q's adapters are")
    targets = peft.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear but the output head
        targets = list(LINEARS)
    if not isinstance(targets, list) or not set(targets) <= set(LINEARS):
        raise FileFormatError(f"{path}: target_modules {targets!r} must be a list of {', '.join(LINEARS)}")
    try:
        return LoraConfig(r=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                          dropout=float(peft.get("lora_dropout", 0.0)), targets=",".join(targets),
                          rslora=bool(peft.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError, H2QError) as e:
        raise FileFormatError(f"{path} is not a LoRA config h2q can read ({type(e).__name__}: {e})") from None


def import_peft(folder: str | Path, base: Transformer) -> tuple[LoraAdapter, str | None]:
    """A PEFT LoRA folder -> (an h2q adapter for `base`, the h2q base fingerprint it records, or None).
    An adapter that records another base (by fingerprint or shape) is refused; one h2q did not write
    records none (unless its base_model_name_or_path is a local h2q export), and is only checked for shape."""
    folder = Path(folder)
    peft = _read_json(folder / PEFT_CONFIG, "PEFT adapter config")
    config = _lora_config_from_peft(peft, folder / PEFT_CONFIG)
    tensors, metadata = read_tensors(folder / PEFT_WEIGHTS, "PEFT adapter weights")
    recorded_fp = metadata.get("h2q_base_fingerprint")
    base_name = peft.get("base_model_name_or_path")
    if recorded_fp is None and isinstance(base_name, str) and Path(base_name).is_dir():
        recorded_fp = exported_fingerprint(base_name)  # trained elsewhere on an h2q export folder
    if "h2q_base_config" in metadata and metadata["h2q_base_config"] != json.dumps(base.config.to_dict()):
        raise FileFormatError(f"{folder} was made for another base shape ({metadata['h2q_base_config']}); "
                              f"import it onto its own base")
    if recorded_fp is not None and recorded_fp != base.base_fingerprint():
        raise FileFormatError(f"{folder} was made for base {recorded_fp}, not this base {base.base_fingerprint()}; "
                              f"import it onto its own base (--ckpt)")
    adapter = LoraAdapter(base, config, init=False)
    expected = {}
    for key, t in adapter.tensors().items():
        module, factor = key.rsplit(".", 1)
        expected[peft_key(module, factor)] = t
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise FileFormatError(f"{folder / PEFT_WEIGHTS} does not match its config and this base "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, t in expected.items():
            if tensors[name].shape != t.shape:
                raise FileFormatError(f"{folder / PEFT_WEIGHTS}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"this base needs {tuple(t.shape)}")
            t.copy_(tensors[name])
    return adapter, recorded_fp


# -- output folders --------------------------------------------------------------------------------
def check_output(out_dir: str | Path, inputs, files, overwrite: bool = False) -> Path:
    """OUT (made if missing) may be none of the input folders (nor hold an input file), nor a file,
    and may replace the files it would write only with `overwrite`."""
    out_dir = Path(out_dir).resolve()
    for given in inputs:
        folder = Path(given).resolve()
        folder = folder if folder.is_dir() or not folder.suffix else folder.parent
        if folder == out_dir:
            raise H2QError(f"--out {out_dir} is an input folder ({given}); choose another folder")
    taken = [name for name in files if (out_dir / name).exists()]
    if taken and not overwrite:
        raise H2QError(f"--out {out_dir} already holds {', '.join(taken)}; choose a new folder or pass --overwrite")
    return ensure_folder(out_dir, "--out")
