"""Config: every group option composes, and every bad value fails before training with one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from snapens.build import build_schedule
from snapens.checkpoint import checkpoint_path, load_checkpoint
from snapens.errors import SnapensError
from snapens.training import train

from conftest import CONF, EQUAL_CYCLES_2, EQUAL_CYCLES_3, FAST, HANG, compose_config, says

GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("data", "model", "optimizer", "scheduler")}


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapens.train", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG)


def test_groups_hold_the_options_the_design_names():
    assert GROUPS["data"] == ["cifar10", "cifar100", "digits", "imagefolder", "synthetic"]
    assert GROUPS["model"] == ["resnet110", "resnet20", "resnet32", "resnet44", "resnet56", "timm", "torchvision",
                               "wrn16_4", "wrn28_10"]
    assert GROUPS["optimizer"] == ["adamw", "sgd"]
    assert GROUPS["scheduler"] == ["adaptive_sgdr", "constant", "cosine", "cyclic", "fge", "onecycle", "sgdr",
                                   "snapshot", "step"]


@pytest.mark.parametrize("name", GROUPS["scheduler"])
def test_every_scheduler_builds_with_its_defaults(make_cfg, name):
    """Each scheduler file's defaults make a valid schedule over a budget that fits it (SGDR: 150 epochs)."""
    cfg = make_cfg(f"scheduler={name}")
    schedule = build_schedule(cfg.scheduler, cfg.trainer.epochs, steps_per_epoch=3)
    assert schedule.total_steps == 450
    assert schedule.cycle_ends()[-1] == 450
    assert 0 < schedule.lr(0) <= cfg.scheduler.eta_max


def test_sgdr_defaults_snapshot_at_the_papers_epochs(make_cfg):
    """T_0=10, T_mult=2 over 150 epochs ends cycles at 10, 30, 70, 150 epochs (arXiv 1608.03983)."""
    cfg = make_cfg("scheduler=sgdr")
    assert build_schedule(cfg.scheduler, 150, steps_per_epoch=391).cycle_ends() == [3910, 11730, 27370, 58650]


def test_a_budget_within_a_step_of_a_cycle_end_is_that_cycle_end(make_cfg):
    """Non-integer T_mult rounds each cycle to whole steps; the cycle ends it prints are budgets it accepts."""
    cfg = make_cfg("scheduler=sgdr", "scheduler.T_mult=1.5")
    with pytest.raises(SnapensError, match="cycles end at 10, 25, 47.5013 epochs") as info:
        build_schedule(cfg.scheduler, 40, steps_per_epoch=391)
    suggested = float(str(info.value).split("cycles end at 10, 25, ")[1].split(" ")[0])
    for epochs in (47.5, suggested):
        schedule = build_schedule(cfg.scheduler, epochs, steps_per_epoch=391)
        assert schedule.cycle_ends() == [3910, 3910 + 5865, 3910 + 5865 + 8798]


def test_lengths_in_steps(make_cfg):
    cfg = make_cfg("scheduler=sgdr", "scheduler.unit=step", "scheduler.T_0=5", "scheduler.T_mult=1")
    assert build_schedule(cfg.scheduler, 3, steps_per_epoch=10).cycle_ends() == [5, 10, 15, 20, 25, 30]


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("overrides", [[f"{g}={o}"] for g, options in GROUPS.items() for o in options]
                         + [[f"experiment={e}"] for e in EXPERIMENTS], ids=" ".join)
def test_every_option_sets_every_key(make_cfg, overrides):
    """The schemas give types only: each yaml (with conf/base/) sets every key its schema declares; data.root of
    data=imagefolder is left for the user on purpose."""
    cfg = make_cfg(*overrides)
    if OmegaConf.is_missing(cfg.data, "root"):
        assert cfg.data.name == "imagefolder"
        cfg = make_cfg(*overrides, "data.root=DIR")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("name", ["lr_find", "ensemble"])
