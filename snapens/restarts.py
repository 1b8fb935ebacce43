"""What the training loop does around cycle ends besides the plain snapshot: stochastic weight averaging inside
each cycle, and adaptive SGDR's decision to lengthen a cycle.

SWA (Izmailov et al. 2018, arXiv 1803.05407) averages the weights along the low-learning-rate end of a cycle; its
BatchNorm statistics must then be recomputed on training data, since no forward pass ever used the averaged
weights. Adaptive SGDR lengthens the current cycle when the validation loss stops improving, a plateau being the
sign that the cycle restarted the learning rate before the model had settled.
"""

import math

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from snapens.data import Split, eval_batches
from snapens.ensemble import predict_logits


def swa_first_update(cycle_start: int, cycle_end: int, fraction: float) -> int:
    """The first update, 0-based, whose resulting weights enter the cycle's average: start=0.5 averages the weights
    after each update of the cycle's second half (after updates 4..7 of an 8-update cycle)."""
    return cycle_start + math.floor(fraction * (cycle_end - cycle_start))


@torch.no_grad()
def finish_swa(swa: AveragedModel, train: Split, batch_size: int, mean, std) -> torch.nn.Module:
    """Recompute the averaged model's BatchNorm statistics over the (unaugmented) training split and return the
    model to snapshot. Draws nothing from any random stream, so a resumed run stays bit-identical."""
    update_bn(eval_batches(train, batch_size, mean, std), swa.module)
    return swa.module


def validation_loss(model: torch.nn.Module, val: Split, mean, std, batch_size: int, device: torch.device,
                    precision: torch.dtype | None, channels_last: bool) -> float:
    """Mean cross-entropy on the validation split (the model is left in training mode)."""
    logits = predict_logits(model, val, mean, std, batch_size, device, precision, channels_last)
    model.train()
    return F.cross_entropy(logits, val.labels).item()


def new_adaptive_state(lengths: tuple[int, ...]) -> dict:
    """Adaptive SGDR's record, kept in the checkpoint: the cycle lengths in use, the best validation loss, the
    evaluations since it, and the cycles already extended."""
    return {"lengths": list(lengths), "cycle": 0, "best": math.inf, "since_best": 0, "extended": []}


def should_extend(state: dict, loss: float, cycle: int, patience: int, in_progress: bool = True) -> bool:
    """Record one validation loss, measured after an update of `cycle` (0-based); True when that cycle is to be
    extended now: `patience` evaluations without a new best within the cycle, the cycle still in progress, and not
    extended before (once per cycle, so a plateau cannot take the whole budget). Each cycle is judged against its
    own best: a restart raises the loss, which is no plateau."""
    if cycle != state["cycle"]:
        state.update(cycle=cycle, best=math.inf, since_best=0)
    if loss < state["best"]:
        state["best"], state["since_best"] = loss, 0
        return False
    state["since_best"] += 1
    if state["since_best"] >= patience and in_progress and cycle not in state["extended"]:
        state["extended"].append(cycle)
        state["since_best"] = 0
        return True
    return False
