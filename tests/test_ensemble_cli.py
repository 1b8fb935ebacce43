"""`python -m snapens.ensemble`: numbers against an independent recomputation, the logits cache, members, prediction
on new images, and one clear line for every bad input."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import snapens
import snapens.ensemble.tool as cli
import snapens.ensemble.cache as cache
import snapens.training
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from snapens.build import build_data
from snapens.checkpoint import run_dir_lock
from snapens.ensemble import metrics
from snapens.errors import SnapensError
from snapens.snapshots import (
    list_snapshots,
    load_into,
    read_metadata,
    save_snapshot,
)
from snapens.training import train

from conftest import (
    EQUAL_CYCLES_2,
    EQUAL_CYCLES_3,
    HANG,
    HELD_OUT,
    compose_config,
    says,
    snapshot_logits,
    write_image_folder,
)


@pytest.fixture
def run(held_out_copy):
    """A copy of the session's finished 3-cycle run on synthetic data with a validation split."""
    return held_out_copy


def evaluate(*overrides: str) -> float:
    """The tool as the command line runs it; these tests call it again on a run (a refusal has its own test)."""
    return cli.evaluate(compose_config("overwrite=true", *overrides, name="ensemble"))


def direct_logits(run_dir, split="test"):
    """Each snapshot's logits computed here, from the files and the run's data, without the tool's code."""
    data = build_data(compose_config(*HELD_OUT).data)
    part = data.test if split == "test" else data.val
    return snapshot_logits(run_dir, part.images), part.labels


