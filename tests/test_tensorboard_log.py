"""snapens.tensorboard_log: TensorBoard is an extra, asked for by name."""



import pytest
from snapens import tensorboard_log
from snapens.errors import SnapensError
from snapens.training import train

from conftest import EQUAL_CYCLES_2, says


def test_tensorboard_is_an_extra(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SnapensError) as info:
        train(make_cfg(*EQUAL_CYCLES_2, "logger=tensorboard"), tmp_path)
    says(info.value, "logger=tensorboard", "pip install -e '.[tensorboard]'")
    assert not any(tmp_path.iterdir())  # refused before anything was written