def test_entry_point_configs_set_every_key(name):
    OmegaConf.to_container(compose_config(name=name), resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("overrides, key, fix", [
    (["scheduler=cyclic", "scheduler.mode=sine"], "scheduler.mode=sine", "('triangular', 'triangular2', 'exp_range')"),
    (["scheduler=onecycle", "scheduler.anneal=exp"], "scheduler.anneal=exp", "('cos', 'linear')"),
    (["scheduler=onecycle", "scheduler.base_momentum=0.99"], "scheduler.base_momentum=0.99", "[0, max_mom"),
    (["scheduler=snapshot", "scheduler.cycles=0"], "scheduler.cycles=0", "positive number of steps"),
    (["scheduler=cosine", "scheduler.warmup=-1"], "scheduler.warmup=-1.0", "non-negative number of steps"),
    (["scheduler=cosine", "scheduler.warmup=150"], "scheduler.warmup=150.0",
     "shorter than the schedule (total_steps=450)"),
    (["scheduler=sgdr", "scheduler.eta_max=inf"], "scheduler.eta_max=inf", "finite learning rate > 0"),
    (["scheduler=sgdr", "scheduler.T_0=nan"], "scheduler.T_0=nan", "finite number"),
    (["scheduler=adaptive_sgdr", "scheduler.T_mult=0.5"], "scheduler.T_mult=0.5", ">= 1"),
])
def test_schedule_classes_check_their_arguments_and_the_key_is_named(make_cfg, overrides, key, fix):
    """A value that a schedule class checks is checked there only; build_schedule names the key in one line."""
    cfg = make_cfg(*overrides)
    with pytest.raises(SnapensError) as info:
        build_schedule(cfg.scheduler, cfg.trainer.epochs, steps_per_epoch=3)
    assert str(info.value).startswith(key)
    says(info.value, fix)


def test_model_config_instantiates_into_a_module(make_cfg):
    cfg = make_cfg("model=resnet32", "data=cifar100")
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module) and model.fc.out_features == 100


