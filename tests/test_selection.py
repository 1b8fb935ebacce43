"""Members chosen on validation (last m, Caruana's greedy selection): exact choices on hand-made logits, a choice
the test labels cannot change, and the chosen ensembles in results.json."""

import json

import pytest
import torch

from snapens.ensemble import metrics, rules, selection
from snapens.training import train

from conftest import EQUAL_CYCLES_3


def confident(labels: torch.Tensor, right: torch.Tensor, classes: int = 3, margin: float = 4.0) -> torch.Tensor:
    """N x C logits: `margin` on the true class where `right`, else on the next class."""
    target = torch.where(right, labels, (labels + 1) % classes)
    return torch.nn.functional.one_hot(target, classes).double() * margin


LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def members() -> torch.Tensor:
    """A weak early snapshot (right on 2 of 8) and two good late ones that err on different images."""
    weak = confident(LABELS, torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool))
    late_a = confident(LABELS, torch.tensor([1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool))
    late_b = confident(LABELS, torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool))
    return torch.stack([weak, late_a, late_b])


def test_last_m_drops_the_weak_early_snapshot():
    logits = members()
    assert selection.last_m(logits, LABELS, "logits") == [1, 2]  # both late ones: each fixes the other's error
    nll = {m: metrics.scores(logits[3 - m:], LABELS)["nll"] for m in (1, 2, 3)}
    assert nll[2] < min(nll[1], nll[3])


def test_greedy_adds_while_the_criterion_falls():
    logits = members()
    picks = selection.greedy(logits, LABELS, "logits")
    assert sorted(picks[:2]) == [1, 2] and 0 not in picks  # the two late ones tie alone (up to rounding)
    values = [selection.criterion(logits[picks[:k]], LABELS, "logits") for k in range(1, len(picks) + 1)]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)  # each pick lowered it
    assert selection.greedy(logits, LABELS, "vote")[0] in (1, 2)  # the vote decides on the error rate


def reference_last_m(logits, labels, rule):
    """last m as its definition says, each m's ensemble scored on its own (O(M^2 N C))."""
    total = len(logits)
    best = min(range(1, total + 1), key=lambda m: (selection.criterion(logits[total - m:], labels, rule), m))
    return list(range(total - best, total))


def reference_greedy(logits, labels, rule):
    """Caruana's selection as its definition says, every candidate ensemble scored on its own (O(M^3 N C))."""
    chosen, best = [], float("inf")
    for _ in range(2 * len(logits)):
        value, pick = min((selection.criterion(logits[chosen + [i]], labels, rule), i) for i in range(len(logits)))
        if value >= best:
            break
        chosen, best = chosen + [pick], value
    return chosen or [len(logits) - 1]


@pytest.mark.parametrize("rule", ["logits", "probs", "vote"])
@pytest.mark.parametrize("seed", range(6))
def test_the_running_sum_choices_are_the_definitions(rule, seed):
    """Issue 23: last m and greedy from running sums (O(M N C) per pick) choose exactly what scoring every
    candidate ensemble on its own chooses, on members of mixed strength (and in small groups: `chunk`)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (60,), generator=g)
    strength = torch.rand(9, 1, 1, generator=g, dtype=torch.float64) * 3
    logits = torch.randn(9, 60, 4, generator=g, dtype=torch.float64) + strength * torch.nn.functional.one_hot(labels, 4)
    assert selection.last_m(logits, labels, rule) == reference_last_m(logits, labels, rule)
    assert selection.greedy(logits, labels, rule) == reference_greedy(logits, labels, rule)
    terms = rules.member_terms(logits, rule)
    for first, probs, scores in rules.with_each(terms, [3, 3, 5], rule, chunk=2 * terms[0].numel()):  # 2 a group
        for j, (p, s) in enumerate(zip(probs, scores)):
            members = logits[[3, 3, 5, first + j]]
            torch.testing.assert_close(p, rules.probabilities(members, rule), rtol=0, atol=1e-12)
            torch.testing.assert_close(s, rules.combine(members, rule), rtol=0, atol=1e-12)
    for first, probs, scores in rules.growing(logits.flip(0), rule, chunk=500):
        for j, (p, s) in enumerate(zip(probs, scores)):
            torch.testing.assert_close(p, rules.probabilities(logits[8 - first - j:], rule), rtol=0, atol=1e-12)
            torch.testing.assert_close(s, rules.combine(logits[8 - first - j:], rule), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["vote", "probs"])
def test_float32_members_are_chosen_on_the_numbers_reported_for_them(rule):
    """Choice and report in one precision: in float32 a confident member's probabilities round to exactly 1, which
    once turned a vote's tie-break by confidence into a tie-break by class index in the report but not in the
    choice (the review's case: M=3, one image of label 1)."""
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 31.0]], [[30.0, 0.0]]])
    labels = torch.tensor([1])
    assert selection.last_m(logits, labels, rule) == reference_last_m(logits, labels, rule)
    assert selection.greedy(logits, labels, rule) == reference_greedy(logits, labels, rule)
    curve = metrics.curves(logits, labels, (rule,))["last"][rule]
    assert [c["acc"] for c in curve] == [metrics.scores(logits[3 - m:], labels, rule)["acc"] for m in (1, 2, 3)]


