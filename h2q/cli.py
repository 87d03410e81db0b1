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
import textwrap
import typing

from h2q.config import option_default, range_text
from h2q.errors import ConfigError, H2QError
from h2q.perf import resolve_device  # noqa: F401  (the entry points take it from here)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help in a wider flag column; in the description and the epilog a paragraph with
    indented lines (the examples) keeps its line breaks, the others are wrapped."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line[:1].isspace() for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)


def examples_text(examples, width: int = 78) -> str:
    """The closing section of --help: each (command, what it does) as the command, then its purpose
    indented and wrapped under it."""
    return "examples:\n" + "\n".join(f"  {command}\n" + textwrap.fill(purpose, width, initial_indent=" " * 6,
                                                                       subsequent_indent=" " * 6)
                                     for command, purpose in examples)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line plus the --help hint, exit code 2, and whose --help
    ends with `examples` ((command, what it does) pairs) when given."""

    def __init__(self, *args, examples=(), **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if examples:
            kwargs["epilog"] = "\n\n".join(filter(None, (kwargs.get("epilog"), examples_text(examples))))
        super().__init__(*args, **kwargs)

    def format_usage(self) -> str:
        self._compact_usage()
        return super().format_usage()

    def format_help(self) -> str:
        self._compact_usage()
        return super().format_help()

    def _compact_usage(self) -> None:
        """`usage: prog [options] POSITIONAL`: the flags are listed under their headings below, not
        all repeated in the usage line."""
        if self.usage is None:
            positionals = [a.metavar or a.dest for a in self._actions if not a.option_strings]
            self.usage = " ".join(["%(prog)s [options]", *positionals])

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


METAVARS = {int: "INT", float: "FLOAT"}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, group: str | None = None,
                        groups: dict[str, list[str]] | None = None):
    """One flag per field of dataclass `cls`: --field-name, typed, with its default, range and help.
    The flags go under the heading `group` (default: argparse's options), those of the fields named
    in `groups` under its headings instead ({heading: [field names]}, in that order)."""
    main = parser.add_argument_group(group) if group else parser
    groups = groups or {}
    known = {f.name for f in dataclasses.fields(cls)}
    assert all(set(names) <= known for names in groups.values()), f"unknown fields in {groups} for {cls.__name__}"
    headed = {heading: parser.add_argument_group(heading) for heading in groups}
    where = {name: headed[heading] for heading, names in groups.items() for name in names}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        target = where.get(f.name, main)
        kind = hints[f.name]
        default = option_default(f)
        help_text = f.metadata.get("help", "")
        bounds = f.metadata.get("bounds")
        if bounds:
            help_text += f"; {range_text(bounds)}"
        said = "(default" in help_text  # the help text names its default in its own words
        if kind is bool:
            shown = "" if said else f" (default: {'on' if default else 'off'})"
            target.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text + shown)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[X] -> X
        shown = "" if default is None or said else f" (default: {default})"
        metavar = f.metadata.get("metavar") or METAVARS.get(base)  # short, so the help column stays aligned
        target.add_argument(flag_name(f.name), dest=f.name, type=_parser_for(base), default=default,
                            choices=f.metadata.get("choices"), metavar=metavar, help=help_text + shown)


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
