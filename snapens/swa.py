"""Stochastic weight averaging inside each cycle (Izmailov et al. 2018, arXiv 1803.05407), whole in one place.

The weights after each update of a cycle's low-learning-rate end are averaged; at the cycle end the average is
snapshotted beside the plain snapshot (cycle_XX_swa) and the next cycle's average starts afresh. No forward pass
ever used the averaged weights, so their BatchNorm statistics are recomputed on training data before the snapshot.
"""

import bisect
import math

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from snapens.batches import eval_batches
from snapens.data import Split


def first_update(cycle_start: int, cycle_end: int, fraction: float) -> int:
    """The first update, 0-based, whose resulting weights enter the cycle's average: start=0.5 averages the weights
    after each update of the cycle's second half (after updates 4..7 of an 8-update cycle)."""
    return cycle_start + math.floor(fraction * (cycle_end - cycle_start))


def in_window(step: int, cycle_ends: list[int], fraction: float) -> bool:
    """Whether the weights after update `step` enter the average of its cycle (cycles end at `cycle_ends`)."""
    cycle = bisect.bisect_right(cycle_ends, step)
    return step >= first_update(([0] + cycle_ends)[cycle], cycle_ends[cycle], fraction)


@torch.no_grad()
def finish(swa: AveragedModel, train: Split, batch_size: int, mean, std, channels_last: bool = False
           ) -> torch.nn.Module:
    """Recompute the averaged model's BatchNorm statistics over the (unaugmented) training split, in the model's
    memory layout, and return the model to snapshot. Draws nothing from any random stream, so a resumed run stays
    bit-identical."""
    update_bn(eval_batches(train, batch_size, mean, std, channels_last=channels_last), swa.module)
    return swa.module
