"""scripts/study.py: one sweep over M and seeds at one budget, summarised as mean ± sample std and gains paired with
the M = 1 run of the same seed, recomputed here from every run's results.json."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study.py"
sys.path.insert(0, str(SCRIPT.parent))
import study as study_script  # noqa: E402  (scripts/ is not a package)

from conftest import HANG
TINY = ["data=synthetic", "data.val_size=64", "trainer.epochs=2", "trainer.batch_size=64", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "sweep"
    done = subprocess.run([sys.executable, str(SCRIPT), "digits", "--cycles", "1,2", "--seeds", "0,1", "--out",
                           str(out), "--", *TINY], cwd=out.parent, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_the_summary_is_the_runs_own_numbers(study):
    out, stdout = study
    runs = {}
    for job in range(4):  # the sweep's jobs: cycles 1, 1, 2, 2 with seeds 0, 1, 0, 1
        results = json.loads((out / str(job) / "results.json").read_text())
        runs[len(results["snapshots"]), job % 2] = results
    assert set(runs) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    rows = {(int(r["cycles"]), r["kind"]): r for r in csv.DictReader(open(out / "study.csv"))}
    for (m, kind), pick in {(2, "all"): lambda r: r["ensemble"], (2, "last"): lambda r: r["single"],
                            (2, "greedy"): lambda r: r["chosen"]["greedy"]["test"],
                            (2, "all_t"): lambda r: {"acc": r["ensemble"]["acc"],
                                                     **r["calibration"]["ensemble"]["test"]["after"]},
                            (1, "last"): lambda r: r["single"]}.items():
        accs = [pick(runs[m, seed])["acc"] for seed in (0, 1)]
        assert float(rows[m, kind]["acc_mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-12)
        assert float(rows[m, kind]["acc_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-12)
        nlls = [pick(runs[m, seed])["nll"] for seed in (0, 1)]
        assert float(rows[m, kind]["nll_mean"]) == pytest.approx(statistics.fmean(nlls), abs=1e-12)
        gains = [pick(runs[m, seed])["acc"] - runs[1, seed]["single"]["acc"] for seed in (0, 1)]
        assert float(rows[m, kind]["gain_mean"]) == pytest.approx(statistics.fmean(gains), abs=1e-12)
    assert (out / "study.png").stat().st_size > 0
    assert "| 2 | all snapshots |" in (out / "study.md").read_text() and "| 2 | all snapshots |" in stdout


def test_summarise_again_and_refuse_mixed_budgets(study, capsys):
    out, _ = study
    study_script.main(["--summarise", str(out)])
    assert (out / "study.md").read_text().split("\n", 3)[3] in capsys.readouterr().out
    config = out / "3" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 2.0", "epochs: 4.0"))
    with pytest.raises(SystemExit, match="different budgets"):
        study_script.main(["--summarise", str(out)])
