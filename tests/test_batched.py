"""Members of one architecture in one vmapped pass (torch.func): equal to the one-at-a-time passes within 1e-5 in
eval mode with each member's own BatchNorm statistics, in the ensemble tool, predict= and a distillation teacher."""

import json
import shutil

import pytest
import torch

import snapens.ensemble.tool as cli
import snapens.ensemble.cache as cache
from snapens.build import build_data
from snapens.ensemble.batched import StackedMembers, same_architecture, stacked_logits
from snapens.models import CifarResNet, WideResNet
from snapens.ensemble.ensemble import Ensemble
from snapens.teacher import Teacher

from conftest import HELD_OUT, compose_config



def members(n: int = 3, depth: int = 8) -> list[torch.nn.Module]:
    """Models with different weights and BatchNorm running statistics (as trained snapshots have)."""
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = CifarResNet(depth)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        out.append(model.eval())
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_stacked_equals_one_at_a_time(channels_last):
    models = members()
    x = torch.randn(9, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        models = [m.to(memory_format=torch.channels_last) for m in models]
    with torch.no_grad():
        expected = torch.stack([m(x) for m in models])
    assert (StackedMembers(models)(x) - expected).abs().max().item() < 1e-5
    assert not any(m.training for m in models)  # eval: running statistics used, none updated


def test_only_one_architecture_is_stacked():
    assert same_architecture(members(2)) and not same_architecture([*members(1), *members(1, depth=14)])
    assert not same_architecture([CifarResNet(8), WideResNet(10, 1)])
    with pytest.raises(ValueError, match="one architecture"):
        StackedMembers([*members(1), *members(1, depth=14)])


def test_stacked_logits_over_batches_equal_the_sequential_path():
    from snapens.data import Split
    from snapens.ensemble.cache import predict_logits

    models = members()
    split = Split(torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.zeros(70, dtype=torch.long))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = stacked_logits(models, split, mean, std, 32, torch.device("cpu"), None, True)
    expected = torch.stack([predict_logits(m, split, mean, std, 32, torch.device("cpu"), None, True) for m in models])
    assert got.shape == (3, 70, 10) and (got - expected).abs().max().item() < 1e-5


def test_teacher_batched_equals_sequential():
    models = members()
    x = torch.randn(6, 3, 32, 32)
    for rule in ("logits", "probs"):
        one = Teacher(Ensemble(models, [0.0] * 3, [1.0] * 3, rule), 3.0)
        all_at_once = Teacher(Ensemble(models, [0.0] * 3, [1.0] * 3, rule, batched=True), 3.0)
        assert (one(x) - all_at_once(x)).abs().max().item() < 1e-6


def test_the_tool_batched_gives_the_same_report_and_predictions(held_out_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(held_out_run, run)
    shutil.rmtree(run / "logits")  # nothing cached: every member computed, in one pass
    passes = []
    monkeypatch.setattr(cache, "stacked_logits", lambda models, *a: passes.append(len(models)) or
                        stacked_logits(models, *a))
    cli.evaluate(compose_config(f"run={run}", "batched=true", name="ensemble"))
    assert passes == [3, 3]  # test, then validation: the three members at once
    batched = json.loads((run / "ensemble/test/ensemble.json").read_text())
    plain = json.loads((held_out_run / "results.json").read_text())  # one at a time, at the end of training
    for a, b in zip(batched["snapshots"], plain["snapshots"]):
        assert a["acc"] == b["acc"] and a["nll"] == pytest.approx(b["nll"], abs=1e-5)
    data = build_data(compose_config(*HELD_OUT).data)
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    for i, image in enumerate(data.test.images[:8]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    rows = {}
    for flag in ("false", "true"):
        cli.evaluate(compose_config(f"run={run}", f"predict={folder}", f"batched={flag}", "overwrite=true",
                                    name="ensemble"))
        rows[flag] = (run / "predictions/predictions.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows["true"]] == [r.split(",")[:2] for r in rows["false"]]
    assert passes == [3, 3, 3]  # predict= too
    diffs = [abs(float(a) - float(b)) for ra, rb in zip(rows["true"][1:], rows["false"][1:])
             for a, b in zip(ra.split(",")[2:], rb.split(",")[2:])]
    assert max(diffs) < 1e-5
