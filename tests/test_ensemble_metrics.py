"""Tests for snapens.ensemble.metrics against formulas written out here in plain Python, on hand-made tensors."""

import math
from fractions import Fraction

import pytest
import torch

from snapens.ensemble.rules import RULES, combine
from snapens.ensemble.metrics import (curves, disagreement, ece, nll, predictions, probabilities, reliability,
                                      scores)

# Two members, four images, three classes. Member argmaxes: A -> [1, 0, 2, 0], B -> [0, 2, 2, 1].
MEMBERS = [
    [[1.0, 10.0, 0.0], [2.0, 1.9, -5.0], [0.0, 0.0, 3.0], [0.5, 0.0, 0.0]],
    [[1.0, -10.0, 0.0], [-5.0, 1.9, 2.2], [1.0, 0.0, 2.0], [0.0, 4.0, -1.0]],
]
LABELS = [1, 2, 2, 0]
# Vote fractions by hand: image 0 one vote each for 1 and 0; image 1 for 0 and 2; image 2 both for 2;
# image 3 for 0 and 1.
VOTES = [[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def argmax(row):
    return max(range(len(row)), key=lambda c: row[c])


def expected_probabilities(members, rule):
    """N x C predictive distribution of `rule`, by explicit loops."""
    m, n, c = len(members), len(members[0]), len(members[0][0])
    if rule == "logits":
        return [softmax([sum(members[k][i][j] for k in range(m)) / m for j in range(c)]) for i in range(n)]
    if rule == "probs":
        return [[sum(softmax(members[k][i])[j] for k in range(m)) / m for j in range(c)] for i in range(n)]
    return [[sum(argmax(members[k][i]) == j for k in range(m)) / m for j in range(c)] for i in range(n)]


def expected_nll(probs, labels):
    return sum(-math.log(p[y]) for p, y in zip(probs, labels)) / len(labels)


def expected_ece(confidences, correct, bins):
    """Guo et al. 2017 eq. 3 by loops; bin b = (b/B, (b+1)/B] found with exact fractions of the decimal values."""
    members = [[] for _ in range(bins)]
    for conf, ok in zip(confidences, correct):
        b = max(math.ceil(Fraction(str(conf)) * bins) - 1, 0)
        members[b].append((conf, ok))
    total = 0.0
    for points in members:
        if points:
            acc = sum(ok for _, ok in points) / len(points)
            conf = sum(c for c, _ in points) / len(points)
            total += len(points) / len(confidences) * abs(acc - conf)
    return total


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- probabilities and predictions

@pytest.mark.parametrize("rule", RULES)
def test_probabilities_match_the_formulas(rule):
    """logits: softmax of mean logits; probs: mean softmax; vote: vote fractions; float64 rows summing to 1."""
    probs = probabilities(t(MEMBERS, torch.float32), rule)
    assert probs.dtype == torch.float64 and probs.shape == (4, 3)
    torch.testing.assert_close(probs, t(expected_probabilities(MEMBERS, rule)), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    if rule == "vote":
        assert probs.tolist() == VOTES


@pytest.mark.parametrize("rule", RULES)
def test_probabilities_rows_sum_to_one_on_random_logits(rule):
    logits = 5 * torch.randn(5, 30, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probabilities(logits, rule).sum(-1), torch.ones(30, dtype=torch.float64))


def test_unknown_rule_is_a_value_error_listing_the_rules():
    for function in (probabilities, predictions):
        with pytest.raises(ValueError, match="'median'") as info:
            function(t(MEMBERS), "median")
        assert all(rule in str(info.value) for rule in RULES)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predictions_equal_combine_argmax(rule, dtype):
    """Same classes as combine, ties included: integer logits make many exact vote ties among 4 members."""
    g = torch.Generator().manual_seed(1)
    for logits in (t(MEMBERS, dtype), torch.randint(-2, 3, (4, 50, 3), generator=g).to(dtype)):
        assert torch.equal(predictions(logits, rule), combine(logits, rule).argmax(-1))
    # Hand example: image 1's vote tie (classes 0 and 2) goes to 2, the larger mean probability (0.287 > 0.263).
    assert predictions(t(MEMBERS, dtype), "vote").tolist()[1] == 2


# ---------------------------------------------------------------- nll

def test_nll_is_the_mean_negative_log_probability_of_the_label():
    # -(log 0.5 + log 0.25 + log 0.8) / 3 = (0.693147 + 1.386294 + 0.223144) / 3 = 0.767528
    probs = t([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.1, 0.1, 0.8]])
    assert nll(probs, torch.tensor([0, 1, 2])) == pytest.approx(0.767528, abs=1e-6)
    assert nll(probs, torch.tensor([0, 1, 2])) == pytest.approx(-(math.log(0.5 * 0.25 * 0.8)) / 3, rel=1e-14)


def test_nll_is_infinite_when_the_label_has_zero_probability():
    probs = t([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    assert nll(probs, torch.tensor([2, 0])) == math.inf
    assert math.isfinite(nll(probs, torch.tensor([0, 2])))  # zeros elsewhere in the row do not matter


# ---------------------------------------------------------------- ece and reliability

# Seven points, 15 bins; bin b = (b/15, (b+1)/15]:
#   conf 1.0       correct  -> bin 14 (14/15, 1]; 1.0 is the closed upper edge of the last bin
#   conf 0.6       correct  -> bin 8  (8/15, 9/15]; 0.6 = 9/15 exactly, the closed upper edge of bin 8
#   conf 0.6       wrong    -> bin 8
#   conf 0.9       correct  -> bin 13 (13/15, 14/15]; 0.9 * 15 = 13.5
#   conf 0.4       wrong    -> bin 5  (5/15, 6/15]; 0.4 = 6/15 exactly, an edge again
#   conf 0.7       correct  -> bin 10 (10/15, 11/15]; 0.7 * 15 = 10.5
#   conf 0.6000001 correct  -> bin 9  (9/15, 10/15]; just above the edge
# ECE = [2 * |1/2 - 0.6| + |1 - 0.9| + |0 - 0.4| + |1 - 0.7| + |1 - 0.6000001| + 0] / 7
#     = (0.2 + 0.1 + 0.4 + 0.3 + 0.3999999) / 7 = 1.3999999 / 7 = 0.19999998571...
# (Were 0.6 put in bin 9 with 0.6000001, bin 9 would hold 3 points and ECE would be 0.99999993 / 7.)
EDGE_PROBS = [[1.0, 0.0, 0.0], [0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.05, 0.05, 0.9], [0.4, 0.35, 0.25],
              [0.25, 0.7, 0.05], [0.6000001, 0.3999999, 0.0]]
EDGE_LABELS = [0, 0, 2, 2, 1, 1, 0]
EDGE_CONFIDENCES = [1.0, 0.6, 0.6, 0.9, 0.4, 0.7, 0.6000001]
EDGE_CORRECT = [True, True, False, True, False, True, True]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ece_hand_example_with_bin_edges(dtype):
    """Confidences on bin edges land in the bin the edge closes, in either precision."""
    probs, labels = t(EDGE_PROBS, dtype), torch.tensor(EDGE_LABELS)
    table = reliability(probs, labels)
    assert table["count"] == [0, 0, 0, 0, 0, 1, 0, 0, 2, 1, 1, 0, 0, 1, 1]
    assert table["accuracy"][8] == 0.5 and table["accuracy"][4] is None and table["confidence"][4] is None
    assert table["confidence"][8] == pytest.approx(0.6, abs=1e-7)
    assert ece(probs, labels) == pytest.approx(1.3999999 / 7, abs=1e-7)
    if dtype == torch.float64:
        assert ece(probs, labels) == pytest.approx(expected_ece(EDGE_CONFIDENCES, EDGE_CORRECT, 15), abs=1e-15)


def test_reliability_bins_are_the_documented_intervals():
    table = reliability(t(EDGE_PROBS), torch.tensor(EDGE_LABELS), bins=4)
    assert table["lower"] == [0.0, 0.25, 0.5, 0.75] and table["upper"] == [0.25, 0.5, 0.75, 1.0]
    assert all(len(values) == 4 for values in table.values())


def test_zero_confidence_goes_in_the_first_bin():
    """`predicted` may name a class of probability 0 (confidence 0): bin 0, which is closed at 0."""
    probs, labels = t([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1])
    table = reliability(probs, labels, bins=5, predicted=torch.tensor([0, 1]))
    assert table["count"] == [1, 0, 0, 0, 1]
    assert table["accuracy"][0] == 1.0 and table["confidence"][0] == 0.0
    # ECE = 1/2 * |1 - 0| (bin 0: right at confidence 0) + 1/2 * |1 - 1| (bin 4: right at confidence 1) = 0.5
    assert ece(probs, labels, bins=5, predicted=torch.tensor([0, 1])) == 0.5


def test_perfectly_calibrated_example_has_zero_ece():
    # conf 1.0 (2 points, both right), 0.75 (4 points, 3 right), 0.5 (2 points, 1 right): acc == conf per bin.
    probs = t([[1.0, 0.0, 0.0]] * 2 + [[0.75, 0.25, 0.0]] * 4 + [[0.5, 0.25, 0.25]] * 2)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 0, 2])
    assert ece(probs, labels) == 0.0
    assert ece(probs, labels, bins=1) == 0.0


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_is_computable_from_the_reliability_table(bins):
    g = torch.Generator().manual_seed(2)
    probs = (3 * torch.randn(40, 4, generator=g, dtype=torch.float64)).softmax(-1)
    labels = torch.randint(0, 4, (40,), generator=g)
    table = reliability(probs, labels, bins)
    assert sum(table["count"]) == 40
    from_table = sum(n / 40 * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])
                     if n)
    assert ece(probs, labels, bins) == pytest.approx(from_table, abs=1e-14)


