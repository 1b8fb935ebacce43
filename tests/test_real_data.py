"""The issue's acceptance run on the real CIFAR-10 copy: ResNet-20, SGDR with three one-epoch cycles, 5,000 images.

Measured on the 2-core CPU (torch 2.14.1, 2026-11-23, gradient clipping at norm 1.0, channels_last) with this
command and trainer.seed=0, 1, 2, test accuracy on 1,000 test images after 3 epochs (chance is 0.10), as last
snapshot / ensemble:
  trainer.num_threads=1: 0.405/0.396, 0.422/0.414, 0.375/0.380
  trainer.num_threads=2: 0.397/0.395, 0.408/0.412, 0.399/0.380
The float results depend on the thread count, so another machine trains a different model from the same seed (with
2,000 images and before clipping worked, CI once measured 0.203/0.169 where this machine had 0.259/0.262). The test
runs seed 0 with torch's default threads. The floor below, 0.30, sits 0.075 under the lowest value measured and
twenty standard errors above chance.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from snapens.batches import normalize
from snapens.data import prepare, scan_image_folder
from snapens.snapshots import list_snapshots, load_into, read_metadata

from conftest import HANG

FLOOR = 0.30


@pytest.mark.slow
def test_resnet20_sgdr_on_cifar10_subset(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "snapens.train", "model=resnet20", "scheduler=sgdr", "scheduler.T_0=1",
               "scheduler.T_mult=1", "trainer.epochs=3", "data=imagefolder", f"data.root={cifar_root}",
               "data.train_limit=5000", "data.test_limit=1000", "trainer.num_threads=1", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr[-2000:]

    paths = list_snapshots(run_dir)
    assert [p.name for p in paths] == ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]
    assert [read_metadata(p)["step"] for p in paths] == [40, 80, 120]  # ceil(5000 / 128) = 40 steps per epoch

    # Recompute from the files alone: the model from .hydra/config.yaml, normalisation and classes from metadata.
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    train, test, classes = scan_image_folder(str(cifar_root))  # only the chosen images are decoded, as in training
    test = prepare(train, test, classes, train_limit=5000, test_limit=1000).test
    model = instantiate(cfg.model).eval()
    logits = []
    for path in paths:
        meta = load_into(model, path)
        assert meta["classes"] == classes
        with torch.no_grad():
            batches = test.images.split(cfg.ensemble.batch_size)
            logits.append(torch.cat([model(normalize(x, meta["mean"], meta["std"])) for x in batches]))
    accs = [(lg.argmax(1) == test.labels).double().mean().item() for lg in logits]
    ensemble = (torch.stack(logits).mean(0).argmax(1) == test.labels).double().mean().item()

    results = json.loads((run_dir / "results.json").read_text())
    assert [s["acc"] for s in results["snapshots"]] == pytest.approx(accs, abs=1e-12)
    assert results["single"]["acc"] == pytest.approx(accs[-1], abs=1e-12)
    assert results["ensemble"]["acc"] == pytest.approx(ensemble, abs=1e-12)
    assert results["num_images"] == 1000
    assert min(results["single"]["acc"], results["ensemble"]["acc"]) > FLOOR


PROBE = """
def test_probe(cifar_root):
    assert (cifar_root / "train" / "cat" / "0.jpg").read_bytes() == b"jpeg"
"""


@pytest.mark.parametrize("archive", [False, True])
def test_the_test_command_works_without_shared_data(tmp_path, archive):
    """In a checkout with no ../shared and no SNAPENS_CIFAR10, the real-data tests skip and say why; with the
    archive beside the checkout, the conftest extracts it into data/ and they run."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests)
    (tests / "test_probe.py").write_text(PROBE)
    if archive:
        image = tmp_path / "cifar10-jpeg" / "train" / "cat" / "0.jpg"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"jpeg")
        (tmp_path / "shared" / "data").mkdir(parents=True)
        with tarfile.open(tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "cifar10-jpeg", "cifar10-jpeg")
    env = {k: v for k, v in os.environ.items() if k != "SNAPENS_CIFAR10"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"], cwd=tmp_path / "repo",
                          capture_output=True, text=True, timeout=HANG, env=env)
    if archive:
        assert "1 passed" in done.stdout and (tmp_path / "repo" / "data" / "cifar10-jpeg" / "train").is_dir()
    else:
        assert "1 skipped" in done.stdout and "no CIFAR-10 copy: set SNAPENS_CIFAR10=DIR" in done.stdout
