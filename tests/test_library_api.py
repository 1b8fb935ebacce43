"""The library API for your own loop: schedules as torch LRSchedulers, and SnapshotEnsemble."""

import io

import pytest
import torch
import torch.nn.functional as F

import snapens
from snapens import schedules
from snapens.ensemble.rules import combine
from snapens.ensemble.snapshot_ensemble import SnapshotEnsembleError

from conftest import says

ADAPTERS = [
    (snapens.SGDR, schedules.SGDR, dict(T_0=5, T_mult=2, total_steps=35, eta_min=0.001, decay=0.8)),
    (snapens.Snapshot, schedules.Snapshot, dict(total_steps=30, cycles=3)),
    (snapens.Cosine, schedules.Cosine, dict(total_steps=20, eta_min=0.01)),
    (snapens.StepDecay, schedules.StepDecay, dict(total_steps=20, milestones=(5, 15))),
    (snapens.Constant, schedules.Constant, dict(total_steps=7)),
    (snapens.OneCycle, schedules.OneCycle, dict(total_steps=25)),
    (snapens.Cyclic, schedules.Cyclic, dict(eta_min=0.01, step_size_up=4, total_steps=24)),
]


def sgd(lr=0.1, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=lr, momentum=0.9)


@pytest.mark.parametrize("adapter, pure, kwargs", ADAPTERS, ids=[a[1].__name__ for a in ADAPTERS])
def test_adapter_gives_the_pure_schedules_values_at_every_update(adapter, pure, kwargs):
    optimizer = sgd(lr=0.1, groups=2)
    scheduler = adapter(optimizer, **kwargs)
    reference = pure(eta_max=0.1, **kwargs)
    ends = reference.cycle_ends()
    for t in range(reference.total_steps):
        assert [g["lr"] for g in optimizer.param_groups] == [reference.lr(t)] * 2  # the rate of update t, exactly
        if reference.momentum(t) is not None:
            assert [g["momentum"] for g in optimizer.param_groups] == [reference.momentum(t)] * 2
        optimizer.step()
        scheduler.step()
        assert scheduler.is_cycle_end == (t + 1 in ends)
    assert scheduler.get_last_lr() == [reference.lr(reference.total_steps - 1)] * 2  # the budget spent: it stays


def test_cycle_and_position_around_sgdr_restarts():
    optimizer = sgd()
    scheduler = snapens.SGDR(optimizer, T_0=2, T_mult=2, total_steps=6)  # cycles end after updates 2 and 6
    seen = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        seen.append((scheduler.updates_done, scheduler.cycle, scheduler.cycle_position, scheduler.is_cycle_end))
    assert seen == [(1, 1, 0.5, False), (2, 1, 1.0, True), (3, 2, 0.25, False), (4, 2, 0.5, False),
                    (5, 2, 0.75, False), (6, 2, 1.0, True)]


