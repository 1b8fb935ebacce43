"""The plan of a run, said before it trains: the budget in epochs and updates, every cycle's length, the snapshot
steps and the split sizes; and a warning when cycles are too short for their snapshots to be good ensemble members.

Huang et al. (arXiv 1704.00109) give each CIFAR cycle 40-50 epochs of about 390 updates; in our budget study
(docs/results.md) snapshots of cycles under a few hundred updates were far weaker than the last and dragged the
ensemble below one run of the same cost. `MIN_CYCLE` is a floor well below that, for a warning, not a rule.
"""

import logging

import torch

from snapens.errors import SnapensError
from snapens.precision import describe

log = logging.getLogger("snapens.train")  # its lines belong to the training log
MIN_CYCLE = 100  # updates: a cycle shorter than this gets a warning naming the keys that lengthen it


def cycle_lengths(snapshot_steps: list[int]) -> list[int]:
    """The updates of each cycle, from the steps after which snapshots are taken."""
    return [b - a for a, b in zip([0, *snapshot_steps], snapshot_steps)]


def plan_lines(total: int, steps_per_epoch: int, update_size: int, snapshot_steps: list[int],
               sizes: dict[str, int]) -> list[str]:
    """The plan, a line each: budget, cycles, snapshots and split sizes (sizes: split name -> images)."""
    lengths = cycle_lengths(snapshot_steps)
    shown = ", ".join(f"{n} ({n / steps_per_epoch:.3g})" for n in lengths[:12]) + (", ..." if len(lengths) > 12 else "")
    return [f"plan: {total} updates = {total / steps_per_epoch:.4g} epochs of {steps_per_epoch} updates "
            f"({update_size} images each)",
            f"plan: {len(lengths)} cycle{'s' * (len(lengths) != 1)} of {shown} updates (epochs); snapshots after "
            f"updates {snapshot_steps[:12]}{' ...' if len(snapshot_steps) > 12 else ''}",
            "plan: " + " / ".join(f"{n} {name}" for name, n in sizes.items()) + " images"]


def short_cycles(snapshot_steps: list[int], floor: int = MIN_CYCLE) -> str | None:
    """A warning when any cycle has fewer than `floor` updates, naming the keys that lengthen cycles."""
    lengths = cycle_lengths(snapshot_steps)
    short = [i + 1 for i, n in enumerate(lengths) if n < floor]
    if not short:
        return None
    which = f"cycle {short[0]}" if len(short) == 1 else f"{len(short)} of the {len(lengths)} cycles"
    return (f"{which} {'is' if len(short) == 1 else 'are'} shorter than {floor} updates (the shortest: "
            f"{min(lengths)}): snapshots of short cycles are weak ensemble members (docs/results.md); lengthen them "
            "with a larger trainer.epochs, fewer scheduler.cycles (or a larger scheduler.T_0), or a smaller "
            "trainer.batch_size")


def log_plan(s, steps: list[int]) -> None:
    """The plan before training (s: a snapens.build.Setup): budget, cycles, snapshots, split sizes; short cycles
    warned of."""
    sizes = {name: len(split) for name, split in (("train", s.data.train), ("val", s.data.val),
                                                  ("test", s.data.test)) if split is not None}
    for line in plan_lines(s.schedule.total_steps, s.steps_per_epoch, s.update_size, steps, sizes):
        log.info(line)
    if warning := short_cycles(steps):
        log.warning(warning)


def log_start(run) -> None:
    """One line (run: a snapens.training.Run): what trains on what, how long, where the snapshots go, on which
    device and how."""
    cfg, s, ranks = run.cfg, run.setup, run.ranks
    log.info(f"{run.metadata['model']} on {cfg.data.name} ({len(s.data.train)} train / {len(s.data.test)} test "
             f"images), {cfg.scheduler.name}: {s.schedule.total_steps} steps, snapshots after steps "
             f"{run.snapshot_steps}, on {s.device} ({describe(s.precision, cfg.trainer.channels_last, s.device)}, "
             f"{torch.get_num_threads()} torch threads"
             f"{', compiled' if cfg.trainer.compile else ''}{f', {ranks.world} processes' if ranks.parallel else ''})")


def snapshot_every(cfg, s) -> int:
    """trainer.snapshot_every in updates (0: at cycle ends)."""
    every = round(cfg.trainer.snapshot_every * s.steps_per_epoch)
    if cfg.trainer.snapshot_every and not every:
        raise SnapensError(f"trainer.snapshot_every={cfg.trainer.snapshot_every} epochs is shorter than one step "
                           f"({s.steps_per_epoch} steps per epoch); give at least {1 / s.steps_per_epoch:.3g}")
    return every
