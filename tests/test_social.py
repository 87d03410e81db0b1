"""The social env on tiny configs: the feed and follow rules, the quality signal and the readers' reward on
crafted posts, graph figures, determinism under a seed, exact resume, and the batched multi-adapter
decode of the writers; through the evolve runner: resume equals an uninterrupted run, every strategy
runs, the report shows the network; the terminal view of the network."""
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from h2q import checkpoint
from h2q import generate as generation
from h2q.config import PRESETS
from h2q.errors import ConfigError, H2QError
from h2q.evolve import quality as Q
from h2q.evolve import records
from h2q.evolve.evolution import BreedConfig, Population
from h2q.evolve.render import ENTER, LEAVE, Renderer, network_text
from h2q.evolve.run import EvolveConfig, evolve
from h2q.evolve.social_env import (
    Network,
    SocialConfig,
    SocialEnv,
    apply_actions,
    build_feeds,
    clustering,
    density,
)
from h2q.evolve.text_env import TextConfig
from h2q.lora import LoraConfig, freeze_base
from h2q.model import Transformer
from h2q.report import write_report

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = SocialConfig(post_bytes=16, prompt_bytes=8, eval_ticks=2, feed_size=3, feed_random=1, write_every=2)


@pytest.fixture(scope="module")
def corpus():
    return Q.load_topic_corpus(max_docs=48)


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return freeze_base(Transformer(PRESETS["tiny"])).to(dtype).eval()


def population(model, n=6):
    pop = Population.initial(model.config, LoraConfig(r=4, alpha=8), n, 4, 5e-3, 1.0, 0.5,
                             torch.Generator().manual_seed(0))
    return pop.to(model.embed.weight.device)


def make_env(corpus, n=6, cfg=TINY):
    model = tiny_model()
    pop = population(model, n)
    return SocialEnv(model, pop.bank, cfg, corpus=corpus), pop


def bank_tensors(pop):
    return [p.detach().clone() for p in pop.bank.parameters()]


# -- the rules -------------------------------------------------------------------------------------------
def test_feeds_hold_followed_authors_first_then_random_posts_never_ones_own():
    n, k, k_random = 6, 4, 1
    authors = np.array([0, 1, 2, 3, 4])  # agent 5 did not post this tick
    follows = np.zeros((n, n), dtype=bool)
    follows[0, [1, 2, 3, 4]] = True  # follows four authors: only k - k_random = 3 of them get in first
    follows[5, 2] = True
    readers, posts = build_feeds(authors, follows, k, k_random, np.random.default_rng(0))
    assert np.all(np.diff(readers) >= 0), "reader-major rows"
    for reader in range(n):
        feed = authors[posts[readers == reader]]
        candidates = [a for a in authors if a != reader]
        assert reader not in feed and len(set(feed)) == len(feed) == min(k, len(candidates))
    assert set(authors[posts[readers == 5]]) >= {2}
    # reader 0: the three first places go to followed authors, the random one may be followed too
    assert follows[0, authors[posts[readers == 0]][:3]].all()
    again = build_feeds(authors, follows, k, k_random, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip((readers, posts), again)), "seeded: the same feeds"


def test_feed_random_places_stay_random_when_enough_followed_posts():
    n = 8
    authors = np.arange(n)
    follows = np.zeros((n, n), dtype=bool)
    follows[0, 1:4] = True
    seen = set()
    for seed in range(30):
        readers, posts = build_feeds(authors, follows, 3, 1, np.random.default_rng(seed))
        feed = authors[posts[readers == 0]]
        assert follows[0, feed[:2]].all(), "two places for followed authors"
        seen.add(int(feed[2]))
    assert seen - {1, 2, 3}, "the random place reaches authors nobody followed"


def test_follow_rules():
    follows = np.zeros((3, 3), dtype=bool)
    readers, authors = np.array([0, 0, 1, 2]), np.array([1, 2, 0, 1])
    actions = np.array([Q.FOLLOW, Q.LIKE, Q.IGNORE, Q.FOLLOW])
    effective = apply_actions(follows, readers, authors, actions)
    assert follows.tolist() == [[False, True, False], [False, False, False], [False, True, False]]
    assert effective.tolist() == actions.tolist()
    again = apply_actions(follows, np.array([0]), np.array([1]), np.array([Q.FOLLOW]))
    assert again.tolist() == [Q.LIKE], "following someone already followed is a like"
    assert int(follows.sum()) == 2


