"""Evolution's genetic operators on adapters (h2q/evolve/evolution.py): Gaussian mutation relative to
each tensor's RMS, and crossover that takes whole layers from either parent."""
import torch

from h2q.config import PRESETS, ModelConfig
from h2q.evolve.evolution import layer_crossover, mutate
from h2q.lora import LoraAdapter, LoraConfig
from h2q.model import Transformer


def model_of(cfg=PRESETS["tiny"]):
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def trained(model, config=LoraConfig(r=4), seed=0, scale=0.05):
    """An adapter with nonzero A and B, as if trained."""
    g = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(model, config, generator=g)
    with torch.no_grad():
        for b in adapter.lora_B:
            b.copy_(torch.randn(b.shape, generator=g) * scale)
    return adapter


def assert_fresh_storage(result, *inputs):
    ptrs = {p.data_ptr() for a in inputs for p in a.parameters()}
    assert all(p.data_ptr() not in ptrs for p in result.parameters())


def test_mutation_scale_and_fresh_b():
    model = model_of()
    parent = LoraAdapter(model, LoraConfig(r=8))  # fresh: B == 0
    child = mutate(parent, rate=0.1, generator=torch.Generator().manual_seed(0))
    assert_fresh_storage(child, parent)
    for j in range(len(parent.lora_A)):
        a_rms = parent.lora_A[j].pow(2).mean().sqrt()
        noise_a = (child.lora_A[j] - parent.lora_A[j]).std()
        noise_b = child.lora_B[j].std()
        assert 0.07 * a_rms < noise_a < 0.13 * a_rms  # rate * RMS of A
        assert 0.07 * a_rms < noise_b < 0.13 * a_rms  # zero B borrows A's RMS
    assert torch.count_nonzero(parent.lora_B[0]) == 0
    again = mutate(parent, rate=0.1, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(child.parameters(), again.parameters()))


def test_crossover_takes_whole_layers():
    model = Transformer(ModelConfig(n_layer=6, n_head=2, d_model=32, context_len=64, mlp_hidden=96))
    a, b = trained(model, seed=1), trained(model, seed=2)
    parents = set()
    for seed in range(4):
        child = layer_crossover(a, b, generator=torch.Generator().manual_seed(seed))
        assert_fresh_storage(child, a, b)
        for layer in range(6):
            keys = [k for k in child.slot if k.startswith(f"layers.{layer}.")]
            sources = {"a" if torch.equal(child.lora_A[child.slot[k]], a.lora_A[a.slot[k]]) else "b" for k in keys}
            assert len(sources) == 1
            src = a if sources == {"a"} else b
            assert all(torch.equal(child.lora_B[child.slot[k]], src.lora_B[src.slot[k]]) for k in keys)
            parents |= sources
    assert parents == {"a", "b"}  # 24 fair coin flips: both parents show up
