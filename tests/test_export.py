"""scripts/export.py and scripts/import.py (h2q/hf_format.py): Hugging Face LLaMA and PEFT LoRA folders,
checked without transformers or PEFT: literal key and field lists written from their published schemas,
a plain LLaMA forward of HF's formulas (rotate_half included) over the exported files alone, and round
trips that give identical logits."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from h2q import hf_format
from h2q.checkpoint import load_adapter, load_model, save_adapter, save_model
from h2q.cli import run_main
from h2q.config import ModelConfig
from h2q.errors import FileFormatError
from h2q.lora import LoraAdapter, LoraConfig
from h2q.model import Rotary, Transformer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
CFG = ModelConfig(n_layer=2, n_head=2, d_model=32, context_len=64, mlp_hidden=96, rope_base=500.0, norm_eps=1e-6)


def script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


export_main, import_main = script("export"), script("import")


def make_base(seed=0):
    """A tiny model whose norm weights are not all ones, so a misplaced norm would show."""
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def make_adapter(model, config, seed=1):
    """An adapter with nonzero A and B, as if trained."""
    g = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(model, config, generator=g)
    with torch.no_grad():
        for b in adapter.lora_B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return adapter


@pytest.fixture
def ids():
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 256  # a document starts with EOT
    return ids


@pytest.fixture
def base(tmp_path):
    save_model(tmp_path / "base", make_base())
    return load_model(tmp_path / "base")[0]


def export(*args):
    return run_main(export_main, [str(a) for a in args])


def import_(*args):
    return run_main(import_main, [str(a) for a in args])


# -- the published schemas, written out --------------------------------------------------------------
HF_KEYS = [
    "model.embed_tokens.weight",
    *[f"model.layers.{i}.{name}.weight" for i in range(2) for name in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
    "model.norm.weight",
]
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 258, "hidden_size": 32,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
    "rope_theta": 500.0, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
    "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True,
    "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 257, "torch_dtype": "float32",
}
GENERATION_CONFIG = {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 257, "suppress_tokens": [257]}
PEFT_KEYS = [f"base_model.model.model.layers.{i}.{m}.lora_{f}.weight"
             for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for f in "AB"]
PEFT_CONFIG = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "export/base-hf", "revision": None,
    "inference_mode": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "down_proj"], "bias": "none", "fan_in_fan_out": False,
    "use_rslora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
}


def metadata_of(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_hf_folder_matches_the_published_schema(tmp_path, base, capsys):
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 0
    assert "fingerprint" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "model.safetensors"]
    tensors = load_file(out / "model.safetensors")
    assert sorted(tensors) == sorted(HF_KEYS)  # tied: no lm_head.weight
    assert tensors["model.layers.1.mlp.gate_proj.weight"].shape == (96, 32)
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (32, 96)
    meta = metadata_of(out / "model.safetensors")
    assert meta["format"] == "pt" and meta["h2q_fingerprint"] == base.base_fingerprint()
    assert json.loads((out / "config.json").read_text()) == HF_CONFIG
    assert json.loads((out / "generation_config.json").read_text()) == GENERATION_CONFIG
    readme = (out / "README.md").read_text()
    assert "256 = EOT" in readme and "257 = PAD" in readme and 'text.encode("utf-8")' in readme


def test_peft_folder_matches_the_published_schema(tmp_path, base):
    adapter = make_adapter(base, LoraConfig(r=4, alpha=8.0, targets="q_proj,v_proj,down_proj"))
    save_adapter(tmp_path / "lora", adapter, base)
    assert export("--format", "peft", "--adapter", tmp_path / "lora", "--ckpt", tmp_path / "base",
                  "--base-model", "export/base-hf", "--out", tmp_path / "peft") == 0
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(PEFT_KEYS)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 96)  # (r, in)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)  # (out, r)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == PEFT_CONFIG
    assert metadata_of(tmp_path / "peft" / "adapter_model.safetensors")["h2q_base_fingerprint"] == base.base_fingerprint()


# -- HF's formulas, written out plainly --------------------------------------------------------------
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_cos_sin(head_dim, theta, T):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs): both halves
    return emb.cos(), emb.sin()


def rotate_interleaved(x, head_dim, theta, T):
    """Meta's original layout: pairs (x0, x1), (x2, x3), ... rotated; what h2q's layout must not be."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(T).float(), inv_freq)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_rotary_is_hf_rotate_half():
    x = torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(0))  # (B, nh, T, hs)
    cos, sin = hf_cos_sin(16, 500.0, 9)
    hf = x * cos + rotate_half(x) * sin
    rotary = Rotary(16, 500.0)
    h2q = rotary(x, torch.arange(9))
    torch.testing.assert_close(h2q, hf, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(h2q, rotate_interleaved(x, 16, 500.0, 9), atol=1e-3)


def naive_llama_forward(folder, ids, peft_folder=None):
    """LlamaForCausalLM's forward from the exported files alone, each formula as HF writes it."""
    c = json.loads((folder / "config.json").read_text())
    w = load_file(folder / "model.safetensors")
    lora, scaling = {}, 0.0
    if peft_folder is not None:
        p = json.loads((peft_folder / "adapter_config.json").read_text())
        lora = load_file(peft_folder / "adapter_model.safetensors")
        scaling = p["lora_alpha"] / (math.sqrt(p["r"]) if p["use_rslora"] else p["r"])

    def linear(name, x):
        y = x @ w[name + ".weight"].T
        A = lora.get(f"base_model.model.{name}.lora_A.weight")
        return y if A is None else y + scaling * (x @ A.T) @ lora[f"base_model.model.{name}.lora_B.weight"].T

    def rms_norm(name, x):
        return w[name + ".weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    B, T = ids.shape
    nh, hs = c["num_attention_heads"], c["head_dim"]
    cos, sin = hf_cos_sin(hs, c["rope_theta"], T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["model.embed_tokens.weight"][ids]  # (B, T, C)
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        h = rms_norm(f"{pre}.input_layernorm", x)
        q, k, v = (linear(f"{pre}.self_attn.{n}_proj", h).view(B, T, nh, hs).transpose(1, 2) for n in "qkv")
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, -math.inf)  # (B, nh, T, T)
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hs)
        x = x + linear(f"{pre}.self_attn.o_proj", att)
        h = rms_norm(f"{pre}.post_attention_layernorm", x)
        gated = F.silu(linear(f"{pre}.mlp.gate_proj", h)) * linear(f"{pre}.mlp.up_proj", h)
        x = x + linear(f"{pre}.mlp.down_proj", gated)
    return rms_norm("model.norm", x) @ w["model.embed_tokens.weight"].T  # tied head


@pytest.mark.parametrize("rslora", [False, True])
def test_naive_hf_forward_over_the_export_equals_h2q(tmp_path, base, ids, rslora):
    adapter = make_adapter(base, LoraConfig(r=4, alpha=8.0, rslora=rslora))
    save_adapter(tmp_path / "lora", adapter, base)
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 0
    assert export("--format", "peft", "--adapter", tmp_path / "lora", "--ckpt", tmp_path / "base",
                  "--out", tmp_path / "peft") == 0
    with torch.no_grad():
        torch.testing.assert_close(naive_llama_forward(tmp_path / "hf", ids), base(ids), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(naive_llama_forward(tmp_path / "hf", ids, tmp_path / "peft"),
                                   base(ids, adapters=adapter), rtol=1e-4, atol=1e-5)


# -- round trips -------------------------------------------------------------------------------------
def test_hf_round_trip_gives_identical_logits(tmp_path, base, ids, capsys):
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 0
    assert import_("--format", "hf", "--src", tmp_path / "hf", "--out", tmp_path / "back") == 0
    assert "the exported model, unchanged" in capsys.readouterr().out
    back, _ = load_model(tmp_path / "back")
    assert back.config == base.config and back.base_fingerprint() == base.base_fingerprint()
    with torch.no_grad():
        assert torch.equal(back(ids), base(ids))


def test_hf_import_reads_a_sharded_folder(tmp_path, base, ids):
    """save_pretrained shards a large model: model.safetensors.index.json names the shard of each weight."""
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 0
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    shards = {name: f"model-0000{1 + ('layers.1.' in name)}-of-00002.safetensors" for name in weights}
    for shard in set(shards.values()):
        save_file({k: v for k, v in weights.items() if shards[k] == shard}, tmp_path / "hf" / shard)
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    model, recorded = hf_format.import_hf(tmp_path / "hf")
    with torch.no_grad():
        assert recorded is None and torch.equal(model(ids), base(ids))


def test_peft_round_trip_of_an_evolved_agent(tmp_path, base, ids, capsys):
    agent = tmp_path / "evolve" / "cycle_003" / "agent_07"  # an evolve run keeps normal adapter folders
    adapter = make_adapter(base, LoraConfig(r=2, alpha=4.0, targets="k_proj,o_proj,up_proj", rslora=True))
    save_adapter(agent, adapter, base)
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 0
    assert export("--format", "peft", "--adapter", agent, "--ckpt", tmp_path / "base",
                  "--base-model", tmp_path / "hf", "--out", tmp_path / "peft") == 0
    assert import_("--format", "hf", "--src", tmp_path / "hf", "--out", tmp_path / "base2") == 0
    assert import_("--format", "peft", "--src", tmp_path / "peft", "--ckpt", tmp_path / "base2",
                   "--out", tmp_path / "back") == 0
    assert "base checked by fingerprint" in capsys.readouterr().out
    base2, _ = load_model(tmp_path / "base2")
    back = load_adapter(tmp_path / "back", base2)
    assert back.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), adapter.parameters()))
    with torch.no_grad():
        assert torch.equal(base2(ids, adapters=back), base(ids, adapters=adapter))


