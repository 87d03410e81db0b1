"""Optimizer state as tensors, and the one optimizer of adapter banks.

`BankAdamW` is Adam (Kingma & Ba 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter 2019)
over tensors whose leading dim is the slot, as an AdapterBank stacks its adapters (h2q/lora.py). Every
slot is its own optimizer run: its own learning rate (a per-slot tensor passed to `step`), its own
step count (bias correction), an `active` mask that leaves the other slots' weights and moments bit
for bit, and `reset` of a slot whose adapter was replaced. Nothing couples slots, so slot i of a bank
steps exactly as a one-slot bank would: the bias corrections are computed per slot on the host, in
double precision, so no slot's numbers depend on where it sits in a vectorised kernel.
`state_dict()` is tensors only, for safetensors.

`Optimizers` steps several torch optimizers over disjoint parameters as one (Muon on the hidden
matrices with AdamW on the rest, as modded-nanogpt does), with one torch-format state_dict.

`torch_state_to_tensors` / `torch_state_from_tensors` turn a torch.optim state_dict into flat tensors
plus its param groups as JSON (safetensors metadata holds strings only) and back.
"""
from __future__ import annotations

import json

import torch

from h2q.errors import H2QError


def check_state(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Raise unless `tensors` has exactly `expected`'s keys and shapes (before anything is loaded)."""
    if tensors.keys() != expected.keys():
        raise H2QError(f"{what} state does not fit (missing {sorted(expected.keys() - tensors.keys())[:3]}, "
                       f"unexpected {sorted(tensors.keys() - expected.keys())[:3]}); it was saved by another "
                       f"version or configuration")
    for key, t in expected.items():
        if tensors[key].shape != t.shape:
            raise H2QError(f"{what} state: {key} has shape {tuple(tensors[key].shape)}, this {what} needs "
                           f"{tuple(t.shape)}; it was saved for another configuration")


class BankAdamW:
    """AdamW over `params` ((n, ...) tensors, slot first) with n independent slots."""

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = list(params)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(self.params[0].shape[0], dtype=torch.int64, device=self.params[0].device)
        assert all(p.shape[0] == len(self.steps) for p in self.params), "every tensor needs one row per slot"

    @torch.no_grad()
    def step(self, lr, active: torch.Tensor | None = None) -> None:
        """One step from the tensors' .grad (None = zero) for the `active` slots ((n,) bool, default all)
        at `lr`, a float or a per-slot (n,) tensor; inactive slots stay bit for bit."""
        n, device = len(self.steps), self.steps.device
        on = torch.ones(n, dtype=torch.bool, device=device) if active is None else active.to(device)
        b1, b2 = self.betas
        self.steps += on
        t = self.steps.clamp(min=1).tolist()
        bc1 = torch.tensor([1 - b1 ** s for s in t], device=device)  # (n,) bias corrections, per slot
        bc2 = torch.tensor([1 - b2 ** s for s in t], device=device)
        lr = torch.as_tensor(lr, dtype=torch.float32, device=device).expand(n)
        masked = not bool(on.all())
        for p, m, v in zip(self.params, self.m, self.v):
            per_slot = (-1,) + (1,) * (p.dim() - 1)  # broadcast (n,) over (n, ...)
            slot_on, rate = on.view(per_slot), lr.view(per_slot)

            def keep_off(new, old):  # the new value for active slots, the old one bit for bit elsewhere
                return torch.where(slot_on, new, old) if masked else new

            g = p.grad if p.grad is not None else torch.zeros_like(p)
            m.copy_(keep_off(b1 * m + (1 - b1) * g, m))
            v.copy_(keep_off(b2 * v + (1 - b2) * g * g, v))
            moved = p * (1 - rate * self.weight_decay) if self.weight_decay else p
            update = rate * (m / bc1.view(per_slot)) / ((v / bc2.view(per_slot)).sqrt() + self.eps)
            p.copy_(keep_off(moved - update, p))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def reset(self, slots) -> None:
        """Forget the moments and step counts of `slots` (their adapters were replaced)."""
        index = torch.as_tensor(list(slots), dtype=torch.int64, device=self.steps.device)
        for m, v in zip(self.m, self.v):
            m[index] = 0
            v[index] = 0
        self.steps[index] = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the moments ("m.i", "v.i" for params[i]) and the per-slot step counts ("steps")."""
        out = {"steps": self.steps}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            out.update({f"m.{i}": m, f"v.{i}": v})
        return {k: t.detach().clone() for k, t in out.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a `state_dict()` into this optimizer's tensors (all checked before any is changed)."""
        own = {"steps": self.steps}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            own.update({f"m.{i}": m, f"v.{i}": v})
        check_state(tensors, own, "optimizer")
        for k, t in own.items():
            t.copy_(tensors[k])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.m, *self.v, self.steps])


class Optimizers:
    """torch optimizers over disjoint parameters, stepped, zeroed and saved as one. `param_groups`
    lists every group of every optimizer, in order; `state_dict()` is torch's format with the
    parameters numbered across all of them, so what saves one torch optimizer saves this."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:  # read afresh: torch's load_state_dict replaces the groups
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            own = o.state_dict()
            state.update({index + offset: s for index, s in own["state"].items()})
            groups += [{**g, "params": [index + offset for index in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Split a `state_dict()` back by optimizer (its groups must match them one for one)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise H2QError(f"optimizer state has {len(groups)} param groups, this run has {len(self.param_groups)}; "
                           f"it was saved for another --optimizer")
        offset, first = 0, 0
        for o in self.optimizers:
            own = groups[first:first + len(o.param_groups)]
            count = sum(len(g["params"]) for g in own)
            o.load_state_dict({
                "state": {index - offset: s for index, s in state_dict["state"].items()
                          if offset <= index < offset + count},
                "param_groups": [{**g, "params": [index - offset for index in g["params"]]} for g in own]})
            offset, first = offset + count, first + len(o.param_groups)


def torch_state_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], str]:
    """A torch.optim state_dict -> ({"{param index}.{name}": tensor}, its param_groups as JSON)."""
    tensors = {f"{index}.{name}": torch.as_tensor(value)
               for index, state in state_dict["state"].items() for name, value in state.items()}
    return tensors, json.dumps(state_dict["param_groups"])


def torch_state_from_tensors(tensors: dict[str, torch.Tensor], param_groups: str) -> dict:
    """The inverse of `torch_state_to_tensors`: a state_dict for torch.optim's load_state_dict."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value  # load_state_dict casts and places it
    return {"state": state, "param_groups": json.loads(param_groups)}
