"""snapens.distributed: each rank takes a GPU it sees; a submitit job of several tasks trains as torchrun does."""

import os

import pytest
import torch
from snapens import distributed


@pytest.mark.parametrize("visible, local_rank, index", [(4, 3, 3), (1, 3, 0), (2, 3, 1)])
def test_rank_takes_a_gpu_it_sees(monkeypatch, visible, local_rank, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    ranks = distributed.Ranks(rank=local_rank, world=4, local_rank=local_rank)
    assert distributed.device_for(torch.device("cuda"), ranks) == torch.device("cuda", index)
    assert distributed.device_for(torch.device("cpu"), ranks) == torch.device("cpu")


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_trains_as_torchrun_does(tmp_path):
    """Issue 23: hydra/launcher=slurm_ddp's path, locally: a job of 2 tasks started by submitit (no torchrun) takes
    its ranks from submitit's job environment and ends with the snapshots of the torchrun run of the same config."""
    import json
    import subprocess
    import sys

    from snapens.snapshots import list_snapshots

    from conftest import FAST, HANG
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra (in dev)")
    overrides = [*FAST, "scheduler=sgdr", "scheduler.T_0=1", "scheduler.T_mult=1", "trainer.epochs=3",
                 "trainer.batch_size=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep, alone = tmp_path / "sweep", tmp_path / "torchrun"
    for command in ([sys.executable, "-m", "snapens.train", "-m", "hydra/launcher=submitit_local",
                     "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=30", *overrides,
                     f"hydra.sweep.dir={sweep}"],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                     "snapens.train", *overrides, f"hydra.run.dir={alone}"]):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((sweep / "0" / "results.json").read_text())["training"]
    assert training["processes"] == 2 and len(set(training["rank_weights_sha256"])) == 1
    assert [p.read_bytes() for p in list_snapshots(sweep / "0")] == [p.read_bytes() for p in list_snapshots(alone)]
    assert len(list_snapshots(alone)) == 3