@pytest.mark.parametrize("overrides, key, fix", [
    (["scheduler.T_0=0"], "scheduler.T_0=0.0", "positive number of steps"),
    (["scheduler.eta_min=0.5"], "scheduler.eta_min=0.5", "not exceed scheduler.eta_max=0.1"),
    (["scheduler=step", "scheduler.milestones=[10,5]"], "scheduler.milestones=[10.0, 5.0]", "ascending order"),
    (["trainer.epochs=100", "scheduler.T_0=10", "scheduler.T_mult=2"], "trainer.epochs=100",
     "cycles end at 10, 30, 70, 150 epochs"),
    (["trainer.device=gpu"], "trainer.device=gpu", "auto, cpu, cuda"),
    (["trainer.clip_mode=l2"], "trainer.clip_mode=l2", "norm, value"),
    (["ensemble.rule=median"], "ensemble.rule=median", "logits, probs, vote"),
    (["trainer.batch_size=0"], "trainer.batch_size=0", "> 0"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1.0", ">= 0"),
    (["scheduler.T_mult=0.5"], "scheduler.T_mult=0.5", ">= 1"),
    (["scheduler.T_0=0.001"], "scheduler.T_0=0.001", "shorter than one step"),
    (["trainer.epochs=inf"], "trainer.epochs=inf", "finite number > 0"),
    (["trainer.epochs=0.1"], "trainer.epochs=0.1", "one step (4 steps per epoch)"),
    (["optimizer.name=foo"], "optimizer.name=foo", "sgd, adamw"),
    (["model.depth=9"], "model.depth", "6n+2 between 8 and 1202 (20, 32, 44, 56, 110), got 9"),
    (["optimizer.momentum=-1"], "optimizer.momentum=-1.0", ">= 0 and <= 1"),
    (["optimizer.nesterov=true", "optimizer.momentum=0"], "optimizer.nesterov=true", "set optimizer.momentum > 0"),
    (["optimizer=adamw", "optimizer.beta2=2"], "optimizer.beta2=2.0", ">= 0 and <= 1"),
    (["optimizer=adamw", "optimizer.eps=-1"], "optimizer.eps=-1.0", "> 0"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1.0", ">= 0"),
    (["trainer.grad_clip=nan"], "trainer.grad_clip=nan", "finite number >= 0"),
    (["trainer.label_smoothing=nan"], "trainer.label_smoothing=nan", "finite number >= 0"),
    (["scheduler=onecycle", "scheduler.max_momentum=1.5"], "scheduler.max_momentum=1.5", "[0, 1]"),
    (["trainer.snapshot_every=0.01"], "trainer.snapshot_every=0.01", "shorter than one step"),
    (["trainer.snapshot_every=nan"], "trainer.snapshot_every=nan", "finite number >= 0"),
    (["scheduler=adaptive_sgdr", "data.val_size=32", "scheduler.extension_factor=nan"],
     "scheduler.extension_factor=nan", "> 1"),
    (["trainer.seed=12345678901234567890"], "trainer.seed=12345678901234567890", ">= 0 and <="),
    (["data.image_size=100000"], "data.image_size=100000", "<= 4096"),
    (["data.crop_padding=100000"], "data.crop_padding=100000", "<= 64"),
    (["data.test_size=0"], "data.test_size=0", "> 0"),
    (["data.storage=disk"], "data.storage=disk", "auto, memory, stream"),
    (["data.crop=center"], "data.crop=center", "pad, resized"),
    (["data.workers=-1"], "data.workers=-1", ">= 0"),
    (["data.memory_gib=-1"], "data.memory_gib=-1.0", ">= 0"),
    (["scheduler.T_0=1", "scheduler.T_mult=1", "trainer.epochs=3", "scheduler.warmup=1.5"], "scheduler.warmup=1.5",
     "shorter than the first cycle (4 steps)"),
    (["scheduler=fge", "scheduler.warmup=1", "scheduler.warmup_every_cycle=true"], "scheduler.warmup_every_cycle",
     "scheduler=fge"),
    (["scheduler=fge", "trainer.epochs=10"], "scheduler.cycles=6", "6 cycles of 16 steps take 88"),
    (["scheduler.T_0=1", "scheduler.eta_min=0.02", "scheduler.decay=0.5", "trainer.epochs=15"],
     "scheduler.decay=0.5", "cycle 4 below scheduler.eta_min=0.02"),
    (["scheduler=step", "scheduler.milestones=[0.5,1]"], "scheduler.milestones=[0.5, 1.0]", "at or beyond"),
    (["scheduler=step", "scheduler.unit=epoch", "scheduler.milestones=[75,112.5]", "trainer.epochs=2"],
     "scheduler.milestones=[75.0, 112.5] (epochs)", "at or beyond"),
    (["scheduler=onecycle", "scheduler.warmup=1"], "scheduler.warmup", "its rise over pct_start is the warmup"),
    (["scheduler=cyclic", "trainer.epochs=45"], "trainer.epochs=45", "cycles end at 30, 60 epochs"),
    (["scheduler.T_mult=1", "trainer.epochs=99.5"], "trainer.epochs=99.5",
     "cycles end at 10, 20, 30, ..., 80, 90, 100 epochs"),
])
def test_bad_values_fail_before_training(make_cfg, tmp_path, overrides, key, fix):
    """Each bad value raises one line naming the key and the fix; nothing is written to the run dir."""
    cfg = make_cfg(*FAST, *overrides)
    with pytest.raises(SnapensError) as info:
        train(cfg, tmp_path / "run")
    says(info.value, key, fix)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_unknown_option_lists_the_choices(tmp_path):
    result = run_cli("scheduler=sgdrr", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("snapens: error: scheduler=sgdrr is not an option; choose one of: "
                                     + ", ".join(GROUPS["scheduler"]))


@pytest.mark.parametrize("override, message", [
    ("scheduler.T0=3", "scheduler.T0 is not a key of scheduler; did you mean scheduler.T_0?"),
    ("trainer.batch_size=abc", "trainer.batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.epochs=[1", "cannot parse an override: no viable alternative at input '[1'"),
])
def test_cli_hydra_errors_are_one_line_with_the_fix(tmp_path, override, message):
    """Hydra's own multi-line errors (its hint for a misspelt key even suggests +key, which snapens refuses)."""
    result = run_cli("data=synthetic", override, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"snapens: error: {message}")


def test_cli_refuses_an_unwritable_run_dir_in_one_line(tmp_path):
    """A read-only place (a read-only mount here, since the tests may run as root) for a new or an existing run dir:
    one line before Hydra makes the dir or opens its log there."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mount / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        for run_dir in (mount / "new", mount / "existing"):
            result = run_cli(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
            assert result.returncode == 2 and result.stderr.strip().splitlines() == [
                f"snapens: error: cannot write {run_dir}: {run_dir if run_dir.exists() else mount} is not writable; "
                "pass a writable hydra.run.dir=DIR"]
        for module, out in (("snapens.ensemble", mount / "report"), ("snapens.export", mount / "e.pt2")):
            result = subprocess.run([sys.executable, "-m", module, f"run={tmp_path}", f"out={out}"], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=HANG)
            assert result.returncode == 2 and result.stderr.strip().splitlines() == [
                f"snapens: error: cannot write {out}: {mount} is not writable; pass a writable out="]
    finally:
        subprocess.run(["umount", str(mount)])


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path):
    result = run_cli(*FAST, "trainer.epochs=100", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("snapens: error: ")
    says(result.stderr, "trainer.epochs=100", "cycles end at 10, 30, 70, 150 epochs", "set trainer.epochs")


def test_cli_rerun_into_a_finished_run_dir_changes_nothing(tmp_path):
    """Hydra itself would rewrite .hydra/ before the job starts; snapens writes it only into a new run dir."""
    run_dir = tmp_path / "run"
    first = run_cli(*FAST, "scheduler.T_0=1", "scheduler.T_mult=1", "trainer.epochs=1", f"hydra.run.dir={run_dir}",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"}
    assert run_dir / ".hydra" / "config.yaml" in before and run_dir / ".hydra" / "overrides.yaml" in before
    again = run_cli(*FAST, "scheduler.T_0=1", "scheduler.T_mult=1", "trainer.epochs=2", "trainer.seed=5",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 2
    assert "the config differs in trainer.epochs, trainer.seed" in again.stderr
    assert before == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"}


def test_cli_imagefolder_needs_a_root(tmp_path):
    result = run_cli("data=imagefolder", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("snapens: error: ")
    says(result.stderr, "data.root", "data=imagefolder", "pass data.root=DIR")


def test_offline_cifar_without_files_says_what_to_put_where(make_cfg, tmp_path):
    cfg = make_cfg("data=cifar10", f"data.root={tmp_path}", "data.download=false", "trainer.device=cpu")
    with pytest.raises(SnapensError, match=f"cifar10 is not in {tmp_path}: put cifar-10-batches-py/"):
        train(cfg, tmp_path / "run")


def test_class_count_must_match_the_folders(make_cfg, tmp_path):

    for split in ("train", "test"):
        for name in ("cat", "dog", "emu"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / name / "0.png")
    cfg = make_cfg("data=imagefolder", f"data.root={tmp_path / 'data'}", "trainer.device=cpu")
    with pytest.raises(SnapensError) as info:
        train(cfg, tmp_path / "run")
    says(info.value, "data.num_classes=10", "set data.num_classes=3")


@pytest.mark.parametrize("make_tree, message", [
    (lambda root: (root / "train").mkdir(parents=True), "has no test/ folder"),
    (lambda root: [(root / s).mkdir(parents=True) for s in ("train", "test")], "has no images"),
    (lambda root: [(root / s / "cat").mkdir(parents=True) for s in ("train", "test")], "has no images"),
])
def test_image_folder_without_images(make_cfg, tmp_path, make_tree, message):
    make_tree(tmp_path / "data")
    cfg = make_cfg("data=imagefolder", f"data.root={tmp_path / 'data'}", "trainer.device=cpu")
    with pytest.raises(SnapensError, match=message):
        train(cfg, tmp_path / "run")


def test_c10_fast_preset_only_overrides(make_cfg):
    """experiment=c10_fast: WRN-16-4, 3 snapshot cycles of 10 epochs over 30, bf16 and compile; the data root is still
    the user's to give, and every other key keeps its default."""
    cfg, plain = make_cfg("experiment=c10_fast", "data.root=DIR"), make_cfg()
    assert (cfg.model.depth, cfg.model.widen_factor, cfg.model.num_classes) == (16, 4, 10)
    assert (cfg.data.name, cfg.data.root, cfg.data.cutout) == ("imagefolder", "DIR", 8)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.precision, cfg.trainer.compile) == \
        (30, 256, "bf16", True)
    assert build_schedule(cfg.scheduler, cfg.trainer.epochs, steps_per_epoch=196).cycle_ends() == [1960, 3920, 5880]
    assert cfg.trainer.seed == plain.trainer.seed and cfg.ensemble == plain.ensemble
    assert cfg.optimizer.nesterov and cfg.optimizer.momentum == plain.optimizer.momentum


def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    command = [sys.executable, "-m", "snapens.train", *FAST, "trainer.epochs=1", "scheduler=cosine",
               "data.train_size=64", "data.test_size=16"]
    jobs = [subprocess.Popen([*command, f"trainer.seed={seed}"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for job in jobs:
        _, err = job.communicate(timeout=HANG)
        assert job.returncode == 0, err
    runs = sorted(p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir())
    assert len(runs) == 2
    seeds = {load_checkpoint(checkpoint_path(run))["config"]["trainer"]["seed"] for run in runs}
    assert seeds == {0, 1}


# ---- 8. keys that do not exist, even appended with + ---------------------------------------------------------------
@pytest.mark.parametrize("override, key, fix", [
    ("+trainer.epoch=3", "trainer.epoch", "did you mean trainer.epochs?"),
    ("+data.trainlimit=5", "data.trainlimit", "did you mean data.train_limit?"),
    ("+scheduler.T0=3", "scheduler.T0", "did you mean scheduler.T_0?"),
    ("+trainer.swa.begin=0.5", "trainer.swa.begin", "did you mean trainer.swa.start?"),
    ("+foo=1", "foo", "data, ensemble, logger, model"),
    ("++trainers.epochs=3", "trainers", "did you mean trainer?"),
])
def test_unknown_keys_are_refused_even_with_plus(make_cfg, tmp_path, override, key, fix):
    with pytest.raises(SnapensError) as info:
        train(make_cfg(*EQUAL_CYCLES_2, override), tmp_path)
    says(info.value, key, fix)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, key, fix", [
    ("trainer.swa.start=1.0", "trainer.swa.start=1.0", "or null to disable"),
    ("trainer.label_smoothing=1.0", "trainer.label_smoothing=1.0", "must be in"),
    ("trainer.accumulate=0", "trainer.accumulate=0", "> 0"),
    ("trainer.keep_snapshots=-1", "trainer.keep_snapshots=-1", ">= 0"),
    ("scheduler=adaptive_sgdr data.val_size=32 scheduler.warmup_every_cycle=true", "scheduler.warmup_every_cycle",
     "leave warmup_every_cycle=false"),
    ("scheduler=adaptive_sgdr data.val_size=32 scheduler.extension_factor=1.0", "scheduler.extension_factor=1.0",
     "> 1"),
    ("scheduler=adaptive_sgdr data.val_size=32 scheduler.patience=0", "scheduler.patience=0", "finite number"),
    ("trainer.num_threads=100000", "trainer.num_threads=100000", "give at most"),
    ("trainer.sync_bn=true", "trainer.sync_bn=true", "leave it false, or launch with torchrun"),
    ("trainer.epochs=1e30", "trainer.epochs=1e+30", "lower trainer.epochs"),
])
def test_bad_option_values(make_cfg, tmp_path, override, key, fix):
    with pytest.raises(SnapensError) as info:
        train(make_cfg(*EQUAL_CYCLES_3, *override.split()), tmp_path)
    says(info.value, key, fix)
