"""KV-cache compression policies on the cache classes of h2q/kvbase.py; h2q/kvcache.py makes them by name.

* `int8` / `int4` (KIVI, Liu et al. 2024): keys quantized per channel (each channel's min/max over a
  group of `group` consecutive tokens), values per token (each token's min/max over `group`-wide
  channel groups), asymmetric min-max with fp16 scale and minimum. The newest tokens stay in full
  precision in a residual until a whole group of `group` (default 32) has arrived; `advance` then
  quantizes it, so the residual holds fewer than `group` tokens between forwards. Keys are quantized
  after rotary (their positions never change). int4 codes are packed two per byte (stored channel c in
  the low nibble, channel c + hs/2 in the high one). Reads dequantize the whole cache every step (no
  dequantized copy is kept; that is the memory saving). Per element the round-trip error is at most
  half a step, step = group range / 255 (int8) or / 15 (int4), plus fp16 rounding of the group's
  minimum and scale. Documented tolerance, checked by tests/test_kvcache.py on a random model with
  peaked attention: logits within 1% (int8) / 10% (int4) of the logits' standard deviation of `full`.
  Truncating into an already quantized group moves that group's kept part back into the residual as
  its dequantized (already rounded) values.
* `window` (StreamingLLM, Xiao et al. 2023): the first `sinks` tokens of each row (attention sinks,
  default 4) plus the most recent `max_len - sinks` tokens.
* `h2o` (Zhang et al. 2023): per layer and head, the `recent` newest tokens plus the heavy hitters,
  the tokens with the highest attention accumulated over all later queries, `max_len` in all.

The evicting policies store keys *before* rotary and re-rotate every key each step by its position
inside the cache: its rank by age among the tokens the row (and head) keeps (StreamingLLM's rule), so
positions never exceed `max_len` and generation streams past the training context with fixed memory.
A forward of T tokens first evicts T tokens (empty and pad slots go first), so its first query sees
the newest `max_len - T` tokens; `prefill` therefore feeds long prompts in chunks of half the evictable
room. Attention returns no weights from SDPA, so H2O recomputes softmax(q k^T) in `update`: one more
(B, nh, T, max_len) score matmul and softmax per layer and step, about doubling attention's score work,
plus a (n_layer, B, nh, max_len) fp32 score accumulator in memory.
"""
from __future__ import annotations

import math

import torch

from h2q.kvbase import KVCache, SlotCache, angles, as_pairs, interleaved, pairs, per_layer

SCALE_FLOOR = 1e-6  # a constant group gets this step instead of dividing by zero


