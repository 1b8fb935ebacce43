"""snapens.ensemble.members: members ordered by their metadata, copies refused."""


import json
import shutil

import pytest
from snapens.errors import SnapensError
from snapens.train import train

from conftest import EQUAL_CYCLES_3


# ---- 12. members by their metadata, copies refused ----------------------------------------------------------------
def test_members_are_ordered_by_their_metadata_and_copies_are_refused(make_cfg, tmp_path):
    import snapens.ensemble.__main__ as cli

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
