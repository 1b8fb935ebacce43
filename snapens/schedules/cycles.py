"""Schedules with cycles, each ending at its minimum where a snapshot is taken: SGDR (and its cycles fitted to a
budget), Snapshot Ensembles' equal cosine cycles, FGE and cyclical learning rates."""

import bisect
import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from snapens.schedules.base import (Schedule, Steps, _check_budget, _check_momentum, _check_rates, _check_steps,
                                    _cosine, _is_steps, _require, register)

CYCLIC_MODES = ("triangular", "triangular2", "exp_range")
log = logging.getLogger(__name__)


@register("sgdr")
@dataclass(frozen=True)
class SGDR(Schedule):
    """Cosine annealing with warm restarts (Loshchilov & Hutter, arXiv:1608.03983): cycle ``i`` lasts
    ``T_i = T_0 * T_mult**i`` steps (``T_mult >= 1``; rounded when not an integer, while 2 and 2.0 both give exact
    integer lengths) and anneals from ``eta_max * decay**i`` (its first update's rate) towards ``eta_min`` (reached at
    the restart, never used). ``decay`` in (0, 1] shrinks later peaks (timm's ``cycle_decay``); keep
    ``eta_max * decay**i >= eta_min`` for the cycles you train, or a cycle would anneal upwards. ``total_steps`` may
    end inside a cycle (see ``cycle_ends``); None runs open-ended, as torch's CosineAnnealingWarmRestarts."""

    eta_max: float
    T_0: int
    total_steps: int | None = None
    T_mult: float = 1.0
    eta_min: float = 0.0
    decay: float = 1.0

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "Schedule":
        """SGDR from T_0; or, with scheduler.cycles, that many cycles each T_mult times the last, filling the
        budget (CosineCycles; T_0 is then not used)."""
        if not c["cycles"]:
            return cls(c["eta_max"], steps("T_0"), total, c["T_mult"], c["eta_min"], c["decay"])
        lengths = geometric_lengths(total, c["cycles"], c["T_mult"])
        log.info(f"scheduler.cycles={c['cycles']}: SGDR cycles of {', '.join(f'{n / total:.3g}' for n in lengths)} "
                 f"of the budget (T_mult={c['T_mult']:g}; scheduler.T_0 is not used)")
        return CosineCycles(c["eta_max"], lengths, c["eta_min"], c["decay"])

    def budget_ends(self) -> list[int] | None:
        return self.ends_until(self.total_steps)

    def __post_init__(self) -> None:
        _check_steps("T_0", self.T_0)
        _check_budget(self)
        _check_rates(self)
        _require(1 <= self.T_mult < math.inf, f"T_mult must be a finite number >= 1, got {self.T_mult!r}")
        _require(0 < self.decay <= 1, f"decay must be in (0, 1], got {self.decay!r}")
        # Every rounded T_i is >= 1 without a check: T_0 is an int >= 1 and T_mult >= 1.
        object.__setattr__(self, "_starts", [0])  # cycle starts found so far: a cache, lr(t) stays a function of t

    def _length(self, i: int) -> int:
        """T_i, in exact integer arithmetic whenever T_mult is integral (2 and 2.0 alike)."""
        if float(self.T_mult).is_integer():
            return self.T_0 * int(self.T_mult) ** i
        return round(self.T_0 * self.T_mult**i)

    def _locate(self, t: int) -> tuple[int, int, int]:
        """(cycle index, first step of that cycle, its length) for update ``t``."""
        if self.T_mult == 1:
            i = t // self.T_0  # O(1) for the common fixed-length case
            return i, i * self.T_0, self.T_0
        # Walk whole cycles in integers, never with the closed-form logarithm, which timm and torch's step(epoch)
        # use and which lands in the previous cycle at some restarts (e.g. t = 121*T_0 with T_mult = 3). The starts
        # walked are kept, so each call is a bisect: T_mult = 1.0001 has ~69,000 cycles below t = 10^7.
        starts = self._starts
        while starts[-1] <= t:
            starts.append(starts[-1] + self._length(len(starts) - 1))
        i = bisect.bisect_right(starts, t) - 1
        return i, starts[i], starts[i + 1] - starts[i]

    def cycle_bounds(self, t: int) -> tuple[int, int]:
        self._check_t(t)
        _, start, length = self._locate(t)
        return start, start + length

    def cycle(self, t: int) -> int:
        """0-based index of the cycle containing update ``t``: any step >= 0, in the unbounded sequence."""
        _check_steps("t", t, minimum=0)
        return self._locate(t)[0]

    def ends_until(self, n: int) -> list[int]:
        """Cycle ends of the unbounded sequence, ascending, up to and including the first end >= ``n`` (steps, >= 1),
        to explain a budget: "100 epochs ends inside cycle 4; cycles end at 10, 30, 70, 150"."""
        _check_steps("n", n)
        ends = [self.T_0]
        while ends[-1] < n:
            ends.append(ends[-1] + self._length(len(ends)))
        return ends

    def cycle_ends(self) -> list[int]:
        super().cycle_ends()  # refuses an open-ended schedule
        ends = self.ends_until(self.total_steps)
        ends[-1] = self.total_steps  # the budget may stop inside the last cycle
        return ends

    def lr(self, t: int) -> float:
        self._check_t(t)
        i, start, length = self._locate(t)
        return _cosine(self.eta_max * self.decay**i, self.eta_min, t - start, length)


