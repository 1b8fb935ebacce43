"""Paper presets (configs only: they are GPU jobs), their driver, and the SLURM launcher config."""

import subprocess
import sys
from pathlib import Path

import pytest

from snapens.build import build_schedule
from snapens.snapshots import snapshot_steps

from conftest import HANG, compose_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 782  # CIFAR-10: ceil(50,000 / 64) updates per epoch at batch 64


def epochs_of_snapshots(cfg, steps_per_epoch: int) -> list[float]:
    schedule = build_schedule(cfg.scheduler, cfg.trainer.epochs, steps_per_epoch)
    every = round(cfg.trainer.snapshot_every * steps_per_epoch)
    return [s / steps_per_epoch for s in snapshot_steps(schedule, every)]


def test_snapshot_ensembles_table_1(make_cfg):
    """ResNet-110, 200 epochs, batch 64: 5 cycles of 40 epochs from lr 0.2; the step baseline drops at 100 and
    150; NoCycle snapshots that baseline every 40 epochs."""
    se = make_cfg("experiment=se_resnet110_c10")
    assert (se.model.depth, se.trainer.batch_size, se.scheduler.eta_max) == (110, 64, 0.2)
    assert epochs_of_snapshots(se, STEPS) == [40, 80, 120, 160, 200]
    single = make_cfg("experiment=se_resnet110_c10_single")
    schedule = build_schedule(single.scheduler, single.trainer.epochs, STEPS)
    assert [schedule.lr(t) for t in (0, 100 * STEPS - 1, 100 * STEPS, 150 * STEPS)] == \
        [0.1, 0.1, pytest.approx(0.01), pytest.approx(0.001)]
    assert epochs_of_snapshots(single, STEPS) == [200]
    nocycle = make_cfg("experiment=se_resnet110_c10_nocycle")
    assert epochs_of_snapshots(nocycle, STEPS) == [40, 80, 120, 160, 200]


def test_sgdr_wrn28_10():
    cfg = compose_config("experiment=sgdr_wrn28_10_c10")
    assert (cfg.model.depth, cfg.model.widen_factor, cfg.scheduler.eta_max) == (28, 10, 0.05)
    assert epochs_of_snapshots(cfg, 391) == [10, 30, 70, 150]


def test_preset_driver_runs_sweeps_then_the_report(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_preset.py"), "se_resnet110_c10",
                             "se_resnet110_c10_single", "--seeds", "0,1", "--out", str(tmp_path), "--dry-run", "--",
                             "data=imagefolder", "data.root=DIR"], capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, ["se_resnet110_c10", "se_resnet110_c10_single"]):
        assert line.split()[1:] == ["-m", "snapens.train", "-m", f"experiment={name}", "trainer.seed=0,1",
                                    f"hydra.sweep.dir={tmp_path / name}", "data=imagefolder", "data.root=DIR"]
    assert lines[2].split()[1:] == ["-m", "snapens.report", str(tmp_path / "se_resnet110_c10"),
                                    str(tmp_path / "se_resnet110_c10_single"), "--out", str(tmp_path)]
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_preset.py"), "table9"], capture_output=True,
                         text=True, timeout=HANG)
    assert bad.returncode == 1 and "no preset table9; choose from:" in bad.stderr


def test_slurm_launcher_config():
    cfg = compose_config("hydra/launcher=slurm_gpu", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.signal_delay_s) == (1, 1, 120)