def test_a_member_with_nan_outputs_is_never_chosen():
    """A NaN criterion (NaN logits, as an fp16 overflow leaves them) counts as the worst, not the best."""
    logits = members()
    logits[1, 0] = float("nan")
    assert 1 not in selection.greedy(logits, LABELS, "logits") and 1 not in selection.last_m(logits, LABELS, "logits")


def test_an_all_infinite_validation_falls_back_to_the_last_member():
    logits = torch.full((3, 4, 2), -1e9, dtype=torch.float64)
    logits[..., 0] = 0  # every member certain of class 0, every label 1: each NLL infinite
    labels = torch.ones(4, dtype=torch.long)
    assert selection.greedy(logits, labels, "logits") == [2] == reference_greedy(logits, labels, "logits")
    assert selection.last_m(logits, labels, "logits") == reference_last_m(logits, labels, "logits")


def test_test_labels_cannot_change_the_choice():
    val = members()
    generator = torch.Generator().manual_seed(0)
    test_logits = torch.randn(3, 50, 3, generator=generator, dtype=torch.float64)
    choices = []
    for seed in range(5):  # five different test labellings, the validation data the same
        test_labels = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(seed))
        chosen = selection.choose(val, LABELS, test_logits, test_labels, ["c1", "c2", "c3"])
        choices.append((chosen["last_m"]["members"], chosen["greedy"]["members"], chosen["weighted"]["weights"],
                        [chosen[k]["temperature"] for k in ("last_m", "greedy", "weighted")]))
        assert chosen["last_m"]["test"] == metrics.scores(test_logits[[1, 2]], test_labels)
    assert all(c == choices[0] for c in choices) and choices[0][0] == ["c2", "c3"]


