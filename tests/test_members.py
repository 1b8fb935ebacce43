"""snapens.ensemble.members: members ordered by their metadata, copies refused."""


import json
import shutil

import pytest
from snapens.errors import SnapensError
from snapens.training import train

from conftest import EQUAL_CYCLES_3


# ---- 12. members by their metadata, copies refused ----------------------------------------------------------------
def test_members_are_ordered_by_their_metadata_and_copies_are_refused(make_cfg, tmp_path):
    import snapens.ensemble.tool as cli

    from conftest import compose_config
    run = tmp_path / "run"
    train(make_cfg(*EQUAL_CYCLES_3), run)
    (run / "snapshots" / "cycle_02.safetensors").rename(run / "snapshots" / "cycle_07.safetensors")
    cli.evaluate(compose_config(f"run={run}", "device=cpu", f"out={tmp_path / 'report'}", name="ensemble"))
    report = json.loads((tmp_path / "report" / "ensemble.json").read_text())
    assert [s["cycle"] for s in report["snapshots"]] == [1, 2, 3]  # the renamed cycle 2 is not "the last"
    assert report["single"]["file"].endswith("cycle_03.safetensors")
    cli.evaluate(compose_config(f"run={run}", "device=cpu", "members=[2,3]", f"out={tmp_path / 'two'}",
                                name="ensemble"))
    two = json.loads((tmp_path / "two" / "ensemble.json").read_text())
    assert [s["cycle"] for s in two["snapshots"]] == [2, 3]
    shutil.copy(run / "snapshots" / "cycle_03.safetensors", run / "snapshots" / "cycle_3.safetensors")
    with pytest.raises(SnapensError, match="hold the same snapshot .*; remove the copy"):
        cli.evaluate(compose_config(f"run={run}", "device=cpu", f"out={tmp_path / 'three'}", name="ensemble"))


def with_metadata(source, target, **changes):
    """A copy of snapshot `source` at `target` (outside any run, so no manifest vouches for it) with metadata
    values changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from snapens.snapshots import METADATA_KEY
    with safe_open(source, "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    save_file(load_file(source), target, metadata={METADATA_KEY: json.dumps({**meta, **changes})})
    return target


@pytest.mark.parametrize("changes, key", [
    ({"std": [0.0, 0.0, 0.0]}, "std"),  # NaN probabilities otherwise
    ({"mean": "abc"}, "mean"),
    ({"image_size": [30000, 30000]}, "image_size"),  # predict= would resize every image to that
    ({"classes": ["a", "b"]}, "classes"),  # two names for a model of four outputs: a malformed CSV
    ({"classes": ["a", "a", "b", "c"]}, "classes"),
    ({"cycle": "two"}, "cycle"),
])
def test_metadata_is_typed_and_bounded_before_use(held_out_run, tmp_path, changes, key):
    from snapens.ensemble import members
    from snapens.snapshots import list_snapshots
    path = with_metadata(list_snapshots(held_out_run)[0], tmp_path / "x.safetensors", **changes)
    with pytest.raises(SnapensError, match=f"snapshot {path} has {key}=.* where snapens.train writes"):
        members.read([path])
    assert members.read([with_metadata(list_snapshots(held_out_run)[0], tmp_path / "y.safetensors")])  # unchanged


def test_metadata_that_is_not_an_object_is_not_a_snapshot(held_out_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from snapens.snapshots import METADATA_KEY, list_snapshots, read_metadata
    path = tmp_path / "x.safetensors"
    save_file(load_file(list_snapshots(held_out_run)[0]), path, metadata={METADATA_KEY: "[1, 2]"})
    with pytest.raises(SnapensError, match=f"{path} is not a snapens snapshot"):
        read_metadata(path)


@pytest.mark.parametrize("temperature, weights, message", [
    (-1.0, None, "temperature -1.0, which must be a finite number > 0"),
    (float("nan"), None, "temperature nan"),
    (None, [0.5, float("nan")], r"weights \[0.5, nan\], which must be finite, >= 0 and sum to 1"),
    (None, [0.7, 0.7], r"weights \[0.7, 0.7\]"),
    (None, [1.5, -0.5], r"weights \[1.5, -0.5\]"),
])
def test_stored_temperatures_and_weights_are_checked_where_read(temperature, weights, message):
    import torch

    from snapens.ensemble.members import check_stored
    with pytest.raises(SnapensError, match=f"results.json holds {message}"):
        check_stored("results.json", temperature,
                     None if weights is None else torch.tensor(weights, dtype=torch.float64))
    check_stored("results.json", 0.5, torch.tensor([0.25, 0.75]))  # what training writes passes
