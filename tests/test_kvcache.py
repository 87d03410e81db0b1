"""KV caches: cached decoding equals recomputation, ragged batches equal rows run alone, a shared
prefix equals an unshared one, compressed policies stay within their documented error, memory
accounting matches the tensors held."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from h2q import kvbench
from h2q.config import PRESETS
from h2q.kvcache import FullCache, make_cache, prefill
from h2q.kvcompress import quantize
from h2q.model import Transformer

CFG = PRESETS["tiny"]  # context 64
POLICIES = ["full", "int8", "int4", "window", "h2o"]


def tiny_model(seed=0, sharpen=1.0):
    """Random init; `sharpen` scales q/k projections so attention is peaked, not near uniform."""
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.q_proj.weight *= sharpen
            layer.attn.k_proj.weight *= sharpen
    return model


def random_ids(*shape, seed=1):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def feed(model, cache, ids, first_chunk):
    """Logits of ids (B, T) fed as one chunk of `first_chunk` tokens, then one token at a time."""
    out = [model(ids[:, :first_chunk], cache=cache)]
    out += [model(ids[:, t:t + 1], cache=cache) for t in range(first_chunk, ids.shape[1])]
    return torch.cat(out, 1)  # (B, T, V)


@torch.inference_mode()
@pytest.mark.parametrize("length,first_chunk", [(1, 1), (9, 1), (33, 16), (64, 40)])
def test_full_cache_equals_recompute(length, first_chunk):
    model = tiny_model(sharpen=4.0)
    ids = random_ids(2, length)
    cache = make_cache("full", CFG, 2, CFG.context_len)
    assert (feed(model, cache, ids, first_chunk) - model(ids)).abs().max() <= 1e-4
    assert cache.length == length and cache.pos.tolist() == [length, length]


@torch.inference_mode()
@pytest.mark.parametrize("policy", ["full", "window", "h2o"])
def test_ragged_batch_equals_rows_alone(policy):
    """4 histories of different lengths; window/h2o get a budget of 24 so they evict on the way."""
    model = tiny_model(sharpen=4.0)
    max_len = 64 if policy == "full" else 24
    prompts = [random_ids(n, seed=n).tolist() for n in (5, 17, 1, 30)]
    steps = random_ids(4, 25)
    cache = make_cache(policy, CFG, 4, max_len)
    batch = [prefill(model, cache, prompts)]
    batch += [model(steps[:, t:t + 1], cache=cache)[:, -1] for t in range(steps.shape[1])]
    batch = torch.stack(batch, 1)  # (B, 26, V)
    for row, prompt in enumerate(prompts):
        alone = make_cache(policy, CFG, 1, max_len)
        logits = [prefill(model, alone, [prompt])]
        logits += [model(steps[row:row + 1, t:t + 1], cache=alone)[:, -1] for t in range(steps.shape[1])]
        assert (torch.stack(logits, 1)[0] - batch[row]).abs().max() <= 1e-4


@torch.inference_mode()
def test_pad_mask_mid_decode_keeps_rows_exact():
    """A row that sits out a step (PAD, masked) continues as if the step never happened."""
    model = tiny_model(sharpen=4.0)
    ids = random_ids(2, 12)
    cache = make_cache("full", CFG, 2, 32)
    model(ids[:, :8], cache=cache)
    cache.set_pad_mask(torch.tensor([[True], [False]]))
    model(torch.tensor([[ids[0, 8].item()], [257]]), cache=cache)
    assert cache.pos.tolist() == [9, 8]
    cache.set_pad_mask(torch.tensor([[False], [True]]))
    logits = model(torch.tensor([[257], [ids[1, 8].item()]]), cache=cache)
    assert (logits[1, -1] - model(ids[1:, :9])[0, -1]).abs().max() <= 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("policy,tolerance", [("full", 1e-4), ("int8", 0.01), ("int4", 0.1)])
def test_prefix_sharing_equals_unshared_and_rewinds(policy, tolerance):
    """20 agents: shared instruction + own observation, decide, rewind the observation, repeat."""
    model = tiny_model(sharpen=4.0)
    shared = random_ids(20, seed=3).tolist()
    prefix = make_cache("full", CFG, 1, len(shared))
    prefill(model, prefix, [shared])
    prefix_bytes = prefix.nbytes
    cache = make_cache(policy, CFG, 20, 40, prefix=prefix)
    spread = model(random_ids(1, 64)).std()
    for round_ in range(2):
        observations = [random_ids(1 + (7 * row + round_) % 30, seed=row + 100 * round_).tolist() for row in range(20)]
        last = prefill(model, cache, observations)
        for row in (0, 7, 19):
            expected = model(torch.tensor([shared + observations[row]]))[0, -1]
            assert (last[row] - expected).abs().max() <= tolerance * spread
        decided = last.argmax(-1)  # one decoding step on top
        after = model(decided[:, None], cache=cache)[:, -1]
        expected = model(torch.tensor([shared + observations[5] + [decided[5].item()]]))[0, -1]
        assert (after[5] - expected).abs().max() <= tolerance * spread
        cache.truncate(0)
        assert cache.length == 0 and cache.pos.tolist() == [len(shared)] * 20
    assert prefix.nbytes == prefix_bytes  # held once, never copied per row


@torch.inference_mode()
@pytest.mark.parametrize("policy", ["full", "int8", "int4"])
def test_truncate_then_continue_equals_fresh(policy):
    model = tiny_model(sharpen=4.0)
    ids, other = random_ids(1, 50), random_ids(1, 50, seed=2)
    cache = make_cache(policy, CFG, 1, 64)
    feed(model, cache, ids, 45)  # 45 tokens: one int quantized group of 32 + 13 residual, then 5 decoded
    cache.truncate(40)
    rewound = feed(model, cache, torch.cat((ids[:, :40], other[:, 40:]), 1)[:, 40:], 1)
    fresh = make_cache(policy, CFG, 1, 64)
    expected = feed(model, fresh, torch.cat((ids[:, :40], other[:, 40:]), 1), 40)[:, 40:]
    assert (rewound - expected).abs().max() <= 1e-4
    cache.truncate(20)  # into the quantized group: it returns to the residual as dequantized values
    assert cache.length == 20 and cache.pos.tolist() == [20]
    if policy != "full":
        assert cache.n_quant == 0 and cache.k_res[0].shape[2] == 20


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_bound(bits):
    """Documented bound: |x - x^| <= scale / 2 plus fp16 rounding of the group's min and scale."""
    x = torch.randn(3, 5, 32, 16) * torch.rand(1, 1, 1, 16) * 4 + torch.randn(1, 1, 1, 16)
    x[0, 0, 3, 2] = 40.0  # an outlier only widens its own group
    codes, scale, low = quantize(x, -2, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    error = (codes.float() * scale.float() + low.float() - x).abs()
    fp16_slack = 2 ** -10 * (x.abs().amax(-2, keepdim=True) + (2 ** bits - 1) * scale.float())
    assert (error <= scale.float() / 2 + fp16_slack + 1e-6).all()


@torch.inference_mode()
@pytest.mark.parametrize("policy,tolerance", [("int8", 0.01), ("int4", 0.1)])
def test_quantized_cache_logits_close_to_full(policy, tolerance):
    """Documented tolerance: max |logit error| <= 1% (int8) / 10% (int4) of the logits' std, with
    peaked attention; ragged rows included."""
    model = tiny_model(sharpen=4.0)
    ids = random_ids(3, 64)
    cache = make_cache(policy, CFG, 3, 64)
    logits = feed(model, cache, ids, 8)
    reference = model(ids)
    assert (logits - reference).abs().max() <= tolerance * reference.std()
    assert cache.n_quant == 64 and cache.k_res[0].shape[2] == 0


@torch.inference_mode()
@pytest.mark.parametrize("policy", ["window", "h2o"])
def test_evicting_policies_equal_full_while_under_budget(policy):
    model = tiny_model(sharpen=4.0)
    ids = random_ids(2, 64)
    cache = make_cache(policy, CFG, 2, 64)
    assert (feed(model, cache, ids, 16) - model(ids)).abs().max() <= 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("policy,length", [("full", 64), ("window", 60), ("h2o", 32)])
def test_chunked_prefill_equals_one_forward(policy, length):
    """Where the policy allows it (nothing evicted, nothing quantized on the way: int8/int4 read
    their own earlier chunks quantized, so chunking changes their logits within the documented
    tolerance), prefill in chunks of any size gives the logits of one forward, and a cache that
    decodes the same next steps."""
    model = tiny_model(sharpen=4.0)
    prompts = [random_ids(length, seed=1).tolist(), random_ids(length - 9, seed=2).tolist()]
    steps = random_ids(2, 4 if policy == "full" else 8, seed=3)
    whole = make_cache(policy, CFG, 2, 64 + steps.shape[1] * (policy == "full"))
    expected = [prefill(model, whole, prompts, chunk=length)]
    expected += [model(steps[:, t:t + 1], cache=whole)[:, -1] for t in range(steps.shape[1])]
    for chunk in (1, 5, 16):
        cache = make_cache(policy, CFG, 2, whole.max_len)
        logits = [prefill(model, cache, prompts, chunk=chunk)]
        logits += [model(steps[:, t:t + 1], cache=cache)[:, -1] for t in range(steps.shape[1])]
        assert (torch.stack(logits) - torch.stack(expected)).abs().max() <= 1e-4


@torch.inference_mode()
def test_window_keeps_sinks_and_recent_tokens():
    model = tiny_model()
    cache = make_cache("window", CFG, 1, 16, sinks=4)
    feed(model, cache, random_ids(1, 40), 8)
    kept = sorted(cache.time[0, 0, 0][cache.alive[0, 0, 0]].tolist())
    assert kept == [0, 1, 2, 3] + list(range(28, 40))


@torch.inference_mode()
def test_h2o_keeps_recent_and_heaviest_tokens():
    model = tiny_model(sharpen=4.0)
    cache = make_cache("h2o", CFG, 1, 16, recent=6)
    feed(model, cache, random_ids(1, 30), 10)
    for layer in range(CFG.n_layer):
        for head in range(CFG.n_head):
            kept = set(cache.time[layer, 0, head][cache.alive[layer, 0, head]].tolist())
            assert len(kept) == 16 and set(range(24, 30)) <= kept  # the 6 newest are always kept


def held_tensors(cache):
    """Every tensor reachable from the cache's attributes (not through a shared prefix)."""
    found = {}
    for value in vars(cache).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if torch.is_tensor(item):
                found[id(item)] = item
    return list(found.values())


@torch.inference_mode()
@pytest.mark.parametrize("policy", POLICIES)
def test_nbytes_matches_tensors_held(policy):
    model = tiny_model()
    cache = make_cache(policy, CFG, 3, 64)
    feed(model, cache, random_ids(3, 45), 20)
    tensors = held_tensors(cache)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for t in tensors)  # no hidden larger storage


