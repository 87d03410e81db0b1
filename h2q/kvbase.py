"""The KV-cache protocol and the uncompressed cache; every policy (h2q/kvcompress.py) builds on these.

A cache implements the protocol in h2q/model.py: `update(layer, q, k, v, rotary)` gets this step's
pre-rotary queries/keys/values (B, nh, T, hs), stores what it keeps and returns (rotated q, keys,
values, mask) for scaled_dot_product_attention; `advance(T)` closes the step. The cache owns
positions: rotary angles come from positions it tracks per row, so rows of a batch may have different
histories.

* Pad masks: every forward writes all rows at the same slots. `set_pad_mask(valid)` (True = real
  token) before a forward whose (B, T) block holds PAD filler; pad slots are never attended to by
  other tokens and do not advance their row's position, so a row's logits equal the row run alone.
* Prefix sharing (`SlotCache(prefix=)`): the batch stores only its own tokens; each layer attends over
  [prefix ; own] by concatenating the batch-1 prefix's K/V, expand()ed over rows (a per-step
  temporary, never stored per row). `truncate(length)` rewinds the own part cheaply. The prefix must
  not change while a cache refers to it.
* Rotary as one complex multiply: caches keep keys, and return keys and queries, with channel i of the
  model's half-split rotary layout next to channel i + hs/2, so a rotation is a single complex product
  with angles from `rotary.cos_sin`. Attention only uses q.k, which permuting the channels of both
  alike leaves unchanged; values are untouched.
* Memory: `nbytes` is the sum of numel * element_size over the tensors the cache holds (`tensors()`),
  bookkeeping included; a shared prefix is counted by the prefix cache, not by its users.
* Saving: between forwards, `state_dict()` is everything a cache holds, its make_cache arguments
  (policy, options, batch size, max_len, dtype) and counters as plain values and its tensors (the
  written part only: slots a cache never reads are left out); `load_state_dict` into a cache made
  alike restores it exactly, so the next forward gives the same logits bit for bit. A state that does
  not fit the cache raises H2QError and changes nothing. A shared prefix is not part of its users'
  state (it has its own): restore a user into a cache made with the same prefix. The file format is
  h2q/checkpoint.py's (`save_cache`, `load_cache`).
"""
from __future__ import annotations

import torch

from h2q.config import ModelConfig
from h2q.errors import H2QError

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # state tensor name -> (shape, dtype)


def pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., hs) in the model's half-split layout -> (..., hs/2) complex: (x[i], x[i + hs/2]) pairs."""
    return torch.view_as_complex(torch.stack(x.float().chunk(2, dim=-1), dim=-1))


def as_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., hs) already interleaved -> its (..., hs/2) complex view (no copy)."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def interleaved(z: torch.Tensor, dtype) -> torch.Tensor:
    """(..., hs/2) complex -> (..., hs) real, the pairs side by side."""
    return torch.view_as_real(z).flatten(-2).to(dtype)


def angles(rotary, pos: torch.Tensor) -> torch.Tensor:
    """Rotary angles of positions (T,) or (B, T) as unit complex numbers, (1 or B, 1, T, hs/2)."""
    return torch.complex(*rotary.cos_sin(pos))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def per_layer(tensors: list[torch.Tensor], end: int | None = None) -> torch.Tensor:
    """One tensor per layer, (B, nh, S, hs) each (the first `end` slots) -> (n_layer, B, nh, S, hs)."""
    return torch.stack([t[:, :, :end] for t in tensors])


