"""Ensemble metrics on stored member logits: predictive distribution, accuracy, NLL, calibration, diversity, curves.

Everything is arithmetic on the M x N x C logits that `cache.cached_logits` computes once (M snapshots in cycle order,
N images, C classes), in float64. The three combination rules are those of `combine`:

* logits: softmax of the mean logits (the product's default; a renormalised geometric mean of the members'
  probabilities).
* probs: mean of the members' softmax probabilities (Huang et al. 2017, Snapshot Ensembles, arXiv 1704.00109,
  section 4).
* vote: the fraction of members whose argmax is each class. It gives zero probability to every class nobody voted
  for, so its NLL is not meaningful and `scores` reports None for it.

Calibration follows Guo et al. 2017 (arXiv 1706.04599, section 2): equal-width confidence bins, the reliability
diagram and the expected calibration error. NLL is the proper scoring rule used for deep ensembles by
Lakshminarayanan et al. 2017 (arXiv 1612.01474, section 2.2). Test data is only measured here, never used to choose.
"""

import math

import torch

# The package, not its names: attributes (RULES, check_rule, votes, combine) are looked up at call time, so
# `snapens/ensemble/__init__.py` may import this module at any line without a circular-import error.
from snapens import ensemble


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 3 or 0 in logits.shape:
        raise ValueError(f"logits must be a non-empty M x N x C tensor, got shape {tuple(logits.shape)}")


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or 0 in probs.shape or not probs.is_floating_point():
        raise ValueError(f"probs must be a non-empty floating-point N x C tensor, got {probs.dtype} "
                         f"{tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},) to match probs, got {tuple(labels.shape)}")


def probabilities(logits: torch.Tensor, rule: str = "logits") -> torch.Tensor:
    """The ensemble's predictive distribution: float64 N x C, rows summing to 1, from M x N x C logits (any float);
    rule "logits" is the softmax of the mean logits, "probs" the mean of the members' softmax, "vote" the fraction of
    the M members whose argmax is each class. ValueError for another rule or a tensor that is not M x N x C."""
    ensemble.check_rule(rule)
    _check_logits(logits)
    if rule == "vote":
        return ensemble.votes(logits).double() / len(logits)  # the votes `combine` counts
    logits = logits.double()
    if rule == "logits":
        return logits.mean(0).softmax(-1)
    return logits.softmax(-1).mean(0)


