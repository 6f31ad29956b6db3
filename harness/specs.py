"""The run's configuration as plain frozen dataclasses: what the plan carries to every process.

``configs/*.gin`` binds these by name (``TrainConfig.lr = ...``); ``harness.config``, the one
gin parse site, resolves them into a ``RunSpec``, and everything below the entry point takes
its spec as an argument. Each checks its own values and names a bad one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunConfig:
    """Which method and which model; ``device`` is auto, cpu or cuda."""

    method: str = "clip"
    model: str = "tiny-vit"
    device: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 250
    chunk_size: int = 1024  # queries scored at once; bounds memory at O(N * chunk)
    split: str = "test"
    probe_split: str = "train"
    probe_train_samples: int = 2000  # labelled train images used to fit the probe
    probe_C: float = 1.0  # inverse L2 strength of the logistic regression
    probe_max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.probe_split == self.split:
            raise ValueError(
                f"EvalConfig.probe_split={self.probe_split!r} is the evaluation split: the "
                f"probe would be fitted on the images it is scored on"
            )


LR_RULES = ("none", "linear", "sqrt")
BUDGETS = ("samples", "steps", "wallclock")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and budget. ``batch_size`` is global (all ranks together).

    Budgets: ``samples`` (default) trains ceil(train_samples / batch_size) steps, so every batch
    size sees the same data; ``steps`` trains ``train_steps`` steps whatever the batch; and
    ``wallclock`` trains for ``train_seconds`` (capped at the samples budget), with the cosine
    schedule following elapsed time. Warmup is always counted in samples.
    """

    batch_size: int = 64
    train_samples: int = 40_000
    budget: str = "samples"
    train_steps: int = 0  # budget="steps"
    train_seconds: float = 0.0  # budget="wallclock"
    warmup_samples: int = 4_000
    seed: int = 0
    lr: float = 1e-3  # the learning rate at base_batch
    lr_rule: str = "none"  # how lr scales with batch_size / base_batch: none, linear, sqrt
    base_batch: int = 64
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float = 0.0  # 0 disables clipping
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "fp32", "bf16"
    log_every_steps: int = 10
    checkpoint_every_samples: int = 20_000  # 0: only at the end (and on interrupt)
    progress_bar: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable kernels
    compile: bool = False  # torch.compile the method's forward and loss (model included)
    # Recompute each transformer block's activations in backward: about one more forward of
    # compute for activation memory of a block at a time (how a large tower fits a big batch).
    # The FLOP count, and so MFU, then includes the recomputation.
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size > 0,
            "train_samples": self.train_samples > 0,
            "warmup_samples": self.warmup_samples >= 0,
            "lr": self.lr > 0,
            "base_batch": self.base_batch > 0,
            "log_every_steps": self.log_every_steps > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{key}={getattr(self, key)!r} is out of range")
        if self.budget not in BUDGETS:
            raise ValueError(f"TrainConfig.budget={self.budget!r}; choose one of {BUDGETS}")
        if self.budget == "steps" and self.train_steps <= 0:
            raise ValueError("TrainConfig.budget='steps' needs TrainConfig.train_steps > 0")
        if self.budget == "wallclock" and self.train_seconds <= 0:
            raise ValueError("TrainConfig.budget='wallclock' needs TrainConfig.train_seconds > 0")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"TrainConfig.lr_rule={self.lr_rule!r}; choose one of {LR_RULES}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}; choose auto, fp32 or bf16")

    # -- derived values (computed in code, never in gin) --------------
    @property
    def total_steps(self) -> int:
        """Steps to train (for ``wallclock``: the cap; time usually ends the run first)."""
        if self.budget == "steps":
            return self.train_steps
        return math.ceil(self.train_samples / self.batch_size)

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps, round(self.warmup_samples / self.batch_size))

    @property
    def scaled_lr(self) -> float:
        ratio = self.batch_size / self.base_batch
        factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_rule]
        return self.lr * factor

    def record(self) -> dict[str, Any]:
        """Every field and every derived value, for run.json."""
        return {**asdict(self), **self.derived()}

    def derived(self) -> dict[str, Any]:
        # a time budget usually ends the run before its step cap: status.json's step is what ran
        samples = "samples_cap" if self.budget == "wallclock" else "samples_seen"
        return {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "scaled_lr": self.scaled_lr,
            samples: self.total_steps * self.batch_size,
        }


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is read. ``manifest=None`` means the built-in dataset."""

    manifest: str | None = None
    augment: str = "open_clip"  # "open_clip" (RandomResizedCrop 0.9-1.0) or "none"
    num_workers: int = 1
    shuffle_buffer: int = 2000
    verify_checksums: bool = True
    builtin_root: str = "data"
    # Loader workers run at this nice value: on a machine with few cores they then take the CPU
    # the training step leaves idle instead of slowing its forward (0 keeps the parent's).
    worker_nice: int = 19

    def __post_init__(self) -> None:
        if self.augment not in ("open_clip", "none"):
            raise ValueError(f"DataConfig.augment={self.augment!r}; choose 'open_clip' or 'none'")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers={self.num_workers} must be >= 0")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"DataConfig.worker_nice={self.worker_nice} must be in 0..19")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method and the hyperparameters its gin file and bindings give it."""

    name: str = "clip"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """Everything one training run is built from."""

    run: RunConfig
    train: TrainConfig
    data: DataConfig
    eval: EvalConfig
    method: MethodSpec = field(default_factory=MethodSpec)
    faults: str = ""  # harness.faults: a deliberate fault for the reliability tests

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunSpec:
        parts = {"run": RunConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig,
                 "method": MethodSpec}  # fmt: skip
        return cls(**{k: parts[k](**raw[k]) for k in parts}, faults=raw.get("faults", ""))