class KVCache:
    """What all policies share: per-row positions, the pad mask of the coming forward, accounting."""

    policy: str  # the name h2q/kvcache.py's make_cache knows the class by
    evicts = False  # True for policies that drop tokens to stay within max_len
    prefill_chunk: int  # tokens per forward that `prefill` uses

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size {batch_size} and max_len {max_len} must be positive")
        self.n_layer, self.n_head, self.head_dim = cfg.n_layer, cfg.n_head, cfg.head_dim
        self.batch_size, self.max_len = batch_size, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # next position per row
        self._new_valid = None  # (B, T) bool for the coming forward, None = all real tokens
        self._step = None  # per-forward state computed by the first layer, dropped by advance()

    def set_pad_mask(self, valid: torch.Tensor | None) -> None:
        """Mark which tokens of the next forward's (B, T) block are real (True) and which are PAD
        filler; applies to that one forward only."""
        if valid is not None:
            valid = valid.to(self.device, torch.bool)
            assert valid.dim() == 2 and valid.shape[0] == self.batch_size, f"pad mask {tuple(valid.shape)}"
            if bool(valid.all()):
                valid = None
        self._new_valid = valid

    def _new_positions(self, T: int) -> torch.Tensor:
        """Positions of this forward's tokens, (B, T): a pad shares the position of the token before
        it, so a row's real tokens are numbered as if the row ran alone."""
        valid = self._new_valid
        if valid is None:
            return self.pos[:, None] + torch.arange(T, device=self.device)
        assert valid.shape[1] == T, f"pad mask covers {valid.shape[1]} tokens, the forward has {T}"
        return self.pos[:, None] + valid.cumsum(1) - 1

    def advance(self, T: int) -> None:
        self.pos += T if self._new_valid is None else self._new_valid.sum(1)
        self._new_valid = self._step = None

    def reset(self) -> None:
        self.truncate(0)

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # -- saving and restoring ---------------------------------------------------------------------
    def options(self) -> dict:
        """The policy's own make_cache options (group=, sinks=, recent=) as plain values."""
        return {}

    def state_dict(self) -> dict:
        """{policy, options, batch_size, max_len, dtype, counters: plain values, tensors: name ->
        a copy}: everything the cache holds between forwards."""
        assert self._new_valid is None and self._step is None, "a cache is saved between forwards"
        return {"policy": self.policy, "options": self.options(), "batch_size": self.batch_size,
                "max_len": self.max_len, "dtype": dtype_name(self.dtype), "counters": self._counters(),
                "tensors": self._state_tensors()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` of a cache made alike (same policy, options, sizes, dtype, prefix
        length); H2QError, with nothing changed, for any state that does not fit."""
        assert self._new_valid is None and self._step is None, "a cache is restored between forwards"
        if not isinstance(state, dict):
            raise H2QError(f"a cache state is a dict, not {type(state).__name__}")
        mine = {"policy": self.policy, "options": self.options(), "batch_size": self.batch_size,
                "max_len": self.max_len, "dtype": dtype_name(self.dtype)}
        for key, value in mine.items():
            if state.get(key) != value:
                raise H2QError(f"the cache state has {key} {state.get(key)!r} where this cache has {value!r}; "
                               f"make the cache from the state (h2q.kvcache.cache_from_state)")
        counters, tensors = state.get("counters"), state.get("tensors")
        names = self._counters().keys()
        if (not isinstance(counters, dict) or counters.keys() != names
                or not all(type(v) is int for v in counters.values())):
            raise H2QError(f"the cache state's counters must be the integers {sorted(names)}, got {counters!r}")
        problem = self._bad_counters(counters)
        if problem:
            raise H2QError(f"the cache state's counters {counters} are inconsistent: {problem}")
        layout = self._layout(counters)
        if not isinstance(tensors, dict) or tensors.keys() != layout.keys():
            got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
            raise H2QError(f"the cache state holds the tensors {got}, a {self.policy} cache needs {sorted(layout)}")
        for name, (shape, dtype) in layout.items():
            t = tensors[name]
            if not torch.is_tensor(t) or tuple(t.shape) != shape or t.dtype != dtype:
                got = f"{tuple(t.shape)} {dtype_name(t.dtype)}" if torch.is_tensor(t) else type(t).__name__
                raise H2QError(f"cache state tensor {name!r} is {got}, this cache needs {shape} {dtype_name(dtype)}")
        self._restore(counters, {name: t.to(self.device) for name, t in tensors.items()})

    def _counters(self) -> dict[str, int]:
        return {}

    def _bad_counters(self, counters: dict[str, int]) -> str | None:
        """What is wrong with counters of a state (None: nothing); ranges, checked before any tensor."""
        return None

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"pos": self.pos.clone()}

    def _layout(self, counters: dict[str, int]) -> Layout:
        """Shape and dtype of every state tensor for these counters."""
        return {"pos": ((self.batch_size,), torch.long)}

    def _restore(self, counters: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
        """Take checked counters and tensors (on the cache's device) as the cache's own."""
        self.pos.copy_(tensors["pos"])


class SlotCache(KVCache):
    """Policies that keep every token in the slot it was written to (full, int8, int4).

    Slot s of every row holds that row's s-th token of the step stream (or a pad); `valid` (B, max_len)
    says which slots hold real tokens. Keys are stored after rotary at the token's own position
    (interleaved, see above), so nothing is recomputed when the cache grows. Subclasses store and read
    K/V (`_store`, `layer_kv`).
    """

    def __init__(self, cfg, batch_size, max_len, device, dtype, prefix: SlotCache | None = None):
        super().__init__(cfg, batch_size, max_len, device, dtype)
        self.length = 0  # slots written so far, the same for every row
        self.prefill_chunk = max_len
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=self.device)
        self._all_valid = True  # no pad among the written slots: decode may skip the mask
        self.prefix, self.prefix_len = prefix, 0
        if prefix is not None:
            if not isinstance(prefix, SlotCache) or prefix.batch_size != 1 or prefix.prefix is not None:
                raise ValueError("a shared prefix must be a batch-1 full/int8/int4 cache without a prefix")
            if not prefix._all_valid or prefix.length == 0 or prefix.device != self.device:
                raise ValueError("a shared prefix must be non-empty, pad-free and on the cache's device")
            self.prefix_len = prefix.length
            self.pos += prefix.length

    def update(self, layer, q, k, v, rotary):
        T = q.shape[2]
        if layer == 0:
            self._begin(T, rotary)
        rotation, mask = self._step
        qk = interleaved(pairs(torch.cat((q, k), 1)) * rotation, q.dtype)  # (B, 2 nh, T, hs)
        q, k = qk.split(self.n_head, 1)  # (B, nh, T, hs) each
        self._store(layer, k, v)
        keys, values = self.layer_kv(layer, self.length + T)
        if self.prefix is not None:
            assert self.prefix.length == self.prefix_len, "the shared prefix changed under its users"
            prefix_k, prefix_v = self.prefix.layer_kv(layer, self.prefix_len)  # (1, nh, P, hs) each
            rows = (self.batch_size, -1, -1, -1)
            keys = torch.cat((prefix_k.expand(rows), keys), 2)  # (B, nh, P + S, hs)
            values = torch.cat((prefix_v.expand(rows), values), 2)
        return q, keys, values, mask

    def _begin(self, T: int, rotary) -> None:
        """First layer of a forward: check room, record pads, compute angles and the mask once."""
        L = self.length
        if L + T > self.max_len:
            raise ValueError(f"cache full: {L} + {T} tokens > max_len {self.max_len}")
        if self._new_valid is not None:
            self.valid[:, L:L + T] = self._new_valid
        rotation = angles(rotary, self._new_positions(T))  # (B, 1, T, hs/2)
        needs_mask = self._new_valid is not None or not self._all_valid or (T > 1 and self.prefix_len + L > 0)
        self._step = rotation, self._mask(L, T) if needs_mask else None

    def _mask(self, L: int, T: int) -> torch.Tensor:
        """(B, 1, T, P + L + T) bool: causal over the slots, real slots only; a query always sees its
        own slot, so a pad query never has an all-masked row (whose softmax would be NaN)."""
        key_slot = torch.arange(L + T, device=self.device)
        query_slot = key_slot[L:, None]  # (T, 1)
        mask = (self.valid[:, None, :L + T] & (key_slot <= query_slot)) | (key_slot == query_slot)  # (B, T, S)
        if self.prefix_len:
            mask = torch.cat((mask.new_ones(self.batch_size, T, self.prefix_len), mask), 2)
        return mask.unsqueeze(1)  # (B, 1, T, P + S)

    def advance(self, T: int) -> None:
        if self._new_valid is not None:
            self._all_valid = False
        self.length += T
        super().advance(T)

    def truncate(self, length: int) -> None:
        """Rewind to the first `length` own slots (the prefix stays); later slots are forgotten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        self._truncate_storage(length)
        self.valid[:, length:] = True
        self.pos = self.prefix_len + self.valid[:, :length].sum(1)
        self._all_valid = bool(self.valid[:, :length].all())
        self.length = length

    def _store(self, layer, k, v):
        raise NotImplementedError

    def layer_kv(self, layer, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of slots [0, end) of `layer`, (B, nh, end, hs) each; `end` is the
        length after this step's tokens are stored."""
        raise NotImplementedError

    def _truncate_storage(self, length):
        raise NotImplementedError

    def _bookkeeping(self) -> list[torch.Tensor]:
        return [self.pos, self.valid]

    def _counters(self):
        return {"length": self.length, "prefix_len": self.prefix_len}

    def _bad_counters(self, counters):
        if not 0 <= counters["length"] <= self.max_len:
            return f"length outside [0, max_len {self.max_len}]"
        if counters["prefix_len"] != self.prefix_len:
            return (f"it was made over a shared prefix of {counters['prefix_len']} tokens, this cache has "
                    f"{self.prefix_len}; restore it into a cache made with that prefix")
        return None

    def _state_tensors(self):
        return {**super()._state_tensors(), "valid": self.valid[:, :self.length].clone()}

    def _layout(self, counters):
        return {**super()._layout(counters), "valid": ((self.batch_size, counters["length"]), torch.bool)}

    def _restore(self, counters, tensors):
        super()._restore(counters, tensors)
        length = self.length = counters["length"]
        self.valid[:, :length] = tensors["valid"]
        self.valid[:, length:] = True  # as truncate leaves unwritten slots
        self._all_valid = bool(self.valid[:, :length].all())


class FullCache(SlotCache):
    """Uncompressed: preallocated (B, nh, max_len, hs) buffers per layer, written in place with
    slicing; reads are views, so a decode step allocates nothing that grows with the context."""

    policy = "full"

    def __init__(self, cfg, batch_size, max_len, device, dtype, prefix=None):
        super().__init__(cfg, batch_size, max_len, device, dtype, prefix)
        shape = (batch_size, self.n_head, max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(self.n_layer)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(self.n_layer)]

    def _store(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v

    def layer_kv(self, layer, end):
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _truncate_storage(self, length):
        pass  # slots past `length` are simply overwritten later

    def tensors(self):
        return [*self.k, *self.v, *self._bookkeeping()]

    def _state_tensors(self):
        return {**super()._state_tensors(), "k": per_layer(self.k, self.length), "v": per_layer(self.v, self.length)}

    def _layout(self, counters):
        shape = (self.n_layer, self.batch_size, self.n_head, counters["length"], self.head_dim)
        return {**super()._layout(counters), "k": (shape, self.dtype), "v": (shape, self.dtype)}

    def _restore(self, counters, tensors):
        super()._restore(counters, tensors)
        for layer in range(self.n_layer):  # slots past the length are never read: left as they are
            self.k[layer][:, :, :self.length] = tensors["k"][layer]
            self.v[layer][:, :, :self.length] = tensors["v"][layer]
