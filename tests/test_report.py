"""`python -m snapens.report`: a real multirun summarised against numbers recomputed from its files, exact
arithmetic on hand-made runs, and one clear line for every bad input."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from snapens.errors import SnapensError
from snapens.report import main, report

from conftest import EQUAL_CYCLES_2, HANG, run_cli, says

PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_run(path: Path, single: float | None, ensemble: float = 0.0, overrides: tuple[str, ...] = (),
             members: int = 3, seconds: float | None = 1.0) -> Path:
    """A run dir as snapens.train leaves it; single=None: unfinished (no results.json yet)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if single is not None:
        last = {"file": f"cycle_{members:02d}.safetensors", "name": f"cycle_{members:02d}", "cycle": members,
                "step": 10, "acc": single, "nll": 1.0, "ece": 0.1}
        results = {"split": "test", "num_images": 100, "rule": "logits", "snapshots": [last], "single": last,
                   "ensemble": {"acc": ensemble, "nll": 0.9, "ece": 0.1, "rule": "logits",
                                "members": [f"cycle_{i + 1:02d}.safetensors" for i in range(members)]}}
        if seconds is not None:
            results["training"] = {"steps": 10, "seconds": seconds, "compile_seconds": 0.0, "device": "cpu",
                                   "precision": "fp32", "compiled": False}
        (path / "results.json").write_text(json.dumps(results))
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- a real sweep ------------------------------------------------------------------------------------------------
def test_multirun_round_trip(tmp_path):
    """Train a 2 x 2 sweep (eta_max x seed), report on it, and check every number against the jobs' files."""
    overrides = [*EQUAL_CYCLES_2, "scheduler.eta_max=0.1,0.05", "trainer.seed=0,1",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run([sys.executable, "-m", "snapens.train", "-m", *overrides], cwd=tmp_path, check=True,
                   capture_output=True, timeout=HANG)
    done = subprocess.run([sys.executable, "-m", "snapens.report", "sweep"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""

    expected = {}  # eta_max -> the jobs' results, read here without the tool's code
    for job in sorted((tmp_path / "sweep").glob("[0-9]*")):
        lines = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
        eta = next(line.split("=")[1] for line in lines if "scheduler.eta_max=" in line)
        expected.setdefault(eta, []).append(json.loads((job / "results.json").read_text()))
    assert sorted(expected) == ["0.05", "0.1"] and all(len(v) == 2 for v in expected.values())

    rows = read_csv(tmp_path / "sweep" / "report.csv")
    assert len(rows) == 2
    for row in rows:
        assert "trainer.seed" not in row["config"]
        eta = next(o.split("=")[1] for o in row["config"].split() if o.startswith("scheduler.eta_max="))
        single = np.array([r["single"]["acc"] for r in expected[eta]])
        ensemble = np.array([r["ensemble"]["acc"] for r in expected[eta]])
        seconds = np.array([r["training"]["seconds"] for r in expected[eta]])
        assert int(row["n"]) == 2
        for name, want in [("single_mean", single.mean()), ("single_std", single.std(ddof=1)),
                           ("ensemble_mean", ensemble.mean()), ("ensemble_std", ensemble.std(ddof=1)),
                           ("gain_mean", (ensemble - single).mean()), ("seconds_mean", seconds.mean())]:
            assert float(row[name]) == pytest.approx(want, rel=1e-12, abs=1e-15), name
        assert row["snapshots_min"] == row["snapshots_max"] == "2"  # T_0=1 epoch, 2 epochs: 2 cycles
    table = (tmp_path / "sweep" / "report.md").read_text()
    assert "| scheduler.eta_max=0.1 " in table and "| scheduler.eta_max=0.05 " in table
    assert (tmp_path / "sweep" / "report.png").read_bytes().startswith(PNG)
    assert "scheduler.eta_max=0.05" in done.stdout


# ---- hand-made runs ----------------------------------------------------------------------------------------------
def test_arithmetic_and_grouping(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", 0.50, 0.60, ("scheduler=sgdr", "trainer.seed=0"), members=3, seconds=10.0)
    make_run(sweep / "1", 0.70, 0.90, ("trainer.seed=1", "scheduler=sgdr"), members=4, seconds=None)  # old run
    make_run(sweep / "2", 0.25, 0.30, ("trainer.seed=0", "hydra.launcher.timeout_min=5"), seconds=None)
    make_run(sweep / "10", 0.40, 0.45, ("scheduler=sgdr", "trainer.seed=2", "model=wrn16_4"), seconds=3.0)

    code, out, err = run_main(capsys, str(sweep))
    assert (code, err) == (0, "")
    rows = {r["config"]: r for r in read_csv(sweep / "report.csv")}
    assert list(rows) == ["scheduler=sgdr", "(defaults)", "model=wrn16_4 scheduler=sgdr"]  # job order, 10 last
    sgdr = rows["scheduler=sgdr"]
    assert int(sgdr["n"]) == 2
    assert float(sgdr["single_mean"]) == pytest.approx(0.6)
    assert float(sgdr["single_std"]) == pytest.approx(statistics.stdev([0.5, 0.7]))  # 0.1414: n - 1
    assert float(sgdr["ensemble_mean"]) == pytest.approx(0.75)
    assert float(sgdr["ensemble_std"]) == pytest.approx(0.15 * 2 ** 0.5)
    assert float(sgdr["gain_mean"]) == pytest.approx(0.15)  # paired: (0.1 + 0.2) / 2
    assert (sgdr["snapshots_min"], sgdr["snapshots_max"]) == ("3", "4")
    assert float(sgdr["seconds_mean"]) == 10.0  # the run without "training" has no wall time
    assert rows["(defaults)"]["single_std"] == "" and rows["(defaults)"]["seconds_mean"] == ""

    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert lines["scheduler=sgdr"] == ["2", "60.00 ± 14.14", "75.00 ± 21.21", "+15.00", "-", "-", "3-4", "10.0"]
    assert lines["(defaults)"] == ["1", "25.00 ± -", "30.00 ± -", "+5.00", "-", "-", "3", "-"]
    assert lines["model=wrn16_4 scheduler=sgdr"][-1] == "3.0"
    md = (sweep / "report.md").read_text()
    assert f"Runs (4): {sweep / '0'}, {sweep / '1'}, {sweep / '2'}, {sweep / '10'}" in md
    assert (sweep / "report.png").read_bytes().startswith(PNG)


def test_validation_and_chosen_columns_and_what_the_spread_is(tmp_path, capsys):
    for i, (val, greedy) in enumerate([(0.62, 0.58), (0.66, 0.60)]):
        run = make_run(tmp_path / "v" / str(i), 0.55, 0.57, (f"trainer.seed={i}",))
        results = json.loads((run / "results.json").read_text())
        results["val"] = {"single": {"acc": 0.6}, "ensemble": {"acc": val}}
        results["chosen"] = {"by": "validation NLL", "greedy": {"members": ["cycle_03"], "test": {"acc": greedy}}}
        (run / "results.json").write_text(json.dumps(results))
    code, out, _ = run_main(capsys, str(tmp_path / "v"))
    row = read_csv(tmp_path / "v" / "report.csv")[0]
    assert code == 0 and float(row["val_ensemble_mean"]) == pytest.approx(0.64)
    assert float(row["greedy_std"]) == pytest.approx(statistics.stdev([0.58, 0.60]))
    assert "|     64.00 ± 2.83 | 59.00 ± 1.41 |" in out
    assert "± is the sample standard deviation over a config's runs (seeds)" in out


def test_shared_overrides_said_once(tmp_path, capsys):
    for i, eta in enumerate(["0.1", "0.2"]):
        make_run(tmp_path / "m" / str(i), 0.5, 0.6, ("data=synthetic", f"scheduler.eta_max={eta}"))
    code, out, _ = run_main(capsys, str(tmp_path / "m"))
    assert code == 0
    assert "Overrides shared by all configs: `data=synthetic`" in out
    assert "| scheduler.eta_max=0.1 " in out
    assert read_csv(tmp_path / "m" / "report.csv")[0]["config"] == "data=synthetic scheduler.eta_max=0.1"


def test_run_dirs_and_out(tmp_path, capsys, monkeypatch):
    """Run dirs from anywhere write to the current directory, --out elsewhere; the seed key can be changed."""
    a = make_run(tmp_path / "a", 0.5, 0.6, ("data.subset_seed=1",))
    b = make_run(tmp_path / "b", 0.7, 0.8, ("data.subset_seed=2",))
    monkeypatch.chdir(tmp_path)
    assert run_main(capsys, str(a), str(b))[0] == 0
    assert [r["config"] for r in read_csv(tmp_path / "report.csv")] == ["data.subset_seed=1", "data.subset_seed=2"]
    assert run_main(capsys, str(a), str(b), "--out", "o", "--group-by-seed-key", "data.subset_seed")[0] == 0
    assert [r["n"] for r in read_csv(tmp_path / "o" / "report.csv")] == ["2"]


def test_unfinished_run_is_skipped_with_a_warning(tmp_path, capsys):
    make_run(tmp_path / "s" / "0", 0.5, 0.6, ("trainer.seed=0",))
    make_run(tmp_path / "s" / "1", None, overrides=("trainer.seed=1",))
    (tmp_path / "s" / "notes").mkdir()  # not a run dir: ignored
    code, out, err = run_main(capsys, str(tmp_path / "s"))
    assert code == 0
    unfinished = tmp_path / "s" / "1"
    assert err.splitlines() == [f"snapens: warning: skipping 1 unfinished runs (no results.json): {unfinished}"]
    assert [r["n"] for r in read_csv(tmp_path / "s" / "report.csv")] == ["1"]


@pytest.mark.parametrize("layout", ["unfinished", "empty"])
def test_no_finished_run_is_one_line(tmp_path, capsys, layout):
    if layout == "unfinished":
        make_run(tmp_path / "s" / "0", None)
    else:
        (tmp_path / "s").mkdir()
    code, out, err = run_main(capsys, str(tmp_path / "s"))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"snapens: error: no finished run in {tmp_path / 's'}")
    assert not (tmp_path / "s" / "report.md").exists()


@pytest.mark.parametrize("content", ["{\"single\": {\"acc\": 0.5", "{}", "[1, 2]", "\xff\xfe"])
def test_corrupt_results_is_one_line(tmp_path, capsys, content):
    make_run(tmp_path / "s" / "0", 0.5, 0.6)
    bad = make_run(tmp_path / "s" / "1", 0.5, 0.6) / "results.json"
    bad.write_bytes(content.encode("latin-1"))
    code, out, err = run_main(capsys, str(tmp_path / "s"))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"snapens: error: cannot read {bad}: ")


def test_missing_path_is_one_line(tmp_path, capsys):
    code, _, err = run_main(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("snapens: error: ")
    says(err, str(tmp_path / "nowhere"), "give run dirs or a multirun dir")


def test_report_returns_rows(tmp_path, capsys):
    make_run(tmp_path / "r", 0.5, 0.75)
    rows = report([tmp_path / "r"], tmp_path / "out")
    assert rows[0]["single"] == (0.5, None) and rows[0]["gain"] == (0.25, None)
    assert rows[0]["config"] == "(defaults)"


def test_tuning_sweep_in_a_date_dir_reads_test_once(tmp_path, capsys):
    """An Optuna sweep found through its date dir: the table shows validation numbers, the chosen trial's test
    numbers appear once; parameters match however YAML spells them (5e-05 is a string to YAML)."""
    sweep = tmp_path / "2026-11-30" / "10-00-00"
    for job, (eta, val, test) in enumerate([("5e-05", 0.80, 0.70), ("0.1", 0.60, 0.90)]):
        run = make_run(sweep / str(job), 0.5, test, (f"scheduler.eta_max={eta}",))
        results = json.loads((run / "results.json").read_text())
        results["val"] = {"single": {"acc": val - 0.1}, "ensemble": {"acc": val}}
        (run / "results.json").write_text(json.dumps(results))
    (sweep / "optimization_results.yaml").write_text("name: optuna\nbest_params:\n  scheduler.eta_max: 5.0e-05\n"
                                                      "best_value: 0.8\n")
    code, out, err = run_main(capsys, str(tmp_path / "2026-11-30"), f"out={tmp_path / 'r'}")
    assert (code, err) == (0, "")
    rows = read_csv(tmp_path / "r" / "report.csv")
    assert sorted(float(r["ensemble_mean"]) for r in rows) == [0.6, 0.8]  # validation, not test
    assert "chosen on validation by optuna: scheduler.eta_max=5e-05 (validation ensemble 80.00%" in out
    assert "its test accuracy, read once: single 50.00%, ensemble 70.00%" in out
    assert "90.00" not in out  # the other trial's test number is never shown


def test_report_refuses_a_results_json_with_nan(tmp_path):
    from snapens.report import read_run
    (tmp_path / "results.json").write_text(json.dumps({"single": {"acc": float("nan")}, "ensemble": {
        "acc": 0.5, "members": ["a"]}}))
    with pytest.raises(SnapensError, match="cannot read .*results.json: ValueError: accuracies nan and 0.5"):
        read_run(tmp_path, "trainer.seed")


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
