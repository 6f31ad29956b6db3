"""Run one training step of a method in 1 or N gloo processes and collect loss, grads, state.

Used by the conformance tests: N processes on slices of a global batch must give the same
(averaged) loss and the same gradients as one process on the whole batch.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(n: int, image_size: int, context_length: int, seed: int = 0) -> dict:
    """Real captions of the built-in dataset, tokenised, with random pixels."""
    import open_clip

    from data_tools.builtin import caption, random_scene

    rng = random.Random(seed)
    texts = [caption(random_scene(rng, 3), rng) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(
            0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=gen
        ),
        "text": open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(texts),
        "index": torch.arange(n),
        "corrupt": torch.tensor(0),
    }


def build(method_name: str, model_cfg: dict, bindings: list[str], seed: int = 0):
    import gin

    from harness import config
    from harness.step import TrainStep

    gin.clear_config()
    gin.parse_config_files_and_bindings([], bindings)
    torch.manual_seed(seed)
    method = config.configured_method(method_name)
    model = method.build_model(model_cfg)
    return TrainStep(model, method)


def one_step(step_module, batch, steps: int = 1):
    """``steps`` forward/backward passes (plain SGD between them so state evolves identically)."""
    from harness.data.loader import prepare_batch

    batch = prepare_batch(batch, torch.device("cpu"))
    for _ in range(steps):
        for p in step_module.parameters():
            p.grad = None
        terms = step_module(batch)
        loss = terms["loss"]
        loss.backward()
        grads = {
            n: p.grad.detach().clone()
            for n, p in _unwrapped(step_module).named_parameters()
            if p.grad is not None
        }
        with torch.no_grad():
            for p in step_module.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad
        _unwrapped(step_module).method.after_step(_unwrapped(step_module).model)
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, grads


def _unwrapped(module):
    return module.module if hasattr(module, "module") else module


def _worker(rank, world, port, method_name, model_cfg, bindings, batch, steps, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from harness import distributed

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = build(method_name, model_cfg, bindings)
        ddp = DistributedDataParallel(module, forward_sync_buffers=False)
        n = batch["image"].shape[0] // world
        local = {k: (v[rank * n : (rank + 1) * n] if v.ndim else v) for k, v in batch.items()}
        loss, _, grads = one_step(ddp, local, steps)
        loss = distributed.all_reduce_mean_(loss.clone())
        state = {  # a module's extra state is plain data, not a tensor
            k: v.clone() if torch.is_tensor(v) else v for k, v in module.method.state_dict().items()
        }
        torch.save({"loss": loss, "grads": grads, "state": state}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(method_name, model_cfg, bindings, batch, world: int, out: Path, steps: int = 1):
    """Returns the per-rank results {'loss', 'grads', 'state'} of an N-process gloo step."""
    mp.spawn(
        _worker,
        args=(world, free_port(), method_name, model_cfg, bindings, batch, steps, str(out)),
        nprocs=world,
        join=True,
    )
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]
