"""KV caches by policy name, and prefilling prompts through one; the cache classes live in
h2q/kvbase.py (the protocol and the uncompressed `full`) and h2q/kvcompress.py (the compressing ones).

`make_cache(policy, config, batch_size, max_len, device, dtype, **opts)` builds a cache by name:
`full`, `int8`, `int4`, `window`, `h2o` (`policies()` lists them). `max_len` is the most tokens the
cache holds: the slot-based policies (full, int8, int4) refuse to go past it, the evicting ones
(window, h2o) evict to stay in it. Every cache runs through the model's one forward,
`model(ids, cache=cache)`.

* Ragged batches (one row per agent, each with its own history): `prefill(model, cache, prompts)`
  right-pads a list of differently sized prompts, marks the pads (`cache.set_pad_mask`), runs them in
  chunks and returns each row's last logits; a row's logits equal the row run alone.
* Saving: `cache.state_dict()` holds everything, `cache_from_state(state, config)` makes the same
  cache again (policy, options and sizes from the state); the file is h2q/checkpoint.py's `save_cache`.
* Prefix sharing: prefill an instruction once into a batch-1 cache and pass it as `prefix=` to the
  batch's cache; `truncate(length)` rewinds the batch's own part, so agents reuse the prefix step
  after step. For 20 agents:

      shared = make_cache("full", cfg, 1, len(instruction)); prefill(model, shared, [instruction])
      cache = make_cache("int8", cfg, 20, 256, prefix=shared)
      each step: logits = prefill(model, cache, observations)  # 20 prompts, any lengths
                 ... decode a few bytes per row (generate_batch(..., cache=cache)) ...
                 cache.truncate(0)  # back to the bare instruction
"""
from __future__ import annotations

import torch

from h2q.config import ModelConfig
from h2q.errors import H2QError
from h2q.kvbase import FullCache, KVCache
from h2q.kvcompress import H2OCache, Int4Cache, Int8Cache, WindowCache
from h2q.tokenizer import PAD

POLICIES: dict[str, type[KVCache]] = {cls.policy: cls for cls in (FullCache, Int8Cache, Int4Cache, WindowCache,
                                                                     H2OCache)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # a cache's K/V


def policies() -> dict[str, type[KVCache]]:
    """Policy name -> cache class (a copy: the table itself stays as defined here)."""
    return dict(POLICIES)


def make_cache(policy: str, model_config: ModelConfig, batch_size: int, max_len: int | None = None,
               device="cpu", dtype=torch.float32, **opts) -> KVCache:
    """A cache by policy name; `max_len` defaults to the model's context; opts go to the policy:
    prefix= (full/int8/int4), group= (int8/int4: tokens per key group and residual, default 32),
    sinks= (window, default 4), recent= (h2o, default max_len // 2)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[policy](model_config, batch_size, max_len or model_config.context_len, device, dtype, **opts)


def cache_from_state(state: dict, model_config: ModelConfig, device="cpu", prefix: KVCache | None = None) -> KVCache:
    """A cache made from a `state_dict()` (h2q/kvbase.py) and restored from it, on `device`; `prefix`:
    the shared prefix it was made over, if any. H2QError for a state that is not a cache's."""
    if not isinstance(state, dict) or state.get("policy") not in POLICIES:
        policy = state.get("policy") if isinstance(state, dict) else None
        raise H2QError(f"the cache state names policy {policy!r}, not one of {', '.join(POLICIES)}")
    if state.get("dtype") not in DTYPES:
        raise H2QError(f"the cache state has dtype {state.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    sizes, options = (state.get("batch_size"), state.get("max_len")), state.get("options")
    if not all(type(n) is int and n >= 1 for n in sizes) or not isinstance(options, dict):
        raise H2QError(f"the cache state's batch_size/max_len {sizes} and options {options!r} are not a cache's")
    extra = {"prefix": prefix} if prefix is not None else {}
    try:
        cache = make_cache(state["policy"], model_config, *sizes, device, DTYPES[state["dtype"]], **options, **extra)
    except (TypeError, ValueError) as e:
        raise H2QError(f"the cache state's options {options} do not make a {state['policy']} cache ({e})") from None
    cache.load_state_dict(state)
    return cache


def pad_prompts(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts with PAD -> ids (B, T) long and valid (B, T) bool."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    valid = torch.arange(T) < lengths[:, None]  # (B, T)
    return ids.to(device), valid.to(device)


def prefill(model, cache: KVCache, prompts: list[list[int]], adapters=None, chunk: int | None = None):
    """Feed differently sized prompts (one per cache row) through the cache, `chunk` tokens per forward
    (default: the cache's `prefill_chunk`). Returns each row's logits after its last prompt token, (B, V)."""
    assert len(prompts) == cache.batch_size, f"{len(prompts)} prompts for a cache of {cache.batch_size} rows"
    ids, valid = pad_prompts(prompts, cache.device)
    last_index = valid.sum(1) - 1  # (B,)
    chunk = chunk or cache.prefill_chunk
    last = None
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        cache.set_pad_mask(valid[:, start:end])
        logits = model(ids[:, start:end], cache=cache, adapters=adapters)  # (B, t, V)
        if last is None:
            last = logits.new_empty(ids.shape[0], logits.shape[-1])
        here = (last_index >= start) & (last_index < end)
        rows = here.nonzero().squeeze(1)
        last[rows] = logits[rows, last_index[rows] - start]
    return last
