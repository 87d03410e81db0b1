"""Plots and a self-contained HTML report of a run: `python scripts/report.py RUN_DIR [--out DIR]`.

RUN_DIR is a training run (e.g. checkpoints/base) or an evolve run (e.g. checkpoints/evolve/RUN); the
kind is told from the files in it. Writes PNG figures and report.html into DIR (default
RUN_DIR/report/). The work happens in h2q/report.py; it needs matplotlib (`pip install -e .[plot]`).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h2q.cli import Parser, run_main  # noqa: E402
from h2q.report import write_report  # noqa: E402


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a training run or evolve run folder")
    parser.add_argument("--out", default=None, help="where to write the figures and report.html (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    print(f"report written to {write_report(args.run_dir, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
