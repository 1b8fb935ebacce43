"""snapens.precision and the precision keys: the choices, a typo, bf16 only where the GPU has it, and the run's
precision said as it is (tf32 where torch allows it)."""



import pytest
import torch
from snapens.build import pick_precision
from snapens.errors import SnapensError
from snapens.training import train

from conftest import EQUAL_CYCLES_2, says

CPU = torch.device("cpu")


def test_precision_choices():
    assert pick_precision("auto", CPU) is None  # fp32 on CPU, where bf16 is emulated
    assert pick_precision("fp32", CPU) is None
    assert pick_precision("bf16", CPU) is torch.bfloat16


def test_precision_typo_is_one_clear_error(make_cfg, tmp_path):
    with pytest.raises(SnapensError) as info:
        train(make_cfg(*EQUAL_CYCLES_2, "trainer.precision=fp16"), tmp_path)
    says(info.value, "trainer.precision=fp16", "auto, bf16, fp32")
    assert not any(tmp_path.iterdir())


def test_auto_precision_is_fp32_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    from snapens.build import pick_precision
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    cuda = torch.device("cuda")
    assert pick_precision("auto", cuda) is None and asked == [False]
    with pytest.raises(SnapensError, match="trainer.precision=bf16 but Tesla V100 has no bf16 support"):
        pick_precision("bf16", cuda)


def test_fp32_on_a_gpu_is_said_as_tf32_when_torch_allows_it(monkeypatch):
    from snapens.precision import describe
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default for convolutions
    assert describe(None, True, torch.device("cuda", 0)) == "tf32, channels_last"
    assert describe(None, False, torch.device("cpu")) == "fp32, NCHW"
    assert describe(torch.bfloat16, True, torch.device("cuda", 0)) == "bf16, channels_last"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default for matmuls
    assert describe(None, True, torch.device("cuda", 0)) == "fp32, channels_last"
