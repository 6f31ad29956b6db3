"""Entry point: ``python -m harness.run CONFIG.gin [--gin_param 'X=Y' ...] [--out DIR] [--resume]``.

Parse (once) -> plan -> validate -> execute. A config that binds ``Grid.axes`` runs the whole
sweep (``--out`` is then the sweep directory); any other config runs one method, all of its
stages, into one run directory. A sweep's cells run from its plan: ``--plan PLAN --cell NAME``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import config, distributed, stopping
from harness.errors import ConfigError, report_errors
from harness.execute import run_cell
from harness.files import read_json
from harness.launch import run_sweep
from harness.plan import sweep_from_json, validate, validate_sweep
from harness.planner import plan_run, plan_sweep
from harness.slurm import write_slurm


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "config", nargs="?", help="a gin file, e.g. configs/smoke.gin or configs/batch_sweep.gin"
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
        "--plan", type=Path, help="a sweep's plan.json (launchers run cells from it)"
    )
    parser.add_argument("--cell", help="with --plan: the cell to run")
    parser.add_argument("--stage", default=None, help="stop after this stage of the method")
    parser.add_argument(
        "--shared-root", type=Path, default=None,
        help="folder of stages shared between runs, e.g. a sweep's shared/ (default: OUT/../shared)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if (args.config is None) == (args.plan is None) or (args.plan is None) != (args.cell is None):
        parser.error("give a CONFIG.gin, or --plan PLAN --cell NAME")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with report_errors(), stopping.installed():
        try:
            kind, out = _sweep(args) if _is_sweep(args) else ("run", _run(args))
        except stopping.Interrupted as e:  # before a run began: nothing to save
            print(f"{e}; run the same command again to go on", file=sys.stderr)
            return stopping.EXIT_INTERRUPTED
        finally:
            distributed.shutdown()
        if distributed.env_rank() == 0:
            print(f"{kind} directory: {out}")
        return 0
    return 2


def _is_sweep(args: argparse.Namespace) -> bool:
    if args.plan is not None:
        return False
    config.parse([args.config], args.gin_param)
    return config.configured_grid() is not None


def _run(args: argparse.Namespace) -> Path:
    """One run (all of its stages), or one cell of a sweep's plan as its launcher started it."""
    if args.plan is not None:
        raw = read_json(args.plan)
        if raw is None:
            raise ConfigError(f"--plan {args.plan}: not a sweep plan (plan.json)")
        return run_cell(sweep_from_json(raw).cell(args.cell), resume=args.resume, until=args.stage)
    return run_config([args.config], args.gin_param, out=args.out, resume=args.resume,
                      shared_root=args.shared_root, until=args.stage)  # fmt: skip


def run_config(
    config_files: list[str | Path], bindings: list[str], *, out: Path | None = None,
    resume: bool = False, shared_root: Path | None = None, until: str | None = None,
) -> Path:  # fmt: skip
    """What ``python -m harness.run CONFIG`` does for a single run, in this process: plan,
    validate, run every stage; returns the last run directory."""
    cell = plan_run(config_files, bindings, out=out, shared_root=shared_root,
                    world_size=distributed.env_world_size())  # fmt: skip
    validate([cell], distributed.init(cell.stages[0].spec.run.device), resume=resume)
    return run_cell(cell, resume=resume, until=until)


def _sweep(args: argparse.Namespace) -> tuple[str, Path]:
    plan = plan_sweep(args.config, args.gin_param, config.configured_grid(), out=args.out)
    validate_sweep(plan)
    grid = plan.grid
    axes = " x ".join(f"{len(v)} {k}" for k, v in grid.axes.items())
    print(f"sweep {plan.directory}: {len(plan.cells)} cells ({axes})")
    if grid.launcher == "slurm":
        script = write_slurm(plan)
        print(f"wrote {script}; submit with: bash {script.parent / 'submit.sh'}")
        return "sweep", plan.directory
    return "sweep", run_sweep(plan)


if __name__ == "__main__":
    sys.exit(main())
