"""The issue's acceptance run on the real CIFAR-10 copy: ResNet-20, SGDR with three one-epoch cycles, 2,000 images.

Measured on the 2-core CPU with this command and trainer.seed=0, 1, 2: last snapshot 0.259, 0.322, 0.222 and
ensemble 0.262, 0.268, 0.254 test accuracy on 1,000 test images after 3 epochs; chance is 0.10. The test runs seed
0. The floor below, 0.18, sits 0.04 under the lowest value measured and eight standard errors above chance.
"""

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from snapens.data import load_image_folder, normalize, prepare
from snapens.snapshots import list_snapshots, load_into, read_metadata

FLOOR = 0.18


@pytest.mark.slow
def test_resnet20_sgdr_on_cifar10_subset(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "snapens.train", "model=resnet20", "scheduler=sgdr", "scheduler.T_0=1",
               "scheduler.T_mult=1", "trainer.epochs=3", "data=imagefolder", f"data.root={cifar_root}",
               "data.train_limit=2000", "data.test_limit=1000", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]

    paths = list_snapshots(run_dir)
    assert [p.name for p in paths] == ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]
    assert [read_metadata(p)["step"] for p in paths] == [16, 32, 48]  # ceil(2000 / 128) = 16 steps per epoch

    # Recompute from the files alone: the model from .hydra/config.yaml, normalisation and classes from metadata.
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    train, test, classes = load_image_folder(str(cifar_root))
    test = prepare(train, test, classes, train_limit=2000, test_limit=1000).test
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
