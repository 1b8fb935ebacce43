"""Stochastic weight averaging inside each cycle (Izmailov et al. 2018, arXiv 1803.05407), whole in one place.

The weights after each update of a cycle's low-learning-rate end are averaged; at the cycle end the average is
snapshotted beside the plain snapshot (cycle_XX_swa) and the next cycle's average starts afresh. No forward pass
ever used the averaged weights, so their BatchNorm statistics are recomputed on training data before the snapshot.
"""

import bisect
import copy
import math

import torch
from torch.optim.swa_utils import update_bn

from snapens.batches import eval_batches
from snapens.data import Split


class WeightAverage:
    """The running mean of a model's weights, as torch's AveragedModel computes it on a GPU (one fused lerp by
    1/(n+1); on the CPU AveragedModel divides tensor by tensor instead, equal within a rounding), with the count
    kept as a host integer: AveragedModel keeps it in a tensor, copies it to the device and has 1/(n+1) read back
    at every update, a wait for the GPU per averaged step. Buffers (BatchNorm statistics) follow the model's;
    `finish` recomputes them for the average."""

    def __init__(self, model: torch.nn.Module):
        self.module = copy.deepcopy(model)
        self.n_averaged = 0  # updates averaged in the current cycle

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged, current = [p.detach() for p in self.module.parameters()], [p.detach() for p in model.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 / (self.n_averaged + 1))
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.n_averaged += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state: dict) -> None:
        if "module" not in state:  # a checkpoint from before: AveragedModel's "module."-prefixed keys, tensor count
            state = {"module": {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"},
                     "n_averaged": state["n_averaged"]}
        self.module.load_state_dict(state["module"])
        self.n_averaged = int(state["n_averaged"])


def first_update(cycle_start: int, cycle_end: int, fraction: float) -> int:
    """The first update, 0-based, whose resulting weights enter the cycle's average: start=0.5 averages the weights
    after each update of the cycle's second half (after updates 4..7 of an 8-update cycle)."""
    return cycle_start + math.floor(fraction * (cycle_end - cycle_start))


def in_window(step: int, cycle_ends: list[int], fraction: float) -> bool:
    """Whether the weights after update `step` enter the average of its cycle (cycles end at `cycle_ends`)."""
    cycle = bisect.bisect_right(cycle_ends, step)
    return step >= first_update(([0] + cycle_ends)[cycle], cycle_ends[cycle], fraction)


@torch.no_grad()
def finish(swa: WeightAverage, train: Split, batch_size: int, mean, std, channels_last: bool = False
           ) -> torch.nn.Module:
    """Recompute the averaged model's BatchNorm statistics over the (unaugmented) training split, in the model's
    memory layout, and return the model to snapshot. Draws nothing from any random stream, so a resumed run stays
    bit-identical."""
    update_bn(eval_batches(train, batch_size, mean, std, channels_last=channels_last), swa.module)
    return swa.module
