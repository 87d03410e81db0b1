"""The social env's grounded quality signal: labelled text from this machine's files, a fixed byte-level
topic classifier trained once on it, and the score in [0, 1] a post is worth to a reader of a topic.

Topics and their text (`load_topic_corpus`), nothing downloaded, documents in sorted name order:
* `code`: the standard library's `.py` sources (tests, idlelib and site-packages left out) without
  their comment lines;
* `docs`: pydoc's help topics (`pydoc_data.topics`), their unindented lines only (the indented ones
  are code examples and grammar rules);
* `comments`: the `#` comment lines of the same sources (shebangs and coding lines left out).
Each document gives one slice of `slice_bytes` from its middle; each topic keeps at most `max_docs`
slices, evenly spaced over its documents; a document whose name hashes below `HELD_OUT` is held out.
Training feeds draw writers' prompts from the training documents, evaluation from the held-out ones.

The classifier (`TopicClassifier`) is multinomial naive Bayes (McCallum & Nigam 1998) over hashed byte
3-, 4- and 5-grams (character n-gram text categorisation, Cavnar & Trenkle 1994), add-alpha
smoothing, uniform prior, trained once on the training documents; `accuracy` reports it on held-out
snippets of post length.

The quality of a post for a reader of topic t (`QualitySignal.score`) is a product of factors in [0, 1]:

    q_t = P(t | post) * fluency * novelty,   novelty = self_novelty * (1 - duplicate)

* fluency: the post's bits per byte under the frozen base, given the writer's prompt, mapped linearly
  from 0 at `noise_bpb` (the base's median bits/byte on real continuations with their bytes shuffled)
  to 1 at `text_bpb` (its 10th percentile on the real continuations: as predictable as the most
  predictable tenth of real text); both calibrated on held-out text at construction.
* self_novelty: the post's distinct byte-4-gram ratio, 0 at half of `distinct_ref` (the 10th
  percentile of real held-out snippets of post length) rising to 1 at `distinct_ref`.
* duplicate: the largest Jaccard resemblance of its byte-4-gram shingles (Broder 1997) with any other
  recent post (this tick's, and the `recent` ones the caller keeps), 0 up to `DUP_LOW`, 1 from `DUP_HIGH`.
* A post shorter than `min_bytes` is worth 0: there is too little of it to judge.

Why repetition cannot farm it: repeating a phrase is exactly what a language model predicts best, so
it lowers bits/byte, and repeating a topical n-gram ("def def def") drives the classifier's
posterior to 1; but a post made of repeats has few distinct 4-grams, and its self_novelty, and so
its quality, falls to 0 once repeats fill half of it. Re-posting one's own or another agent's text,
whole or lightly edited, shares most shingles with it and is zeroed by the duplicate factor. Random
or shuffled bytes, which are novel, cost the base as many bits as noise and get fluency 0; empty
and tiny posts get 0. The only way to a high score is text the frozen base finds natural, the
fixed classifier finds on topic, and that is new.

Readers act on it with one byte each and are scored by how far the signal agrees with their choice
(`reader_rewards`): like earns q - LIKE_BAR, ignore the opposite, LIKE_BAR - q, follow 2 (q - FOLLOW_BAR)
(a follow of an author already followed counts as a like). So ignoring a good post costs as much as
liking a bad one, and "ignore everything" is no safe haven; the best reply is ignore below LIKE_BAR,
like up to 2 FOLLOW_BAR - LIKE_BAR, follow above (`scripted_actions`, the upper-bound reader).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from h2q import tokenizer
from h2q.errors import H2QError

TOPICS = ("code", "docs", "comments")
TOPIC_LETTERS = b"cdm"  # how a reader's row names a topic
HELD_OUT = 0.2  # share of documents (by name hash) held out for evaluation feeds
MIN_TOPIC_BYTES = 8192  # per topic and split, or the topic cannot be learned or judged
NGRAMS, BUCKETS, ALPHA = (3, 4, 5), 1 << 20, 0.05
SHINGLE = 4  # bytes per n-gram of the novelty and duplicate factors
DUP_LOW, DUP_HIGH = 0.3, 0.6  # Jaccard resemblance where the duplicate factor starts and is complete
LIKE_BAR, FOLLOW_BAR = 0.3, 0.5  # below the base's typical on-topic quality, so liking can pay from the start
LIKE, FOLLOW, IGNORE = 0, 1, 2  # reader action indices
ACTION_BYTES = b"lf."  # what a reader's byte means: like, follow, ignore
STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings", "test", "tests",
               "idlelib"}


# -- the labelled corpus -------------------------------------------------------------------------------
@dataclass
class TopicCorpus:
    """Per topic (TOPICS order), its training and held-out documents joined by NUL."""
    train: list[bytes]
    held_out: list[bytes]
    _starts: dict = field(default_factory=dict, repr=False)

    def snippets(self, topic: int, held_out: bool, count: int, length: int, rng: np.random.Generator) -> list[bytes]:
        """`count` windows of `length` bytes starting at line starts, inside one document, at least half
        of them not whitespace, drawn with replacement."""
        text = (self.held_out if held_out else self.train)[topic]
        key = (topic, held_out, length)
        if key not in self._starts:
            self._starts[key] = _window_starts(text, length)
        starts = self._starts[key]
        picks = starts[rng.integers(len(starts), size=count)]
        return [text[s:s + length] for s in picks.tolist()]


def _window_starts(text: bytes, length: int) -> np.ndarray:
    a = np.frombuffer(text, dtype=np.uint8)
    starts = np.concatenate([[0], np.flatnonzero((a == 10) | (a == 0)) + 1])
    starts = starts[starts + length <= len(a)]
    nul = np.concatenate([[0], np.cumsum(a == 0)])
    blank = np.concatenate([[0], np.cumsum(np.isin(a, (9, 10, 13, 32)))])
    ok = (nul[starts + length] == nul[starts]) & (blank[starts + length] - blank[starts] <= length // 2)
    if not ok.any():
        raise H2QError(f"no text window of {length} bytes in a topic's documents; use a shorter post or prompt")
    return starts[ok]


def _slice(data: bytes, size: int) -> bytes:
    """`size` bytes from the middle of a document, from a line start when one is near."""
    data = data.replace(b"\r\n", b"\n").replace(b"\x00", b"")
    if len(data) <= size:
        return data
    mid = len(data) // 2 - size // 2
    newline = data.find(b"\n", mid, mid + 256)
    start = newline + 1 if newline >= 0 else mid
    return data[start:start + size]


def _doc_lines(text: str) -> bytes:
    """pydoc prose: the unindented lines (indented ones are code examples and grammar rules)."""
    lines = text.encode("utf-8", "surrogatepass").split(b"\n")
    return b"\n".join(line for line in lines if line.strip() and not line[:1].isspace() and b"::=" not in line)


def _is_comment(line: bytes) -> bool:
    return line.lstrip().startswith(b"#") and not line.startswith((b"#!", b"# -*-"))


def _stdlib_sources() -> list[tuple[str, bytes]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return [(path.relative_to(stdlib).as_posix(), path.read_bytes()) for path in sorted(found)]


def _topic_documents(topic: str) -> list[tuple[str, bytes]]:
    """(name, text) of every document of a topic, sorted by name."""
    if topic == "docs":
        from pydoc_data.topics import topics
        return [(key, _doc_lines(text)) for key, text in sorted(topics.items())]
    keep_comments = topic == "comments"
    return [(name, b"\n".join(line for line in data.split(b"\n") if _is_comment(line) == keep_comments))
            for name, data in _stdlib_sources()]


def load_topic_corpus(slice_bytes: int = 4096, max_docs: int = 256) -> TopicCorpus:
    """The labelled slices of this machine's files (see the module docstring), deterministic for a machine."""
    train, held_out = [], []
    for topic in TOPICS:
        slices = [(name, _slice(data, slice_bytes)) for name, data in _topic_documents(topic)]
        slices = [(name, s) for name, s in slices if len(s) >= 256]
        if len(slices) > max_docs:
            slices = [slices[i] for i in np.linspace(0, len(slices) - 1, max_docs).round().astype(int)]
        held = [int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32 < HELD_OUT for name, _ in slices]
        if slices and not any(held):
            held[-1] = True
        parts = [b"\x00".join(s for (_, s), h in zip(slices, held) if h == side) for side in (False, True)]
        if min(map(len, parts)) < MIN_TOPIC_BYTES:
            raise H2QError(f"this machine has too little {topic} text for the social env ({len(parts[0])} training, "
                           f"{len(parts[1])} held-out bytes, need {MIN_TOPIC_BYTES} each): it reads the Python "
                           f"installation's sources, pydoc topics and licence files")
        train.append(parts[0])
        held_out.append(parts[1])
    return TopicCorpus(train, held_out)


