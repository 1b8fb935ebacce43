"""How sure a gain is: paired 95% intervals on the test split for an ensemble against its last snapshot.

A gain measured on one test set is a difference of two means over the same images, so its uncertainty is that of
the per-image differences: for accuracy, (ensemble right) - (last right) in {-1, 0, 1}; for NLL, the difference of
the per-image negative log-likelihoods. The interval is the percentile bootstrap over test images (Efron &
Tibshirani 1993, ch. 13; 2,000 resamples from a fixed seed, so a report repeats exactly), and for accuracy McNemar's
exact test on the discordant images gives a p-value. A gain whose interval spans 0 is "not distinguishable from
zero" on this test set. This is the test-set sampling error of one run; the spread over seeds is another (snapens.
report shows that one across a sweep).
"""

import math

import torch

from snapens.ensemble import rules

RESAMPLES = 2000
LEVEL = 0.95


def paired_interval(diff: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of per-image differences (N), the percentile bootstrap's 95% interval of the mean."""
    diff = diff.double()
    index = torch.randint(0, len(diff), (resamples, len(diff)), generator=torch.Generator().manual_seed(seed))
    means = diff[index].mean(1)
    low, high = torch.quantile(means, torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=torch.float64))
    return diff.mean().item(), low.item(), high.item()


def mcnemar(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value from the discordant images: `better` right only with the ensemble, `worse`
    right only with the last snapshot (a binomial test of better against n = better + worse at 1/2)."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def per_image(probs: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: right (0/1) and negative log-likelihood (inf where the label's probability is exactly 0)."""
    p = probs.double().gather(1, labels[:, None]).squeeze(1)
    return (predicted == labels).double(), -p.log()


def gain(ensemble: tuple[torch.Tensor, torch.Tensor], last: tuple[torch.Tensor, torch.Tensor],
         with_nll: bool = True) -> dict:
    """The paired gain of `ensemble` over `last` (each per_image's pair): accuracy and (with_nll, and where every
    image's NLL is finite) NLL, each with its interval, McNemar's p for accuracy, and whether each interval spans 0
    ("distinguishable": False)."""
    right, nll = ensemble[0] - last[0], ensemble[1] - last[1]
    out = {"acc": dict(zip(("gain", "low", "high"), paired_interval(right))),
           "mcnemar_p": mcnemar(int((right > 0).sum()), int((right < 0).sum()))}
    if with_nll and torch.isfinite(nll).all():
        out["nll"] = dict(zip(("gain", "low", "high"), paired_interval(nll)))
    for key in ("acc", "nll"):
        if key in out:
            out[key]["distinguishable"] = not out[key]["low"] <= 0 <= out[key]["high"]
    return out


def gains(logits: torch.Tensor, labels: torch.Tensor, rule: str, chosen: dict, names: list[str],
          split: str = "test") -> dict:
    """results.json's "gains": every ensemble the report scores (all snapshots; last m, greedy and weighted chosen on
    validation, when there are) against the last snapshot, on the images of `split` (M x N x C logits; no NLL for
    a rule without probabilities)."""
    logits = logits.double()
    last = per_image(rules.probabilities(logits[-1:]), logits[-1].argmax(-1), labels)
    combos = {"all snapshots": (list(range(len(logits))), None)}
    for name in ("last_m", "greedy"):
        if name in chosen:
            combos[name] = ([names.index(n) for n in chosen[name]["members"]], None)
    if "weighted" in chosen:
        combos["weighted"] = (list(range(len(logits))), torch.tensor(list(chosen["weighted"]["weights"].values()),
                                                                     dtype=torch.float64))
    out = {}
    for name, (members, weights) in combos.items():
        probs = rules.probabilities(logits[members], rule, weights)
        out[name] = gain(per_image(probs, rules.predictions(logits[members], rule, weights), labels), last,
                         rules.gives_probabilities(rule))
    return {"against": f"the last snapshot, paired on the {split} images", "level": LEVEL, "resamples": RESAMPLES,
            **out}
