"""LR range test (arXiv 1506.01186): the exponential sweep, the early stop, the suggestion rule and the CLI."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import snapens.lr_range as lr_range
from snapens.errors import SnapensError

from conftest import FAST, HANG, compose_config, says

OVERRIDES = re.compile(r"^scheduler\.eta_max=(\S+) scheduler\.eta_min=(\S+)$", re.MULTILINE)


def lr_find_cfg(*overrides: str):
    """The config `python -m snapens.lr_find overrides...` would run with."""
    return compose_config(*overrides, name="lr_find")


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapens.lr_find", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG)


def test_composes_the_training_groups_and_types_its_block():
    cfg = lr_find_cfg(*FAST, "optimizer=adamw", "trainer.grad_clip=0.5", "lr_find.num_steps=7")
    assert cfg.data.name == "synthetic" and cfg.optimizer.name == "adamw" and cfg.trainer.grad_clip == 0.5
    assert dict(cfg.lr_find) == {"start_lr": 1e-7, "end_lr": 10.0, "num_steps": 7, "smoothing": 0.98,
                                 "diverge_factor": 4.0}
    with pytest.raises(Exception, match="num_step"):
        lr_find_cfg("lr_find.num_step=7")  # a misspelt key is rejected, as in training


def test_lr_sequence_is_exponential_and_reaches_the_optimizer(monkeypatch, tmp_path):
    """lr(i) = start * (end / start) ** (i / (n - 1)) for every step, in every param group when the update runs."""
    seen = []
    real_step = lr_range.train_step

    def recording_step(model, optimizer, *args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return real_step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(lr_range, "train_step", recording_step)
    start, end, n = 1e-5, 1e-2, 12
    cfg = lr_find_cfg(*FAST, "optimizer.decay_bn_and_bias=false", f"lr_find.start_lr={start}",
                      f"lr_find.end_lr={end}", f"lr_find.num_steps={n}", "lr_find.diverge_factor=1000")
    result = lr_range.find_lr(cfg, tmp_path)
    expected = [start * (end / start) ** (i / (n - 1)) for i in range(n)]
    assert not result["stopped_early"] and result["lrs"] == expected
    assert len(seen) == n and all(len(groups) == 2 and groups == [lr, lr] for groups, lr in zip(seen, expected))
    assert expected[0] == start and expected[-1] == pytest.approx(end, rel=1e-12)
    ratios = [b / a for a, b in zip(expected, expected[1:])]
    assert ratios == pytest.approx([(end / start) ** (1 / (n - 1))] * (n - 1), rel=1e-12)


def test_stops_early_when_the_loss_explodes(tmp_path):
    n = 60
    cfg = lr_find_cfg(*FAST, "lr_find.start_lr=1e-3", "lr_find.end_lr=1e6", f"lr_find.num_steps={n}")
    result = lr_range.find_lr(cfg, tmp_path)
    smoothed = result["smoothed"]
    assert result["stopped_early"] and len(result["lrs"]) < n and len(smoothed) == len(result["lrs"])
    best_before, last = min(smoothed[:-1]), (result["losses"][-1], smoothed[-1])
    assert any(not math.isfinite(v) or v > 4 * best_before for v in last)  # the step that stopped it, raw or smoothed
    assert all(max(loss, s) <= 4 * min(smoothed[:i + 1])  # and none before
               for i, (loss, s) in enumerate(zip(result["losses"][:-1], smoothed[:-1])))
    assert "loss" in result["stop_reason"] and result["blowup_step"] == len(smoothed) - 1
    assert result["suggestion"]["eta_max"] <= result["lrs"][-1] / 10  # a tenth of the blow-up's lr at most
    assert json.loads((tmp_path / "lr_find.json").read_text())["stopped_early"] is True


def test_a_raw_blow_up_stops_the_sweep_before_the_lagging_average_does():
    """Smoothing 0.98 lags many steps behind one exploding update: the raw loss alone stops the sweep, and the
    suggestion stays below a tenth of the lr where it blew up."""
    losses = iter([2.3 - 0.02 * i for i in range(40)] + [9.0] * 10)  # falls for 40 updates, then explodes
    lrs = [10.0 ** (-5 + 0.125 * i) for i in range(50)]
    result = lr_range.sweep(lambda x, y: next(losses), torch.optim.SGD([torch.zeros(1)], lr=0.1), iter([(0, 0)] * 50),
                           lrs, smoothing=0.98, diverge_factor=4.0)
    assert result["blowup_step"] == 40 and result["stop_reason"].startswith("at step 40 (lr 1) the loss 9")
    assert result["smoothed"][-1] < 4 * min(result["smoothed"][:-1])  # the average alone would have gone on
    s = lr_range.suggest(result["lrs"], result["smoothed"], 4, result["blowup_step"])
    assert s["eta_max"] <= lrs[40] / 10 and s["min_step"] < 40


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    """Half-decade spacing: np.gradient's central slope is (loss[i+1] - loss[i-1]) / 1 decade."""
    lrs = [10.0 ** (-4 + 0.5 * i) for i in range(12)]
    loss = [2.0, 1.99, 1.95, 1.8, 1.2, 0.9, 0.8, 0.75, 4.0, 2.0, 0.76, 9.0]
    # slopes up to the minimum (step 7): ..., step 3: -0.75, step 4: -0.9, step 5: -0.4, ...; after it, step 9's
    # (0.76 - 4.0) / 1 = -3.24 is steeper but lies past the minimum and must be ignored
    assert int(np.argmin(np.gradient(loss, np.log10(lrs)))) == 9
    s = lr_range.suggest(lrs, loss)
    assert s["steepest_step"] == 4 and s["eta_max"] == lrs[4] and s["eta_min"] == lrs[4] / 100
    assert s["slope_per_decade"] == pytest.approx(-0.9)
    assert s["min_step"] == 7 and s["lr_at_min"] == lrs[7] and s["lr_at_min_over_10"] == lrs[7] / 10


