"""snapens.checkpoint: one training per run dir (the lock, and without flock), checkpoints that lack their keys, each
rank's CUDA random stream saved and restored into its own device (a faked CUDA), a checkpoint of another process
count."""


import os
import subprocess
import sys

import pytest
import torch
from snapens import checkpoint, distributed
from snapens.checkpoint import checkpoint_path, run_dir_lock
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots
from snapens.training import train

from conftest import EQUAL_CYCLES_2, HANG


# ---- 1. one training per run dir --------------------------------------------------------------------------------
def test_a_second_training_into_a_locked_run_dir_stops_and_touches_nothing(make_cfg, tmp_path):
    with run_dir_lock(tmp_path):  # as a training in another process holds it
        with pytest.raises(SnapensError, match=f"run dir {tmp_path} is in use by process {os.getpid()}"):
            train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
        result = subprocess.run([sys.executable, "-m", "snapens.train", *EQUAL_CYCLES_2, f"hydra.run.dir={tmp_path}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2 and f"is in use by process {os.getpid()}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "snapshots").exists() and not checkpoint_path(tmp_path).exists()
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path)  # the lock is released with its holder: the dir is usable again
    assert len(list_snapshots(tmp_path)) == 2


def test_a_holder_that_has_not_yet_written_its_pid_is_waited_for_then_named_plainly(tmp_path):
    """The holder writes its PID just after it takes the lock: a second training that looks in between waits for the
    PID (CI once caught "in use by process another process" there), and names "another process" only if none comes."""
    import fcntl
    import threading
    holder = open(tmp_path / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, no PID yet
    late = threading.Timer(0.3, lambda: (holder.write("4242\n"), holder.flush()))
    late.start()
    with pytest.raises(SnapensError, match=f"run dir {tmp_path} is in use by process 4242, which is training"):
        with run_dir_lock(tmp_path):
            pass
    late.join()
    holder.truncate(0)
    assert checkpoint.training_holder(tmp_path) == "another process"  # after its 2 s wait
    with pytest.raises(SnapensError, match=f"run dir {tmp_path} is in use by another process, which is training"):
        with run_dir_lock(tmp_path):
            pass
    holder.write("4242\n")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_UN)  # as a holder killed with -9 leaves it: its PID, no lock
    assert checkpoint.training_holder(tmp_path) is None
    with run_dir_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    holder.close()


def test_checkpoint_without_its_keys_is_one_line(make_cfg, tmp_path):
    from snapens.checkpoint import save_checkpoint
    save_checkpoint(checkpoint_path(tmp_path), {"model": {}})
    with pytest.raises(SnapensError, match="lacks optimizer, rng, progress, config, device: it was not written"):
        train(make_cfg(*EQUAL_CYCLES_2), tmp_path)


def test_a_filesystem_without_flock_trains_without_the_lock(make_cfg, tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def unsupported(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)  # Lustre without -o flock, some NFS mounts
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
    assert len(list_snapshots(tmp_path)) == 2 and "cannot lock run dir" in caplog.text


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


def test_a_cpu_checkpoint_of_two_processes_is_refused_by_one(make_cfg, tmp_path):
    """Issue 23 finding: a checkpoint two CPU ranks wrote was resumed silently by one process. Its process count is
    kept and checked, on the CPU as on GPUs."""
    from snapens.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
    from snapens.training import train

    from conftest import EQUAL_CYCLES_2
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
    saved = load_checkpoint(checkpoint_path(tmp_path))
    assert saved["processes"] == 1
    save_checkpoint(checkpoint_path(tmp_path), {**saved, "processes": 2})  # as a 2-rank torchrun run leaves it
    (tmp_path / "results.json").unlink()  # not finished: it would resume
    with pytest.raises(SnapensError, match=r"written by 2 training processes and this run has 1: .* resume with "
                                           r"torchrun --nproc_per_node=2"):
        train(make_cfg(*EQUAL_CYCLES_2), tmp_path)


def test_a_process_forked_from_a_training_one_does_not_keep_its_run_dir_locked(tmp_path):
    """A DataLoader worker (forked) outliving its killed trainer must not make the resume find the dir in use."""
    import fcntl
    import os
    import signal

    from snapens.checkpoint import run_dir_lock

    ready, started = os.pipe()
    with run_dir_lock(tmp_path):
        child = os.fork()
        if child == 0:  # the worker (its fork handlers have run): it lives on while the trainer has gone
            os.write(started, b"1")
            signal.pause()
        os.read(ready, 1)
    try:
        with open(tmp_path / ".lock") as again:
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise while the child held the lock
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
