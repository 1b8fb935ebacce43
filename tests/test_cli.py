"""snapens.cli and the entry points' shared behaviour: jobs return validation numbers, a sweeper may not tune on test
(the Optuna example tunes on validation), a refused config leaves no run dir, a stop signal at start-up is one line,
--help lists every option."""


import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from snapens.training import train

from conftest import CONF, EQUAL_CYCLES_2, FAST, HANG, run_cli


def test_a_stop_signal_during_start_up_is_one_line(tmp_path):
    import signal
    import time
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "snapens.train", *EQUAL_CYCLES_2, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not run_dir.exists() and process.poll() is None:  # Hydra has composed the config and made the dir
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=HANG)
    assert process.returncode == 143 and len(stderr.strip().splitlines()) == 1, stderr  # 128 + 15, as a shell says
    assert stderr.startswith("snapens: stopped by SIGTERM")


@pytest.mark.parametrize("name, status, resumable", [("SIGINT", 130, False), ("SIGTERM", 143, False),
                                                     ("SIGHUP", 129, False), ("SIGUSR1", 75, True)])
def test_a_stop_outside_training_says_whether_there_is_a_checkpoint(tmp_path, monkeypatch, capsys, name, status,
                                                                     resumable):
    import os
    import signal

    from snapens import cli
    if resumable:  # a run dir with a checkpoint to continue from: the stop is a pause (EX_TEMPFAIL, requeue)
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["snapens.train", f"hydra.run.dir={tmp_path}"])
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                                              signal.SIGUSR2)}
    try:  # as in a terminal, even when the tests run under nohup (SIGHUP ignored) or in the background (SIGINT)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(SystemExit) as stop:
            cli.run(lambda: os.kill(os.getpid(), signal.Signals[name]))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert stop.value.code == status
    said = "; the same command continues from the run dir's checkpoint" if resumable else ""
    assert capsys.readouterr().err.splitlines() == [f"snapens: stopped by {name} outside training{said}"]


