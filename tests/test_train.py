"""End-to-end training on tiny synthetic data: snapshots, metadata, results.json, schedule and repeatability."""

import json
import math
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from snapens.build import build_data, build_schedule
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots, load_into, read_metadata
from snapens.step import StepOptions, set_hyperparameters, train_step
from snapens.train import train

from conftest import DOUBLING_CYCLES_3, EQUAL_CYCLES_2, EQUAL_CYCLES_3, FAST, HANG, compose_config

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 2-cycle SGDR run (cycles end at epochs 1 and 3), shared by the tests that only read it."""
    cfg = compose_config(*DOUBLING_CYCLES_3)
    run_dir = tmp_path_factory.mktemp("run")
    return cfg, run_dir, train(cfg, run_dir)


def test_one_snapshot_per_cycle_with_metadata(finished_run):
    cfg, run_dir, _ = finished_run
    data = build_data(cfg.data)
    steps_per_epoch = math.ceil(len(data.train) / cfg.trainer.batch_size)
    schedule = build_schedule(cfg.scheduler, cfg.trainer.epochs, steps_per_epoch)
    paths = list_snapshots(run_dir)
    assert [p.name for p in paths] == ["cycle_01.safetensors", "cycle_02.safetensors"]
    for cycle, (path, end) in enumerate(zip(paths, [steps_per_epoch, 3 * steps_per_epoch]), start=1):
        meta = read_metadata(path)
        assert (meta["cycle"], meta["step"], meta["epoch"]) == (cycle, end, end / steps_per_epoch)
        # the snapshot is taken after the cycle's last update, which used the cycle's smallest lr
        assert meta["lr"] == schedule.lr(end - 1) == min(schedule.lr(t) for t in range(end - steps_per_epoch, end))
        assert meta["model"] == "resnet8" and meta["num_classes"] == 4 and meta["image_size"] == [32, 32]
        assert meta["model_config"] == {"_target_": "snapens.models.CifarResNet", "depth": 8, "num_classes": 4}
        assert meta["classes"] == data.classes
        pixels = data.train.images.double() / 255  # the statistics of the training images, computed here
        assert meta["mean"] == pytest.approx(pixels.mean((0, 2, 3)).tolist(), abs=1e-12)
        assert meta["std"] == pytest.approx(pixels.std((0, 2, 3), correction=0).tolist(), abs=1e-12)
        assert len(meta["config_hash"]) == 16
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_results_match_an_independent_recomputation(finished_run):
    """Load each snapshot file into a fresh model, run the test set, average logits: the same numbers."""
    cfg, run_dir, returned = finished_run
    results = json.loads((run_dir / "results.json").read_text())
    data = build_data(cfg.data)
    model = instantiate(cfg.model).eval()
    x = ((data.test.images.float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1))
         / torch.tensor(data.std).view(1, 3, 1, 1))
    logits = []
    for path in list_snapshots(run_dir):
        load_into(model, path)
        with torch.no_grad():
            logits.append(model(x))
    accs = [(lg.argmax(1) == data.test.labels).float().mean().item() for lg in logits]
    ensemble_acc = (torch.stack(logits).mean(0).argmax(1) == data.test.labels).float().mean().item()
    assert [s["acc"] for s in results["snapshots"]] == pytest.approx(accs, abs=1e-9)
    assert [s["file"] for s in results["snapshots"]] == ["cycle_01.safetensors", "cycle_02.safetensors"]
    assert results["single"]["acc"] == pytest.approx(accs[-1], abs=1e-9)
    probs = torch.stack(logits).double().mean(0).softmax(-1)
    ensemble_nll = -probs[torch.arange(len(probs)), data.test.labels].log().mean().item()
    assert results["ensemble"] == {"acc": pytest.approx(ensemble_acc, abs=1e-9), "rule": "logits",
                                   "nll": pytest.approx(ensemble_nll, abs=1e-5), "ece": results["ensemble"]["ece"],
                                   "members": ["cycle_01.safetensors", "cycle_02.safetensors"]}
    assert returned == results["ensemble"]["acc"]


def test_metrics_has_one_line_per_epoch(finished_run):
    _, run_dir, _ = finished_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert [r["step"] for r in lines] == [4, 8, 12]
    assert set(lines[0]) == {"epoch", "step", "lr", "train_loss", "train_acc", "grad_norm", "clip_rate", "seconds",
                             "skipped", "cycle_ends"}
    assert all(r["cycle_ends"] == [4, 12] for r in lines)
    assert all(r["skipped"] == 0 for r in lines)
    assert all(0 <= r["train_acc"] <= 1 and r["train_loss"] > 0 for r in lines)
    assert lines[0]["seconds"] < lines[1]["seconds"] < lines[2]["seconds"]


def test_a_finished_run_says_so_and_changes_nothing(finished_run):
    """The same command again finds the finished run and does nothing; another config is refused, naming the keys."""
    cfg, run_dir, returned = finished_run
    def files():
        return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    before = files()
    assert train(cfg, run_dir) == returned
    changed = cfg.copy()
    changed.trainer.seed, changed.scheduler.eta_max, changed.trainer.num_threads = 7, 0.05, 2
    with pytest.raises(SnapensError, match=r"cannot resume .*: the config differs in scheduler.eta_max, "
                                           r"trainer.seed; run with the original values"):
        train(changed, run_dir)
    assert before == files()


def test_same_seed_gives_identical_snapshots(make_cfg, tmp_path):
    """Seeded and repeatable on CPU: the same config twice writes byte-identical snapshot files."""
    overrides = [*EQUAL_CYCLES_2, "data.cutout=8"]
    for name in ("a", "b"):
        train(make_cfg(*overrides), tmp_path / name)
    for a, b in zip(list_snapshots(tmp_path / "a"), list_snapshots(tmp_path / "b"), strict=True):
        assert a.read_bytes() == b.read_bytes()
    train(make_cfg(*overrides, "trainer.seed=1"), tmp_path / "c")
    assert (tmp_path / "a/snapshots/cycle_02.safetensors").read_bytes() != \
           (tmp_path / "c/snapshots/cycle_02.safetensors").read_bytes()


SCHEDULE_OVERRIDES = {  # each fits a 2-epoch budget of 4 steps per epoch
    "onecycle": [],
    "cyclic": ["scheduler.unit=step", "scheduler.step_size_up=2"],
    "sgdr": ["scheduler.T_0=1", "scheduler.T_mult=1"],
    "fge": ["scheduler.unit=step", "scheduler.cycle_length=2", "scheduler.cycles=2"],  # ordinary training for 5 steps
}


@pytest.mark.parametrize("optimizer, scheduler", [("sgd", "onecycle"), ("adamw", "cyclic"), ("sgd", "sgdr"),
                                                  ("sgd", "fge")])
def test_every_update_uses_the_schedules_values(make_cfg, tmp_path, monkeypatch, optimizer, scheduler):
    """Before each update the optimizer holds lr(t) and, where the schedule has one, momentum(t) (beta1 in Adam)."""
    seen = []
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    step = cls.step

    def recording_step(self, *args, **kwargs):
        group = self.param_groups[0]
        seen.append((group["lr"], group["betas"][0] if "betas" in group else group["momentum"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", recording_step)
    cfg = make_cfg(*FAST, f"optimizer={optimizer}", f"scheduler={scheduler}", "trainer.epochs=2",
                   *SCHEDULE_OVERRIDES[scheduler])
    train(cfg, tmp_path)
    schedule = build_schedule(cfg.scheduler, cfg.trainer.epochs, 4)
    assert len(seen) == schedule.total_steps == 8
    snapshots = json.loads((tmp_path / "results.json").read_text())["snapshots"]
    assert [s["step"] for s in snapshots] == schedule.cycle_ends()  # fge: [6, 8], each after an update at alpha_2
    for t, (lr, momentum) in enumerate(seen):
        assert lr == schedule.lr(t)
        assert momentum == (schedule.momentum(t) if schedule.momentum(t) is not None else cfg.optimizer.get(
            "momentum", cfg.optimizer.get("beta1")))


def test_set_hyperparameters_writes_every_group():
    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=1.0, momentum=0.9)
    set_hyperparameters(sgd, 0.25, 0.8)
    assert [(g["lr"], g["momentum"]) for g in sgd.param_groups] == [(0.25, 0.8), (0.25, 0.8)]
    adam = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.99))
    set_hyperparameters(adam, 0.5, 0.85)
    assert (adam.param_groups[0]["lr"], adam.param_groups[0]["betas"]) == (0.5, (0.85, 0.99))
    set_hyperparameters(adam, 0.1, None)
    assert adam.param_groups[0]["betas"] == (0.85, 0.99)


@pytest.mark.parametrize("mode, limit", [("norm", 0.5), ("value", 0.01), ("norm", 0.0), ("value", 0.0)])
def test_train_step_clips_gradients(mode, limit):
    """Clipping as training does it, through train_step: the gradients left for the optimizer (lr 0, so the weights
    stay) are the unclipped ones scaled to the norm limit, or clamped entry by entry, or untouched when 0."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    x, y = 10 * torch.randn(8, 16), torch.randint(0, 4, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y,
                        StepOptions(grad_clip=limit, clip_mode=mode))
    after = [p.grad for p in model.parameters()]
    norm_before = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))
    assert result.grad_norm.item() == pytest.approx(norm_before.item(), rel=1e-6)
    if limit == 0:
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    elif mode == "norm":
        assert norm_before > limit
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in after])) == pytest.approx(limit, rel=1e-5)
        assert all(torch.allclose(a, b * limit / norm_before, rtol=1e-5) for a, b in zip(after, before))
    else:
        assert any((b.abs() > limit).any() for b in before)
        assert all(torch.equal(a, b.clamp(-limit, limit)) for a, b in zip(after, before))


def test_cli_end_to_end(tmp_path):
    """`python -m snapens.train` as a user runs it: exit 0, Hydra's config saved, snapshots and results written."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "snapens.train", *FAST, "scheduler=snapshot",
                             "scheduler.cycles=2", "trainer.epochs=2", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr
    assert "ensemble of 2 (logits)" in result.stdout
    assert [p.name for p in list_snapshots(run_dir)] == ["cycle_01.safetensors", "cycle_02.safetensors"]
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "results.json").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["ensemble"]["members"] == ["cycle_01.safetensors", "cycle_02.safetensors"]


def test_vote_rule_is_used_when_configured(make_cfg, tmp_path):
    cfg = make_cfg(*EQUAL_CYCLES_3, "ensemble.rule=vote")
    train(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ensemble"]["rule"] == "vote" and len(results["ensemble"]["members"]) == 3
