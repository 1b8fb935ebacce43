"""snapens.plan: the plan said before training (budget, cycles, snapshot steps, split sizes) against the schedule,
the short-cycle warning, and trainer.plan_only, which trains nothing and leaves no run dir."""

import subprocess
import sys

from snapens.build import setup
from snapens.plan import plan_lines, short_cycles, snapshot_every
from snapens.snapshots import snapshot_steps
from snapens.training import train

from conftest import DOUBLING_CYCLES_7, HANG, compose_config


def test_the_plan_is_the_schedules():
    cfg = compose_config(*DOUBLING_CYCLES_7, "data.val_size=32")  # SGDR T_0 = 1 epoch (4 updates), T_mult = 2
    s = setup(cfg)
    steps = snapshot_steps(s.schedule, snapshot_every(cfg, s), cfg.scheduler.cycles)
    assert steps == s.schedule.cycle_ends() == [4, 12, 28]
    lines = plan_lines(s.schedule.total_steps, s.steps_per_epoch, s.update_size, steps,
                       {"train": len(s.data.train), "val": len(s.data.val), "test": len(s.data.test)})
    assert lines == ["plan: 28 updates = 7 epochs of 4 updates (64 images each)",
                     "plan: 3 cycles of 4 (1), 8 (2), 16 (4) updates (epochs); snapshots after updates [4, 12, 28]",
                     "plan: 224 train / 32 val / 128 test images"]


def test_short_cycles_are_warned_of_with_the_keys_that_lengthen_them():
    warning = short_cycles([4, 12, 28])
    assert warning.startswith("3 of the 3 cycles are shorter than 100 updates (the shortest: 4)")
    assert all(key in warning for key in ("trainer.epochs", "scheduler.cycles", "scheduler.T_0", "trainer.batch_size"))
    assert short_cycles([40, 150, 300]).startswith("cycle 1 is shorter than 100 updates (the shortest: 40)")
    assert short_cycles([100, 250]) is None


def test_plan_only_trains_nothing(tmp_path, caplog):
    caplog.set_level("INFO")
    assert train(compose_config(*DOUBLING_CYCLES_7, "trainer.plan_only=true"), tmp_path / "run") is None
    assert not (tmp_path / "run").exists()
    assert "plan: 3 cycles of 4 (1), 8 (2), 16 (4) updates" in caplog.text and "shorter than 100" in caplog.text


def test_plan_only_on_the_command_line_leaves_no_run_dir(tmp_path):
    done = subprocess.run([sys.executable, "-m", "snapens.train", *DOUBLING_CYCLES_7, "trainer.plan_only=true",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plan: 28 updates = 7 epochs" in done.stdout + done.stderr and not (tmp_path / "run").exists()
