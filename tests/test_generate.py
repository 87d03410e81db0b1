"""Generation: greedy is deterministic and matches recomputation, seeds reproduce, stop bytes stop,
top-k 1 is greedy, batches equal single prompts, the decode loop continues a kept cache, `window`
streams past the context in fixed memory, and no warning filter is changed behind the caller's back.
The sampler: llama.cpp's repetition penalty and min-p on hand-made logits, the penalty's window in
generation against a recomputing reference, non-finite logits refused, quantized weights compiled."""
import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from h2q import tokenizer
from h2q.config import PRESETS
from h2q.errors import H2QError
from h2q.generate import (
    COMPLEX_NOTICE,
    TextStreamer,
    compiled_decoder,
    decode,
    generate,
    generate_batch,
    recent_ids,
    sample_next,
)
from h2q.kvcache import make_cache, prefill
from h2q.model import Transformer
from h2q.quant import quantize

CFG = PRESETS["tiny"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@torch.inference_mode()
def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The minimal sampler: run the whole sequence every step, take the argmax (PAD excluded)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        logits[tokenizer.PAD] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_is_deterministic_and_equals_recompute(model):
    prompt = b"hello agents"
    first = generate(model, prompt, 30, temperature=0, stop=())
    assert first == generate(model, prompt, 30, temperature=0, stop=())
    assert first == greedy_by_recompute(model, tokenizer.encode(prompt), 30)


def test_seed_reproducible(model):
    runs = [generate(model, "abc", 25, temperature=1.0, seed=seed, stop=()) for seed in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    greedy = generate(model, "xyz", 20, temperature=0, stop=())
    assert generate(model, "xyz", 20, temperature=1.3, top_k=1, seed=1, stop=()) == greedy
    assert generate(model, "xyz", 20, temperature=1.3, top_p=1e-6, seed=1, stop=()) == greedy


def test_stop_bytes_stop(model):
    greedy = generate(model, "stop me", 30, temperature=0, stop=())
    stop_at = greedy[5]
    out = generate(model, "stop me", 30, temperature=0, stop=bytes([stop_at]) if stop_at < 256 else [stop_at])
    assert out == greedy[:greedy.index(stop_at)]


def test_streaming_callback_and_text(model):
    seen, text = [], []
    streamer = TextStreamer(text.append)
    out = generate(model, "ünïcode", 40, temperature=1.0, seed=3, stop=(),
                   on_token=lambda t: (seen.append(t), streamer(t)))
    streamer.close()
    assert seen == out and "".join(text) == tokenizer.decode(out)


def test_batch_of_different_lengths_equals_single_prompts(model):
    prompts = [b"a", b"twenty agents decide", b"", bytes(range(40, 75))]
    batch = generate_batch(model, prompts, 12, temperature=0, stop=())
    for prompt, out in zip(prompts, batch):
        assert out == generate(model, prompt, 12, temperature=0, stop=())


def test_decode_loop_continues_a_kept_cache(model):
    """The loop the chat's conversation runs: greedy ids equal recomputation, each id joins the cache
    only when the next is asked for (the last one is never fed), and a sent id is fed instead."""
    prompt = tokenizer.encode(b"hello agents")
    cache = make_cache("full", CFG, 1, 40)
    with torch.inference_mode():
        steps = decode(model, cache, prefill(model, cache, [prompt]), temperature=0)
        ids = [int(next(steps)) for _ in range(10)]
        assert ids == greedy_by_recompute(model, prompt, 10) and cache.length == len(prompt) + 9
        other = int(steps.send(torch.tensor([ord("x")])))  # feed 'x' in place of the 10th id
    assert other == greedy_by_recompute(model, prompt + ids[:9] + [ord("x")], 1)[0]


@pytest.mark.slow
def test_imports_leave_the_warning_filters_alone():
    """torch and numpy set their own filters when imported; h2q's modules add none."""
    code = ("import warnings, numpy, safetensors.torch, torch, tqdm; before = list(warnings.filters); "
            "import h2q.infer, h2q.kvbench, h2q.report; "
            "assert warnings.filters == before, 'an h2q import changed the warning filters'")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_compiled_decoding_equals_eager(model):
    prompts = [b"twenty agents decide", b"a", bytes(range(40, 75))]
    stop = [generate_batch(model, prompts, 12, temperature=0, stop=())[1][4]]  # rows stop: pad masks
    eager = generate_batch(model, prompts, 12, temperature=0, stop=stop)
    with warnings.catch_warnings(record=True) as seen:  # the compile happens in here
        warnings.simplefilter("always")
        assert generate_batch(model, prompts, 12, temperature=0, stop=stop, compile=True) == eager
    assert not [w for w in seen if COMPLEX_NOTICE in str(w.message)]  # silenced inside the call...
    assert not [f for f in warnings.filters if f[1] is not None and f[1].match(COMPLEX_NOTICE)]  # ...only
    cache, ids = make_cache("full", CFG, 1, 20), torch.tensor([tokenizer.encode(b"sixteen bytes ok")])
    with torch.inference_mode():
        steps = [compiled_decoder(model)(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(16)]  # batch 1
        torch.testing.assert_close(torch.stack(steps, 1), model(ids), rtol=1e-4, atol=1e-4)


def test_batch_rows_stop_independently(model):
    prompts = [b"one", b"two two", b"three three three"]
    free = generate_batch(model, prompts, 15, temperature=0, stop=())
    stop_at = free[1][3]
    stopped = generate_batch(model, prompts, 15, temperature=0, stop=[stop_at])
    for full, out in zip(free, stopped):
        assert out == (full[:full.index(stop_at)] if stop_at in full else full)


@pytest.mark.parametrize("policy", ["int8", "int4", "window", "h2o"])
def test_every_policy_generates(model, policy):
    out = generate(model, "policy", 20, temperature=0.8, top_k=40, top_p=0.9, seed=0, stop=(),
                   cache_policy=policy)
    assert len(out) == 20 and all(0 <= t <= tokenizer.EOT for t in out)


@pytest.mark.slow
def test_window_streams_4x_context_in_fixed_memory(model):
    """256 new tokens from a 64-token model: positions stay inside the window, memory is flat."""
    cache = make_cache("window", CFG, 1, CFG.context_len)
    sizes = []
    out = generate(model, "stream", 4 * CFG.context_len, temperature=1.0, seed=0, stop=(), cache=cache,
                   on_token=lambda t: sizes.append(cache.nbytes))
    assert len(out) == 4 * CFG.context_len
    assert len(set(sizes)) == 1 and int(cache.alive.sum()) == CFG.context_len
    with pytest.raises(H2QError, match="context"):
        generate(model, "stream", 4 * CFG.context_len, cache_policy="full")


def test_sample_next_shapes_and_greedy():
    logits = torch.randn(3, 5, 258)
    assert sample_next(logits, 0).shape == (3, 5)
    assert torch.equal(sample_next(logits, 0), logits.argmax(-1))
    assert sample_next(logits[0, 0], 1.0, top_k=3, generator=torch.Generator().manual_seed(0)).shape == ()


def test_bad_sampling_options_are_user_errors(model):
    for options in ({"temperature": -1}, {"temperature": float("inf")}, {"temperature": float("nan")}, {"top_k": 0},
                    {"top_p": 0.0}, {"min_p": 1.5}, {"repeat_penalty": 0.0}, {"repeat_penalty": float("inf")},
                    {"repeat_last_n": -2}, {"cache_policy": "zip"}):
        with pytest.raises(H2QError):
            generate(model, "x", 3, **options)


# -- the sampler's guards ----------------------------------------------------------------------------
def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    """llama.cpp's meaning: each distinct id of the window once, however often it occurs there."""
    logits = torch.tensor([[3.0, 2.0, -1.0, -1.5]])
    assert int(sample_next(logits, 0)) == 0
    assert int(sample_next(logits, 0, repeat_penalty=2.0, recent=torch.tensor([[0]]))) == 1  # 3 / 2 < 2
    assert int(sample_next(logits, 0, repeat_penalty=2.0, recent=torch.tensor([[0, 0, 0, 0]]))) == 1  # not 3 / 16
    assert int(sample_next(logits, 0, repeat_penalty=1.4, recent=torch.tensor([[0]]))) == 0  # 3 / 1.4 > 2
    negative = torch.tensor([[-1.0, -1.5]])
    assert int(sample_next(negative, 0, repeat_penalty=2.0, recent=torch.tensor([[0]]))) == 1  # -1 * 2 < -1.5
    assert int(sample_next(negative, 0, repeat_penalty=2.0, recent=torch.tensor([[1]]))) == 0
    # the sampled distribution: penalized logits (2 / 2, 0.5) against the untouched id 1's 1.0
    draws = sample_next(torch.tensor([2.0, 1.0]).expand(20000, 2), 1.0, repeat_penalty=2.0,
                        recent=torch.zeros(20000, 1, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert abs(float(draws.float().mean()) - 0.5) < 0.02  # logits 1.0 and 1.0: an even draw


def test_min_p_drops_ids_below_its_share_of_the_top_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40000, 4)
    draws = sample_next(logits, 1.0, min_p=0.2, generator=torch.Generator().manual_seed(0))  # cut at 0.1
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[3] == 0 and counts[2] > 0
    torch.testing.assert_close(counts[:3], probs[:3] / probs[:3].sum(), atol=0.01, rtol=0)
    draws = sample_next(logits, 1.0, min_p=0.5, generator=torch.Generator().manual_seed(0))  # cut at 0.25
    assert set(draws.tolist()) == {0, 1}
    # on the temperature-scaled distribution: at temperature 2 the ratios are square roots
    draws = sample_next(logits, 2.0, min_p=0.5, generator=torch.Generator().manual_seed(0))  # sqrt(.15/.5) > .5
    assert set(draws.tolist()) == {0, 1, 2}
    assert int(sample_next(logits[0], 1.0, min_p=1.0)) == 0  # min-p 1 keeps the top id alone


def test_recent_ids_are_the_window_left_filled_with_pad():
    rows = recent_ids([[1, 2, 3, 4, 5], [7], []], 3)
    assert rows.tolist() == [[3, 4, 5], [tokenizer.PAD, tokenizer.PAD, 7], [tokenizer.PAD] * 3]
    assert recent_ids([[1, 2, 3]], -1).tolist() == [[1, 2, 3]] and recent_ids([[1, 2]], 0).shape == (1, 0)


@torch.inference_mode()
def penalized_greedy_by_recompute(model, prompt: list[int], n: int, penalty: float, last_n: int) -> list[int]:
    """The reference: whole sequence each step, llama.cpp's penalty over the last `last_n` ids of
    prompt and output, argmax."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].tolist()
        for i in set(ids[-last_n:]):
            logits[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
        logits[tokenizer.PAD] = float("-inf")
        ids.append(max(range(len(logits)), key=logits.__getitem__))
    return ids[len(prompt):]


def test_generation_penalizes_the_window_of_prompt_and_output(model):
    prompt = b"aaaa bbbb"
    for penalty, last_n in [(1.5, 4), (3.0, 16)]:
        expected = penalized_greedy_by_recompute(model, list(prompt), 20, penalty, last_n)
        got = generate(model, prompt, 20, temperature=0, stop=(), repeat_penalty=penalty, repeat_last_n=last_n)
        assert got == expected
    assert generate(model, prompt, 20, temperature=0, stop=(), repeat_penalty=3.0, repeat_last_n=0) == \
        generate(model, prompt, 20, temperature=0, stop=())  # a window of 0 is off


def test_non_finite_logits_are_a_clear_error_and_tiny_temperatures_are_greedy():
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(2, 258)
        logits[1, 7] = bad
        for temperature in (0, 1.0):
            with pytest.raises(H2QError, match="NaN or inf.*weights"):
                sample_next(logits, temperature)
    logits = torch.randn(4, 258)
    logits[:, tokenizer.PAD] = float("-inf")  # a masked id is not an error
    assert torch.equal(sample_next(logits, 1e-30, top_p=0.9, min_p=0.1), logits.argmax(-1))  # no overflow to NaN


@pytest.mark.slow
def test_compiled_int4_decoding_equals_eager(model):
    """--compile covers quantized weights: int4 (the packed layout) gives the eager greedy bytes."""
    int4 = quantize(copy.deepcopy(model), "int4", 32)
    eager = generate(int4, b"twenty agents", 6, temperature=0, stop=())
    assert generate(int4, b"twenty agents", 6, temperature=0, stop=(), compile=True) == eager
