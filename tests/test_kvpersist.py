"""KV caches that persist: a state_dict round trip and a file round trip give the same next logits bit
for bit for every policy, a restored conversation continues as the uninterrupted one, and a file from
another base, other weights, another adapter, or a corrupt one is refused naming the file."""
import copy

import pytest
import torch

from h2q import checkpoint
from h2q.config import PRESETS
from h2q.errors import FileFormatError, H2QError
from h2q.kvcache import cache_from_state, make_cache, prefill
from h2q.lora import AdapterBank, LoraAdapter, LoraConfig
from h2q.model import Transformer
from h2q.quant import quantize

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = PRESETS["tiny"]  # context 64
POLICIES = ["full", "int8", "int4", "window", "h2o"]
BUDGET = {"full": 64, "int8": 64, "int4": 64, "window": 24, "h2o": 24}  # window/h2o evict on the way
OPTIONS = {"int8": {"group": 8}, "int4": {"group": 8}, "window": {"sinks": 2}, "h2o": {"recent": 10}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():  # peaked attention, so that h2o's scores and evictions matter
        for layer in model.layers:
            layer.attn.q_proj.weight *= 4
            layer.attn.k_proj.weight *= 4
    return model


def random_ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def filled_cache(model, policy, adapters=None):
    """Two ragged rows (pads in the cache), then 5 greedy decoding steps: -> (cache, last logits)."""
    cache = make_cache(policy, CFG, 2, BUDGET[policy], **OPTIONS.get(policy, {}))
    logits = prefill(model, cache, [random_ids(19, 1), random_ids(30, 2)], adapters)
    for _ in range(5):
        logits = model(logits.argmax(-1)[:, None], cache=cache, adapters=adapters)[:, -1]
    return cache, logits


def continue_greedy(model, cache, logits, steps=6, adapters=None):
    out = []
    for _ in range(steps):
        logits = model(logits.argmax(-1)[:, None], cache=cache, adapters=adapters)[:, -1]
        out.append(logits)
    return torch.stack(out)


def test_state_tensor_names_per_policy():
    names = {policy: sorted(make_cache(policy, CFG, 1, 32).state_dict()["tensors"]) for policy in POLICIES}
    quant = ["k_codes", "k_min", "k_res", "k_scale", "pos", "v_codes", "v_min", "v_res", "v_scale", "valid"]
    assert names == {"full": ["k", "pos", "v", "valid"], "int8": quant, "int4": quant,
                     "window": ["alive", "k", "pos", "time", "v"], "h2o": ["alive", "k", "pos", "score", "time", "v"]}
    assert make_cache("int4", CFG, 1, 32, group=8).state_dict()["options"] == {"group": 8}
    assert make_cache("h2o", CFG, 1, 32).state_dict()["options"] == {"recent": 16}


@torch.inference_mode()
@pytest.mark.parametrize("policy", POLICIES)
def test_state_dict_round_trip_gives_bit_identical_logits(policy):
    model = tiny_model()
    cache, logits = filled_cache(model, policy)
    restored = cache_from_state(copy.deepcopy(cache.state_dict()), CFG)
    assert restored.nbytes == cache.nbytes and torch.equal(restored.pos, cache.pos)
    assert torch.equal(continue_greedy(model, restored, logits), continue_greedy(model, cache, logits))
    after, again = cache.state_dict(), restored.state_dict()
    assert {k: v for k, v in after.items() if k != "tensors"} == {k: v for k, v in again.items() if k != "tensors"}
    assert all(torch.equal(after["tensors"][k], again["tensors"][k]) for k in after["tensors"])


@torch.inference_mode()
@pytest.mark.parametrize("policy", POLICIES)
def test_file_round_trip_with_adapter_gives_bit_identical_logits(policy, tmp_path):
    model = tiny_model()
    adapter = LoraAdapter(model, LoraConfig(r=2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for b in adapter.lora_B:
            b.normal_(0, 0.5)
    cache, logits = filled_cache(model, policy, adapter)
    rng = torch.Generator().manual_seed(7)
    text = random_ids(40, 9)
    path = checkpoint.save_cache(tmp_path / "chat.safetensors", cache, model, text_ids=text, adapters=adapter,
                                 extra={"cached": 39, "turns": [1, 20], "rng": rng.get_state()})
    restored, ids, meta = checkpoint.load_cache(path, model, adapters=adapter)
    assert ids == text and meta["policy"] == policy and meta["options"] == OPTIONS.get(policy, {})
    assert meta["extra"]["cached"] == 39 and meta["extra"]["turns"] == [1, 20]
    assert torch.equal(meta["extra"]["rng"], rng.get_state())
    assert torch.equal(continue_greedy(model, restored, logits, adapters=adapter),
                       continue_greedy(model, cache, logits, adapters=adapter))


@torch.inference_mode()
@pytest.mark.parametrize("policy", POLICIES)
def test_restored_conversation_continues_as_the_uninterrupted_one(policy, tmp_path):
    """A conversation = its text + its cache: prefill, reply, save; load in a new 'process'; the next
    turn's prefill and reply give the logits of the session that never stopped, bit for bit."""
    model = tiny_model()
    text = random_ids(20, 5)
    cache = make_cache(policy, CFG, 1, BUDGET[policy], **OPTIONS.get(policy, {}))
    logits = prefill(model, cache, [text])
    for _ in range(8):  # the reply, greedy; each byte joins the text and then the cache
        text.append(int(logits.argmax()))
        logits = model(torch.tensor([text[-1:]]), cache=cache)[:, -1]
    checkpoint.save_cache(tmp_path / "s.safetensors", cache, model, text_ids=text, extra={"cached": len(text)})
    turn = random_ids(12, 6)
    uninterrupted = continue_greedy(model, cache, prefill(model, cache, [turn]))
    restored, ids, meta = checkpoint.load_cache(tmp_path / "s.safetensors", tiny_model())
    assert ids == text and meta["extra"]["cached"] == len(ids)
    assert torch.equal(continue_greedy(model, restored, prefill(model, restored, [turn])), uninterrupted)


def test_text_alone_and_the_file_info(tmp_path):
    """A conversation whose cache is to be rebuilt saves its text alone; the info is readable before
    a model is chosen (to pick the adapter or quantization the cache was made with)."""
    model = tiny_model()
    path = checkpoint.save_cache(tmp_path / "t.safetensors", None, model, text_ids=[256, 104, 105],
                                 extra={"adapter_label": "none"})
    cache, ids, meta = checkpoint.load_cache(path, model)
    assert cache is None and ids == [256, 104, 105] and meta["extra"] == {"adapter_label": "none"}
    _, info = checkpoint.read_cache_file(path)
    assert info["adapter"] == "none" and info["weights"] == "float" and info["config"] == CFG
    assert info["base_fingerprint"] == model.base_fingerprint() and info["cache"] is None
    with pytest.raises(H2QError, match="text ids"):
        checkpoint.save_cache(tmp_path / "bad.safetensors", None, model, text_ids=[300])
    with pytest.raises(H2QError, match="JSON or tensors"):
        checkpoint.save_cache(tmp_path / "bad.safetensors", None, model, extra={"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # nothing half-written


@torch.inference_mode()
def test_shared_prefix_state_restores_over_the_same_prefix():
    model = tiny_model()
    prefix = make_cache("full", CFG, 1, 10)
    prefill(model, prefix, [random_ids(10, 4)])
    cache = make_cache("int8", CFG, 3, 40, prefix=prefix, group=8)
    logits = prefill(model, cache, [random_ids(n, n) for n in (3, 11, 17)])
    state = cache.state_dict()
    assert state["counters"]["prefix_len"] == 10
    with pytest.raises(H2QError, match="shared prefix of 10"):
        cache_from_state(state, CFG)
    restored = cache_from_state(state, CFG, prefix=prefix)
    assert torch.equal(continue_greedy(model, restored, logits), continue_greedy(model, cache, logits))
    with pytest.raises(H2QError, match="shared prefix"):
        checkpoint.save_cache("unused.safetensors", cache, model)


@torch.inference_mode()
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing():
    model = tiny_model()
    cache, _ = filled_cache(model, "int8")
    state = cache.state_dict()
    other = make_cache("int8", CFG, 2, 64, group=8)
    before = other.state_dict()
    bad_shape = copy.deepcopy(state)
    bad_shape["tensors"]["k_res"] = bad_shape["tensors"]["k_res"][:, :, :, :1]
    bad_counters = copy.deepcopy(state)
    bad_counters["counters"]["n_quant"] += 3
    for bad, match in ((dict(state, policy="int4"), "policy"), (dict(state, options={"group": 16}), "options"),
                       (dict(state, max_len=32), "max_len"), (bad_shape, "k_res"), (bad_counters, "inconsistent"),
                       (dict(state, tensors={}), "tensors")):
        with pytest.raises(H2QError, match=match):
            other.load_state_dict(bad)
    after = other.state_dict()
    assert after["counters"] == before["counters"]
    assert all(torch.equal(after["tensors"][k], before["tensors"][k]) for k in before["tensors"])
    with pytest.raises(H2QError, match="policy 'zip'"):
        cache_from_state(dict(state, policy="zip"), CFG)


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    with torch.inference_mode():
        cache, _ = filled_cache(model, "h2o")
    path = checkpoint.save_cache(tmp_path / "s.safetensors", cache, model, text_ids=random_ids(30, 1))
    return model, path


def test_another_base_weights_or_adapter_is_refused(saved):
    model, path = saved
    with pytest.raises(FileFormatError, match=f"{path}.*made on base"):
        checkpoint.load_cache(path, tiny_model(seed=1))
    with pytest.raises(FileFormatError, match=f"{path}.*another base shape"):
        checkpoint.load_cache(path, Transformer(PRESETS["mini"]))
    with pytest.raises(FileFormatError, match=f"{path}.*other weights"):
        checkpoint.load_cache(path, quantize(copy.deepcopy(model), "int8"))
    with pytest.raises(FileFormatError, match=f"{path}.*adapter"):
        checkpoint.load_cache(path, model, adapters=LoraAdapter(model, LoraConfig(r=2)))
    bank = AdapterBank(model, LoraConfig(r=2), 2)
    assert checkpoint.adapter_fingerprint(bank.bind([0])) != checkpoint.adapter_fingerprint(bank.bind([-1]))
    assert checkpoint.adapter_fingerprint(bank.bind([1])) != checkpoint.adapter_fingerprint(bank.bind([0]))


def test_corrupt_truncated_garbage_or_foreign_files_are_refused(saved, tmp_path):
    model, path = saved
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cases = {f"cut{n}": data[:n] for n in (0, 7, 100, header, len(data) - 1)}
    flipped = bytearray(data)
    for i in range(header + 10, len(data), 997):
        flipped[i] ^= 0xFF
    cases["flipped"] = bytes(flipped)
    cases["garbage"] = bytes(range(256)) * 40
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(FileFormatError, match=str(bad)):
            checkpoint.load_cache(bad, model)
    model_file = checkpoint.save_model(tmp_path / "ckpt", model)
    with pytest.raises(FileFormatError, match=f"{model_file} is not an h2q KV cache file"):
        checkpoint.load_cache(model_file, model)
    with pytest.raises(FileFormatError, match="not found"):
        checkpoint.load_cache(tmp_path / "missing.safetensors", model)
    assert path.read_bytes() == data  # the good file is untouched


def test_one_content_hash_covers_metadata_and_tensors(saved, tmp_path):
    """Cache files carry main's one content hash (no second checksum); an edited metadata value under
    the old hash, or a file without the hash, is refused."""
    from safetensors.torch import load_file, save_file

    model, path = saved
    meta = checkpoint.read_metadata(path)
    assert sorted(meta) == ["adapter", "base_fingerprint", "cache", "config", checkpoint.CONTENT_HASH, "extra",
                            "format", "tokenizer", "weights"]
    tensors = load_file(str(path))
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={**meta, "adapter": "0" * 16})
    with pytest.raises(FileFormatError, match=f"{edited} is corrupt.*save the conversation again"):
        checkpoint.load_cache(edited, model)
    unhashed = tmp_path / "unhashed.safetensors"
    save_file(tensors, str(unhashed), metadata={k: v for k, v in meta.items() if k != checkpoint.CONTENT_HASH})
    with pytest.raises(FileFormatError, match=f"{unhashed} carries no content hash"):
        checkpoint.load_cache(unhashed, model)
