"""Schedules without restarts: constant, step decay, one cosine annealing and OneCycle."""

import math
from collections.abc import Mapping
from dataclasses import dataclass

from snapens.schedules.base import (Schedule, Steps, _check_budget, _check_momentum, _check_rates, _check_steps,
                                    _cosine, _is_steps, _require, register)

ANNEAL_STRATEGIES = ("cos", "linear")


@register("constant")
@dataclass(frozen=True)
class Constant(Schedule):
    """The same learning rate for every update."""

    eta_max: float
    total_steps: int | None = None

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "Constant":
        return cls(c["eta_max"], total)

    def __post_init__(self) -> None:
        _check_budget(self)
        _check_rates(self)

    def lr(self, t: int) -> float:
        self._check_t(t)
        return float(self.eta_max)


@register("step")
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

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "StepDecay":
        return cls(c["eta_max"], total, tuple(steps("milestones", m) for m in c["milestones"]), c["gamma"])

    def __post_init__(self) -> None:
        _check_budget(self)
        _check_rates(self)
        _require(all(_is_steps(m, minimum=0) for m in self.milestones),
                 f"milestones must all be non-negative numbers of steps, got {tuple(self.milestones)}")
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))  # a list would make it unhashable
        _require(self.gamma > 0, f"gamma must be > 0, got {self.gamma!r}")

    def lr(self, t: int) -> float:
        self._check_t(t)
        return float(self.eta_max * self.gamma ** sum(1 for m in self.milestones if m <= t))


@register("cosine")
@dataclass(frozen=True)
class Cosine(Schedule):
    """One cosine from ``eta_max`` to ``eta_min`` over the budget: torch ``CosineAnnealingLR(T_max=total_steps)``,
    i.e. SGDR (arXiv:1608.03983) without restarts."""

    eta_max: float
    total_steps: int
    eta_min: float = 0.0

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "Cosine":
        return cls(c["eta_max"], total, c["eta_min"])

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _check_rates(self)

    def lr(self, t: int) -> float:
        self._check_t(t)
        return _cosine(self.eta_max, self.eta_min, t, self.total_steps)


@register("onecycle")
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

    @classmethod
    def from_config(cls, c: Mapping, total: int, steps: Steps) -> "OneCycle":
        _require(not c["warmup"], "warmup is not for onecycle: its rise over pct_start is the warmup")
        return cls(c["eta_max"], total, c["pct_start"], c["div_factor"], c["final_div_factor"], c["anneal"],
                   c["three_phase"], c["cycle_momentum"], c["base_momentum"], c["max_momentum"])

    def __post_init__(self) -> None:
        _check_steps("total_steps", self.total_steps)
        _check_rates(self)
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


