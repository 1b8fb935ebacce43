"""The benchmark scripts' CI-sized runs (--quick, CPU, synthetic data): they finish and report consistent numbers."""

import json
import os
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


@pytest.mark.slow
def test_gpu_validation_script_dry_run(tmp_path):
    """scripts/gpu_validate.sh --dry-run: every step of the GPU check runs on this CPU at toy sizes, the compiled
    short run drops its partial batch (300 images, batches of 64: 4 updates an epoch) and compiles one graph."""
    root = SCRIPTS.parent
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_validate.sh"), "--dry-run"], cwd=root, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    steps = re.findall(r"^== (\w+)", summary, re.MULTILINE)
    assert steps == ["probe", "pytest_gpu", "bench_train", "bench_ensemble", "c10_short", "ensemble_fp32",
                     "ensemble_bf16"]
    assert summary.count("rc=0") == len(steps)
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["rng_round_trip"]["identical"] and probe["run_to_run"] == {"default": True, "deterministic": True}
    assert probe["swa_update_syncs"]["WeightAverage"] == "no sync"
    training = json.loads((tmp_path / "c10_short" / "results.json").read_text())["training"]
    assert training["steps"] == 12 and training["compiled_graphs"] == 1
