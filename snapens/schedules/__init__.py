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

A schedule is its class plus one YAML file under conf/scheduler/: `@register("name")` puts the class in `SCHEDULES`
under the config's `scheduler.name`, and its `from_config` builds it from that config group (snapens.build converts
lengths to steps and reports a ValueError under the key it names). The torch adapter (snapens.lr_scheduler) takes
any of them.
"""

from snapens.schedules.annealing import ANNEAL_STRATEGIES, Constant, Cosine, OneCycle, StepDecay
from snapens.schedules.base import SCHEDULES, Schedule, Warmup, register
from snapens.schedules.cycles import CYCLIC_MODES, FGE, SGDR, CosineCycles, Cyclic, Snapshot, geometric_lengths

# Adaptive SGDR lives whole in snapens/adaptive.py (snapens.adaptive.AdaptiveSGDR) and registers itself there:
# imported last, so that it is in SCHEDULES whichever module is imported first (a plain import: when snapens.adaptive
# is the one imported first, it is not yet whole here).
import snapens.adaptive  # noqa: E402, F401

__all__ = ["ANNEAL_STRATEGIES", "CYCLIC_MODES", "FGE", "SCHEDULES", "SGDR", "Constant", "Cosine", "CosineCycles",
           "Cyclic", "OneCycle", "Schedule", "Snapshot", "StepDecay", "Warmup", "geometric_lengths", "register"]


def __getattr__(name: str):  # snapens.schedules.AdaptiveSGDR, as before it lived whole in snapens.adaptive
    if name == "AdaptiveSGDR":
        return snapens.adaptive.AdaptiveSGDR
    raise AttributeError(f"module 'snapens.schedules' has no attribute {name!r}")
