"""The benchmark scripts' CI-sized runs (--quick, CPU, synthetic data, inside the GPU script's dry run): they finish
and report consistent numbers."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_schedule_prints_both_costs_and_their_ratio(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_schedule.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3  # SGDR's slowly growing cycles; a warmup in every one of 10^5 cycles; adaptive SGDR
    for line in lines:  # each: two costs and their ratio
        slow, usual, ratio = (float(x) for x in re.findall(r"([\d.]+)(?:x| us/call)", line))
        assert ratio == pytest.approx(slow / usual, rel=0.01)


def test_bench_decode_counts_what_each_way_decodes(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_decode.py"), "--images", "200", "--size", "16",
                             "--train-limit", "8"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr[-2000:]
    all_, used, ratios = result.stdout.splitlines()[-3:]
    assert all_.startswith(" all: 250 images decoded")  # 200 training and 50 test images, whole
    assert used.startswith("used: 122 images decoded")  # 8 training, 64 validation and the 50 test images
    whole, part = (float(x) for x in re.findall(r"([\d.]+) s,", all_ + used))  # printed to 0.01 s
    ratio = float(re.search(r"([\d.]+)x the time", ratios)[1])
    assert (part - 0.005) / (whole + 0.005) - 0.001 <= ratio <= (part + 0.005) / (whole - 0.005) + 0.001


def test_bench_members_times_each_choice_and_matches_the_definitions(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_members.py"), "--members", "7", "--images", "300",
                             "--compare-members", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    timed = [line for line in lines if line.startswith("M=7, N=300: ")]
    assert [line.split(": ")[1] for line in timed] == ["last m", "greedy", "curves (3 rules, first and last m)",
                                                       "disagreement", "choose (last m, greedy, weights, temperatures)"]
    fast, slow, ratio = (float(x) for x in re.findall(r"([\d.]+)(?: s|x)", lines[-1]))
    assert lines[-1].endswith("the same members: True") and ratio == pytest.approx(slow / fast, rel=0.05)

@pytest.mark.slow
def test_gpu_validation_script_dry_run(tmp_path):
    """scripts/gpu_validate.sh --dry-run: every step of the GPU check runs on this CPU at toy sizes, the compiled
    short run drops its partial batch (300 images, batches of 64: 4 updates an epoch) and compiles one graph."""
    root = SCRIPTS.parent
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_validate.sh"), "--dry-run"], cwd=root, capture_output=True,
                          text=True, timeout=HANG, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    steps = re.findall(r"^== (\w+)", summary, re.MULTILINE)
    assert steps == ["probe", "pytest_gpu", "bench_train", "bench_ensemble", "c10_short", "ensemble_fp32",
                     "ensemble_bf16"]
    assert summary.count("rc=0") == len(steps)
    train = json.loads((tmp_path / "bench_train.json").read_text())  # bench_train.py --quick, CPU
    assert train["config"]["precision"] == "fp32, channels_last" and train["config"]["device"] == "cpu"
    (r,) = train["results"]
    speed = r["images_per_s"]
    assert speed["snapens"] > 0 and speed["plain"] > 0
    assert r["ratio"] == pytest.approx(speed["snapens"] / speed["plain"])
    assert r["snapshot_share"] == pytest.approx(5 * r["snapshot_write_s"] / (200 * 50_000 / speed["snapens"]))
    assert f"snapens / plain throughput, resnet20: {r['ratio']:.2f}x" in (tmp_path / "bench_train.log").read_text()
    ensemble = json.loads((tmp_path / "bench_ensemble.json").read_text())  # --quick --images 128, CPU
    assert ensemble["agreement"]["agree"]  # snapens' and the naive ensemble's accuracy on the same images
    assert ensemble["config"]["M"] == 3 and ensemble["config"]["images"] == 128
    assert 0 < ensemble["logits_s"] < ensemble["median"]["snapens"]["wall_s"]
    assert ensemble["ratios"]["time"] == pytest.approx(ensemble["median"]["naive"]["wall_s"]
                                                       / ensemble["median"]["snapens"]["wall_s"])
    assert "naive / snapens peak RSS" in (tmp_path / "bench_ensemble.log").read_text()
    batched = ensemble["batched"]  # the same snapshots one at a time and in one vmapped pass
    assert batched["agree"] and batched["max_abs_logit_diff"] <= 1e-4
    assert batched["ratio"] == pytest.approx(batched["seconds"]["one at a time"] / batched["seconds"]["batched (vmap)"])
    assert f"one at a time / batched time: {batched['ratio']:.2f}x" in (tmp_path / "bench_ensemble.log").read_text()
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["rng_round_trip"]["identical"] and probe["run_to_run"] == {"default": True, "deterministic": True}
    assert probe["swa_update_syncs"]["WeightAverage"] == "no sync"
    training = json.loads((tmp_path / "c10_short" / "results.json").read_text())["training"]
    assert training["steps"] == 12 and training["compiled_graphs"] == 1


# ---- 5. the benchmark's naive contender builds models only through the allow-list ---------------------------------
def test_bench_ensemble_naive_never_calls_what_a_snapshot_names(tmp_path):
    from snapens.models import CifarResNet
    from snapens.snapshots import save_snapshot
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(f"data:\n  root: {tmp_path}\n")
    evil = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    save_snapshot(tmp_path / "run" / "snapshots" / "cycle_01.safetensors", CifarResNet(depth=8),
                  {"model_config": evil, "mean": [0.5] * 3, "std": [0.5] * 3})
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_ensemble.py"
    result = subprocess.run([sys.executable, str(script), "--naive", str(tmp_path / "run"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=HANG)
    assert result.returncode != 0 and "cannot build safely" in result.stderr
    assert victim.read_text() == "precious"