# -- the topic classifier ------------------------------------------------------------------------------
def ngram_ids(data: bytes) -> np.ndarray:
    """Hashed bucket ids of every byte n-gram (n in NGRAMS) of `data`."""
    a = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    out = []
    for n in NGRAMS:
        if len(a) < n:
            continue
        h = np.zeros(len(a) - n + 1, dtype=np.int64)
        for j in range(n):
            h = h * 257 + a[j:len(a) - n + 1 + j]
        out.append((h * (2 * n + 1) * 2654435761) % BUCKETS)  # Knuth's multiplicative hash, n mixed in
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class TopicClassifier:
    """Naive Bayes over hashed byte n-grams, one class per topic, its posterior temperature-scaled (Guo et
    al. 2017: one temperature, the one of least held-out log loss; naive Bayes alone is near 0/1
    sure, which would give a writer drifting off topic no gradient back); fixed once trained."""

    def __init__(self, corpus: TopicCorpus, length: int, per_topic: int = 200, seed: int = 0):
        counts = np.stack([np.bincount(ngram_ids(t), minlength=BUCKETS) + ALPHA for t in corpus.train])  # (C, BUCKETS)
        self.log_prob = np.log(counts / counts.sum(1, keepdims=True)).astype(np.float32)
        self.temperature = 1.0
        rng = np.random.default_rng(seed)
        snippets = [s for t in range(len(TOPICS)) for s in corpus.snippets(t, True, per_topic, length, rng)]
        self.held_out_labels = np.repeat(np.arange(len(TOPICS)), per_topic)
        scores = self._scores(snippets)
        rows = np.arange(len(snippets))
        self.temperature = min(2.0 ** np.arange(9), key=lambda T: -np.log(_softmax(scores / T)[rows, self.held_out_labels]
                                                                            + 1e-12).mean())
        self.accuracy = float((scores.argmax(1) == self.held_out_labels).mean())  # on held-out snippets

    def _scores(self, posts: list[bytes]) -> np.ndarray:
        """(P, C) log-likelihood of each post's n-grams under each topic."""
        if not posts:
            return np.zeros((0, len(self.log_prob)))
        return np.stack([self.log_prob[:, ngram_ids(p)].sum(1, dtype=np.float64) for p in posts])

    def posterior(self, posts: list[bytes]) -> np.ndarray:
        """(P, C) P(topic | post) under a uniform prior, tempered; uniform for a post with no n-gram."""
        return _softmax(self._scores(posts) / self.temperature)


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# -- text statistics -----------------------------------------------------------------------------------
def shingles(post: bytes) -> set[bytes]:
    return {post[i:i + SHINGLE] for i in range(len(post) - SHINGLE + 1)}


