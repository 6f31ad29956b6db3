"""Entry point: ``python -m harness.run CONFIG.gin [--gin_param 'X=Y' ...] [--out DIR] [--resume]``.

Parse -> build -> train -> evaluate -> close. A config that defines a grid runs the whole sweep;
any other config runs one method (all of its stages) and writes one run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import distributed
from harness.errors import report_errors
from harness.pipeline import run_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config", help="a gin file, e.g. configs/smoke.gin")
    parser.add_argument(
        "--gin_param", action="append", default=[], metavar="BINDING",
        help="a gin binding applied after the files, e.g. \"METHOD='superclip'\" (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/...)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with report_errors():
        try:
            run_dir = run_pipeline([args.config], args.gin_param, out=args.out, resume=args.resume)
        finally:
            distributed.shutdown()
        if distributed.env_rank() == 0:
            print(f"run directory: {run_dir}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
