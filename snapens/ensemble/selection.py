"""Ensemble members chosen on the validation split, never on test.

With short cycles the early snapshots are much weaker than the last ones, and averaging them in can make the
"ensemble" worse than its own last snapshot. Two choices made on held-out validation images only:

* last m: the ensemble of the last m snapshots, m in 1..M, with the lowest validation NLL (the error rate for a
  vote, whose NLL is not meaningful);
* greedy: forward selection with replacement (Caruana et al. 2004, "Ensemble selection from libraries of models"):
  start from the best single member and keep adding the member (again, if it is best) that lowers the validation
  criterion most; stop when no addition lowers it. A member chosen k times weighs k times.
* weighted: every member with a weight (a softmax of M free numbers) fitted by L-BFGS to the validation NLL, beside
  the uniform average (not for a vote).

`choose` takes the validation logits and labels to decide and only then scores the decision on the test split, so
the test labels cannot change which members are chosen.
"""

import torch

from snapens.ensemble import calibration, metrics, rules


def criterion(logits: torch.Tensor, labels: torch.Tensor, rule: str) -> float:
    """What the choice minimises: the ensemble's NLL, or its error rate under a vote."""
    score = metrics.scores(logits, labels, rule)
    return score["nll"] if score["nll"] is not None else 1.0 - score["acc"]


def _criteria(probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, rule: str) -> torch.Tensor:
    """`criterion` of E ensembles at once, from their E x N x C probabilities and scores (rules.growing and
    rules.with_each give them): float64 E."""
    values = metrics.nlls(probs, labels) if rules.gives_probabilities(rule) else \
        1.0 - (scores.argmax(-1) == labels).double().mean(-1)
    return values.masked_fill(values.isnan(), float("inf"))  # a member with a NaN output is never the best choice


def last_m(logits: torch.Tensor, labels: torch.Tensor, rule: str) -> list[int]:
    """Indices of the last m of the M members (M x N x C validation logits), m minimising the criterion; the
    smaller m on a tie. O(M N C): the last m from a running sum (rules.growing)."""
    values = torch.cat([_criteria(p, s, labels, rule) for _, p, s in rules.growing(logits.double().flip(0), rule)])
    best = int(values.argmin()) + 1  # argmin: the first of equal values, the smaller m
    return list(range(len(logits) - best, len(logits)))


def greedy(logits: torch.Tensor, labels: torch.Tensor, rule: str, max_size: int | None = None) -> list[int]:
    """Caruana et al.'s forward selection with replacement on validation logits: member indices in the order they
    were added, repeats kept; at most `max_size` (default 2M) picks. When no member has a finite criterion (every
    one gives some validation image a probability of exactly 0), the last member alone, as last_m chooses then.
    Each pick tries every member from the running sum of those picked (rules.with_each): O(M N C) per pick."""
    chosen: list[int] = []
    best = float("inf")
    terms = rules.member_terms(logits.double(), rule)  # once: each pick adds to their running sum
    for _ in range(max_size or 2 * len(logits)):
        values = torch.cat([_criteria(p, s, labels, rule) for _, p, s in rules.with_each(terms, chosen, rule)])
        pick = int(values.argmin())  # the lower index on a tie
        if values[pick].item() >= best:
            break
        chosen, best = chosen + [pick], values[pick].item()
    return chosen or [len(logits) - 1]


def weighted_probabilities(logits: torch.Tensor, weights: torch.Tensor, rule: str) -> torch.Tensor:
    """float64 N x C probabilities of the members combined with `weights` (M, summing to 1):
    `rules.probabilities` in float64."""
    return rules.probabilities(logits.to(torch.float64), rule, weights.to(torch.float64))


