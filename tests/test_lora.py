"""LoRA adapters: fresh = no-op, frozen base, merge/unmerge, the batched multi-adapter bank, their
files (h2q/checkpoint.py), and adapter arithmetic."""
import argparse
import json

import pytest
import torch
from torch import nn

from h2q import checkpoint, lora
from h2q.cli import add_dataclass_flags, dataclass_from_args
from h2q.config import PRESETS, ModelConfig
from h2q.errors import H2QError
from h2q.lora import AdapterBank, LoraAdapter, LoraConfig
from h2q.model import Transformer

CFG = PRESETS["tiny"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))


def trained(model, config=LoraConfig(r=4), seed=0, scale=0.05):
    """An adapter with nonzero A and B, as if trained."""
    g = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(model, config, generator=g)
    with torch.no_grad():
        for b in adapter.lora_B:
            b.copy_(torch.randn(b.shape, generator=g) * scale)
    return adapter


class FakeInt8Linear(nn.Module):
    """Stands in for h2q/quant.py's modules: int8 weight, per-channel scale, `weight` unreadable."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    @property
    def weight(self):
        raise AssertionError("the adapter path must not read module.weight")

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale).T


def quantize_fake(model):
    for block in model.layers:
        for part in (block.attn, block.mlp):
            for name, child in list(part.named_children()):
                setattr(part, name, FakeInt8Linear(child))
    return model


# -- config --------------------------------------------------------------------------------------------
def test_config_scaling_targets_and_flags():
    assert LoraConfig(r=8, alpha=16).scaling == 2.0
    assert LoraConfig(r=16, alpha=16, rslora=True).scaling == 4.0
    assert LoraConfig().target_names == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert LoraConfig(targets="v_proj, q_proj").targets == "q_proj,v_proj"
    assert LoraConfig(targets=("down_proj", "q_proj")).target_names == ("q_proj", "down_proj")
    for bad in (dict(targets="qkv"), dict(r=0), dict(dropout=1.0), dict(alpha=0)):
        with pytest.raises(H2QError):
            LoraConfig(**bad)
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, LoraConfig)
    args = parser.parse_args(["--r", "4", "--alpha", "8", "--targets", "q_proj,v_proj", "--rslora"])
    assert dataclass_from_args(LoraConfig, args) == LoraConfig(r=4, alpha=8.0, targets="q_proj,v_proj", rslora=True)


# -- one adapter ---------------------------------------------------------------------------------------
def test_fresh_adapter_changes_nothing(model, ids):
    adapter = LoraAdapter(model, LoraConfig(r=4))
    n_keys = CFG.n_layer * 7
    assert len(list(adapter.parameters())) == 2 * n_keys
    assert all(torch.count_nonzero(b) == 0 for b in adapter.lora_B)
    bound = 1 / CFG.d_model ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert 0 < adapter.lora_A[0].abs().max() <= bound
    assert torch.equal(model(ids), model(ids, adapters=adapter))


def test_targets_subset_only_adapts_those(model):
    adapter = LoraAdapter(model, LoraConfig(r=2, targets="q_proj,down_proj"))
    assert set(adapter.slot) == {f"layers.{i}.{p}" for i in range(CFG.n_layer)
                                 for p in ("attn.q_proj", "mlp.down_proj")}
    x, y = torch.randn(1, 3, CFG.d_model), torch.randn(1, 3, CFG.d_model)
    assert adapter("layers.0.attn.k_proj", x, y) is y


def test_only_adapter_gets_gradients(model, ids):
    lora.freeze_base(model)
    adapter = trained(model)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]}.isdisjoint({id(p) for p in model.parameters()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(ids, adapters=adapter).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dropout_only_in_training(model, ids):
    adapter = trained(model, LoraConfig(r=4, dropout=0.5))
    adapter.eval()
    assert torch.equal(model(ids, adapters=adapter), model(ids, adapters=adapter))
    adapter.train()
    assert not torch.equal(model(ids, adapters=adapter), model(ids, adapters=adapter))


def test_merge_unmerge_exact_and_idempotent(model, ids):
    adapter = trained(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(ids, adapters=adapter)
    adapter.merge(model)
    adapter.merge(model)  # no double add
    assert adapter.merged
    assert (model(ids) - expected).abs().max() <= 1e-5
    assert (model(ids, adapters=adapter) - expected).abs().max() <= 1e-5  # merged: adds nothing more
    adapter.train(), adapter.eval()  # mode switches never merge or unmerge
    assert adapter.merged
    adapter.unmerge()
    adapter.unmerge()
    assert not adapter.merged
    for k, v in model.state_dict().items():
        assert (v - base_weights[k]).abs().max() <= 1e-6, k
    assert (model(ids, adapters=adapter) - expected).abs().max() <= 1e-6


def test_merge_adds_scaled_product_to_each_weight(model):
    """W' = W + (alpha / r) * B @ A for every targeted linear, the rest untouched (formula in the test)."""
    config = LoraConfig(r=4, alpha=6.0, targets="q_proj,down_proj")
    adapter = trained(model, config)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    adapter.merge(model)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if name.endswith(("attn.q_proj", "mlp.down_proj")):
            A, B = adapter.lora_A[adapter.slot[name]], adapter.lora_B[adapter.slot[name]]
            expected = before[name] + (6.0 / 4) * (B @ A)
            torch.testing.assert_close(m.weight, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(m.weight, before[name]), name


def test_merge_renames_the_base_and_unmerge_restores_its_name(model, ids, tmp_path):
    checkpoint.save_model(tmp_path, model)  # records the float weights' fingerprint
    name = model.fingerprint
    adapter = trained(model)
    adapter.merge(model)
    assert model.fingerprint is None  # nothing stale: the merged weights are another base
    merged_name = model.base_fingerprint()
    fresh = Transformer(CFG)
    fresh.load_state_dict(model.state_dict())
    assert merged_name != name and merged_name == fresh.base_fingerprint()
    adapter.unmerge()
    assert model.fingerprint == name
    other = trained(model, seed=1)
    adapter.merge(model)
    other.merge(model)  # a second merge in between: unmerging the first no longer gives the base back
    adapter.unmerge()
    assert model.fingerprint is None
    other.unmerge()
    assert model.fingerprint is None


def test_merge_into_quantized_base_is_a_clear_error(model, ids):
    adapter = trained(model)
    quantize_fake(model)
    with pytest.raises(H2QError, match="quantized"):
        adapter.merge(model)
    assert not adapter.merged


def test_adapter_and_bank_work_over_quantized_base(model, ids):
    adapter = trained(model)
    quantize_fake(model)
    plain = model(ids)
    assert not torch.equal(model(ids, adapters=adapter), plain)
    bank = AdapterBank.from_adapters([adapter])
    assert (model(ids, adapters=bank.bind([0] * 4)) - model(ids, adapters=adapter)).abs().max() <= 1e-5


# -- the bank ------------------------------------------------------------------------------------------
def test_bank_rows_match_single_adapters(model, ids):
    adapters = [trained(model, seed=s) for s in range(3)]
    bank = AdapterBank.from_adapters(adapters)
    index = [2, -1, 0, 2]
    out = model(ids, adapters=bank.bind(index))
    for row, slot in enumerate(index):
        alone = model(ids[row:row + 1], adapters=adapters[slot] if slot >= 0 else None)
        assert (out[row] - alone[0]).abs().max() <= 1e-5, row
    with torch.inference_mode():  # the serving path accumulates in place
        assert (model(ids, adapters=bank.bind(index)) - out).abs().max() <= 1e-6


def test_bank_gradients_stay_in_their_own_slot(model, ids):
    lora.freeze_base(model)
    bank = AdapterBank.from_adapters([trained(model, seed=s) for s in range(4)])
    index = [3, 1, -1, 1]
    for row in range(len(index)):
        bank.zero_grad()
        model(ids, adapters=bank.bind(index))[row].logsumexp(-1).mean().backward()
        for p in bank.parameters():
            for slot in range(len(bank)):
                if slot == index[row]:
                    assert p.grad[slot].abs().sum() > 0
                else:
                    assert torch.count_nonzero(p.grad[slot]) == 0, (row, slot)


def test_bank_trains_all_slots_in_one_backward(model, ids):
    lora.freeze_base(model)
    bank = AdapterBank(model, LoraConfig(r=4), n=4, generator=torch.Generator().manual_seed(0))
    before = [bank.adapter(i) for i in range(4)]
    opt = torch.optim.SGD(bank.parameters(), lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2 * CFG.n_layer * 7  # stacked: one tensor per target
    model(ids, adapters=bank.bind([0, 1, 2, 3])).logsumexp(-1).mean().backward()
    opt.step()
    for i in range(4):
        changed = [not torch.equal(a, b) for a, b in zip(bank.adapter(i).lora_B, before[i].lora_B)]
        assert all(changed), i


def test_bank_slot_roundtrip_and_validation(model):
    bank = AdapterBank(model, LoraConfig(r=4), n=3)
    newcomer = trained(model, seed=7)
    bank.set_adapter(1, newcomer)
    copy = bank.adapter(1)
    assert all(torch.equal(a, b) for a, b in zip(copy.parameters(), newcomer.parameters()))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.parameters(), newcomer.parameters()))
    with pytest.raises(H2QError):
        bank.set_adapter(0, trained(model, LoraConfig(r=2)))
    for bad in ([3], [-2], [[0]]):
        with pytest.raises(ValueError):
            bank.bind(bad)


