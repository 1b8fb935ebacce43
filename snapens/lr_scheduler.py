"""snapens' schedules as `torch.optim.lr_scheduler.LRScheduler`s, for users who keep their own training loop.

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = snapens.SGDR(optimizer, T_0=1000, T_mult=2, total_steps=7000)   # eta_max: the optimizer's lr
    for x, y in batches:                        # one scheduler.step() per optimizer update
        ...; optimizer.step(); scheduler.step()
        if scheduler.is_cycle_end:              # the learning rate has just been at its minimum
            ensemble.add(model)

The values are exactly those of `snapens.schedules` (the same pure functions of the update index that
`python -m snapens.train` uses), so none of the off-by-one and wrong-cycle trouble of stepping torch's stateful
schedulers with epochs (see the SGDR convention in DESIGN.md). Every parameter group gets the schedule's rate (and
momentum, for the schedules that cycle it), as in snapens.train.
"""

import dataclasses

import torch
from torch.optim.lr_scheduler import LRScheduler

from snapens import schedules
from snapens.schedules import Schedule
from snapens.step import set_group_momentum


class ScheduleLR(LRScheduler):
    """Any `snapens.schedules.Schedule` (e.g. `schedules.SGDR(eta_max=0.1, T_0=100, total_steps=700, T_mult=2)`) as
    an LRScheduler stepped once per optimizer update; `last_epoch` is torch's: -1 starts at update 0.

    After k calls of `step()` (k updates done), the optimizer holds lr(k), the rate of update k. Once the budget is
    spent (k = total_steps) the last rate stays. `schedule` may be one schedule for every parameter group or a list
    of one per group (the adapters below give each group its own, from its own learning rate, as torch does). The
    state_dict holds only counters, so a resumed scheduler is the schedule at the saved step."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule | list[Schedule], last_epoch: int = -1):
        groups = len(optimizer.param_groups)
        self.schedules = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule] * groups
        if len(self.schedules) != groups:
            raise ValueError(f"{len(self.schedules)} schedules for {groups} parameter groups: give one per group")
        if len({(s.total_steps, s.cycle_bounds(0)) for s in self.schedules}) > 1:
            raise ValueError("the groups' schedules must share the budget and the cycles; only their rates may differ")
        self.schedule = self.schedules[0]  # cycles and budget: the same in every group
        super().__init__(optimizer, last_epoch)

    def _t(self) -> int:
        total = self.schedule.total_steps
        return self.last_epoch if total is None else min(self.last_epoch, total - 1)

    def get_lr(self) -> list[float]:
        return [float(schedule.lr(self._t())) for schedule in self.schedules]

    def step(self, epoch: None = None) -> None:
        """Move to the next update: its learning rate (and momentum, where the schedule sets one)."""
        if epoch is not None:  # torch's step(epoch) jumps; a function of the update index needs no such thing
            raise TypeError("ScheduleLR.step() takes no epoch: call it once after every optimizer update")
        super().step()
        for group, schedule in zip(self.optimizer.param_groups, self.schedules):
            set_group_momentum(group, schedule.momentum(self._t()))

    @property
    def updates_done(self) -> int:
        return self.last_epoch

    def _last(self) -> int:
        """The index of the last update made (0 before any), within the budget."""
        total = self.schedule.total_steps
        return max(self.last_epoch - 1, 0) if total is None else min(max(self.last_epoch - 1, 0), total - 1)

    @property
    def is_cycle_end(self) -> bool:
        """True right after the update that closes a cycle, where the learning rate has just been at its minimum:
        the moment to take a snapshot. A budget that stops inside a cycle is no cycle end (the rate is not at its
        minimum there); an open-ended schedule's cycles end one after another for as long as it is stepped."""
        k, total = self.last_epoch, self.schedule.total_steps
        bounds = self.schedule.cycle_bounds(k - 1) if 0 < k <= (total or k) else None
        return bounds is not None and bounds[1] == k

    @property
    def cycle(self) -> int:
        """1-based number of the cycle the last update belonged to (1 before any update); at a cycle end, the
        cycle that has just closed."""
        return self.schedule.cycle(self._last()) + 1

    @property
    def cycle_position(self) -> float:
        """Fraction of the current cycle's updates done, in [0, 1]: 0 before its first update, 1 at its end."""
        bounds = self.schedule.cycle_bounds(self._last())
        if bounds is None:
            return 0.0
        start, end = bounds
        done = self.last_epoch if self.schedule.total_steps is None else min(self.last_epoch, self.schedule.total_steps)
        return min(max(done - start, 0) / (end - start), 1.0)

    def state_dict(self) -> dict:
        """Counters and every group's schedule settings, as plain values (it loads with torch.load(weights_only=True));
        `load_state_dict` refuses a state saved with other settings, where torch would go on with the new ones."""
        state = {k: v for k, v in super().state_dict().items() if k not in ("schedule", "schedules")}
        return {**state, "settings": [_settings(s) for s in self.schedules]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved, mine = state_dict.get("settings"), [_settings(s) for s in self.schedules]
        if saved is not None and len(saved) != len(mine):
            raise ValueError(f"this state was saved for {len(saved)} parameter groups, this optimizer has {len(mine)}")
        if saved is not None and saved != mine:  # a state without settings (older snapens): counters only
            _refuse_other_settings(saved, mine)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "settings"})


