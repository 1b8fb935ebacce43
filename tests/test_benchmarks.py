"""The benchmark scripts' CI-sized runs (--quick, CPU, synthetic data): they finish and report consistent numbers."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--quick", "--threads", "1", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = run("bench_train.py", "--models", "resnet20", "--device", "cpu", "--json", "train.json", cwd=tmp_path)
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["config"]["precision"] == "fp32, channels_last" and report["config"]["device"] == "cpu"
    (r,) = report["results"]
    speed = r["images_per_s"]
    assert speed["snapens"] > 0 and speed["plain"] > 0
    assert r["ratio"] == pytest.approx(speed["snapens"] / speed["plain"])
    assert r["snapshot_share"] == pytest.approx(5 * r["snapshot_write_s"] / (200 * 50_000 / speed["snapens"]))
    assert f"snapens / plain throughput, resnet20: {r['ratio']:.2f}x" in out


@pytest.mark.slow
def test_bench_ensemble_quick(tmp_path):
    out = run("bench_ensemble.py", "--device", "cpu", "--json", "ensemble.json", cwd=tmp_path)
    report = json.loads((tmp_path / "ensemble.json").read_text())
    assert report["agreement"]["agree"]  # snapens' and the naive ensemble's accuracy on the same images
    assert report["config"]["M"] == 3 and report["config"]["images"] == 500
    assert 0 < report["logits_s"] < report["median"]["snapens"]["wall_s"]
    assert report["ratios"]["time"] == pytest.approx(report["median"]["naive"]["wall_s"]
                                                     / report["median"]["snapens"]["wall_s"])
    assert "naive / snapens peak RSS" in out


def test_bench_schedule_prints_both_costs_and_their_ratio(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_schedule.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    slow, usual, ratio = (float(x) for x in re.findall(r"([\d.]+)(?:x| us/call)", result.stdout))
    assert ratio == pytest.approx(slow / usual, rel=0.01)