# -- files ---------------------------------------------------------------------------------------------
def test_saved_adapter_keys_and_config(model, tmp_path):
    """The file's keys, written out for the tiny config (2 layers), PEFT-style."""
    adapter = trained(model, LoraConfig(r=4, alpha=8, rslora=True, targets="q_proj,v_proj,down_proj"))
    checkpoint.save_adapter(tmp_path / "a", adapter, model)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        shapes = {k: tuple(f.get_tensor(k).shape) for k in keys}
    assert keys == [
        "layers.0.attn.q_proj.lora_A", "layers.0.attn.q_proj.lora_B",
        "layers.0.attn.v_proj.lora_A", "layers.0.attn.v_proj.lora_B",
        "layers.0.mlp.down_proj.lora_A", "layers.0.mlp.down_proj.lora_B",
        "layers.1.attn.q_proj.lora_A", "layers.1.attn.q_proj.lora_B",
        "layers.1.attn.v_proj.lora_A", "layers.1.attn.v_proj.lora_B",
        "layers.1.mlp.down_proj.lora_A", "layers.1.mlp.down_proj.lora_B",
    ]
    assert shapes["layers.0.attn.q_proj.lora_A"] == (4, 32) and shapes["layers.0.attn.q_proj.lora_B"] == (32, 4)
    assert shapes["layers.1.mlp.down_proj.lora_A"] == (4, 96) and shapes["layers.1.mlp.down_proj.lora_B"] == (32, 4)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["r"] == 4 and meta["lora_alpha"] == 8 and meta["use_rslora"] is True and meta["peft_type"] == "LORA"
    assert meta["target_modules"] == ["q_proj", "v_proj", "down_proj"] and meta["lora_dropout"] == 0.0
    assert meta["base_fingerprint"] == model.base_fingerprint() and meta["base_model_config"] == CFG.to_dict()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_load_roundtrip(model, ids, tmp_path):
    adapter = trained(model, LoraConfig(r=4, alpha=8, rslora=True, targets="q_proj,v_proj,down_proj"))
    checkpoint.save_adapter(tmp_path / "a", adapter, model)
    loaded = checkpoint.load_adapter(tmp_path / "a", model)
    assert loaded.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), adapter.parameters()))
    assert torch.equal(model(ids, adapters=loaded), model(ids, adapters=adapter))
    adapter.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        checkpoint.save_adapter(tmp_path / "b", adapter, model)


