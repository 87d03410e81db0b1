"""Command-line plumbing shared by the entry points: dataclass configs as argparse flags, device
selection, and the rule that a user's mistake ends in one clear line, never a traceback.

Run configs are dataclasses (nanoGPT's configurator idea without globals or `exec`): each field made
with `h2q.config.option` becomes a `--flag` with its default, choices, range and help text. The library
raises `h2q.errors.H2QError` in its own words; `run_main` prints it as one `error: ...` line (a
`ConfigError` names the field's flag) and returns exit code 2. A usage error of argparse itself (an
unknown flag, a value of the wrong type) is one line too, with the `--help` hint.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from h2q.config import option_default, range_text
from h2q.errors import ConfigError, H2QError
from h2q.perf import resolve_device  # noqa: F401  (the entry points take it from here)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line plus the --help hint, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, group: str | None = None):
    """One flag per field of dataclass `cls`: --field-name, typed, with its default, range and help."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        kind = hints[f.name]
        default = option_default(f)
        help_text = f.metadata.get("help", "")
        bounds = f.metadata.get("bounds")
        if bounds:
            help_text += f"; {range_text(bounds)}"
        if kind is bool:
            target.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{help_text} (default: {'on' if default else 'off'})")
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[X] -> X
        shown = "" if default is None or "(default" in help_text else f" (default: {default})"
        target.add_argument(flag_name(f.name), dest=f.name, type=_parser_for(base), default=default,
                            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                            help=help_text + shown)


def _parser_for(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def dataclass_from_args(cls, args: argparse.Namespace):
    """Build `cls` from the parsed flags that belong to it."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def error_line(e: H2QError) -> str:
    """The one line a user sees: a ConfigError names the field's flag."""
    if isinstance(e, ConfigError):
        return f"error: {flag_name(e.field)} {e.problem}"
    return f"error: {e}"


def run_main(main, argv=None) -> int:
    """Call `main(argv)`; a library error (or a bad flag) prints one line to stderr and exits 2."""
    try:
        return main(argv) or 0
    except H2QError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
