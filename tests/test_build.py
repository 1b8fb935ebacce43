"""snapens.build.setup: refusals before training (a compiled run smaller than one batch, a training split over half the
free GPU memory)."""



import pytest
import torch
from snapens.build import check_fits
from snapens.data import Split
from snapens.errors import SnapensError
from snapens.training import train

from conftest import FAST


def test_compile_refuses_a_split_smaller_than_one_batch(make_cfg, tmp_path):
    with pytest.raises(SnapensError, match="do not fill one update of 512: lower trainer.batch_size"):
        train(make_cfg(*FAST, "trainer.batch_size=512", "trainer.compile=true"), tmp_path)


def test_training_split_must_fit_in_half_the_free_gpu_memory(monkeypatch):
    split = Split(torch.zeros(1000, 3, 32, 32, dtype=torch.uint8), torch.zeros(1000, dtype=torch.long))
    need = 1000 * 3 * 32 * 32 + 1000 * 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * need, 8 * need))
    check_fits(split, torch.device("cuda", 0))  # exactly half: fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * need - 2, 8 * need))
    with pytest.raises(SnapensError, match=r"the 1000 training images take 0\.00 GiB on cuda:0, .* more than half"):
        check_fits(split, torch.device("cuda", 0))
    check_fits(split, torch.device("cpu"))  # the CPU holds the data anyway
