"""scripts/regime_map.py: the map's runs, in the order they are trained, each named after its cell and arm; the two
most telling cells trained again with seeds 1 and 2, right after every cell's M1 and M4 and before SWA and FGE, whose
telling cells come first."""

import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "regime_map.py"
sys.path.insert(0, str(SCRIPT.parent))
import regime_map  # noqa: E402  (scripts/ is not a package)


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