def saved_and_loaded(state: dict) -> dict:
    """Through torch.save and torch.load(weights_only=True): no pickled objects allowed."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_adapter_state_dict_resumes_and_loads_without_pickle():
    optimizer = sgd()
    scheduler = snapens.SGDR(optimizer, T_0=3, total_steps=9)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = saved_and_loaded(scheduler.state_dict())
    optimizer2 = sgd()
    resumed = snapens.SGDR(optimizer2, T_0=3, total_steps=9)
    resumed.load_state_dict(state)
    for _ in range(3):
        optimizer.step(), scheduler.step(), optimizer2.step(), resumed.step()
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        assert resumed.cycle == scheduler.cycle


def test_step_with_an_epoch_is_refused():
    scheduler = snapens.SGDR(sgd(), T_0=3, total_steps=9)
    with pytest.raises(TypeError, match="once after every optimizer update"):
        scheduler.step(3)


def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return x, y


def loader(x, y, batch=32):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def test_plain_pytorch_loop_with_sgdr_and_snapshot_ensemble(tmp_path):
    """The README's loop: SGDR stepped per update, a snapshot at each cycle end, ensemble numbers at the end."""
    torch.manual_seed(0)
    x, y = tiny_data()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = snapens.SGDR(optimizer, T_0=9, T_mult=1, total_steps=27)
    ensemble = snapens.SnapshotEnsemble(folder=tmp_path / "snaps", max_snapshots=2)
    kept = []
    for _ in range(9):
        for xb, yb in loader(x, y):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if scheduler.is_cycle_end:
                ensemble.add(model, cycle=scheduler.cycle)
                kept.append({k: v.clone() for k, v in model.state_dict().items()})
    assert len(ensemble) == 2 and ensemble.added == 3
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["cycle_02.safetensors", "cycle_03.safetensors"]

    # Independently: the last two cycles' weights, each run over the data, logits averaged.
    logits = []
    for state in kept[1:]:
        model.load_state_dict(state)
        with torch.no_grad():
            logits.append(model(x))
    logits = torch.stack(logits)
    result = ensemble.evaluate(loader(x, y))
    accs = [(lg.argmax(1) == y).double().mean().item() for lg in logits]
    nlls = [F.cross_entropy(lg.double(), y).item() for lg in logits]
    assert [s["acc"] for s in result["snapshots"]] == pytest.approx(accs, abs=1e-12)
    assert [s["nll"] for s in result["snapshots"]] == pytest.approx(nlls, rel=1e-5)
    # Members are numbered by add (cycle_01 was dropped by max_snapshots=2), named as their files.
    files = [str(tmp_path / "snaps" / f"cycle_{c:02d}.safetensors") for c in (2, 3)]
    assert [(s["file"], s["name"], s["cycle"], s["step"]) for s in result["snapshots"]] == [
        (files[0], "cycle_02", 2, None), (files[1], "cycle_03", 3, None)]
    assert result["single"] == result["snapshots"][-1]
    assert result["ensemble"]["acc"] == pytest.approx((logits.mean(0).argmax(1) == y).double().mean().item(),
                                                      abs=1e-12)
    assert result["ensemble"]["nll"] == pytest.approx(F.cross_entropy(logits.mean(0).double(), y).item(), rel=1e-5)
    assert (result["ensemble"]["rule"], result["ensemble"]["members"]) == ("logits", files)
    assert (result["split"], result["num_images"], result["rule"]) == (None, len(y), "logits")
    assert ensemble.evaluate(loader(x, y), rule="vote")["ensemble"]["nll"] is None
    for rule in ("logits", "probs", "vote"):
        torch.testing.assert_close(ensemble.predict(loader(x, y), rule=rule), combine(logits, rule))


def test_in_memory_ensemble_copies_the_weights_at_add():
    x, y = tiny_data()
    model = torch.nn.Linear(8, 4)
    ensemble = snapens.SnapshotEnsemble()
    ensemble.add(model)
    before = model(x).detach()
    with torch.no_grad():
        model.weight.add_(1.0)  # training on must not change the member
    torch.testing.assert_close(ensemble.predict(loader(x, y)), before)


def test_identical_members_give_the_single_model_numbers():
    x, y = tiny_data()
    model = torch.nn.Linear(8, 4)
    ensemble = snapens.SnapshotEnsemble()
    for _ in range(3):
        ensemble.add(model)
    result = ensemble.evaluate(loader(x, y))
    scores = {k: result["snapshots"][0][k] for k in ("acc", "nll", "ece")}
    assert {k: result["ensemble"][k] for k in scores} == {k: result["single"][k] for k in scores} == scores
    assert result["ensemble"]["members"] == ["cycle_01", "cycle_02", "cycle_03"]  # in memory: no files


