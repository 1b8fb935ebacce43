"""Shared fixtures: the real config tree composed with Hydra, and the CIFAR-10 copy when it is there."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from snapens.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = ["data=synthetic", "model=resnet20", "trainer.batch_size=64", "trainer.device=cpu", "trainer.num_threads=1",
        "model.depth=8"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one intra-op thread (two wait on each other at every op on a busy 2-core
    machine); restored afterwards, since train() sets the thread count for the whole process."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def make_cfg():
    """compose(overrides) -> the config `python -m snapens.train overrides...` would run with."""
    register_configs()

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return make


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The extracted CIFAR-10 JPEG copy: $SNAPENS_CIFAR10 (CI extracts ../shared/data there); skip when absent."""
    root = os.environ.get("SNAPENS_CIFAR10")
    if not root or not (Path(root) / "train").is_dir():
        pytest.skip("set SNAPENS_CIFAR10 to the extracted cifar10-jpeg folder (see .ci/run)")
    return Path(root).resolve()  # tests run the CLI from other folders