def distinct_ratio(post: bytes) -> float:
    """Distinct byte 4-grams over all 4-grams of one post (0 for a post shorter than one)."""
    total = len(post) - SHINGLE + 1
    return len(shingles(post)) / total if total > 0 else 0.0


def distinct_words(posts: list[bytes], n: int = 2) -> float:
    """distinct-n (Li et al. 2016): distinct word n-grams over all word n-grams of the posts, words split
    at whitespace, n-grams within a post."""
    grams = [tuple(words[i:i + n]) for words in (p.split() for p in posts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def resemblance(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


# -- the base's bits -----------------------------------------------------------------------------------
def continuation_logits(model, prompts: list[bytes], posts: list[list[int]], adapters=None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict each post token after its prompt, in one forward of right-padded rows: ->
    logits (P, L, PAD) over every id but PAD (which h2q.generate never samples), the post tokens (P, L)
    and their mask (P, L), L the longest post. Differentiable in `adapters` (row b bound to its writer)."""
    device = model.embed.weight.device
    L = max((len(p) for p in posts), default=0)
    rows = [list(pr) + list(po) for pr, po in zip(prompts, posts)]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.PAD, dtype=torch.long)
    targets = torch.full((len(rows), L), tokenizer.PAD, dtype=torch.long)
    for b, (row, post) in enumerate(zip(rows, posts)):
        ids[b, :len(row)] = torch.tensor(row)
        targets[b, :len(post)] = torch.tensor(post, dtype=torch.long)
    logits = model(ids.to(device), adapters=adapters).float()  # (P, T, V)
    # post token j of row b is predicted at position len(prompt_b) - 1 + j
    where = (torch.tensor([len(pr) - 1 for pr in prompts])[:, None] + torch.arange(L)).clamp(max=ids.shape[1] - 1)
    logits = logits[torch.arange(len(rows))[:, None].to(device), where.to(device), :tokenizer.PAD]  # (P, L, PAD)
    targets = targets.to(device)
    return logits, targets, targets != tokenizer.PAD


def token_logprobs(logp: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(P, L, V) log-probs, (P, L) tokens and mask -> (P, L) log-prob of each token, 0 where masked."""
    picked = logp.gather(2, targets.clamp(max=logp.shape[-1] - 1)[..., None]).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def byte_bits(token_logp: torch.Tensor, posts: list[bytes]) -> np.ndarray:
    """Bits per byte of each post from its tokens' log-probs under the base (a stop token after the bytes
    is left out; inf for an empty post)."""
    nats = np.array([-float(token_logp[b, :len(p)].sum()) for b, p in enumerate(posts)])
    count = np.array([len(p) for p in posts])
    return np.where(count > 0, nats / np.maximum(count, 1) / np.log(2), np.inf)


@torch.no_grad()
def bits_per_byte(model, prompts: list[bytes], posts: list[bytes]) -> np.ndarray:
    """Bits per byte of each post after its prompt under the frozen base (inf for an empty post)."""
    if not posts:
        return np.zeros(0)
    logits, targets, mask = continuation_logits(model, prompts, [list(p) for p in posts])
    return byte_bits(token_logprobs(F.log_softmax(logits, -1), targets, mask), posts)


# -- the signal ----------------------------------------------------------------------------------------
@dataclass
class Quality:
    """Per post: quality for a reader of each topic (P, C) and its factors."""
    per_topic: np.ndarray
    topic: np.ndarray  # (P, C) classifier posterior
    fluency: np.ndarray
    novelty: np.ndarray
    bpb: np.ndarray


class QualitySignal:
    """The fixed classifier and the calibrated levels that turn a post into its quality."""

    def __init__(self, classifier: TopicClassifier, text_bpb: float, noise_bpb: float, distinct_ref: float,
                 min_bytes: int):
        self.classifier, self.min_bytes = classifier, min_bytes
        self.text_bpb, self.noise_bpb = text_bpb, max(noise_bpb, text_bpb + 0.25)  # a usable scale, even untrained
        self.distinct_ref = distinct_ref

    @classmethod
    def calibrate(cls, model, corpus: TopicCorpus, prompt_bytes: int, post_bytes: int, samples: int = 32,
                  seed: int = 0) -> QualitySignal:
        """Train the classifier and measure the base on `samples` held-out continuations per topic."""
        rng = np.random.default_rng(seed)
        windows = [w for t in range(len(TOPICS)) for w in corpus.snippets(t, True, samples, prompt_bytes + post_bytes, rng)]
        prompts, real = [w[:prompt_bytes] for w in windows], [w[prompt_bytes:] for w in windows]
        shuffled = [bytes(rng.permutation(np.frombuffer(p, dtype=np.uint8))) for p in real]
        text_bpb = float(np.percentile(bits_per_byte(model, prompts, real), 10))
        noise_bpb = float(np.median(bits_per_byte(model, prompts, shuffled)))
        ref = float(np.percentile([distinct_ratio(p) for p in real], 10))
        return cls(TopicClassifier(corpus, post_bytes, seed=seed), text_bpb, noise_bpb, ref, max(SHINGLE, post_bytes // 4))

    def score(self, posts: list[bytes], bpb: np.ndarray, recent: list[bytes] = ()) -> Quality:
        """Quality of this tick's posts, their bits/byte under the base given; `recent`: earlier posts
        a duplicate is checked against too."""
        topic = self.classifier.posterior(posts)
        fluency = np.clip((self.noise_bpb - bpb) / (self.noise_bpb - self.text_bpb), 0.0, 1.0)
        ratio = np.array([distinct_ratio(p) for p in posts])
        self_novelty = np.clip(2 * ratio / self.distinct_ref - 1, 0.0, 1.0)
        sets = [shingles(p) for p in posts]
        others = sets + [shingles(p) for p in recent]
        dup = np.array([max((resemblance(s, o) for j, o in enumerate(others) if j != i), default=0.0)
                        for i, s in enumerate(sets)])
        duplicate = np.clip((dup - DUP_LOW) / (DUP_HIGH - DUP_LOW), 0.0, 1.0)
        long_enough = np.array([len(p) >= self.min_bytes for p in posts], dtype=float)
        novelty = self_novelty * (1 - duplicate) * long_enough
        per_topic = topic * (fluency * novelty)[:, None]
        return Quality(per_topic.reshape(len(posts), -1), topic, fluency, novelty, bpb)


def reader_rewards(q: np.ndarray, following: np.ndarray) -> np.ndarray:
    """(rows,) quality for the reader and whether it already follows the author -> (rows, 3) reward of
    like, follow, ignore: a choice is scored by how far the signal agrees with it."""
    like = q - LIKE_BAR
    follow = np.where(following, like, 2 * (q - FOLLOW_BAR))
    return np.stack([like, follow, -like], axis=1)


def scripted_actions(rewards: np.ndarray) -> np.ndarray:
    """The upper-bound reader: per row of `reader_rewards`, the best-paid action."""
    return rewards.argmax(1)
