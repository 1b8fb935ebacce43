"""Learning-rate schedules as pure functions of the optimizer-update index.

Conventions shared by the whole package:

* ``t`` counts optimizer updates, 0-based; ``lr(t)`` is the rate used by update ``t``.
* A cycle that *ends at step e* is over once ``e`` updates are done (a snapshot is taken then),
  and update ``e - 1`` used the cycle's smallest learning rate.
* Schedules only know steps; epoch -> step conversion happens elsewhere.
* Every schedule is a frozen dataclass, so ``lr(t)`` does not depend on call order (resuming,
  plotting and testing all see the same values).

No torch here on purpose: this is plain arithmetic, checked value for value against
``torch.optim.lr_scheduler`` in tests/test_schedules.py.
"""

import bisect
import math
from dataclasses import dataclass

CYCLIC_MODES = ("triangular", "triangular2", "exp_range")
ANNEAL_STRATEGIES = ("cos", "linear")


def _require(ok: bool, message: str) -> None:
    """Raise a one-line ValueError unless ``ok`` (checks are written so that NaN fails them). Every message starts
    with its argument's name, then what is allowed and what was given ("T_mult must be a finite number >= 1, got
    0.5"): snapens.build reports it under the config key of that name."""
    if not ok:
        raise ValueError(message)