def test_load_refuses_other_bases(model, tmp_path):
    checkpoint.save_adapter(tmp_path / "a", trained(model), model)
    other_shape = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=32, context_len=64, mlp_hidden=64))
    with pytest.raises(H2QError, match="another base shape"):
        checkpoint.load_adapter(tmp_path / "a", other_shape)
    torch.manual_seed(5)
    retrained = Transformer(CFG)
    with pytest.raises(H2QError, match="was trained on base .*; load it with the base it was trained on"):
        checkpoint.load_adapter(tmp_path / "a", retrained)
    assert isinstance(checkpoint.load_adapter(tmp_path / "a", retrained, check_fingerprint=False), LoraAdapter)
    with pytest.raises(H2QError, match="no LoRA adapter"):
        checkpoint.load_adapter(tmp_path / "missing", model)
    (tmp_path / "a" / checkpoint.ADAPTER_FILE).write_bytes(b"garbage")
    with pytest.raises(H2QError, match="corrupt"):
        checkpoint.load_adapter(tmp_path / "a", model)


def test_count_bytes(model):
    adapter = LoraAdapter(model, LoraConfig(r=4))
    per_layer = 4 * (4 * 2 * CFG.d_model + 2 * (CFG.d_model + CFG.mlp_hidden) + (CFG.mlp_hidden + CFG.d_model))
    assert lora.count_bytes(adapter) == 4 * CFG.n_layer * per_layer
    assert lora.count_bytes(AdapterBank(model, LoraConfig(r=4), n=5)) == 5 * lora.count_bytes(adapter)


