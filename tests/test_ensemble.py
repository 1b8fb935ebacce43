"""Tests for snapens.ensemble: the combination rules by hand, accuracy, the report, and logits from snapshots."""

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from snapens.data import Split
from snapens.ensemble import metrics
from snapens.ensemble.rules import RULES, combine, votes
from snapens.ensemble.report import ensemble_report, format_report
from snapens.ensemble.cache import cached_logits
from snapens.models import CifarResNet
from snapens.snapshots import save_snapshot, snapshot_path

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# Two members, three classes, two images. Worked by hand (softmax rounded to 3 places):
# image 0: A = [1, 10, 0] -> p ~ [0.000, 1.000, 0.000];  B = [1, -10, 0] -> p ~ [0.731, 0.000, 0.269]
#   mean logits [1, 0, 0] -> class 0; mean probs [0.366, 0.500, 0.134] -> class 1;
#   votes A: 1, B: 0 (a tie), broken by mean probability 0.500 > 0.366 -> class 1.
# image 1: A = [2, 1.9, -5] -> p ~ [0.525, 0.475, 0.000];  B = [-5, 1.9, 2.2] -> p ~ [0.000, 0.425, 0.574]
#   mean logits [-1.5, 1.9, -1.4] -> class 1; mean probs [0.263, 0.450, 0.287] -> class 1;
#   votes A: 0, B: 2 (a tie), broken by mean probability 0.287 > 0.263 -> class 2 (not the lower index).
TWO_MEMBERS = [
    [[1.0, 10.0, 0.0], [2.0, 1.9, -5.0]],
    [[1.0, -10.0, 0.0], [-5.0, 1.9, 2.2]],
]
EXPECTED = {"logits": [0, 1], "probs": [1, 1], "vote": [1, 2]}


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda c: row[c])


def mean_probs(members: list[list[list[float]]]) -> list[list[float]]:
    """N x C mean of the members' softmax probabilities, in plain Python."""
    per_member = [[softmax(row) for row in member] for member in members]
    return [[sum(m[i][c] for m in per_member) / len(members) for c in range(len(members[0][0]))]
            for i in range(len(members[0]))]


@pytest.mark.parametrize("rule", RULES)
def test_combine_hand_computed_two_member_example(rule):
    """Each rule picks its hand-computed classes on an example where the three rules disagree."""
    scores = combine(torch.tensor(TWO_MEMBERS, dtype=torch.float64), rule)
    assert scores.shape == (2, 3)
    assert scores.argmax(-1).tolist() == EXPECTED[rule]