def test_results_hold_the_chosen_ensembles(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_3, "data.val_size=64"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    chosen = results["chosen"]
    assert chosen["by"] == "validation NLL"
    names = [s["name"] for s in results["snapshots"]]
    assert chosen["last_m"]["members"] == names[len(names) - len(chosen["last_m"]["members"]):]
    for c in (chosen["last_m"], chosen["greedy"]):
        assert set(c["members"]) <= set(names) and set(c["test"]) == {"acc", "nll", "ece"}
    last = {s["name"]: s for s in results["snapshots"]}[names[-1]]
    if chosen["last_m"]["members"] == [names[-1]]:  # m = 1: the last snapshot's own test numbers
        assert chosen["last_m"]["test"]["acc"] == pytest.approx(last["acc"], abs=1e-12)
    assert results["chosen"]["last_m"]["val"]["nll"] <= results["val"]["ensemble"]["nll"] + 1e-12  # m = M is a choice


def report_of(accs: list[float], ensemble: float, chosen: float | None = None) -> dict:
    snapshots = [{"name": f"cycle_{i + 1:02d}", "acc": a} for i, a in enumerate(accs)]
    result = {"snapshots": snapshots, "single": snapshots[-1], "ensemble": {"acc": ensemble}}
    if chosen is not None:
        result["chosen"] = {"by": "validation NLL", "last_m": {"test": {"acc": chosen}}}
    return result


def test_verdict_explains_weak_early_snapshots():
    v = selection.verdict(report_of([0.53, 0.93, 0.93, 0.98, 0.975, 0.9722], 0.9650, chosen=0.975))
    assert v["trend"] == [0.53, 0.93, 0.93, 0.98, 0.975, 0.9722]
    assert v["ensemble_gain"] == pytest.approx(-0.0072) and v["chosen_gains"] == {"last_m": pytest.approx(0.0028)}
    assert v["advice"].startswith("The earlier snapshots are much weaker than the last (cycle 1 53.0%, cycle 6 97.2%) "
                                  "and the ensemble of all 6 is 0.7 points below the last snapshot")
    assert "scheduler.cycles=M" in selection.format_verdict(v)


@pytest.mark.parametrize("accs, ensemble", [([0.90, 0.91, 0.92], 0.93),  # the ensemble helps: nothing to explain
                                            ([0.50, 0.93], 0.95),  # weak start, but averaging still helped
                                            ([0.90, 0.92], 0.91)])  # below the last, but the snapshots are alike
def test_verdict_stays_quiet(accs, ensemble):
    assert selection.verdict(report_of(accs, ensemble))["advice"] is None


@pytest.mark.parametrize("rule", ["logits", "probs"])
def test_weights_fitted_on_validation_lower_its_nll(rule):
    logits = members()
    weights = selection.fit_weights(logits, LABELS, rule)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12) and (weights > 0).all()
    fitted = metrics.nll(selection.weighted_probabilities(logits, weights, rule), LABELS)
    uniform = metrics.scores(logits, LABELS, rule)["nll"]
    assert fitted < uniform  # the weak first member is weighed down
    assert weights[0] < min(weights[1], weights[2])
    uniform_probs = selection.weighted_probabilities(logits, torch.full((3,), 1 / 3, dtype=torch.float64), rule)
    torch.testing.assert_close(uniform_probs, metrics.probabilities(logits, rule))  # the same rule, unweighted
    chosen = selection.choose(logits, LABELS, logits, LABELS, ["c1", "c2", "c3"], rule)
    assert list(chosen["weighted"]["weights"]) == ["c1", "c2", "c3"]
    assert chosen["weighted"]["val"]["nll"] == pytest.approx(fitted, rel=1e-12)
    assert "weighted" not in selection.choose(logits, LABELS, logits, LABELS, ["c1", "c2", "c3"], "vote")


def test_members_that_all_give_a_label_zero_probability_still_give_a_choice(make_cfg, tmp_path):
    """Finding 1 of issue 24: every validation NLL infinite made greedy choose nobody and the report crash. Now
    the choices fall back to the last member, and a run that diverged in effect still writes results.json."""
    logits = torch.zeros(3, 4, 2, dtype=torch.float64)
    logits[..., 1] = 1e4  # every member sure of class 1 (p = 1 exactly), every label 0: p[label] = 0
    labels = torch.zeros(4, dtype=torch.int64)
    assert selection.greedy(logits, labels, "logits") == [2] and selection.last_m(logits, labels, "logits") == [2]
    chosen = selection.choose(logits, labels, logits, labels, ["c1", "c2", "c3"])
    assert chosen["greedy"]["members"] == ["c3"] and chosen["last_m"]["members"] == ["c3"]
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.batch_size=32", "data.val_size=32", "scheduler.eta_max=10000"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(s["nll"] == float("inf") for s in results["val"]["snapshots"])  # the finding's degenerate run
    assert results["chosen"]["greedy"]["members"] == ["cycle_03"]
    assert results["verdict"]["advice"].startswith("Every snapshot gives some validation image a probability of "
                                                   "exactly 0") and "scheduler.eta_max" in results["verdict"]["advice"]
