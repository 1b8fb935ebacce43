"""The seeds' training options: optimizer reset at restarts, SWA per cycle, adaptive SGDR, warmup per cycle,
gradient accumulation, label smoothing, keeping the newest K snapshots."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import snapens.train
from snapens import schedules
from snapens.build import build_data, build_schedule
from snapens.batches import normalize
from snapens.errors import SnapensError
from snapens.adaptive import AdaptiveState, extend_cycle
from snapens.snapshots import list_snapshots, read_metadata
from snapens.step import StepOptions, train_step
from snapens.train import train

from conftest import EQUAL_CYCLES_3, FAST, HANG



def record_steps(monkeypatch, before=None, after=None):
    """Wrap train_step to call before(model, optimizer) and after(model, optimizer) around every update."""
    real = snapens.train.train_step

    def step(model, optimizer, *args, **kwargs):
        if before:
            before(model, optimizer)
        out = real(model, optimizer, *args, **kwargs)
        if after:
            after(model, optimizer)
        return out

    monkeypatch.setattr(snapens.train, "train_step", step)


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_state_is_cleared_at_restarts_and_only_there(make_cfg, tmp_path, monkeypatch, reset):
    sizes = []
    record_steps(monkeypatch, before=lambda model, optimizer: sizes.append(len(optimizer.state)))
    train(make_cfg(*EQUAL_CYCLES_3, f"trainer.reset_optimizer_on_restart={reset}"), tmp_path)
    empty = [t for t, n in enumerate(sizes) if n == 0]
    assert len(sizes) == 12
    assert empty == ([0, 4, 8] if reset else [0])  # update 12 does not exist: the last cycle end is no restart


def test_adam_moments_are_cleared_too(make_cfg, tmp_path, monkeypatch):
    steps = []
    record_steps(monkeypatch, before=lambda model, optimizer: steps.append(
        max((int(s["step"]) for s in optimizer.state.values()), default=0)))
    train(make_cfg(*EQUAL_CYCLES_3, "optimizer=adamw", "trainer.reset_optimizer_on_restart=true"), tmp_path)
    assert steps == [0, 1, 2, 3] * 3  # Adam's step count (its bias correction) restarts with every cycle


def test_swa_snapshot_is_the_mean_of_the_weights_of_each_cycles_second_half(make_cfg, tmp_path, monkeypatch):
    weights = []
    record_steps(monkeypatch, after=lambda model, optimizer: weights.append(
        {k: v.detach().clone() for k, v in model.named_parameters()}))
    cfg = make_cfg(*EQUAL_CYCLES_3, "trainer.swa.start=0.5")
    train(cfg, tmp_path)
    plain, swa = list_snapshots(tmp_path), list_snapshots(tmp_path, swa=True)
    assert [p.name for p in swa] == ["cycle_01_swa.safetensors", "cycle_02_swa.safetensors",
                                     "cycle_03_swa.safetensors"]
    assert [p.name for p in plain] == ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]
    for cycle, path in enumerate(swa):
        averaged = load_file(path)
        window = weights[4 * cycle + 2: 4 * cycle + 4]  # after updates 2, 3 of the cycle's 0..3
        assert read_metadata(path)["swa_updates"] == 2
        for name in window[0]:
            torch.testing.assert_close(averaged[name], torch.stack([w[name] for w in window]).mean(0),
                                       rtol=1e-6, atol=1e-7)

    # BatchNorm statistics recomputed on the training images with the averaged weights: the first BN layer's
    # running mean is the mean of the first convolution's output over all of them (one batch of 256 < 1000).
    data = build_data(cfg.data)
    averaged = load_file(swa[-1])
    x = normalize(data.train.images, data.mean, data.std)
    conv = F.conv2d(x, averaged["conv.weight"], padding=1)
    torch.testing.assert_close(averaged["bn.running_mean"], conv.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_ensemble_tool_evaluates_the_swa_set(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.swa.start=0.5"), tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "snapens.ensemble", f"run={tmp_path / 'run'}", "swa=true",
                             "device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "ensemble" / "test_swa" / "ensemble.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in report["ensemble"]["members"]] == [
        "cycle_01_swa.safetensors", "cycle_02_swa.safetensors", "cycle_03_swa.safetensors"]
    train(make_cfg(*EQUAL_CYCLES_3), tmp_path / "plain")
    result = subprocess.run([sys.executable, "-m", "snapens.ensemble", f"run={tmp_path / 'plain'}", "swa=true",
                             "device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2 and "has no SWA snapshots" in result.stderr


ADAPTIVE = [*FAST, "scheduler=adaptive_sgdr", "scheduler.T_0=3", "scheduler.T_mult=1", "trainer.epochs=9",
            "data.val_size=32", "data.train_size=288", "scheduler.patience=1", "scheduler.extension_factor=1.5"]


def scripted_losses(monkeypatch, losses, fail_at=None):
    """validation_loss returns the scripted values in turn; raises at call number fail_at (0-based)."""
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) - 1 == fail_at:
            raise RuntimeError("scripted failure")
        return losses[len(calls) - 1]

    monkeypatch.setattr(snapens.train, "validation_loss", loss)
    return calls


def test_adaptive_sgdr_extends_the_stalled_cycle_on_a_scripted_loss(make_cfg, tmp_path, monkeypatch):
    """256 training images: 4 updates per epoch, planned cycles of 12 updates ending at 12, 24, 36; evaluations at
    the ends of epochs 1..8. Cycle 1 improves to its end (1.0, 0.9, 0.8). Cycle 2 starts at 1.5 (a restart raises
    the loss: no plateau, a new cycle is judged on its own), stalls at 1.6 after step 20 and is extended to 18
    updates (the last cycle is cut to the 6 left); 1.7 does not extend it again; cycle 3 starts afresh."""
    calls = scripted_losses(monkeypatch, LOSSES)
    train(make_cfg(*ADAPTIVE), tmp_path)
    assert len(calls) == 8
    assert [read_metadata(p)["step"] for p in list_snapshots(tmp_path)] == [12, 30, 36]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["cycle_ends"] for r in lines] == [[12, 24, 36]] * 4 + [[12, 30, 36]] * 5
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["step"] for s in results["snapshots"]] == [12, 30, 36]


LOSSES = [1.0, 0.9, 0.8, 1.5, 1.6, 1.7, 1.2, 1.1]


def test_adaptive_sgdr_resume_replays_the_recorded_cycles(make_cfg, tmp_path, monkeypatch):
    scripted_losses(monkeypatch, LOSSES)
    train(make_cfg(*ADAPTIVE), tmp_path / "whole")
    scripted_losses(monkeypatch, LOSSES, fail_at=5)  # dies at the end of epoch 6, after the extension
    with pytest.raises(RuntimeError, match="scripted failure"):
        train(make_cfg(*ADAPTIVE), tmp_path / "stopped")
    scripted_losses(monkeypatch, LOSSES[5:])  # the evaluations still to come
    train(make_cfg(*ADAPTIVE), tmp_path / "stopped")
    for a, b in zip(list_snapshots(tmp_path / "whole"), list_snapshots(tmp_path / "stopped"), strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_adaptive_sgdr_needs_a_validation_split(make_cfg, tmp_path):
    with pytest.raises(SnapensError, match="data.val_size=N"):
        train(make_cfg(*[o for o in ADAPTIVE if not o.startswith("data.val_size")]), tmp_path)


def test_extension_rule():
    state = AdaptiveState([8, 8, 8])
    assert [state.should_extend(loss, 0, 2) for loss in (3.0, 3.1, 3.2, 3.3, 3.4)] == [False, False, True,
                                                                                      False, False]
    assert [state.should_extend(loss, 1, 2) for loss in (5.0, 4.0, 4.5)] == [False, False, False]  # own best
    assert not state.should_extend(4.6, 1, 2, in_progress=False)  # stalled, but the cycle is over
    assert state.should_extend(4.7, 1, 2)
    assert extend_cycle((10, 20, 40, 80), 1, 1.5) == (10, 30, 40, 70)  # later cycles move back; the last is cut
    assert extend_cycle((10, 10, 10, 10), 0, 1.5) == (15, 10, 10, 5)  # a cut of half its length stays a cycle
    assert extend_cycle((10, 10, 10, 10), 1, 1.8) == (10, 18, 12)  # a stub of 2 is merged into the cycle before
    assert extend_cycle((10, 20), 1, 2.0) == (10, 20)  # the last cycle cannot grow past the budget
    assert sum(extend_cycle((7, 14, 28), 0, 1.37)) == 49


def test_warmup_every_cycle():
    sgdr = schedules.SGDR(0.1, T_0=4, total_steps=12)
    once, every = schedules.Warmup(sgdr, 2), schedules.Warmup(sgdr, 2, every_cycle=True)
    for start in (0, 4, 8):
        for k in range(4):
            t = start + k
            expected = sgdr.lr(start + 2) * (k + 1) / 3 if k < 2 else sgdr.lr(t)
            assert every.lr(t) == pytest.approx(expected, abs=1e-15)
            assert once.lr(t) == (expected if start == 0 else sgdr.lr(t))
    with pytest.raises(ValueError, match="shorter than every cycle"):
        schedules.Warmup(sgdr, 4, every_cycle=True)


def test_warmup_every_cycle_from_the_config(make_cfg):
    cfg = make_cfg("scheduler=sgdr", "scheduler.T_0=2", "scheduler.T_mult=1", "scheduler.warmup=1",
                   "scheduler.warmup_every_cycle=true")
    schedule = build_schedule(cfg.scheduler, 6, steps_per_epoch=5)
    assert [schedule.lr(t) for t in (10, 11, 12, 15)] == [pytest.approx(v) for v in (
        schedule.inner.lr(15) / 6, 2 * schedule.inner.lr(15) / 6, 3 * schedule.inner.lr(15) / 6,
        schedule.inner.lr(15))]


def test_accumulation_with_half_the_batch_equals_one_full_batch():
    """K=2 micro-batches of 16 give the same update as one batch of 32 on a model without BatchNorm."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(5)) for _ in range(2)]
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    models[0](x)
    models[1](x)
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for _ in range(3):
        whole = train_step(models[0], optimizers[0], x, y, StepOptions(grad_clip=0.5))
        halves = train_step(models[1], optimizers[1], x, y, StepOptions(grad_clip=0.5, accumulate=2))
        torch.testing.assert_close(halves.loss, whole.loss)  # the batch's mean loss
        torch.testing.assert_close(halves.grad_norm, whole.grad_norm)  # the gradient norm before clipping
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_with_fewer_images_than_pieces():
    """An epoch's last batch may hold fewer images than trainer.accumulate: no empty forward pass."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(1, 4), torch.tensor([1])
    expected = F.cross_entropy(model(x), y).detach()
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, StepOptions(accumulate=3))
    assert result.logits.shape == (1, 2) and bool(result.finite)
    torch.testing.assert_close(result.loss, expected)


def test_accumulation_counts_updates_not_batches(make_cfg, tmp_path, monkeypatch):
    sizes = []
    real = snapens.train.train_step

    def spy(model, optimizer, x, y, options):
        sizes.append((len(x), options.accumulate))
        return real(model, optimizer, x, y, options)

    monkeypatch.setattr(snapens.train, "train_step", spy)
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.batch_size=32", "trainer.accumulate=2"), tmp_path)
    assert sizes == [(64, 2)] * 12  # 4 updates of 64 images per epoch, each in 2 forward passes of 32
    assert [read_metadata(p)["step"] for p in list_snapshots(tmp_path)] == [4, 8, 12]


def test_label_smoothing_is_the_smoothed_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with torch.no_grad():
        logp = model(x).log_softmax(1)
    expected = (0.9 * -logp[torch.arange(10), y] + 0.1 * -logp.mean(1)).mean()
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, StepOptions(label_smoothing=0.1))
    torch.testing.assert_close(result.loss, expected)


def test_label_smoothing_reaches_the_loss(make_cfg, tmp_path, monkeypatch):
    seen, real = [], F.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: seen.append(k) or real(*a, **k))
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.label_smoothing=0.1", "trainer.epochs=1"), tmp_path)
    assert seen == [{"label_smoothing": 0.1}] * 4


def test_keep_only_the_newest_snapshots(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.epochs=4", "trainer.keep_snapshots=2", "trainer.swa.start=0.5"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        "cycle_03.safetensors", "cycle_03_swa.safetensors", "cycle_04.safetensors", "cycle_04_swa.safetensors"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ensemble"]["members"] == ["cycle_03.safetensors", "cycle_04.safetensors"]


@pytest.mark.parametrize("override, message", [
    ("trainer.swa.start=1.0", "trainer.swa.start=1.0 must be a fraction"),
    ("trainer.label_smoothing=1.0", "trainer.label_smoothing=1.0 must be in"),
    ("trainer.accumulate=0", "trainer.accumulate=0 must be a finite number > 0"),
    ("trainer.keep_snapshots=-1", "trainer.keep_snapshots=-1 must be a finite number >= 0"),
    ("scheduler=adaptive_sgdr data.val_size=32 scheduler.warmup_every_cycle=true",
     "scheduler.warmup_every_cycle does not go with scheduler=adaptive_sgdr"),
    ("scheduler=adaptive_sgdr data.val_size=32 scheduler.extension_factor=1.0",
     "scheduler.extension_factor=1.0 must be > 1"),
    ("scheduler=adaptive_sgdr data.val_size=32 scheduler.patience=0", "scheduler.patience=0 must be a finite number"),
])
def test_bad_option_values(make_cfg, tmp_path, override, message):
    with pytest.raises(SnapensError, match=message):
        train(make_cfg(*EQUAL_CYCLES_3, *override.split()), tmp_path)


def test_swa_batchnorm_statistics_are_recomputed_in_the_models_layout(make_cfg, tmp_path, monkeypatch):
    import snapens.swa
    layouts, real = [], snapens.swa.update_bn

    def recording(batches, model):
        model.conv.register_forward_hook(lambda m, args, out: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)))
        return real(batches, model)

    monkeypatch.setattr(snapens.swa, "update_bn", recording)
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.swa.start=0.5", "trainer.channels_last=true"), tmp_path)
    assert layouts and all(layouts)
