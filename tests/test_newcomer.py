"""The newcomer's path: one sweep across schedulers, jobs that return validation numbers (and a sweeper that may
not tune on test), paths printed and no run dir left by a refused config, clipping you are told about, an honest
lr_find, the extras, and --help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from snapens import build, tensorboard_log
from snapens.errors import SnapensError
from snapens.schedules import CosineCycles, geometric_lengths
from snapens.snapshots import snapshot_steps
from snapens.train import train

from conftest import CONF, EQUAL_CYCLES_2, FAST


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# ---- scheduler.cycles: one budget, one number of snapshots, every schedule ----------------------------------------
def test_cross_scheduler_sweep(tmp_path):
    """The README's comparison: one command, every schedule with 2 snapshots over the same 2-epoch budget (3 steps
    per epoch once 64 of the 256 images are held out), each job returning its validation ensemble accuracy."""
    sweep = tmp_path / "sweep"
    done = run_cli("snapens.train", "-m", *FAST, "scheduler=sgdr,snapshot,cosine,step,cyclic", "scheduler.cycles=2",
                   "trainer.epochs=2", "data.val_size=64", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(f"snapens: sweep dir {sweep}") == 2  # at the start and at the end
    expected = {"sgdr": [2, 6], "snapshot": [3, 6], "cosine": [3, 6], "step": [3, 6], "cyclic": [3, 6]}
    for job in range(5):
        run = sweep / str(job)
        name = (run / ".hydra" / "config.yaml").read_text().split("scheduler:\n  name: ")[1].split()[0]
        results = json.loads((run / "results.json").read_text())
        assert [s["step"] for s in results["snapshots"]] == expected[name], name
        assert results["val"]["split"] == "val" and results["val"]["num_images"] == 64
        assert f"returned to Hydra: the ensemble's val accuracy, {results['val']['ensemble']['acc']:.4f}" in done.stdout
        assert done.stdout.count(f"run dir {run}") == 2  # the job's start and end


def test_geometric_lengths_fill_the_budget(make_cfg):
    assert geometric_lengths(48, 4, 2) == (3, 7, 12, 26)  # ends round(48 * (1, 3, 7, 15) / 15)
    assert geometric_lengths(12, 3, 1) == (4, 4, 4)
    assert sum(geometric_lengths(18573, 4, 2)) == 18573
    with pytest.raises(ValueError, match=r"cycles=5 with T_mult=3 leaves a first cycle shorter"):
        geometric_lengths(20, 5, 3)
    cfg = make_cfg(*FAST, "scheduler=sgdr", "scheduler.cycles=5", "scheduler.T_mult=3", "trainer.epochs=5")
    with pytest.raises(SnapensError, match=r"scheduler.cycles=5 with T_mult=3 leaves a first cycle shorter"):
        build.build_schedule(cfg.scheduler, 5, 4)


@pytest.mark.parametrize("name, extra, lengths", [
    ("sgdr", [], (3, 7, 12, 26)), ("adaptive_sgdr", ["data.val_size=10"], (3, 7, 12, 26)),
    ("snapshot", [], (12, 12, 12, 12)), ("cyclic", [], (12, 12, 12, 12)),
    ("fge", ["scheduler.cycle_length=0.4"], (30, 6, 6, 6))])  # 4.8 steps, rounded up to 6; ordinary training 27
def test_cycles_key_sets_every_cyclic_schedule(make_cfg, name, extra, lengths):
    cfg = make_cfg(f"scheduler={name}", "scheduler.cycles=4", "trainer.epochs=4", *extra)
    schedule = build.build_schedule(cfg.scheduler, 4, 12)
    ends = schedule.cycle_ends()
    assert tuple(b - a for a, b in zip([0, *ends], ends)) == lengths
    assert schedule.total_steps == 48
    if name in ("sgdr", "adaptive_sgdr"):
        assert isinstance(schedule, CosineCycles) and schedule.lr(47) < schedule.lr(26)


@pytest.mark.parametrize("name", ["cosine", "step", "constant", "onecycle"])
def test_cycles_key_spaces_snapshots_of_one_shot_schedules(make_cfg, name):
    cfg = make_cfg(f"scheduler={name}", "scheduler.cycles=3", "trainer.epochs=4")
    schedule = build.build_schedule(cfg.scheduler, 4, 10)
    assert snapshot_steps(schedule, 0, cfg.scheduler.cycles) == [13, 26, 40]  # k * 40 // 3
    assert snapshot_steps(schedule) == [40]


def test_step_milestones_are_fractions_of_the_budget(make_cfg):
    cfg = make_cfg("scheduler=step", "trainer.epochs=4")
    schedule = build.build_schedule(cfg.scheduler, 4, 10)
    assert [schedule.lr(t) for t in (19, 20, 29, 30)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


@pytest.mark.parametrize("overrides, message", [
    (["scheduler=cyclic", "scheduler.cycles=5"], "scheduler.cycles=5 does not split the budget of 48 steps"),
    (["scheduler=sgdr", "scheduler.cycles=49"], "scheduler.cycles=49 exceeds the budget's 48 steps"),
    (["scheduler=cosine", "scheduler.cycles=0"], "scheduler.cycles=0 must be a finite number > 0"),
    (["scheduler=cosine", "scheduler.cycles=2", "trainer.snapshot_every=1"],
     "scheduler.cycles=2 and trainer.snapshot_every=1.0 both say where snapshots go"),
    (["scheduler=snapshot", "scheduler.cycles=null"], "scheduler.cycles=None"),
])
def test_cycles_key_errors(make_cfg, overrides, message):
    from snapens.config import check_config
    cfg = make_cfg(*overrides, "trainer.epochs=4")
    with pytest.raises(SnapensError, match=message.replace(".", r"\.")):
        check_config(cfg)
        build.build_schedule(cfg.scheduler, 4, 12)


# ---- tuning on validation, never on test -----------------------------------------------------------------------
def test_job_returns_validation_accuracy(make_cfg, tmp_path):
    returned = train(make_cfg(*EQUAL_CYCLES_2, "data.val_size=64"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert returned == results["val"]["ensemble"]["acc"]
    assert results["val"]["num_images"] == 64 and results["num_images"] == 128  # the test numbers stay
    assert train(make_cfg(*EQUAL_CYCLES_2, "data.val_size=64"), tmp_path) == returned  # the finished run: same


def test_sweeper_may_not_tune_on_test(tmp_path):
    done = run_cli("snapens.train", "-m", *EQUAL_CYCLES_2, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                   "scheduler.eta_max=interval(0.05,0.1)", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert done.returncode == 2
    assert ("OptunaSweeper optimises what each job returns, which without a validation split is the test accuracy"
            in done.stderr)
    assert not (tmp_path / "s" / "0").exists()  # refused before any run dir was kept


@pytest.mark.slow
def test_optuna_example_tunes_on_validation(tmp_path):
    """README's experiment=tune_demo at a smaller size: 2 trials on validation, then report reads the chosen
    trial's test numbers once."""
    sweep = tmp_path / "tune"
    done = run_cli("snapens.train", "-m", "experiment=tune_demo", "hydra.sweeper.n_trials=2", "trainer.epochs=2",
                   "trainer.num_threads=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    best = (sweep / "optimization_results.yaml").read_text()
    vals = {json.loads((sweep / j / "results.json").read_text())["val"]["ensemble"]["acc"] for j in ("0", "1")}
    assert f"best_value: {max(vals)}" in best
    shown = run_cli("snapens.report", str(sweep), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    chosen = [line for line in shown.stdout.splitlines() if line.startswith("chosen on validation by optuna")]
    assert len(chosen) == 1 and f"validation ensemble {100 * max(vals):.2f}%" in chosen[0]
    assert "Accuracies on the validation split" in shown.stdout  # the trials' table: no test number but the chosen
    rows = (sweep / "report.csv").read_text().splitlines()[1:]
    assert sorted(float(row.split(",")[4]) for row in rows) == sorted(vals)  # ensemble_mean: validation


# ---- where things go ---------------------------------------------------------------------------------------------
def test_refused_config_leaves_no_run_dir(tmp_path):
    done = run_cli("snapens.train", *FAST, "trainer.epochs=-1", f"hydra.run.dir={tmp_path / '2026-11-30' / 'run'}",
                   cwd=tmp_path)
    assert done.returncode == 2 and "trainer.epochs=-1.0 must be a finite number > 0" in done.stderr
    assert not (tmp_path / "2026-11-30").exists()  # the default layout's date folder, left empty: removed too
    (tmp_path / "exp").mkdir()  # a folder of the user's own stays, even empty
    run_cli("snapens.train", *FAST, "trainer.epochs=-1", f"hydra.run.dir={tmp_path / 'exp' / 'run1'}", cwd=tmp_path)
    assert (tmp_path / "exp").is_dir() and not (tmp_path / "exp" / "run1").exists()
    kept = tmp_path / "mine"  # a dir that holds anything else is never touched
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    run_cli("snapens.train", *FAST, "trainer.epochs=-1", f"hydra.run.dir={kept}", cwd=tmp_path)
    assert (kept / "notes.txt").read_text() == "mine"


def test_report_takes_a_date_dir_and_out(tmp_path):
    day = tmp_path / "multirun" / "2026-11-30"
    for sweep in ("10-00-00", "11-00-00"):
        done = run_cli("snapens.train", "-m", *EQUAL_CYCLES_2, "trainer.seed=0", f"hydra.sweep.dir={day / sweep}",
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    shown = run_cli("snapens.report", str(day), f"out={tmp_path / 'report'}", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[1] == "2"  # one config, both sweeps' runs


# ---- clipping you are told about ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clip, mode, rate", [(1e-6, "norm", 1.0), (1e6, "norm", 0.0), (0, "norm", None),
                                              (1e-6, "value", None)])
def test_clip_rate_in_metrics(make_cfg, tmp_path, caplog, clip, mode, rate):
    train(make_cfg(*EQUAL_CYCLES_2, f"trainer.grad_clip={clip}", f"trainer.clip_mode={mode}"), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["clip_rate"] for line in lines] == [rate, rate]
    assert all(0 < line["grad_norm"] < float("inf") for line in lines)
    warned = [r for r in caplog.records if "of epoch 1's updates were clipped" in r.getMessage()]
    assert len(warned) == (rate == 1.0)


def test_tensorboard_is_an_extra(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SnapensError, match=r"logger=tensorboard needs the tensorboard package: pip install -e "
                                           r"'\.\[tensorboard\]'"):
        train(make_cfg(*EQUAL_CYCLES_2, "logger=tensorboard"), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ---- --help -------------------------------------------------------------------------------------------------------
def test_help_lists_every_option(tmp_path):
    shown = run_cli("snapens.train", "--help", cwd=tmp_path).stdout
    assert "schema" not in shown and "Examples:" in shown
    groups: dict[str, list[str]] = {}
    for line in shown.split("Groups (")[1].split("\n\n")[0].splitlines()[1:]:
        if line[2] != " ":  # "  group  option option": a group; a deeper indent continues the one before
            group, line = line.split(maxsplit=1)
        groups.setdefault(group, []).extend(line.split())
    assert sorted(groups) == ["data", "experiment", "logger", "model", "optimizer", "scheduler"]
    for group, listed in groups.items():
        assert sorted(listed) == sorted(p.stem for p in (CONF / group).glob("*.yaml")), group
    ensemble = run_cli("snapens.ensemble", "--help", cwd=tmp_path).stdout
    keys = ensemble.split("Keys (conf/ensemble.yaml says what each means):\n")[1].split("\n\n")[0].split()
    assert sorted(keys) == sorted(line.split(":")[0] for line in (CONF / "ensemble.yaml").read_text().splitlines()
                                  if line and line[0].isalpha() and ":" in line and not line.startswith(
                                      ("defaults", "hydra")))
    assert "scheduler" not in ensemble
