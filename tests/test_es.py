"""The evolution strategy of the `evolution` arm (h2q/evolve/es.py) on tiny configs."""
import numpy as np
import torch

from h2q.config import PRESETS
from h2q.evolve.es import EvolutionStrategy, centred_ranks, make_strategy
from h2q.lora import LoraConfig

CFG = PRESETS["tiny"]


def strategy(n=9, dim=8, sigma=0.5, lr=0.2, seed=3) -> EvolutionStrategy:
    return make_strategy(CFG, LoraConfig(r=2), n, dim, sigma, lr, torch.Generator().manual_seed(0), seed)


def test_centred_ranks():
    assert np.allclose(centred_ranks([3.0, 1.0, 2.0]), [0.5, -0.5, 0.0])
    assert np.allclose(centred_ranks([1.0, 1.0, 5.0, 0.0]), [0.0, 0.0, 0.5, -0.5])  # ties share a rank


def test_ask_gives_the_centre_and_antithetic_pairs_on_a_shared_a():
    es = strategy(n=6)
    adapters = es.ask(torch.Generator().manual_seed(1))
    assert len(adapters) == 6 and torch.equal(es.eps[0], torch.zeros(es.dim))
    assert torch.equal(es.eps[1], -es.eps[2]) and torch.equal(es.eps[3], -es.eps[4])  # the 6th is unpaired
    assert all(torch.equal(a.lora_A[k], adapters[0].lora_A[k]) for a in adapters for k in range(len(a.lora_A)))
    assert all(b.abs().max() == 0 for b in adapters[0].lora_B)  # the first centre is the base itself
    # B is linear in the point: the two halves of a pair are mirror images
    assert all(torch.allclose(p, -q, atol=1e-7) for p, q in zip(adapters[1].lora_B, adapters[2].lora_B))


def test_climbs_a_known_landscape_and_adapts_sigma():
    """Fitness = -|z - target|^2 of each agent's point: the centre must approach the target."""
    es, g = strategy(n=21, dim=8, sigma=0.5, lr=0.2), torch.Generator().manual_seed(2)
    target = torch.full((8,), 2.0, dtype=torch.float64)
    start = float((es.z - target).norm())
    sigmas = []
    for _ in range(60):
        es.ask(g)
        points = es.z + es.sigma * es.eps
        es.tell((-(points - target).pow(2).sum(1)).numpy())
        sigmas.append(es.sigma)
    assert float((es.z - target).norm()) < 0.2 * start
    assert len(set(sigmas)) > 1  # the 1/5th rule moved sigma


def test_state_round_trip_continues_bit_for_bit():
    es, other = strategy(), strategy()
    es.ask(torch.Generator().manual_seed(4))
    es.tell(np.arange(9.0))
    other.load_state_dict({k: v.clone() for k, v in es.state_dict().items()})
    a = es.ask(torch.Generator().manual_seed(5))
    b = other.ask(torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p.parameters(), q.parameters()))
    assert set(es.state_dict()) == {f"A.{i}" for i in range(14)} | {"counts", "eps", "m", "sigma", "v", "z"}