def test_graph_figures():
    follows = np.zeros((4, 4), dtype=bool)
    follows[0, 1] = follows[1, 2] = follows[2, 0] = True  # a directed triangle; user 3 alone
    assert density(follows) == pytest.approx(3 / 12)
    assert clustering(follows) == pytest.approx(3 / 4)  # three users with coefficient 1, one with 0
    follows[0, 3] = True  # user 0 now has neighbours 1, 2, 3 and one link among them
    assert clustering(follows) == pytest.approx((1 / 3 + 1 + 1 + 0) / 4)


# -- the quality signal ------------------------------------------------------------------------------------
def crafted_signal(corpus):
    classifier = Q.TopicClassifier(corpus, 48)
    return Q.QualitySignal(classifier, text_bpb=2.0, noise_bpb=6.0, distinct_ref=0.8, min_bytes=12)


def test_topic_classifier_separates_held_out_topics(corpus):
    classifier = Q.TopicClassifier(corpus, 48)
    assert classifier.accuracy > 0.8
    posterior = classifier.posterior([b"    def __init__(self, name, value=None):\n        self.name = name",
                                      b"The import statement binds a name in the local namespace of the module."])
    assert posterior.argmax(1).tolist() == [0, 1] and np.allclose(posterior.sum(1), 1)


def test_spam_earns_less_than_a_fluent_on_topic_post(corpus):
    signal = crafted_signal(corpus)
    code = 0
    fluent = b"        if value is None:\n            value = self.default\n"
    repeated = b"def " * 12  # what a language model predicts best: low bits, topical n-grams
    copy = fluent[:-4] + b"x\n"  # a near-duplicate of the fluent post
    noise = bytes(np.random.default_rng(0).integers(32, 127, 48, dtype=np.uint8))
    posts = [fluent, repeated, noise, b"if x:"]
    bpb = np.array([2.0, 0.5, 7.5, 2.0])  # the base's bits/byte: repetition is the most predictable
    quality = signal.score(posts, bpb)
    q = quality.per_topic[:, code]
    assert q[0] > 0.5 and q[1] < 0.1 * q[0] and q[2] == 0 and q[3] == 0, q
    assert quality.fluency[1] == 1.0 and quality.novelty[1] == 0.0, "repetition is fluent but not novel"
    dup = signal.score([copy], np.array([2.0]), recent=[fluent]).per_topic[0, code]
    assert dup == 0.0, "a near-duplicate of a recent post is worth nothing"
    rewards = Q.reader_rewards(q, np.zeros(len(q), dtype=bool))
    assert rewards[0, Q.LIKE] > 0 > rewards[1, Q.LIKE], "liking spam costs the reader, liking good text pays"
    assert rewards[0, Q.IGNORE] < 0 < rewards[1, Q.IGNORE], "and ignoring it is the other way round"
    scripted = Q.scripted_actions(rewards)
    assert scripted[0] in (Q.LIKE, Q.FOLLOW) and scripted[1] == Q.IGNORE
    docs_reader = quality.per_topic[0, Q.TOPICS.index("docs")]
    assert docs_reader < 0.1 * q[0], "a code post is little worth to a reader of docs"


def test_reader_rewards_table():
    q = np.array([0.0, 0.6, 0.9, 0.9])
    following = np.array([False, False, False, True])
    r = Q.reader_rewards(q, following)
    assert np.allclose(r[:, Q.LIKE], q - Q.LIKE_BAR) and np.allclose(r[:, Q.IGNORE], Q.LIKE_BAR - q)
    assert np.allclose(r[:3, Q.FOLLOW], 2 * (q[:3] - Q.FOLLOW_BAR)) and r[3, Q.FOLLOW] == r[3, Q.LIKE]
    assert Q.scripted_actions(r).tolist() == [Q.IGNORE, Q.LIKE, Q.FOLLOW, Q.LIKE]


def test_distinct_words():
    assert Q.distinct_words([b"a b c", b"a b d"]) == pytest.approx(3 / 4)
    assert Q.distinct_words([b"spam spam spam spam"]) == pytest.approx(1 / 3)


# -- the env -----------------------------------------------------------------------------------------------
def test_bad_configs_are_one_clear_error():
    with pytest.raises(ConfigError, match="feed_random"):
        SocialConfig(feed_size=2, feed_random=3)
    with pytest.raises(ConfigError, match="post_bytes"):
        SocialEnv(tiny_model(), population(tiny_model()).bank, SocialConfig(post_bytes=60, prompt_bytes=8), corpus=object())


