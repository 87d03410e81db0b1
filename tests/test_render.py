"""The terminal view (h2q/evolve/render.py): frames drawn in the alternate screen from the cursor's home
with lines erased to their end (never a full clear), the screen restored on close, on an exception and
with logged lines kept; a legend, a header with cycle, phase and tick; two characters per cell."""
import io

import numpy as np
import pytest

from h2q.evolve import render
from h2q.evolve.render import ENTER, ERASE_LINE, HOME, LEAVE, Renderer, frame_lines, render_text
from h2q.evolve.world import World, WorldConfig

CFG = WorldConfig(size=9, n_food=6, steps=20, seed=2)


def stepped_world(n=12, ticks=3, cfg=CFG, seed=1) -> World:
    w = World(cfg, n, seed=seed)
    rng = np.random.default_rng(0)
    for _ in range(ticks):
        w.step(rng.integers(0, 8, size=n))
    return w


def test_frame_has_header_legend_and_square_cells():
    w = stepped_world()
    w.carrying[3], w.energy[5], w.alive[7] = True, 41.2, False
    lines = render_text(w, render.header(w, cycle=2, cycles=5, phase="live")).splitlines()
    assert lines[0] == "h2q world | cycle 2/5 | living (online learning on) | t=3/20"
    map_rows = lines[2:2 + CFG.size]
    assert map_rows[0][:2 * CFG.size] == "##" * CFG.size and map_rows[-1][:2 * CFG.size] == "##" * CFG.size
    hx, hy = w.home
    assert map_rows[hy][2 * hx:2 * hx + 2] in ("HH", *(f"{c}{render.glyph(i)}" for i in range(12) for c in " +"))
    x, y = w.pos[3]
    assert map_rows[y][2 * x:2 * x + 2] == "+3" or (w.pos[:3] == w.pos[3]).all(axis=1).any()
    page = "\n".join(lines)
    for words in ("## wall", "* food", "HH home", "agent in slot 7 (a = 10 .. b = 11)", "+7 agent 7 carrying food",
                  "energy (dies at 0)", "is dead", "agent 0 sees: "):
        assert words in page
    status = " ".join(lines[-2:])  # 12 agents, 10 per line
    assert "3: 97+" in status or "3:" in status and "+" in status.split("3:")[1][:5]
    assert "5: 42" in status and "7:  x" in status and "b:" in status


def test_view_level_draws_the_followed_agents_window():
    cfg = WorldConfig(size=9, n_food=6, steps=20, seed=2, level="view")
    w = stepped_world(cfg=cfg)
    lines = frame_lines(w, follow=4)
    obs = bytes(w.observe()[4]).decode()
    assert f"agent 4 sees: {obs}" in "\n".join(lines)
    start = next(k for k, line in enumerate(lines) if "5x5 window" in line) + 1
    window = [line.split("   ")[-1].strip() for line in lines[start:start + 5]]
    assert "@@" in window[2]  # the agent at the centre
    expected = ["".join(render.WINDOW_CELLS[c] for c in obs[3 + 5 * r:8 + 5 * r]).strip() for r in range(5)]
    assert window == expected


def run_renderer(renderer: Renderer, n_eval_episodes=2) -> None:
    """What the runner does: a live phase of 3 ticks, then evaluation episodes of 2 ticks each on an env
    whose world is rebuilt per episode (no explicit episode number: the renderer counts them)."""
    renderer.phase(cycle=2, cycles=5, phase="live")
    w = World(CFG, 4, seed=1)
    for _ in range(3):
        w.step(np.zeros(4, dtype=np.int64))
        renderer(w)
    renderer.phase(cycle=2, cycles=5, phase="eval", episodes=n_eval_episodes)
    env = CFG.make_env(4)
    for episode in range(n_eval_episodes):
        env.reset(10 + episode)
        for _ in range(2):
            env.step(np.full(4, 7))
            renderer(env)


def test_renderer_redraws_in_the_alternate_screen():
    out = io.StringIO()
    renderer = Renderer(fps=0, stream=out, ansi=True, color=True)
    run_renderer(renderer)
    renderer.close()
    text = out.getvalue()
    assert text.startswith(ENTER) and text.endswith(LEAVE)
    assert "\x1b[2J" not in text and "\x1b[3J" not in text  # never a full clear
    frames = text[len(ENTER):-len(LEAVE)].split(HOME)[1:]
    assert len(frames) == 3 + 1 + 4  # live ticks, the eval phase's header, eval ticks
    assert "\n" not in frames[3] and "evaluating (learning off)" not in frames[3]
    assert "evaluating episode 0" not in text
    for frame in frames[:3] + frames[4:]:
        rows = frame.split("\n")
        assert all(row.endswith(ERASE_LINE) for row in rows[:-1]) and rows[-1].endswith(ERASE_LINE + "\x1b[J")
    assert "cycle 2/5 | living (online learning on) | t=3/20" in frames[2]
    assert "cycle 2/5 | evaluating episode 1 of 2 (learning off) | t=2/20" in frames[5]
    assert "cycle 2/5 | evaluating episode 2 of 2 (learning off) | t=1/20" in frames[6]
    assert "\x1b[32;1m *\x1b[0m" in text  # food in colour
    renderer.close()
    assert out.getvalue() == text  # close is idempotent


def test_renderer_restores_the_screen_on_an_exception_and_keeps_logged_lines():
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Renderer(fps=0, stream=out, ansi=True) as renderer:
        renderer.log("cycle 1/5 | best 0.0100")
        run_renderer(renderer)
        assert "cycle 1/5 | best 0.0100" in out.getvalue().split(HOME)[-1]  # shown under the frame
        raise KeyboardInterrupt
    assert out.getvalue().endswith(LEAVE + "cycle 1/5 | best 0.0100\n")


def test_renderer_draws_nothing_until_the_first_tick():
    out = io.StringIO()
    with Renderer(fps=0, stream=out, ansi=True) as renderer:
        renderer.phase(cycle=1, cycles=1, phase="live")
    assert out.getvalue() == ""


def test_evaluation_frames_are_skipped_not_waited_for():
    """Above `fps` the eval phase drops frames (the first of each phase is always drawn)."""
    out = io.StringIO()
    renderer = Renderer(fps=1e-3, stream=out, ansi=True)
    renderer.phase(phase="eval", episode=1, episodes=1)
    w = World(CFG, 2, seed=1)
    for _ in range(5):
        w.step(np.zeros(2, dtype=np.int64))
        renderer(w)
    renderer.close()
    assert out.getvalue().count(HOME) == 1 and "evaluating episode 1 of 1 (learning off) | t=1/20" in out.getvalue()


def test_a_stream_that_is_no_terminal_gets_plain_frames():
    out = io.StringIO()
    renderer = Renderer(fps=0, stream=out)  # StringIO is not a tty: ansi off
    run_renderer(renderer, n_eval_episodes=1)
    renderer.log("cycle 2/5 | done")
    renderer.close()
    text = out.getvalue()
    assert "\x1b" not in text
    assert text.count("h2q world | cycle 2/5") == 5 and text.endswith("cycle 2/5 | done\n")
