"""Command-line plumbing shared by the entry points: dataclass configs as argparse flags, device
selection, and the rule that a user's mistake ends in one clear line, never a traceback.

Run configs are dataclasses (nanoGPT's configurator idea without globals or `exec`): each field
becomes a `--flag` with its default and the help text from the field's metadata.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

import torch


class UserError(Exception):
    """Something the user can fix (a flag, a path, a file). The message says what and how."""


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, group: str | None = None):
    """One flag per field of dataclass `cls`: --field-name, typed, with its default and help."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if kind is bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[X] -> X
        target.add_argument(flag, dest=f.name, type=_parser_for(base), default=default,
                            choices=choices, metavar=f.metadata.get("metavar"),
                            help=f"{help_text} (default: {default})")


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


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable explicit choice is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device {name!r} is not one of auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def run_main(main, argv=None) -> int:
    """Call `main(argv)`; a UserError (or a bad flag) prints one line to stderr and exits 2."""
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