# -- arithmetic ----------------------------------------------------------------------------------------
def assert_fresh_storage(result, *inputs):
    ptrs = {p.data_ptr() for a in inputs for p in a.parameters()}
    assert all(p.data_ptr() not in ptrs for p in result.parameters())


def test_factor_arithmetic(model):
    a, b, c = (trained(model, seed=s) for s in range(3))
    snapshot = [p.clone() for x in (a, b, c) for p in x.parameters()]
    avg = lora.average_factors([a, b, c], weights=[2, 1, 1])
    plus, minus = lora.add(a, b, scale=0.5), lora.difference(a, b)
    for j in range(len(a.lora_A)):
        assert torch.allclose(avg.lora_A[j], 0.5 * a.lora_A[j] + 0.25 * (b.lora_A[j] + c.lora_A[j]))
        assert torch.allclose(plus.lora_B[j], a.lora_B[j] + 0.5 * b.lora_B[j])
        assert torch.allclose(minus.lora_A[j], a.lora_A[j] - b.lora_A[j])
    for result in (avg, plus, minus):
        assert_fresh_storage(result, a, b, c)
        with torch.no_grad():
            for p in result.parameters():
                p.add_(1.0)
    assert all(torch.equal(p, q) for p, q in zip(snapshot, [p for x in (a, b, c) for p in x.parameters()]))


def test_product_space_merge_is_exact_within_rank(model):
    a = trained(model, LoraConfig(r=2, alpha=4), seed=1)
    b = trained(model, LoraConfig(r=3, alpha=4), seed=2)
    merged = lora.merge_product_space([a, b], weights=[3, 1], rank=5)
    assert merged.config.r == 5
    assert_fresh_storage(merged, a, b)
    factor_avg_error = 0.0
    same_rank = trained(model, LoraConfig(r=2, alpha=4), seed=3)
    naive = lora.average_factors([a, same_rank])
    for key in a.slot:
        target = 0.75 * a.delta(key) + 0.25 * b.delta(key)
        assert (merged.delta(key) - target).abs().max() <= 1e-6
        factor_avg_error += (naive.delta(key) - 0.5 * (a.delta(key) + same_rank.delta(key))).abs().max()
    assert factor_avg_error > 1e-3  # averaging factors is a different (approximate) operation


def test_product_space_merge_truncates_to_best_rank(model):
    a, b = trained(model, seed=1), trained(model, seed=2)  # rank 4 each, combined rank 8
    merged = lora.merge_product_space([a, b], rank=4)
    key = "layers.1.mlp.down_proj"
    target = 0.5 * (a.delta(key) + b.delta(key))
    S = torch.linalg.svdvals(target.double())
    best = torch.linalg.matrix_norm(target.double() - merged.delta(key).double(), ord=2)
    assert torch.isclose(best, S[4], rtol=1e-4)  # Eckart-Young: spectral error = 5th singular value


def test_over_h2q_int8_base(model, ids):
    from h2q import quant
    adapter = trained(model)
    quant.quantize(model, "int8", clip_search=False)
    with pytest.raises(H2QError, match="quantized"):
        adapter.merge(model)
    assert not torch.equal(model(ids, adapters=adapter), model(ids))
    model(ids, adapters=adapter).logsumexp(-1).mean().backward()  # QLoRA: train over the int8 base
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    bank = AdapterBank.from_adapters([adapter, trained(model, seed=1)])
    with torch.inference_mode():
        out = model(ids, adapters=bank.bind([1, 0, -1, 0]))
        assert (out[1] - model(ids[1:2], adapters=adapter)[0]).abs().max() <= 1e-5
        assert (out[2] - model(ids[2:3])[0]).abs().max() <= 1e-5


def test_bf16_autocast_train_and_serve(model, ids):
    """Under autocast the linears' outputs are bf16 while x and the factors stay fp32."""
    lora.freeze_base(model)
    adapter = trained(model)
    bank = AdapterBank.from_adapters([adapter, trained(model, seed=1)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids, adapters=adapter)
        model(ids, adapters=bank.bind([0, 1, -1, 0])).float().logsumexp(-1).mean().backward()
        with torch.inference_mode():
            out = model(ids, adapters=bank.bind([0, 0, 0, 0]))
    assert all(p.grad is not None for p in bank.parameters())
    assert (out.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()  # bf16 rounding
