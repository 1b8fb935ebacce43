"""Tests for snapens.schedules: exact values, cycle invariants, and agreement with torch."""

import ast
import dataclasses
import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from snapens import build, schedules
from snapens.build import build_schedule
from snapens.errors import SnapensError
from snapens.schedules import (
    FGE,
    SGDR,
    Constant,
    Cosine,
    CosineCycles,
    Cyclic,
    OneCycle,
    Schedule,
    Snapshot,
    StepDecay,
    Warmup,
    geometric_lengths,
)
from snapens.snapshots import snapshot_steps

from conftest import FAST

SNAPENS = pathlib.Path(__file__).resolve().parents[1] / "snapens"
SCHEDULE_FILES = [*(SNAPENS / "schedules").glob("*.py"), SNAPENS / "adaptive.py"]  # what `import snapens.schedules` runs
TOL = 1e-12


# ---------------------------------------------------------------- torch references


def torch_trace(make_scheduler, steps, lr=0.1, momentum=0.9):
    """lr and momentum of update t = 0..steps-1, read from the optimizer before each step,
    with the scheduler stepped once per update (the way a training loop uses it)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr, momentum=momentum)
    scheduler = make_scheduler(opt)
    lrs, moms = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        scheduler.step()
    return lrs, moms


def max_diff(ours, theirs):
    assert len(ours) == len(theirs)
    return max(abs(a - b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("T_mult", [1, 2, 3])
@pytest.mark.parametrize("T_0", [1, 7, 50])
def test_sgdr_matches_torch_warm_restarts(T_0, T_mult):
    steps = 1000
    ours = SGDR(0.1, T_0, steps, T_mult=T_mult, eta_min=1e-3)
    theirs, _ = torch_trace(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0, T_mult, eta_min=1e-3),
        steps,
    )
    assert max_diff([ours.lr(t) for t in range(steps)], theirs) <= TOL


@pytest.mark.parametrize("eta_min", [0.0, 1e-3])
def test_cosine_matches_torch_cosine_annealing(eta_min):
    # CosineAnnealingLR's recursive update drifts by only ~1e-16 over 1000 steps, so the
    # plain stepping path is compared, not _get_closed_form_lr.
    steps = 1000
    ours = Cosine(0.1, steps, eta_min=eta_min)
    theirs, _ = torch_trace(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps, eta_min=eta_min), steps
    )
    assert max_diff([ours.lr(t) for t in range(steps)], theirs) <= TOL


def test_step_decay_matches_torch_multistep_and_step():
    steps = 600
    milestones = (100, 250, 250, 400)  # a repeated milestone decays twice, as in torch
    ours = StepDecay(0.1, steps, milestones, gamma=0.2)
    theirs, _ = torch_trace(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, list(milestones), gamma=0.2), steps
    )
    assert max_diff([ours.lr(t) for t in range(steps)], theirs) <= TOL

    ours = StepDecay(0.1, steps, tuple(range(90, steps, 90)), gamma=0.5)
    theirs, _ = torch_trace(lambda o: torch.optim.lr_scheduler.StepLR(o, 90, gamma=0.5), steps)
    assert max_diff([ours.lr(t) for t in range(steps)], theirs) <= TOL


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("total_steps, pct_start", [(1000, 0.3), (97, 0.25), (3, 0.5), (1, 0.3)])
def test_onecycle_matches_torch(anneal, three_phase, total_steps, pct_start):
    ours = OneCycle(0.4, total_steps, pct_start=pct_start, anneal=anneal, three_phase=three_phase)
    lrs, moms = torch_trace(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, 0.4, total_steps=total_steps, pct_start=pct_start,
            anneal_strategy=anneal, three_phase=three_phase,
        ),
        total_steps,
    )
    ts = range(total_steps)
    assert max_diff([ours.lr(t) for t in ts], lrs) <= TOL
    assert max_diff([ours.momentum(t) for t in ts], moms) <= TOL


def test_onecycle_momentum_none_when_not_cycled():
    ours = OneCycle(0.4, 100, cycle_momentum=False)
    assert all(ours.momentum(t) is None for t in range(100))
    assert ours.lr(0) == pytest.approx(0.4 / 25)


@pytest.mark.parametrize("mode, gamma", [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.997)])
@pytest.mark.parametrize("up, down", [(20, None), (7, 13), (1, 1)])
def test_cyclic_matches_torch(mode, gamma, up, down):
    steps = 500
    ours = Cyclic(0.01, 0.1, up, steps, step_size_down=down, mode=mode, gamma=gamma)
    lrs, moms = torch_trace(
        lambda o: torch.optim.lr_scheduler.CyclicLR(
            o, base_lr=0.01, max_lr=0.1, step_size_up=up, step_size_down=down, mode=mode, gamma=gamma
        ),
        steps,
    )
    assert max_diff([ours.lr(t) for t in range(steps)], lrs) <= TOL
    assert max_diff([ours.momentum(t) for t in range(steps)], moms) <= TOL


def test_cyclic_cycle_ends_and_no_momentum():
    ours = Cyclic(0.01, 0.1, 7, 100, step_size_down=13, cycle_momentum=False)
    assert ours.cycle_ends() == [20, 40, 60, 80, 100]
    assert Cyclic(0.01, 0.1, 7, 90, step_size_down=13).cycle_ends() == [20, 40, 60, 80, 90]
    assert ours.momentum(5) is None
    assert ours.lr(0) == ours.lr(20) == 0.01 and ours.lr(7) == pytest.approx(0.1)


# ---------------------------------------------------------------- SGDR restarts


@pytest.mark.parametrize("T_0", [1, 7, 390])
@pytest.mark.parametrize("T_mult, offset, index", [(3, 121, 5), (10, 111, 3)])
def test_sgdr_restart_where_log_formula_fails(T_0, T_mult, offset, index):
    # 1+3+9+27+81 = 121 and 1+10+100 = 111: these steps start a new cycle, but the
    # float logarithm used by timm / torch's step(epoch) puts them in the previous one.
    start = offset * T_0
    sgdr = SGDR(0.1, T_0, start + T_0 * T_mult**index, T_mult=T_mult, eta_min=1e-4)
    assert [sgdr.cycle(t) for t in range(max(0, start - 3), start + 3)] == [
        index - 1 if t < start else index for t in range(max(0, start - 3), start + 3)
    ]
    assert sgdr.lr(start) == 0.1
    previous = range(start - T_0 * T_mult ** (index - 1), start)
    assert sgdr.cycle(previous[0]) == index - 1 and sgdr.lr(previous[0]) == 0.1
    assert min(sgdr.lr(t) for t in previous) == sgdr.lr(start - 1)
    assert start in sgdr.cycle_ends()


@pytest.mark.parametrize("T_mult", [1, 2, 3, 1.5])
@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_sgdr_restarts_to_exact_peak(T_mult, decay):
    sgdr = SGDR(0.3, 5, 2000, T_mult=T_mult, eta_min=0.1, decay=decay)
    ends = sgdr.cycle_ends()
    assert sgdr.lr(0) == 0.3
    for i, end in enumerate(ends[:-1]):
        assert sgdr.cycle(end - 1) == i and sgdr.cycle(end) == i + 1
        assert sgdr.lr(end) == 0.3 * decay ** (i + 1)


def test_restart_is_exact_even_where_the_formula_rounds():
    # For this pair eta_min + (eta_max - eta_min) * 1 != eta_max in floating point.
    hi, lo = 0.7958349767894685, 0.19466745934924484
    assert lo + (hi - lo) * (1 + math.cos(0.0)) / 2 != hi
    assert SGDR(hi, 10, 100, eta_min=lo).lr(50) == hi
    assert Snapshot(hi, 100, 4, eta_min=lo).lr(75) == Cosine(hi, 100, eta_min=lo).lr(0) == hi


def cycles_of(schedule):
    ends = schedule.cycle_ends()
    return list(zip([0] + ends[:-1], ends))


@pytest.mark.parametrize(
    "schedule",
    [
        SGDR(0.1, 10, 400, eta_min=1e-3),
        SGDR(0.1, 10, 310, T_mult=2),  # budget ends inside cycle 4 (150..310)
        SGDR(0.1, 3, 500, T_mult=1.5, decay=0.8, eta_min=1e-3),
        Snapshot(0.1, 300, 6),
        Snapshot(0.1, 301, 7, eta_min=1e-3),
        Snapshot(0.2, 5, 5),
    ],
    ids=repr,
)
def test_each_cycle_starts_at_peak_and_ends_at_minimum(schedule):
    for i, (start, end) in enumerate(cycles_of(schedule)):
        values = [schedule.lr(t) for t in range(start, end)]
        assert values[0] == max(values) == schedule.eta_max * getattr(schedule, "decay", 1.0) ** i
        assert values[-1] == min(values)
        assert all(a > b for a, b in zip(values, values[1:]))  # strictly annealing
        assert {schedule.cycle(t) for t in range(start, end)} == {i}


def test_sgdr_non_integer_T_mult_uses_rounded_lengths():
    sgdr = SGDR(0.1, 4, 100, T_mult=1.5)
    lengths = [round(4 * 1.5**i) for i in range(7)]
    assert lengths == [4, 6, 9, 14, 20, 30, 46]  # 13.5 -> 14, 20.25 -> 20, 30.375 -> 30
    ends = [sum(lengths[: i + 1]) for i in range(7)]
    assert sgdr.ends_until(100) == ends == [4, 10, 19, 33, 53, 83, 129]
    assert sgdr.cycle_ends() == ends[:6] + [100]
    assert all(sgdr.lr(end) == 0.1 and sgdr.cycle(end) == i + 1 for i, end in enumerate(ends[:6]))


def test_sgdr_integral_float_T_mult_is_exact_integer():
    as_float, as_int = SGDR(0.1, 7, 3000, T_mult=2.0), SGDR(0.1, 7, 3000, T_mult=2)
    assert as_float.cycle_ends() == as_int.cycle_ends() == [7, 21, 49, 105, 217, 441, 889, 1785, 3000]
    assert [as_float.lr(t) for t in range(3000)] == [as_int.lr(t) for t in range(3000)]
    # Exact integers far beyond float precision: the 60th restart of T_0=1, T_mult=2.
    assert SGDR(0.1, 1, 2**61, T_mult=2.0).cycle(2**60 - 1) == 60


def test_sgdr_decay_shrinks_peaks():
    sgdr = SGDR(1.0, 10, 100, T_mult=1, decay=0.5)
    assert [sgdr.lr(start) for start in range(0, 100, 10)] == [0.5**i for i in range(10)]
    assert sgdr.cycle_ends() == list(range(10, 101, 10))


@pytest.mark.parametrize(
    "T_0, T_mult, total, ends_until, cycle_ends",
    [
        (10, 2, 100, [10, 30, 70, 150], [10, 30, 70, 100]),
        (10, 2, 70, [10, 30, 70], [10, 30, 70]),
        (10, 1, 25, [10, 20, 30], [10, 20, 25]),
        (10, 3, 5, [10], [5]),
    ],
)
def test_sgdr_ends_until_and_budget_inside_cycle(T_0, T_mult, total, ends_until, cycle_ends):
    sgdr = SGDR(0.1, T_0, total, T_mult=T_mult)
    assert sgdr.ends_until(total) == ends_until
    assert sgdr.cycle_ends() == cycle_ends
    assert sgdr.cycle(total - 1) == len(cycle_ends) - 1


# ---------------------------------------------------------------- Snapshot


@pytest.mark.parametrize("total, cycles", [(10, 3), (300, 6), (1001, 7), (7, 7), (50, 1)])
def test_snapshot_cycle_boundaries(total, cycles):
    snap = Snapshot(0.1, total, cycles)
    ends = snap.cycle_ends()
    assert ends == [(k + 1) * total // cycles for k in range(cycles)] and ends[-1] == total
    lengths = [end - start for start, end in cycles_of(snap)]
    assert max(lengths) - min(lengths) <= 1
    brute = [k for k, (start, end) in enumerate(cycles_of(snap)) for _ in range(start, end)]
    assert [snap.cycle(t) for t in range(total)] == brute


def test_snapshot_not_divisible():
    snap = Snapshot(0.1, 10, 3)
    assert snap.cycle_ends() == [3, 6, 10]
    assert [snap.lr(t) for t in (0, 3, 6)] == [0.1, 0.1, 0.1]
    assert snap.lr(9) == pytest.approx(0.1 * (1 + math.cos(math.pi * 3 / 4)) / 2, abs=1e-15)


def test_snapshot_matches_paper_equation_when_divisible():
    # Huang et al. 2017 eq. (2), with the paper's 1-based t shifted to our 0-based t.
    T, M, a0 = 300, 6, 0.2
    snap = Snapshot(a0, T, M)
    paper = [a0 / 2 * (math.cos(math.pi * (t % math.ceil(T / M)) / math.ceil(T / M)) + 1) for t in range(T)]
    assert max_diff([snap.lr(t) for t in range(T)], paper) <= 1e-15


# ---------------------------------------------------------------- Warmup, Constant, common


def test_warmup_ramps_linearly_to_inner_value():
    inner = Cosine(0.1, 100, eta_min=1e-3)
    warm = Warmup(inner, 10)
    target = inner.lr(10)
    assert [warm.lr(t) for t in range(10)] == [target * (t + 1) / 11 for t in range(10)]
    assert all(warm.lr(t) == inner.lr(t) for t in range(10, 100))
    ramp = [warm.lr(t) for t in range(11)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))
    assert [Warmup(inner, 0).lr(t) for t in range(100)] == [inner.lr(t) for t in range(100)]


@pytest.mark.parametrize("inner", [SGDR(0.1, 10, 100, T_mult=2), OneCycle(0.4, 100), Cyclic(0.01, 0.1, 5, 100)])
def test_warmup_keeps_inner_steps_cycles_and_momentum(inner):
    warm = Warmup(inner, 5)
    assert warm.total_steps == inner.total_steps
    assert warm.cycle_ends() == inner.cycle_ends()
    assert [warm.momentum(t) for t in range(100)] == [inner.momentum(t) for t in range(100)]


def test_constant_and_defaults():
    const = Constant(0.05, 10)
    assert [const.lr(t) for t in range(10)] == [0.05] * 10
    assert const.cycle_ends() == [10] and const.momentum(3) is None
    assert StepDecay(0.1, 50, (10,)).cycle_ends() == [50] and Cosine(0.1, 50).cycle_ends() == [50]


ALL = [
    Constant(1, 20), StepDecay(1, 20, [5, 10]), Cosine(1, 20), SGDR(1, 3, 20, T_mult=2),
    Snapshot(1, 20, 3), OneCycle(1, 20), Cyclic(0, 1, 3, 20, mode="exp_range", gamma=0.9), Warmup(Cosine(1, 20), 4),
    FGE(1, 20, 3, 4, 0.5, 0.01),
]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_common_contract(schedule):
    assert isinstance(schedule, Schedule)
    assert all(type(schedule.lr(t)) is float for t in range(20))
    assert all(schedule.momentum(t) is None or type(schedule.momentum(t)) is float for t in range(20))
    ends = schedule.cycle_ends()
    assert ends == sorted(set(ends)) and ends[-1] == schedule.total_steps
    for bad in (-1, 20, 2.0):
        with pytest.raises(ValueError, match=r"t must be an int in \[0, total_steps=20\)"):
            schedule.lr(bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.eta_max = 2
    assert hash(schedule) == hash(dataclasses.replace(schedule))


def fge_paper(i: int, c: int, alpha_1: float, alpha_2: float) -> float:
    """Garipov et al. 2018 (arXiv 1802.10026), eq. 2, as printed: iteration i counts from 1 within the FGE phase."""
    t = ((i - 1) % c + 1) / c
    return (1 - 2 * t) * alpha_1 + 2 * t * alpha_2 if t <= 0.5 else (2 - 2 * t) * alpha_2 + (2 * t - 1) * alpha_1


@pytest.mark.parametrize("total, cycles, c", [(40, 3, 8), (10, 3, 4), (7, 1, 2)])
def test_fge_follows_the_paper_and_snapshots_at_alpha_2(total, cycles, c):
    schedule = FGE(0.1, total, cycles, c, 0.05, 0.0005)
    first = total - c // 2 - (cycles - 1) * c  # what the budget leaves for ordinary training
    assert schedule.first_phase == first
    assert schedule.cycle_ends() == [first + c // 2 + k * c for k in range(cycles)]
    assert schedule.cycle_ends()[-1] == total
    for t in range(first, total):  # the FGE phase, to the last bit
        assert schedule.lr(t) == pytest.approx(fge_paper(t - first + 1, c, 0.05, 0.0005), rel=1e-12, abs=0)
    for end in schedule.cycle_ends():  # the update before each snapshot used alpha_2, the cycle's smallest rate
        assert schedule.lr(end - 1) == pytest.approx(0.0005, rel=1e-12) == min(schedule.lr(t) for t in range(total))
    if first:  # ordinary training: a cosine from eta_max that ends where the first FGE cycle starts
        assert schedule.lr(0) == 0.1
        assert [schedule.lr(t) for t in range(first)] == [Cosine(0.1, first, 0.05).lr(t) for t in range(first)]
    else:
        assert schedule.lr(0) == pytest.approx((0.05 + 0.0005) / 2 if c == 2 else fge_paper(1, c, 0.05, 0.0005))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SGDR(0.1, 0, 100), "T_0 must be a positive number of steps, got 0"),
        (lambda: SGDR(0.1, 2.5, 100), "T_0 must be a positive number of steps, got 2.5"),
        (lambda: SGDR(0.1, 10, 100, T_mult=0.5), "T_mult must be a finite number >= 1, got 0.5"),
        (lambda: SGDR(0.1, 10, 100, T_mult=float("inf")), "T_mult must be a finite number >= 1, got inf"),
        (lambda: SGDR(0.1, 10, 100, decay=0), r"decay must be in \(0, 1\], got 0"),
        (lambda: SGDR(0.1, 10, 0), "total_steps must be a positive number of steps, got 0"),
        (lambda: Cosine(-0.1, 100), "eta_max must be a finite learning rate > 0, got -0.1"),
        (lambda: Constant(float("inf"), 100), "eta_max must be a finite learning rate > 0, got inf"),
        (lambda: Cosine(0.1, 100, eta_min=-1.0), "eta_min must be a learning rate >= 0, got -1.0"),
        (lambda: Constant(0.1, -5), "total_steps must be a positive number of steps, got -5"),
        (lambda: Snapshot(0.1, 100, 0), "cycles must be a positive number of steps, got 0"),
        (lambda: Snapshot(0.1, 10, 11), r"cycles must not exceed total_steps \(10\), .*, got 11"),
        (lambda: StepDecay(0.1, 100, (10,), gamma=0), "gamma must be > 0, got 0"),
        (lambda: StepDecay(0.1, 100, (-1, 10)),
         r"milestones must all be non-negative numbers of steps, got \(-1, 10\)"),
        (lambda: OneCycle(0.1, 100, pct_start=1.0), r"pct_start must be in \(0, 1\), got 1.0"),
        (lambda: OneCycle(0.1, 100, pct_start=0.0), r"pct_start must be in \(0, 1\), got 0.0"),
        (lambda: OneCycle(0.1, 10, pct_start=0.1), "pct_start \\* total_steps must not be exactly 1"),
        (lambda: OneCycle(0.1, 100, anneal="exp"), r"anneal must be one of \('cos', 'linear'\), got 'exp'"),
        (lambda: OneCycle(0.1, 100, div_factor=0), "div_factor must be > 0, got 0"),
        (lambda: OneCycle(0.1, 100, base_momentum=0.99), r"base_momentum must be in \[0, max_momentum\] .*, got 0.99"),
        (lambda: Cyclic(0.01, 0.1, 0, 100), "step_size_up must be a positive number of steps, got 0"),
        (lambda: Cyclic(0.01, 0.1, 5, 100, step_size_down=0), "step_size_down must be a positive number"),
        (lambda: Cyclic(0.01, 0.1, 5, 100, mode="sine"), "mode must be one of .*triangular2.*got 'sine'"),
        (lambda: Cyclic(0.01, 0.1, 5, 100, gamma=-1.0), "gamma must be > 0, got -1.0"),
        (lambda: FGE(0.1, 100, 3, 5, 0.05, 0.0005), "cycle_length must be an even number of steps >= 2"),
        (lambda: FGE(0.1, 100, 3, 0, 0.05, 0.0005), "cycle_length must be an even number of steps >= 2"),
        (lambda: FGE(0.1, 100, 3, 4, 0.05, 0.5), r"alpha_2 must not exceed alpha_1 \(0.05\).*got 0.5"),
        (lambda: FGE(0.1, 100, 3, 4, 0.0, 0.0), "alpha_1 must be a finite learning rate > 0, got 0.0"),
        (lambda: FGE(0.1, 100, 3, 4, 0.5, 0.0005), r"alpha_1 must not exceed eta_max \(0.1\).*got 0.5"),
        (lambda: FGE(0.1, 9, 3, 4, 0.05, 0.0005), "cycles must fit the budget: 3 cycles of 4 steps take 10 of the 9"),
        (lambda: Warmup(Cosine(0.1, 100), -1), "warmup_steps must be a non-negative number of steps, got -1"),
        (lambda: Warmup(Cosine(0.1, 100), 100),
         r"warmup_steps must be shorter than the schedule \(total_steps=100\), got 100"),
    ],
)
def test_validation_errors(make, message):
    """One line that starts with the argument's name (snapens.build reports it under the config key of that name)."""
    with pytest.raises(ValueError, match=message) as info:
        make()
    assert "\n" not in str(info.value)
    assert re.match(message, str(info.value))  # from its start: each message begins with the argument's name