def fit_weights(logits: torch.Tensor, labels: torch.Tensor, rule: str, max_iter: int = 100) -> torch.Tensor:
    """Member weights w = softmax(a) that minimise the NLL of the weighted ensemble on validation logits and labels,
    by L-BFGS on the M numbers a from uniform weights (a = 0). Deterministic on the same inputs."""
    a = torch.zeros(len(logits), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([a], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        probs = weighted_probabilities(logits, a.softmax(0), rule)
        loss = -probs.gather(1, labels[:, None]).clamp_min(1e-300).log().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return a.detach().softmax(0)


def choose(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor, test_labels: torch.Tensor,
           names: list[str], rule: str = "logits") -> dict:
    """Every choice made on validation, then scored once on test: {"by", "last_m", "greedy"[, "weighted"]}: the
    members (names, repeats kept) or, for "weighted", each member's weight fitted on validation NLL (not for a
    vote), with validation and test scores; and (not for a vote) the temperature fitted on validation for that
    choice (snapens.ensemble.calibration) with its test scores after it, "test_calibrated"."""
    probabilistic = rules.gives_probabilities(rule)
    out = {"by": "validation NLL" if probabilistic else "validation error rate"}
    for name, picks in (("last_m", last_m(val_logits, val_labels, rule)),
                        ("greedy", greedy(val_logits, val_labels, rule))):
        out[name] = {"members": [names[i] for i in picks], "val": metrics.scores(val_logits[picks], val_labels, rule),
                     "test": metrics.scores(test_logits[picks], test_labels, rule)}
        if probabilistic:  # a repeated member weighs as often as it was picked, in the mean and here
            out[name].update(_calibrated(metrics.probabilities(val_logits[picks], rule), val_labels,
                                         metrics.probabilities(test_logits[picks], rule), test_labels))
    if probabilistic:
        weights = fit_weights(val_logits, val_labels, rule)
        val_probs = weighted_probabilities(val_logits, weights, rule)
        test_probs = weighted_probabilities(test_logits, weights, rule)
        out["weighted"] = {"weights": dict(zip(names, weights.tolist())), "val": metrics.probability_scores(val_probs, val_labels),
                           "test": metrics.probability_scores(test_probs, test_labels),
                           **_calibrated(val_probs, val_labels, test_probs, test_labels)}
    return out


def _calibrated(val_probs: torch.Tensor, val_labels: torch.Tensor, test_probs: torch.Tensor,
                test_labels: torch.Tensor) -> dict:
    temperature = calibration.fit_temperature(val_probs, val_labels)  # None: no errors to fit on, left as it is
    scaled = rules.scale(test_probs, temperature or 1.0)
    return {"temperature": temperature, "test_calibrated": metrics.probability_scores(scaled, test_labels)}


def format_choice(chosen: dict) -> str:
    """Two lines for the report: each choice, its members and its test scores."""
    lines = []
    for name, label in (("last_m", "last m"), ("greedy", "greedy (Caruana)"), ("weighted", "weights")):
        if name not in chosen:
            continue
        c = chosen[name]
        members = (" ".join(c["members"]) if "members" in c else
                   " ".join(f"{k} {w:.2f}" for k, w in c["weights"].items()))
        nll = "-" if c["test"]["nll"] is None else f"{c['test']['nll']:.4f}"
        lines.append(f"chosen on validation, {label}: {members}: test acc {c['test']['acc']:.4f} nll {nll} "
                     f"ece {c['test']['ece']:.4f}")
    return "\n".join(lines)


def verdict(result: dict, weak_by: float = 0.05, restarts: bool = True) -> dict:
    """What a finished run's numbers say about its ensemble, from results.json's own numbers (nothing is chosen by
    it): each snapshot's test accuracy in cycle order, the all-snapshot ensemble's gain over the last snapshot, the
    chosen ones' gains (with their intervals, results.json's "gains"), and one plain sentence built from the run's
    facts when something went wrong: a run that diverged in effect, or earlier snapshots `weak_by` or more below the
    last that averaging in did not help, said for a schedule with restarts (`restarts`) or without, and for a run
    with members chosen on validation or without one."""
    trend = [s["acc"] for s in result["snapshots"]]
    last = result["single"]["acc"]
    out = {"trend": trend, "ensemble_gain": result["ensemble"]["acc"] - last,
           "chosen_gains": {k: c["test"]["acc"] - last for k, c in result.get("chosen", {}).items() if k != "by"},
           "advice": None, "intervals": result.get("gains")}
    if diverged(result):
        greedy = result.get("chosen", {}).get("greedy", {}).get("members", [])
        out["advice"] = (
            "Every snapshot gives some validation image a probability of exactly 0 for its true class (validation "
            f"NLL infinite): the training diverged in effect (chosen on validation, greedy: {' '.join(greedy)}); "
            "lower scheduler.eta_max (python -m snapens.lr_find suggests one).")
    elif len(trend) > 1 and last - sum(trend[:-1]) / (len(trend) - 1) >= weak_by and out["ensemble_gain"] <= 0:
        out["advice"] = weak_early_snapshots(result, trend, -out["ensemble_gain"], restarts)
    return out


def diverged(result: dict) -> bool:
    """Every snapshot's validation NLL infinite: some validation label got probability 0 from each."""
    val = result.get("val", {}).get("snapshots", [])
    return bool(val) and all(s["nll"] is not None and s["nll"] == float("inf") for s in val)


def weak_early_snapshots(result: dict, trend: list[float], loss: float, restarts: bool) -> str:
    """The advice when the earlier snapshots drag the ensemble down, from the run's own facts."""
    head = (f"The earlier snapshots are much weaker than the last (cycle 1 {100 * trend[0]:.1f}%, cycle {len(trend)} "
            f"{100 * trend[-1]:.1f}%) and the ensemble of all {len(trend)} is {100 * loss:.1f} points below the last "
            "snapshot: ")
    why = ("the cycles look too short for this model and data. Huang et al. (arXiv 1704.00109) give each CIFAR cycle "
           "40-50 epochs; try fewer cycles (scheduler.cycles=M) or a larger trainer.epochs" if restarts else
           "this schedule has no restarts, so the earlier snapshots were taken at a high learning rate, far from any "
           "minimum; a snapshot ensemble needs cycles that each end at a minimum (scheduler=sgdr or snapshot)")
    chosen = result.get("chosen", {}).get("greedy")
    after = (f". Chosen on validation (greedy): {' '.join(chosen['members'])}." if chosen else
             ", and hold out data.val_size=N to have members chosen on validation.")
    return head + why + after


def format_verdict(v: dict) -> str:
    """The verdict's lines for the log: each gain over the last snapshot with its paired 95% interval on the test
    images (snapens.ensemble.uncertainty) where the report has one, and the advice."""
    intervals = {k: g for k, g in (v.get("intervals") or {}).items() if isinstance(g, dict)}
    gains = _with_intervals(intervals) if intervals else ", ".join(
        f"{name} {100 * g:+.2f}" for name, g in {"all snapshots": v["ensemble_gain"], **v["chosen_gains"]}.items())
    lines = [f"test accuracy by cycle: {' '.join(f'{100 * a:.1f}' for a in v['trend'])} (%); ensemble gain over "
             f"the last snapshot (points): {gains}"]
    return "\n".join(lines + ([v["advice"]] if v["advice"] else []))


def _with_intervals(intervals: dict) -> str:
    acc = ", ".join(f"{name} {_interval(g['acc'], 100, '.2f')}" for name, g in intervals.items())
    nll = ", ".join(f"{name} {_interval(g['nll'], 1, '.3f')}" for name, g in intervals.items() if "nll" in g)
    return f"{acc}; NLL change: {nll or '-'} (paired 95% intervals on the test images)"


def _interval(g: dict, scale: float, form: str) -> str:
    shown = f"{scale * g['gain']:+{form}} [{scale * g['low']:+{form}}, {scale * g['high']:+{form}}]"
    return shown if g["distinguishable"] else f"{shown} (not distinguishable from zero)"
