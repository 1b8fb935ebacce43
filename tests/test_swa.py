"""snapens.swa: the weight average is the mean (and torch's), reads nothing back from the device, is each cycle's second
half in a run, and recomputes BatchNorm statistics in the model's layout."""




import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from snapens.batches import normalize
from snapens.build import build_data
from snapens.models import CifarResNet
from snapens.snapshots import list_snapshots, read_metadata
from snapens.swa import WeightAverage
from snapens.training import train
from torch.optim import swa_utils
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import EQUAL_CYCLES_3, record_steps


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    return model


def test_weight_average_is_the_mean_and_torchs():
    model = CifarResNet(depth=8, num_classes=10)
    ours, torchs = WeightAverage(model), AveragedModel(model)
    seen = []
    for seed in range(5):
        perturbed(model, seed)
        seen.append([p.detach().clone() for p in model.parameters()])
        ours.update_parameters(model)
        torchs.update_parameters(model)
    assert ours.n_averaged == int(torchs.n_averaged) == 5
    for i, p in enumerate(ours.module.parameters()):
        torch.testing.assert_close(p, torch.stack([s[i] for s in seen]).mean(0), rtol=0, atol=2e-6)
    for (name, a), b in zip(ours.module.state_dict().items(), torchs.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # buffers: the model's, exactly
    restored = WeightAverage(CifarResNet(depth=8, num_classes=10))  # from a checkpoint, ours or AveragedModel's
    for source in (ours.module, torchs.module):
        restored.load_state_dict((ours if source is ours.module else torchs).state_dict())
        assert restored.n_averaged == 5 and all(torch.equal(a, b) for a, b in zip(
            restored.module.state_dict().values(), source.state_dict().values()))


class ReadBacks(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (item(), float(t), a tensor used as a Python number):
    on a GPU each one waits for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_weight_average_reads_nothing_back(monkeypatch):
    """Counted on the CPU with torch's GPU code path (its fused foreach update) forced: AveragedModel reads its
    count back at every update, WeightAverage never does."""
    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cpu", "cuda"])
    model = CifarResNet(depth=8, num_classes=10)
    counts = {}
    for average in (WeightAverage(model), AveragedModel(model)):
        average.update_parameters(model)  # the first update only copies
        with ReadBacks() as reads:
            average.update_parameters(model)
            average.update_parameters(model)
        counts[type(average).__name__] = reads.count
    assert counts["WeightAverage"] == 0 and counts["AveragedModel"] >= 2


def test_swa_snapshot_is_the_mean_of_the_weights_of_each_cycles_second_half(make_cfg, tmp_path, monkeypatch):
    weights = []
    record_steps(monkeypatch, after=lambda model, optimizer: weights.append(
        {k: v.detach().clone() for k, v in model.named_parameters()}))
    cfg = make_cfg(*EQUAL_CYCLES_3, "trainer.swa.start=0.5")
    train(cfg, tmp_path)
    plain, swa = list_snapshots(tmp_path), list_snapshots(tmp_path, swa=True)
    assert [p.name for p in swa] == ["cycle_01_swa.safetensors", "cycle_02_swa.safetensors",
                                     "cycle_03_swa.safetensors"]
    assert [p.name for p in plain] == ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]
    for cycle, path in enumerate(swa):
        averaged = load_file(path)
        window = weights[4 * cycle + 2: 4 * cycle + 4]  # after updates 2, 3 of the cycle's 0..3
        assert read_metadata(path)["swa_updates"] == 2
        for name in window[0]:
            torch.testing.assert_close(averaged[name], torch.stack([w[name] for w in window]).mean(0),
                                       rtol=1e-6, atol=1e-7)

    # BatchNorm statistics recomputed on the training images with the averaged weights: the first BN layer's
    # running mean is the mean of the first convolution's output over all of them (one batch of 256 < 1000).
    data = build_data(cfg.data)
    averaged = load_file(swa[-1])
    x = normalize(data.train.images, data.mean, data.std)
    conv = F.conv2d(x, averaged["conv.weight"], padding=1)
    torch.testing.assert_close(averaged["bn.running_mean"], conv.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_swa_batchnorm_statistics_are_recomputed_in_the_models_layout(make_cfg, tmp_path, monkeypatch):
    import snapens.swa
    layouts, real = [], snapens.swa.update_bn

    def recording(batches, model):
        model.conv.register_forward_hook(lambda m, args, out: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)))
        return real(batches, model)

    monkeypatch.setattr(snapens.swa, "update_bn", recording)
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.swa.start=0.5", "trainer.channels_last=true"), tmp_path)
    assert layouts and all(layouts)
