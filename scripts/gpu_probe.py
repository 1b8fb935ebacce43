"""CUDA probes of snapens' training path, without Hydra (run by scripts/gpu_validate.sh; PROBE_DEVICE=cpu for a dry run
with tiny models). Each probe's result goes to $OUT/probe.json and one printed line:

  loop_body_sync_free   training.py's per-step work (batches, update, sums, non-finite flag) under
                        torch.cuda.set_sync_debug_mode("error"): any host sync raises
  swa_update_syncs      whether an SWA update waits for the GPU: torch's AveragedModel against snapens' WeightAverage
  rng_round_trip        the checkpoint's random streams put back give the same draws; a checkpoint of 2 processes
                        is refused by a 1-process run
  run_to_run            two fresh identical runs: bit-identical by default, and with trainer.deterministic's settings
  cudnn_benchmark_img_s images/s of a WRN-16-4 update with cudnn.benchmark off and on
"""

import itertools
import json
import os
import shutil
import sys
import time
import traceback

import torch
from torch.optim.swa_utils import AveragedModel

from snapens.batches import Augmentation, train_batches
from snapens.build import make_deterministic
from snapens.checkpoint import rng_state, set_rng_state
from snapens.data import Split
from snapens.models import CifarResNet, WideResNet
from snapens.step import StepOptions, note_first_nonfinite, train_step
from snapens.swa import WeightAverage

DEVICE = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
OPTIONS = StepOptions(grad_clip=5.0, precision=torch.bfloat16 if CUDA else None)
WRN = (lambda: WideResNet(16, 4, 0.0, 10)) if CUDA else (lambda: CifarResNet(8, 10))  # tiny on a CPU dry run
BATCH = 256 if CUDA else 16
RESULTS = {}


def probe(fn):
    start = time.perf_counter()
    try:
        RESULTS[fn.__name__] = fn()
    except Exception as e:  # a probe that fails is a finding, not the end of the run
        RESULTS[fn.__name__] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                                "where": traceback.format_exc().splitlines()[-3][:200]}
    print(fn.__name__, f"{time.perf_counter() - start:.1f}s", RESULTS[fn.__name__], flush=True)


def sync_mode(mode: str) -> None:
    if CUDA:
        torch.cuda.set_sync_debug_mode(mode)


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def random_split(n: int = 2048) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g)).to(DEVICE)


def env():
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpu": torch.cuda.get_device_name() if CUDA else None, "python": sys.version.split()[0],
            "bf16_native": CUDA and torch.cuda.is_bf16_supported(including_emulation=False),
            "allow_tf32_conv": torch.backends.cudnn.allow_tf32, "cc": shutil.which("cc") or shutil.which("gcc"),
            "triton": __import__("importlib").util.find_spec("triton") is not None}


def loop_body_sync_free():
    torch.manual_seed(0)
    model = CifarResNet(20, 10).to(DEVICE, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    data, generator = random_split(2048 if CUDA else 256), torch.Generator(DEVICE).manual_seed(0)
    loss_sum, correct = torch.tensor(0.0, device=DEVICE), torch.tensor(0, device=DEVICE)
    first = torch.full((3,), -1.0, dtype=torch.float64, device=DEVICE)
    batches = train_batches(data, 128, generator, Augmentation(4, True, 8), (0.5,) * 3, (0.25,) * 3, None, True)
    for i, (x, y) in enumerate(batches):
        if i == 2:  # after the first steps, which allocate and may pick kernels
            sync_mode("error")
        result = train_step(model, optimizer, x, y, OPTIONS)
        loss_sum += result.loss * len(y)
        correct += (result.logits.argmax(1) == y).sum()
        note_first_nonfinite(first, i, result)
    sync_mode("default")
    return {"ok": True, "steps": i + 1, "loss": loss_sum.item() / len(data)}


def swa_update_syncs():
    model = CifarResNet(8, 4).to(DEVICE)
    found = {}
    for average in (AveragedModel(model), WeightAverage(model)):
        average.update_parameters(model)
        average.update_parameters(model)
        sync_mode("error")
        try:
            average.update_parameters(model)
            found[type(average).__name__] = "no sync"
        except RuntimeError as e:
            found[type(average).__name__] = f"synced: {str(e).splitlines()[0][:100]}"
        finally:
            sync_mode("default")
    return found


def rng_round_trip():
    generator = torch.Generator(DEVICE).manual_seed(1)

    def draws():
        return (torch.randperm(5000, generator=generator, device=DEVICE),
                torch.randint(0, 9, (64,), generator=generator, device=DEVICE), torch.rand(8, device=DEVICE))

    saved = rng_state(generator, DEVICE)
    first = draws()
    set_rng_state(saved, generator, DEVICE)
    result = {"identical": all(torch.equal(a, b) for a, b in zip(first, draws())), "cuda_states": len(saved["cuda"])}
    if CUDA:
        try:
            set_rng_state({**saved, "cuda": saved["cuda"] * 2}, generator, DEVICE)
            result["two_process_checkpoint"] = "accepted"
        except Exception as e:
            result["two_process_checkpoint"] = f"refused: {str(e)[:120]}"
    return result


def weights_after(steps: int, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    model = WRN().to(DEVICE, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data, generator = random_split(BATCH * 4), torch.Generator(DEVICE).manual_seed(seed)
    batches = itertools.chain.from_iterable(  # epoch after epoch, each drawing its order when it starts
        train_batches(data, BATCH // 2, generator, Augmentation(), (0.5,) * 3, (0.25,) * 3, None, True)
        for _ in itertools.count())
    for x, y in itertools.islice(batches, steps):
        train_step(model, optimizer, x, y, OPTIONS)
    return b"".join(v.detach().cpu().contiguous().numpy().tobytes() for v in model.state_dict().values())


def run_to_run():
    result = {"default": weights_after(12) == weights_after(12)}
    make_deterministic(True)
    try:
        result["deterministic"] = weights_after(12) == weights_after(12)
    finally:
        make_deterministic(False)
    return result


def cudnn_benchmark_img_s():
    result = {}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        torch.manual_seed(0)
        model = WRN().to(DEVICE, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(BATCH, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (BATCH,), device=DEVICE)
        warmup, timed = (10, 30) if CUDA else (1, 2)
        for i in range(warmup + timed):
            if i == warmup:
                synchronize()
                start = time.perf_counter()
            train_step(model, optimizer, x, y, OPTIONS)
        synchronize()
        result[f"benchmark={benchmark}"] = round(BATCH * timed / (time.perf_counter() - start))
    torch.backends.cudnn.benchmark = False
    return result


if __name__ == "__main__":
    for fn in (env, loop_body_sync_free, swa_update_syncs, rng_round_trip, run_to_run, cudnn_benchmark_img_s):
        probe(fn)
    with open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
