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
    """How a rule pools member logits M x N x C (with weights M, or None for a plain mean) into N x C."""

    probabilities: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # the distribution, rows sum to 1
    scores: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None  # argmax: the prediction
    #   (None: the probabilities themselves)
    calibrated: bool = True  # a distribution with an NLL and a temperature (a vote's fractions are not)


def _pool(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the members (dim 0), weighted when `weights` is given."""
    if weights is None:
        return values.mean(0)
    return (weights.to(values.dtype).view(-1, *[1] * (values.dim() - 1)) * values).sum(0)


def _one_hot(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])


def votes(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """N x C: how many members predict each class by the argmax of their logits (int64); with weights, their
    weight in units of the lightest member's (float64), so members repeated by greedy selection count as often as
    they were picked, and the tie-break (half a probability) never outweighs the lightest vote."""
    if weights is None:
        return _one_hot(logits).sum(0)
    return _pool(_one_hot(logits).double(), weights) / weights[weights > 0].min().double()


# A rule is one entry here; everything that takes a rule= (the config, the tools, export) takes these names.
RULES: dict[str, Rule] = {
    "logits": Rule(lambda z, w: _pool(z, w).softmax(-1), scores=_pool),
    "probs": Rule(lambda z, w: _pool(z.softmax(-1), w)),
    # votes, plus half the mean probability: ties broken by confidence, which can never outweigh a vote
    "vote": Rule(lambda z, w: _pool(_one_hot(z).to(z.dtype), w),  # the (weighted) share of the members' votes
                 scores=lambda z, w: votes(z, w) + 0.5 * _pool(z.softmax(-1), w), calibrated=False),
}


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
    scores = RULES[rule].scores or RULES[rule].probabilities
    return scores(logits, weights)


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
    probs = RULES[rule].probabilities(logits, weights)
    return probs if temperature is None else scale(probs, temperature)


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