def test_misuse_gets_one_clear_error(tmp_path):
    x, y = tiny_data()
    empty = snapens.SnapshotEnsemble()
    with pytest.raises(SnapshotEnsembleError, match="the ensemble is empty"):
        empty.predict(loader(x, y))
    with pytest.raises(ValueError, match="rule='median' is not allowed"):
        empty.evaluate(loader(x, y), rule="median")  # checked before any pass over the loader
    mixed = snapens.SnapshotEnsemble()
    mixed.add(torch.nn.Linear(8, 4))
    with pytest.raises(SnapshotEnsembleError, match="one architecture"):
        mixed.add(torch.nn.Sequential(torch.nn.Linear(8, 4)))
    mixed.add(torch.nn.Linear(8, 4))
    shuffled = iter([loader(x, y), loader(x.flip(0), y.flip(0))])

    class Reshuffling:
        def __iter__(self):
            return iter(next(shuffled))

    with pytest.raises(SnapshotEnsembleError, match="shuffle=False"):
        mixed.evaluate(Reshuffling())
    (tmp_path / "cycle_01.safetensors").write_bytes(b"keep me")
    with pytest.raises(SnapshotEnsembleError, match="already holds snapshots .*; give the ensemble an empty folder"):
        snapens.SnapshotEnsemble(folder=tmp_path)  # refused when made, not after the first cycle of training
    assert (tmp_path / "cycle_01.safetensors").read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="max_snapshots"):
        snapens.SnapshotEnsemble(max_snapshots=0)


# ---- per-group rates, tensor lrs, floats (issue 11) -----------------------------------------------------------------
TORCH_TWINS = [  # (snapens adapter, kwargs, torch scheduler factory, updates)
    (snapens.SGDR, dict(T_0=5, T_mult=2, total_steps=35, eta_min=0.001),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=0.001), 35),
    (snapens.Cosine, dict(total_steps=20, eta_min=0.0005),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.0005), 20),
    (snapens.StepDecay, dict(total_steps=20, milestones=(5, 15), gamma=0.5),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 15], gamma=0.5), 20),
    (snapens.OneCycle, dict(total_steps=25, eta_max=[0.3, 0.03, 0.003]),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.3, 0.03, 0.003], total_steps=25), 25),
    (snapens.Cyclic, dict(eta_min=[0.01, 0.001, 0.0001], eta_max=[0.1, 0.01, 0.001], step_size_up=4, total_steps=24),
     lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=[0.01, 0.001, 0.0001], max_lr=[0.1, 0.01, 0.001],
                                                 step_size_up=4), 24),
]


def three_groups(lr=None):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    lrs = lr or [0.1, 0.01, 0.001]
    return torch.optim.SGD([{"params": [p], "lr": r} for p, r in zip(params, lrs)], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("adapter, kwargs, twin, updates", TORCH_TWINS, ids=[t[0].__name__ for t in TORCH_TWINS])
def test_each_group_follows_its_own_rate_as_torch_does(adapter, kwargs, twin, updates):
    mine, theirs = three_groups(), three_groups()
    ours, reference = adapter(mine, **kwargs), twin(theirs)
    for t in range(updates):
        for a, b in zip(mine.param_groups, theirs.param_groups):
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=0)
            assert a["momentum"] == pytest.approx(b["momentum"], rel=1e-12)
            assert type(a["lr"]) is float
        mine.step(), theirs.step()
        ours.step(), reference.step()