def test_live_and_evaluate_give_the_runner_what_it_records(corpus):
    env, pop = make_env(corpus)
    before = bank_tensors(pop)
    ticks = []
    life = env.live(pop.agents, 3, seed=1, tick=lambda: ticks.append(1))
    assert set(life) == {"likes", "followers", "reader_reward"} and all(v.shape == (6,) for v in life.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, bank_tensors(pop))), "learning moved the adapters"
    ev = env.evaluate(pop.agents, seed=2, tick=lambda: ticks.append(1))
    assert len(ticks) == env.ticks(3, True) == 3 + TINY.eval_ticks
    assert ev.fitness.shape == (6,) and np.isfinite(ev.fitness).all()
    assert np.allclose(ev.fitness, ev.per_agent["writer_score"] + ev.per_agent["reader_score"])
    assert sorted(ev.totals) == ["follows", "likes", "posts", "users"] and ev.totals["users"] == 6
    for key in ("post_bpb", "topic_acc", "distinct2", "likes_per_post", "follow_density", "clustering",
                "random_reader", "scripted_reader", "base_fitness", "base_post_bpb", "base_distinct2"):
        assert np.isfinite(ev.references[key]), key
    assert ev.references["scripted_reader"] >= max(ev.references["random_reader"], ev.references["reader"])
    record = records.metrics_record(1, ev, life, None)
    assert record["posts"] == ev.totals["posts"] and "median_writer_score" in record
    assert env.snapshot["posts"] and "text" in env.snapshot["posts"][0]
    text = network_text(Network([a.id for a in pop.agents], env.topics))
    assert pop.agents[0].id in text and "follows" in text


def test_same_seed_same_life_and_evaluation(corpus):
    results = []
    for _ in range(2):
        env, pop = make_env(corpus)
        life = env.live(pop.agents, 3, seed=5, tick=lambda: None)
        ev = env.evaluate(pop.agents, seed=6, tick=lambda: None)
        results.append((life, ev, bank_tensors(pop), env.snapshot))
    (l1, e1, b1, s1), (l2, e2, b2, s2) = results
    assert all(np.array_equal(l1[k], l2[k]) for k in l1)
    assert np.array_equal(e1.fitness, e2.fitness) and e1.references == e2.references and s1 == s2
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))


def test_resume_continues_bit_exact(corpus):
    env, pop = make_env(corpus)
    env.live(pop.agents, 2, seed=1, tick=lambda: None)
    saved_bank, saved_env = bank_tensors(pop), env.state_tensors()
    env.reset_slots([3])  # evolution replaced agent 3 between the cycles
    saved_reset = env.state_tensors()
    env.live(pop.agents, 2, seed=2, tick=lambda: None)
    uninterrupted = bank_tensors(pop)

    fresh, pop2 = make_env(corpus)
    with torch.no_grad():
        for p, saved in zip(pop2.bank.parameters(), saved_bank):
            p.copy_(saved)
    fresh.load_state_tensors(saved_env)
    fresh.reset_slots([3])
    assert all(torch.equal(saved_reset[k], v) for k, v in fresh.state_tensors().items())
    fresh.live(pop2.agents, 2, seed=2, tick=lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, bank_tensors(pop2)))
    assert saved_reset["adam.steps"][3] == 0 and saved_reset["baseline.writer_weight"][3] == 0
    assert (saved_reset["baseline.reader_weight"][6:8] == 0).all() and (saved_env["baseline.reader_weight"] > 0).any()


def test_writers_decode_in_one_batched_call_per_tick(corpus, monkeypatch):
    env, pop = make_env(corpus)
    calls = []
    real = generation.generate_batch

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr("h2q.evolve.social_env.generate_batch", counting)
    env.live(pop.agents, 4, seed=3, tick=lambda: None)
    assert calls == [3, 3, 3, 3], "6 agents posting every 2nd tick: one decode of 3 writers per tick"


