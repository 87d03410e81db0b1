"""--help as h2q/cli.py builds it: a short usage line, flags under headings, every default said once
(on/off for switches, none for an unset value), the description wrapped and the examples kept as
written at the end; the entry points' help follows it."""
import io
import re
from contextlib import redirect_stdout
from dataclasses import dataclass

import pytest

from h2q.cli import Parser, add_dataclass_flags
from h2q.config import check_options, option


@dataclass
class Demo:
    out: str | None = option(None, "output folder (default checkpoints/demo, or checkpoints/other for --fast)")
    steps: int = option(10, "steps to run", at_least=1)
    lr: float = option(1e-3, "learning rate", above=0)
    fast: bool = option(False, "go fast")
    progress: bool = option(True, "show a progress bar")
    name: str | None = option(None, "a name; none = chosen for you")

    def __post_init__(self):
        check_options(self)


def help_of(parser) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    return out.getvalue()


def test_grouped_help_with_defaults_and_examples():
    parser = Parser(prog="demo.py", description="A demo of the help: " + "long words " * 20,
                    examples=[("python demo.py --fast", "go fast"), ("python demo.py --steps 3", "three steps")])
    add_dataclass_flags(parser, Demo, groups={"speed": ["fast", "lr"], "output": ["out", "progress"]})
    text = help_of(parser)
    assert text.startswith("usage: demo.py [options]\n")
    assert max(len(line) for line in text.split("examples:")[0].splitlines()) <= 100  # the description wraps
    options, rest = text.split("\nspeed:\n")
    speed, output = rest.split("\noutput:\n")
    assert "--steps INT" in options and "--name" in options and "--fast" not in options
    assert "--fast, --no-fast" in speed and "--lr FLOAT" in speed and "--out" not in speed
    assert "--out OUT" in output and "--progress" in output
    flat = " ".join(text.split())
    assert "go fast (default: off)" in flat and "show a progress bar (default: on)" in flat
    assert "steps to run; >= 1 (default: 10)" in flat and "(default: None)" not in flat
    assert "(default checkpoints/demo, or checkpoints/other for --fast)" in flat
    assert flat.count("(default") == 5  # out (in its own words), steps, lr, fast, progress; name has none
    assert text.endswith("examples:\n  python demo.py --fast\n      go fast\n"
                         "  python demo.py --steps 3\n      three steps\n")


def test_groups_name_real_fields():
    with pytest.raises(AssertionError, match="unknown fields"):
        add_dataclass_flags(Parser(prog="demo.py"), Demo, groups={"speed": ["fastest"]})


def test_positionals_stay_in_the_usage_line():
    parser = Parser(prog="report.py")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    assert parser.format_usage() == "usage: report.py [options] RUN_DIR\n"


@pytest.mark.parametrize("module", ["h2q.train", "h2q.infer", "h2q.evolve.run", "scripts/report.py"])
def test_entry_points_say_each_default_once(module):
    if module.endswith(".py"):
        import runpy
        main = runpy.run_path(module)["main"]
    else:
        import importlib
        main = importlib.import_module(module).main
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    flat = " ".join(out.getvalue().split())
    assert "(default: None)" not in flat and not re.search(r"\(default[^)]*\) \(default", flat)
    assert flat.startswith("usage: ") and "[options]" in flat.split(" options: ")[0]
