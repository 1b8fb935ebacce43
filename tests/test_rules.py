"""snapens.ensemble.rules, the one combining formula: its rules, weights and two temperatures against direct
formulas; and every path that combines members (the Ensemble object, its exported program, predict=, the
distillation teacher at T = 1, temperature scaling's formula and SnapshotEnsemble) giving the same probabilities."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import snapens.ensemble.tool as tool
from snapens import SnapshotEnsemble
from snapens.batches import normalize
from snapens.build import build_data
from snapens.ensemble import calibration, members, rules, selection
from snapens.ensemble.ensemble import Ensemble
from snapens.models import model_from_metadata
from snapens.snapshots import load_into, read_metadata
from snapens.teacher import Teacher

from conftest import HELD_OUT, compose_config, snapshot_logits

Z = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.4, 0.1]],
                  [[0.0, 3.0, 0.0], [0.2, 0.1, 0.9]],
                  [[1.0, 1.0, -2.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)  # M = 3, N = 2, C = 3
W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def test_each_rule_against_its_formula():
    assert torch.allclose(rules.probabilities(Z, "logits"), Z.mean(0).softmax(-1))
    assert torch.allclose(rules.probabilities(Z, "probs"), Z.softmax(-1).mean(0))
    # argmaxes: image 0: classes 0, 1, 0 (a tie goes to the first); image 1: classes 0, 2, 0
    assert rules.probabilities(Z, "vote").tolist() == [[2 / 3, 1 / 3, 0.0], [2 / 3, 0.0, 1 / 3]]
    weighted = (W.view(3, 1, 1) * Z).sum(0)
    assert torch.allclose(rules.probabilities(Z, "logits", W), weighted.softmax(-1))
    assert torch.allclose(rules.probabilities(Z, "probs", W), (W.view(3, 1, 1) * Z.softmax(-1)).sum(0))
    assert torch.allclose(rules.probabilities(Z, "vote", W), torch.tensor([[0.7, 0.3, 0.0], [0.7, 0.0, 0.3]],
                                                                          dtype=torch.float64))
    # a weight of 1 on one member is that member alone
    assert torch.allclose(rules.probabilities(Z, "probs", torch.tensor([0.0, 1.0, 0.0])), Z[1].softmax(-1))


def test_the_two_temperatures():
    """Calibration pools, then scales; distillation softens each member, then pools: the same for rule logits,
    different for probs unless T = 1."""
    t = 2.5
    pooled = rules.probabilities(Z, "probs")
    assert torch.allclose(rules.probabilities(Z, "probs", temperature=t), (pooled.log() / t).softmax(-1))
    assert torch.allclose(rules.probabilities(Z, "logits", W, t), ((W.view(3, 1, 1) * Z).sum(0) / t).softmax(-1))
    assert torch.allclose(rules.soft_targets(Z, "logits", t, W), rules.probabilities(Z, "logits", W, t))
    assert torch.allclose(rules.soft_targets(Z, "probs", t), (Z / t).softmax(-1).mean(0))
    assert not torch.allclose(rules.soft_targets(Z, "probs", t), rules.probabilities(Z, "probs", temperature=t))
    for rule in ("logits", "probs"):
        assert torch.allclose(rules.soft_targets(Z, rule, 1.0, W), rules.probabilities(Z, rule, W))


@pytest.mark.parametrize("call, match", [
    (lambda: rules.probabilities(Z, "median"), "rule='median'"),
    (lambda: rules.probabilities(Z, "vote", temperature=2.0), "has no temperature"),
    (lambda: rules.probabilities(Z, "logits", torch.tensor([0.5, 0.5])), "weights must be 3 finite"),
    (lambda: rules.probabilities(Z, "logits", torch.tensor([0.5, 0.6, -0.1])), "weights must be 3 finite"),
    (lambda: rules.probabilities(Z, "logits", torch.tensor([float("nan"), 0.5, 0.5])), "weights must be 3"),
    (lambda: rules.probabilities(Z, "logits", temperature=-1.0), "temperature must be a finite number > 0"),
    (lambda: rules.probabilities(Z[:0], "logits"), "non-empty M x N x C"),
    (lambda: rules.soft_targets(Z, "vote", 2.0), "a teacher needs probabilities"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- every path, one distribution ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(held_out_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("paths") / "run"
    shutil.copytree(held_out_run, copy)
    return copy


def predict_probs(run, rule, images, tmp_path, *extra) -> torch.Tensor:
    """predictions.csv's probabilities for the images written as PNG files (lossless)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    tool.evaluate(compose_config(f"run={run}", f"predict={folder}", f"rule={rule}", f"out={tmp_path / 'out'}",
                                 *extra, name="ensemble"))
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.reader(f))[1:]
    return torch.tensor([[float(v) for v in row[3:]] for row in rows], dtype=torch.float64)


