"""The terminal view of the grid world and of the social network (`evolve.py --render`,
`scripts/bench_agents.py --render`): one frame per tick, redrawn in place the way top and htop redraw,
so watching a run leaves the terminal's scrollback as it was.

A frame (`frame_lines`, or `render_text` as plain text) is:

* a header: the cycle, the phase (living with online learning, or evaluating episode k of K with
  learning off) and the tick, then food delivered and agents alive;
* the map, two characters per cell so a square map looks square: `##` wall, ` *` food, `HH` home,
  ` .` open ground, `07` the agent in slot 7 (highlighted when carrying food), beside a legend;
* what one agent sees: its observation bytes and, on the view level, its window drawn like the map;
* one status entry per agent: slot, energy (0-99, it dies at 0), `+` when carrying food, `x` when dead.

`Renderer` draws on a terminal in the alternate screen (`ESC[?1049h` on the first frame, `ESC[?1049l`
on `close()`, which `with`, an exception through `with`, and interpreter exit all reach), each frame
from the cursor's home with every line erased to its end and the rest of the screen erased below:
never a full clear, so nothing scrolls and nothing flickers. On a stream that is not a terminal (a log
file) it writes the frames as plain text. Lines given to `log()` (the runner's per-cycle summaries)
show under the frame and are written to the normal screen on `close()`, so they are not lost with the
alternate screen.

The world is anything with the World attributes (walls, food, home, pos, alive, energy, carrying, t,
n, cfg, observe()), or an env holding one in `.world`: this module imports nothing of the world.

A social network (`--env social`, h2q/evolve/social_env.py's Network: names, topic_names, topics,
follows, latest, tick, steps, posts, density(), clustering()) is drawn by `network_lines`: a header
like the grid's, the graph's figures, one line per user with its topic and whom it follows (`<-` how
many follow it), and the latest posts with their quality, likes and new followers. `Renderer` tells
the two apart by the network's `follows` matrix.
"""
from __future__ import annotations

import atexit
import shutil
import sys
import time
from typing import Self

import numpy as np

ENTER, LEAVE = "\x1b[?1049h\x1b[?25l\x1b[?7l", "\x1b[?7h\x1b[?25h\x1b[?1049l"  # alt screen, cursor, autowrap
HOME, ERASE_LINE, ERASE_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
RESET = "\x1b[0m"
WALL, FOOD, HOME_CELL, OPEN = "##", " *", "HH", " ."
AGENT_GLYPHS = "0123456789abcdefghijklmnopqrstuvwxyz"  # slot 0..35; '@' beyond
STYLE = {WALL: "\x1b[2m", FOOD: "\x1b[32;1m", HOME_CELL: "\x1b[33;1m", "agent": "\x1b[36;1m",
         "carrying": "\x1b[30;45;1m"}
WINDOW_CELLS = {"#": WALL, "f": FOOD, "h": HOME_CELL, ".": OPEN, "a": " a", "@": "@@", "~": "  "}
PHASES = {"live": "living (online learning on)", "eval": "evaluating (learning off)"}
LOG_LINES = 3  # logged lines shown under a frame
STATUS_PER_LINE = 10  # entries of 7 characters


def _unwrap(world):
    return getattr(world, "world", world)


def glyph(slot: int) -> str:
    return AGENT_GLYPHS[slot] if slot < len(AGENT_GLYPHS) else "@"


def _paint(cell: str, style: str | None, color: bool) -> str:
    return f"{style}{cell}{RESET}" if color and style else cell


def header(world, cycle: int | None = None, cycles: int | None = None, phase: str | None = None,
           episode: int | None = None, episodes: int | None = None) -> str:
    """`cycle 3/10 | evaluating episode 1 of 2 (learning off) | t=37/200`, the parts that are known."""
    parts = ["h2q world"]
    if cycle is not None:
        parts.append(f"cycle {cycle}/{cycles}" if cycles else f"cycle {cycle}")
    if phase == "eval" and episode is not None:
        parts.append(f"evaluating episode {episode}" + (f" of {episodes}" if episodes else "") + " (learning off)")
    elif phase is not None:
        parts.append(PHASES.get(phase, phase))
    if world is not None:
        steps = getattr(world.cfg, "steps", None)
        parts.append(f"t={world.t}/{steps}" if steps else f"t={world.t}")
    return " | ".join(parts)