@torch.inference_mode()
def test_compressed_memory_ratios():
    """Heads shaped like the small model's (8 x 32, context 512; one layer is enough, which only
    makes the per-row bookkeeping weigh more), filled to the full context, a whole number of groups
    so the residual is empty: int8 holds >= 3.5x and int4 >= 6x less than fp32."""
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["small"], n_layer=1)).eval()
    ids = random_ids(1, model.config.context_len)
    sizes = {}
    for policy in ("full", "int8", "int4"):
        cache = make_cache(policy, model.config, 1, model.config.context_len)
        model(ids, cache=cache)
        sizes[policy] = cache.nbytes
    assert sizes["full"] / sizes["int8"] >= 3.5 and sizes["full"] / sizes["int4"] >= 6


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_cache("zip", CFG, 1, 8)
    with pytest.raises(ValueError, match="protected"):
        make_cache("window", CFG, 1, 4, sinks=4)
    cache = make_cache("full", CFG, 1, 4)
    with pytest.raises(ValueError, match="cache full"), torch.inference_mode():
        tiny_model()(random_ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="prefix"):
        FullCache(CFG, 2, 8, "cpu", torch.float32, prefix=make_cache("full", CFG, 2, 8))


def test_bits_per_byte_through_full_cache_equals_plain_evaluation():
    """The benchmark's teacher-forced path: one token per forward through `full` gives the plain
    forward's bits per byte, on windows cut evenly from the whole byte array (the last one at its end)."""
    model = tiny_model()
    val = np.frombuffer(bytes(random_ids(400, seed=4).tolist()) + b"\x00" + b"tail" * 20, dtype=np.uint8)
    x, y = kvbench.eval_windows(val, CFG.context_len, 3)
    assert x.shape == (3, CFG.context_len) and int(y[-1, -1]) == ord("l")
    through_cache = kvbench.cache_bits_per_byte(model, "full", x, y, batch=2)
    with torch.inference_mode():
        plain = torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y).item() / math.log(2)
    assert abs(through_cache.bits_per_byte - plain) <= 1e-4
    assert through_cache.bytes_at_end == through_cache.bytes_peak == make_cache("full", CFG, 1, 64).nbytes