# ---------------------------------------------------------------- disagreement

def test_disagreement_hand_example():
    # predictions A = [0, 1, 2, 0], B = [0, 1, 1, 0], C = [1, 1, 2, 2]:
    # A/B differ on image 2 (1/4), A/C on images 0, 3 (2/4), B/C on images 0, 2, 3 (3/4).
    logits = 5 * torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 0], [0, 1, 1, 0], [1, 1, 2, 2]]), 3).float()
    d = disagreement(logits)
    assert d.dtype == torch.float64
    assert d.tolist() == [[0.0, 0.25, 0.5], [0.25, 0.0, 0.75], [0.5, 0.75, 0.0]]


# ---------------------------------------------------------------- scores and curves

@pytest.mark.parametrize("rule", RULES)
def test_scores_hand_example(rule):
    """acc, nll and ece of the two-member example against the loops above."""
    expected = expected_probabilities(MEMBERS, rule)
    predicted = combine(t(MEMBERS), rule).argmax(-1).tolist()
    got = scores(t(MEMBERS), torch.tensor(LABELS), rule)
    assert set(got) == {"acc", "nll", "ece"}
    assert got["acc"] == sum(p == y for p, y in zip(predicted, LABELS)) / 4
    assert got["nll"] is None if rule == "vote" else got["nll"] == pytest.approx(expected_nll(expected, LABELS))
    confidences = [row[p] for row, p in zip(expected, predicted)]
    correct = [p == y for p, y in zip(predicted, LABELS)]
    # Exact decimal fractions of float confidences only matter on bin edges; none of these is on one.
    assert got["ece"] == pytest.approx(expected_ece(confidences, correct, 15), abs=1e-12)


