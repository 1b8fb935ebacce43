"""Shared fixtures: the real config tree composed with Hydra, the named override sets tests train with, and the
CIFAR-10 copy when it is there."""

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from snapens.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
HANG = 3600  # seconds: every subprocess's time limit, a hang guard far above any run's time on a busy machine

# Named override sets, each meaning one thing everywhere. FAST: 256 synthetic 32x32 images, ResNet-8, batch 64, one
# CPU thread: 4 updates per epoch.
FAST = ["data=synthetic", "model=resnet20", "trainer.batch_size=64", "trainer.device=cpu", "trainer.num_threads=1",
        "model.depth=8"]


def sgdr(t_mult: int, epochs: int) -> list[str]:
    """FAST with SGDR cycles starting at one epoch (4 updates), each T_mult times the last, over `epochs`."""
    return [*FAST, "scheduler=sgdr", "scheduler.T_0=1", f"scheduler.T_mult={t_mult}", f"trainer.epochs={epochs}"]


EQUAL_CYCLES_2 = sgdr(1, 2)  # 2 one-epoch cycles: snapshots after updates 4, 8
EQUAL_CYCLES_3 = sgdr(1, 3)  # 3 one-epoch cycles: snapshots after updates 4, 8, 12
DOUBLING_CYCLES_3 = sgdr(2, 3)  # cycles of 1 and 2 epochs: snapshots after updates 4, 12
DOUBLING_CYCLES_7 = sgdr(2, 7)  # cycles of 1, 2 and 4 epochs: snapshots after updates 4, 12, 28
HELD_OUT = [*EQUAL_CYCLES_3, "data.val_size=32"]  # 3 one-epoch cycles, 32 validation images held out


def compose_config(*overrides: str, name: str = "config", return_hydra_config: bool = False):
    """The config `python -m snapens.<entry point> overrides...` would run with (name: config, lr_find or ensemble,
    the file under conf/)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)


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
    """compose(overrides) -> the training config `python -m snapens.train overrides...` would run with."""
    return compose_config


REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # the project's copy, where a checkout has it


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The extracted CIFAR-10 JPEG copy: $SNAPENS_CIFAR10, else data/cifar10-jpeg (extracted here from
    ../shared/data/cifar10-jpeg.tar.gz on first use, when that exists); the real-data tests skip, saying so, when
    there is neither."""
    given = os.environ.get("SNAPENS_CIFAR10")
    if given and (Path(given) / "train").is_dir():
        return Path(given).resolve()  # tests run the CLI from other folders
    target = REPO / "data" / "cifar10-jpeg"
    if not (target / "train").is_dir() and ARCHIVE.is_file():
        target.parent.mkdir(exist_ok=True)
        with open(target.parent / ".cifar10-jpeg.lock", "w") as lock:  # pytest-xdist's workers extract it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "train").is_dir():
                extract(ARCHIVE, target)
    if not (target / "train").is_dir():
        pytest.skip("no CIFAR-10 copy: set SNAPENS_CIFAR10=DIR (an extracted cifar10-jpeg folder), or keep "
                    "../shared/data/cifar10-jpeg.tar.gz beside the checkout")
    return target


def extract(archive: Path, target: Path) -> None:
    """The archive's cifar10-jpeg/ folder into `target`, whole or not at all (extracted beside it, then renamed)."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(archive) as tar:  # the "data" filter refuses links and paths that leave the folder
        tar.extractall(partial, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (partial / "cifar10-jpeg").rename(target)
    partial.rmdir()


@pytest.fixture(scope="session")
def held_out_run(tmp_path_factory) -> Path:
    """A finished HELD_OUT run (synthetic data, a validation split), trained once for the whole session: tests that
    change anything in it work on a copy (`held_out_copy`)."""
    from snapens.training import train  # here: collecting the tests needs no training code

    run_dir = tmp_path_factory.mktemp("held_out") / "run"
    train(compose_config(*HELD_OUT), run_dir)
    return run_dir


@pytest.fixture
def held_out_copy(held_out_run, tmp_path) -> Path:
    shutil.copytree(held_out_run, tmp_path / "run")
    return tmp_path / "run"


def snapshot_logits(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """float64 M x N x C: each snapshot of a HELD_OUT run on uint8 images, computed here from the files and the
    data's statistics, without the ensemble tool's code."""
    from hydra.utils import instantiate
    from snapens.build import build_data
    from snapens.snapshots import list_snapshots, load_into

    cfg = compose_config(*HELD_OUT)
    data = build_data(cfg.data)
    x = (images.float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(1, 3, 1, 1)
    out = []
    for path in list_snapshots(run_dir):
        model = instantiate(cfg.model).eval()
        load_into(model, path)
        with torch.no_grad():
            out.append(model(x))
    return torch.stack(out).double()


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def write_image_folder(root, seed: int = 0):
    """make_synthetic's images as PNG files in root/{train,test}/<class>/."""
    from PIL import Image
    from snapens.data import make_synthetic

    train_split, test_split, classes = make_synthetic(4, 64, 16, 32, seed=seed)
    for name, split in (("train", train_split), ("test", test_split)):
        for i, (image, label) in enumerate(zip(split.images, split.labels.tolist())):
            (root / name / classes[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / name / classes[label] / f"{i:03d}.png")


def record_steps(monkeypatch, before=None, after=None):
    """Wrap train_step to call before(model, optimizer) and after(model, optimizer) around every update."""
    import snapens.training

    real = snapens.training.train_step

    def step(model, optimizer, *args, **kwargs):
        if before:
            before(model, optimizer)
        out = real(model, optimizer, *args, **kwargs)
        if after:
            after(model, optimizer)
        return out

    monkeypatch.setattr(snapens.training, "train_step", step)


def says(message: str, *parts: str) -> None:
    """An error as snapens gives it: one line that names the key (with its value) and the fix (the bound, the option
    to take, the key to set). Tests pin those parts, not the wording around them, so a clearer sentence breaks no
    test while a lost key or fix does."""
    line = str(message).strip()
    assert line and "\n" not in line, line
    for part in parts:
        assert part in line, f"{part!r} is not in {line!r}"
