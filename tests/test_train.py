"""End-to-end training on tiny synthetic data: snapshots, metadata, results.json, schedule and repeatability."""

import json
import math
import subprocess
import sys

import pytest
import snapens.training
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from snapens.build import build_data, build_schedule
from snapens.checkpoint import checkpoint_path, load_checkpoint
from snapens.ensemble.cache import cached_logits
from snapens.errors import SnapensError
from snapens.models import CifarResNet
from snapens.snapshots import (
    list_snapshots,
    load_into,
    load_snapshot,
    read_metadata,
)
from snapens.step import StepOptions, set_hyperparameters, train_step
from snapens.training import train

from conftest import (
    DOUBLING_CYCLES_3,
    EQUAL_CYCLES_2,
    EQUAL_CYCLES_3,
    FAST,
    HANG,
    compose_config,
    record_steps,
    run_cli,
    sgdr,
)


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


# ---- 3. never a non-finite snapshot or checkpoint -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_no_file_ever_holds_a_nonfinite_tensor(make_cfg, tmp_path, mode):
    """A learning rate of 1e6 drives BatchNorm's running variance to inf while loss and gradient may still be finite:
    whatever happens, no snapshot or checkpoint is written with a NaN or inf in any tensor."""
    try:
        train(make_cfg(*EQUAL_CYCLES_3, "scheduler.eta_max=1e6", f"trainer.on_nonfinite={mode}"), tmp_path)
    except SnapensError as e:
        assert "stopped" in str(e) and "checkpoint is intact" in str(e)
    for path in list_snapshots(tmp_path):
        state, _ = load_snapshot(path)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name
    state = load_checkpoint(checkpoint_path(tmp_path))["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ---- scheduler.cycles: one budget, one number of snapshots, every schedule ----------------------------------------
def test_cross_scheduler_sweep(tmp_path):
    """The README's comparison: one command, every schedule with 2 snapshots over the same 2-epoch budget (3 steps
    per epoch once 64 of the 256 images are held out), each job returning its validation ensemble accuracy."""
    sweep = tmp_path / "sweep"
    done = run_cli("snapens.train", "-m", *FAST, "scheduler=sgdr,snapshot,cosine,step,cyclic", "scheduler.cycles=2",
                   "trainer.epochs=2", "data.val_size=64", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(f"snapens: sweep dir {sweep}") == 2  # at the start and at the end
    expected = {"sgdr": [2, 6], "snapshot": [3, 6], "cosine": [3, 6], "step": [3, 6], "cyclic": [3, 6]}
    for job in range(5):
        run = sweep / str(job)
        name = (run / ".hydra" / "config.yaml").read_text().split("scheduler:\n  name: ")[1].split()[0]
        results = json.loads((run / "results.json").read_text())
        assert [s["step"] for s in results["snapshots"]] == expected[name], name
        assert results["val"]["split"] == "val" and results["val"]["num_images"] == 64
        assert f"returned to Hydra: the ensemble's val accuracy, {results['val']['ensemble']['acc']:.4f}" in done.stdout
        assert done.stdout.count(f"run dir {run}") == 2  # the job's start and end


CPU = torch.device("cpu")


def test_channels_last_trains_the_same_model_as_nchw(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_2, "trainer.channels_last=false"), tmp_path / "nchw")
    train(make_cfg(*EQUAL_CYCLES_2, "trainer.channels_last=true"), tmp_path / "nhwc")
    for a, b in zip(list_snapshots(tmp_path / "nchw"), list_snapshots(tmp_path / "nhwc")):
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys()
        for k in wa:  # the same up to rounding (another summation order), grown over 8 updates
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-2, atol=1e-3)