@pytest.mark.parametrize("adapter, pure, kwargs", ADAPTERS, ids=[a[1].__name__ for a in ADAPTERS])
def test_a_tensor_lr_does_not_move_the_schedule(adapter, pure, kwargs):
    """torch updates a tensor lr in place: the schedule must not feed on its own output."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=torch.tensor(0.1), momentum=0.9)
    scheduler = adapter(optimizer, **kwargs)
    reference = pure(eta_max=0.1, **kwargs)
    for t in range(reference.total_steps):
        assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(reference.lr(t), rel=1e-6)
        optimizer.step()
        scheduler.step()
    assert isinstance(reference.lr(0), float) and isinstance(pure(eta_max=torch.tensor(0.1), **kwargs).lr(0), float)


def test_triangular2_past_1024_cycles_underflows_to_the_floor():
    cyclic = schedules.Cyclic(0.01, 0.1, step_size_up=1, total_steps=5000, mode="triangular2")
    assert cyclic.lr(2 * 1100 + 1) == 0.01  # torch's CyclicLR raises OverflowError here
    assert cyclic.lr(2 * 10 + 1) == 0.01 + 0.09 / 2**10  # exactly torch's value while it is finite


def test_state_dict_round_trip_keeps_and_checks_the_settings():
    optimizer = three_groups()
    scheduler = snapens.SGDR(optimizer, T_0=5, T_mult=2, total_steps=35, eta_min=0.001)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    state = saved_and_loaded(scheduler.state_dict())
    again = three_groups()
    resumed = snapens.SGDR(again, T_0=5, T_mult=2, total_steps=35, eta_min=0.001)
    resumed.load_state_dict(state)
    resumed.step()
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in optimizer.param_groups]
    other = snapens.SGDR(three_groups(), T_0=7, T_mult=2, total_steps=49, eta_min=0.001)
    with pytest.raises(ValueError, match=r"saved by a scheduler with T_0=5 \(group 0\), this one has 7"):
        other.load_state_dict(state)


@pytest.mark.parametrize("adapter, kwargs, twin", [
    (snapens.SGDR, dict(T_0=5, T_mult=2, total_steps=35, eta_min=0.2),  # eta_min > lr: upward annealing
     lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=0.2)),
    (snapens.StepDecay, dict(total_steps=20, milestones=[15, 0, 5]),  # unsorted, one at 0
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[15, 0, 5])),
], ids=["upward", "milestones"])
def test_what_torch_accepts_is_accepted_with_torchs_values(adapter, kwargs, twin):
    mine, theirs = three_groups(), three_groups()
    ours, reference = adapter(mine, **kwargs), twin(theirs)
    for _ in range(20):
        assert [g["lr"] for g in mine.param_groups] == pytest.approx([g["lr"] for g in theirs.param_groups],
                                                                     rel=1e-12, abs=0)
        mine.step(), theirs.step()
        ours.step(), reference.step()


def test_cycling_momentum_on_an_optimizer_without_it_is_refused():
    rprop = torch.optim.Rprop([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError) as info:
        snapens.OneCycle(rprop, total_steps=10)
    says(info.value, "cycle_momentum=True", "momentum or betas")
    snapens.OneCycle(rprop, total_steps=10, cycle_momentum=False)


# ---- open-ended schedules (no total_steps), as torch's --------------------------------------------------------------
NO_UPDATES = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no training here


@pytest.mark.slow
@NO_UPDATES
def test_open_ended_sgdr_stepped_200_000_times_is_torchs_warm_restarts():
    mine, theirs = three_groups(), three_groups()
    ours = snapens.SGDR(mine, T_0=7, T_mult=2, eta_min=0.001)  # no total_steps: it runs as long as you step it
    reference = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(theirs, T_0=7, T_mult=2, eta_min=0.001)
    restarts = {7 * (2**i - 1) for i in range(1, 15)}  # the cycle ends it reaches: 7, 21, 49, ..., 114,681
    for k in range(1, 200_001):
        ours.step()
        reference.step()
        if k % 997 == 0 or k in restarts or k - 1 in restarts:
            assert [g["lr"] for g in mine.param_groups] == pytest.approx(
                [g["lr"] for g in theirs.param_groups], rel=1e-12, abs=1e-15), k
            assert ours.is_cycle_end == (k in restarts)


@NO_UPDATES
def test_open_ended_schedules_and_their_cycle_ends():
    optimizer = three_groups()
    cyclic = snapens.Cyclic(optimizer, eta_min=0.01, eta_max=0.1, step_size_up=3)  # period 6, no budget
    reference = torch.optim.lr_scheduler.CyclicLR(three_groups(), base_lr=0.01, max_lr=0.1, step_size_up=3)
    for k in range(1, 40):
        cyclic.step()
        reference.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0], rel=1e-12)
        assert cyclic.is_cycle_end == (k % 6 == 0) and cyclic.cycle == (k - 1) // 6 + 1
        assert cyclic.cycle_position == pytest.approx((k - 6 * ((k - 1) // 6)) / 6)
    step = snapens.StepDecay(three_groups(), milestones=(3,), gamma=0.5)
    for _ in range(10):
        step.step()
    assert step.get_last_lr() == pytest.approx([0.05, 0.005, 0.0005]) and not step.is_cycle_end and step.cycle == 1
    with pytest.raises(TypeError):  # whose shape needs the budget: cosine, OneCycle, snapshot
        snapens.Cosine(three_groups())


def test_a_warmup_past_the_first_cycle_is_refused():
    with pytest.raises(ValueError) as info:
        schedules.Warmup(schedules.SGDR(0.1, 7), 7)
    says(info.value, "warmup_steps", "shorter than the first cycle (7 steps)")
    with pytest.raises(ValueError, match=r"shorter than the first cycle \(5 steps\), got 6"):
        schedules.Warmup(schedules.SGDR(0.1, 5, 35, T_mult=2), 6)
    assert schedules.Warmup(schedules.Cosine(0.1, 20), 10).lr(9) == schedules.Cosine(0.1, 20).lr(10) * 10 / 11


@NO_UPDATES
def test_a_budget_that_stops_inside_a_cycle_is_no_cycle_end():
    """SGDR cycles of 5, 10, 20 updates end after 5, 15, 35: a budget of 20 stops inside the third, where the rate
    is not at its minimum, so no snapshot is due there; the rate of update 19 stays after the budget."""
    scheduler = snapens.SGDR(three_groups(), T_0=5, T_mult=2, total_steps=20)
    ends = []
    for k in range(1, 26):
        scheduler.step()
        if scheduler.is_cycle_end:
            ends.append(k)
    assert ends == [5, 15] and scheduler.cycle == 3
    assert scheduler.cycle_position == pytest.approx(5 / 20)  # updates 15..19 of the 20-update third cycle
    assert scheduler.get_last_lr()[0] == schedules.SGDR(0.1, 5, 20, T_mult=2).lr(19)


def test_groups_must_share_budget_and_cycles_and_warmup_of_an_open_ended_constant():
    with pytest.raises(ValueError, match="must share the budget and the cycles"):
        snapens.ScheduleLR(sgd(groups=2), [schedules.SGDR(0.1, 10, 100), schedules.SGDR(0.1, 10, 50)])
    warm = schedules.Warmup(schedules.Constant(0.1), 5, every_cycle=True)  # no cycles: one warmup at the start
    assert [warm.lr(t) for t in (0, 4, 5, 10**6)] == [0.1 / 6, 0.1 * 5 / 6, 0.1, 0.1]


def test_every_module_imports_first():
    """Whichever snapens module a user (or an entry point, which imports its job late) imports first, it imports: no
    import cycle that only works in one order (snapens.adaptive and snapens.schedules once had one). One process,
    snapens forgotten before each module; the package's lazy names (snapens.Ensemble, ...) resolve too."""
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(snapens.__file__).parent
    modules = sorted(".".join(("snapens", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
                     for p in root.rglob("*.py") if p.name != "__main__.py")
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m == 'snapens' or m.startswith('snapens.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n"
            "import snapens\nprint(sorted(n for n in snapens.__all__ if getattr(snapens, n) is None))")
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr[-2000:]
    assert len(modules) > 40 and "snapens.schedules" in modules and "snapens.training" in modules