def test_suggestion_skips_the_first_steps_and_stops_at_non_finite_values():
    lrs = [10.0 ** (-4 + 0.5 * i) for i in range(8)]
    noisy = [2.3, 1.6, 2.3, 2.2, 1.9, 1.5, 1.4, float("nan")]  # a noise dip at step 1, then the real descent
    assert lr_range.suggest(lrs, noisy)["steepest_step"] == 0  # one-sided (1.6 - 2.3) / 0.5 = -1.4
    s = lr_range.suggest(lrs, noisy, skip_start=2)
    assert s["steepest_step"] == 4 and s["min_step"] == 6  # slopes -0.2, -0.4, -0.7, -0.5, -0.2 from step 2
    assert lr_range.suggest(lrs, [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 5.0, 9.0]) is None  # never falls


def test_overrides_line_rounds_and_keeps_the_schedulers_keys():
    s = {"eta_max": 0.2134}
    assert lr_range.overrides_line(s, lr_find_cfg("scheduler=sgdr").scheduler) == \
        "scheduler.eta_max=0.21 scheduler.eta_min=0.0021"
    assert lr_range.overrides_line(s, lr_find_cfg("scheduler=onecycle").scheduler) == "scheduler.eta_max=0.21"


@pytest.mark.parametrize("overrides, message", [
    (["lr_find.start_lr=0"], "lr_find.start_lr=0.0 must be a finite number > 0"),
    (["lr_find.end_lr=inf"], "lr_find.end_lr=inf must be a finite number > 0"),
    (["lr_find.start_lr=1", "lr_find.end_lr=0.1"], "lr_find.start_lr=1.0 must be below lr_find.end_lr=0.1"),
    (["lr_find.num_steps=1"], "lr_find.num_steps=1 must be >= 2"),
    (["lr_find.smoothing=1"], "lr_find.smoothing=1.0 must be >= 0 and < 1"),
    (["lr_find.diverge_factor=1"], "lr_find.diverge_factor=1.0 must be > 1"),
])
def test_bad_values_fail_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(SnapensError) as info:
        lr_range.find_lr(lr_find_cfg(*FAST, *overrides), tmp_path / "run")
    assert str(info.value) == message
    assert not (tmp_path / "run").exists()


def test_cli_writes_json_and_png_and_prints_the_overrides(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*FAST, "lr_find.num_steps=30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "lr_find.json").read_text())
    assert {"lrs", "losses", "smoothed", "suggestion", "rule", "stopped_early", "config", "overrides"} <= set(record)
    assert len(record["lrs"]) == len(record["losses"]) == len(record["smoothed"]) <= 30
    assert record["config"]["lr_find"]["num_steps"] == 30 and "lr_find.num_steps=30" in record["config"]["command_line"]
    assert (run_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    eta_max, eta_min = map(float, OVERRIDES.search(result.stdout).groups())
    assert eta_max == float(f"{record['suggestion']['eta_max']:.2g}") and eta_min == pytest.approx(eta_max / 100)
    assert result.stdout.strip().splitlines()[-1] == record["overrides"]
    assert "eta_max / 100" in result.stdout and "eta_max / 100" in record["rule"]
    assert not any(p.suffix in (".safetensors", ".ckpt", ".pt") for p in run_dir.rglob("*"))  # no weights kept


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path):
    result = run_cli(*FAST, "lr_find.start_lr=1", "lr_find.end_lr=0.1", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("snapens: error: ")
    says(result.stderr, "lr_find.start_lr=1.0", "below lr_find.end_lr=0.1")
    assert not (tmp_path / "run" / "lr_find.json").exists()


def test_cli_says_when_the_loss_never_diverged_and_logs_to_its_file(tmp_path):
    """A sweep ending at a small end_lr never blows up: the summary says its minimum is only where it ended and
    suggests 10x the end_lr; the range test runs unclipped unless asked, and lr_find.log holds what was printed."""
    assert lr_find_cfg(*FAST).trainer.grad_clip == 0
    run_dir = tmp_path / "run"
    result = run_cli(*FAST, "lr_find.num_steps=30", "lr_find.end_lr=0.5", "lr_find.diverge_factor=1000",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "lr_find.json").read_text())
    at_end = record["suggestion"]["min_step"] == 29
    warning = ("warning: the loss never diverged up to lr_find.end_lr=0.5, so the blow-up that bounds the useful "
               "range was not seen" + (" and the minimum is only where the sweep ended" if at_end else "")
               + "; run again with lr_find.end_lr=5")
    assert warning in result.stdout
    log = (run_dir / "lr_find.log").read_text()
    assert warning in log and f"run dir {run_dir}" in log
    assert json.loads((run_dir / "lr_find.json").read_text())["config"]["trainer"]["grad_clip"] == 0