def test_peft_import_needs_its_own_base(tmp_path, base, capsys):
    save_adapter(tmp_path / "lora", make_adapter(base, LoraConfig(r=4)), base)
    assert export("--format", "peft", "--adapter", tmp_path / "lora", "--ckpt", tmp_path / "base",
                  "--out", tmp_path / "peft") == 0
    save_model(tmp_path / "other", make_base(seed=5))  # same shape, other weights
    assert import_("--format", "peft", "--src", tmp_path / "peft", "--ckpt", tmp_path / "other",
                   "--out", tmp_path / "back") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"made for base {base.base_fingerprint()}" in err
    assert not (tmp_path / "back").exists()


def test_peft_folder_from_elsewhere(tmp_path, base, ids, capsys):
    """A PEFT folder h2q did not write: no h2q metadata, a hub name as base; only its shape is checked.
    Options beyond a plain LoRA (DoRA here) are refused."""
    adapter = make_adapter(base, LoraConfig(r=4, alpha=8.0, targets="q_proj,v_proj,down_proj"))
    save_adapter(tmp_path / "lora", adapter, base)
    assert export("--format", "peft", "--adapter", tmp_path / "lora", "--ckpt", tmp_path / "base",
                  "--out", tmp_path / "peft") == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file(load_file(tmp_path / "peft" / "adapter_model.safetensors"), foreign / "adapter_model.safetensors",
              metadata={"format": "pt"})
    config = {**PEFT_CONFIG, "base_model_name_or_path": "someone/byte-llama", "target_modules": "all-linear"}
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    assert import_("--format", "peft", "--src", foreign, "--ckpt", tmp_path / "base", "--out", tmp_path / "x") == 2
    assert "missing ['base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight'" in capsys.readouterr().err
    config["target_modules"] = ["v_proj", "q_proj", "down_proj"]  # PEFT writes them in any order
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    assert import_("--format", "peft", "--src", foreign, "--ckpt", tmp_path / "base", "--out", tmp_path / "back") == 0
    assert "only its shape could be checked" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(base(ids, adapters=load_adapter(tmp_path / "back", base)), base(ids, adapters=adapter))
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert import_("--format", "peft", "--src", foreign, "--ckpt", tmp_path / "base", "--out", tmp_path / "y") == 2
    assert "use_dora=True is beyond a plain LoRA" in capsys.readouterr().err


