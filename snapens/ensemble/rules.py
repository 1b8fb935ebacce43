"""The one place where member outputs become an ensemble's: rules, weights and temperatures.

Everything that combines members calls these functions: the end-of-run report, the ensemble tool, predict=, the
exported program, member choice and weight fitting on validation, temperature scaling, the distillation teacher and
`SnapshotEnsemble`. Shapes: M members, N images, C classes; member logits are M x N x C.

The rules (`RULES`):

* logits (the default): the (weighted) mean of the members' logits, then a softmax: a renormalised geometric mean of
  their probabilities.
* probs: the (weighted) mean of the members' softmax probabilities (Huang et al. 2017, arXiv 1704.00109, section 4).
* vote: the (weighted) fraction of members whose argmax is each class. A class nobody voted for gets probability 0,
  so a vote has no meaningful NLL and no temperature (`gives_probabilities` is False for it).

Weights are M numbers >= 0 summing to 1 (a member chosen k times by greedy selection weighs k times); None means
uniform, computed as a plain mean.

What a temperature means, decided once:

* `probabilities(..., temperature=T)` is temperature scaling for calibration (Guo et al. 2017, arXiv 1706.04599):
  the members are pooled first, then the pooled distribution p is rescaled, softmax(log p / T) ("pool, then
  calibrate", Ashukha et al. 2020, arXiv 2002.06470, section 4). It changes no prediction. This is what the
  temperature fitted on validation means everywhere it is stored or applied (results.json, predict=, export).
* `soft_targets(..., temperature=T)` is Hinton et al.'s softening for distillation (arXiv 1503.02531, section 2):
  each member's logits are divided by T before they are pooled, so every member shows its small probabilities
  (its "dark knowledge") to the student. For rule logits the two meanings give the same distribution (the mean of
  z / T is the mean of z over T); for rule probs they differ unless T = 1, and both equal `probabilities` at T = 1.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

TINY = 1e-300  # log(0) guard for probabilities that underflowed in float64; far below any probability reported


@dataclass(frozen=True)
class Rule:
    """A rule as the (weighted) mean of one term per member: `terms` maps member logits M x N x C to the terms
    averaged (M x N x K), `outputs(mean, unit)` their mean to the ensemble's (probabilities, scores), each N x C
    (rows of probabilities sum to 1; the prediction is the argmax of scores), `unit` being what the lightest
    member counts as (M for a plain mean). Every ensemble of a rule, weighted, growing or a greedy candidate, is
    its mean term, so a running sum gives each in O(N K) (`growing`, `with_each`)."""

    terms: Callable[[torch.Tensor], torch.Tensor]
    outputs: Callable[[torch.Tensor, torch.Tensor | float], tuple[torch.Tensor, torch.Tensor]]
    calibrated: bool = True  # a distribution with an NLL and a temperature (a vote's fractions are not)


def _pool(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the members (dim 0), weighted when `weights` is given."""
    if weights is None:
        return values.mean(0)
    return (weights.to(values.dtype).view(-1, *[1] * (values.dim() - 1)) * values).sum(0)


def _unit(members: int, weights: torch.Tensor | None) -> float:
    """What the lightest member counts as: M for a plain mean; 1 / its weight otherwise, so that members repeated
    by greedy selection count as often as they were picked."""
    return members if weights is None else 1 / weights[weights > 0].min().item()


def _one_hot(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])


def _vote(mean: torch.Tensor, unit) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' share of votes per class, and as scores the votes (in units of the lightest member) plus half
    the mean probability: ties broken by confidence, which can never outweigh a vote."""
    share, probs = mean.chunk(2, -1)
    return share, unit * share + 0.5 * probs


# A rule is one entry here; everything that takes a rule= (the config, the tools, export) takes these names.
RULES: dict[str, Rule] = {
    "logits": Rule(lambda z: z, lambda mean, unit: (mean.softmax(-1), mean)),
    "probs": Rule(lambda z: z.softmax(-1), lambda mean, unit: (mean, mean)),
    "vote": Rule(lambda z: torch.cat([_one_hot(z).to(z.dtype), z.softmax(-1)], -1), _vote, calibrated=False),
}


def votes(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """N x C: how many members predict each class by the argmax of their logits (int64); with weights, their
    weight in units of the lightest member's (float64). A vote's scores are these plus half the mean probability."""
    if weights is None:
        return _one_hot(logits).sum(0)
    return _pool(_one_hot(logits).double(), weights) / weights[weights > 0].min().double()


def check_rule(rule: str) -> None:
    """ValueError naming `rule` and the allowed ones."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not allowed; choose one of: {', '.join(RULES)}")


def gives_probabilities(rule: str) -> bool:
    """Whether the rule's output is a distribution with an NLL and a temperature (not a vote's)."""
    check_rule(rule)
    return RULES[rule].calibrated


def check_members(logits: torch.Tensor) -> None:
    if logits.dim() != 3 or 0 in logits.shape:
        raise ValueError(f"logits must be a non-empty M x N x C tensor, got shape {tuple(logits.shape)}")


