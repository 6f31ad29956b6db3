"""pytest-benchmark micro-benchmarks of every registered method's loss, at batch 32 and 512.

    pytest bench/                      # not part of the default run (testpaths = tests)

The method's forward runs once on a real-caption batch of the default tiny model, outside the
timing; ``test_loss`` times ``Method.loss`` on those outputs, ``test_loss_backward`` the loss and
its backward into the outputs (what the loss adds to a step besides the encoders). Methods with
state (IDF, prototypes) update it on every call, as in training. ``test_token_head_linear``
times the Linear(width -> 49,408) of superclass's and superclip's head, forward and backward:
three matrix products that no exact formulation of their loss avoids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import methods
from harness import models
from harness.data.loader import prepare_batch
from harness.step import total_loss
from methods.token_classification import TokenClassifier
from tests.dist_utils import build, make_batch

MODEL = "tiny-vit"
METHOD_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "methods"
BATCHES = (32, 512)


@pytest.fixture(scope="module")
def model_cfg():
    return models.model_config(MODEL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("method-inputs")


def outputs_of(name: str, batch: int, model_cfg: dict, workdir) -> tuple:
    """(method, outputs with every differentiable tensor a fresh leaf) after one forward, the
    method configured as a run configures it (its ``configs/methods/<name>.gin``, e.g. neuclip's
    256 prototypes for the CPU models instead of the class's 4,096) and in its steady state
    (``cost_warmup_steps`` losses first, e.g. until neuclip's queue is full)."""
    bindings = [
        f"include '{METHOD_CONFIGS / f'{name}.gin'}'",
        *methods.method_class(name).example_bindings(workdir, model_cfg),
    ]
    step = build(name, model_cfg, bindings)
    data = prepare_batch(
        make_batch(batch, models.image_size(model_cfg), models.context_length(model_cfg)),
        torch.device("cpu"),
    )
    outputs = step.method(step.model, data)
    leaves = {
        k: v.detach().requires_grad_() if torch.is_tensor(v) and v.requires_grad else v
        for k, v in outputs.items()
    }
    for _ in range(step.method.cost_warmup_steps(batch)):
        step.method.loss(leaves)
    return step.method, leaves


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", methods.registered_names())
def test_loss(benchmark, name, batch, model_cfg, workdir):
    method, outputs = outputs_of(name, batch, model_cfg, workdir)
    benchmark.group = f"loss b{batch}"
    terms = benchmark(method.loss, outputs)
    assert torch.isfinite(total_loss(terms))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", methods.registered_names())
def test_loss_backward(benchmark, name, batch, model_cfg, workdir):
    method, outputs = outputs_of(name, batch, model_cfg, workdir)
    benchmark.group = f"loss+backward b{batch}"
    benchmark(lambda: total_loss(method.loss(outputs)).backward())
    assert any(torch.is_tensor(v) and v.grad is not None for v in outputs.values())


@pytest.mark.parametrize("batch", BATCHES)
def test_token_head_linear(benchmark, batch, model_cfg):
    width = model_cfg["vision_cfg"]["width"]
    linear = TokenClassifier(width).linear
    pooled = torch.randn(batch, width, requires_grad=True)
    grad = torch.randn(batch, linear.out_features)
    benchmark.group = f"token head linear b{batch}"
    benchmark(lambda: linear(pooled).backward(grad))
    assert pooled.grad is not None and linear.weight.grad.shape == linear.weight.shape