@pytest.mark.parametrize("case", ["logits, chosen=weighted (weights and T from validation)", "probs, all members"])
def test_every_path_gives_the_same_probabilities(run, tmp_path, case):
    rule, chosen = ("logits", "weighted") if case.startswith("logits") else ("probs", None)
    data = build_data(compose_config(*HELD_OUT).data)
    images = data.test.images[:16]
    ensemble = Ensemble.from_run(run, chosen=chosen, rule=rule)
    weights, temperature = ensemble.weights, ensemble.temperature
    assert (temperature is not None) == (chosen is not None)  # the stored temperature came with the choice
    z = snapshot_logits(run, images)  # computed from the files, without any of the paths below
    w = torch.full((len(z),), 1 / len(z), dtype=torch.float64) if weights is None else weights.double()
    pooled = (w.view(-1, 1, 1) * z).sum(0).softmax(-1) if rule == "logits" else (w.view(-1, 1, 1) * z.softmax(-1)).sum(0)
    expected = pooled if temperature is None else (pooled.log() / temperature).softmax(-1)

    paths = {"Ensemble.probs": ensemble.probs(images).double()}
    program = ensemble.export(tmp_path / "e.pt2")
    paths["exported program"] = program.module()(images).detach().double()
    paths["predict="] = predict_probs(run, rule, images, tmp_path, *([f"chosen={chosen}"] if chosen else []))
    logits = z.float().double()
    paths["temperature scaling (results.json's formula)"] = (
        calibration.scale(selection.weighted_probabilities(logits, w, rule), temperature) if temperature
        else selection.weighted_probabilities(logits, w, rule))
    x = normalize(images, data.mean, data.std)
    uncalibrated = Ensemble(list(ensemble.members), data.mean, data.std, rule, weights)
    teacher = Teacher(uncalibrated, 1.0)(x).double()
    snapshots = SnapshotEnsemble()
    for path in members.run_snapshots(run):
        model = model_from_metadata(read_metadata(path)["model_config"], str(path))
        load_into(model, path)
        snapshots.add(model)
    loader = [(x[:9], data.test.labels[:9]), (x[9:], data.test.labels[9:16])]
    paths["SnapshotEnsemble"] = snapshots.probabilities(loader, rule, w if chosen else None, temperature)
    for name, probs in paths.items():
        assert (probs - expected).abs().max().item() < 1e-5, name
    assert (teacher - pooled).abs().max().item() < 1e-5  # the teacher at T = 1: the pooled, unscaled distribution


def test_weighted_votes_count_repeated_picks_as_repeats_do():
    """Greedy selection's repeats as weights (6 and 5 picks of two members) predict what the repeated stack does."""
    z = torch.zeros(2, 3, 2)
    z[0, :, 0], z[1, :, 1] = 1.0, 1.0
    z[1, 2] = torch.tensor([0.0, 0.9])  # image 2: the lighter member less sure
    repeated = torch.cat([z[:1]] * 6 + [z[1:]] * 5)
    weights = torch.tensor([6 / 11, 5 / 11], dtype=torch.float64)
    assert torch.equal(rules.predictions(z, "vote", weights), rules.predictions(repeated, "vote"))
    assert torch.allclose(rules.probabilities(z.double(), "vote", weights), rules.probabilities(repeated.double(), "vote"))


def test_member_weights_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="weights must be 3 numbers, one per member"):
        members.distinct({"members": ["a", "b", "c"], "weights": torch.tensor([0.5, 0.5])})


def test_member_names_tell_runs_with_the_same_dir_name_apart():
    paths = [Path(f"/x/sweep{s}/0/snapshots/cycle_0{c}.safetensors") for s in "AB" for c in (1, 2)]
    assert members.names(paths) == ["sweepA/0/cycle_01", "sweepA/0/cycle_02", "sweepB/0/cycle_01", "sweepB/0/cycle_02"]
    assert members.names(paths[:2]) == ["cycle_01", "cycle_02"]
