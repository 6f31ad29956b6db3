"""``python -m harness.evaluate RUN_DIR [--device cpu]``: evaluate a trained run directory again.

The model and method are rebuilt from the run directory alone (its operative config, with the
earlier stages it read pointed at where they are now, and its checkpoint) and evaluated;
eval.json and eval_ranks.json are written. A multi-stage directory (a grid cell) evaluates its
last stage, the method's result. The run's lock is held meanwhile: a run still training is
refused, not evaluated half-way.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness import checkpoint, config, distributed
from harness.errors import ConfigError, NonFiniteEmbeddings, report_errors
from harness.execute import EVALUATION_FAILED, Built, evaluate_into
from harness.files import read_json, writable_dir
from harness.plan import manifest_once
from harness.rundir import FINISHED, RunDir
from methods import build_method


def evaluate_run_dir(run_dir: str | Path, *, device: str = "auto") -> dict[str, float]:
    run = RunDir(run_dir).final()
    record = read_json(run.record)
    if record is None or not run.operative_config.exists():
        raise ConfigError(f"{run.path} is not a run directory (no run.json / operative_config.gin)")
    writable_dir(run.path)  # before the work: its results are written there
    with run.guard().held(doing="evaluating"):
        return _evaluate(run, record, device)


def _evaluate(run: RunDir, record: dict[str, Any], device: str) -> dict[str, float]:
    config.parse([run.operative_config], run.earlier_stages_now(), trusted=False)
    spec = config.resolve()
    spec = replace(spec, data=replace(spec.data, manifest=record["data"]["manifest"]))
    dist = distributed.init(device)
    method = build_method(spec.method)
    model = method.build_model(record["model_config"])
    state = checkpoint.load(run.checkpoint)
    checkpoint.load_state_strict(model, state["model"], "model")
    checkpoint.load_state_strict(method, state["method"], "method state")
    model.to(dist.device)
    method.to(dist.device)
    built = Built(spec, method, record["model_config"], manifest_once(spec.data, dist), dist)
    try:
        metrics = evaluate_into(run, built, model)
    except NonFiniteEmbeddings as e:
        raise NonFiniteEmbeddings(f"{run.path}: {e}") from None
    status = run.status()
    if str(status.get("reason", "")).startswith(EVALUATION_FAILED):  # now evaluated: finished
        run.write_status(FINISHED, step=status.get("step"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    with report_errors():
        metrics = evaluate_run_dir(args.run_dir, device=args.device)
        for key, value in metrics.items():
            print(f"{key:>24s}  {value:8.2f}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