def check_weights(weights: torch.Tensor | None, members: int) -> None:
    """None, or `members` finite weights >= 0 summing to 1 (within 1e-6)."""
    if weights is None:
        return
    if weights.shape != (members,) or not torch.isfinite(weights).all() or (weights < 0).any() \
            or abs(weights.double().sum().item() - 1) > 1e-6:
        raise ValueError(f"weights must be {members} finite numbers >= 0 summing to 1, got {weights.tolist()}")


def check_temperature(temperature: float | None) -> None:
    if temperature is not None and not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def combine(logits: torch.Tensor, rule: str = "logits", weights: torch.Tensor | None = None) -> torch.Tensor:
    """Ensemble scores N x C from member logits M x N x C, in their dtype; the prediction is their argmax.
    logits: the mean logits. probs: the mean probabilities. vote: the votes plus half the mean probability, which
    breaks ties by confidence and can never outweigh a vote."""
    check_rule(rule)
    check_weights(weights, len(logits))
    return _outputs(logits, rule, weights)[1]


def _outputs(logits: torch.Tensor, rule: str, weights: torch.Tensor | None,
             unit: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r = RULES[rule]
    return r.outputs(_pool(r.terms(logits), weights), _unit(len(logits), weights) if unit is None else unit)


def predictions(logits: torch.Tensor, rule: str = "logits", weights: torch.Tensor | None = None) -> torch.Tensor:
    """int64 N predicted classes: the argmax of `combine` (a vote's tie goes to the larger mean probability)."""
    check_members(logits)
    return combine(logits, rule, weights).argmax(-1)


def probabilities(logits: torch.Tensor, rule: str = "logits", weights: torch.Tensor | None = None,
                  temperature: float | None = None) -> torch.Tensor:
    """The ensemble's predictive distribution N x C (rows sum to 1), in the dtype of `logits` (pass float64 for
    scores; float64 once scaled): see the module's docstring for the rules and for what `temperature` means (None:
    unscaled). ValueError for a bad rule, shape, weight or temperature, or a temperature on a vote."""
    check_rule(rule)
    check_members(logits)
    check_weights(weights, len(logits))
    check_temperature(temperature)
    if temperature is not None and not RULES[rule].calibrated:
        raise ValueError(f"rule={rule!r} has no temperature: its probabilities are not a model's (vote fractions)")
    return distribution(logits, rule, weights, temperature)


def distribution(logits: torch.Tensor, rule: str, weights: torch.Tensor | None = None,
                 temperature: float | None = None) -> torch.Tensor:
    """`probabilities` without its checks (no data-dependent branch), for a module traced by torch.export whose
    weights and temperature were checked when it was built."""
    probs = _outputs(logits, rule, weights, unit=1)[0]  # the unit is the scores', not the probabilities'
    return probs if temperature is None else scale(probs, temperature)


def growing(logits: torch.Tensor, rule: str, chunk: int = 2**24):
    """The ensembles of the first m members, m = 1 .. M (reverse the members for the last m), from a running sum of
    their terms: O(M N C) for all M, not O(M^2 N C). Yields (m - 1 of the group's first, probabilities, scores), each
    of leading dimension the group's ensembles, in groups of at most `chunk` numbers each."""
    check_rule(rule)
    check_members(logits)
    r, total = RULES[rule], 0
    step = max(1, chunk // (2 * logits[0].numel()))  # members per group (a vote's terms are twice the logits)
    for first in range(0, len(logits), step):
        sums = total + r.terms(logits[first:first + step]).cumsum(0)
        m = torch.arange(first + 1, first + len(sums) + 1, dtype=sums.dtype).view(-1, 1, 1)
        total = sums[-1]
        yield first, *r.outputs(sums / m, m)


def member_terms(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """What `rule` averages over the members, M x N x K, for `with_each`: computed once for all of greedy's picks."""
    check_rule(rule)
    return RULES[rule].terms(logits)


def with_each(terms: torch.Tensor, picked: list[int], rule: str, chunk: int = 2**24):
    """For greedy selection: (probabilities, scores) of the ensemble of the members `picked` (repeats counted) plus
    member i, for each member i in turn, from the members' `member_terms`, in groups of members of at most `chunk`
    numbers each: yields (first i, probabilities, scores) with leading dimension the group's members. O(M N C) for
    all M candidates."""
    check_rule(rule)
    n, total = len(picked) + 1, terms[picked].sum(0) if picked else 0
    step = max(1, chunk // terms[0].numel())
    for first in range(0, len(terms), step):
        yield first, *RULES[rule].outputs((total + terms[first:first + step]) / n, n)


def scale(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """N x C probabilities at `temperature`: softmax(log p / T), in float64 (temperature scaling of a pooled
    distribution, Guo et al. 2017)."""
    return (probs.double().clamp_min(TINY).log() / temperature).softmax(-1)


def soft_targets(logits: torch.Tensor, rule: str, temperature: float,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """A distillation teacher's N x C targets at `temperature`, in the dtype of `logits`: each member softened
    (Hinton et al. 2015), then pooled by `rule` (logits or probs) with `weights`; see the module's docstring."""
    if not gives_probabilities(rule):
        raise ValueError(f"rule={rule!r}: a teacher needs probabilities, which a vote does not give; use logits or "
                         "probs")
    check_temperature(temperature)
    return probabilities(logits / temperature, rule, weights)
