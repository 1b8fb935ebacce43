"""Snapshot ensembles: each snapshot's logits computed once, every ensemble is arithmetic on them.

The rules that combine members live in `rules` (the product's default averages logits; averaging softmax
probabilities, Huang et al. 2017, arXiv 1704.00109, section 4, and majority vote are options), which members and
with which weights in `members`, the one object for "some members, a rule, weights, a temperature" is `Ensemble`,
and the report of a run is `report`. Nothing here chooses members by looking at test accuracy.
"""

import torch

from snapens.batches import eval_batches
from snapens.data import Split
from snapens.ensemble.rules import RULES, check_rule, combine, votes
from snapens.precision import autocast, layout

__all__ = ["RULES", "accuracy", "check_rule", "combine", "predict_logits", "votes"]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, split: Split, mean, std, batch_size: int, device: torch.device,
                   precision: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Logits of `model` (in eval mode, moved to `device` in the given layout) for every image of the split, under
    autocast to `precision` (None: fp32): float32 N x C, on the CPU. The batches' logits stay on the device until
    the end, so the pass never waits on a copy back to the host."""
    model.to(device, memory_format=layout(channels_last)).eval()
    with autocast(device, precision):
        out = [model(x).float() for x, _ in eval_batches(split, batch_size, mean, std, device, channels_last)]
    return torch.cat(out).cpu()


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    return (scores.argmax(-1) == labels).double().mean().item()

