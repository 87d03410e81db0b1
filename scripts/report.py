"""Plots and a self-contained HTML report of a run: `python scripts/report.py RUN_DIR [--out DIR]`.

RUN_DIR is a training run (e.g. checkpoints/base), an evolve run (e.g. checkpoints/evolve/RUN) or a
folder of evolve runs in arms (scripts/bench_evolve.py --out OUT: OUT/ARM/seed-K); the kind is told
from the files in it. Writes PNG figures and report.html into DIR (default RUN_DIR/report/). The
work happens in h2q/report/; it needs matplotlib (`pip install -e .[plot]`).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h2q.cli import Parser, run_main
from h2q.errors import H2QError
from h2q.report import write_report

EXAMPLES = [
    ("python scripts/report.py checkpoints/base", "the training run: bits/byte, throughput, samples"),
    ("python scripts/report.py checkpoints/evolve/run-001", "an evolve run: fitness, agents, world, lineage"),
    ("python scripts/report.py OUT --out /tmp/bench-report", "arms of scripts/bench_evolve.py --out OUT, "
     "compared by the IQM of the normalised score"),
]


def main(argv=None) -> int:
    parser = Parser(prog="report.py", description="PNG figures and one self-contained report.html of a training "
                    "run, an evolve run, or a folder of evolve runs in arms (ARM/seed-K). Needs matplotlib: "
                    "pip install -e .[plot]", examples=EXAMPLES)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run, an evolve run, or a folder of arms")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write the figures and report.html (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise H2QError(f"RUN_DIR {run_dir} is a file; give the run's folder (e.g. checkpoints/base)")
    print(f"report written to {write_report(args.run_dir, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
