"""Snapshot ensembles: each snapshot's logits computed once, every ensemble is arithmetic on them.

The product's default rule averages logits; averaging softmax probabilities (Huang et al. 2017, arXiv 1704.00109,
section 4) and majority vote are options. Nothing here chooses members by looking at test accuracy.
"""

from pathlib import Path

import torch

from snapens.data import Split, eval_batches
from snapens.precision import autocast, layout

RULES = ("logits", "probs", "vote")


@torch.no_grad()
def predict_logits(model: torch.nn.Module, split: Split, mean, std, batch_size: int, device: torch.device,
                   precision: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Logits of `model` (in eval mode, moved to `device` in the given layout) for every image of the split, under
    autocast to `precision` (None: fp32): float32 N x C, on the CPU.

    The batches' logits stay on the device until the end, so the pass never waits on a copy back to the host.
    """
    model.to(device, memory_format=layout(channels_last)).eval()
    with autocast(device, precision):
        out = [model(x).float() for x, _ in eval_batches(split, batch_size, mean, std, device, channels_last)]
    return torch.cat(out).cpu()


def combine(logits: torch.Tensor, rule: str = "logits") -> torch.Tensor:
    """Ensemble scores N x C from member logits M x N x C; the prediction is their argmax.

    logits: mean of the logits. probs: mean of the softmax probabilities. vote: number of members predicting each
    class, plus half the mean probability, which breaks ties by confidence and can never outweigh a vote.
    """
    if rule == "logits":
        return logits.mean(0)
    probs = logits.softmax(-1).mean(0)
    if rule == "probs":
        return probs
    if rule == "vote":
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)
        return votes + 0.5 * probs
    raise ValueError(f"rule={rule!r} is not one of {', '.join(RULES)}")


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    return (scores.argmax(-1) == labels).double().mean().item()


def ensemble_report(logits: torch.Tensor, labels: torch.Tensor, paths: list[Path],
                    metadata: list[dict], rule: str = "logits") -> dict:
    """Accuracy of every snapshot, of the last one alone, and of the ensemble of all of them.

    Args:
        logits: M x N x C, snapshot m's logits on the N evaluation images.
        labels: N true classes.
        paths, metadata: the M snapshot files and their metadata, in cycle order.
        rule: how members are combined (see `combine`).
    Returns:
        {"snapshots": [{file, cycle, step, acc}], "single": {acc, file}, "ensemble": {acc, rule, members}}
    """
    snapshots = [{"file": p.name, "cycle": m["cycle"], "step": m["step"], "acc": accuracy(lg, labels)}
                 for p, m, lg in zip(paths, metadata, logits)]
    return {
        "snapshots": snapshots,
        "single": {"acc": snapshots[-1]["acc"], "file": snapshots[-1]["file"]},
        "ensemble": {"acc": accuracy(combine(logits, rule), labels), "rule": rule,
                     "members": [p.name for p in paths]},
        "num_images": len(labels),
    }


def format_report(report: dict) -> str:
    """The report as a small text table."""
    lines = [f"{'snapshot':<26}{'cycle':>6}{'step':>9}{'accuracy':>10}"]
    for s in report["snapshots"]:
        lines.append(f"{s['file']:<26}{s['cycle']:>6}{s['step']:>9}{s['acc']:>10.4f}")
    e = report["ensemble"]
    lines.append(f"{'single (last snapshot)':<41}{report['single']['acc']:>10.4f}")
    label = f"ensemble of {len(e['members'])} ({e['rule']})"
    lines.append(f"{label:<41}{e['acc']:>10.4f}")
    lines.append(f"on {report['num_images']} test images")
    return "\n".join(lines)