@register("snapshot")
@dataclass(frozen=True)
class Snapshot(Schedule):
    """Snapshot Ensembles schedule (Huang et al., arXiv:1704.00109, eq. 2): ``cycles`` M (the number of snapshots,
    1 <= M <= T) cosine cycles share the budget T, cycle k spanning steps ``[k*T//M, (k+1)*T//M)``: the paper's
    formula when M divides T; otherwise lengths differ by at most one step (instead of the paper's ceil(T/M) leaving
    a short last cycle)."""

    eta_max: float
    total_steps: int
    cycles: int
    eta_min: float = 0.0

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "Snapshot":
        return cls(c["eta_max"], total, c["cycles"], c["eta_min"])

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _check_steps("cycles", self.cycles)
        _require(self.cycles <= self.total_steps, f"cycles must not exceed total_steps ({self.total_steps}), as "
                 f"every cycle needs a step, got {self.cycles}")
        _check_rates(self)

    def _start(self, k: int) -> int:
        return k * self.total_steps // self.cycles

    def cycle(self, t: int) -> int:
        self._check_t(t)
        return ((t + 1) * self.cycles - 1) // self.total_steps  # largest k with k*T//M <= t, i.e. k*T < (t+1)*M

    def cycle_ends(self) -> list[int]:
        return [self._start(k + 1) for k in range(self.cycles)]

    def lr(self, t: int) -> float:
        k = self.cycle(t)
        start, end = self._start(k), self._start(k + 1)
        return _cosine(self.eta_max, self.eta_min, t - start, end - start)


@dataclass(frozen=True)
class CosineCycles(Schedule):
    """SGDR's cosine cycles (eq. 5 of arXiv:1608.03983) with explicitly given lengths (in steps; their sum is the
    budget): what adaptive SGDR uses, whose cycle lengths are decided during training and recorded, so that this
    schedule, and a resumed run, can replay them exactly. Peaks and ``decay`` (in (0, 1]) are as in ``SGDR``."""

    eta_max: float
    lengths: tuple[int, ...]
    eta_min: float = 0.0
    decay: float = 1.0

    def __post_init__(self) -> None:
        _require(len(self.lengths) > 0, "lengths must name at least one cycle")
        _require(all(_is_steps(n) for n in self.lengths),
                 f"lengths must all be positive numbers of steps, got {self.lengths}")
        _check_rates(self)
        _require(0 < self.decay <= 1, f"decay must be in (0, 1], got {self.decay!r}")
        # the ends once (a cache of the lengths), so that lr(t) is a bisection: O(log M) however many cycles
        object.__setattr__(self, "_ends", tuple(itertools.accumulate(self.lengths)))

    @property
    def total_steps(self) -> int:  # type: ignore[override]
        return self._ends[-1]

    def cycle_ends(self) -> list[int]:
        return list(self._ends)

    def cycle(self, t: int) -> int:
        self._check_t(t)
        return bisect.bisect_right(self._ends, t)

    def lr(self, t: int) -> float:
        i = self.cycle(t)
        start = self._ends[i] - self.lengths[i]
        return _cosine(self.eta_max * self.decay**i, self.eta_min, t - start, self.lengths[i])


