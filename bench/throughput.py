"""Training-step throughput per method and batch size: ``python -m bench.throughput``.

    python -m bench.throughput [--methods clip superclip ...] [--batch-sizes 32 128 512]
                               [--model tiny-vit] [--steps 30] [--rounds 1]
                               [--out reports/bench/NAME]

For every method x batch size (a "cell"), in a fresh process each (so peak memory, allocator and
thread state do not leak from one cell into the next), on the model, data and config a run uses:
the trainer's own steps timed with device synchronisation at step boundaries (warm-up excluded;
median, p10, p90, samples/s), an instrumented pass for the phase breakdown, peak memory, MFU
(FLOPs counted by torch's FLOP counter over the device peak: a datasheet value on known GPUs, a
measured fp32 matmul peak on CPU, named as such), GPU utilisation and memory sampled through NVML
(n/a without a GPU), and the loader alone on the same configuration, with cells where the loader
is slower than the step flagged I/O-bound. Two baseline rows per batch size time the same CLIP
with no harness (bench/bare.py): "bare" on batches in memory, "bare+loader" fed live by the
harness's loader. Writes ``results.json`` and ``results.md`` to ``--out``.

A machine's speed drifts over minutes (a shared VM, clocks, the page cache), and two cells timed
apart can differ by more than the effect measured. So cells run batch size by batch size (clip
and its baselines back to back), and ``--rounds N`` measures every cell N times, round after
round: each ratio is then taken within a round and reported as its median and range over rounds.

Under ``torchrun`` the cells run in the launched processes (``--in-process`` is implied) and the
communication phase is the DDP all-reduce time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench import comm, report
from bench.bare import time_bare_loop
from bench.cell import Cell, build_cell, cell_bindings, check_cell
from bench.measure import load_average, machine
from bench.phases import PHASES_NOTE, time_loader, time_phases, time_steps
from harness import distributed
from harness.costs import count_costs, device_peak_flops
from harness.data.loader import prepare_batch, train_loader
from harness.errors import report_errors
from harness.step import autocast
from methods import registered_names

BARE = "bare"  # the bare loop on batches already in memory
BARE_LOADER = "bare+loader"  # the bare loop fed live by the harness's loader
BASELINES = (BARE, BARE_LOADER)
DEFAULT_BATCHES = (32, 128, 512)


def trained_method(method: str) -> str:
    """The method a cell trains: the bare-loop baselines build clip's cell."""
    return "clip" if method in BASELINES else method


