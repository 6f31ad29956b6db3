"""Entry point: ``python -m harness.run CONFIG.gin [--gin_param 'X=Y' ...] [--out DIR] [--resume]``.

Parse -> build -> train -> evaluate -> close. A config that binds ``Grid.axes`` runs the whole
sweep (``--out`` is then the sweep directory); any other config runs one method, all of its
stages, into one run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import config, distributed, stopping
from harness.errors import report_errors
from harness.grid import configured_grid, run_sweep
from harness.pipeline import run_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "config", help="a gin file, e.g. configs/smoke.gin or configs/batch_sweep.gin"
    )
    parser.add_argument(
        "--gin_param", action="append", default=[], metavar="BINDING",
        help="a gin binding applied after the files, e.g. \"METHOD='superclip'\" (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="run (or sweep) directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run's checkpoint if it has one"
    )
    parser.add_argument(
        "--cell", action="store_true", help="run one cell of a grid config (used by launchers)"
    )
    parser.add_argument(
        "--stage", default=None, help="stop after this stage of the method (used by launchers)"
    )
    parser.add_argument(
        "--shared-root", type=Path, default=None,
        help="folder of stages shared between runs, e.g. a sweep's shared/ (default: OUT/../shared)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with report_errors(), stopping.installed():
        try:
            config.parse([args.config], args.gin_param)
            grid = None if args.cell else configured_grid()
            if grid is not None:
                out = run_sweep(Path(args.config), args.gin_param, grid, out=args.out)
            else:
                out = run_pipeline(
                    [args.config],
                    args.gin_param,
                    out=args.out,
                    resume=args.resume,
                    until=args.stage,
                    shared_root=args.shared_root,
                )
        except stopping.Interrupted as e:  # before a run began: nothing to save
            print(f"{e} before training began", file=sys.stderr)
            return stopping.EXIT_INTERRUPTED
        finally:
            distributed.shutdown()
        if distributed.env_rank() == 0:
            print(f"{'sweep' if grid else 'run'} directory: {out}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
