"""snapens.distributed: each rank takes a GPU it sees."""



import pytest
import torch
from snapens import distributed


@pytest.mark.parametrize("visible, local_rank, index", [(4, 3, 3), (1, 3, 0), (2, 3, 1)])
def test_rank_takes_a_gpu_it_sees(monkeypatch, visible, local_rank, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    ranks = distributed.Ranks(rank=local_rank, world=4, local_rank=local_rank)
    assert distributed.device_for(torch.device("cuda"), ranks) == torch.device("cuda", index)
    assert distributed.device_for(torch.device("cpu"), ranks) == torch.device("cpu")
