"""Temperature scaling fitted on validation (Guo et al. 2017): the fit recovers a known temperature, never changes a
prediction, ignores the test labels; the ensemble tool refuses to fit on test; predict= applies the stored
temperature and the members chosen on validation, equal to a recomputation from the snapshot files."""

import csv
import json

import pytest
import torch
from PIL import Image

import snapens.ensemble.tool as cli
from snapens.build import build_data
from snapens.ensemble import calibration, metrics, selection
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots

from conftest import HELD_OUT, compose_config, snapshot_logits, says



def sampled(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits z and labels drawn from softmax(z / temperature): the calibrated temperature is `temperature`."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    labels = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_labels_were_drawn_at(true):
    logits, labels = sampled(true)
    fitted = calibration.fit_temperature(logits.softmax(-1), labels)
    assert fitted == pytest.approx(true, rel=0.05)
    nll = lambda t: metrics.nll(calibration.scale(logits.softmax(-1), t), labels)  # noqa: E731
    assert nll(fitted) < min(nll(fitted * 0.97), nll(fitted * 1.03))  # a minimum of the validation NLL


def test_scale_is_guos_softmax_over_t_and_keeps_every_prediction():
    logits, _ = sampled(1.0, n=500)
    members = torch.stack([logits, logits.flip(0), 0.5 * logits])
    mean_logits = metrics.probabilities(members, "logits")  # softmax of the mean logits
    for t in (0.3, 1.0, 4.0):
        scaled = calibration.scale(mean_logits, t)
        assert torch.allclose(scaled, (members.mean(0) / t).softmax(-1), atol=1e-12)
        assert torch.equal(scaled.argmax(-1), mean_logits.argmax(-1))
    assert torch.allclose(calibration.scale(mean_logits, 1.0), mean_logits, atol=1e-12)


def test_an_error_free_validation_split_fits_no_temperature():
    """Issue 26's 5.4% -> 13.5% test ECE: a validation split classified without error has no NLL minimum (T -> 0);
    scaling by the T an optimiser stops at makes every test prediction certain, so test ECE = 1 - accuracy."""
    logits, labels = sampled(1.0, n=4000)
    probs = logits.softmax(-1)
    right = probs.argmax(-1) == labels
    val_probs, val_labels = probs[:2000][right[:2000]][:200], labels[:2000][right[:2000]][:200]  # all right
    test_probs, test_labels = probs[2000:], labels[2000:]
    collapsed = calibration.scale(test_probs, 1e-3)  # what the unguarded fit did: the test ECE is 1 - accuracy
    accuracy = (test_probs.argmax(-1) == test_labels).double().mean().item()
    assert metrics.probability_scores(collapsed, test_labels)["ece"] == pytest.approx(1 - accuracy, abs=1e-4)
    fitted = calibration.calibrate(val_probs, val_labels, test_probs, test_labels)
    assert fitted["temperature"] is None and fitted["test"]["after"] == fitted["test"]["before"]
    assert fitted["warnings"] == ["no temperature fitted: all 200 validation images are classified right, so the "
                                  "validation NLL falls without end as T -> 0 (hold out more images with "
                                  "data.val_size=N)"]
    few = torch.cat([val_labels[:-3], (val_labels[-3:] + 1) % 5])  # three errors: a T, said to rest on them
    said = calibration.calibrate(val_probs, few, test_probs, test_labels)
    assert said["temperature"] > 0 and said["warnings"][0].startswith(
        f"T = {said['temperature']:.3g} rests on the 3 misclassified validation images of 200")
    assert "temperature scaling, ensemble: no temperature fitted" in calibration.format_calibration(
        {"single": said, "ensemble": fitted})


def test_a_temperature_that_raises_the_test_ece_is_said():
    logits, labels = sampled(1.0)
    probs = logits.softmax(-1)  # calibrated: T = 1 is right, so a T fitted on a skewed validation split moves away
    sharp, _ = sampled(0.5, seed=1)  # validation drawn at T = 0.5 : the fit says sharpen
    val_labels = torch.multinomial((sharp / 0.5).softmax(-1), 1, generator=torch.Generator().manual_seed(2))[:, 0]
    fitted = calibration.calibrate(sharp.softmax(-1), val_labels, probs, labels)
    before, after = fitted["test"]["before"]["ece"], fitted["test"]["after"]["ece"]
    assert after > before and fitted["warnings"] == [
        f"T = {fitted['temperature']:.3g} lowered the validation NLL but raised the test ECE ({before:.4f} -> "
        f"{after:.4f}): it minimises the NLL, not the ECE"]


def test_the_test_labels_cannot_change_the_temperature():
    val, val_labels = sampled(2.0, n=2000, seed=1)
    test, _ = sampled(2.0, n=300, seed=2)
    val_logits, test_logits = torch.stack([val, 0.8 * val]), torch.stack([test, 0.8 * test])
    found = []
    for seed in range(3):
        test_labels = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(seed))
        fitted = calibration.calibrate_run(val_logits, val_labels, test_logits, test_labels, "probs")
        found.append((fitted["single"]["temperature"], fitted["ensemble"]["temperature"]))
        after = calibration.scale(metrics.probabilities(test_logits, "probs"), fitted["ensemble"]["temperature"])
        assert fitted["ensemble"]["test"]["after"]["nll"] == pytest.approx(metrics.nll(after, test_labels), rel=1e-12)
    assert found[0] == found[1] == found[2]
    assert calibration.calibrate_run(val_logits, val_labels, test_logits, test_labels, "vote") is None


