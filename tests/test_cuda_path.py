"""The CUDA path, tested where the CPU can show it: SWA without a host read-back (counted), each rank's
CUDA random stream saved and restored into its own device (a faked CUDA), the rank's GPU among those it sees,
deterministic mode, torch.compile without a recompile at the partial batch, the memory check before the training
split goes to the GPU, and evaluation batches scaled to the image size."""

import json

import pytest
import torch
from torch.optim import swa_utils
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode

from snapens import checkpoint, distributed
from snapens.batches import eval_batches
from snapens.build import check_fits
from snapens.data import Split
from snapens.errors import SnapensError
from snapens.models import CifarResNet
from snapens.swa import WeightAverage
from snapens.train import train

from conftest import FAST


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


# ---- each rank's CUDA random stream, on a faked CUDA -------------------------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's random-state calls, recorded: get returns a state naming the device, set is logged."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state.tolist(), device)))
    return calls


def test_cuda_stream_saved_and_restored_for_the_device_in_use(fake_cuda):
    generator, device = torch.Generator(), torch.device("cuda", 2)
    state = checkpoint.rng_state(generator, device)
    assert [s.tolist() for s in state["cuda"]] == [[2]]  # this process's device only, not every visible GPU
    checkpoint.set_rng_state(state, generator, torch.device("cuda", 0))  # resumed where one GPU is visible
    assert fake_cuda == [([2], torch.device("cuda", 0))]


def test_checkpoint_of_other_process_count_is_refused(fake_cuda):
    generator = torch.Generator()
    state = {**checkpoint.rng_state(generator), "cuda": [torch.tensor([r], dtype=torch.uint8) for r in range(4)]}
    with pytest.raises(SnapensError, match=r"written by 4 training processes and this run has 1: .* resume with "
                                           r"torchrun --nproc_per_node=4"):
        checkpoint.set_rng_state(state, generator, torch.device("cuda", 0))
    checkpoint.set_rng_state(state, generator, torch.device("cuda", 1), distributed.Ranks(rank=1, world=4))
    assert fake_cuda == [([1], torch.device("cuda", 1))]  # rank 1 continues rank 1's stream
    checkpoint.set_rng_state(state, generator)  # a CPU resume has no CUDA stream to restore
    assert len(fake_cuda) == 1


@pytest.mark.parametrize("visible, local_rank, index", [(4, 3, 3), (1, 3, 0), (2, 3, 1)])
def test_rank_takes_a_gpu_it_sees(monkeypatch, visible, local_rank, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    ranks = distributed.Ranks(rank=local_rank, world=4, local_rank=local_rank)
    assert distributed.device_for(torch.device("cuda"), ranks) == torch.device("cuda", index)
    assert distributed.device_for(torch.device("cpu"), ranks) == torch.device("cpu")


# ---- determinism, compile, memory ---------------------------------------------------------------------------------
def test_deterministic_mode_trains_the_same_weights_on_cpu(make_cfg, tmp_path):
    run = [*FAST, "scheduler=cosine", "trainer.epochs=1"]
    try:
        train(make_cfg(*run, "trainer.deterministic=true"), tmp_path / "on")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    train(make_cfg(*run), tmp_path / "off")
    on, off = (json.loads((tmp_path / d / "results.json").read_text())["training"]["rank_weights_sha256"]
               for d in ("on", "off"))
    assert on == off


@pytest.mark.slow
def test_compile_drops_the_partial_batch_and_compiles_once(make_cfg, tmp_path):
    """256 images in batches of 96: 2 updates per epoch (64 images left out), no second graph for a batch of 64."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(make_cfg(*FAST, "trainer.batch_size=96", "scheduler=cosine", "trainer.epochs=2", "trainer.compile=true"),
          tmp_path)
    training = json.loads((tmp_path / "results.json").read_text())["training"]
    assert training["steps"] == 4 and training["compiled_graphs"] == 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]


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


def test_evaluation_batches_scale_with_image_size():
    for side, expected in [(32, [1000, 1000, 500]), (64, [250] * 10), (16, [1000, 1000, 500])]:
        split = Split(torch.zeros(2500, 3, side, side, dtype=torch.uint8), torch.zeros(2500, dtype=torch.long))
        sizes = [len(y) for _, y in eval_batches(split, 1000, (0.5,) * 3, (0.25,) * 3)]
        assert sizes == expected, side


def test_fp32_on_a_gpu_is_said_as_tf32_when_torch_allows_it(monkeypatch):
    from snapens.precision import describe
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default for convolutions
    assert describe(None, True, torch.device("cuda", 0)) == "tf32, channels_last"
    assert describe(None, False, torch.device("cpu")) == "fp32, NCHW"
    assert describe(torch.bfloat16, True, torch.device("cuda", 0)) == "bf16, channels_last"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default for matmuls
    assert describe(None, True, torch.device("cuda", 0)) == "fp32, channels_last"