def test_the_tool_decodes_only_the_images_it_scores(tmp_path, monkeypatch):
    """An image-folder run, its decode cache gone: the tool reads the training images' labels to find the
    validation split, and decodes the 8 validation and 16 test images only, not the 56 it trained on (issue 22)."""
    import snapens.folders

    write_image_folder(tmp_path / "folder")  # 64 training images, 16 test images
    cfg = compose_config(*EQUAL_CYCLES_2, "data=imagefolder", f"data.root={tmp_path / 'folder'}", "data.num_classes=4",
                         "data.val_size=8")
    train(cfg, tmp_path / "run")
    shutil.rmtree(tmp_path / "folder" / ".snapens_cache")
    decoded, real = [], snapens.folders.read_image
    monkeypatch.setattr(snapens.folders, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    accuracy = evaluate(f"run={tmp_path / 'run'}", f"out={tmp_path / 'report'}")
    assert len(decoded) == len(set(decoded)) == 8 + 16
    assert accuracy == json.loads((tmp_path / "run" / "results.json").read_text())["ensemble"]["acc"]


def test_report_matches_an_independent_recomputation(run):
    acc = evaluate(f"run={run}")
    result = json.loads((run / "ensemble/test/ensemble.json").read_text())
    logits, labels = direct_logits(run)
    accs = [(lg.argmax(1) == labels).double().mean().item() for lg in logits]
    mean_logits_acc = (logits.mean(0).argmax(1) == labels).double().mean().item()
    probs = logits.softmax(-1).mean(0)
    assert [s["acc"] for s in result["snapshots"]] == pytest.approx(accs, abs=1e-12)
    assert result["ensemble"]["acc"] == acc == pytest.approx(mean_logits_acc, abs=1e-12)
    nll = -probs[torch.arange(len(labels)), labels].log().mean().item()
    assert result["curves"]["last"]["probs"][-1]["nll"] == pytest.approx(nll, rel=1e-5)
    disagree = (logits[0].argmax(1) != logits[2].argmax(1)).double().mean().item()
    assert result["disagreement"][0][2] == pytest.approx(disagree, abs=1e-12)
    assert [(s["cycle"], s["step"]) for s in result["snapshots"]] == [
        (read_metadata(p)["cycle"], read_metadata(p)["step"]) for p in list_snapshots(run)]
    assert result["single"] == result["snapshots"][-1]
    assert "nothing was chosen by looking at test results" in result["why"]
    for png in ("accuracy_vs_members.png", "disagreement.png", "reliability.png"):
        assert (run / "ensemble/test" / png).read_bytes()[:4] == b"\x89PNG"


def test_identical_snapshots_are_refused_and_would_be_exactly_the_single_model(run):
    """A copy of a snapshot would count twice: the tool refuses it. The arithmetic it would do on identical members
    gives exactly the single model for every rule and every m."""
    for path in list_snapshots(run)[:-1]:
        shutil.copyfile(list_snapshots(run)[-1], path)
    with pytest.raises(SnapensError, match="hold the same snapshot .*; remove the copy"):
        evaluate(f"run={run}")
    torch.manual_seed(0)
    one, labels = torch.randn(1, 200, 5), torch.randint(0, 5, (200,))
    curves = metrics.curves(one.expand(3, -1, -1), labels)
    single = metrics.scores(one, labels)
    for rule in ("logits", "probs", "vote"):
        for end in ("last", "first"):
            assert all(p["acc"] == single["acc"] for p in curves[end][rule])
    assert curves["last"]["logits"][-1]["nll"] == pytest.approx(single["nll"], abs=1e-12)
    assert curves["last"]["probs"][-1]["ece"] == pytest.approx(single["ece"], abs=1e-12)
    assert metrics.disagreement(one.expand(3, -1, -1)).tolist() == [[0.0] * 3] * 3


SHAPE = {"split", "num_images", "rule", "snapshots", "single", "ensemble"}


def test_results_json_ensemble_json_and_evaluate_share_one_shape(run):
    """results.json (plus "training"), ensemble.json (plus its extras) and SnapshotEnsemble.evaluate: the same keys
    at every level; results.json and ensemble.json, both from the cached logits, the same numbers."""
    evaluate(f"run={run}")
    report = json.loads((run / "ensemble/test/ensemble.json").read_text())
    results = json.loads((run / "results.json").read_text())
    cfg = compose_config(*HELD_OUT)
    data = build_data(cfg.data)
    x = (data.test.images.float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(
        1, 3, 1, 1)
    ensemble, model = snapens.SnapshotEnsemble(), instantiate(cfg.model)
    for path in list_snapshots(run):
        load_into(model, path)
        ensemble.add(model)
    evaluated = ensemble.evaluate([(x[i:i + 64], data.test.labels[i:i + 64]) for i in range(0, len(x), 64)])

    assert set(results) == SHAPE | {"training", "val", "chosen", "calibration", "verdict", "gains"}  # with val
    assert set(results["val"]) == SHAPE and results["val"]["split"] == "val"
    assert set(report) == SHAPE | {"why", "curves", "disagreement", "logits_seconds", "chosen", "calibration", "gains"}
    assert report["chosen"] == results["chosen"]  # chosen on the same cached validation logits, alike
    assert report["calibration"] == results["calibration"]
    assert report["gains"] == results["gains"]  # the same intervals, from the same logits and seed
    assert set(evaluated) == SHAPE
    entry = {"file", "name", "cycle", "step", "acc", "nll", "ece"}
    for r in (results, report, evaluated):
        assert all(set(s) == entry for s in r["snapshots"]) and set(r["single"]) == entry
        assert set(r["ensemble"]) == {"acc", "nll", "ece", "rule", "members"}

    def by_file_name(r):  # results.json names files as in snapshots/, ensemble.json by their paths
        return {"snapshots": [{**s, "file": Path(s["file"]).name} for s in r["snapshots"]],
                "ensemble": {**r["ensemble"], "members": [Path(f).name for f in r["ensemble"]["members"]]},
                **{k: r[k] for k in ("split", "num_images", "rule")}}
    assert by_file_name(results) == by_file_name(report)
    assert [s["acc"] for s in evaluated["snapshots"]] == pytest.approx([s["acc"] for s in report["snapshots"]],
                                                                       abs=1e-12)
    assert evaluated["ensemble"]["acc"] == pytest.approx(report["ensemble"]["acc"], abs=1e-12)


def test_logits_are_cached_and_recomputed_only_when_their_inputs_change(run, monkeypatch):
    """Training already cached the test and validation logits; a changed snapshot is computed again."""
    for split in ("test", "val"):
        cached = sorted((run / "logits" / split).glob("*.safetensors"))
        assert [p.name for p in cached] == ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]
    calls = []
    real = cache.predict_logits
    monkeypatch.setattr(cache, "predict_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    evaluate(f"run={run}")
    assert calls == []  # every snapshot's logits came from the cache
    path = list_snapshots(run)[1]  # a retrained snapshot: different weights, same name
    model = instantiate(read_metadata(path)["model_config"])
    save_snapshot(path, model, read_metadata(path), record=True)
    evaluate(f"run={run}")
    assert calls == [1, 1]  # its test logits, and its validation logits for the members chosen on validation
    evaluate(f"run={run}", "split=val")  # the validation cache is fresh again
    assert len(calls) == 2


def test_validation_split(run):
    evaluate(f"run={run}", "split=val", "rule=probs")
    result = json.loads((run / "ensemble/val/ensemble.json").read_text())
    logits, labels = direct_logits(run, "val")
    assert result["num_images"] == 32 and result["rule"] == "probs"
    assert result["ensemble"]["acc"] == pytest.approx(
        (logits.softmax(-1).mean(0).argmax(1) == labels).double().mean().item(), abs=1e-12)


@pytest.mark.parametrize("members, cycles", [("last:2", [2, 3]), ("first:1", [1]), ("[1,3]", [1, 3]),
                                             ("[3,1]", [1, 3])])
def test_members(run, members, cycles):
    evaluate(f"run={run}", f"members={members}")
    result = json.loads((run / "ensemble/test/ensemble.json").read_text())
    assert [int(f.split("cycle_")[1][:2]) for f in result["ensemble"]["members"]] == cycles
    assert [s["cycle"] for s in result["snapshots"]] == cycles


def test_cross_run_ensemble(run, tmp_path):
    train(compose_config(*HELD_OUT, "trainer.seed=1"), tmp_path / "run_b")  # the same data, other weights
    evaluate(f"runs=[{run},{tmp_path / 'run_b'}]", f"out={tmp_path / 'report'}")
    result = json.loads((tmp_path / "report/ensemble.json").read_text())
    assert len(result["snapshots"]) == 6 and result["snapshots"][3]["name"] == "run_b/cycle_01"
    shutil.copytree(run, tmp_path / "copy")  # a copied run would count every snapshot twice
    with pytest.raises(SnapensError, match="hold the same snapshot"):
        evaluate(f"runs=[{run},{tmp_path / 'copy'}]", f"out={tmp_path / 'report2'}")


def test_explicit_snapshot_files(run, tmp_path):
    """Snapshot files carry their model config; config= names the data."""
    files = [str(p) for p in list_snapshots(run)[1:]]
    evaluate(f"snapshots=[{','.join(files)}]", f"config={run / '.hydra/config.yaml'}", f"out={tmp_path / 'r'}")
    result = json.loads((tmp_path / "r/ensemble.json").read_text())
    logits, labels = direct_logits(run)
    assert result["ensemble"]["members"] == [s["file"] for s in result["snapshots"]] == files
    assert result["ensemble"]["acc"] == pytest.approx(
        (logits[1:].mean(0).argmax(1) == labels).double().mean().item(), abs=1e-12)
    with pytest.raises(SnapensError, match=r"snapshots=\[...\] needs config=PATH"):
        evaluate(f"snapshots=[{files[0]}]")


def test_predict_on_a_folder_gives_the_reports_classes(run, tmp_path, caplog):
    """Test images written as PNG files get the same classes as the ensemble's predictions in the report; the
    predictions go to <run>/predictions/, no report is made, and the files that are not images are named."""
    data = build_data(compose_config(*HELD_OUT).data)
    folder = tmp_path / "new"
    folder.mkdir()
    for i, image in enumerate(data.test.images[:20]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    (folder / "labels.txt").write_text("not an image")
    shutil.rmtree(run / "ensemble", ignore_errors=True)
    assert evaluate(f"run={run}", f"predict={folder}") is None
    assert not (run / "ensemble").exists()  # predictions only: no report on the test split
    assert "skipped 1 files that are not images" in caplog.text and str(folder / "labels.txt") in caplog.text
    with open(run / "predictions/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    logits, _ = direct_logits(run)
    expected = logits.mean(0).argmax(1)[:20]
    assert [r["class"] for r in rows] == [data.classes[k] for k in expected]
    assert [r["path"] for r in rows] == [str(folder / f"{i:03d}.png") for i in range(20)]
    probs = torch.tensor([[float(r[c]) for c in data.classes] for r in rows])
    assert probs.sum(1).tolist() == pytest.approx([1.0] * 20, abs=1e-5)
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)


def corrupt(run):
    path = list_snapshots(run)[1]
    path.write_bytes(path.read_bytes()[:1000])


def not_fitting(run):
    """A snapshot whose tensors come from a deeper model than its metadata says."""
    path = list_snapshots(run)[0]
    meta = read_metadata(path)
    save_snapshot(path, instantiate({**meta["model_config"], "depth": 14}), meta, record=True)  # as if the run did


def other_classes(run):
    path = list_snapshots(run)[2]
    save_snapshot(path, instantiate(read_metadata(path)["model_config"]),
                  {**read_metadata(path), "classes": ["a", "b", "c", "d"]}, record=True)


def other_classes_and_an_image(run):
    """Finding 4 of issue 24: predict= on members trained on other class lists (it labelled them silently)."""
    other_classes(run)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(run / "x.png")


def code_in_metadata(run):
    """A snapshot whose model config asks instantiate() to call something else: it must never be called."""
    path = list_snapshots(run)[0]
    meta = read_metadata(path)
    evil = {"_target_": "os.system", "_args_": [f"touch {run / 'PWNED'}"]}
    save_snapshot(path, instantiate(meta["model_config"]), {**meta, "model_config": {**meta["model_config"],
                                                                                     "num_classes": evil}},
                  record=True)  # a crafted run, manifest and all: the allow-list still stops it


def other_data_config(run):
    cfg = compose_config(*HELD_OUT, "data.val_size=16")
    (run / "other.yaml").write_text(OmegaConf.to_yaml(cfg))


@pytest.mark.parametrize("damage, overrides, message", [
    (None, ["run=/nonexistent/run"], "run dir /nonexistent/run .* give the folder a training wrote"),
    (lambda r: shutil.rmtree(r / "snapshots"), [], "has no snapshots"),
    (corrupt, [], "cycle_02.safetensors is not a readable safetensors file"),
    (not_fitting, [], "cycle_01.safetensors does not fit the model"),
    (other_classes, [], "were trained on different class lists"),
    (other_classes_and_an_image, ["predict=RUN/x.png"], "were trained on different class lists"),
    (None, ["members=last:9"], "members=last:9 needs 1 <= K <= 3"),
    (None, ["members=[7]"], "no snapshot for cycle 7"),
    (None, ["split=train"], "split=train is not allowed; choose one of: test, val"),
    (None, ["precision=fp16"], "precision=fp16 is not allowed; choose one of: auto, bf16, fp32"),
    (None, ["rule=median"], "rule='median' is not allowed; choose one of: logits, probs, vote"),
    (code_in_metadata, [], "names a model snapens cannot build safely"),
    (other_data_config, ["split=val", "config=RUN/other.yaml"], "trained on other data than"),
    (None, ["members=[1,1]"], "names a cycle twice"),
    (None, ["members=5"], "members=5 is not allowed"),
    (None, ["bins=0"], "bins=0 must be a positive whole number"),
    (None, ["predict=/nonexistent/images"], "predict=/nonexistent/images .* give an image file or a folder"),
    (lambda r: (r / "x.png").write_bytes(b"not an image"), ["predict=RUN/x.png"], "cannot read image"),
])
def test_bad_input_gets_one_clear_line(run, damage, overrides, message):
    if damage:
        damage(run)
    before = {p: p.read_bytes() for p in list_snapshots(run)}
    args = [o.replace("RUN", str(run)) for o in overrides]
    with pytest.raises(SnapensError, match=message) as info:
        evaluate(*([f"run={run}"] if not any(a.startswith("run=") for a in args) else []), *args)
    assert "\n" not in str(info.value)
    assert before == {p: p.read_bytes() for p in list_snapshots(run)}  # snapshots are never written
    assert not (run / "PWNED").exists()


def test_cli(run, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "snapens.ensemble", f"run={run}"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=HANG)
    assert ok.returncode == 0, ok.stderr
    assert "ensemble of 3 (logits)" in ok.stdout and (run / "ensemble/test/ensemble.json").exists()
    bad = subprocess.run([sys.executable, "-m", "snapens.ensemble", f"run={tmp_path / 'nope'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=HANG)
    assert bad.returncode == 2 and bad.stderr.startswith("snapens: error: ")
    says(bad.stderr, f"run dir {tmp_path / 'nope'}", "give the folder a training wrote")


def test_no_output_is_replaced_silently(run, tmp_path):
    """predict= and the report refuse to replace what an earlier call wrote, before any work; overwrite=true
    replaces it; predictions.csv is written whole, and a class name that a spreadsheet would run as a formula is
    kept as text."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    once = lambda *extra: cli.evaluate(compose_config(f"run={run}", f"predict={folder}", f"out={tmp_path / 'p'}",
                                                      *extra, name="ensemble"))
    once()
    first = (tmp_path / "p" / "predictions.csv").read_bytes()
    with pytest.raises(SnapensError, match=r"predictions.csv exists, written by an earlier call; pass out=DIR .* "
                                           r"overwrite=true"):
        once()
    assert (tmp_path / "p" / "predictions.csv").read_bytes() == first
    planted = tmp_path / "elsewhere.txt"  # a link planted in the output's place is replaced, never written through
    planted.write_text("mine")
    (tmp_path / "p" / "predictions.csv").unlink()
    (tmp_path / "p" / "predictions.csv").symlink_to(planted)
    once("overwrite=true", "rule=probs")
    assert (tmp_path / "p" / "predictions.csv").read_bytes() != first and planted.read_text() == "mine"
    assert not (tmp_path / "p" / "predictions.csv").is_symlink()
    cli.evaluate(compose_config(f"run={run}", f"out={tmp_path / 'r'}", name="ensemble"))
    with pytest.raises(SnapensError, match=r"ensemble.json exists, written by an earlier call"):
        cli.evaluate(compose_config(f"run={run}", f"out={tmp_path / 'r'}", name="ensemble"))
    assert cli.cell("=HYPERLINK(1)") == "'=HYPERLINK(1)" and cli.cell("cat") == "cat" and cli.cell("-1") == "'-1"


def test_a_run_still_training_is_not_reported_on(run, tmp_path):
    """Finding 7 of issue 24: while a training holds the run's lock, the tool and predict= refuse (nothing written
    into the run dir); once it has ended, they work."""
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with run_dir_lock(run):
        for extra in ([], [f"predict={run / 'lr_schedule.png'}"]):
            with pytest.raises(SnapensError, match=rf"run dir {run} is still training \(process {os.getpid()} holds"):
                cli.evaluate(compose_config(f"run={run}", *extra, name="ensemble"))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert cli.evaluate(compose_config(f"run={run}", name="ensemble")) > 0


def test_ensemble_out_inside_the_snapshots_folder_is_refused(make_cfg, tmp_path):
    import snapens.ensemble.tool as cli

    from conftest import compose_config
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    with pytest.raises(SnapensError, match="lies inside the snapshots' folder"):
        cli.evaluate(compose_config(f"run={tmp_path / 'run'}", f"out={tmp_path / 'run' / 'snapshots' / 'r'}",
                                    "device=cpu", name="ensemble"))
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == before


def test_a_hand_edited_run_config_is_one_line_in_the_ensemble_tool(make_cfg, tmp_path):
    import snapens.ensemble.tool as cli

    from conftest import compose_config
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    config = tmp_path / "run" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("train_limit: 0", "train_limit: abc"))
    with pytest.raises(SnapensError, match="config.yaml: data.train_limit: Value 'abc' of type 'str' could not"):
        cli.evaluate(compose_config(f"run={tmp_path / 'run'}", "device=cpu", name="ensemble"))


def test_ensemble_tool_evaluates_the_swa_set(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.swa.start=0.5"), tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "snapens.ensemble", f"run={tmp_path / 'run'}", "swa=true",
                             "device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "ensemble" / "test_swa" / "ensemble.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in report["ensemble"]["members"]] == [
        "cycle_01_swa.safetensors", "cycle_02_swa.safetensors", "cycle_03_swa.safetensors"]
    train(make_cfg(*EQUAL_CYCLES_3), tmp_path / "plain")
    result = subprocess.run([sys.executable, "-m", "snapens.ensemble", f"run={tmp_path / 'plain'}", "swa=true",
                             "device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2 and "has no SWA snapshots" in result.stderr
