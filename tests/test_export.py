"""`python -m snapens.export`: the ensemble as one torch.export file, loaded in a fresh process that never imports
snapens, gives the ensemble tool's probabilities (temperature and chosen weights included) within 1e-5."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from snapens.build import build_data
from snapens.ensemble import calibration, metrics, selection
from snapens.ensemble.cache import cached_logits
from snapens.errors import SnapensError
from snapens.ensemble.program import export_run
from snapens.snapshots import list_snapshots, read_metadata

from conftest import HANG, HELD_OUT, compose_config


# Runs in a fresh interpreter: torch alone loads and runs the program (and snapens is never imported).
LOAD = """
import json, sys, torch
extra = {"snapens.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
images = torch.load(sys.argv[2], weights_only=True)
probs = program.module()(images)
torch.save(probs, sys.argv[3])
assert not any(name.startswith("snapens") for name in sys.modules)
print(json.dumps(json.loads(extra["snapens.json"])))
"""


@pytest.fixture(scope="module")
def run(held_out_run, tmp_path_factory):
    """A copy of the session's finished run: exporting reads it, and its log goes beside each file."""
    copy = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(held_out_run, copy)
    return copy


def export(run, out, *extra):
    return subprocess.run([sys.executable, "-m", "snapens.export", f"run={run}", f"out={out}", *extra],
                          cwd=run.parent, capture_output=True, text=True, timeout=HANG)


def load_elsewhere(program, images, tmp_path):
    torch.save(images, tmp_path / "images.pt")
    done = subprocess.run([sys.executable, "-c", LOAD, str(program), str(tmp_path / "images.pt"),
                           str(tmp_path / "probs.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=HANG,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "probs.pt", weights_only=True).double(), json.loads(done.stdout)


def tool_logits(run, split="test"):
    """The members' logits as the ensemble tool has them (its cache), and the split's uint8 images."""
    data = build_data(compose_config(*HELD_OUT).data)
    part = data.test if split == "test" else data.val
    paths = list_snapshots(run)
    logits = cached_logits(paths, [read_metadata(p) for p in paths], part, split, 1000, torch.device("cpu"),
                           lambda *_: None, None, True)  # every entry cached by training (fp32, channels_last)
    return logits.double(), part.images


@pytest.mark.parametrize("chosen", [None, "greedy", "weighted"])
def test_the_exported_file_gives_the_tools_probabilities(run, tmp_path, chosen):
    out = tmp_path / "ensemble.pt2"
    done = export(run, out, *([f"chosen={chosen}"] if chosen else []))
    assert done.returncode == 0, done.stderr[-3000:]
    logits, images = tool_logits(run)
    results = json.loads((run / "results.json").read_text())
    names = [p.stem for p in list_snapshots(run)]
    if chosen is None:
        probs, temperature = metrics.probabilities(logits), results["calibration"]["ensemble"]["temperature"]
    elif chosen == "greedy":
        picks = [names.index(n) for n in results["chosen"]["greedy"]["members"]]
        probs, temperature = metrics.probabilities(logits[picks]), results["chosen"]["greedy"]["temperature"]
    else:
        weights = torch.tensor([results["chosen"]["weighted"]["weights"][n] for n in names], dtype=torch.float64)
        probs = selection.weighted_probabilities(logits, weights, "logits")
        temperature = results["chosen"]["weighted"]["temperature"]
    got, record = load_elsewhere(out, images, tmp_path)
    assert got.shape == probs.shape
    assert (got - calibration.scale(probs, temperature)).abs().max().item() < 1e-5
    assert record["temperature"] == temperature  # with the class names, riding along in the file
    assert record["classes"] == build_data(compose_config(*HELD_OUT).data).classes
    assert (run.parent / "export.log").exists() is False and (tmp_path / "export.log").exists()  # log beside it


def test_any_batch_size_and_a_student_of_one_member(run, tmp_path):
    out = tmp_path / "last.pt2"
    assert export(run, out, "members=last:1", "calibrate=none").returncode == 0
    logits, images = tool_logits(run)
    got, record = load_elsewhere(out, images[:1], tmp_path)  # one image: batch sizes other than the traced one
    assert (got - logits[-1, :1].softmax(-1)).abs().max().item() < 1e-5
    assert record["temperature"] is None and len(record["members"]) == 1


@pytest.mark.parametrize("extra, message", [
    (["rule=vote"], "an exported ensemble returns probabilities; use logits or probs"),
    (["format=onnx"], "format=onnx is not allowed; the one format is pt2"),
    (["calibrate=test"], "calibrate=test would fit the temperature on the images it is then scored on"),
    (["chosen=greedy", "members=last:2"], "chosen=greedy takes the members the run chose on validation"),
])
def test_bad_input_is_refused_and_writes_nothing(run, tmp_path, extra, message):
    out = tmp_path / "refused.pt2"
    with pytest.raises(SnapensError, match=message):
        export_run(compose_config(f"run={run}", f"out={out}", *extra, name="export"))
    assert not out.exists()


def test_the_command_line_says_it_in_one_line(run, tmp_path):
    done = export(run, tmp_path / "no_suffix")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("snapens: error: out=") and \
        "must name the file to write, ending in .pt2" in done.stderr


def test_the_readme_example_classifies_a_folder_with_torch_alone(run, tmp_path):
    """scripts/classify_pt2.py, in a fresh process that never imports snapens, gives the classes and probabilities of
    the run's Ensemble on the same image files (some of another size, resized the same way)."""
    import csv
    import io

    import numpy as np
    from PIL import Image

    from snapens import Ensemble
    from snapens.images import read_images
    from conftest import REPO
    program = tmp_path / "e.pt2"
    assert export(run, program).returncode == 0
    generator = np.random.default_rng(0)
    for i, size in enumerate([(32, 32), (20, 28), (40, 36)] * 2):
        (tmp_path / "images" / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"set{i % 2}" / f"{i}.png")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "classify_pt2.py"), str(program),
                           str(tmp_path / "images")], cwd=tmp_path, capture_output=True, text=True, timeout=HANG,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    ensemble = Ensemble.from_run(run)
    files = [tmp_path / "images" / f"set{i % 2}" / f"{i}.png" for i in range(6)]
    probs = ensemble.probs(read_images(files, ensemble.image_size)).double()
    expected = {str(f): (ensemble.classes[int(p.argmax())], p.max().item()) for f, p in zip(files, probs)}
    assert len(rows) == 6 and {r["file"]: r["class"] for r in rows} == {f: c for f, (c, _) in expected.items()}
    for r in rows:
        assert float(r["probability"]) == pytest.approx(expected[r["file"]][1], abs=2e-5)


def test_an_export_that_fails_to_write_is_one_line_and_leaves_no_partial_file(run, tmp_path, monkeypatch):
    real = torch.export.save

    def full_disk(program, path, **kwargs):
        real(program, path, **kwargs)  # half the work done: the partial file is there
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", full_disk)
    with pytest.raises(SnapensError, match=f"cannot write {tmp_path / 'e.pt2'}: No space left on device"):
        export_run(compose_config(f"run={run}", f"out={tmp_path / 'e.pt2'}", name="export"))
    assert list(tmp_path.iterdir()) == []  # neither the program nor its partial file