def quantize(x: torch.Tensor, dim: int, bits: int):
    """Asymmetric min-max quantization of x (float) over `dim` -> (uint8 codes, fp16 scale, fp16 min),
    scale and min with `dim` kept as size 1. Codes are computed against the fp16-rounded scale/min."""
    levels = 2 ** bits - 1
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((high - low) / levels).clamp_min(SCALE_FLOOR).half()
    low = low.half()
    codes = ((x - low.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, low


class QuantCache(SlotCache):
    """KIVI-style quantized storage; subclasses fix `bits`."""

    bits: int

    def __init__(self, cfg, batch_size, max_len, device, dtype, prefix=None, group: int = 32):
        super().__init__(cfg, batch_size, max_len, device, dtype, prefix)
        if group < 1:
            raise ValueError(f"quantization group {group} must be positive")
        L, B, nh, hs = self.n_layer, batch_size, self.n_head, self.head_dim
        self.group = group  # tokens per key group, and the residual's size
        self.value_group = math.gcd(group, hs)  # channels per value group
        capacity = -(-max_len // group) * group
        byte_width = hs * self.bits // 8
        store = dict(device=self.device)
        self.k_codes = torch.zeros(L, B, nh, capacity, byte_width, dtype=torch.uint8, **store)
        self.k_scale = torch.zeros(L, B, nh, capacity // group, hs, dtype=torch.float16, **store)
        self.k_min = torch.zeros_like(self.k_scale)
        self.v_codes = torch.zeros(L, B, nh, capacity, byte_width, dtype=torch.uint8, **store)
        self.v_scale = torch.zeros(L, B, nh, capacity, hs // self.value_group, dtype=torch.float16, **store)
        self.v_min = torch.zeros_like(self.v_scale)
        self.n_quant = 0  # tokens in quantized storage, a multiple of group
        self.k_res = [torch.zeros(B, nh, 0, hs, dtype=dtype, **store) for _ in range(L)]  # full precision
        self.v_res = [torch.zeros(B, nh, 0, hs, dtype=dtype, **store) for _ in range(L)]

    def _pack(self, codes):
        return codes

    def _unpack_into(self, packed, out):
        out.copy_(packed)  # uint8 codes -> float

    def _store(self, layer, k, v):
        self.k_res[layer] = torch.cat((self.k_res[layer], k.to(self.dtype)), 2)
        self.v_res[layer] = torch.cat((self.v_res[layer], v.to(self.dtype)), 2)

    def layer_kv(self, layer, end):
        """Dequantized groups and the residual, written into one fresh buffer per tensor (no cat)."""
        n, res_k, res_v = self.n_quant, self.k_res[layer], self.v_res[layer]
        assert n + res_k.shape[2] == end
        if n == 0:
            return res_k, res_v
        keys = res_k.new_empty(self.batch_size, self.n_head, end, self.head_dim)  # (B, nh, end, hs)
        values = torch.empty_like(keys)
        self._dequantize_keys(layer, 0, n, keys[:, :, :n])
        self._dequantize_values(layer, 0, n, values[:, :, :n])
        keys[:, :, n:], values[:, :, n:] = res_k, res_v
        return keys, values

    def _dequantize_keys(self, layer, start, end, out):
        """Keys of tokens [start, end), both multiples of group, into out (B, nh, end - start, hs)."""
        G = self.group
        self._unpack_into(self.k_codes[layer, :, :, start:end], out)
        B, nh, n, hs = out.shape
        grouped = out.view(B, nh, n // G, G, hs)  # (B, nh, n/G, G, hs): one scale per channel and group
        scale = self.k_scale[layer, :, :, start // G:end // G, None].to(out.dtype)  # (B, nh, n/G, 1, hs)
        low = self.k_min[layer, :, :, start // G:end // G, None].to(out.dtype)
        torch.addcmul(low, grouped, scale, out=grouped)

    def _dequantize_values(self, layer, start, end, out):
        """Values of tokens [start, end) into out (B, nh, end - start, hs)."""
        self._unpack_into(self.v_codes[layer, :, :, start:end], out)
        B, nh, n, hs = out.shape
        grouped = out.view(B, nh, n, hs // self.value_group, self.value_group)  # (B, nh, n, hs/Gv, Gv)
        scale = self.v_scale[layer, :, :, start:end, :, None].to(out.dtype)  # (B, nh, n, hs/Gv, 1)
        low = self.v_min[layer, :, :, start:end, :, None].to(out.dtype)
        torch.addcmul(low, grouped, scale, out=grouped)

    def advance(self, T):
        super().advance(T)
        filled = self.k_res[0].shape[2] // self.group * self.group
        if filled:
            self._quantize_residual(filled)

    def _quantize_residual(self, n: int) -> None:
        """Move the residual's oldest n tokens (whole groups) of every layer into quantized storage."""
        G, Gv = self.group, self.value_group
        keys = torch.stack([r[:, :, :n] for r in self.k_res]).float()  # (L, B, nh, n, hs)
        values = torch.stack([r[:, :, :n] for r in self.v_res]).float()
        L, B, nh, _, hs = keys.shape
        start, end = self.n_quant, self.n_quant + n
        codes, scale, low = quantize(keys.view(L, B, nh, n // G, G, hs), -2, self.bits)  # per channel
        self.k_codes[:, :, :, start:end] = self._pack(codes.view(L, B, nh, n, hs))
        self.k_scale[:, :, :, start // G:end // G] = scale.squeeze(-2)  # (L, B, nh, n/G, hs)
        self.k_min[:, :, :, start // G:end // G] = low.squeeze(-2)
        codes, scale, low = quantize(values.view(L, B, nh, n, hs // Gv, Gv), -1, self.bits)  # per token
        self.v_codes[:, :, :, start:end] = self._pack(codes.view(L, B, nh, n, hs))
        self.v_scale[:, :, :, start:end] = scale.squeeze(-1)  # (L, B, nh, n, hs/Gv)
        self.v_min[:, :, :, start:end] = low.squeeze(-1)
        self.k_res = [r[:, :, n:].clone() for r in self.k_res]
        self.v_res = [r[:, :, n:].clone() for r in self.v_res]
        self.n_quant = end

    def _truncate_storage(self, length):
        if length >= self.n_quant:
            keep = length - self.n_quant
            self.k_res = [r[:, :, :keep].clone() for r in self.k_res]
            self.v_res = [r[:, :, :keep].clone() for r in self.v_res]
            return
        start = length // self.group * self.group  # the group holding `length` goes back to the residual
        group = self.k_res[0].new_empty(self.batch_size, self.n_head, self.group, self.head_dim)  # (B, nh, G, hs)
        for layer in range(self.n_layer):
            self._dequantize_keys(layer, start, start + self.group, group)
            self.k_res[layer] = group[:, :, :length - start].clone()
            self._dequantize_values(layer, start, start + self.group, group)
            self.v_res[layer] = group[:, :, :length - start].clone()
        self.n_quant = start

    def tensors(self):
        return [self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min,
                *self.k_res, *self.v_res, *self._bookkeeping()]

    def options(self):
        return {"group": self.group}

    def _counters(self):
        return {**super()._counters(), "n_quant": self.n_quant}

    def _bad_counters(self, counters):
        n, residual = counters["n_quant"], counters["length"] - counters["n_quant"]
        if n % self.group or not 0 <= residual < self.group:
            return f"n_quant must be a multiple of the group {self.group} with fewer than a group after it"
        return super()._bad_counters(counters)

    def _state_tensors(self):
        n, G = self.n_quant, self.group
        return {**super()._state_tensors(),
                "k_codes": self.k_codes[:, :, :, :n].clone(), "k_scale": self.k_scale[:, :, :, :n // G].clone(),
                "k_min": self.k_min[:, :, :, :n // G].clone(), "v_codes": self.v_codes[:, :, :, :n].clone(),
                "v_scale": self.v_scale[:, :, :, :n].clone(), "v_min": self.v_min[:, :, :, :n].clone(),
                "k_res": per_layer(self.k_res), "v_res": per_layer(self.v_res)}

    def _layout(self, counters):
        n, G = counters["n_quant"], self.group
        lead = (self.n_layer, self.batch_size, self.n_head)
        codes = (lead + (n, self.k_codes.shape[-1]), torch.uint8)
        residual = (lead + (counters["length"] - n, self.head_dim), self.dtype)
        key_scales = (lead + (n // G, self.head_dim), torch.float16)
        value_scales = (lead + (n, self.head_dim // self.value_group), torch.float16)
        return {**super()._layout(counters), "k_codes": codes, "k_scale": key_scales, "k_min": key_scales,
                "v_codes": codes, "v_scale": value_scales, "v_min": value_scales,
                "k_res": residual, "v_res": residual}

    def _restore(self, counters, tensors):
        super()._restore(counters, tensors)
        n, G = counters["n_quant"], self.group
        self.n_quant = n
        for name, end in (("k_codes", n), ("k_scale", n // G), ("k_min", n // G), ("v_codes", n),
                          ("v_scale", n), ("v_min", n)):
            getattr(self, name)[:, :, :, :end] = tensors[name]
        self.k_res = [r.clone() for r in tensors["k_res"]]
        self.v_res = [r.clone() for r in tensors["v_res"]]


class Int8Cache(QuantCache):
    policy = "int8"
    bits = 8


class Int4Cache(QuantCache):
    policy = "int4"
    bits = 4

    def _pack(self, codes):
        low, high = codes.chunk(2, dim=-1)  # channels [0, hs/2) and [hs/2, hs)
        return low | (high << 4)  # (..., hs/2)

    def _unpack_into(self, packed, out):
        half = packed.shape[-1]
        out[..., :half].copy_(packed & 15)
        out[..., half:].copy_(packed >> 4)


class EvictingCache(KVCache):
    """A fixed pool of `max_len` slots per row; each forward evicts the lowest-priority tokens
    (`_priority`, lower goes first) to make room. Subclasses say which tokens are protected."""

    evicts = True
    per_head = False  # True: every layer and head keeps its own set of tokens

    def __init__(self, cfg, batch_size, max_len, device, dtype, protected: int):
        super().__init__(cfg, batch_size, max_len, device, dtype)
        if not 0 <= protected < max_len:
            raise ValueError(f"{protected} protected tokens leave no room in a cache of {max_len}")
        shape = (batch_size, self.n_head, max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(self.n_layer)]  # pre-rotary
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(self.n_layer)]
        meta = (self.n_layer, batch_size, self.n_head, max_len) if self.per_head else (1, batch_size, 1, max_len)
        self.time = torch.full(meta, -1, dtype=torch.int32, device=self.device)  # stream position per slot
        self.alive = torch.zeros(meta, dtype=torch.bool, device=self.device)  # slot holds a real token
        self.max_chunk = max_len - protected  # tokens one forward may add
        self.prefill_chunk = max(1, self.max_chunk // 2)

    def update(self, layer, q, k, v, rotary):
        B, nh, T, hs = q.shape
        if T > self.max_chunk:
            raise ValueError(f"a forward of {T} tokens > the {self.max_chunk} this cache can take at once")
        if self.per_head or layer == 0:
            self._step = self._plan(layer if self.per_head else 0, T, rotary)
        slots, rotation, q_rotation, mask = self._step
        index = slots[..., None].expand(B, nh, T, hs)  # (B, nh, T, hs)
        k, v = interleaved(pairs(k), self.dtype), v.to(self.dtype)  # stored unrotated, pairs side by side
        if self._new_valid is not None:  # a pad leaves the slot it was given as it was
            real = self._new_valid[:, None, :, None]  # (B, 1, T, 1)
            k = torch.where(real, k, self.k[layer].gather(2, index))
            v = torch.where(real, v, self.v[layer].gather(2, index))
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        q = interleaved(pairs(q) * q_rotation, q.dtype)
        keys = interleaved(as_pairs(self.k[layer]) * rotation, self.dtype)  # (B, nh, C, hs) at cache positions
        self._observe(layer, q, keys, mask)
        return q, keys, self.v[layer], mask

    def _plan(self, meta: int, T: int, rotary):
        """Choose the slots of this forward's tokens, write their bookkeeping, and derive positions,
        angles and the mask for the bookkeeping set `meta` (a layer, or 0 when layers share it)."""
        time, alive = self.time[meta], self.alive[meta]  # (B, H, C)
        B, H, C = time.shape
        new_time = self._new_positions(T).int()[:, None, :].expand(B, H, T)  # (B, H, T)
        slots = self._priority(meta).topk(T, dim=-1, largest=False).indices  # (B, H, T)
        if self._new_valid is None:
            time.scatter_(-1, slots, new_time)
            alive.scatter_(-1, slots, True)
        else:  # pads write nothing, so a row's tokens are exactly those it has alone
            real = self._new_valid[:, None, :].expand(B, H, T)  # (B, H, T)
            time.scatter_(-1, slots, torch.where(real, new_time, time.gather(-1, slots)))
            alive.scatter_(-1, slots, real | alive.gather(-1, slots))
        # position inside the cache: rank by stream position among the row's live tokens
        order = torch.where(alive, time, torch.iinfo(time.dtype).max).argsort(-1)  # (B, H, C)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(C, device=self.device).expand(B, H, C))
        rotation = angles(rotary, rank.view(B * H, C)).view(B, H, C, -1)  # (B, H, C, hs/2)
        at_slots = slots[..., None].expand(B, H, T, rotation.shape[-1])  # (B, H, T, hs/2)
        own = torch.arange(C, device=self.device) == slots[..., None]  # (B, H, T, C)
        mask = (alive[:, :, None, :] & (time[:, :, None, :] <= new_time[..., None])) | own  # (B, H, T, C)
        return slots, rotation, rotation.gather(2, at_slots), mask

    def _priority(self, meta: int) -> torch.Tensor:
        raise NotImplementedError

    def _observe(self, layer, q, keys, mask) -> None:
        """Hook for policies that learn from attention (H2O)."""

    def truncate(self, length: int) -> None:
        """Forget every token at stream position >= length in each row; tokens evicted earlier are
        not restored. Without pads and evictions this equals rewinding to `length` tokens."""
        self.alive &= self.time < length
        self.pos.clamp_(max=length)

    def tensors(self):
        return [*self.k, *self.v, self.time, self.alive, self.pos]

    def _state_tensors(self):  # every slot: the pool is fixed, and a pad query reads its own slot
        return {**super()._state_tensors(), "k": per_layer(self.k), "v": per_layer(self.v),
                "time": self.time.clone(), "alive": self.alive.clone()}

    def _layout(self, counters):
        kv = ((self.n_layer, self.batch_size, self.n_head, self.max_len, self.head_dim), self.dtype)
        return {**super()._layout(counters), "k": kv, "v": kv, "time": (tuple(self.time.shape), torch.int32),
                "alive": (tuple(self.alive.shape), torch.bool)}

    def _restore(self, counters, tensors):
        super()._restore(counters, tensors)
        for layer in range(self.n_layer):
            self.k[layer].copy_(tensors["k"][layer])
            self.v[layer].copy_(tensors["v"][layer])
        self.time.copy_(tensors["time"])
        self.alive.copy_(tensors["alive"])


class WindowCache(EvictingCache):
    """StreamingLLM: `sinks` first tokens + the most recent `max_len - sinks`."""

    policy = "window"

    def __init__(self, cfg, batch_size, max_len, device, dtype, sinks: int = 4):
        super().__init__(cfg, batch_size, max_len, device, dtype, protected=sinks)
        self.sinks = sinks

    def options(self):
        return {"sinks": self.sinks}

    def _priority(self, meta):
        time, alive = self.time[meta], self.alive[meta]
        by_age = torch.where(time < self.sinks, math.inf, time.float())  # oldest non-sink goes first
        return torch.where(alive, by_age, -math.inf)


class H2OCache(EvictingCache):
    """H2O: per layer and head, the `recent` newest tokens + heavy hitters, `max_len` in all."""

    policy = "h2o"
    per_head = True

    def __init__(self, cfg, batch_size, max_len, device, dtype, recent: int | None = None):
        recent = max_len // 2 if recent is None else recent
        super().__init__(cfg, batch_size, max_len, device, dtype, protected=recent)
        self.recent = recent
        self.score = torch.zeros(self.n_layer, batch_size, self.n_head, max_len, device=self.device)

    def _plan(self, meta, T, rotary):
        plan = super()._plan(meta, T, rotary)
        slots, score = plan[0], self.score[meta]
        fresh = torch.zeros_like(slots, dtype=score.dtype)  # new tokens start with no accumulated attention
        if self._new_valid is not None:
            fresh = torch.where(self._new_valid[:, None, :], fresh, score.gather(-1, slots))
        score.scatter_(-1, slots, fresh)
        return plan

    def _priority(self, meta):
        time, alive = self.time[meta], self.alive[meta]  # (B, nh, C)
        recent = time >= (self.pos - self.recent)[:, None, None]
        return torch.where(alive, torch.where(recent, math.inf, self.score[meta]), -math.inf)

    def _observe(self, layer, q, keys, mask):
        scores = (q @ keys.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, nh, T, C)
        attention = scores.masked_fill(~mask, -math.inf).softmax(-1)
        if self._new_valid is not None:  # pad queries cast no votes
            attention = attention * self._new_valid[:, None, :, None]
        self.score[layer] += attention.sum(2)

    def tensors(self):
        return [*super().tensors(), self.score]

    def options(self):
        return {"recent": self.recent}

    def _state_tensors(self):
        return {**super()._state_tensors(), "score": self.score.clone()}

    def _layout(self, counters):
        return {**super()._layout(counters), "score": (tuple(self.score.shape), self.score.dtype)}

    def _restore(self, counters, tensors):
        super()._restore(counters, tensors)
        self.score.copy_(tensors["score"])
