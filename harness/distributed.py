"""Every collective of the harness lives here; methods call these and never torch.distributed.

All functions are the identity (or a no-op) in a single process, so a method's code is the same
with one process or many. Contrastive terms gather features *with* gradient and compute the
local rows against all columns (open_clip's ``local_loss=True, gather_with_grad=True``): the
backward of the gather sums the gradient contributions of every rank, and DDP's gradient
average then equals the gradient of the global-batch mean loss.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn

from harness.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The world size torchrun announces, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def uses_cuda(device: str) -> bool:
    """Whether a run configured with ``RunConfig.device`` (auto, cpu or cuda) trains on GPUs."""
    return torch.cuda.is_available() if device == "auto" else device.startswith("cuda")


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (or stay single-process)."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = uses_cuda(device)
    visible = torch.cuda.device_count() if use_cuda else 0
    if use_cuda and local_rank >= visible:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} needs GPU {local_rank}; visible GPUs: {visible}. Start at "
            f"most that many processes per node, or set RunConfig.device='cpu'"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not is_distributed():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        global _control
        # host-side agreements (a stop request) on CPU tensors, never waiting for the GPU
        _control = dist.new_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


_control = None  # a gloo group for CPU-side agreements; set by init with several processes


def shutdown() -> None:
    global _control
    if is_distributed():
        dist.destroy_process_group()
    _control = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each owner."""
    if not is_distributed():
        return x
    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    """Average ``x`` over ranks, in place; returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(dist.get_world_size())
    return x


@torch.no_grad()
def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` with rank ``src``'s value, in place."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class StopVote:
    """Every step each rank votes whether it was asked to stop; all ranks learn the outcome of
    step k's vote at step k + 1, from a non-blocking all-reduce on the CPU, so the vote costs
    no step a wait. In one process the outcome is the vote itself, at once."""

    def __init__(self) -> None:
        self._votes: torch.Tensor | None = None
        self._work = None

    def cast(self, stop: bool) -> bool:
        """Cast this step's vote; True on every rank, at the same step, once any rank voted."""
        if not is_distributed():
            return stop
        decided = False
        if self._work is not None:
            self._work.wait()  # finished long ago: a step has passed since it was cast
            decided = bool(self._votes.item())
        self._votes = torch.tensor([1 if stop else 0], dtype=torch.int32)
        self._work = dist.all_reduce(self._votes, group=_control, async_op=True)
        return decided

    def close(self) -> None:
        """Finish the last vote in flight (before the process group goes)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop request seen by one rank)."""
    return max_over_ranks(1.0 if flag else 0.0) > 0


def max_over_ranks(value: float) -> float:
    """The largest of every rank's ``value``, on every rank (float64: exact for a float)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