def _map_rows(world, color: bool) -> list[str]:
    """The map, two characters per cell, row y = north to south."""
    cells = np.where(world.walls, WALL, OPEN).astype(object)  # [y, x]
    cells[world.food] = FOOD
    cells[world.home[1], world.home[0]] = HOME_CELL
    styles = np.full(cells.shape, None, dtype=object)
    for cell in (WALL, FOOD, HOME_CELL):
        styles[cells == cell] = STYLE[cell]
    for i in np.flatnonzero(world.alive)[::-1]:  # the lowest slot on a shared cell is drawn last, on top
        x, y = world.pos[i]
        cells[y, x] = ("+" if world.carrying[i] else " ") + glyph(i)
        styles[y, x] = STYLE["carrying" if world.carrying[i] else "agent"]
    return ["".join(_paint(c, s, color) for c, s in zip(row, srow)) for row, srow in zip(cells, styles)]


def _legend(world, follow: int | None, color: bool) -> list[str]:
    lines = [(f"{_paint(WALL, STYLE[WALL], color)} wall    {_paint(FOOD, STYLE[FOOD], color)} food    "
              f"{_paint(HOME_CELL, STYLE[HOME_CELL], color)} home"),
             f"{_paint(' 7', STYLE['agent'], color)} agent in slot 7"
             + (f" (a = 10 .. {glyph(world.n - 1)} = {world.n - 1})" if world.n > 10 else ""),
             f"{_paint('+7', STYLE['carrying'], color)} agent 7 carrying food home",
             "7: 92 agent 7's energy (dies at 0)", "7:  x agent 7 is dead", ""]
    if follow is None:
        return lines
    obs = bytes(world.observe()[follow]).decode("ascii", "replace")
    lines += [f"agent {glyph(follow)} sees: {obs}"]
    cfg = world.cfg
    if getattr(cfg, "level", None) == "view":
        side = cfg.window
        window = obs[3:3 + side * side]
        lines += [f"its {side}x{side} window (@@ itself, a others):"]
        lines += ["  " + "".join(WINDOW_CELLS.get(ch, ch * 2) for ch in window[r * side:(r + 1) * side])
                  for r in range(side)]
    return lines


def _status(world) -> list[str]:
    entries = [f"{glyph(i)}:" + (f"{int(np.ceil(world.energy[i])):3d}{'+' if world.carrying[i] else ' '}"
                                 if world.alive[i] else "  x ") for i in range(world.n)]
    return [" ".join(entries[k:k + STATUS_PER_LINE]) for k in range(0, len(entries), STATUS_PER_LINE)]


def frame_lines(world, title: str | None = None, follow: int | None = None, color: bool = False,
                log: list[str] = ()) -> list[str]:
    """One frame as lines (see the module docstring); `follow` = the slot whose view is shown (None:
    the lowest living slot), `log` = lines shown under the frame."""
    world = _unwrap(world)
    if follow is None:
        living = np.flatnonzero(world.alive)
        follow = int(living[0]) if len(living) else None
    width = 2 * world.walls.shape[1]
    rows, side = _map_rows(world, color), _legend(world, follow, color)
    body = [(rows[k] if k < len(rows) else " " * width) + ("   " + side[k] if k < len(side) else "")
            for k in range(max(len(rows), len(side)))]
    lines = [title or header(world),
             (f"delivered {int(world.delivered.sum())}  alive {int(world.alive.sum())}/{world.n}  "
              f"food on the map {int(world.food.sum())}"),
             *body, *_status(world), *log]
    return [line.rstrip() for line in lines]


def render_text(world, title: str | None = None, follow: int | None = None) -> str:
    """One frame as plain text (no escape codes)."""
    return "\n".join(frame_lines(world, title, follow))


# -- the social network ---------------------------------------------------------------------------------
TOPIC_STYLES = ("\x1b[36;1m", "\x1b[33;1m", "\x1b[35;1m", "\x1b[32;1m")  # topic k: its colour
POST_CHARS = 72  # of a post's text per line


def is_network(world) -> bool:
    return hasattr(world, "follows")


def network_header(net, cycle: int | None = None, cycles: int | None = None, phase: str | None = None,
                   episode: int | None = None, episodes: int | None = None) -> str:
    """`h2q social | cycle 3/10 | living (online learning on) | tick 4/8`."""
    title = header(None, cycle, cycles, phase, episode, episodes).replace("h2q world", "h2q social", 1)
    steps = getattr(net, "steps", None)
    return f"{title} | tick {net.tick}/{steps}" if steps else f"{title} | tick {net.tick}"