# ---- the ensemble tool and predict= on a trained run -------------------------------------------------------------
@pytest.fixture
def run(held_out_copy):
    return held_out_copy


def evaluate(*overrides: str):
    """The tool as the command line runs it; these tests call it again on a run (a refusal has its own test)."""
    return cli.evaluate(compose_config("overwrite=true", *overrides, name="ensemble"))


def test_temperatures_are_fitted_on_the_validation_split(run):
    results = json.loads((run / "results.json").read_text())
    data = build_data(compose_config(*HELD_OUT).data)
    val = snapshot_logits(run, data.val.images)
    expected = calibration.fit_temperature(metrics.probabilities(val, "logits"), data.val.labels)
    assert results["calibration"]["fitted_on"] == "val"
    assert results["calibration"]["ensemble"]["temperature"] == pytest.approx(expected, rel=1e-4)
    evaluate(f"run={run}")
    report = json.loads((run / "ensemble/test/ensemble.json").read_text())
    assert report["calibration"] == results["calibration"]
    evaluate(f"run={run}", "calibrate=none", f"out={run / 'plain'}")
    assert "calibration" not in json.loads((run / "plain/ensemble.json").read_text())


def test_fitting_on_test_is_refused(run):
    with pytest.raises(SnapensError) as info:
        evaluate(f"run={run}", "calibrate=test")
    says(info.value, "calibrate=test", "use calibrate=val")
    assert not (run / "ensemble").exists()


def predictions(folder):
    with open(folder / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((folder / "predictions.json").read_text())


@pytest.fixture
def images(run, tmp_path):
    data = build_data(compose_config(*HELD_OUT).data)
    folder = tmp_path / "new"
    folder.mkdir()
    for i, image in enumerate(data.test.images[:16]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder, data.test.images[:16], data.classes


@pytest.mark.parametrize("chosen", [None, "last_m", "greedy", "weighted"])
def test_predict_applies_the_stored_combination(run, images, chosen):
    folder, uint8, classes = images
    results = json.loads((run / "results.json").read_text())
    evaluate(f"run={run}", f"predict={folder}", *([f"chosen={chosen}"] if chosen else []))
    rows, record = predictions(run / "predictions")
    logits = snapshot_logits(run, uint8)
    names = [p.stem for p in list_snapshots(run)]
    if chosen is None:
        probs, temperature = metrics.probabilities(logits), results["calibration"]["ensemble"]["temperature"]
    elif chosen == "weighted":
        weights = torch.tensor([results["chosen"]["weighted"]["weights"][n] for n in names], dtype=torch.float64)
        probs = selection.weighted_probabilities(logits, weights, "logits")
        temperature = results["chosen"]["weighted"]["temperature"]
    else:
        picks = [names.index(n) for n in results["chosen"][chosen]["members"]]
        probs, temperature = metrics.probabilities(logits[picks]), results["chosen"][chosen]["temperature"]
    expected = calibration.scale(probs, temperature)
    got = torch.tensor([[float(r[c]) for c in classes] for r in rows], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=2e-6)
    assert [r["class"] for r in rows] == [classes[k] for k in expected.argmax(1)]
    assert record["temperature"] == temperature and record["rule"] == "logits"


def test_predict_uncalibrated_and_refusals(run, images):
    folder, uint8, classes = images
    evaluate(f"run={run}", f"predict={folder}", "calibrate=none")
    rows, record = predictions(run / "predictions")
    assert record["temperature"] is None and "uncalibrated (calibrate=none)" in record["source"]
    probs = metrics.probabilities(snapshot_logits(run, uint8))
    assert torch.allclose(torch.tensor([[float(r[c]) for c in classes] for r in rows], dtype=torch.float64), probs,
                          atol=2e-6)
    evaluate(f"run={run}", f"predict={folder}", "members=last:2")  # no temperature stored for these two members
    assert predictions(run / "predictions")[1]["source"].startswith("uncalibrated (no temperature stored")
    with pytest.raises(SnapensError) as info:
        evaluate(f"run={run}", f"predict={folder}", "chosen=greedy", "members=last:2")
    says(info.value, "chosen=greedy", "no runs=, snapshots=, members= or swa=")
    with pytest.raises(SnapensError, match=r"chosen=greedy takes the members .*no runs=, snapshots=, members= or swa="):
        evaluate(f"run={run}", f"predict={folder}", "chosen=greedy", "swa=true")
    with pytest.raises(SnapensError, match=r"chosen=greedy was chosen for rule=logits; pass that rule"):
        evaluate(f"run={run}", f"predict={folder}", "chosen=greedy", "rule=probs")
    with pytest.raises(SnapensError) as info:
        evaluate(f"run={run}", f"predict={folder}", "chosen=by")
    says(info.value, "chosen=by", "last_m, greedy, weighted")
    with pytest.raises(SnapensError, match=r"chosen=greedy is for predict=IMAGES"):
        evaluate(f"run={run}", "chosen=greedy")
    results = json.loads((run / "results.json").read_text())
    del results["chosen"]
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(SnapensError, match=r"chosen=last_m: .*results.json records no such choice"):
        evaluate(f"run={run}", f"predict={folder}", "chosen=last_m")