@register("fge")
@dataclass(frozen=True)
class FGE(Schedule):
    """Fast Geometric Ensembling (Garipov et al. 2018, arXiv 1802.10026, section 4 and eq. 2): ordinary training
    first, then ``cycles`` M short cycles of ``cycle_length`` c steps (even) in which the learning rate goes linearly
    from ``alpha_1`` down to ``alpha_2`` and back; each model is collected halfway, where the rate reaches alpha_2.

    The first phase is one cosine from ``eta_max`` down to ``alpha_1`` over what the budget leaves, P = T - c/2 -
    (M - 1) c steps, so the first FGE cycle starts where it ends. In this module's convention a cycle ends at its
    snapshot, so cycle 1 is the first phase and the first half-descent, and every later one rises for c/2 steps and
    falls for c/2: the ends are P + c/2 + k c. Within an FGE cycle started at step e, update t = e + s uses eq. 2 at
    t(i) = (s + 1) / c, the paper's 1-based i - 1 = s."""

    eta_max: float
    total_steps: int
    cycles: int
    cycle_length: int
    alpha_1: float
    alpha_2: float

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "FGE":
        _require(not c["warmup_every_cycle"], "warmup_every_cycle does not go with scheduler=fge, whose short "
                 "cycles follow eq. 2 of arXiv 1802.10026 exactly; leave warmup_every_cycle=false")
        length = steps("cycle_length")
        length += length % 2  # whole steps, rounded up to an even number: half falling, half rising
        return cls(c["eta_max"], total, c["cycles"], length, c["alpha_1"], c["alpha_2"])

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _check_steps("cycles", self.cycles)
        _require(_is_steps(self.cycle_length, 2) and self.cycle_length % 2 == 0,
                 "cycle_length must be an even number of steps >= 2 (the rate falls for half of them and rises for "
                 f"half), got {self.cycle_length!r}")
        _check_rates(self)
        for name in ("alpha_1", "alpha_2"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf,
                     f"{name} must be a finite learning rate > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        _require(self.alpha_1 <= self.eta_max, f"alpha_1 must not exceed eta_max ({self.eta_max!r}): the first phase "
                 f"anneals down to it, got {self.alpha_1!r}")
        _require(self.alpha_2 <= self.alpha_1, f"alpha_2 must not exceed alpha_1 ({self.alpha_1!r}): each model is "
                 f"collected at the cycle's smallest rate, got {self.alpha_2!r}")
        _require(self.first_phase >= 0, f"cycles must fit the budget: {self.cycles} cycles of {self.cycle_length} "
                 f"steps take {self.total_steps - self.first_phase} of the {self.total_steps} steps (fewer cycles, a "
                 f"shorter cycle_length or a larger budget), got {self.cycles}")

    @property
    def first_phase(self) -> int:
        """P: the steps of ordinary training before the first FGE cycle."""
        return self.total_steps - self.cycle_length // 2 - (self.cycles - 1) * self.cycle_length

    def cycle_ends(self) -> list[int]:
        return [self.first_phase + self.cycle_length // 2 + k * self.cycle_length for k in range(self.cycles)]

    def lr(self, t: int) -> float:
        self._check_t(t)
        if t < self.first_phase:
            return _cosine(self.eta_max, self.alpha_1, t, self.first_phase)
        tau = ((t - self.first_phase) % self.cycle_length + 1) / self.cycle_length
        if tau <= 0.5:
            return (1 - 2 * tau) * self.alpha_1 + 2 * tau * self.alpha_2
        return (2 - 2 * tau) * self.alpha_2 + (2 * tau - 1) * self.alpha_1
@register("cyclic")
@dataclass(frozen=True)
class Cyclic(Schedule):
    """Cyclical learning rates (Smith, arXiv:1506.01186): a port of torch ``CyclicLR``. The rate climbs from
    ``eta_min`` to ``eta_max`` in ``step_size_up`` steps and falls back in ``step_size_down`` (default: the same);
    momentum moves the opposite way. ``mode`` scales the amplitude: ``triangular`` by 1, ``triangular2`` by half
    each cycle, ``exp_range`` by ``gamma**t``.

    Args:
        eta_min, eta_max: Lower and upper bound (torch ``base_lr`` and ``max_lr``); every cycle starts at ``eta_min``.
        mode: One of ``CYCLIC_MODES``; ``gamma`` (> 0) is used by ``exp_range`` only.
        cycle_momentum: As in ``OneCycle``, between ``base_momentum`` and ``max_momentum``.
    """

    eta_min: float
    eta_max: float
    step_size_up: int
    total_steps: int | None = None
    step_size_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0
    cycle_momentum: bool = True
    base_momentum: float = 0.8
    max_momentum: float = 0.9

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "Cyclic":
        """From scheduler.cycles (equal cycles filling the budget, the falling half the longer by a step when
        odd) or from step_size_up / step_size_down."""
        if not c["cycles"]:
            up, down = steps("step_size_up"), steps("step_size_down") if c["step_size_down"] else None
        else:
            length = total // c["cycles"]
            _require(not total % c["cycles"] and length >= 2,
                     f"cycles={c['cycles']} does not split the budget of {total} steps into equal cycles of at "
                     f"least 2 steps, as scheduler=cyclic needs; choose a divisor of {total}, or "
                     "scheduler=snapshot, whose cycles may differ by a step")
            up, down = length // 2, length - length // 2
            log.info(f"scheduler.cycles={c['cycles']}: cyclic half-cycles of {up} and {down} steps "
                     "(scheduler.step_size_up and step_size_down are not used)")
        return cls(c["eta_min"], c["eta_max"], up, total, down, c["mode"], c["gamma"], c["cycle_momentum"],
                   c["base_momentum"], c["max_momentum"])

    def budget_ends(self) -> list[int] | None:
        return list(range(self._period(), self.total_steps + self._period(), self._period()))

    def __post_init__(self) -> None:
        _check_steps("step_size_up", self.step_size_up)
        if self.step_size_down is not None:
            _check_steps("step_size_down", self.step_size_down)
        _check_budget(self)
        _check_rates(self)
        _require(self.mode in CYCLIC_MODES, f"mode must be one of {CYCLIC_MODES}, got {self.mode!r}")
        _require(self.gamma > 0, f"gamma must be > 0, got {self.gamma!r}")
        _check_momentum(self.base_momentum, self.max_momentum)

    def _period(self) -> int:
        down = self.step_size_up if self.step_size_down is None else self.step_size_down
        return self.step_size_up + down

    def _shape(self, t: int) -> tuple[float, float]:
        """(position on the triangle in [0, 1], amplitude scale) of update ``t``, in torch's float order."""
        self._check_t(t)
        total = float(self._period())
        ratio = float(self.step_size_up) / total
        cycle = math.floor(1 + t / total)
        x = 1.0 + t / total - cycle
        height = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        if self.mode == "triangular":
            return height, 1.0
        if self.mode == "triangular2":
            # 2**-(cycle-1), exactly torch's 1 / 2**(cycle-1) while that is finite; past 1024 cycles torch overflows
            # (OverflowError) where this underflows to 0, the limit the amplitude was halving towards.
            return height, math.ldexp(1.0, -(cycle - 1))
        return height, self.gamma**t

    def lr(self, t: int) -> float:
        height, scale = self._shape(t)
        return float(self.eta_min + (self.eta_max - self.eta_min) * height * scale)

    def momentum(self, t: int) -> float | None:
        height, scale = self._shape(t)
        momentum = self.max_momentum - (self.max_momentum - self.base_momentum) * height * scale
        return float(momentum) if self.cycle_momentum else None

    def cycle_ends(self) -> list[int]:
        """Each cycle starts and ends at ``eta_min``; the budget may stop inside the last one."""
        super().cycle_ends()  # refuses an open-ended schedule
        period = self._period()
        return list(range(period, self.total_steps, period)) + [self.total_steps]

    def cycle_bounds(self, t: int) -> tuple[int, int]:
        self._check_t(t)
        start = t // self._period() * self._period()
        return start, start + self._period()

    def cycle(self, t: int) -> int:
        self._check_t(t)
        return t // self._period()


def geometric_lengths(total: int, cycles: int, t_mult: float) -> tuple[int, ...]:
    """`cycles` SGDR cycle lengths, each `t_mult` times the one before, filling `total` steps: the cycle ends are
    the exact ends rounded to whole steps, so the last ends at the budget (arXiv 1608.03983, eq. 5's T_i)."""
    weights = [t_mult**i for i in range(cycles)]
    ends = [round(total * sum(weights[:i + 1]) / sum(weights)) for i in range(cycles)]
    lengths = tuple(b - a for a, b in zip([0, *ends], ends))
    _require(min(lengths) >= 1, f"cycles={cycles} with T_mult={t_mult:g} leaves a first cycle shorter than one "
                                f"step of the {total}-step budget; fewer cycles, a smaller T_mult or a larger budget")
    return lengths