def network_lines(net, title: str | None = None, color: bool = False, max_posts: int = 8,
                  log: list[str] = ()) -> list[str]:
    """One frame of the social network as lines (module docstring)."""
    def name(i: int) -> str:
        style = TOPIC_STYLES[int(net.topics[i]) % len(TOPIC_STYLES)]
        return _paint(net.names[i], style, color)

    followers = net.follows.sum(0)
    lines = [title or network_header(net),
             (f"{len(net.names)} users, {net.posts} posts, {int(net.follows.sum())} follows (density "
              f"{net.density():.3f}, clustering {net.clustering():.3f})"),
             "follows (user [topic] <- its followers -> whom it follows):"]
    width = max(len(t) for t in net.topic_names)
    for i in range(len(net.names)):
        followed = " ".join(name(j) for j in np.flatnonzero(net.follows[i]))
        lines.append(f"  {name(i)} [{net.topic_names[net.topics[i]]:>{width}}] <-{int(followers[i]):2d} -> "
                     f"{followed or '-'}")
    lines.append(f"latest posts ({len(net.latest)} this tick; q = quality for a reader of its topic):")
    for post in net.latest[:max_posts]:
        text = post.text.decode("utf-8", "replace").replace("\n", "\u23ce").replace("\x1b", "?")
        text = "".join(c if c.isprintable() else "?" for c in text)[:POST_CHARS]
        lines.append(f"  {name(post.author)} #{net.topic_names[post.topic]} q {post.quality:.2f} "
                     f"likes {post.likes} +{post.follows}: {text}")
    return [line.rstrip() for line in [*lines, *log]]


def network_text(net, title: str | None = None) -> str:
    """One frame of the network as plain text (no escape codes)."""
    return "\n".join(network_lines(net, title))


class Renderer:
    """Redraws the world after each tick (see the module docstring). The runner calls `phase(...)`
    when a phase starts, `renderer(world)` after each tick, `log(line)` for a line to keep, and
    `close()` at the end (or uses `with`).

    While living, frames are paced to at most `fps` a second (the run waits, so it can be watched);
    while evaluating, frames beyond `fps` are skipped instead, so evaluation is never slowed. In the
    eval phase without an explicit `episode`, each new world object counts as the next episode.
    `ansi` (default: whether the stream is a terminal) chooses in-place drawing; `color` (default:
    ansi) colours the cells."""

    def __init__(self, fps: float = 8.0, stream=None, ansi: bool | None = None, color: bool | None = None,
                 follow: int | None = None):
        self.interval = 1.0 / fps if fps > 0 else 0.0
        self.stream = stream or sys.stdout
        self.ansi = self.stream.isatty() if ansi is None else ansi
        self.color = self.ansi if color is None else color
        self.follow = follow
        self.lines: list[str] = []
        self._phase: dict = {}
        self._count_episodes = False
        self._world = None
        self._last = -np.inf
        self._active = False

    def phase(self, cycle: int | None = None, cycles: int | None = None, phase: str = "live",
              episode: int | None = None, episodes: int | None = None) -> None:
        """A phase begins: `phase` is "live" or "eval" (episode k of `episodes`, from 1). The header
        changes at once, before the phase's first tick."""
        self._count_episodes = phase == "eval" and episode is None
        self._phase = {"cycle": cycle, "cycles": cycles, "phase": phase,
                       "episode": 1 if self._count_episodes else episode, "episodes": episodes}
        self._world, self._last = None, -np.inf  # the phase's first frame is drawn at once
        if self._active:
            self._write(HOME + header(None, **self._phase) + ERASE_LINE)

    def log(self, line: str) -> None:
        """A line to keep: shown under the frames, and on the normal screen after `close()`."""
        self.lines.append(line)
        if not self.ansi:
            self._write(line + "\n")

    def __call__(self, world) -> None:
        world = _unwrap(world)
        if world is not self._world:
            if self._count_episodes and self._world is not None:  # the phase's first world is episode 1
                self._phase["episode"] += 1
            self._world = world
        now = time.perf_counter()
        if now - self._last < self.interval:
            if self._phase.get("phase") == "eval":
                return  # skip the frame: evaluation is not slowed down to be watched
            time.sleep(self.interval - (now - self._last))
        log = self.lines[-LOG_LINES:] if self.ansi else ()
        if is_network(world):
            lines = network_lines(world, network_header(world, **self._phase), self.color, log=log)
        else:
            lines = frame_lines(world, header(world, **self._phase), self.follow, self.color, log)
        if not self.ansi:
            self._write("\n".join(lines) + "\n\n")
        else:
            if not self._active:
                self._active = True
                atexit.register(self.close)
                self._write(ENTER)
            if self.stream.isatty():  # a frame taller than the terminal would scroll: cut it
                lines = lines[:shutil.get_terminal_size().lines]
            self._write(HOME + "".join(line + ERASE_LINE + "\n" for line in lines[:-1]) + lines[-1]
                        + ERASE_LINE + ERASE_BELOW)
        self._last = time.perf_counter()

    def close(self) -> None:
        """Leave the alternate screen (if entered) and write the logged lines there; idempotent."""
        if self._active:
            self._active = False
            atexit.unregister(self.close)
            self._write(LEAVE + "".join(line + "\n" for line in self.lines))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
