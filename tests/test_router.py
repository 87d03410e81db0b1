"""Specialists and the router: the batched multi-adapter scores equal one forward per adapter, the
router picks the specialist trained on the prompt's kind, tags and folders are checked, and the
Bayesian mixture is what it says."""
import math

import pytest
import torch

from h2q import checkpoint
from h2q.config import PRESETS
from h2q.errors import FileFormatError, H2QError
from h2q.generate import generate
from h2q.lora import AdapterBank, LoraAdapter, LoraConfig
from h2q.model import Transformer
from h2q.router import Router, generate_mixed, mixture_log2_probs

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = PRESETS["tiny"]
KINDS = {"digits": b"31 41 59 26 53 58 97 93 23 84 62 64 33 83 27 95 02 88 41 97 16 93 99 37 51\n",
         "words": b"the cat sat on the mat and the dog lay by the door of the old red barn\n"}


def base_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def random_adapter(model, seed, r=2):
    adapter = LoraAdapter(model, LoraConfig(r=r), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for b in adapter.lora_B:
            b.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 100))
    return adapter


def fine_tuned(model, text: bytes, steps=20, seed=0):
    """A rank-4 adapter fitted to windows of `text` repeated: a specialist of one kind."""
    adapter = LoraAdapter(model, LoraConfig(r=4), generator=torch.Generator().manual_seed(seed))
    data = torch.tensor(list(text * 8))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=generator)
        x = torch.stack([data[s:s + 33] for s in starts.tolist()])  # (8, 33)
        logits = model(x[:, :-1], adapters=adapter)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapter.eval()


@pytest.fixture(scope="module")
def specialists(tmp_path_factory):
    """A folder of two specialists fine-tuned on their kind, and a stray non-adapter folder."""
    folder = tmp_path_factory.mktemp("specialists")
    model = base_model()
    model.requires_grad_(False)
    threads = torch.get_num_threads()  # module scope: set up before the one_thread fixture applies
    torch.set_num_threads(1)
    try:
        for i, (kind, text) in enumerate(KINDS.items()):
            checkpoint.save_adapter(folder / kind, fine_tuned(model, text, seed=i), model)
    finally:
        torch.set_num_threads(threads)
    (folder / "notes").mkdir()
    return folder, model


def test_batched_scores_equal_one_forward_per_adapter():
    model = base_model()
    adapters = [random_adapter(model, seed) for seed in (1, 2, 3)]
    router = Router(model, ["a", "b", "c"], AdapterBank.from_adapters(adapters))
    ids = list(KINDS["words"][:40])
    batched = router.log2_probs(ids, [0, 1, 2, -1])
    x = torch.tensor([ids])
    with torch.inference_mode():
        for row, adapter in enumerate([*adapters, None]):
            alone = model(x[:, :-1], adapters=adapter).log_softmax(-1)[0].gather(-1, x[0, 1:, None])[:, 0]
            assert (batched[row] - alone / math.log(2)).abs().max() <= 1e-5
    assert not torch.allclose(batched[0], batched[3])  # the adapters do change the scores


def test_router_picks_the_specialist_of_the_prompts_kind(specialists):
    folder, model = specialists
    router = Router.from_folder(folder, model)
    assert router.tasks == ["digits", "words"]  # sorted folder names; 'notes' holds no adapter
    for kind, text in KINDS.items():
        prompt = list(text[5:45])
        decision = router.route(prompt)
        assert decision.tasks == [kind] and decision.how == "auto" and decision.weights == [1.0]
        other = next(k for k in KINDS if k != kind)
        assert decision.bits_per_byte[kind] < decision.bits_per_byte[other] and decision.ms > 0
        assert kind in decision.describe()
        mixed = router.route(prompt, top_k=2)
        assert mixed.tasks[0] == kind and mixed.how == "mix" and abs(sum(mixed.weights) - 1) < 1e-6
        assert mixed.weights[0] > mixed.weights[1]


def test_explicit_tag_and_unknown_tag(specialists):
    folder, model = specialists
    router = Router.from_folder(folder, model)
    decision = router.route(list(KINDS["digits"]), task="words")
    assert decision.tasks == ["words"] and decision.how == "tag" and decision.describe() == "[route: words (tag)]"
    with pytest.raises(H2QError, match="no specialist 'law'; choose one of digits, words"):
        router.route([1, 2], task="law")
    with pytest.raises(H2QError, match="top_k"):
        router.route([1, 2, 3], top_k=3)


def test_top1_reply_is_the_specialists_and_a_mix_of_one_equals_it(specialists):
    folder, model = specialists
    router = Router.from_folder(folder, model)
    prompt = list(KINDS["words"][:20])
    alone = generate(model, prompt, 12, temperature=0, stop=(), adapters=router.adapters("words"))
    one = router.route(prompt, task="words")
    assert generate_mixed(router, prompt, one, 12, temperature=0, stop=()) == alone
    both = router.route(prompt, top_k=2)
    assert len(generate_mixed(router, prompt, both, 12, temperature=1.0, seed=0, stop=())) == 12


def test_folder_problems_are_clear(specialists, tmp_path):
    folder, model = specialists
    with pytest.raises(H2QError, match="does not exist"):
        Router.from_folder(tmp_path / "nope", model)
    with pytest.raises(H2QError, match="holds no adapter folders"):
        Router.from_folder(tmp_path, model)
    checkpoint.save_adapter(tmp_path / "a", random_adapter(model, 1, r=2), model)
    checkpoint.save_adapter(tmp_path / "b", random_adapter(model, 2, r=4), model)
    with pytest.raises(H2QError, match="differ in rank"):
        Router.from_folder(tmp_path, model)
    with pytest.raises(FileFormatError, match="trained on base"):
        Router.from_folder(folder, base_model(seed=1))


def test_bayesian_mixture():
    log2_p = -torch.rand(3, 50) * 6  # three experts' log2 p of 50 bytes
    assert torch.allclose(mixture_log2_probs(log2_p[:1]), log2_p[0])
    total = mixture_log2_probs(log2_p).double().sum()
    expected = torch.logsumexp(log2_p.double().sum(1) * math.log(2), 0) / math.log(2) - math.log2(3)
    assert abs(total - expected) < 1e-6  # log2 of the mean likelihood
    assert total >= log2_p.double().sum(1).max() - math.log2(3) - 1e-6  # within log2(k) bits of the best