def _is_steps(value: int, minimum: int = 1) -> bool:
    """Steps are whole optimizer updates: an int >= ``minimum`` (0 or 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_steps(name: str, value: int, minimum: int = 1) -> None:
    kind = "a positive" if minimum == 1 else "a non-negative"
    _require(_is_steps(value, minimum), f"{name} must be {kind} number of steps, got {value!r}")


def _as_floats(schedule) -> None:
    """eta_max and eta_min as Python floats: a tensor (an optimizer's tensor lr, say) would make lr() return tensors,
    and one that is updated in place would change the schedule under it."""
    for name in ("eta_max", "eta_min"):
        value = getattr(schedule, name, None)
        if isinstance(value, (str, bytes, bool)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if value is not None and not isinstance(value, float):
            try:
                object.__setattr__(schedule, name, float(value))  # a frozen dataclass
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None


def _check_budget(schedule) -> None:
    """total_steps: a positive number of steps, or None for a schedule that runs open-ended."""
    if schedule.total_steps is not None:
        _check_steps("total_steps", schedule.total_steps)


def _check_lr_range(eta_min: float, eta_max: float) -> None:
    _require(0 < eta_max < math.inf, f"eta_max must be a finite learning rate > 0, got {eta_max!r}")
    # eta_min > eta_max is allowed, as torch allows it: the cosine then anneals upwards (snapens.train refuses it).
    _require(0 <= eta_min < math.inf, f"eta_min must be a learning rate >= 0, got {eta_min!r}")


def _check_momentum(base_momentum: float, max_momentum: float) -> None:
    _require(0 <= max_momentum <= 1, f"max_momentum must be a fraction in [0, 1], got {max_momentum!r}")
    _require(0 <= base_momentum <= max_momentum,
             f"base_momentum must be in [0, max_momentum] = [0, {max_momentum!r}], got {base_momentum!r}")


def _cosine(peak: float, floor: float, t_cur: int, length: int) -> float:
    """SGDR eq. (5) (arXiv:1608.03983): half a cosine from ``peak`` at ``t_cur = 0`` towards ``floor``,
    which would be reached at ``t_cur = length`` (the next restart)."""
    if t_cur == 0:
        return float(peak)  # floor + (peak - floor) can round away from peak; a restart must hit it exactly
    # Same operation order as torch (pi * t / T), so the tests agree with it to the last bit.
    return floor + (peak - floor) * (1 + math.cos(math.pi * t_cur / length)) / 2


class Schedule:
    """Base class: a learning rate (and optionally a momentum) per update; subclasses are frozen dataclasses.
    Restart, cyclic, step and constant schedules run open-ended with ``total_steps=None``; those whose shape
    depends on the budget (cosine, OneCycle, snapshot) need it."""

    total_steps: int | None

    def lr(self, t: int) -> float:
        """Learning rate used by update ``t``; ValueError unless ``t`` is an int in ``[0, total_steps)``."""
        raise NotImplementedError

    def momentum(self, t: int) -> float | None:
        """Momentum for update ``t``; ``None`` keeps the optimizer's own momentum."""
        self._check_t(t)
        return None

    def cycle_ends(self) -> list[int]:
        """Steps at which a cycle ends, ascending; the last one is always ``total_steps`` (a ValueError for an
        open-ended schedule, whose cycle ends `cycle_bounds` gives one at a time)."""
        _require(self.total_steps is not None, "an open-ended schedule (total_steps=None) has no list of cycle ends")
        return [self.total_steps]

    def cycle_bounds(self, t: int) -> tuple[int, int] | None:
        """(first step, end) of the cycle of update ``t``; None for an open-ended schedule without cycles. The end is
        the cycle's own, past the budget when that stops inside the cycle (SGDR, Cyclic)."""
        self._check_t(t)
        if self.total_steps is None:
            return None
        ends = self.cycle_ends()
        i = bisect.bisect_right(ends, t)
        return ([0] + ends)[i], ends[i]

    def cycle(self, t: int) -> int:
        """0-based index of the cycle containing update ``t`` (0 throughout for an open-ended one without cycles)."""
        self._check_t(t)
        return 0 if self.total_steps is None else bisect.bisect_right(self.cycle_ends(), t)

    def _check_t(self, t: int) -> None:
        # A step outside the budget is almost always an off-by-one in the caller: fail loudly.
        end = math.inf if self.total_steps is None else self.total_steps
        ok = isinstance(t, int) and not isinstance(t, bool) and 0 <= t < end
        _require(ok, f"t must be an int in [0, total_steps={self.total_steps}), got {t!r}")


@dataclass(frozen=True)
class Constant(Schedule):
    """The same learning rate for every update."""

    eta_max: float
    total_steps: int | None = None

    def __post_init__(self) -> None:
        _check_budget(self)
        _as_floats(self)
        _check_lr_range(0.0, self.eta_max)

    def lr(self, t: int) -> float:
        self._check_t(t)
        return float(self.eta_max)


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``eta_max * gamma ** (number of milestones <= t)``: torch ``MultiStepLR``; ``gamma > 0``, ``milestones`` are
    steps >= 0, in any order (kept sorted; one at 0 decays from the start, as in torch). torch ``StepLR(step_size)``
    is ``milestones=(step_size, 2 * step_size, ...)``. A milestone listed twice decays twice, as in torch; milestones
    at or past ``total_steps`` never take effect."""

    eta_max: float
    total_steps: int | None = None
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check_budget(self)
        _as_floats(self)
        _check_lr_range(0.0, self.eta_max)
        _require(all(_is_steps(m, minimum=0) for m in self.milestones),
                 f"milestones must all be non-negative numbers of steps, got {tuple(self.milestones)}")
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))  # a list would make it unhashable
        _require(self.gamma > 0, f"gamma must be > 0, got {self.gamma!r}")

    def lr(self, t: int) -> float:
        self._check_t(t)
        return float(self.eta_max * self.gamma ** sum(1 for m in self.milestones if m <= t))


@dataclass(frozen=True)
class Cosine(Schedule):
    """One cosine from ``eta_max`` to ``eta_min`` over the budget: torch ``CosineAnnealingLR(T_max=total_steps)``,
    i.e. SGDR (arXiv:1608.03983) without restarts."""

    eta_max: float
    total_steps: int
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _as_floats(self)
        _check_lr_range(self.eta_min, self.eta_max)

    def lr(self, t: int) -> float:
        self._check_t(t)
        return _cosine(self.eta_max, self.eta_min, t, self.total_steps)


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

    def __post_init__(self) -> None:
        _check_steps("T_0", self.T_0)
        _check_budget(self)
        _as_floats(self)
        _check_lr_range(self.eta_min, self.eta_max)
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

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _check_steps("cycles", self.cycles)
        _require(self.cycles <= self.total_steps, f"cycles must not exceed total_steps ({self.total_steps}), as "
                 f"every cycle needs a step, got {self.cycles}")
        _as_floats(self)
        _check_lr_range(self.eta_min, self.eta_max)

    def _start(self, k: int) -> int:
        return k * self.total_steps // self.cycles

    def cycle(self, t: int) -> int:
        """0-based index of the cycle containing update ``t``."""
        self._check_t(t)
        return ((t + 1) * self.cycles - 1) // self.total_steps  # largest k with k*T//M <= t, i.e. k*T < (t+1)*M

    def cycle_ends(self) -> list[int]:
        return [self._start(k + 1) for k in range(self.cycles)]

    def lr(self, t: int) -> float:
        k = self.cycle(t)
        start, end = self._start(k), self._start(k + 1)
        return _cosine(self.eta_max, self.eta_min, t - start, end - start)


@dataclass(frozen=True)
class OneCycle(Schedule):
    """1cycle policy (Smith & Topin, super-convergence, arXiv:1708.07120): a port of torch ``OneCycleLR`` (same
    phases, same float arithmetic), so both give identical learning rates and momenta for every update.

    Args:
        eta_max: Peak rate; the start is ``eta_max / div_factor``, the end that divided by ``final_div_factor``.
        pct_start: Fraction of the budget spent rising, in (0, 1).
        anneal: ``"cos"`` or ``"linear"`` interpolation inside each phase.
        three_phase: Fall back to the start rate symmetrically before annihilating (the paper's version).
        cycle_momentum: Cycle momentum inversely between ``max_momentum`` and ``base_momentum``; if False,
            ``momentum()`` returns None and the optimizer's own momentum is kept.
    """

    eta_max: float
    total_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"
    three_phase: bool = False
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _as_floats(self)
        _check_lr_range(0.0, self.eta_max)
        _require(0 < self.pct_start < 1, f"pct_start must be in (0, 1), got {self.pct_start!r}")
        # Otherwise the warm-up phase has zero length and torch divides by zero at step 0.
        _require(self.pct_start * self.total_steps != 1, "pct_start * total_steps must not be exactly 1 "
                 f"(zero-length warm-up), got pct_start={self.pct_start}, total_steps={self.total_steps}")
        _require(self.div_factor > 0, f"div_factor must be > 0, got {self.div_factor!r}")
        _require(self.final_div_factor > 0, f"final_div_factor must be > 0, got {self.final_div_factor!r}")
        _require(self.anneal in ANNEAL_STRATEGIES, f"anneal must be one of {ANNEAL_STRATEGIES}, got {self.anneal!r}")
        _check_momentum(self.base_momentum, self.max_momentum)

    def _phases(self) -> list[tuple[float, float, float, float, float]]:
        """(end_step, start_lr, end_lr, start_momentum, end_momentum) of each phase, computed as torch does."""
        initial = self.eta_max / self.div_factor
        final = initial / self.final_div_factor
        peak, low_m, high_m = self.eta_max, self.base_momentum, self.max_momentum
        up = (float(self.pct_start * self.total_steps) - 1, initial, peak, high_m, low_m)
        last = float(self.total_steps - 1)
        if not self.three_phase:
            return [up, (last, peak, final, low_m, high_m)]
        down = (float(2 * self.pct_start * self.total_steps) - 2, peak, initial, low_m, high_m)
        return [up, down, (last, initial, final, high_m, high_m)]

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _values(self, t: int) -> tuple[float, float]:
        """(lr, momentum) of update ``t``: interpolate inside the first phase that has not ended yet."""
        self._check_t(t)
        phases = self._phases()
        phase_start = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
            if t <= end_step or i == len(phases) - 1:
                pct = (t - phase_start) / (end_step - phase_start)
                return float(self._anneal(lr0, lr1, pct)), float(self._anneal(m0, m1, pct))
            phase_start = end_step
        raise AssertionError("unreachable: the last phase takes every remaining step")

    def lr(self, t: int) -> float:
        return self._values(t)[0]

    def momentum(self, t: int) -> float | None:
        momentum = self._values(t)[1]
        return momentum if self.cycle_momentum else None


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

    def __post_init__(self) -> None:
        _check_steps("step_size_up", self.step_size_up)
        if self.step_size_down is not None:
            _check_steps("step_size_down", self.step_size_down)
        _check_budget(self)
        _as_floats(self)
        _check_lr_range(self.eta_min, self.eta_max)
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


@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear warm-up in front of any schedule (gradual warm-up, Goyal et al., arXiv:1706.02677).

    For ``t < warmup_steps`` (W): ``lr(t) = inner.lr(W) * (t + 1) / (W + 1)``, which ramps to exactly the value
    the inner schedule has at step W, so nothing jumps; from W on it is ``inner.lr(t)``. With ``every_cycle`` the
    same ramp starts every cycle, at each cycle's first step s: ``inner.lr(s + W) * (t - s + 1) / (W + 1)`` for
    ``s <= t < s + W``; a restart then climbs to its peak instead of jumping there. ``total_steps``, ``momentum``
    and ``cycle_ends`` are the inner schedule's. 0 <= W < ``inner.total_steps``, and shorter than the first cycle
    when there are several (every_cycle: than every cycle), so each cycle still ends at its smallest rate, where a
    snapshot is taken; W = 0 leaves ``inner`` unchanged."""

    inner: Schedule
    warmup_steps: int
    every_cycle: bool = False

    def __post_init__(self) -> None:
        _check_steps("warmup_steps", self.warmup_steps, minimum=0)
        budget, w = self.inner.total_steps, self.warmup_steps
        _require(budget is None or w < budget, f"warmup_steps must be shorter than the schedule (total_steps={budget}),"
                 f" got {w}")
        # Open-ended schedules' cycles never shrink (SGDR's T_mult >= 1, Cyclic's period): the first is the shortest.
        starts = [0, *self.inner.cycle_ends()] if budget is not None else [0, (self.inner.cycle_bounds(0) or [0, 0])[1]]
        cycles = [b - a for a, b in zip(starts, starts[1:]) if b > a]
        if self.every_cycle and cycles:
            _require(w < min(cycles), "warmup_steps must be shorter than every cycle (the shortest has "
                     f"{min(cycles)} steps) to warm up each one, got {w}")
        if len(cycles) > 1 or budget is None and cycles:
            _require(w < cycles[0], f"warmup_steps must be shorter than the first cycle ({cycles[0]} steps), got {w}")

    @property
    def total_steps(self) -> int:  # type: ignore[override]
        return self.inner.total_steps

    def lr(self, t: int) -> float:
        self._check_t(t)
        w = self.warmup_steps
        start = 0
        if self.every_cycle and self.inner.total_steps is None:
            start = (self.inner.cycle_bounds(t) or (0,))[0]  # an open-ended schedule without cycles: one warmup
        elif self.every_cycle:
            ends = self.inner.cycle_ends()
            start = ([0] + ends)[bisect.bisect_right(ends, t)]  # the first step of t's cycle
        return self.inner.lr(t) if t >= start + w else float(self.inner.lr(start + w) * (t - start + 1) / (w + 1))

    def momentum(self, t: int) -> float | None:
        return self.inner.momentum(t)

    def cycle_ends(self) -> list[int]:
        return self.inner.cycle_ends()

    def cycle_bounds(self, t: int) -> tuple[int, int] | None:
        return self.inner.cycle_bounds(t)

    def cycle(self, t: int) -> int:
        return self.inner.cycle(t)


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
        _as_floats(self)
        _check_lr_range(self.eta_min, self.eta_max)
        _require(0 < self.decay <= 1, f"decay must be in (0, 1], got {self.decay!r}")

    @property
    def total_steps(self) -> int:  # type: ignore[override]
        return sum(self.lengths)

    def cycle_ends(self) -> list[int]:
        return [sum(self.lengths[:i + 1]) for i in range(len(self.lengths))]

    def cycle(self, t: int) -> int:
        """0-based index of the cycle containing update ``t``."""
        self._check_t(t)
        return bisect.bisect_right(self.cycle_ends(), t)

    def lr(self, t: int) -> float:
        i = self.cycle(t)
        start = sum(self.lengths[:i])
        return _cosine(self.eta_max * self.decay**i, self.eta_min, t - start, self.lengths[i])


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

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _check_steps("cycles", self.cycles)
        _require(_is_steps(self.cycle_length, 2) and self.cycle_length % 2 == 0,
                 "cycle_length must be an even number of steps >= 2 (the rate falls for half of them and rises for "
                 f"half), got {self.cycle_length!r}")
        _as_floats(self)
        _check_lr_range(0.0, self.eta_max)
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
