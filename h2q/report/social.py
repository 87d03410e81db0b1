"""The social env's part of an evolve report (`--env social`, `_social_sections`), drawn instead of
the world: engagement, fluency, topic accuracy, diversity, the network's density and clustering and
the readers against their baselines per cycle; the follow graph of the first and the newest cycle
(cycle_NNN/network.json); and sample posts of both cycles beside the base model's, on the same
held-out prompts.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from h2q.errors import FileFormatError
from h2q.evolve.records import read_json
from h2q.report.common import (
    _cell,
    _figure,
    _figure_html,
    _first_and_newest,
    _headline,
    _integer_axis,
    _note,
    _save,
    _series,
)

NETWORK_FILE = "network.json"
SOCIAL_PANELS = (  # (title, y label, [(metrics key, label, style, colour)]): a dashed base line has its series' colour
    ("engagement", "per post", [("likes_per_post", "likes", "-", "C0"), ("follows_per_post", "new followers", "-", "C1"),
                                ("base_likes_per_post", "base model's likes", "--", "C0")]),
    ("fluency of the posts", "bits/byte under the base (lower = more fluent)",
     [("post_bpb", "agents", "-", "C0"), ("base_post_bpb", "base model", "--", "C0")]),
    ("on topic and diverse", "share", [("topic_acc", "topic accuracy", "-", "C0"), ("base_topic_acc", "base: topic", "--", "C0"),
                                       ("distinct2", "distinct-2", "-", "C1"), ("base_distinct2", "base: distinct-2", "--", "C1")]),
    ("the follow graph", "", [("follow_density", "density", "-", "C0"), ("clustering", "clustering", "-", "C1")]),
    ("readers: reward per choice", "agreement with the quality signal",
     [("reader", "agents", "-", "C0"), ("random_reader", "random readers", ":", "C1"),
      ("scripted_reader", "scripted (upper bound)", "--", "C2"), ("base_reader", "base model", "--", "C0")]),
    ("writers: quality of their posts", "quality for a reader of its topic",
     [("best_writer_score", "best agent", "-", "C0"), ("median_writer_score", "median agent", "-", "C1"),
      ("base_writer", "base model", "--", "C1")]),
)


def _plot_social(rows: list[dict], path: Path) -> Path:
    fig, axes = _figure(2, 3, 15, 7.5)
    for ax, (title, ylabel, series) in zip(axes.flat, SOCIAL_PANELS):
        for key, label, style, colour in series:
            xs, ys = _series(rows, "cycle", key)
            if ys:
                ax.plot(xs, ys, style, color=colour, marker="o" if style == "-" else None, markersize=3, label=label)
        if title == "on topic and diverse":
            ax.axhline(0.8, color="k", linestyle=":", linewidth=1, label="target: 80 % on topic")
        ax.set(xlabel="cycle", ylabel=ylabel, title=title)
        _integer_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def _read_network(path: Path) -> dict:
    network = read_json(path)
    try:
        users, topics = list(network["users"]), list(network["topics"])
        follows = np.asarray(network["follows"], dtype=np.int64).reshape(-1, 2)
        posts = list(network["posts"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path} is not a network picture ({type(e).__name__}: {e}); re-run the cycle or "
                              f"delete the file") from None
    if len(users) != len(topics) or (follows.size and not ((follows >= 0) & (follows < len(users))).all()):
        raise FileFormatError(f"{path} is not a network picture: users, topics and follows disagree; re-run the "
                              f"cycle or delete the file")
    return {"users": users, "topics": topics, "follows": follows, "posts": posts,
            "base_posts": list(network.get("base_posts", []))}


def _plot_follow_graphs(networks: list[tuple[int, dict]], path: Path) -> Path:
    """Each cycle's follow graph after its held-out episode: users on a circle grouped by topic (colour),
    an arrow from follower to followed, a user's size by its followers."""
    from matplotlib.patches import FancyArrowPatch
    fig, axes = _figure(1, len(networks), 6.5 * len(networks), 6.5)
    for ax, (cycle, net) in zip(axes[0], networks):
        n = len(net["users"])
        names = sorted(set(net["topics"]))
        order = sorted(range(n), key=lambda i: (net["topics"][i], i))
        angle = {i: 2 * np.pi * k / max(n, 1) for k, i in enumerate(order)}
        xy = {i: (np.cos(a), np.sin(a)) for i, a in angle.items()}
        followers = np.bincount(net["follows"][:, 1], minlength=n) if len(net["follows"]) else np.zeros(n, int)
        for a, b in net["follows"]:
            ax.add_patch(FancyArrowPatch(xy[a], xy[b], arrowstyle="-|>", mutation_scale=9, color="0.45", alpha=0.6,
                                         shrinkA=7, shrinkB=7, linewidth=0.8))
        colours = {t: f"C{k}" for k, t in enumerate(names)}
        for t in names:
            members = [i for i in range(n) if net["topics"][i] == t]
            ax.scatter([xy[i][0] for i in members], [xy[i][1] for i in members], s=[60 + 40 * followers[i] for i in members],
                       color=colours[t], edgecolor="k", zorder=3, label=t)
        for i in range(n):
            ax.annotate(net["users"][i], xy[i], xytext=(1.13 * xy[i][0], 1.13 * xy[i][1]), ha="center", va="center",
                        fontsize=7)
        density = len(net["follows"]) / (n * (n - 1)) if n > 1 else 0.0
        ax.set(title=f"cycle {cycle}: {len(net['follows'])} follows, density {density:.3f}", xlim=(-1.3, 1.3),
               ylim=(-1.3, 1.3), aspect="equal", xticks=[], yticks=[])
        ax.legend(fontsize="small", loc="lower left", title="interest")
    return _save(fig, path)