def single_model_scores(logits, labels, bins=15):
    """acc, nll, ece of one model (N x C logits) by loops."""
    probs = [softmax(row) for row in logits]
    predicted = [argmax(row) for row in logits]
    correct = [p == y for p, y in zip(predicted, labels)]
    return {"acc": sum(correct) / len(labels), "nll": expected_nll(probs, labels),
            "ece": expected_ece([p[c] for p, c in zip(probs, predicted)], correct, bins)}


@pytest.mark.parametrize("rule", RULES)
def test_identical_members_score_as_the_single_model(rule):
    g = torch.Generator().manual_seed(3)
    single = 2 * torch.randn(25, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (25,), generator=g)
    got = scores(single.expand(3, -1, -1), labels, rule)
    expected = single_model_scores(single.tolist(), labels.tolist())
    assert got["acc"] == expected["acc"]
    if rule != "vote":  # a vote's distribution is one-hot, so only its accuracy is the single model's
        assert got["nll"] == pytest.approx(expected["nll"], rel=1e-12)
        assert got["ece"] == pytest.approx(expected["ece"], abs=1e-12)


def test_curves_first_and_last_members():
    g = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(4, 20, 5, generator=g)
    labels = torch.randint(0, 5, (20,), generator=g)
    got = curves(logits, labels)
    assert set(got) == {"last", "first"} and all(set(got[end]) == set(RULES) for end in got)
    for rule in RULES:
        for end in ("last", "first"):
            assert [entry["m"] for entry in got[end][rule]] == [1, 2, 3, 4]
        everything = {"m": 4, **scores(logits, labels, rule)}
        assert got["last"][rule][-1] == everything == got["first"][rule][-1]
        assert got["last"][rule][1] == {"m": 2, **scores(logits[2:], labels, rule)}
        assert got["first"][rule][1] == {"m": 2, **scores(logits[:2], labels, rule)}
        # One member: the model alone (index 0 is the first snapshot, index 3 the last).
        for entry, member in ((got["last"][rule][0], logits[3]), (got["first"][rule][0], logits[0])):
            alone = single_model_scores(member.tolist(), labels.tolist())
            assert entry["acc"] == alone["acc"]
            if rule != "vote":
                assert entry["nll"] == pytest.approx(alone["nll"], rel=1e-6)
                assert entry["ece"] == pytest.approx(alone["ece"], abs=1e-6)
            else:
                assert entry["nll"] is None


def test_curves_respects_the_rules_argument():
    logits, labels = t(MEMBERS), torch.tensor(LABELS)
    got = curves(logits, labels, rules=("probs",), bins=5)
    assert list(got["last"]) == ["probs"] and got["last"]["probs"][-1] == {"m": 2, **scores(logits, labels,
                                                                                          "probs", 5)}
