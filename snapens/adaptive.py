"""Adaptive SGDR, whole in one place: lengthen the current cycle when the validation loss stops improving.

A plateau inside a cycle is the sign that SGDR (Loshchilov & Hutter 2017, arXiv 1608.03983) would restart the
learning rate before the model has settled. The run starts as plain SGDR; at each epoch end the validation loss is
measured and, after `patience` evaluations without a new best within the cycle, that cycle is made
`extension_factor` times longer (once per cycle), within the same budget. The cycle lengths in use are recorded in
the checkpoint, so a resumed run replays them exactly (schedules.CosineCycles).
"""

import bisect
import dataclasses
import logging
import math
from dataclasses import dataclass, field

from snapens.schedules import SGDR, CosineCycles, Schedule, Warmup
from snapens.schedules.base import register

log = logging.getLogger(__name__)


@dataclass
class AdaptiveState:
    """What adaptive SGDR has decided so far; saved in the checkpoint as a plain dict (`dataclasses.asdict`)."""

    lengths: list[int]  # the cycle lengths in use, in steps (their sum is the budget)
    cycle: int = 0  # the 0-based cycle the best loss belongs to
    best: float = math.inf  # the best validation loss within that cycle
    since_best: int = 0  # evaluations since that best
    extended: list[int] = field(default_factory=list)  # the cycles already extended

    def should_extend(self, loss: float, cycle: int, patience: int, in_progress: bool = True) -> bool:
        """Record one validation loss, measured after an update of `cycle` (0-based); True when that cycle is to
        be extended now: `patience` evaluations without a new best within the cycle, the cycle still in progress,
        and not extended before (once per cycle, so a plateau cannot take the whole budget). Each cycle is judged
        against its own best: a restart raises the loss, which is no plateau."""
        if cycle != self.cycle:
            self.cycle, self.best, self.since_best = cycle, math.inf, 0
        if loss < self.best:
            self.best, self.since_best = loss, 0
            return False
        self.since_best += 1
        if self.since_best >= patience and in_progress and cycle not in self.extended:
            self.extended.append(cycle)
            self.since_best = 0
            return True
        return False


def extend_cycle(lengths: tuple[int, ...], i: int, factor: float) -> tuple[int, ...]:
    """Cycle lengths after cycle ``i`` is made ``factor`` times longer, within the same budget (their sum).

    Later cycles keep their lengths and move back; the first one that would cross the budget is cut to end at it,
    and those after it are dropped. A cut cycle shorter than half its planned length is merged into the one before,
    so no cycle is a stub whose snapshot has barely moved from the previous one. Cycle ``i`` itself never ends past
    the budget.
    """
    total, start = sum(lengths), sum(lengths[:i])
    out = list(lengths[:i]) + [min(round(lengths[i] * factor), total - start)]
    end = start + out[-1]
    for n in lengths[i + 1:]:
        if end >= total:
            break
        cut = min(n, total - end)
        if cut < n / 2:
            out[-1] += cut  # merged into the cycle before (cycle i itself, if it comes right before)
        else:
            out.append(cut)
        end += cut
    return tuple(out)


def with_cycle_lengths(schedule: Schedule, lengths: tuple[int, ...]) -> Schedule:
    """The same schedule (SGDR or CosineCycles, possibly warmed up) as CosineCycles with the given lengths."""
    if isinstance(schedule, Warmup):
        return dataclasses.replace(schedule, inner=with_cycle_lengths(schedule.inner, lengths))
    return CosineCycles(schedule.eta_max, tuple(lengths), schedule.eta_min, schedule.decay)


def cycle_lengths(schedule: Schedule) -> tuple[int, ...]:
    """The lengths of the schedule's cycles, in steps."""
    ends = [0, *schedule.cycle_ends()]
    return tuple(b - a for a, b in zip(ends, ends[1:]))


def adapt_cycles(state: AdaptiveState, schedule: Schedule, loss: float, step: int, patience: int,
                 factor: float) -> Schedule | None:
    """At an epoch end (`step` updates done), with the validation loss measured there: the schedule with the
    current cycle lengthened when it has stalled and is still in progress, else None."""
    ends = schedule.cycle_ends()
    cycle = bisect.bisect_right(ends, step - 1)  # the cycle of the last update
    if not state.should_extend(loss, cycle, patience, in_progress=step not in ends):
        return None
    state.lengths = list(extend_cycle(tuple(state.lengths), cycle, factor))
    schedule = with_cycle_lengths(schedule, tuple(state.lengths))
    log.info(f"validation loss {loss:.4f} has not improved for {patience} evaluations in cycle {cycle + 1}: "
             f"extended; cycles now end after steps {schedule.cycle_ends()}")
    return schedule


@register("adaptive_sgdr")
class AdaptiveSGDR:
    """scheduler=adaptive_sgdr: built as SGDR (with all its checks), then run with its cycle lengths spelled out,
    which `adapt_cycles` lengthens as training goes (snapens.train asks the validation loss at every epoch end)."""

    adapts_to_validation = True
    from_config = SGDR.from_config

    @classmethod
    def prepared(cls, schedule: Schedule) -> Schedule:
        return with_cycle_lengths(schedule, cycle_lengths(schedule))
