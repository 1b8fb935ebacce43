"""The base class, the warmup wrapper, the checks every schedule shares and the registry of schedules by name."""

import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

SCHEDULES: dict[str, type] = {}  # scheduler.name -> the class whose from_config builds it


def register(name: str):
    """Class decorator: the schedule is `scheduler=name` (conf/scheduler/<name>.yaml)."""
    def add(cls):
        SCHEDULES[name] = cls
        return cls
    return add


Steps = Callable[..., int]  # steps(key, value=None): a length of the scheduler config, in optimizer steps


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


def _check_rates(schedule) -> None:
    """eta_max and eta_min as Python floats: a tensor (an optimizer's tensor lr, say) would make lr() return tensors,
    and one that is updated in place would change the schedule under it. Then both in range (a schedule without
    eta_min has 0)."""
    for name in ("eta_max", "eta_min"):
        value = getattr(schedule, name, None)
        if isinstance(value, (str, bytes, bool)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if value is not None and not isinstance(value, float):
            try:
                object.__setattr__(schedule, name, float(value))  # a frozen dataclass
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None
    eta_max, eta_min = schedule.eta_max, getattr(schedule, "eta_min", 0.0)
    _require(0 < eta_max < math.inf, f"eta_max must be a finite learning rate > 0, got {eta_max!r}")
    # eta_min > eta_max is allowed, as torch allows it: the cosine then anneals upwards (snapens.train refuses it).
    _require(0 <= eta_min < math.inf, f"eta_min must be a learning rate >= 0, got {eta_min!r}")


def _check_budget(schedule) -> None:
    """total_steps: a positive number of steps, or None for a schedule that runs open-ended."""
    if schedule.total_steps is not None:
        _check_steps("total_steps", schedule.total_steps)


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
    adapts_to_validation: ClassVar[bool] = False  # True: training changes the schedule from the validation loss

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "Schedule":
        """The schedule that the scheduler config `c` describes over a budget of `total` steps; `steps(key)`
        converts one of its lengths to steps."""
        raise NotImplementedError

    @classmethod
    def prepared(cls, schedule: "Schedule") -> "Schedule":
        """The schedule as training runs it, once checked and warmed up (adaptive SGDR starts from its cycles)."""
        return schedule

    def budget_ends(self) -> list[int] | None:
        """The steps a budget may end at, so that the last cycle ends at its minimum; None: any step."""
        return None

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
        # lr(t) bisects these: O(log M) a step, not a list of M cycle ends built at every step (issue 23, item 5)
        object.__setattr__(self, "_starts", tuple(starts) if budget is not None else ())

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
            start = self._starts[bisect.bisect_right(self._starts, t) - 1]  # the first step of t's cycle
        return self.inner.lr(t) if t >= start + w else float(self.inner.lr(start + w) * (t - start + 1) / (w + 1))

    def momentum(self, t: int) -> float | None:
        return self.inner.momentum(t)

    def cycle_ends(self) -> list[int]:
        return self.inner.cycle_ends()

    def cycle_bounds(self, t: int) -> tuple[int, int] | None:
        return self.inner.cycle_bounds(t)

    def cycle(self, t: int) -> int:
        return self.inner.cycle(t)


