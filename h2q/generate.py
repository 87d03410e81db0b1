"""Sampling and streaming generation through a KV cache.

`generate` (one prompt) and `generate_batch` (one prompt per row, any lengths: 20 agents at once)
prefill the prompts into a cache of the chosen policy (h2q/kvcache.py) and then decode one byte per
step, each step a single forward of one token per row. A row stops at its first stop token (not
returned) or after `max_new_tokens`; finished rows ride along as PAD, masked out, until every row is
done. `adapters` goes to every forward unchanged. Pass `cache=` to continue a cache you keep (a
shared-prefix cache of agents, say; rewind it with `cache.truncate` afterwards); otherwise a cache of
`cache_policy` is made, sized for the prompt and the new tokens (full/int8/int4 refuse to run past
the model's context; window/h2o hold the context's worth of tokens and stream on).

`sample_next` is the one sampler, in llama.cpp's and Hugging Face's order: the repetition penalty on
the raw logits (llama.cpp's `--repeat-penalty`: over the distinct ids of the last `--repeat-last-n`
tokens, a positive logit is divided by the penalty and a negative one multiplied by it, Keskar et al.
2019), temperature, top-k (Fan et al. 2018), nucleus top-p (Holtzman et al. 2020), min-p (Nguyen et
al. 2024: drop the ids whose probability is below min_p times the top one), then one multinomial draw
from `generator`; temperature 0 is greedy argmax of the penalized logits. Logits holding NaN or +inf
(broken weights) are an error with its cause, never a draw from a broken distribution. A seed makes
a run reproducible. `on_token` streams each new token id as soon as it is sampled; `TextStreamer`
turns that into text without splitting a UTF-8 character (or write `bytes([id])` to a binary stream to
pass the bytes on raw). The library's sampling defaults leave the penalty and min-p off; infer.py's
defaults are the choice of scripts/sweep_sampling.py.

`decode` is the one decode loop, shared by `generate_batch` and the chat's persistent conversation
(h2q/session.py): it samples from the last logits, yields the ids, and feeds them back through the
cache when asked for the next ones; it keeps each row's penalty window, starting from the text the
caller gives as `history`.

`compile=True` runs the decode steps through `torch.compile(model, dynamic=True)` (prefill stays
eager): one graph per cache policy and batch shape, compiled at the first step and kept for the
model's lifetime. At batch 1 on CPU a compiled step is faster, as the many small elementwise ops of a
one-token forward fuse; scripts/bench_kv.py measures both, and the README's KV table has the figures.
"""
from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable

import torch

from h2q import tokenizer
from h2q.errors import H2QError
from h2q.kvcache import KVCache, make_cache, policies, prefill


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None, *,
                min_p: float | None = None, repeat_penalty: float = 1.0,
                recent: torch.Tensor | None = None) -> torch.Tensor:
    """logits (..., V) -> sampled ids (...), long. `recent` (..., n): the ids the penalty applies to
    (PAD as filler is harmless: PAD is never sampled)."""
    if not bool((logits < math.inf).all()):  # NaN or +inf; -inf is a masked id
        raise H2QError("the model's logits hold NaN or inf, so there is nothing to sample from: its weights "
                        "(or the adapter's) are broken; retrain or restore the checkpoint")
    logits = logits.float()
    if repeat_penalty != 1.0 and recent is not None and recent.shape[-1]:
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(-1, recent, True)
        logits = torch.where(seen, torch.where(logits > 0, logits / repeat_penalty, logits * repeat_penalty), logits)
    if temperature <= 0:
        return logits.argmax(-1)
    # shifted to a maximum of 0 first, so a tiny temperature gives -inf (never NaN) below the top id
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # mass before a token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter_(-1, order, beyond), -math.inf)
    if min_p:  # p < min_p * p_top  <=>  logit < log(min_p) + the top logit, which is 0 here
        logits = logits.masked_fill(logits < math.log(min_p), -math.inf)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None,
                   repeat_penalty: float = 1.0, repeat_last_n: int = 0) -> None:
    if not 0 <= temperature < math.inf:
        raise H2QError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise H2QError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise H2QError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise H2QError(f"min_p must be in [0, 1], got {min_p}")
    if not 0 < repeat_penalty < math.inf:
        raise H2QError(f"repeat_penalty must be a finite number > 0 (1 = off), got {repeat_penalty}")
    if repeat_last_n < -1:
        raise H2QError(f"repeat_last_n must be >= -1 (0 = off, -1 = all the text so far), got {repeat_last_n}")


