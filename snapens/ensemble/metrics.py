"""Ensemble metrics on stored member logits: predictive distribution, accuracy, NLL, calibration, diversity, curves.

Everything is arithmetic on the M x N x C logits that `cache.cached_logits` computes once (M snapshots in cycle order,
N images, C classes), in float64. The rules that combine members are those of `snapens.ensemble.rules`; a vote
gives zero probability to every class nobody voted for, so its NLL is not meaningful and `scores` reports None.

Calibration follows Guo et al. 2017 (arXiv 1706.04599, section 2): equal-width confidence bins, the reliability
diagram and the expected calibration error. NLL is the proper scoring rule used for deep ensembles by
Lakshminarayanan et al. 2017 (arXiv 1612.01474, section 2.2). Test data is only measured here, never used to choose.
"""

import math

import torch

from snapens.ensemble import rules as combining  # `rules` is curves' argument


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or 0 in probs.shape or not probs.is_floating_point():
        raise ValueError(f"probs must be a non-empty floating-point N x C tensor, got {probs.dtype} "
                         f"{tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},) to match probs, got {tuple(labels.shape)}")


def probabilities(logits: torch.Tensor, rule: str = "logits") -> torch.Tensor:
    """The ensemble's predictive distribution in float64 N x C from M x N x C logits: `snapens.ensemble.rules.probabilities`."""
    combining.check_members(logits)
    return combining.probabilities(logits.double(), rule)


def predictions(logits: torch.Tensor, rule: str = "logits") -> torch.Tensor:
    """The ensemble's int64 N predicted classes from M x N x C logits: `snapens.ensemble.rules.predictions`, in
    float64 as the probabilities and member choice are (a vote tie goes to the tied class with the larger mean
    probability, which float32 can round to a tie of exact ones)."""
    return combining.predictions(logits.double(), rule)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p[label] over N x C probabilities and int64 N labels, in nats (Lakshminarayanan et al. 2017, arXiv
    1612.01474); float('inf') if any p[label] is exactly 0 (no clamping, which would hide a certain, wrong answer)."""
    _check_probs(probs, labels)
    return nlls(probs[None], labels).item()


def nlls(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`nll` of each of E ensembles at once: float64 E from E x N x C probabilities."""
    p = probs.double().gather(-1, labels.expand(len(probs), -1)[..., None]).squeeze(-1)
    return torch.where((p == 0).any(-1), math.inf, -p.log().mean(-1))


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
    combining.check_members(logits)
    predicted = logits.argmax(-1)  # M x N
    differ = torch.stack([(row != predicted).sum(-1) for row in predicted])  # a row at a time: no M x M x N buffer
    return differ.double() / predicted.shape[1]


def scores(logits: torch.Tensor, labels: torch.Tensor, rule: str = "logits", bins: int = 15) -> dict:
    """Accuracy, NLL and ECE of the ensemble of all M members (M x N x C logits, int64 N labels) under `rule`:
    `probability_scores` of its distribution and its predictions, with "nll" None for a vote (a vote gives zero
    probability to the classes nobody voted for, so its NLL is infinite as soon as one label gets no vote, and not
    meaningful)."""
    return probability_scores(probabilities(logits, rule), labels, bins, predictions(logits, rule),
                              with_nll=combining.gives_probabilities(rule))


def probability_scores(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15,
                       predicted: torch.Tensor | None = None, with_nll: bool = True) -> dict:
    """The one place acc, NLL and ECE are computed: {"acc": fraction correct, "nll": nats per point (None without
    `with_nll`), "ece": fraction} of N x C probabilities against int64 N labels; `predicted` defaults to the
    argmax of `probs` (pass a vote's tie-broken predictions)."""
    predicted = probs.argmax(-1) if predicted is None else predicted
    return {
        "acc": (predicted == labels).double().mean().item(),
        "nll": nll(probs, labels) if with_nll else None,
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
    combining.check_members(logits)
    rules = combining.RULES if rules is None else rules
    ends = {"last": logits.double().flip(0), "first": logits.double()}
    return {end: {rule: _growing_scores(members, labels, rule, bins) for rule in rules} for end, members in ends.items()}


def _growing_scores(logits: torch.Tensor, labels: torch.Tensor, rule: str, bins: int) -> list[dict]:
    """`probability_scores` of the first m members' ensemble, m = 1 .. M, with "m" (rules.growing: O(M N C))."""
    with_nll = combining.gives_probabilities(rule)
    out = []
    for first, probs, scores in combining.growing(logits, rule):
        out += [{"m": first + j + 1, **probability_scores(p, labels, bins, s.argmax(-1), with_nll=with_nll)}
                for j, (p, s) in enumerate(zip(probs, scores))]
    return out