def test_hf_import_refuses_what_h2q_cannot_run(tmp_path, base, ids):
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 0
    config_path = tmp_path / "hf" / "config.json"
    for change, message in [({"num_key_value_heads": 1}, "grouped key/value heads"),
                            ({"vocab_size": 32000}, "vocab_size is 32000"),
                            ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
                             "rotary scaling")]:
        config_path.write_text(json.dumps({**HF_CONFIG, **change}))
        with pytest.raises(FileFormatError, match=message):
            hf_format.import_hf(tmp_path / "hf")
    # an untied save (transformers 4's LlamaConfig default) whose head is the embedding imports; another head does not
    config_path.write_text(json.dumps({**HF_CONFIG, "tie_word_embeddings": False}))
    with pytest.raises(FileFormatError, match="no lm_head.weight"):
        hf_format.import_hf(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    save_file({**weights, "lm_head.weight": embed.clone()}, tmp_path / "hf" / "model.safetensors")
    model, recorded = hf_format.import_hf(tmp_path / "hf")
    assert recorded is None and torch.equal(model(ids), base(ids))
    save_file({**weights, "lm_head.weight": embed * 2}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(FileFormatError, match="lm_head.weight differs"):
        hf_format.import_hf(tmp_path / "hf")


def test_quantized_checkpoint_is_refused(tmp_path, base, capsys):
    quantize = script("quantize")
    assert run_main(quantize, ["--ckpt", str(tmp_path / "base"), "--mode", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert export("--format", "hf", "--ckpt", tmp_path / "q", "--out", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantized checkpoint" in err and "export the float checkpoint" in err
    assert not (tmp_path / "hf").exists()


def test_outputs_never_replace_inputs(tmp_path, base, capsys):
    before = (tmp_path / "base" / "model.safetensors").read_bytes()
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "base", "--overwrite") == 2
    assert "is an input folder" in capsys.readouterr().err
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 0
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf") == 2
    assert "already holds model.safetensors" in capsys.readouterr().err
    assert export("--format", "hf", "--ckpt", tmp_path / "base", "--out", tmp_path / "hf", "--overwrite") == 0
    assert import_("--format", "hf", "--src", tmp_path / "hf", "--out", tmp_path / "hf", "--overwrite") == 2
    assert import_("--format", "hf", "--src", tmp_path / "hf", "--out", tmp_path / "base") == 2
    assert "already holds model.safetensors" in capsys.readouterr().err
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before
    assert export("--format", "peft", "--ckpt", tmp_path / "base", "--out", tmp_path / "p") == 2
    assert "needs --adapter" in capsys.readouterr().err
    assert export("--format", "peft", "--adapter", tmp_path / "none", "--ckpt", tmp_path / "base",
                  "--out", tmp_path / "p") == 2
    assert capsys.readouterr().err.startswith("error: no LoRA adapter in")
