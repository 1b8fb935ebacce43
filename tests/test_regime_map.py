"""scripts/regime_map.py: the map's runs, in the order they are trained, each named after its cell and arm; the two
most telling cells trained again with seeds 1 and 2, right after every cell's M1 and M4 and before SWA and FGE, whose
telling cells come first; a stopped map resumes without training a finished run again; the summary pairs every
arm with the cell's single run on the test images, seeds summarised apart."""

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "regime_map.py"
sys.path.insert(0, str(SCRIPT.parent))
import regime_map  # noqa: E402  (scripts/ is not a package)

from conftest import write_image_folder  # noqa: E402


def test_the_runs_and_their_order():
    runs = regime_map.cells()
    names = [name for name, _ in runs]
    assert len(names) == len(set(names)) == 8 * 4 + 2 * 2 * 2  # 8 cells x 4 arms, 2 cells x 2 seeds x 2 arms
    first_confirm = names.index(f"{regime_map.CONFIRM[0]}_s1_M1")
    assert all(n.endswith(("_M1", "_M4")) for n in names[:first_confirm])  # the whole map's M1 and M4 first
    assert all(n.endswith(("_swa4", "_fge4")) for n in names[first_confirm + 8:])  # SWA and FGE last
    telling = [f"{cell}_{arm}" for cell in regime_map.CONFIRM for arm in ("swa4", "fge4")]
    assert sorted(names[first_confirm + 8:first_confirm + 12]) == sorted(telling)  # the telling cells' first
    by_name = dict(runs)
    for cell in regime_map.CONFIRM:
        for seed in (1, 2):
            for arm in ("M1", "M4"):  # the map's own overrides, with another seed: paired by seed with each other
                assert by_name[f"{cell}_s{seed}_{arm}"] == [*by_name[f"{cell}_{arm}"], f"trainer.seed={seed}"]


def test_a_stopped_map_trains_only_what_has_no_results(tmp_path, monkeypatch):
    (tmp_path / "out" / "a_M1").mkdir(parents=True)
    (tmp_path / "out" / "a_M1" / "results.json").write_text("{}")
    (tmp_path / "out" / "a_M4" / "checkpoints").mkdir(parents=True)  # killed mid-run: resumed by its own command
    launched = []
    monkeypatch.setattr(regime_map.subprocess, "run", lambda cmd: launched.append(cmd) or
                        regime_map.subprocess.CompletedProcess(cmd, 0))
    regime_map.run(tmp_path, tmp_path / "out", regime_map.arm_runs("a", ["model.depth=8"], 20, ("M1", "M4")))
    assert launched == [regime_map.command("a_M4", ["model.depth=8", "scheduler=snapshot", "scheduler.cycles=4"],
                                           tmp_path, tmp_path / "out")]
    assert launched[0][-1] == f"hydra.run.dir={tmp_path / 'out' / 'a_M4'}"  # the same dir: trainer.resume=auto


def test_seed_of_a_cell():
    assert regime_map.seed_of("r20_n1000_e320_s2") == ("r20_n1000_e320", 2)
    assert regime_map.seed_of("r20_n1000_e320") == ("r20_n1000_e320", 0)


@pytest.fixture(scope="module")
def tiny_map(tmp_path_factory):
    """One tiny cell trained all four ways, and its M1 and M4 with a second seed, on a synthetic ImageFolder."""
    root, out = tmp_path_factory.mktemp("folder"), tmp_path_factory.mktemp("map")
    write_image_folder(root)  # 64 training images, 16 test images, 4 classes
    base = ["model.depth=8", "data.num_classes=4", "data.val_size=16", "data.train_limit=8", "trainer.epochs=20",
            "trainer.batch_size=4"]  # 8 images (16 more held out): 2 updates an epoch, weak enough to differ
    runs = regime_map.arm_runs("r8_n8_e20", base, 20)
    runs += [(f"r8_n8_e20_s1_{arm}", [*overrides, "trainer.seed=1"]) for arm, (_, overrides) in zip(("M1", "M4"), runs)]
    regime_map.run(root, out, runs)
    regime_map.summarise(root, out, out / "docs", runs)
    return root, out, list(csv.DictReader((out / "docs" / "regime.csv").open()))


def direct_accuracy(paths: list[Path], root: Path) -> float:
    """The uniform mean-of-logits ensemble of snapshot files on the folder's test images, from the files alone."""
    from safetensors.torch import load_file

    from snapens.data import scan_image_folder
    from snapens.models import model_from_metadata
    from snapens.snapshots import read_metadata

    test = scan_image_folder(str(root))[1].load()
    logits = []
    for path in paths:
        meta = read_metadata(path)
        model = model_from_metadata(meta["model_config"], str(path)).eval()
        model.load_state_dict(load_file(path))
        x = (test.images.float() / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(
            meta["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            logits.append(model(x).double())
    return float((torch.stack(logits).mean(0).argmax(-1) == test.labels).double().mean())


def test_the_summary_pairs_each_arm_with_the_single_run(tiny_map):
    root, out, rows = tiny_map
    assert [r["cell"] for r in rows] == ["r8_n8_e20", "r8_n8_e20_s1"]
    tiny = rows[0]
    single = json.loads((out / "r8_n8_e20_M1" / "results.json").read_text())["single"]
    assert float(tiny["M1_acc"]) == single["acc"]
    swa = sorted((out / "r8_n8_e20_swa4" / "snapshots").glob("cycle_??_swa.safetensors"))
    fge = sorted((out / "r8_n8_e20_fge4" / "snapshots").glob("cycle_??.safetensors"))
    assert len(swa) == len(fge) == 4
    assert float(tiny["swa4_all_acc"]) == pytest.approx(direct_accuracy(swa, root), abs=1e-12)
    assert float(tiny["fge4_all_acc"]) == pytest.approx(direct_accuracy(fge, root), abs=1e-12)
    for arm in ("swa4", "fge4"):  # a paired gain: the arm's accuracy minus the single run's
        assert float(tiny[f"{arm}_vs_M1_acc"]) == pytest.approx(float(tiny[f"{arm}_all_acc"]) - single["acc"])
        assert float(tiny[f"{arm}_vs_M1_acc_low"]) <= float(tiny[f"{arm}_vs_M1_acc"]) <= float(
            tiny[f"{arm}_vs_M1_acc_high"])


def test_the_summary_gives_seeds_their_own_table(tiny_map):
    _, out, rows = tiny_map
    text = (out / "docs" / "regime.md").read_text()
    map_table, seeds, others = text.split("\n\n")
    assert "r8_n8_e20_s1" not in map_table and "| r8_n8_e20 | 1 |" in seeds
    gains = [100 * float(r["all_vs_M1_acc"]) for r in rows]
    assert "| r8_n8_e20 | mean ± std of 2 | " in seeds
    assert f"| {statistics.mean(gains):+.2f} ± {statistics.stdev(gains):.2f} |" in seeds
    assert [line.split(" | ")[1] for line in others.splitlines()[2:]] == [
        "snapshots (M4)", "SWA averages, one per cycle", "FGE snapshots"]