def predictions(logits: torch.Tensor, rule: str = "logits") -> torch.Tensor:
    """The ensemble's int64 N predicted classes from M x N x C logits: `combine(logits, rule).argmax(-1)`, ties
    broken the same way (a vote tie goes to the tied class with the larger mean probability)."""
    _check_logits(logits)
    return ensemble.combine(logits, rule).argmax(-1)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p[label] over N x C probabilities and int64 N labels, in nats (Lakshminarayanan et al. 2017, arXiv
    1612.01474); float('inf') if any p[label] is exactly 0 (no clamping, which would hide a certain, wrong answer)."""
    _check_probs(probs, labels)
    p = probs.double().gather(1, labels[:, None]).squeeze(1)
    if (p == 0).any():
        return math.inf
    return -p.log().mean().item()


def _bin_sums(probs: torch.Tensor, labels: torch.Tensor, bins: int,
              predicted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin: number of points, number correct, sum of confidences (each float64, length `bins`).

    Bin b holds confidences in (b/B, (b+1)/B]; a confidence of 0 goes in bin 0 (Guo et al. 2017, arXiv 1706.04599,
    section 2). The edges are computed in the dtype of `probs`, so a confidence that equals an edge in its own
    precision (0.6 = 9/15 in float32 or float64) is in the bin that the edge closes."""
    _check_probs(probs, labels)
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    if predicted is None:
        predicted = probs.argmax(-1)
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted must have shape {tuple(labels.shape)}, got {tuple(predicted.shape)}")
    confidence = probs.gather(1, predicted[:, None]).squeeze(1)
    upper = torch.arange(1, bins + 1, dtype=probs.dtype, device=probs.device) / bins
    # bucketize(right=False) returns b with upper[b-1] < x <= upper[b]; clamp catches a confidence above 1 by rounding.
    index = torch.bucketize(confidence, upper).clamp(max=bins - 1)
    zeros = torch.zeros(bins, dtype=torch.float64, device=probs.device)
    count = zeros.index_add(0, index, torch.ones_like(confidence, dtype=torch.float64))
    correct = zeros.index_add(0, index, (predicted == labels).double())
    return count, correct, zeros.index_add(0, index, confidence.double())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15, predicted: torch.Tensor | None = None) -> float:
    """Expected calibration error as a fraction in [0, 1] (Guo et al. 2017, arXiv 1706.04599, eq. 3).

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over `bins` equal-width bins of confidence in [0, 1] (see
    `reliability` for the bins). Confidence is the probability of the predicted class.

    Args:
        probs: N x C predictive probabilities; labels: int64 N true classes.
        predicted: int64 N predicted classes; defaults to probs.argmax(-1). Pass `predictions(logits, "vote")` for
            a vote, so its tie-break is the one used.
    """
    count, correct, confidence = _bin_sums(probs, labels, bins, predicted)
    # |B_b|/N * |correct_b/|B_b| - confidence_b/|B_b|| = |correct_b - confidence_b| / N; empty bins add 0.
    return ((correct - confidence).abs().sum() / count.sum()).item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15,
                predicted: torch.Tensor | None = None) -> dict:
    """The data of a reliability diagram (Guo et al. 2017, arXiv 1706.04599, figure 1); arguments as for `ece`.

    Returns:
        {"lower", "upper", "count", "accuracy", "confidence"}, each a list of length `bins`: bin b holds
        confidences in (lower[b], upper[b]] = (b/B, (b+1)/B] (a confidence of 0 goes in bin 0), count[b] points
        (int), their accuracy and mean confidence (fractions; None for an empty bin).
        ECE = sum_b count[b] / N * |accuracy[b] - confidence[b]| over the non-empty bins.
    """
    count, correct, confidence = (sums.tolist() for sums in _bin_sums(probs, labels, bins, predicted))
    return {
        "lower": [b / bins for b in range(bins)],
        "upper": [(b + 1) / bins for b in range(bins)],
        "count": [int(n) for n in count],
        "accuracy": [k / n if n else None for k, n in zip(correct, count)],
        "confidence": [s / n if n else None for s, n in zip(confidence, count)],
    }


def disagreement(logits: torch.Tensor) -> torch.Tensor:
    """Pairwise prediction disagreement of the members, a measure of ensemble diversity (arXiv 1704.00109, fig. 5):
    float64 M x M from M x N x C logits, entry (i, j) the fraction of the N points where members i and j predict
    different classes (argmax); symmetric with a zero diagonal."""
    _check_logits(logits)
    predicted = logits.argmax(-1)  # M x N
    return (predicted[:, None, :] != predicted[None, :, :]).double().mean(-1)


def scores(logits: torch.Tensor, labels: torch.Tensor, rule: str = "logits", bins: int = 15) -> dict:
    """Accuracy, NLL and ECE of the ensemble of all M members (M x N x C logits, int64 N labels) under `rule`.

    Returns:
        {"acc": fraction correct, "nll": nats per point, or None for "vote" (a vote gives zero probability to the
        classes nobody voted for, so its NLL is infinite as soon as one label gets no vote, and not meaningful),
        "ece": fraction}. acc equals `accuracy(combine(logits, rule), labels)`.
    """
    probs = probabilities(logits, rule)
    predicted = predictions(logits, rule)
    return {
        "acc": (predicted == labels).double().mean().item(),
        "nll": None if rule == "vote" else nll(probs, labels),
        "ece": ece(probs, labels, bins, predicted=predicted),
    }


def curves(logits: torch.Tensor, labels: torch.Tensor, rules: tuple[str, ...] | None = None, bins: int = 15) -> dict:
    """Scores of growing ensembles, as in Huang et al. 2017 (arXiv 1704.00109, figure 3).

    Args:
        logits: M x N x C member logits in cycle order (index 0 is the first snapshot).
        rules: the rules to score; None: all of `RULES`.
    Returns:
        {"last": {rule: [...]}, "first": {rule: [...]}}: entry m-1 of a list is `scores` of the last (or first) m
        members with "m" added, for m = 1 .. M.
    """
    _check_logits(logits)
    rules = ensemble.RULES if rules is None else rules
    members = len(logits)
    ends = {"last": lambda m: logits[members - m:], "first": lambda m: logits[:m]}
    return {end: {rule: [{"m": m, **scores(take(m), labels, rule, bins)} for m in range(1, members + 1)]
                  for rule in rules}
            for end, take in ends.items()}