def test_sgdr_helpers_validate_arguments():
    sgdr = SGDR(0.1, 10, 100)
    with pytest.raises(ValueError, match="t must be a non-negative number of steps, got -1"):
        sgdr.cycle(-1)
    with pytest.raises(ValueError, match="n must be a positive number of steps, got 0"):
        sgdr.ends_until(0)
    assert sgdr.cycle(10**6) == 10**5  # cycle() describes the unbounded sequence


# ---------------------------------------------------------------- purity


def test_module_imports_only_stdlib_arithmetic():
    for path in SCHEDULE_FILES:
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        ours = {m for m in imported if m.startswith(("snapens.schedules", "snapens.adaptive"))}
        assert imported - ours <= {"__future__", "bisect", "itertools", "math", "dataclasses", "typing", "collections.abc",
                                   "logging"}, path


def test_module_loads_without_torch():
    # The package on its own: snapens/__init__ is replaced by an empty package.
    code = (
        "import sys, types\n"
        f"package = types.ModuleType('snapens'); package.__path__ = [{str(SNAPENS)!r}]\n"
        "sys.modules['snapens'] = package\n"
        "sys.modules['torch'] = None  # an import of torch would fail\n"
        "import snapens.schedules as module\n"
        "assert module.SGDR(0.1, 10, 100).lr(10) == 0.1\n"
        "assert 'adaptive_sgdr' in module.SCHEDULES\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy') and sys.modules[m]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_geometric_lengths_fill_the_budget(make_cfg):
    assert geometric_lengths(48, 4, 2) == (3, 7, 12, 26)  # ends round(48 * (1, 3, 7, 15) / 15)
    assert geometric_lengths(12, 3, 1) == (4, 4, 4)
    assert sum(geometric_lengths(18573, 4, 2)) == 18573
    with pytest.raises(ValueError, match=r"cycles=5 with T_mult=3 leaves a first cycle shorter"):
        geometric_lengths(20, 5, 3)
    cfg = make_cfg(*FAST, "scheduler=sgdr", "scheduler.cycles=5", "scheduler.T_mult=3", "trainer.epochs=5")
    with pytest.raises(SnapensError, match=r"scheduler.cycles=5 with T_mult=3 leaves a first cycle shorter"):
        build.build_schedule(cfg.scheduler, 5, 4)


@pytest.mark.parametrize("name, extra, lengths", [
    ("sgdr", [], (3, 7, 12, 26)), ("adaptive_sgdr", ["data.val_size=10"], (3, 7, 12, 26)),
    ("snapshot", [], (12, 12, 12, 12)), ("cyclic", [], (12, 12, 12, 12)),
    ("fge", ["scheduler.cycle_length=0.4"], (30, 6, 6, 6))])  # 4.8 steps, rounded up to 6; ordinary training 27
def test_cycles_key_sets_every_cyclic_schedule(make_cfg, name, extra, lengths):
    cfg = make_cfg(f"scheduler={name}", "scheduler.cycles=4", "trainer.epochs=4", *extra)
    schedule = build.build_schedule(cfg.scheduler, 4, 12)
    ends = schedule.cycle_ends()
    assert tuple(b - a for a, b in zip([0, *ends], ends)) == lengths
    assert schedule.total_steps == 48
    if name in ("sgdr", "adaptive_sgdr"):
        assert isinstance(schedule, CosineCycles) and schedule.lr(47) < schedule.lr(26)


@pytest.mark.parametrize("name", ["cosine", "step", "constant", "onecycle"])
def test_cycles_key_spaces_snapshots_of_one_shot_schedules(make_cfg, name):
    cfg = make_cfg(f"scheduler={name}", "scheduler.cycles=3", "trainer.epochs=4")
    schedule = build.build_schedule(cfg.scheduler, 4, 10)
    assert snapshot_steps(schedule, 0, cfg.scheduler.cycles) == [13, 26, 40]  # k * 40 // 3
    assert snapshot_steps(schedule) == [40]


def test_step_milestones_are_fractions_of_the_budget(make_cfg):
    cfg = make_cfg("scheduler=step", "trainer.epochs=4")
    schedule = build.build_schedule(cfg.scheduler, 4, 10)
    assert [schedule.lr(t) for t in (19, 20, 29, 30)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


@pytest.mark.parametrize("overrides, message", [
    (["scheduler=cyclic", "scheduler.cycles=5"], "scheduler.cycles=5 does not split the budget of 48 steps"),
    (["scheduler=sgdr", "scheduler.cycles=49"], "scheduler.cycles=49 exceeds the budget's 48 steps"),
    (["scheduler=cosine", "scheduler.cycles=0"], "scheduler.cycles=0 must be a finite number > 0"),
    (["scheduler=cosine", "scheduler.cycles=2", "trainer.snapshot_every=1"],
     "scheduler.cycles=2 and trainer.snapshot_every=1.0 both say where snapshots go"),
    (["scheduler=snapshot", "scheduler.cycles=null"], "scheduler.cycles=None"),
])
def test_cycles_key_errors(make_cfg, overrides, message):
    from snapens.config import check_config
    cfg = make_cfg(*overrides, "trainer.epochs=4")
    with pytest.raises(SnapensError, match=message.replace(".", r"\.")):
        check_config(cfg)
        build.build_schedule(cfg.scheduler, 4, 12)


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
