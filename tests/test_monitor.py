"""snapens.monitor: the clipping rate reaches metrics.jsonl."""


import json

import pytest
from snapens.training import train

from conftest import EQUAL_CYCLES_2


# ---- clipping you are told about ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clip, mode, rate", [(1e-6, "norm", 1.0), (1e6, "norm", 0.0), (0, "norm", None),
                                              (1e-6, "value", None)])
def test_clip_rate_in_metrics(make_cfg, tmp_path, caplog, clip, mode, rate):
    train(make_cfg(*EQUAL_CYCLES_2, f"trainer.grad_clip={clip}", f"trainer.clip_mode={mode}"), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["clip_rate"] for line in lines] == [rate, rate]
    assert all(0 < line["grad_norm"] < float("inf") for line in lines)
    warned = [r for r in caplog.records if "of epoch 1's updates were clipped" in r.getMessage()]
    assert len(warned) == (rate == 1.0)
