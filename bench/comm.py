"""DDP gradient all-reduce time, from a communication hook (several processes only).

The hook is registered on the trainer's own DDP wrapper before its first forward (DDP accepts
one hook, registered before training starts). While ``timing`` is off it does what DDP's default
hook does (an asynchronous all-reduce of the bucket, then divide by the world size); while on (the
instrumented pass) it all-reduces synchronously and records the time, so the backward phase can
be reported without it.

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations as objects.)
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bench.measure import now


class CommTimer:
    def __init__(self, ddp: DistributedDataParallel, device: torch.device):
        self.device, self.timing, self.seconds = device, False, 0.0
        ddp.register_comm_hook(state=None, hook=self._hook)

    def _hook(self, state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        world = dist.get_world_size()
        buffer = bucket.buffer().div_(world)
        if not self.timing:
            work = dist.all_reduce(buffer, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        start = now(self.device)
        dist.all_reduce(buffer)
        self.seconds += now(self.device) - start
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(buffer)
        return future

    def pop(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def attach(trainer) -> CommTimer | None:
    """A CommTimer on the trainer's DDP wrapper, or None in a single process."""
    if isinstance(trainer.train_step_fn, DistributedDataParallel):
        return CommTimer(trainer.train_step_fn, trainer.dist.device)
    return None