def _refuse_other_settings(saved: list[dict], mine: list[dict]) -> None:
    """ValueError naming the first setting (and group) in which a saved state differs from this scheduler."""
    group, key = next(((g, k) for g, (a, b) in enumerate(zip(saved, mine)) for k in {**a, **b}
                       if a.get(k) != b.get(k)), (0, "the number of parameter groups"))
    raise ValueError(f"this state was saved by a scheduler with {key}={saved[group].get(key)!r} (group "
                     f"{group}), this one has {mine[group].get(key)!r}: build it with the saved settings")


def _settings(schedule: Schedule) -> dict:
    """A schedule's class and arguments as plain values (a Warmup's inner schedule nested)."""
    return {"class": type(schedule).__name__, **dataclasses.asdict(schedule)}


def _adapter(schedule_class: type) -> type:
    """An LRScheduler class taking the optimizer plus the schedule's keyword arguments. Each parameter group gets its
    own schedule: eta_max defaults to that group's initial learning rate, as torch's schedulers anneal each group
    from its own; eta_max and eta_min may also be lists, one value per group (torch's max_lr and base_lr lists)."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1, **kwargs) -> None:
        groups = optimizer.param_groups
        own = [float(g.get("initial_lr", g["lr"])) for g in groups]  # a float copy: a tensor lr changes in place
        values = {"eta_max": kwargs.pop("eta_max", own), "eta_min": kwargs.pop("eta_min", None)}
        for name, value in values.items():
            if isinstance(value, (list, tuple)) and len(value) != len(groups):
                raise ValueError(f"{name} has {len(value)} values for {len(groups)} parameter groups")
        per_group = [{name: float(v[i] if isinstance(v, (list, tuple)) else v) for name, v in values.items()
                      if v is not None} for i in range(len(groups))]
        schedules = [schedule_class(**kwargs, **p) for p in per_group]
        if schedules[0].momentum(0) is not None and not {"momentum", "betas"} & set(optimizer.defaults):
            raise ValueError(f"cycle_momentum=True needs an optimizer with momentum or betas, not "
                             f"{type(optimizer).__name__}; pass cycle_momentum=False")  # as torch refuses it
        ScheduleLR.__init__(self, optimizer, schedules, last_epoch)

    doc = (f"`snapens.schedules.{schedule_class.__name__}` as an LRScheduler: "
           f"{schedule_class.__name__}(optimizer, **schedule_kwargs); see ScheduleLR.\n\n{schedule_class.__doc__}")
    return type(schedule_class.__name__, (ScheduleLR,), {"__init__": __init__, "__doc__": doc,
                                                         "__module__": __name__})


SGDR = _adapter(schedules.SGDR)
Snapshot = _adapter(schedules.Snapshot)
Cosine = _adapter(schedules.Cosine)
StepDecay = _adapter(schedules.StepDecay)
Constant = _adapter(schedules.Constant)
OneCycle = _adapter(schedules.OneCycle)
Cyclic = _adapter(schedules.Cyclic)