def recent_ids(histories: list[list[int]], n: int, device=None) -> torch.Tensor:
    """The last `n` ids of each row's text (-1: all of it), left-filled with PAD -> (B, n') long."""
    rows = [list(h) if n < 0 else list(h)[max(0, len(h) - n):] if n else [] for h in histories]
    width = max(map(len, rows), default=0)
    out = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)  # (B, n')
    for b, row in enumerate(rows):
        if row:
            out[b, width - len(row):] = torch.tensor(row)
    return out.to(device)


class TextStreamer:
    """An `on_token` callback that writes text as soon as each UTF-8 character is complete; call
    `close()` after generation to flush an unfinished character (as U+FFFD)."""

    def __init__(self, write: Callable[[str], object]):
        self.write, self.decoder = write, tokenizer.StreamDecoder()

    def __call__(self, token_id: int) -> None:
        text = self.decoder.feed(token_id)
        if text:
            self.write(text)

    def close(self) -> None:
        text = self.decoder.flush()
        if text:
            self.write(text)


def stream_to(out) -> TextStreamer:
    """A TextStreamer writing whole characters to the text stream `out`, flushed per chunk."""
    def write(text):
        out.write(text)
        out.flush()
    return TextStreamer(write)


def prompt_ids(prompt: str | bytes | Iterable[int]) -> list[int]:
    """A prompt as ids; an empty prompt starts a fresh document (EOT), so there is a token to predict from."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, (str, bytes)) else [int(i) for i in prompt]
    if any(not 0 <= i <= tokenizer.EOT for i in ids):
        raise H2QError("prompt ids must be bytes 0..255 or EOT (256)")
    return ids or [tokenizer.EOT]


def cache_length(policy: str, prompt_len: int, max_new_tokens: int, context_len: int, prefix_len: int = 0) -> int:
    """Slots a generation needs: prompt + new tokens for the slot policies (which refuse to go past
    the model's context, a shared prefix included), the model's context for the evicting ones."""
    if policies()[policy].evicts:
        return context_len
    need = prompt_len + max(max_new_tokens - 1, 0)  # the last sampled token is never fed back
    if prefix_len + need > context_len:
        raise H2QError(f"prefix ({prefix_len}) + prompt ({prompt_len}) + {max_new_tokens} new tokens exceed "
                        f"the model's context of {context_len}; shorten them or use cache policy 'window'")
    return need


_compiled = weakref.WeakKeyDictionary()
# the caches' rotary is one complex multiply, which inductor leaves to eager and says so at every
# compile; the rest of the step still fuses, so the notice is noise to a user
COMPLEX_NOTICE = "Torchinductor does not support code generation for complex"


def compiled_decoder(model):
    """`model` under torch.compile with dynamic shapes, made once per model and reused, so the cache
    length growing by one each step does not recompile; float weights and h2q/quant.py's int8/int4
    layers alike (compiled and eager give the same greedy bytes: tests/test_generate.py). Compilation
    happens inside a call, so every call silences inductor's complex-number notice for its own
    duration only."""
    if model not in _compiled:
        compiled = torch.compile(model, dynamic=True)

        def decoder(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=COMPLEX_NOTICE)
                return compiled(*args, **kwargs)
        _compiled[model] = decoder
    return _compiled[model]


def decode(decoder, cache: KVCache, logits: torch.Tensor, *, adapters=None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           repeat_penalty: float = 1.0, repeat_last_n: int = 0, history: list[list[int]] | None = None,
           generator: torch.Generator | None = None) -> Generator[torch.Tensor, torch.Tensor | None, None]:
    """The decode loop: from `logits` (B, V), the last logits of what `cache` holds, sample ids (B,)
    and yield them; on resuming, feed those ids (or the ids the caller `send`s instead, e.g. PAD for
    finished rows) through `decoder` and the cache for the next step's logits. The caller stops when
    it has enough, so the last sampled ids are never fed back. `history`: each row's text so far, the
    start of the repetition penalty's window. Run it under torch.inference_mode()."""
    penalized = repeat_penalty != 1.0 and repeat_last_n != 0
    recent = recent_ids(history or [[] for _ in range(logits.shape[0])], repeat_last_n, logits.device) \
        if penalized else None  # (B, n)
    while True:
        logits[:, tokenizer.PAD] = -math.inf  # filler is never generated
        tokens = sample_next(logits, temperature, top_k, top_p, generator, min_p=min_p,
                             repeat_penalty=repeat_penalty, recent=recent)  # (B,)
        if penalized:
            recent = torch.cat([recent, tokens[:, None]], 1)  # (B, n + 1)
            recent = recent[:, -repeat_last_n:] if repeat_last_n > 0 else recent
        fed = yield tokens
        tokens = tokens if fed is None else fed
        logits = decoder(tokens[:, None], cache=cache, adapters=adapters)[:, -1]  # (B, V)


def generate_batch(model, prompts: list, max_new_tokens: int = 256, *, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                   repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = None,
                   stop: Iterable[int] = (tokenizer.EOT,), cache_policy: str = "full",
                   cache_len: int | None = None, cache_opts: dict | None = None, adapters=None,
                   on_token: Callable[[int, int], object] | None = None,
                   cache: KVCache | None = None, compile: bool = False) -> list[list[int]]:
    """Generate for every prompt at once; returns the new ids per prompt (stop token excluded).
    `on_token(row, id)` is called for each new token; `stop` is a set of ids (e.g. b"\\n" or (EOT,)).
    A new cache of `cache_policy` is made unless `cache` is given: then the prompts continue what it
    holds (the caller owns it and may truncate or reuse it afterwards). `compile`: decode steps through
    `compiled_decoder(model)`. The repetition penalty's window starts with each prompt's last bytes."""
    check_sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
    if max_new_tokens < 0:
        raise H2QError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if cache_policy not in policies():
        raise H2QError(f"unknown cache policy {cache_policy!r}; choose one of {', '.join(policies())}")
    ids = [prompt_ids(p) for p in prompts]
    weight = model.embed.weight
    if cache is None:
        cfg, cache_opts = model.config, cache_opts or {}
        prefix = cache_opts.get("prefix")
        cache_len = cache_len or cache_length(cache_policy, max(map(len, ids)), max_new_tokens, cfg.context_len,
                                              prefix.length if prefix is not None else 0)
        cache = make_cache(cache_policy, cfg, len(ids), cache_len, weight.device, weight.dtype, **cache_opts)
    elif not cache.evicts and cache.length + max(map(len, ids)) + max_new_tokens - 1 > cache.max_len:
        raise ValueError(f"the given cache has {cache.max_len - cache.length} free slots, too few for this generation")
    generator = None if seed is None else torch.Generator(weight.device).manual_seed(seed)
    stops = frozenset(int(i) for i in stop)
    outputs: list[list[int]] = [[] for _ in ids]
    done = [False] * len(ids)
    decoder = compiled_decoder(model) if compile else model
    with torch.inference_mode():
        logits = prefill(model, cache, ids, adapters)  # (B, V)
        steps = decode(decoder, cache, logits, adapters=adapters, temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                       history=ids, generator=generator)
        fed = None
        for step in range(max_new_tokens):
            tokens = steps.send(fed)  # (B,); the first send(None) starts the loop
            fed = None
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token in stops:
                    done[row] = True
                    continue
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
            if all(done) or step == max_new_tokens - 1:
                break
            if any(done):
                running = torch.tensor([not d for d in done], device=weight.device)  # (B,)
                cache.set_pad_mask(running[:, None])
                fed = tokens.masked_fill(~running, tokenizer.PAD)
    return outputs


def generate(model, prompt: str | bytes | Iterable[int], max_new_tokens: int = 256, *,
             on_token: Callable[[int], object] | None = None, **options) -> list[int]:
    """One prompt -> its new ids; `options` as for `generate_batch` (temperature, top_k, top_p, min_p,
    repeat_penalty, repeat_last_n, seed, stop, cache_policy, cache_len, cache_opts, adapters, cache,
    compile); `on_token(id)` streams each new id."""
    stream = None if on_token is None else (lambda row, token: on_token(token))
    return generate_batch(model, [prompt], max_new_tokens, on_token=stream, **options)[0]
