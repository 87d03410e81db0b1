"""The library's errors: what a caller can fix, said in the library's own words.

Library modules raise these and never print or exit; the command-line layer (h2q/cli.py) turns any of
them into one `error: ...` line and exit code 2. A message says what is wrong and what to do about it.

* `H2QError`: the base class; anything a caller (or the user behind a command) can fix.
* `ConfigError`: a configuration value out of its range. It names the field (`field`, e.g.
  "mutation_rate") and the problem apart, so the CLI can name the flag (`--mutation-rate`) instead.
* `FileFormatError`: a file that is missing, unreadable, corrupt, of another kind, or made for
  another base. The message names the file.
"""
from __future__ import annotations


class H2QError(Exception):
    """Something the caller can fix; the message says what and how."""


class ConfigError(H2QError):
    """A config value out of range: `field` is the dataclass field, `problem` the rest of the sentence."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")


class FileFormatError(H2QError):
    """A file the caller pointed at cannot be used as it is."""
