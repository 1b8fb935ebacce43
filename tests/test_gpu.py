"""CUDA only (marker gpu; skipped without a GPU, so never in CI): the fast path where it matters."""

import json

import pytest
import torch

from snapens.models import CifarResNet
from snapens.step import StepOptions, train_step
from snapens.training import train

from conftest import FAST

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_RUN = [o for o in FAST if o != "trainer.device=cpu"] + ["trainer.device=cuda", "scheduler=sgdr",
                                                             "scheduler.T_0=1", "scheduler.T_mult=1",
                                                             "trainer.epochs=2"]


def test_train_step_never_waits_for_the_gpu():
    """torch's sync debug mode raises on any host synchronisation: none inside a bf16 channels_last update."""
    model = CifarResNet(depth=8, num_classes=4).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (64,), device="cuda")
    options = StepOptions(grad_clip=1.0, precision=torch.bfloat16)
    train_step(model, optimizer, x, y, options)  # first step: lazy initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(model, optimizer, x, y, options)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_run_on_cuda(make_cfg, tmp_path):
    train(make_cfg(*GPU_RUN), tmp_path)
    training = json.loads((tmp_path / "results.json").read_text())["training"]
    assert training["precision"] == "bf16, channels_last" and training["device"].startswith("cuda")
    assert training["peak_memory_gib"] > 0