def test_drafts_decode_with_the_writers_and_the_first_is_published(corpus, monkeypatch):
    env, pop = make_env(corpus, cfg=dataclasses.replace(TINY, drafts=3, own_weight=1.0))
    calls, published = [], []
    real = generation.generate_batch

    def recording(model, prompts, *args, **kwargs):
        out = real(model, prompts, *args, **kwargs)
        calls.append(len(prompts))
        if len(prompts) == 9:
            assert all(prompts[i] == prompts[i - i % 3] for i in range(9)), "a writer's drafts share its prompt"
            published.append([bytes(out[i]) for i in range(0, 9, 3)])
        return out

    monkeypatch.setattr("h2q.evolve.social_env.generate_batch", recording)
    real_tick = env._tick
    ticks = []
    monkeypatch.setattr(env, "_tick", lambda *a, **k: ticks.append(real_tick(*a, **k)) or ticks[-1])
    env.live(pop.agents, 2, seed=3, tick=lambda: None)
    assert calls == [9, 9], "3 writers x 3 drafts in one decode per tick of life"
    assert [t.texts for t in ticks] == published, "readers see each writer's first draft"
    calls.clear()
    env.evaluate(pop.agents, seed=4, tick=lambda: None)
    assert calls == [3] * TINY.eval_ticks, "evaluation publishes plain samples, one per writer"