def _posts_side_by_side(networks: list[tuple[int, dict]], per_topic: int = 2) -> str:
    """A table of posts on the same held-out prompts: the base model's, then each cycle's."""
    def by_slot(posts: list[dict], users: list[str]) -> dict:
        return {p["slot"] if "slot" in p else users.index(p.get("author")) if p.get("author") in users else None: p
                for p in posts}

    first = networks[0][1]
    by_cycle = [(c, by_slot(net["posts"], net["users"])) for c, net in networks]
    base = by_slot(first["base_posts"], [f"{i:02d}" for i in range(len(first["users"]))])
    slots = [s for t in sorted(set(first["topics"]))
             for s in [i for i in range(len(first["users"])) if first["topics"][i] == t][:per_topic]]

    def cell(post: dict | None) -> str:
        if not post:
            return "<td>(no post)</td>"
        return (f'<td><pre class="sample">{html.escape(post.get("text", ""))}</pre>{html.escape(str(post.get("author")))}: '
                f'quality {_cell(post.get("quality"))}, {post.get("likes", 0)} likes, {post.get("follows", 0)} new '
                f'followers</td>')

    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["slot (interest)", "prompt", "base model, no adapter", *(f"cycle {c}" for c, _ in by_cycle)])
    body = ""
    for s in slots:
        prompt = next((posts[s].get("prompt", "") for _, posts in by_cycle if s in posts), "")
        body += (f"<tr><td>{s} ({html.escape(first['topics'][s])})</td><td><pre class=\"sample\">{html.escape(prompt)}"
                 f"</pre></td>{cell(base.get(s))}" + "".join(cell(posts.get(s)) for _, posts in by_cycle) + "</tr>")
    return (f"<h3>Sample posts, cycle {' vs '.join(str(c) for c, _ in by_cycle)}</h3>"
            + _note("the last tick of each cycle's held-out episode: every cycle continues the same prompts; quality "
                    "is the signal's worth of the post for a reader of its topic (h2q/evolve/quality.py)")
            + f"<table><tr>{head}</tr>{body}</table>")


def _social_sections(rows: list[dict], cycles: dict[int, Path], out_dir: Path) -> list[str]:
    """The social env's part of an evolve report (module docstring)."""
    last = rows[-1]
    cards = [(f"likes per post (cycle {last['cycle']})", f"{last.get('likes_per_post', math.nan):.2f}"),
             ("posts' bits/byte (base model's)", f"{last.get('post_bpb', math.nan):.3f} ({last.get('base_post_bpb', math.nan):.3f})"),
             ("on topic (base model's)", f"{100 * last.get('topic_acc', math.nan):.0f} % "
                                        f"({100 * last.get('base_topic_acc', math.nan):.0f} %)"),
             ("distinct-2 (base model's)", f"{last.get('distinct2', math.nan):.3f} ({last.get('base_distinct2', math.nan):.3f})"),
             ("follow density, clustering", f"{last.get('follow_density', math.nan):.3f}, {last.get('clustering', math.nan):.3f}"),
             ("users, posts (held-out episode)", f"{last.get('users', '?')}, {last.get('posts', '?')}")]
    parts = ["<h3>The social network</h3>", _headline(cards),
             _figure_html(_plot_social(rows, out_dir / "social_metrics.png"),
                          "per cycle, on each cycle's held-out episode: engagement, fluency, topic accuracy and "
                          "diversity, the follow graph, readers and writers against the base model (dashed) and "
                          "the reader baselines")]
    networks, notes = _first_and_newest(cycles, NETWORK_FILE, _read_network)
    if networks:
        parts += [_figure_html(_plot_follow_graphs(networks, out_dir / "social_graph.png"),
                               "who follows whom after the held-out episode (arrow: follower to followed; size: "
                               "followers; colour: interest)"), _posts_side_by_side(networks)]
    return parts + [_note(n) for n in notes] + ([] if networks or notes else [
        _note(f"no cycle_NNN/{NETWORK_FILE} (removed by --keep-cycles?): no follow graph, no sample posts.")])
