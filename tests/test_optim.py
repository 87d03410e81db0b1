"""The bank optimizer: every slot is its own AdamW run (per-slot lr = separate runs, bit for bit against
one-slot banks and close to torch.optim.AdamW), inactive slots stay bit-exact, reset restarts a slot,
state_dict round trips continue bit for bit; and torch optimizer state to flat tensors and back."""
import pytest
import torch
from safetensors.torch import load, save

from h2q.errors import H2QError
from h2q.optim import BankAdamW, torch_state_from_tensors, torch_state_to_tensors

SHAPES = [(3, 4, 5), (3, 6)]  # two tensors of a 3-slot bank
LRS = torch.tensor([1e-2, 3e-3, 0.03])


def bank(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def grads(steps, seed=1, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def run(opt, params, gradients, lr, active=None):
    for gs in gradients:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step(lr, active)
        opt.zero_grad()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_per_slot_lr_equals_separate_runs(weight_decay):
    params, gradients = bank(), grads(6)
    run(BankAdamW(params, betas=(0.9, 0.99), weight_decay=weight_decay), params, gradients, LRS)
    for slot in range(3):
        alone = [p[slot:slot + 1].clone() for p in bank()]  # a one-slot bank of this slot's start
        run(BankAdamW(alone, betas=(0.9, 0.99), weight_decay=weight_decay), alone,
            [[g[slot:slot + 1] for g in gs] for gs in gradients], float(LRS[slot]))
        assert all(torch.equal(p[slot:slot + 1], a) for p, a in zip(params, alone))
        reference = [p[slot].clone().requires_grad_() for p in bank()]
        torch_opt = torch.optim.AdamW(reference, lr=float(LRS[slot]), betas=(0.9, 0.99), weight_decay=weight_decay,
                                      foreach=False)
        for gs in gradients:
            for r, g in zip(reference, gs):
                r.grad = g[slot].clone()
            torch_opt.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p[slot], r.detach(), rtol=1e-5, atol=1e-7)


def test_inactive_slots_stay_bit_exact():
    params, gradients = bank(), grads(5)
    opt = BankAdamW(params, weight_decay=0.1)
    run(opt, params, gradients[:2], LRS)
    before = [p.clone() for p in params], opt.state_dict()
    for gs in gradients[2:]:  # slot 1 is off, and its gradient is garbage
        for p, g in zip(params, gs):
            g[1] = float("nan")
            p.grad = g
        opt.step(LRS, torch.tensor([True, False, True]))
    after = opt.state_dict()
    assert all(torch.equal(p[1], b[1]) for p, b in zip(params, before[0]))
    assert all(torch.equal(after[k][1], before[1][k][1]) for k in after)
    assert after["steps"].tolist() == [5, 2, 5]
    assert all(not torch.equal(p[0], b[0]) and torch.isfinite(p).all() for p, b in zip(params, before[0]))


def test_reset_restarts_one_slot():
    params, gradients = bank(), grads(8)
    opt = BankAdamW(params)
    run(opt, params, gradients[:4], LRS)
    opt.reset([1])
    state = opt.state_dict()
    assert state["steps"].tolist() == [4, 0, 4]
    assert all(state[k][1].abs().max() == 0 and state[k][0].abs().max() > 0 for k in state if k != "steps")
    fresh = [p[1:2].clone() for p in params]  # slot 1 from here on == a new optimizer on its weights
    run(opt, params, gradients[4:], LRS)
    run(BankAdamW(fresh), fresh, [[g[1:2] for g in gs] for gs in gradients[4:]], float(LRS[1]))
    assert all(torch.equal(p[1:2], f) for p, f in zip(params, fresh))


def test_state_dict_round_trip_continues_bit_exact():
    params, gradients = bank(), grads(8)
    opt = BankAdamW(params, weight_decay=0.05)
    run(opt, params, gradients[:3], LRS, torch.tensor([True, False, True]))
    state = opt.state_dict()
    assert sorted(state) == ["m.0", "m.1", "steps", "v.0", "v.1"]
    saved = load(save(state))  # through safetensors: tensors only
    resumed = [p.clone() for p in params]
    other = BankAdamW(resumed, weight_decay=0.05)
    other.load_state_dict(saved)
    run(opt, params, gradients[3:], LRS)
    run(other, resumed, gradients[3:], LRS)
    assert all(torch.equal(p, r) for p, r in zip(params, resumed))
    assert all(torch.equal(a, b) for a, b in zip(opt.state_dict().values(), other.state_dict().values()))


def test_load_state_dict_rejects_another_shape_and_changes_nothing():
    opt = BankAdamW(bank())
    state = opt.state_dict()
    with pytest.raises(H2QError, match="missing"):
        BankAdamW(bank()).load_state_dict({k: v for k, v in state.items() if k != "v.1"})
    other = BankAdamW(bank(shapes=[(3, 4, 5), (3, 7)]))
    with pytest.raises(H2QError, match="m.1 has shape"):
        other.load_state_dict({**state, "steps": torch.ones(3, dtype=torch.int64)})
    assert other.state_dict()["steps"].tolist() == [0, 0, 0]


def test_torch_optimizer_state_to_tensors_and_back():
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))

    def optimizer(m):
        decay = [p for p in m.parameters() if p.dim() >= 2]
        rest = [p for p in m.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-2)

    def steps(m, opt, n, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            m(torch.randn(8, 4, generator=gen)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()

    a, b = model(), model()
    opt_a, opt_b = optimizer(a), optimizer(b)
    steps(a, opt_a, 3, seed=1)
    tensors, groups = torch_state_to_tensors(opt_a.state_dict())
    assert sorted(tensors) == [f"{i}.{name}" for i in range(4) for name in ("exp_avg", "exp_avg_sq", "step")]
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(torch_state_from_tensors(load(save(tensors)), groups))
    steps(a, opt_a, 3, seed=2)
    steps(b, opt_b, 3, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