def test_a_published_post_is_judged_among_the_published_ones(corpus, monkeypatch):
    """Drafts that copy each other cost their rewards, not the published post's quality for readers."""
    env, pop = make_env(corpus, cfg=dataclasses.replace(TINY, drafts=2))
    texts = corpus.snippets(0, True, 3, TINY.post_bytes, np.random.default_rng(1))
    monkeypatch.setattr("h2q.evolve.social_env.generate_batch",
                        lambda model, prompts, *a, **k: [list(texts[i // 2]) for i in range(len(prompts))])
    ticks = []
    real_tick = env._tick
    monkeypatch.setattr(env, "_tick", lambda *a, **k: ticks.append(real_tick(*a, **k)) or ticks[-1])
    env.live(pop.agents, 1, seed=3, tick=lambda: None)
    first = ticks[0]  # nothing recent yet: its posts are judged among themselves, as without drafts
    alone = env.signal.score(first.texts, first.bpb).per_topic[np.arange(len(first.authors)), env.topics[first.authors]]
    assert alone.max() > 0 and np.array_equal(first.quality, alone)


def test_group_advantages_are_relative_to_the_writers_own_drafts(corpus):
    env, _ = make_env(corpus)
    groups = np.array([0, 0, 0, 4, 4, 4])
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    adv = env._advantages(1, groups, rewards, within_tick=True)
    assert np.allclose([adv[:3].sum(), adv[3:].sum()], 0.0)
    assert adv[0] < adv[1] < adv[2] and adv[3] == adv[4] < adv[5]


def test_batched_decode_of_many_adapters_equals_one_by_one():
    model = tiny_model(torch.float64)  # float64: batch and single rows round alike, argmax ties cannot flip
    pop = population(model, 4)
    with torch.no_grad():
        for B in pop.bank.lora_B:
            B.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        for p in pop.bank.parameters():
            p.data = p.data.double()
    prompts = [b"def f(x):", b"The ", b"# note", b"import os"]
    slots = [2, 0, 3, 1]
    batched = generation.generate_batch(model, prompts, 12, temperature=0, adapters=pop.bank.bind(torch.tensor(slots)))
    alone = [generation.generate(model, p, 12, temperature=0, adapters=pop.bank.bind(torch.tensor([s])))
             for p, s in zip(prompts, slots)]
    assert batched == alone
    assert len({tuple(o) for o in alone}) > 1, "the adapters differ, so do their posts"


# -- through the evolve runner -----------------------------------------------------------------------------
def social_run(out, cycles, resume=False, steps=2, agents=4):
    return EvolveConfig(base="random", preset="tiny", out=str(out), cycles=cycles, agents=agents, steps=steps,
                        env="social", lora_rank=2, device="cpu", threads=1, progress=False, resume=resume)


@pytest.fixture
def small_corpus(corpus, monkeypatch):
    """The runner's env loads the corpus itself: hand it the module's small one."""
    monkeypatch.setattr(Q, "load_topic_corpus", lambda *a, **k: corpus)
    return corpus


def test_runner_resume_equals_an_uninterrupted_run_and_the_report_shows_the_network(small_corpus, tmp_path):
    """evolve --env social: 2 cycles straight == stop after cycle 1, then --resume (the same seed gives
    the same run); the records carry the social figures and cycle_NNN/network.json the graph and posts."""
    straight = evolve(social_run(tmp_path / "a", 2), BreedConfig(), TextConfig(), social=TINY)
    assert straight["cycles"] == 2

    def stop(cycle, record):
        raise KeyboardInterrupt

    summary = evolve(social_run(tmp_path / "b", 2), BreedConfig(), TextConfig(), on_cycle=stop, social=TINY)
    assert summary["interrupted"] and summary["cycles"] == 1
    with pytest.raises(H2QError, match="settings differ"):
        evolve(social_run(tmp_path / "b", 2, resume=True), BreedConfig(), TextConfig(),
               social=SocialConfig(**{**TINY.__dict__, "feed_size": 2}))
    evolve(social_run(tmp_path / "b", 2, resume=True), BreedConfig(), TextConfig(), social=TINY)

    def metrics(run):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = tmp_path / "a", tmp_path / "b"
    assert metrics(a) == metrics(b)
    for name in ("population.json", "evolution_stats.json", "cycle_002/network.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    for slot in range(4):
        name = f"cycle_002/agent_{slot:02d}/{checkpoint.ADAPTER_FILE}"
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    record = metrics(a)[-1]
    for key in ("likes_per_post", "post_bpb", "topic_acc", "distinct2", "follow_density", "clustering", "users", "posts",
                "best", "median", "random_reader", "scripted_reader", "base_post_bpb", "base_distinct2"):
        assert key in record, key
    assert record["env"] == "social" and record["users"] == 4
    assert json.loads((a / "config.json").read_text())["social"] == TINY.__dict__
    network = json.loads((a / "cycle_002" / "network.json").read_text())
    assert len(network["users"]) == 4 and len(network["posts"]) == len(network["base_posts"]) == 2
    assert {"slot", "author", "prompt", "text", "quality", "likes", "follows"} <= network["posts"][0].keys()
    pytest.importorskip("matplotlib")
    page = write_report(a).read_text()
    assert "The social network" in page and "social_graph.png" in page and "Sample posts, cycle 1 vs 2" in page
    assert "social_metrics.png" in page and "evolve_world.png" not in page


@pytest.mark.slow
@pytest.mark.parametrize("breed", [BreedConfig(strategy="evolution"), BreedConfig(strategy="meta"),
                                   BreedConfig(strategy="gradient", pbt=True),
                                   BreedConfig(strategy="hybrid", adaptive_rank=True, pbt=True)],
                         ids=["evolution", "meta", "gradient-pbt", "hybrid-adaptive-rank-pbt"])
def test_every_strategy_runs_on_the_social_env(small_corpus, tmp_path, breed):
    cfg = SocialConfig(**{**TINY.__dict__, "eval_ticks": 1})
    summary = evolve(social_run(tmp_path / "run", 2, steps=1), breed, TextConfig(), social=cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert summary["cycles"] == 2 and [json.loads(line)["strategy"] for line in lines] == [breed.strategy] * 2


def test_render_draws_the_network_and_leaves_the_grid_view_alone(corpus):
    env, pop = make_env(corpus)
    stream = io.StringIO()
    renderer = Renderer(stream=stream, ansi=True, color=False)
    env.render = renderer
    renderer.phase(cycle=1, cycles=3, phase="live")
    env.live(pop.agents, 2, seed=1, tick=lambda: None)
    renderer.phase(cycle=1, cycles=3, phase="eval", episodes=1)
    env.evaluate(pop.agents, seed=2, tick=lambda: None)
    renderer.close()
    page = stream.getvalue()
    assert "h2q social | cycle 1/3 | living (online learning on) | tick 2/2" in page
    assert "h2q social | cycle 1/3 | evaluating episode 1 of 1 (learning off)" in page
    assert page.startswith(ENTER) and page.endswith(LEAVE) and "\x1b[2J" not in page, "drawn in place, never cleared"
    for agent in pop.agents:
        assert f"  {agent.id} [" in page
    assert "latest posts (3 this tick" in page and "follows (user [topic]" in page
    net = Network(["u0", "u1", "u2"], np.array([0, 1, 0]), steps=4)
    net.follows[0, 1] = net.follows[2, 1] = True
    lines = network_text(net).splitlines()
    assert lines[0] == "h2q social | tick 0/4" and "3 users, 0 posts, 2 follows (density 0.333" in lines[1]
    assert lines[3] == "  u0 [    code] <- 0 -> u1" and lines[4] == "  u1 [    docs] <- 2 -> -"
