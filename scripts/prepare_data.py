"""Prepare a training corpus ahead of time: `python scripts/prepare_data.py [--data-dir DIR] [--data-root data]`.

Without --data-dir it builds the default corpus (data/default/) from the local Python installation.
The work happens in h2q/data.py; training would do the same on its first run.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h2q import data
from h2q.cli import Parser, run_main


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder of text files (default: the Python installation)")
    parser.add_argument("--data-root", "--root", dest="root", default="data",
                        help="where prepared corpora are cached, as train.py's --data-root (default: data)")
    args = parser.parse_args(argv)
    data.prepare_corpus(args.data_dir, args.root, log=print)  # logs the summary: documents, bytes, skipped
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
