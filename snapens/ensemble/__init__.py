"""Snapshot ensembles: each snapshot's logits computed once, every ensemble is arithmetic on them.

The product's default rule averages logits; averaging softmax probabilities (Huang et al. 2017, arXiv 1704.00109,
section 4) and majority vote are options. Nothing here chooses members by looking at test accuracy.
"""

from pathlib import Path

import torch

from snapens.batches import eval_batches
from snapens.data import Split
from snapens.ensemble import metrics  # it looks up RULES and combine here only when called: no import cycle
from snapens.precision import autocast, layout

RULES = ("logits", "probs", "vote")


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


def check_rule(rule: str) -> None:
    """The one check of a combination rule, used by everything that takes one: ValueError naming it and `RULES`."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not allowed; choose one of: {', '.join(RULES)}")


def votes(logits: torch.Tensor) -> torch.Tensor:
    """int64 N x C: how many of the M members (M x N x C logits) predict each class, by the argmax of their logits."""
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)


def combine(logits: torch.Tensor, rule: str = "logits") -> torch.Tensor:
    """Ensemble scores N x C from member logits M x N x C; the prediction is their argmax. logits: mean of the
    logits. probs: mean of the softmax probabilities. vote: number of members predicting each class, plus half the
    mean probability, which breaks ties by confidence and can never outweigh a vote."""
    check_rule(rule)
    if rule == "logits":
        return logits.mean(0)
    probs = logits.softmax(-1).mean(0)
    return probs if rule == "probs" else votes(logits) + 0.5 * probs


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    return (scores.argmax(-1) == labels).double().mean().item()


def build_report(logits: torch.Tensor, labels: torch.Tensor, members: list[dict], rule: str = "logits",
                 bins: int = 15, split: str | None = "test") -> dict:
    """The one shape of ensemble results: results.json, ensemble.json and `SnapshotEnsemble.evaluate`.

    Args:
        logits: M x N x C, member m's logits on the N evaluation images (labels: N true classes), in cycle order.
        members: M dicts {"file": its path as the caller names it, or None for weights kept in memory, "name": a
            short label, "cycle", "step": None where unknown}.
        rule, bins, split: see `combine`; the ECE's confidence bins; the split's name (None where unknown).
    Returns:
        {"split", "num_images", "rule", "snapshots": [member + {acc, nll, ece}], "single": the last snapshot's
        entry, "ensemble": {acc, nll, ece, rule, members: each member's file, or its name when it has none}};
        accuracies and ECE are fractions, NLL is in nats (None for a vote; see `metrics.scores`).
    """
    snapshots = [{**member, **metrics.scores(logits[i:i + 1], labels, "logits", bins)}
                 for i, member in enumerate(members)]
    return {
        "split": split, "num_images": len(labels), "rule": rule, "snapshots": snapshots, "single": snapshots[-1],
        "ensemble": {**metrics.scores(logits, labels, rule, bins), "rule": rule,
                     "members": [s["file"] or s["name"] for s in snapshots]},
    }


def ensemble_report(logits: torch.Tensor, labels: torch.Tensor, paths: list[Path], metadata: list[dict],
                    rule: str = "logits", *, bins: int = 15, split: str = "test") -> dict:
    """`build_report` of the snapshots of one run dir, each named by its file name (cycle_XX.safetensors); `paths`
    and `metadata` (with cycle and step) are the M snapshot files, in cycle order."""
    members = [{"file": p.name, "name": p.stem, "cycle": m["cycle"], "step": m["step"]}
               for p, m in zip(paths, metadata)]
    return build_report(logits, labels, members, rule, bins, split)


def format_report(report: dict) -> str:
    """The one table of a `build_report` result: each snapshot, the last one alone and the ensemble."""
    def row(label: str, cycle, step, scores: dict) -> str:
        cells = [cycle, step, f"{scores['acc']:.4f}", None if scores["nll"] is None else f"{scores['nll']:.4f}",
                 f"{scores['ece']:.4f}"]
        return f"{label:<24}" + "".join(f"{'-' if c is None else c:>8}" for c in cells)

    e = report["ensemble"]
    lines = [f"{'snapshot':<24}" + "".join(f"{h:>8}" for h in ("cycle", "step", "acc", "nll", "ece"))]
    lines += [row(s["name"], s["cycle"], s["step"], s) for s in report["snapshots"]]
    lines.append(row("single (last snapshot)", "", "", report["single"]))
    lines.append(row(f"ensemble of {len(e['members'])} ({e['rule']})", "", "", e))
    split = f" {report['split']}" if report["split"] else ""
    lines.append(f"on {report['num_images']}{split} images")
    return "\n".join(lines)
