"""snapens.ensemble.uncertainty: paired intervals against direct computation, McNemar's exact p, and the verdict
that uses them (says "not distinguishable from zero" when an interval spans 0) and gives only advice the run does
not already follow."""

import math

import pytest
import torch

from snapens.ensemble import selection, uncertainty


def test_the_paired_interval_is_the_bootstrap_of_the_mean_difference():
    diff = torch.tensor([1.0, 0.0, 0.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0] * 20)
    mean, low, high = uncertainty.paired_interval(diff, resamples=4000, seed=3)
    assert mean == pytest.approx(0.3)
    # computed here by hand: resample indices with the same generator, mean, percentiles
    index = torch.randint(0, 200, (4000, 200), generator=torch.Generator().manual_seed(3))
    means = diff.double()[index].mean(1).sort().values
    assert low == pytest.approx(torch.quantile(means, 0.025).item()) and high == pytest.approx(
        torch.quantile(means, 0.975).item())
    se = diff.std().item() / math.sqrt(200)  # and close to the normal approximation
    assert low == pytest.approx(0.3 - 1.96 * se, abs=0.02) and high == pytest.approx(0.3 + 1.96 * se, abs=0.02)


def test_mcnemar_is_the_exact_binomial_test():
    assert uncertainty.mcnemar(0, 0) == 1.0
    assert uncertainty.mcnemar(5, 5) == 1.0
    assert uncertainty.mcnemar(10, 0) == pytest.approx(2 / 2 ** 10)
    assert uncertainty.mcnemar(7, 2) == pytest.approx(2 * sum(math.comb(9, k) for k in range(3)) / 2 ** 9)


def test_gains_are_paired_on_the_same_images():
    labels = torch.tensor([0, 1, 0, 1] * 50)
    logits = torch.zeros(2, 200, 2, dtype=torch.float64)
    logits[1, :, 0] = torch.where(labels == 0, 2.0, -1.0)  # the last member: always right
    logits[0, :, 0] = torch.where(labels == 0, -1.0, 2.0)  # the first: always wrong
    g = uncertainty.gains(logits, labels, "probs", {}, ["c1", "c2"])["all snapshots"]
    assert g["acc"]["gain"] == pytest.approx(-0.5) and g["acc"]["distinguishable"]  # half the images flip
    assert g["acc"]["high"] < 0 and g["nll"]["gain"] > 0 and g["mcnemar_p"] < 1e-20


def report_of(accs, ensemble, val=False, greedy=None):
    result = {"snapshots": [{"acc": a} for a in accs], "single": {"acc": accs[-1]}, "ensemble": {"acc": ensemble}}
    if val:
        result["val"] = {"snapshots": [{"nll": 0.5} for _ in accs]}
        result["chosen"] = {"by": "validation NLL", "greedy": {"members": greedy, "test": {"acc": accs[-1]}}}
    return result


def test_the_verdict_never_advises_what_the_run_already_does():
    with_val = selection.verdict(report_of([0.4, 0.9, 0.95], 0.9, val=True, greedy=["cycle_03"]))
    assert "data.val_size" not in with_val["advice"] and "Chosen on validation (greedy): cycle_03" in with_val["advice"]
    without = selection.verdict(report_of([0.4, 0.9, 0.95], 0.9))
    assert "hold out data.val_size=N" in without["advice"]
    no_restarts = selection.verdict(report_of([0.1, 0.7, 0.8], 0.106), restarts=False)
    assert "no restarts" in no_restarts["advice"] and "too short" not in no_restarts["advice"]
    assert "too short" in selection.verdict(report_of([0.1, 0.7, 0.8], 0.106))["advice"]


def test_a_gain_whose_interval_spans_zero_is_said_so():
    result = report_of([0.9, 0.95], 0.955)
    result["gains"] = {"against": "...", "all snapshots": {
        "acc": {"gain": 0.005, "low": -0.003, "high": 0.013, "distinguishable": False},
        "nll": {"gain": -0.02, "low": -0.03, "high": -0.01, "distinguishable": True}, "mcnemar_p": 0.3}}
    line = selection.format_verdict(selection.verdict(result))
    assert "all snapshots +0.50 [-0.30, +1.30] (not distinguishable from zero)" in line
    assert "NLL change: all snapshots -0.020 [-0.030, -0.010] (paired" in line


def test_a_runs_gains_are_its_reports_differences(held_out_run):
    import json
    results = json.loads((held_out_run / "results.json").read_text())
    gains = results["gains"]
    assert gains["all snapshots"]["acc"]["gain"] == pytest.approx(results["ensemble"]["acc"] - results["single"]["acc"])
    assert gains["all snapshots"]["nll"]["gain"] == pytest.approx(results["ensemble"]["nll"] - results["single"]["nll"])
    for name in ("last_m", "greedy", "weighted"):
        assert gains[name]["acc"]["gain"] == pytest.approx(results["chosen"][name]["test"]["acc"]
                                                           - results["single"]["acc"])
        assert gains[name]["acc"]["low"] <= gains[name]["acc"]["gain"] <= gains[name]["acc"]["high"]