def test_bf16_run_on_cpu_writes_fp32_snapshots_and_says_how_it_ran(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_2, "trainer.precision=bf16"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["precision"] == "bf16, channels_last"
    assert results["training"]["steps"] == 2 * math.ceil(256 / 64)
    assert results["training"]["threads"] == 1  # trainer.num_threads=1 in the override set
    for path in list_snapshots(tmp_path):
        assert {t.dtype for t in load_file(path).values()} <= {torch.float32, torch.int64}
    # The test logits were computed in bf16, and the cache says so: fp32 logits are not served from it.
    cache = tmp_path / "logits" / "test" / "cycle_02.safetensors"
    with safe_open(cache, framework="pt") as f:
        assert json.loads(f.metadata()["key"])["computed_in"] == "bf16, channels_last"
    paths = list_snapshots(tmp_path)
    metas = [read_metadata(p) for p in paths]
    data = build_data(OmegaConf.load(tmp_path / ".hydra" / "config.yaml").data)
    model = CifarResNet(depth=8, num_classes=4)
    bf16 = cached_logits(paths, metas, data.test, "test", 64, CPU, lambda *_: model, torch.bfloat16, True)
    fp32 = cached_logits(paths, metas, data.test, "test", 64, CPU, lambda *_: model, None, True)
    assert not torch.equal(bf16, fp32)  # recomputed in fp32, not the bf16 entry
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


class ReadBacks:
    """Counts every way a tensor's value reaches the host: .item(), .tolist(), bool/float/int(), .cpu()."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(tensor, *args, _real=real, **kwargs):
                self.count += 1
                return _real(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_no_read_back_from_the_device_per_step(make_cfg, tmp_path, monkeypatch):
    """Twice the steps per epoch (same epochs, cycles and test set) must not add a single read-back: the loss, the
    accuracy and the non-finite flag stay on the device between log intervals and checkpoints."""
    counts = {}
    for train_size in (256, 512):  # 4 and 8 steps per epoch
        reads = ReadBacks(monkeypatch)
        train(make_cfg(*EQUAL_CYCLES_2, f"data.train_size={train_size}", "trainer.log_every=1000"),
              tmp_path / str(train_size))
        counts[train_size] = reads.count
        monkeypatch.undo()
    assert counts[256] == counts[512] > 0


def test_skip_mode_reads_the_flag_every_step(make_cfg, tmp_path, monkeypatch):
    """The one documented exception: on_nonfinite=skip decides each update on the host."""
    counts = {}
    for train_size in (256, 512):
        reads = ReadBacks(monkeypatch)
        train(make_cfg(*EQUAL_CYCLES_2, f"data.train_size={train_size}", "trainer.log_every=1000",
                       "trainer.on_nonfinite=skip"), tmp_path / str(train_size))
        counts[train_size] = reads.count
        monkeypatch.undo()
    assert counts[512] - counts[256] == 8  # 8 more steps, one flag each


def test_nonfinite_found_later_still_stops_before_anything_is_written(make_cfg, tmp_path, monkeypatch):
    """Found at the next checkpoint (here the epoch end at step 8), not at step 5 itself: the epoch-1 checkpoint
    and snapshot stay as they were, and the message names the step where it happened."""
    real = torch.nn.functional.cross_entropy
    calls = []

    def nan_at_5(logits, y, **kwargs):
        calls.append(1)
        return real(logits, y, **kwargs) * (float("nan") if len(calls) == 6 else 1.0)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at_5)
    with pytest.raises(SnapensError, match=r"non-finite loss or gradient at step 5 \(lr .*, loss nan"):
        train(make_cfg(*EQUAL_CYCLES_2, "trainer.log_every=1000"), tmp_path)
    assert len(calls) == 8  # trained on to the end of the epoch, then stopped
    assert [p.name for p in list_snapshots(tmp_path)] == ["cycle_01.safetensors"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_compiled_training_matches_eager(make_cfg, tmp_path):
    """torch.compile (inductor, on CPU here) trains the same model; its first step is timed apart."""
    one_epoch = [*sgdr(1, 1), "data.train_size=128", "data.test_size=64"]
    train(make_cfg(*one_epoch, "trainer.compile=false"), tmp_path / "eager")
    train(make_cfg(*one_epoch, "trainer.compile=true"), tmp_path / "compiled")
    eager, compiled = (load_file(list_snapshots(tmp_path / d)[0]) for d in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()  # saved from the model itself: no "_orig_mod." prefixes
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4)
    results = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert results["training"]["compiled"] is True
    assert 0 < results["training"]["compile_seconds"] <= results["training"]["seconds"]
    assert json.loads((tmp_path / "eager" / "results.json").read_text())["training"]["compile_seconds"] == 0


# ---- determinism, compile, memory ---------------------------------------------------------------------------------
def test_deterministic_mode_trains_the_same_weights_on_cpu(make_cfg, tmp_path):
    run = [*FAST, "scheduler=cosine", "trainer.epochs=1"]
    try:
        train(make_cfg(*run, "trainer.deterministic=true"), tmp_path / "on")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    train(make_cfg(*run), tmp_path / "off")
    on, off = (json.loads((tmp_path / d / "results.json").read_text())["training"]["rank_weights_sha256"]
               for d in ("on", "off"))
    assert on == off


@pytest.mark.slow
def test_compile_drops_the_partial_batch_and_compiles_once(make_cfg, tmp_path):
    """256 images in batches of 96: 2 updates per epoch (64 images left out), no second graph for a batch of 64."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(make_cfg(*FAST, "trainer.batch_size=96", "scheduler=cosine", "trainer.epochs=2", "trainer.compile=true"),
          tmp_path)
    training = json.loads((tmp_path / "results.json").read_text())["training"]
    assert training["steps"] == 4 and training["compiled_graphs"] == 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]


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


def test_accumulation_counts_updates_not_batches(make_cfg, tmp_path, monkeypatch):
    sizes = []
    real = snapens.training.train_step

    def spy(model, optimizer, x, y, options):
        sizes.append((len(x), options.accumulate))
        return real(model, optimizer, x, y, options)

    monkeypatch.setattr(snapens.training, "train_step", spy)
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.batch_size=32", "trainer.accumulate=2"), tmp_path)
    assert sizes == [(64, 2)] * 12  # 4 updates of 64 images per epoch, each in 2 forward passes of 32
    assert [read_metadata(p)["step"] for p in list_snapshots(tmp_path)] == [4, 8, 12]


def test_label_smoothing_reaches_the_loss(make_cfg, tmp_path, monkeypatch):
    seen, real = [], F.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: seen.append(k) or real(*a, **k))
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.label_smoothing=0.1", "trainer.epochs=1"), tmp_path)
    assert seen == [{"label_smoothing": 0.1}] * 4
