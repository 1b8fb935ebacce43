"""The fast path on CPU: bf16 autocast, channels_last, torch.compile, no read-back from the device per step."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from snapens.build import build_data, pick_precision
from snapens.ensemble.cache import cached_logits
from snapens.errors import SnapensError
from snapens.models import CifarResNet
from snapens.snapshots import list_snapshots, read_metadata
from snapens.step import StepOptions, train_step
from snapens.train import train

from conftest import EQUAL_CYCLES_2, sgdr

CPU = torch.device("cpu")


def test_precision_choices():
    assert pick_precision("auto", CPU) is None  # fp32 on CPU, where bf16 is emulated
    assert pick_precision("fp32", CPU) is None
    assert pick_precision("bf16", CPU) is torch.bfloat16


def test_precision_typo_is_one_clear_error(make_cfg, tmp_path):
    with pytest.raises(SnapensError, match="trainer.precision=fp16 is not allowed; choose one of: auto, bf16, fp32"):
        train(make_cfg(*EQUAL_CYCLES_2, "trainer.precision=fp16"), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_clips_the_fp32_gradients_exactly(channels_last, precision):
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = CifarResNet(depth=8, num_classes=4).to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32).contiguous(memory_format=layout), torch.randint(0, 4, (16,))
    result = train_step(model, optimizer, x, y, StepOptions(grad_clip=0.01, clip_mode="norm", precision=precision))
    loss, logits, norm = result.loss, result.logits, result.grad_norm
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32 and bool(result.finite)  # fp32 head
    grads = [p.grad for p in model.parameters()]
    assert all(g.dtype == torch.float32 for g in grads) and all(p.dtype == torch.float32 for p in model.parameters())
    assert norm.item() > 0.01  # clipping was active
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(0.01, rel=1e-5)


def test_channels_last_trains_the_same_model_as_nchw(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_2, "trainer.channels_last=false"), tmp_path / "nchw")
    train(make_cfg(*EQUAL_CYCLES_2, "trainer.channels_last=true"), tmp_path / "nhwc")
    for a, b in zip(list_snapshots(tmp_path / "nchw"), list_snapshots(tmp_path / "nhwc")):
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys()
        for k in wa:  # the same up to rounding (another summation order), grown over 8 updates
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-2, atol=1e-3)


def test_bf16_run_on_cpu_writes_fp32_snapshots_and_says_how_it_ran(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_2, "trainer.precision=bf16"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["precision"] == "bf16, channels_last"
    assert results["training"]["steps"] == 2 * math.ceil(256 / 64)
    assert results["training"]["threads"] == 1  # trainer.num_threads=1 in the override set
    for path in list_snapshots(tmp_path):
        assert {t.dtype for t in load_file(path).values()} <= {torch.float32, torch.int64}
    # The test logits were computed in bf16, and the cache says so: fp32 logits are not served from it.
    cache = tmp_path / "logits" / "test" / "cycle_02.safetensors"
    with safe_open(cache, framework="pt") as f:
        assert json.loads(f.metadata()["key"])["computed_in"] == "bf16, channels_last"
    paths = list_snapshots(tmp_path)
    metas = [read_metadata(p) for p in paths]
    data = build_data(OmegaConf.load(tmp_path / ".hydra" / "config.yaml").data)
    model = CifarResNet(depth=8, num_classes=4)
    bf16 = cached_logits(paths, metas, data.test, "test", 64, CPU, lambda *_: model, torch.bfloat16, True)
    fp32 = cached_logits(paths, metas, data.test, "test", 64, CPU, lambda *_: model, None, True)
    assert not torch.equal(bf16, fp32)  # recomputed in fp32, not the bf16 entry
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


class ReadBacks:
    """Counts every way a tensor's value reaches the host: .item(), .tolist(), bool/float/int(), .cpu()."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(tensor, *args, _real=real, **kwargs):
                self.count += 1
                return _real(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_no_read_back_from_the_device_per_step(make_cfg, tmp_path, monkeypatch):
    """Twice the steps per epoch (same epochs, cycles and test set) must not add a single read-back: the loss, the
    accuracy and the non-finite flag stay on the device between log intervals and checkpoints."""
    counts = {}
    for train_size in (256, 512):  # 4 and 8 steps per epoch
        reads = ReadBacks(monkeypatch)
        train(make_cfg(*EQUAL_CYCLES_2, f"data.train_size={train_size}", "trainer.log_every=1000"),
              tmp_path / str(train_size))
        counts[train_size] = reads.count
        monkeypatch.undo()
    assert counts[256] == counts[512] > 0


def test_skip_mode_reads_the_flag_every_step(make_cfg, tmp_path, monkeypatch):
    """The one documented exception: on_nonfinite=skip decides each update on the host."""
    counts = {}
    for train_size in (256, 512):
        reads = ReadBacks(monkeypatch)
        train(make_cfg(*EQUAL_CYCLES_2, f"data.train_size={train_size}", "trainer.log_every=1000",
                       "trainer.on_nonfinite=skip"), tmp_path / str(train_size))
        counts[train_size] = reads.count
        monkeypatch.undo()
    assert counts[512] - counts[256] == 8  # 8 more steps, one flag each


def test_nonfinite_found_later_still_stops_before_anything_is_written(make_cfg, tmp_path, monkeypatch):
    """Found at the next checkpoint (here the epoch end at step 8), not at step 5 itself: the epoch-1 checkpoint
    and snapshot stay as they were, and the message names the step where it happened."""
    real = torch.nn.functional.cross_entropy
    calls = []

    def nan_at_5(logits, y, **kwargs):
        calls.append(1)
        return real(logits, y, **kwargs) * (float("nan") if len(calls) == 6 else 1.0)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at_5)
    with pytest.raises(SnapensError, match=r"non-finite loss or gradient at step 5 \(lr .*, loss nan"):
        train(make_cfg(*EQUAL_CYCLES_2, "trainer.log_every=1000"), tmp_path)
    assert len(calls) == 8  # trained on to the end of the epoch, then stopped
    assert [p.name for p in list_snapshots(tmp_path)] == ["cycle_01.safetensors"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_compiled_training_matches_eager(make_cfg, tmp_path):
    """torch.compile (inductor, on CPU here) trains the same model; its first step is timed apart."""
    one_epoch = [*sgdr(1, 1), "data.train_size=128", "data.test_size=64"]
    train(make_cfg(*one_epoch, "trainer.compile=false"), tmp_path / "eager")
    train(make_cfg(*one_epoch, "trainer.compile=true"), tmp_path / "compiled")
    eager, compiled = (load_file(list_snapshots(tmp_path / d)[0]) for d in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()  # saved from the model itself: no "_orig_mod." prefixes
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4)
    results = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert results["training"]["compiled"] is True
    assert 0 < results["training"]["compile_seconds"] <= results["training"]["seconds"]
    assert json.loads((tmp_path / "eager" / "results.json").read_text())["training"]["compile_seconds"] == 0


def test_the_classifier_head_runs_in_fp32_under_bf16_autocast():
    """Logits under bf16 autocast come from an fp32 head: not quantised to bf16's ~8 significant bits."""
    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=10).eval()
    features = []
    model.fc.register_forward_hook(lambda module, args, out: features.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(16, 3, 32, 32))
    assert logits.dtype == torch.float32 and features[0].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(logits, torch.nn.functional.linear(features[0], model.fc.weight, model.fc.bias))
    assert not torch.equal(logits, logits.bfloat16().float())


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