def test_a_signal_ignored_at_start_stays_ignored(monkeypatch):
    """Under nohup SIGHUP is ignored: snapens keeps it so (a logout must not stop the run), in start-up and in
    training."""
    import signal

    from snapens import cli
    from snapens.checkpoint import stop_requests
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)}
    monkeypatch.setattr(sys, "argv", ["snapens.train"])
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        cli.run(lambda: None)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        with stop_requests():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


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
    """README's experiment=tune_demo at a smaller size, with the README's way to set the number of trials and the
    search space: 2 trials on validation, then report reads the chosen trial's test numbers once."""
    sweep = tmp_path / "tune"
    done = run_cli("snapens.train", "-m", "experiment=tune_demo", "hydra.sweeper.n_trials=2", "trainer.epochs=2",
                   "scheduler.cycles=choice(1,2)", "scheduler.eta_max=interval(0.05,0.1)", "trainer.num_threads=1",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for job in ("0", "1"):  # each trial drawn from the search space given on the command line
        config = OmegaConf.load(sweep / job / ".hydra" / "config.yaml")
        assert config.scheduler.cycles in (1, 2) and 0.05 <= config.scheduler.eta_max <= 0.1
    said = done.stdout + done.stderr
    assert "alembic" not in said and "\x1b[" not in said and "A new study created" not in said  # no library noise
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
    late = run_cli("snapens.train", *FAST, "trainer.epochs=1e30", f"hydra.run.dir={tmp_path / 'late'}", cwd=tmp_path)
    assert late.returncode == 2 and "lower trainer.epochs" in late.stderr  # refused after the run dir's lock
    assert not (tmp_path / "late").exists()  # its lock file and log removed with the dir
    (tmp_path / "exp").mkdir()  # a folder of the user's own stays, even empty
    run_cli("snapens.train", *FAST, "trainer.epochs=-1", f"hydra.run.dir={tmp_path / 'exp' / 'run1'}", cwd=tmp_path)
    assert (tmp_path / "exp").is_dir() and not (tmp_path / "exp" / "run1").exists()
    kept = tmp_path / "mine"  # a dir that holds anything else is never touched
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    run_cli("snapens.train", *FAST, "trainer.epochs=-1", f"hydra.run.dir={kept}", cwd=tmp_path)
    assert (kept / "notes.txt").read_text() == "mine"


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


# ---- preemption through hydra-submitit-launcher ---------------------------------------------------------------------
def task_processes(sweep) -> list[int]:
    """The submitit job processes of this sweep (python -m submitit.core._submit <sweep>/.submitit/<job>)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and any(str(sweep).encode() in c for c in command):
            found.append(int(proc.name))
    return found


def test_a_job_preempted_through_the_submitit_launcher_is_requeued_and_resumes_bit_identical(tmp_path):
    """Issue 23: the launcher's preemption signal (SIGUSR2) mid-training: snapens writes its checkpoint at once and
    hands the signal to submitit's handler, which requeues the job; the requeued job resumes from its run dir and
    the sweep ends with both jobs' results, snapshots bit-identical to runs never stopped."""
    import signal
    import time
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra (in dev)")
    from snapens.snapshots import list_snapshots
    overrides = [*FAST, "scheduler=sgdr", "scheduler.T_0=1", "scheduler.T_mult=2", "trainer.epochs=7",
                 "trainer.batch_size=16", "trainer.log_every=1"]
    sweep = tmp_path / "sweep"
    process = subprocess.Popen([sys.executable, "-m", "snapens.train", "-m", "hydra/launcher=submitit_local",
                                "hydra.launcher.timeout_min=60", *overrides, "trainer.seed=0,1",
                                f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG
    while not any((sweep / job / "metrics.jsonl").exists() for job in ("0", "1")) and time.monotonic() < deadline:
        time.sleep(0.02)  # an epoch done: training, and its signal handling, is under way
    for pid in task_processes(sweep):
        os.kill(pid, signal.SIGUSR2)
    _, stderr = process.communicate(timeout=HANG)
    assert process.returncode == 0, stderr[-3000:]
    logs = "".join((sweep / job / "train.log").read_text() for job in ("0", "1"))
    assert "stopped by SIGUSR2" in logs and "resuming" in logs  # preempted, requeued, resumed
    for seed in (0, 1):
        alone = tmp_path / f"alone{seed}"
        done = run_cli("snapens.train", *overrides, f"trainer.seed={seed}", f"hydra.run.dir={alone}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert [p.read_bytes() for p in list_snapshots(sweep / str(seed))] == \
            [p.read_bytes() for p in list_snapshots(alone)]


# Run an entry point in this interpreter, then say whether it imported torch: Hydra parses and checks the command
# line first, and each entry point imports its job (torch, the models) only once the command line holds.
WITHOUT_TORCH = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("command", ["snapens.train", "snapens.ensemble", "snapens.export", "snapens.distill",
                                     "snapens.lr_find", "snapens.report"])
def test_help_and_a_misspelt_key_answer_before_torch_is_imported(command, tmp_path):
    """Issue 25, item 6: `--help` and a config error need no torch (seconds on a loaded machine)."""
    helped = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, command, "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=HANG)
    assert f"python -m {command}" in helped.stdout and helped.stdout.endswith("torch imported: False\n"), helped
    if command == "snapens.report":  # argparse, no config
        return
    typo, meant = ("batch_sise", "batch_size") if command in ("snapens.ensemble", "snapens.export") else \
        ("trainer.epochz", "trainer.epochs")
    wrong = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, command, f"{typo}=8"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=HANG)
    assert wrong.stderr.startswith(f"snapens: error: {typo} ") and f"did you mean {meant}?" in wrong.stderr
    assert wrong.stdout == "exit 2\ntorch imported: False\n" and not (tmp_path / "outputs").exists()


def test_two_of_hydras_modes_at_once_is_one_line(tmp_path):
    done = run_cli("snapens.train", "-m", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("snapens: error: Only one of --run, --multirun, --cfg")
    assert done.stderr.strip().endswith("drop all but one of them") and len(done.stderr.strip().splitlines()) == 1
