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
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from snapens.batches import normalize
from snapens.data import load_image_folder, prepare
from snapens.snapshots import list_snapshots, load_into, read_metadata

FLOOR = 0.30


@pytest.mark.slow
def test_resnet20_sgdr_on_cifar10_subset(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "snapens.train", "model=resnet20", "scheduler=sgdr", "scheduler.T_0=1",
               "scheduler.T_mult=1", "trainer.epochs=3", "data=imagefolder", f"data.root={cifar_root}",
               "data.train_limit=5000", "data.test_limit=1000", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]

    paths = list_snapshots(run_dir)
    assert [p.name for p in paths] == ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]
    assert [read_metadata(p)["step"] for p in paths] == [40, 80, 120]  # ceil(5000 / 128) = 40 steps per epoch

    # Recompute from the files alone: the model from .hydra/config.yaml, normalisation and classes from metadata.
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    train, test, classes = load_image_folder(str(cifar_root))
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
