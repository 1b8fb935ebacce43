"""snapens.adaptive: adaptive SGDR lengthens a cycle whose validation loss stalls (the extension rule, a scripted loss),
replays its recorded cycles on resume, and needs a validation split."""


import json

import pytest
import snapens.training
from snapens.adaptive import AdaptiveState, extend_cycle
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots, read_metadata
from snapens.training import train

from conftest import FAST

ADAPTIVE = [*FAST, "scheduler=adaptive_sgdr", "scheduler.T_0=3", "scheduler.T_mult=1", "trainer.epochs=9",
            "data.val_size=32", "data.train_size=288", "scheduler.patience=1", "scheduler.extension_factor=1.5"]


def scripted_losses(monkeypatch, losses, fail_at=None):
    """validation_loss returns the scripted values in turn; raises at call number fail_at (0-based)."""
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) - 1 == fail_at:
            raise RuntimeError("scripted failure")
        return losses[len(calls) - 1]

    monkeypatch.setattr(snapens.training, "validation_loss", loss)
    return calls


def test_adaptive_sgdr_extends_the_stalled_cycle_on_a_scripted_loss(make_cfg, tmp_path, monkeypatch):
    """256 training images: 4 updates per epoch, planned cycles of 12 updates ending at 12, 24, 36; evaluations at
    the ends of epochs 1..8. Cycle 1 improves to its end (1.0, 0.9, 0.8). Cycle 2 starts at 1.5 (a restart raises
    the loss: no plateau, a new cycle is judged on its own), stalls at 1.6 after step 20 and is extended to 18
    updates (the last cycle is cut to the 6 left); 1.7 does not extend it again; cycle 3 starts afresh."""
    calls = scripted_losses(monkeypatch, LOSSES)
    train(make_cfg(*ADAPTIVE), tmp_path)
    assert len(calls) == 8
    assert [read_metadata(p)["step"] for p in list_snapshots(tmp_path)] == [12, 30, 36]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["cycle_ends"] for r in lines] == [[12, 24, 36]] * 4 + [[12, 30, 36]] * 5
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["step"] for s in results["snapshots"]] == [12, 30, 36]


LOSSES = [1.0, 0.9, 0.8, 1.5, 1.6, 1.7, 1.2, 1.1]


def test_adaptive_sgdr_resume_replays_the_recorded_cycles(make_cfg, tmp_path, monkeypatch):
    scripted_losses(monkeypatch, LOSSES)
    train(make_cfg(*ADAPTIVE), tmp_path / "whole")
    scripted_losses(monkeypatch, LOSSES, fail_at=5)  # dies at the end of epoch 6, after the extension
    with pytest.raises(RuntimeError, match="scripted failure"):
        train(make_cfg(*ADAPTIVE), tmp_path / "stopped")
    scripted_losses(monkeypatch, LOSSES[5:])  # the evaluations still to come
    train(make_cfg(*ADAPTIVE), tmp_path / "stopped")
    for a, b in zip(list_snapshots(tmp_path / "whole"), list_snapshots(tmp_path / "stopped"), strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_adaptive_sgdr_needs_a_validation_split(make_cfg, tmp_path):
    with pytest.raises(SnapensError, match="data.val_size=N"):
        train(make_cfg(*[o for o in ADAPTIVE if not o.startswith("data.val_size")]), tmp_path)


def test_extension_rule():
    state = AdaptiveState([8, 8, 8])
    assert [state.should_extend(loss, 0, 2) for loss in (3.0, 3.1, 3.2, 3.3, 3.4)] == [False, False, True,
                                                                                      False, False]
    assert [state.should_extend(loss, 1, 2) for loss in (5.0, 4.0, 4.5)] == [False, False, False]  # own best
    assert not state.should_extend(4.6, 1, 2, in_progress=False)  # stalled, but the cycle is over
    assert state.should_extend(4.7, 1, 2)
    assert extend_cycle((10, 20, 40, 80), 1, 1.5) == (10, 30, 40, 70)  # later cycles move back; the last is cut
    assert extend_cycle((10, 10, 10, 10), 0, 1.5) == (15, 10, 10, 5)  # a cut of half its length stays a cycle
    assert extend_cycle((10, 10, 10, 10), 1, 1.8) == (10, 18, 12)  # a stub of 2 is merged into the cycle before
    assert extend_cycle((10, 20), 1, 2.0) == (10, 20)  # the last cycle cannot grow past the budget
    assert sum(extend_cycle((7, 14, 28), 0, 1.37)) == 49