def test_combine_scores_are_the_documented_means():
    """logits: mean logit; probs: mean softmax; vote: member count per class plus half the mean probability."""
    logits = torch.tensor(TWO_MEMBERS, dtype=torch.float64)
    probs = mean_probs(TWO_MEMBERS)
    mean_logits = [[(a + b) / 2 for a, b in zip(ra, rb)] for ra, rb in zip(*TWO_MEMBERS)]
    votes = [[sum(argmax(member[i]) == c for member in TWO_MEMBERS) for c in range(3)] for i in range(2)]
    assert votes == [[1, 1, 0], [1, 0, 1]]
    expected_vote = [[v + 0.5 * p for v, p in zip(vr, pr)] for vr, pr in zip(votes, probs)]
    for rule, expected in (("logits", mean_logits), ("probs", probs), ("vote", expected_vote)):
        torch.testing.assert_close(combine(logits, rule), torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_vote_majority_beats_confidence():
    """Two members weakly for class 0 outvote one member certain of class 1, though mean probability favours 1."""
    logits = torch.tensor([[[0.1, 0.0]], [[0.1, 0.0]], [[0.0, 50.0]]], dtype=torch.float64)
    probs = mean_probs(logits.tolist())[0]
    assert probs[1] > probs[0]
    assert combine(logits, "vote").argmax(-1).tolist() == [0]
    assert combine(logits, "probs").argmax(-1).tolist() == [1]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("members", [1, 3, 7])
def test_identical_members_act_as_the_single_model(rule, members):
    """An ensemble of M copies of one model predicts exactly what the model does, with the same accuracy."""
    g = torch.Generator().manual_seed(members)
    single = torch.randn(200, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (200,), generator=g)
    scores = combine(single.expand(members, -1, -1), rule)
    assert torch.equal(scores.argmax(-1), single.argmax(-1))
    assert metrics.scores(single.expand(members, -1, -1), labels, rule)["acc"] == \
        metrics.scores(single[None], labels, rule)["acc"]


def test_unknown_rule_is_rejected():
    """A rule outside RULES is a ValueError naming it and the choices."""
    with pytest.raises(ValueError, match="'median'") as info:
        combine(torch.zeros(2, 3, 4), "median")
    assert all(rule in str(info.value) for rule in RULES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_is_the_fraction_of_correct_argmaxes(seed):
    """metrics' accuracy equals a direct count of rows whose largest probability is at the label."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(97, 5, generator=g)
    labels = torch.randint(0, 5, (97,), generator=g)
    correct = sum(argmax(row) == y for row, y in zip(scores.tolist(), labels.tolist()))
    assert metrics.probability_scores(scores.softmax(-1), labels)["acc"] == pytest.approx(correct / 97, abs=1e-15)


# ---------------------------------------------------------------- report

LABELS = [0, 1, 2, 1]
PREDICTIONS = [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 2, 0]]  # per snapshot: 1/4, 2/4, 3/4 right
PATHS = [Path("run/snapshots") / f"cycle_{c:02d}.safetensors" for c in (1, 2, 3)]
METADATA = [{"cycle": c, "step": 100 * c, "lr": 0.0} for c in (1, 2, 3)]


def report_inputs():
    """Logits that are 5 x one-hot of the given predictions, so every rule picks the per-image majority."""
    logits = 5 * torch.nn.functional.one_hot(torch.tensor(PREDICTIONS), 3).double()
    return logits, torch.tensor(LABELS)


def majority_accuracy() -> float:
    columns = list(zip(*PREDICTIONS))
    majority = [max(set(col), key=col.count) for col in columns]
    return sum(m == y for m, y in zip(majority, LABELS)) / len(LABELS)


# Every snapshot's logits are 5 x one-hot of 3 classes: confidence e^5 / (e^5 + 2) on its prediction, 1 / (e^5 + 2)
# on each other class. So k correct of 4 gives NLL (k log(1 + 2 e^-5) + (4 - k) log(e^5 + 2)) / 4 and, with every
# confidence in one bin, ECE |k / 4 - e^5 / (e^5 + 2)|.
CONFIDENCE = math.exp(5) / (math.exp(5) + 2)


def one_hot_scores(correct: int) -> dict:
    return {"acc": correct / 4, "nll": (correct * math.log(1 + 2 * math.exp(-5)) + (4 - correct) * math.log(
        math.exp(5) + 2)) / 4, "ece": abs(correct / 4 - CONFIDENCE)}


@pytest.mark.parametrize("rule", RULES)
def test_ensemble_report_contents(rule):
    """Each snapshot's file, name, cycle, step and hand-computed scores; single = the last entry; the ensemble
    of all members under the rule with the scores of snapens.ensemble.metrics."""
    logits, labels = report_inputs()
    report = ensemble_report(logits, labels, PATHS, METADATA, rule)
    correct = [sum(p == y for p, y in zip(preds, LABELS)) for preds in PREDICTIONS]
    assert [{k: s[k] for k in ("file", "name", "cycle", "step")} for s in report["snapshots"]] == [
        {"file": p.name, "name": p.stem, "cycle": m["cycle"], "step": m["step"]} for p, m in zip(PATHS, METADATA)]
    for entry, k in zip(report["snapshots"], correct):
        assert entry["acc"] == k / 4
        assert entry["nll"] == pytest.approx(one_hot_scores(k)["nll"], rel=1e-12)
        assert entry["ece"] == pytest.approx(one_hot_scores(k)["ece"], abs=1e-12)
    assert report["single"] == report["snapshots"][-1]
    assert report["ensemble"] == {**metrics.scores(logits, labels, rule), "rule": rule,
                                  "members": ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]}
    assert report["ensemble"]["acc"] == majority_accuracy()
    assert (report["split"], report["num_images"], report["rule"]) == ("test", 4, rule)
    assert ensemble_report(logits, labels, PATHS, METADATA, rule, bins=1, split="val")["split"] == "val"


def test_format_report_is_the_one_table():
    """Each snapshot by name with cycle, step, acc, NLL and ECE; the last alone; the ensemble; the images."""
    logits, labels = report_inputs()
    report = ensemble_report(logits, labels, PATHS, METADATA, "vote")
    lines = format_report(report).splitlines()
    assert lines[0].split() == ["snapshot", "cycle", "step", "acc", "nll", "ece"]
    for line, path, meta, k in zip(lines[1:4], PATHS, METADATA, (1, 2, 3)):
        s = one_hot_scores(k)
        assert line.split() == [path.stem, str(meta["cycle"]), str(meta["step"]), f"{s['acc']:.4f}",
                                f"{s['nll']:.4f}", f"{s['ece']:.4f}"]
    assert lines[4].split() == ["single", "(last", "snapshot)", "0.7500", f"{one_hot_scores(3)['nll']:.4f}",
                                f"{one_hot_scores(3)['ece']:.4f}"]
    ensemble = report["ensemble"]
    assert lines[5].split() == ["ensemble", "of", "3", "(vote)", f"{majority_accuracy():.4f}", "-",  # no NLL
                                f"{ensemble['ece']:.4f}"]
    assert lines[6:] == ["on 4 test images"]
    unknown = {**report, "split": None, "snapshots": [{**report["snapshots"][0], "step": None}]}
    assert format_report(unknown).splitlines()[1].split()[:3] == ["cycle_01", "1", "-"]
    assert format_report(unknown).splitlines()[-1] == "on 4 images"
    assert format_report(unknown).splitlines()[2] == "one snapshot: no ensemble to compare with it"  # no "of 1"


def test_votes_count_the_members_argmaxes():
    """votes: per image and class, how many members predict it; the counts combine and metrics use."""
    logits, _ = report_inputs()
    assert votes(logits).tolist() == [[3, 0, 0], [1, 2, 0], [2, 0, 1], [3, 0, 0]]
    torch.testing.assert_close(metrics.probabilities(logits, "vote"), votes(logits).double() / 3)


# ---------------------------------------------------------------- logits from snapshot files


def perturbed_model(seed: int) -> torch.nn.Module:
    """A tiny ResNet-8 with non-default BatchNorm statistics, so eval mode matters."""
    torch.manual_seed(seed)
    model = CifarResNet(depth=8, num_classes=3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_cached_logits_equal_running_each_snapshot_directly(tmp_path):
    """M x N x C logits equal each snapshot's model in eval mode on normalised images, all from the one model."""
    paths = [snapshot_path(tmp_path, c) for c in (1, 2)]
    metas = [{"cycle": seed, "step": seed, "mean": MEAN, "std": STD} for seed in (1, 2)]
    for seed, path, meta in zip((1, 2), paths, metas):
        save_snapshot(path, perturbed_model(seed), meta)
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = Split(images, torch.arange(5) % 3)

    model = perturbed_model(seed=7).train()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(id(module)))
    logits = cached_logits(paths, metas, split, "test", 2, torch.device("cpu"), lambda *_: model)

    x = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    expected = []
    for path in paths:
        reference = CifarResNet(depth=8, num_classes=3)
        reference.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            expected.append(reference.eval()(x))
    assert logits.shape == (2, 5, 3) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[0], logits[1])
    assert calls == [id(model)] * (2 * 3)  # 2 snapshots x 3 batches (2 + 2 + 1 images), all on the given model
    assert not model.training
    assert torch.equal(cached_logits(paths, metas, split, "test", 2, torch.device("cpu"), None), logits)  # cached

    # A cache file edited in place (negated logits, NaN, another shape; its key left as it was) is recomputed.
    cached = tmp_path / "logits" / "test" / paths[0].name
    with safe_open(cached, framework="pt") as f:
        key = f.metadata()
    for edited in (-logits[0], torch.full_like(logits[0], float("nan")), logits[0][:3]):
        cached.write_bytes(save({"logits": edited.contiguous()}, metadata=key))
        again = cached_logits(paths, metas, split, "test", 2, torch.device("cpu"), lambda *_: model)
        assert torch.equal(again, logits)