def bindings_of(args: argparse.Namespace, method: str, batch: int, workdir: Path) -> list[str]:
    """The gin bindings of one cell (a baseline row gets clip's), as run and as checked."""
    return cell_bindings(
        trained_method(method), batch, model=args.model, steps=args.warmup + args.steps,
        workdir=workdir, data=args.data, extra=args.gin_param,
    )  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--methods", nargs="+", default=None, help="registered method names (default: all)")
    add("--batch-sizes", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    add("--model", default="tiny-vit", help="configs/models/<name>.json or an open_clip name")
    add("--data", default=None, help="a dataset manifest (default: the built-in dataset)")
    add("--warmup", type=int, default=5, help="steps run before timing starts (excluded)")
    add("--steps", type=int, default=30, help="timed steps of the trainer")
    add("--phase-steps", type=int, default=10, help="timed steps of the instrumented pass")
    add("--loader-batches", type=int, default=20, help="batches timed in the loader-only pass")
    add("--rounds", type=int, default=1, help="measure every cell this many times, in turn")
    add("--gin_param", action="append", default=[], metavar="BINDING", help="extra gin binding")
    add("--no-bare", action="store_true", help="leave out the bare-loop baseline rows")
    add("--out", type=Path, default=None, help="output folder (default reports/bench/<time>)")
    add("--in-process", action="store_true", help="run the cells in this process")
    add("--cell", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    add("--cell-out", type=Path, help=argparse.SUPPRESS)
    add("--peak", nargs=2, metavar=("FLOPS", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = args.methods or registered_names()
    unknown = sorted(set(args.methods) - set(registered_names()) - set(BASELINES))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {registered_names()}")
    if args.warmup < 1 or args.steps < 2 or args.phase_steps < 1 or args.loader_batches < 1:
        parser.error("need --warmup >= 1, --steps >= 2, --phase-steps >= 1, --loader-batches >= 1")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: need at least 1")
    return args


# ---------------------------------------------------------------- one cell


def run_cell(args: argparse.Namespace, method: str, batch: int, peak: tuple[float, str]) -> dict:
    """Every measurement of one method x batch size, in this process."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        cell = build_cell(bindings_of(args, method, batch, tmp), run_dir=tmp / "run")
        try:
            record = {
                "method": method,
                "batch_size": batch,
                "model": args.model,
                "world_size": cell.built.dist.world_size,
                "num_workers": cell.spec.data.num_workers,
                "torch_threads": torch.get_num_threads(),
                "load_avg_before": load_average(),
            }
            if method in BASELINES:
                record.update(_measure_bare(cell, args, live=method == BARE_LOADER))
            else:
                record.update(_measure_trainer(cell, args, peak))
            record["load_avg_after"] = load_average()
        finally:
            cell.trainer.close()
    return record


def _measure_trainer(cell: Cell, args: argparse.Namespace, peak: tuple[float, str]) -> dict:
    trainer = cell.trainer
    comm_timer = comm.attach(trainer)  # before the first forward (DDP only)
    steps = time_steps(trainer, warmup=args.warmup)
    if comm_timer is not None:
        comm_timer.timing = True
    phases = time_phases(
        trainer, warmup=1, steps=args.phase_steps,
        comm_seconds=comm_timer.pop if comm_timer else lambda: None,
    )  # fmt: skip
    loader = time_loader(trainer, warmup=2, batches=args.loader_batches)
    costs = count_costs(
        trainer.step_module, per_rank_batch=cell.per_rank_batch,
        image_size=trainer.loader_args["image_size"],
        context_length=trainer.loader_args["context_length"], device=cell.device,
        autocast_ctx=autocast(cell.device, cell.spec.train.precision),
    )  # fmt: skip
    return report.derive(
        steps=steps, phases=phases, loader=loader, costs=costs, peak=peak,
        batch=cell.spec.train.batch_size, method_info=trainer.method.info(),
        world_size=cell.built.dist.world_size,
    )  # fmt: skip


def prepared_batches(loader: Iterator, device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """(images, token ids) on the device, normalised as the trainer's step sees them."""
    for batch in loader:
        out = prepare_batch(batch, device)
        yield out["image"], out["text"]


def _measure_bare(cell: Cell, args: argparse.Namespace, *, live: bool) -> dict:
    """The bare loop on real batches of the same loader: fetched and normalised beforehand, or
    (``live``) fetched and normalised inside the timed step, as the trainer does."""
    trainer, device = cell.trainer, cell.device
    batches = prepared_batches(iter(train_loader(**trainer.loader_args)), device)
    if not live:  # four batches kept in memory; the loader's worker is gone before timing starts
        batches = itertools.cycle(list(itertools.islice(batches, 4)))
    train = cell.spec.train
    result = time_bare_loop(
        cell.built.model_cfg, batches, device=device, warmup=args.warmup, steps=args.steps,
        optimizer={"lr": train.scaled_lr, "weight_decay": train.weight_decay,
                   "betas": (train.beta1, train.beta2), "eps": train.eps},
        autocast_ctx=autocast(device, train.precision),
    )  # fmt: skip
    return report.derive_bare(result, batch=train.batch_size, live=live)


# ---------------------------------------------------------------- the grid


def cells(args: argparse.Namespace) -> list[tuple[str, int]]:
    """One round's (method, batch) cells, batch size by batch size: the cells whose step times
    are divided by each other's run minutes apart, not a whole grid apart."""
    methods = list(args.methods)
    if distributed.env_world_size() > 1:  # the bare loop is a one-process baseline
        methods = [m for m in methods if m not in BASELINES]
    elif not args.no_bare:
        methods += [b for b in BASELINES if b not in methods]
    return [(m, b) for b in args.batch_sizes for m in methods]


def check_cells(args: argparse.Namespace) -> None:
    """Every cell's config, model and data, checked as a run checks them before anything is
    measured: a bad binding, model name or batch size is one error, not a failed row per cell
    in a report written half-way."""
    trained = dict.fromkeys((trained_method(m), b) for m, b in cells(args))  # each config once
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        for method, batch in trained:
            check_cell(bindings_of(args, method, batch, Path(tmp)), run_dir=Path(tmp) / "run")


def run_subprocess(args: argparse.Namespace, method: str, batch: int, peak, out: Path) -> dict:
    """One cell in a fresh Python process (same options), so no state carries between cells."""
    cmd = [sys.executable, "-m", "bench.throughput", "--cell", method, str(batch),
           "--cell-out", str(out), "--peak", repr(peak[0]), peak[1], "--model", args.model,
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--phase-steps", str(args.phase_steps), "--loader-batches", str(args.loader_batches)]  # fmt: skip
    if args.data:
        cmd += ["--data", args.data]
    for binding in args.gin_param:
        cmd += ["--gin_param", binding]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"method": method, "batch_size": batch, "error": tail or f"exit {done.returncode}"}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    in_process = args.in_process or distributed.env_world_size() > 1
    dist = distributed.init("auto")
    device = dist.device
    peak = (float(args.peak[0]), args.peak[1]) if args.peak else device_peak_flops(device)
    if args.cell:  # a child process: one cell, written to --cell-out
        record = run_cell(args, args.cell[0], int(args.cell[1]), peak)
        args.cell_out.write_text(json.dumps(record, indent=1, default=str))
        return 0
    with report_errors():
        check_cells(args)
    out = args.out or Path("reports/bench") / time.strftime("%Y%m%d-%H%M%S")
    header = {
        **machine(device),
        "peak_flops": peak[0],
        "peak_source": peak[1],
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "phase_steps": args.phase_steps,
        "loader_batches": args.loader_batches,
        "rounds": args.rounds,
        "gin_params": args.gin_param,
        "phases_note": PHASES_NOTE,
    }
    rows, paths = [], []
    for round_, (method, batch) in itertools.product(range(args.rounds), cells(args)):
        print(
            f"bench: round {round_ + 1}/{args.rounds}: {method} batch {batch}",
            file=sys.stderr,
            flush=True,
        )
        if in_process:
            row = run_cell(args, method, batch, peak)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                row = run_subprocess(args, method, batch, peak, Path(tmp) / "cell.json")
        rows.append({**row, "round": round_})
        # Rewritten after every cell: a bench stopped half-way keeps the cells it measured.
        if distributed.env_rank() == 0:
            paths = report.write(out, header, rows)
    if distributed.env_rank() == 0:
        print("\n".join(str(p) for p in paths))
    distributed.shutdown()
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(
            f"bench: {r['method']} batch {r['batch_size']} failed:\n{r['error']}", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
