"""snapens.tensorboard_log: TensorBoard is an extra, asked for by name."""



import pytest
from snapens import tensorboard_log
from snapens.errors import SnapensError
from snapens.training import train

from conftest import EQUAL_CYCLES_2


def test_tensorboard_is_an_extra(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SnapensError, match=r"logger=tensorboard needs the tensorboard package: pip install -e "
                                           r"'\.\[tensorboard\]'"):
        train(make_cfg(*EQUAL_CYCLES_2, "logger=tensorboard"), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written
