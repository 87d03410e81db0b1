"""The `evolution` strategy: a natural evolution strategy over the agents' adapters, no gradients.

OpenAI-ES (Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning"), in a random low-dimensional subspace of the LoRA factors, with a step size adapted per
generation:

* The search space. Every agent's adapter shares one A per linear, the population's Kaiming init
  (as LoRA-FA freezes A, Zhang et al. 2023), and its B is `scale * P @ z`: z is a point of R^dim, P a
  fixed random (D, dim) matrix with N(0, 1/dim) entries over the D entries of all B factors, and
  `scale` the RMS of the shared A, so a unit z gives B entries on A's scale. Searching dim (64 by
  default) numbers instead of D (tens of thousands) is the random-subspace idea of Li et al. 2018
  ("Measuring the Intrinsic Dimension of Objective Landscapes"): a small population finds what a
  task needs when its intrinsic dimension is low. P is regenerated from its seed, never stored.
* A generation. The search distribution's centre z_c sits in slot 0 (evaluated like everyone, so
  the run always holds the current solution); the other slots are antithetic pairs z_c +- sigma
  eps_k (mirrored sampling, Brockhoff et al. 2010; with an odd count the last slot is unpaired).
* The update. Fitness becomes centred ranks in [-0.5, 0.5] (the fitness shaping of Wierstra et al.
  2014, NES; it ignores the fitness scale and outliers), the search gradient is
  g = sum_i u_i eps_i / (n sigma), and Adam (Kingma & Ba 2015, as Salimans et al. did) moves z_c up it.
* The step size: the 1/5th success rule (Rechenberg 1973; Schwefel's form): when more than a fifth
  of the perturbations beat the centre, sigma grows by 1/0.85, else it shrinks by 0.85, within
  SIGMA_RANGE.

State (`state_dict`): z_c, Adam's moments and step, sigma, this generation's eps, the shared A
factors, the subspace seed; resume continues bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from h2q.config import ModelConfig
from h2q.lora import LoraAdapter, LoraConfig

SUCCESS_RATE, SIGMA_FACTOR = 0.2, 0.85  # the 1/5th rule
SIGMA_RANGE = (1e-3, 10.0)
BETAS, EPS = (0.9, 0.999), 1e-8


def centred_ranks(fitness) -> np.ndarray:
    """Fitness (n,) -> ranks scaled to [-0.5, 0.5] (ties share their mean rank)."""
    f = np.asarray(fitness, dtype=np.float64)
    n = len(f)
    if n < 2:
        return np.zeros(n)
    order = np.argsort(f, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    for value in np.unique(f):  # equal fitness, equal rank
        tied = f == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (n - 1) - 0.5


class EvolutionStrategy:
    """The search distribution over n agents' adapters (see the module docstring)."""

    def __init__(self, init: LoraAdapter, n: int, dim: int = 64, sigma: float = 0.5, lr: float = 0.2,
                 seed: int = 0):
        assert n >= 2, "a centre and at least one perturbation"
        self.base_config, self.config = init.base_config, init.config
        self.n, self.dim, self.lr, self.seed = n, dim, lr, seed
        self.A = [a.detach().clone() for a in init.lora_A]  # shared by every agent
        self.b_shapes = [tuple(b.shape) for b in init.lora_B]
        self.scale = float(torch.cat([a.flatten() for a in self.A]).pow(2).mean().sqrt())
        self.z = torch.zeros(dim, dtype=torch.float64)
        self.m, self.v, self.t = torch.zeros_like(self.z), torch.zeros_like(self.z), 0
        self.sigma = sigma
        self.eps = torch.zeros(n, dim, dtype=torch.float64)
        self.last: dict = {}  # what the last update did, for the metrics record
        self._basis = None

    # -- the subspace ------------------------------------------------------------------------------
    @property
    def basis(self) -> torch.Tensor:
        """P: (D, dim), N(0, 1/dim) entries, from the seed (made once per process)."""
        if self._basis is None:
            size = sum(math.prod(s) for s in self.b_shapes)
            g = torch.Generator().manual_seed(self.seed)
            self._basis = torch.randn(size, self.dim, generator=g) / math.sqrt(self.dim)  # (D, dim)
        return self._basis

    def adapter(self, z: torch.Tensor) -> LoraAdapter:
        """The adapter at point z: the shared A, B = scale * P @ z."""
        out = LoraAdapter(self.base_config, self.config, init=False)
        flat = (self.basis @ z.float()) * self.scale  # (D,)
        with torch.no_grad():
            start = 0
            for A, B, a, shape in zip(out.lora_A, out.lora_B, self.A, self.b_shapes):
                size = math.prod(shape)
                A.copy_(a)
                B.copy_(flat[start:start + size].view(shape))  # (out, r)
                start += size
        return out

    # -- one generation ----------------------------------------------------------------------------
    def ask(self, generator: torch.Generator) -> list[LoraAdapter]:
        """This generation's n adapters: the centre, then antithetic pairs around it."""
        pairs = (self.n - 1) // 2
        noise = torch.randn(pairs + (self.n - 1) % 2, self.dim, generator=generator, dtype=torch.float64)
        eps = [torch.zeros(self.dim, dtype=torch.float64)]
        for k in range(pairs):
            eps += [noise[k], -noise[k]]
        if (self.n - 1) % 2:
            eps.append(noise[-1])
        self.eps = torch.stack(eps)  # (n, dim); row 0 is the centre
        return [self.adapter(self.z + self.sigma * e) for e in self.eps]

    def tell(self, fitness) -> dict:
        """Update the centre and sigma from this generation's fitness (n,); returns what happened
        (also kept as `last`)."""
        f = np.asarray(fitness, dtype=np.float64)
        assert f.shape == (self.n,), f"one fitness per agent, got shape {f.shape}"
        u = torch.as_tensor(centred_ranks(f[1:]))  # the perturbations; the centre is eps 0
        grad = (u[:, None] * self.eps[1:]).sum(0) / ((self.n - 1) * self.sigma)  # (dim,)
        self.t += 1
        b1, b2 = BETAS
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        step = self.lr * (self.m / (1 - b1 ** self.t)) / ((self.v / (1 - b2 ** self.t)).sqrt() + EPS)
        self.z = self.z + step
        success = float((f[1:] > f[0]).mean())
        factor = 1 / SIGMA_FACTOR if success > SUCCESS_RATE else SIGMA_FACTOR
        self.sigma = float(min(max(self.sigma * factor, SIGMA_RANGE[0]), SIGMA_RANGE[1]))
        self.last = {"es_success": success, "es_sigma": self.sigma, "es_step": float(step.norm())}
        return self.last

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"z": self.z, "m": self.m, "v": self.v, "eps": self.eps,
               "sigma": torch.tensor([self.sigma], dtype=torch.float64),
               "counts": torch.tensor([self.t, self.seed, self.dim], dtype=torch.int64)}
        out.update({f"A.{i}": a for i, a in enumerate(self.A)})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        t, seed, dim = state["counts"].tolist()
        assert dim == self.dim and seed == self.seed, "an ES state of another subspace"
        self.z, self.m, self.v = (state[k].clone() for k in ("z", "m", "v"))
        self.eps, self.t, self.sigma = state["eps"].clone(), t, float(state["sigma"][0])
        self.A = [state[f"A.{i}"].clone() for i in range(len(self.A))]


def make_strategy(base_config: ModelConfig, config: LoraConfig, n: int, dim: int, sigma: float, lr: float,
                  generator: torch.Generator, seed: int) -> EvolutionStrategy:
    """A search distribution centred on the base (B = 0), with a fresh Kaiming A shared by all."""
    return EvolutionStrategy(LoraAdapter(base_config, config, generator=generator), n, dim, sigma, lr, seed)
